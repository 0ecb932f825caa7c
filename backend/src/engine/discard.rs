//! Guest discards. When the guest gives memory back (virtio-balloon
//! inflate, free-page reporting, virtio-mem unplug), QEMU punches a hole
//! into the RAM file and drops its mapping with `madvise(MADV_DONTNEED)`.
//! thaw asks for `UFFD_FEATURE_EVENT_REMOVE`, so the kernel reports that
//! as a remove event (QEMU's call waits until thaw has read it).
//!
//! A discarded page reads as zeros from then on, as it would without thaw:
//! it is marked discarded and resident (nothing of it is left to bring in
//! from the image, so the fill skips it and it no longer counts as
//! missing), and every later fault on it is answered with a zero page at
//! once. Because QEMU punches the hole before it raises the event, an
//! install of saved data could land in that hole in between; after
//! marking the range (with every installer held off by the discard lock)
//! thaw therefore punches it once more, so a stale saved copy never
//! survives a discard. (One narrow race remains where a page in the page
//! cache is mapped without thaw — a restore that maps only, or a learning
//! restore reading QEMU's page tables: if such a stale copy is there and
//! the guest reuses the page and writes it in the microseconds between
//! thaw reading the event and this punch, the write is lost. A guest
//! reuses a ballooned or reported page only after QEMU has answered the
//! request, which this handling normally precedes.)
//!
//! thaw's own zaps (an injected `MADV_DONTNEED` over guest RAM, so that
//! the next touch of every page is seen again) raise the same event but
//! discard nothing: the page cache keeps the data. They run inside
//! [`Engine::zapping`], and their events are ignored.
//!
//! A restore also appends every discard to a log in the VM's runtime
//! directory ([`DISCARD_LOG`]: records of two little-endian u64, first page
//! and page count), so that `thaw recover` after a dead restore knows which
//! holes are the guest's own and does not refill them.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::fcntl::{fallocate, FallocateFlags};

use super::{Engine, EngineError};
use crate::image::PageLocation;
use crate::mem::{PageIndex, PAGE_SIZE};

/// The discard log's file name in a VM's runtime directory.
pub(crate) const DISCARD_LOG: &str = "discards.bin";
/// Bytes per discard log record.
const RECORD: usize = 16;

/// How often [`Engine::zapping`] checks that the fault thread has handled
/// the events of a zap.
const ZAP_POLL: Duration = Duration::from_millis(1);

impl Engine {
    /// Handles a remove event for QEMU addresses `start..end`.
    pub(crate) fn on_remove(&self, start: u64, end: u64) -> Result<(), EngineError> {
        if self.zaps.load(Ordering::Acquire) > 0 {
            log::debug!("remove event {start:#x}..{end:#x} from thaw's own zap");
            return Ok(());
        }
        for b in &self.blocks {
            let b_end = b.start.0 + b.pages * PAGE_SIZE;
            let (lo, hi) = (start.max(b.start.0), end.min(b_end));
            if lo >= hi {
                continue;
            }
            let first = (lo - b.start.0) / PAGE_SIZE;
            let last = (hi - b.start.0).div_ceil(PAGE_SIZE);
            if first == 0 && last == b.pages {
                // A guest never gives back a whole RAM block: this is a zap
                // thaw did not announce. Punching would lose guest RAM.
                log::warn!(
                    "remove event over all of RAM block {}: not treated as a discard",
                    b.id
                );
                continue;
            }
            let _exclusive = self.discard_lock.write().unwrap_or_else(|p| p.into_inner());
            let mut newly = 0u64;
            for p in first..last {
                let page = PageIndex(b.first_page + p);
                if self.pages.discarded.set(page) {
                    newly += 1;
                }
                let saved = !self.live && matches!(self.image.locate(page), PageLocation::Slot(_));
                self.pages.mark_resident(page, saved);
            }
            self.counters
                .discarded_pages
                .fetch_add(newly, Ordering::Relaxed);
            self.log_discard(b.first_page + first, last - first)?;
            if !self.live {
                // Undo an install that landed between QEMU's punch and its
                // event (see the module documentation).
                let (off, len) = (first * PAGE_SIZE, (last - first) * PAGE_SIZE);
                fallocate(
                    &b.file,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    i64::try_from(off).unwrap_or(i64::MAX),
                    i64::try_from(len).unwrap_or(i64::MAX),
                )
                .map_err(|errno| EngineError::Discard {
                    block: b.id.clone(),
                    offset: off,
                    errno,
                })?;
            }
            log::debug!(
                "guest discarded {} pages of {} at {:#x}",
                last - first,
                b.id,
                first * PAGE_SIZE
            );
        }
        self.counters.discards.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Appends a discard to the log, if the engine keeps one.
    fn log_discard(&self, first: u64, count: u64) -> Result<(), EngineError> {
        let mut log = self.discard_log.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = log.as_mut() else {
            return Ok(());
        };
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(&first.to_le_bytes());
        record[8..].copy_from_slice(&count.to_le_bytes());
        file.write_all(&record).map_err(EngineError::DiscardLog)
    }

    /// Marks the discards a dead restore logged (see the module
    /// documentation) before a recovery adopts what the RAM files hold;
    /// returns the pages marked. Records outside guest RAM and a torn last
    /// record are ignored.
    pub(crate) fn adopt_discards(&self, log: &[u8]) -> u64 {
        let total: u64 = self.blocks.iter().map(|b| b.pages).sum();
        let mut marked = 0;
        for r in log.chunks_exact(RECORD) {
            let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            let (first, count) = (word(&r[..8]), word(&r[8..]));
            let end = first.saturating_add(count).min(total);
            for p in first..end {
                let page = PageIndex(p);
                if self.pages.discarded.set(page) {
                    marked += 1;
                }
                let saved = matches!(self.image.locate(page), PageLocation::Slot(_));
                self.pages.mark_resident(page, saved);
            }
        }
        marked
    }

    /// Runs `zap` (an injected `MADV_DONTNEED` over guest RAM) so that the
    /// remove events it raises are not taken for guest discards. Needs the
    /// fault thread running: QEMU's `madvise` waits until its events are
    /// read.
    pub(crate) fn zapping<T>(&self, zap: impl FnOnce() -> T) -> T {
        self.zaps.fetch_add(1, Ordering::AcqRel);
        let result = zap();
        // The zap's events were all read before its madvise returned; wait
        // until the fault thread has handled the batch it read them in.
        self.wait_for_read_events();
        self.zaps.fetch_sub(1, Ordering::AcqRel);
        result
    }

    /// Waits until the fault thread has handled every batch of events it
    /// has read so far (or the engine is stopping).
    fn wait_for_read_events(&self) {
        let read = self.batches_read.load(Ordering::Acquire);
        while self.batches_handled.load(Ordering::Acquire) < read
            && !self.stop.load(Ordering::Acquire)
        {
            std::thread::sleep(ZAP_POLL);
        }
    }
}
