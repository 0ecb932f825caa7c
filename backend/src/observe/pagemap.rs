//! QEMU's page tables read from outside through `/proc/<qemu>/pagemap`:
//! which guest pages are mapped now, and (for [`super::dirty`]) which were
//! written. The `PAGEMAP_SCAN` ioctl (Linux ≥ 6.7) answers with runs of
//! pages; on older kernels the mapped pages come from one 64-bit entry per
//! page instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;

use crate::mem::{usize_from, PageIndex, PAGE_SIZE};
use crate::vmm::RamMapping;

/// `PAGEMAP_SCAN` flags and page categories (linux/fs.h).
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;

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

/// Runs one `PAGEMAP_SCAN` call can return.
const REGIONS: usize = 4096;
/// Pagemap entries read at once without `PAGEMAP_SCAN`.
const ENTRIES: u64 = 1 << 16;

/// An open `/proc/<pid>/pagemap`.
pub(crate) struct Pagemap {
    file: File,
    path: String,
    regions: Vec<PageRegion>,
    /// `PAGEMAP_SCAN` was refused once (an older kernel): read entries.
    no_scan_ioctl: AtomicBool,
}

impl Pagemap {
    /// Opens process `pid`'s pagemap (needs the rights of a tracer: root
    /// or the same user, for the page frame numbers it also holds).
    pub(crate) fn open(pid: nix::unistd::Pid) -> std::io::Result<Pagemap> {
        let path = format!("/proc/{pid}/pagemap");
        let file = File::open(&path)?;
        Ok(Pagemap {
            file,
            path,
            regions: vec![PageRegion::default(); REGIONS],
            no_scan_ioctl: AtomicBool::new(false),
        })
    }

    /// Whether this kernel answers `PAGEMAP_SCAN` (Linux ≥ 6.7), tried on
    /// this process's own pagemap.
    pub(crate) fn scan_supported() -> bool {
        let Ok(mut own) = Pagemap::open(nix::unistd::Pid::this()) else {
            return false;
        };
        let probe = [0u8; 1];
        let at = probe.as_ptr() as u64 & !(PAGE_SIZE - 1);
        let m = RamMapping {
            id: String::new(),
            start: crate::mem::HostAddr(at),
            len: PAGE_SIZE,
            fd_path: std::path::PathBuf::new(),
        };
        own.scan(&m, 0, PAGE_IS_PRESENT, |_, _| {}).is_ok()
    }

