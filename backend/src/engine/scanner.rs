//! Learning from QEMU's page tables. A learning restore maps no page before
//! the guest touched it: what no fault waits on goes into the page cache
//! ([`super::installer`]), and guest RAM is registered for missing faults
//! and for write protection, with nothing ever protected. The kernel then
//! maps a cached page on the guest's first touch by itself (no round trip
//! through thaw), and the write-protect registration keeps it from mapping
//! the cached pages around a touched one as well (fault-around), so a page
//! mapped in QEMU's page tables is a page the guest touched. A thread reads
//! which pages are mapped every [`SCAN_TICK`] and records the new ones.
//! (Faults on pages that are not there yet are recorded by the fault
//! thread as before.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{spawn, Engine, EngineError};
use crate::mem::PageIndex;
use crate::observe::pagemap::Pagemap;
use crate::vmm::RamMapping;

/// How often the scanner reads QEMU's page tables.
pub(crate) const SCAN_TICK: Duration = Duration::from_millis(100);
/// How long [`TouchScanner::wait_next_scan`] waits at most.
const SCAN_WAIT: Duration = Duration::from_secs(5);

/// A running scanner thread.
pub(crate) struct TouchScanner {
    stop: Arc<AtomicBool>,
    scans: Arc<AtomicU64>,
    handle: Option<JoinHandle<Scanned>>,
}

/// What a scanner found.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// First touches, read by read (address order within one).
    pub(crate) touches: Vec<PageIndex>,
    pub(crate) scans: u64,
    /// Time spent reading QEMU's page tables, in all.
    pub(crate) scan_time: Duration,
}

impl Engine {
    /// Starts reading which pages of `ranges` (each RAM mapping of QEMU
    /// with its first global page) QEMU has mapped, every [`SCAN_TICK`].
    /// Only for an engine that maps only touched pages
    /// ([`Engine::with_cached_installs`]) over RAM registered with
    /// [`crate::remote::uffd::RemoteUffd::register_missing_wp`].
    pub(crate) fn start_touch_scanner(
        self: &Arc<Self>,
        mut pagemap: Pagemap,
        ranges: Vec<(RamMapping, u64)>,
    ) -> Result<TouchScanner, EngineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let scans = Arc::new(AtomicU64::new(0));
        let (engine, halt, count) = (self.clone(), stop.clone(), scans.clone());
        let handle = spawn("scan", move || {
            let mut found = Scanned::default();
            loop {
                // Read once more after a stop request: the touches up to it.
                let last = halt.load(Ordering::Acquire);
                let t = Instant::now();
                let read = pagemap.mapped(&ranges, |p| {
                    if engine.note_scanned_touch(p) {
                        found.touches.push(p);
                    }
                });
                found.scan_time += t.elapsed();
                if let Err(e) = read {
                    // QEMU went away: the restore fails elsewhere.
                    log::warn!("reading {}: {e}", pagemap.path());
                    break;
                }
                found.scans += 1;
                count.fetch_add(1, Ordering::Release);
                if last {
                    break;
                }
                std::thread::park_timeout(SCAN_TICK);
            }
            log::debug!(
                "touch scanner: {} first touches from {} reads of QEMU's page tables ({:.2} ms each)",
                found.touches.len(),
                found.scans,
                found.scan_time.as_secs_f64() * 1000.0 / found.scans.max(1) as f64
            );
            found
        })?;
        Ok(TouchScanner {
            stop,
            scans,
            handle: Some(handle),
        })
    }

    /// Records a first touch the scanner found; a prefetched page touched
    /// after resume and before the window counts as a skipped fault.
    fn note_scanned_touch(&self, page: PageIndex) -> bool {
        if !self.note_touch(page) {
            return false;
        }
        if self.resumed.load(Ordering::Acquire)
            && !self.in_window.load(Ordering::Acquire)
            && self.pages.prefetched.test(page)
        {
            self.counters.skipped_faults.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

impl TouchScanner {
    /// Waits until a read that started after this call has ended (at most
    /// a few seconds): every page mapped now is recorded then.
    pub(crate) fn wait_next_scan(&self) {
        let seen = self.scans.load(Ordering::Acquire);
        if let Some(h) = &self.handle {
            h.thread().unpark();
        }
        let began = Instant::now();
        // The read in progress may have started before this call.
        while self.scans.load(Ordering::Acquire) < seen + 2
            && began.elapsed() < SCAN_WAIT
            && self.handle.as_ref().is_some_and(|h| !h.is_finished())
        {
            std::thread::sleep(Duration::from_millis(2));
            if let Some(h) = &self.handle {
                h.thread().unpark();
            }
        }
    }

    /// Stops after one last read; what it found.
    pub(crate) fn finish(mut self) -> Result<Scanned, EngineError> {
        self.halt();
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(found)) => Ok(found),
            Some(Err(_)) => Err(EngineError::Panicked("scan")),
            None => Ok(Scanned::default()),
        }
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = &self.handle {
            h.thread().unpark();
        }
    }
}

impl Drop for TouchScanner {
    fn drop(&mut self) {
        self.halt();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
