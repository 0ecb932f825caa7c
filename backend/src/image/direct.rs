//! Background reads of `pages.bin` that bypass the page cache.
//!
//! A restore reads the image once. Through the page cache each byte is
//! copied twice by the CPU (disk → cache → thaw's buffer) before
//! `UFFDIO_COPY` copies it a third time, and the copy out of freshly read
//! cache pages is what the filler spends most of its time on: CPU the
//! guest and its clients need while the fill runs. Bulk reads (the fill,
//! the filler's 4 MiB groups) therefore read with `O_DIRECT` into a
//! page-aligned buffer, unless the range is already in the page cache
//! (`cachestat`, Linux ≥ 6.5), where a buffered read is a memory copy.
//! Without `cachestat` every read stays buffered, as it would be hot. Reads
//! a fault waits on stay buffered: one page, where readahead helps the
//! next fault.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::mem::PAGE_BYTES;

/// Reads smaller than this stay buffered (the saving is per byte, the
/// cost of losing readahead per request).
pub const DIRECT_READ_MIN: usize = 256 << 10;

/// `cachestat(2)`'s number in the unified syscall table (x86_64, arm64,
/// riscv and the other architectures that share it).
const SYS_CACHESTAT: libc::c_long = 451;

/// A byte buffer whose start is page-aligned, as `O_DIRECT` needs.
pub struct PageBuffer {
    bytes: Vec<u8>,
    offset: usize,
    len: usize,
}

impl PageBuffer {
    /// `len` zeroed bytes starting on a page boundary.
    pub fn new(len: usize) -> PageBuffer {
        let bytes = vec![0u8; len + PAGE_BYTES];
        let offset = bytes.as_ptr().align_offset(PAGE_BYTES).min(PAGE_BYTES);
        PageBuffer { bytes, offset, len }
    }
}

impl Deref for PageBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.offset..self.offset + self.len]
    }
}

impl DerefMut for PageBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.offset..self.offset + self.len]
    }
}

/// `pages.bin` opened a second time with `O_DIRECT`.
pub struct DirectReader {
    file: File,
    /// Set once `cachestat` failed: whether a range is cached is unknown
    /// then, and every read stays buffered.
    no_cachestat: AtomicBool,
    /// Set once the file system refused a direct read: then none is tried.
    refused: AtomicBool,
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

impl DirectReader {
    /// Opens `path` for direct reads; None where the file system has no
    /// `O_DIRECT` (reads then stay buffered).
    pub fn open(path: &Path) -> Option<DirectReader> {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Some(DirectReader {
                file,
                no_cachestat: AtomicBool::new(false),
                refused: AtomicBool::new(false),
            }),
            Err(e) => {
                log::debug!(
                    "{}: no O_DIRECT ({e}): bulk reads go through the page cache",
                    path.display()
                );
                None
            }
        }
    }

    /// Reads `buf` at `start` directly if the read suits it (aligned, large,
    /// not already cached). Ok(false): not read, read it buffered instead.
    pub fn read(&self, buf: &mut [u8], start: u64) -> io::Result<bool> {
        let aligned = buf.as_ptr() as usize % PAGE_BYTES == 0
            && buf.len() % PAGE_BYTES == 0
            && start % PAGE_BYTES as u64 == 0;
        if !aligned || buf.len() < DIRECT_READ_MIN || self.refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if self.mostly_cached(start, buf.len() as u64) {
            return Ok(false);
        }
        match self.file.read_exact_at(buf, start) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!("O_DIRECT read refused ({e}): bulk reads go through the page cache");
                self.refused.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether at least half of `start..start + len` is in the page cache
    /// (also when that cannot be known: a buffered read is never wrong).
    fn mostly_cached(&self, start: u64, len: u64) -> bool {
        if self.no_cachestat.load(Ordering::Relaxed) {
            return true;
        }
        let range = CachestatRange { off: start, len };
        let mut stat = Cachestat::default();
        // SAFETY: cachestat(2) reads `range` and writes one `struct
        // cachestat` into `stat`; both are live, properly aligned repr(C)
        // structs matching the kernel's layout, and the fd is open for the
        // duration of the call.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0u32,
            )
        };
        if r != 0 {
            log::debug!(
                "cachestat: {}: bulk reads go through the page cache",
                io::Error::last_os_error()
            );
            self.no_cachestat.store(true, Ordering::Relaxed);
            return true;
        }
        stat.nr_cache * 2 >= len.div_ceil(PAGE_BYTES as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_file(dir: &Path, pages: usize) -> std::path::PathBuf {
        let path = dir.join("pages.bin");
        let data: Vec<u8> = (0..pages * PAGE_BYTES)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect();
        std::fs::write(&path, &data).expect("write sample");
        path
    }

    #[test]
    fn page_buffers_start_on_a_page() {
        for len in [PAGE_BYTES, 3 * PAGE_BYTES, 1 << 20] {
            let b = PageBuffer::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PAGE_BYTES, 0);
        }
    }

    #[test]
    fn direct_reads_return_the_file_bytes_and_small_or_unaligned_ones_decline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pages = 128;
        let path = sample_file(dir.path(), pages);
        let Some(reader) = DirectReader::open(&path) else {
            eprintln!("no O_DIRECT on this file system: nothing to check");
            return;
        };
        let expected = std::fs::read(&path).expect("read back");
        // Evict the file so that cachestat does not send the read to the cache.
        let f = File::open(&path).expect("open");
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("fadvise");
        let mut buf = PageBuffer::new(DIRECT_READ_MIN);
        let start = 4 * PAGE_BYTES as u64;
        if reader.read(&mut buf, start).expect("read") {
            assert_eq!(
                &buf[..],
                &expected[4 * PAGE_BYTES..4 * PAGE_BYTES + DIRECT_READ_MIN]
            );
        } else {
            // Declined only because the range is in the cache (tmpfs).
            assert!(reader.mostly_cached(start, DIRECT_READ_MIN as u64));
        }
        // Too small, unaligned start, unaligned buffer: declined.
        let mut small = PageBuffer::new(PAGE_BYTES);
        assert!(!reader.read(&mut small, 0).expect("small"));
        assert!(!reader.read(&mut buf, 100).expect("unaligned start"));
        let mut raw = PageBuffer::new(DIRECT_READ_MIN + PAGE_BYTES);
        assert!(!reader
            .read(&mut raw[1..1 + DIRECT_READ_MIN], 0)
            .expect("unaligned buffer"));
    }
}