    /// The path it was opened from (for error messages).
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Calls `seen` for every page of `ranges` (each RAM mapping with the
    /// global number of its first page) that is mapped in the process's
    /// page tables now, in address order.
    pub(crate) fn mapped(
        &mut self,
        ranges: &[(RamMapping, u64)],
        mut seen: impl FnMut(PageIndex),
    ) -> std::io::Result<()> {
        for (m, first_page) in ranges {
            let page_of = |addr: u64| PageIndex(first_page + (addr - m.start.0) / PAGE_SIZE);
            if !self.no_scan_ioctl.load(Ordering::Relaxed) {
                let scanned = self.scan(m, 0, PAGE_IS_PRESENT, |start, end| {
                    for addr in (start..end).step_by(crate::mem::PAGE_BYTES) {
                        seen(page_of(addr));
                    }
                });
                match scanned {
                    Ok(()) => continue,
                    // An older kernel: no such ioctl (or a smaller struct).
                    Err(Errno::ENOTTY | Errno::EINVAL) => {
                        log::debug!("PAGEMAP_SCAN refused: reading pagemap entries instead");
                        self.no_scan_ioctl.store(true, Ordering::Relaxed);
                    }
                    Err(e) => return Err(std::io::Error::from(e)),
                }
            }
            self.mapped_by_entries(m, |addr| seen(page_of(addr)))?;
        }
        Ok(())
    }

    /// [`Pagemap::mapped`] for one mapping, one 64-bit entry per page
    /// (bit 63: present).
    fn mapped_by_entries(&self, m: &RamMapping, mut seen: impl FnMut(u64)) -> std::io::Result<()> {
        let pages = m.len / PAGE_SIZE;
        let mut buf = vec![0u8; usize_from(ENTRIES.min(pages.max(1)) * 8)];
        let mut done = 0;
        while done < pages {
            let n = ENTRIES.min(pages - done);
            let bytes = &mut buf[..usize_from(n * 8)];
            self.file
                .read_exact_at(bytes, (m.start.0 / PAGE_SIZE + done) * 8)?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut entry = [0u8; 8];
                entry.copy_from_slice(e);
                if u64::from_le_bytes(entry) >> 63 != 0 {
                    seen(m.start.0 + (done + i as u64) * PAGE_SIZE);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// One `PAGEMAP_SCAN` walk over mapping `m` with `flags`: calls
    /// `region(start, end)` for every run of pages in all of the
    /// `categories`.
    pub(crate) fn scan(
        &mut self,
        m: &RamMapping,
        flags: u64,
        categories: u64,
        mut region: impl FnMut(u64, u64),
    ) -> Result<(), Errno> {
        let fd = self.file.as_raw_fd();
        let end = m.start.0 + m.len;
        let mut at = m.start.0;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: at,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: categories,
                return_mask: categories,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
            // `vec_len` page_region slots of our own live buffer; the kernel
            // writes only those and `arg`.
            let n = unsafe { pagemap_scan(fd, &mut arg) }?;
            // The ioctl returns how many regions it filled, at most vec_len.
            let n = usize::try_from(n).unwrap_or(0).min(self.regions.len());
            for r in &self.regions[..n] {
                region(r.start.max(m.start.0), r.end.min(end));
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::HostAddr;

    /// A private mapping of our own, 64 pages, with pages 3, 4 and 40
    /// touched: both ways of reading see exactly those.
    #[test]
    fn mapped_pages_are_the_touched_ones() {
        let pages = 64usize;
        let len = pages * crate::mem::PAGE_BYTES;
        let mut region = vec![0u8; len + crate::mem::PAGE_BYTES];
        // A page-aligned window of the vector; fresh memory from the
        // allocator may be mapped already, so release it first.
        let base = (region.as_mut_ptr() as usize).next_multiple_of(crate::mem::PAGE_BYTES);
        // SAFETY: `base..base+len` lies inside `region`, which we own and
        // do not read before writing; MADV_NOHUGEPAGE keeps a touch to its
        // own 4 KiB page, MADV_DONTNEED on private anonymous memory only
        // drops its pages (they read as zeros again).
        let rc = unsafe {
            libc::madvise(base as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE);
            libc::madvise(base as *mut libc::c_void, len, libc::MADV_DONTNEED)
        };
        assert_eq!(rc, 0, "madvise");
        for p in [3usize, 4, 40] {
            // SAFETY: in bounds of `region` (see above).
            unsafe { std::ptr::write_volatile((base + p * crate::mem::PAGE_BYTES) as *mut u8, 1) };
        }
        let m = RamMapping {
            id: "test".into(),
            start: HostAddr(base as u64),
            len: len as u64,
            fd_path: std::path::PathBuf::new(),
        };
        let ranges = [(m, 100u64)];
        let mut pm = Pagemap::open(nix::unistd::Pid::this()).expect("open");
        let mut by_scan = Vec::new();
        pm.mapped(&ranges, |p| by_scan.push(p.0)).expect("scan");
        let mut by_entries = Vec::new();
        pm.mapped_by_entries(&ranges[0].0, |a| {
            by_entries.push(100 + (a - base as u64) / PAGE_SIZE);
        })
        .expect("entries");
        assert_eq!(by_entries, [103, 104, 140]);
        assert_eq!(by_scan, by_entries);
        drop(region);
    }
}
