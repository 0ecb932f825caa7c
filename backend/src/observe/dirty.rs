//! Write tracking of a running VM from outside QEMU: the dirty-bitmap hook
//! behind the `dirty` working-set estimator.
//!
//! thaw takes over a userfaultfd in QEMU with `UFFD_FEATURE_WP_ASYNC` (the
//! kernel resolves write-protect faults itself and only marks the page
//! written), registers guest RAM for write protection and protects all of
//! it; then each [`WriteTracker::collect`] asks the kernel with the
//! `PAGEMAP_SCAN` ioctl on `/proc/<qemu>/pagemap` which pages were written
//! since, re-protecting them in the same atomic step (Linux ≥ 6.7). Where
//! the kernel lacks `WP_ASYNC` (or when asked to), write-protect faults are
//! synchronous instead: a thread records each faulting page and lifts its
//! protection, and every collect protects guest RAM again. QEMU's copy of
//! the userfaultfd is closed at once, so if thaw dies the registration goes
//! away and the guest runs on unprotected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;

use super::pagemap::{Pagemap, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING};
use crate::mem::HostAddr;
use crate::mem::{PageIndex, PAGE_SIZE};
use crate::remote::uffd::{
    self, EventBuffer, FaultEvent, RegisterMode, RemoteUffd, FEATURE_WP_ASYNC,
    FEATURE_WP_HUGETLBFS_SHMEM, FEATURE_WP_UNPOPULATED,
};
use crate::vmm::RamMapping;

/// Errors tracking writes.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    #[error("opening {path}: {source}")]
    Pagemap {
        path: String,
        source: std::io::Error,
    },
    #[error("PAGEMAP_SCAN on QEMU's pagemap failed: {0} (needs Linux 6.7 or newer)")]
    Scan(Errno),
    #[error("the write-fault thread failed: {0}")]
    FaultThread(String),
    #[error("spawning the write-fault thread: {0}")]
    Spawn(std::io::Error),
}

/// Synchronous mode: the fault thread and what it recorded.
struct SyncFaults {
    written: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), uffd::UffdError>>,
}

/// Tracks which guest pages QEMU's guest writes.
pub(crate) struct WriteTracker {
    uffd: Arc<RemoteUffd>,
    pagemap: Pagemap,
    ranges: Vec<(RamMapping, u64)>,
    sync: Option<SyncFaults>,
}

impl WriteTracker {
    /// Starts tracking writes to `ranges` (each RAM mapping with the global
    /// number of its first page) in QEMU `process`; asynchronously where
    /// the kernel can and `force_sync` is false. `uffd_device_in_owner`:
    /// see [`uffd::take_over_with`].
    pub(crate) fn start(
        process: &crate::remote::process::QemuProcess,
        ranges: Vec<(RamMapping, u64)>,
        force_sync: bool,
        uffd_device_in_owner: Option<i32>,
    ) -> Result<WriteTracker, DirtyError> {
        let available = uffd::kernel_features().map_err(|errno| uffd::UffdError::Api {
            requested: FEATURE_WP_ASYNC,
            errno,
        })?;
        let asynchronous = !force_sync && available & FEATURE_WP_ASYNC != 0;
        if !asynchronous && !force_sync {
            log::warn!(
                "the kernel lacks UFFD_FEATURE_WP_ASYNC: tracking writes with synchronous faults"
            );
        }
        // Without WP_UNPOPULATED, pages not mapped in QEMU right now could be
        // written unnoticed; ask for it where the kernel has it.
        let features = FEATURE_WP_HUGETLBFS_SHMEM
            | (available & FEATURE_WP_UNPOPULATED)
            | if asynchronous { FEATURE_WP_ASYNC } else { 0 };
        let uffd = Arc::new(uffd::take_over_with(
            process,
            features,
            uffd_device_in_owner,
        )?);
        uffd.close_remote()?;
        let pagemap = Pagemap::open(process.pid()).map_err(|source| DirtyError::Pagemap {
            path: format!("/proc/{}/pagemap", process.pid()),
            source,
        })?;
        let mut tracker = WriteTracker {
            uffd,
            pagemap,
            ranges,
            sync: None,
        };
        if !asynchronous {
            tracker.sync = Some(tracker.spawn_fault_thread()?);
        }
        for (m, _) in &tracker.ranges {
            tracker
                .uffd
                .register(m.start, m.len, RegisterMode::WRITE_PROTECT)?;
            tracker.uffd.write_protect(m.start, m.len)?;
        }
        Ok(tracker)
    }

