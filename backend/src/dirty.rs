//! Write tracking of a running VM from outside QEMU: the dirty-bitmap hook
//! behind the `dirty` working-set estimator.
//!
//! thaw takes over a userfaultfd in QEMU with `UFFD_FEATURE_WP_ASYNC` (the
//! kernel resolves write-protect faults itself and only marks the page
//! written), registers guest RAM for write protection and protects all of
//! it; then each [`WriteTracker::collect`] asks the kernel with the
//! `PAGEMAP_SCAN` ioctl on `/proc/<qemu>/pagemap` which pages were written
//! since, re-protecting them in the same atomic step (Linux ≥ 6.7). QEMU's
//! copy of the userfaultfd is closed at once, so if thaw dies the
//! registration goes away and the guest runs on unprotected.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

use crate::mem::{PageIndex, PAGE_SIZE};
use crate::qemu::RamMapping;
use crate::uffd::{self, RegisterMode, RemoteUffd};

/// `UFFD_FEATURE_*` bits newer than the bindings.
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `PAGEMAP_SCAN` flags and page categories (linux/fs.h).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);

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
}

/// Tracks which guest pages QEMU's guest writes.
pub struct WriteTracker {
    uffd: RemoteUffd,
    pagemap: File,
    ranges: Vec<(RamMapping, u64)>,
    regions: Vec<PageRegion>,
}

impl WriteTracker {
    /// Starts tracking writes to `ranges` (each RAM mapping with the global
    /// number of its first page) in QEMU process `pid`.
    pub fn start(
        pid: nix::unistd::Pid,
        ranges: Vec<(RamMapping, u64)>,
    ) -> Result<WriteTracker, DirtyError> {
        let mut features = FEATURE_WP_ASYNC | FEATURE_WP_HUGETLBFS_SHMEM;
        let available = uffd::kernel_features().map_err(|errno| uffd::UffdError::Api {
            requested: features,
            errno,
        })?;
        // Without it, pages not mapped in QEMU right now could be written
        // unnoticed; ask for it where the kernel has it.
        features |= available & FEATURE_WP_UNPOPULATED;
        let uffd = uffd::take_over(pid, features)?;
        uffd.close_remote()?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|source| DirtyError::Pagemap { path, source })?;
        let tracker = WriteTracker {
            uffd,
            pagemap,
            ranges,
            regions: vec![PageRegion::default(); 4096],
        };
        for (m, _) in &tracker.ranges {
            tracker
                .uffd
                .register(m.start, m.len, RegisterMode::WRITE_PROTECT)?;
            tracker.uffd.write_protect(m.start, m.len)?;
        }
        Ok(tracker)
    }

    /// Reports every page written since the last call (or since
    /// [`WriteTracker::start`]) to `seen`, and protects it again.
    pub fn collect(&mut self, mut seen: impl FnMut(PageIndex)) -> Result<u64, DirtyError> {
        let mut written = 0;
        let fd = self.pagemap.as_raw_fd();
        for (m, first_page) in &self.ranges {
            let end = m.start.0 + m.len;
            let mut at = m.start.0;
            while at < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start: at,
                    end,
                    vec: self.regions.as_mut_ptr() as u64,
                    vec_len: self.regions.len() as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..Default::default()
                };
                // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
                // `vec_len` page_region slots of our own live buffer; the
                // kernel writes only those and `arg`.
                let n = unsafe { pagemap_scan(fd, &mut arg) }.map_err(DirtyError::Scan)?;
                for r in &self.regions[..n as usize] {
                    for addr in (r.start..r.end).step_by(PAGE_SIZE as usize) {
                        seen(PageIndex(first_page + (addr - m.start.0) / PAGE_SIZE));
                        written += 1;
                    }
                }
                if arg.walk_end <= at {
                    break;
                }
                at = arg.walk_end;
            }
        }
        Ok(written)
    }

    /// Stops tracking: unregisters guest RAM (writes are free again).
    pub fn stop(self) -> Result<(), DirtyError> {
        for (m, _) in &self.ranges {
            self.uffd.unregister(m.start, m.len)?;
        }
        Ok(())
    }
}
