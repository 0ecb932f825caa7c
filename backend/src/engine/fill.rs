//! The background filler: every saved page not resident yet, in image
//! order (which is address order), with large verified reads and one
//! `UFFDIO_COPY` per run of adjacent pages; paced once the guest runs when
//! asked to, and only on CPU time the guest leaves over. With page digests
//! (format version 2) a group that faults or the prefetch partly installed
//! is read run by run of its missing pages, never again whole.

use std::sync::atomic::Ordering;

use super::installer::Installed;
use super::{Engine, EngineError};
use crate::mem::{usize_from, PAGE_BYTES, PAGE_SIZE};
use crate::progress::Progress;

/// Bytes the filler reads per request.
const FILL_READ_BYTES: u64 = 4 << 20;

impl Engine {
    /// Fills every saved page not resident yet; stops early (with `Ok`)
    /// when asked to. On a failure the other threads are asked to stop.
    pub(crate) fn fill(&self, progress: &dyn Progress) -> Result<(), EngineError> {
        if self.resumed.load(Ordering::Acquire) {
            yield_cpu_to_the_guest();
        }
        let r = self.fill_inner(progress);
        if r.is_err() {
            self.request_stop();
        }
        r
    }

    fn fill_inner(&self, progress: &dyn Progress) -> Result<(), EngineError> {
        let meta = self.image.meta();
        let chunk_bytes = u64::from(meta.chunk_pages) * PAGE_SIZE;
        let chunk_count = u32::try_from(meta.nonzero_pages.div_ceil(u64::from(meta.chunk_pages)))
            .map_err(|_| EngineError::TooManyChunks)?;
        let per_read = u32::try_from((FILL_READ_BYTES / chunk_bytes).max(1)).unwrap_or(1);
        let mut buf = vec![0u8; usize_from(u64::from(per_read) * chunk_bytes)];
        let mut first = 0u32;
        while first < chunk_count {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let count = per_read.min(chunk_count - first);
            let start = self.image.chunk_slots(first).start;
            let end = self.image.chunk_slots(first + count - 1).end;
            let bytes = u64::from(end - start) * PAGE_SIZE;
            let group = first;
            first += count;
            let missing = (start..end)
                .filter(|&s| !self.pages.is_resident(self.image.slot_page(s)))
                .count() as u64;
            if missing == 0 {
                progress.advance(bytes);
                continue;
            }
            let partly = missing < u64::from(end - start) && self.image.has_page_sums();
            if let Some(pace) = &self.fill_pace {
                if self.resumed.load(Ordering::Acquire) {
                    pace.take(if partly { missing * PAGE_SIZE } else { bytes });
                }
            }
            if partly {
                match self.install_missing_slots(start..end, &mut buf, false)? {
                    Installed::All { fresh } => self.count_filled(fresh),
                    Installed::Stopped => return Ok(()),
                }
                progress.advance(bytes);
                continue;
            }
            let n = self.image.read_chunks(group, count, &mut buf)?;
            self.counters
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
            for c in group..group + count {
                let slots = self.image.chunk_slots(c);
                let off = usize_from(u64::from(slots.start - start)) * PAGE_BYTES;
                let len = usize_from(u64::from(slots.end - slots.start)) * PAGE_BYTES;
                match self.install_chunk(c, &buf[off..off + len])? {
                    Installed::All { fresh } => self.count_filled(fresh),
                    Installed::Stopped => return Ok(()),
                }
            }
            progress.advance(bytes);
        }
        Ok(())
    }
}

impl Engine {
    fn count_filled(&self, fresh: u64) {
        self.counters.fill_pages.fetch_add(fresh, Ordering::Relaxed);
        if self.resumed.load(Ordering::Acquire) {
            self.counters
                .fill_pages_after_resume
                .fetch_add(fresh, Ordering::Relaxed);
        }
    }
}

/// Puts the calling thread (the background filler, once the guest runs)
/// under `SCHED_IDLE`: it then only gets CPU time the guest's vCPUs and the
/// fault thread leave over, so filling never slows a running guest down.
fn yield_cpu_to_the_guest() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid,
    // initialised sched_param; it changes only this thread's policy.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        log::debug!(
            "could not make the filler SCHED_IDLE: {}",
            std::io::Error::last_os_error()
        );
    }
}