    /// Synchronous mode: records each write-faulting page and unprotects it.
    fn spawn_fault_thread(&self) -> Result<SyncFaults, DirtyError> {
        let written = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ranges: Vec<(u64, u64, u64)> = self
            .ranges
            .iter()
            .map(|(m, first)| (m.start.0, m.len, *first))
            .collect();
        let (uffd, out, halt) = (self.uffd.clone(), written.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("thaw-wp".into())
            .spawn(move || {
                let mut events = EventBuffer::new(64);
                while !halt.load(Ordering::Acquire) {
                    let batch = uffd.read_events(&mut events, Some(Duration::from_millis(50)))?;
                    for ev in batch {
                        let FaultEvent::WriteProtectFault { addr } = *ev else {
                            continue;
                        };
                        let addr = addr & !(PAGE_SIZE - 1);
                        if let Some((start, _, first)) =
                            ranges.iter().find(|(s, l, _)| addr >= *s && addr < s + l)
                        {
                            if let Ok(mut w) = out.lock() {
                                w.push(first + (addr - start) / PAGE_SIZE);
                            }
                        }
                        uffd.unprotect(HostAddr(addr), PAGE_SIZE, true)?;
                    }
                }
                Ok(())
            })
            .map_err(DirtyError::Spawn)?;
        Ok(SyncFaults {
            written,
            stop,
            thread,
        })
    }

    /// Reports every page written since the last call (or since
    /// [`WriteTracker::start`]) to `seen`, and protects it again.
    pub(crate) fn collect(&mut self, mut seen: impl FnMut(PageIndex)) -> Result<u64, DirtyError> {
        if let Some(sync) = &self.sync {
            if sync.thread.is_finished() {
                return Err(DirtyError::FaultThread("it stopped".into()));
            }
            // Protect again first: a write from now on faults again and
            // counts for the next interval.
            for (m, _) in &self.ranges {
                self.uffd.write_protect(m.start, m.len)?;
            }
            let pages = match sync.written.lock() {
                Ok(mut w) => std::mem::take(&mut *w),
                Err(_) => return Err(DirtyError::FaultThread("it panicked".into())),
            };
            for &p in &pages {
                seen(PageIndex(p));
            }
            return Ok(pages.len() as u64);
        }
        let mut written = 0;
        for (m, first_page) in &self.ranges {
            self.pagemap
                .scan(
                    m,
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    PAGE_IS_WRITTEN,
                    |start, end| {
                        for addr in (start..end).step_by(crate::mem::PAGE_BYTES) {
                            seen(PageIndex(first_page + (addr - m.start.0) / PAGE_SIZE));
                            written += 1;
                        }
                    },
                )
                .map_err(DirtyError::Scan)?;
        }
        Ok(written)
    }

    /// Stops tracking: unregisters guest RAM (writes are free again).
    pub(crate) fn stop(self) -> Result<(), DirtyError> {
        for (m, _) in &self.ranges {
            self.uffd.unregister(m.start, m.len)?;
        }
        if let Some(sync) = self.sync {
            sync.stop.store(true, Ordering::Release);
            match sync.thread.join() {
                Ok(r) => r?,
                Err(_) => return Err(DirtyError::FaultThread("it panicked".into())),
            }
        }
        Ok(())
    }

    /// Whether write faults are synchronous (no `WP_ASYNC`).
    pub(crate) fn synchronous(&self) -> bool {
        self.sync.is_some()
    }
}
