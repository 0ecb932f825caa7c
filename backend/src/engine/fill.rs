//! The background filler: every saved page not resident yet, in image
//! order (which is address order), with large verified reads and one
//! `UFFDIO_COPY` per run of adjacent pages; paced once the guest runs when
//! asked to, and only on CPU time the guest leaves over. With page digests
//! (format version 2) a group that faults or the prefetch partly installed
//! is read run by run of its missing pages, never again whole. A reader
//! thread keeps the next group's read in flight while the filler installs
//! the last one; its reads bypass the page cache where it does not hold
//! them already (`image::direct`).

use std::sync::atomic::Ordering;
use std::sync::mpsc;

use super::installer::Installed;
use super::{Engine, EngineError};
use crate::image::direct::PageBuffer;
use crate::mem::{usize_from, PAGE_BYTES, PAGE_SIZE};
use crate::progress::Progress;

/// Bytes the filler reads per request (from a local image; see
/// [`crate::image::Image::bulk_read_bytes`]).
const FILL_READ_BYTES: u64 = 4 << 20;
/// From an object store, a group partly resident is read whole when its
/// missing pages lie in more runs than this (each run would be one more
/// request, one round trip apart), and the pages already resident are
/// skipped when installing.
const REMOTE_MAX_RUNS: usize = 4;

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
        let read_bytes = self.image.bulk_read_bytes().unwrap_or(FILL_READ_BYTES);
        let per_read = u32::try_from((read_bytes / chunk_bytes).max(1)).unwrap_or(1);
        let buf_len = usize_from(u64::from(per_read) * chunk_bytes);
        // Two page-aligned buffers (the reads bypass the page cache, see
        // `image::direct`): one being read while the other is installed.
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Group, EngineError>>(1);
        let (free_tx, free_rx) = mpsc::sync_channel::<PageBuffer>(2);
        for _ in 0..2 {
            // Cannot fail: the channel has room for both and its receiver lives.
            let _ = free_tx.send(PageBuffer::new(buf_len));
        }
        let idle = self.resumed.load(Ordering::Acquire);
        std::thread::scope(|scope| {
            let reader = std::thread::Builder::new()
                .name("thaw-fill-read".into())
                .spawn_scoped(scope, move || {
                    if idle {
                        yield_cpu_to_the_guest();
                    }
                    self.read_groups(chunk_count, per_read, &ready_tx, &free_rx);
                })
                .map_err(|source| EngineError::Spawn {
                    name: "fill-read",
                    source,
                })?;
            let installed = self.install_groups(&ready_rx, &free_tx, buf_len, progress);
            if installed.is_err() {
                // Now, not after the reader's current pace or read.
                self.request_stop();
            }
            // The reader ends once it sees the installer's channels close.
            drop(ready_rx);
            drop(free_tx);
            let read = reader
                .join()
                .map_err(|_| EngineError::Panicked("fill-read"));
            installed.and(read)
        })
    }

    /// The fill's reader: walks the image's chunk groups in order and
    /// reads each whole group that no page of is resident yet, while the
    /// installer installs the previous one. Ends at the last group, on a
    /// stop, or when the installer has gone.
    fn read_groups(
        &self,
        chunk_count: u32,
        per_read: u32,
        ready: &mpsc::SyncSender<Result<Group, EngineError>>,
        free: &mpsc::Receiver<PageBuffer>,
    ) {
        let remote = self.image.bulk_read_bytes().is_some();
        let mut first = 0u32;
        while first < chunk_count {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let count = per_read.min(chunk_count - first);
            let slots =
                self.image.chunk_slots(first).start..self.image.chunk_slots(first + count - 1).end;
            let bytes = u64::from(slots.end - slots.start) * PAGE_SIZE;
            let group = first;
            first += count;
            let (missing, runs) = self.missing_in(slots.clone());
            let partly = missing < u64::from(slots.end - slots.start)
                && self.image.has_page_sums()
                && !(remote && runs > REMOTE_MAX_RUNS);
            if missing > 0 {
                if let Some(pace) = &self.fill_pace {
                    if self.resumed.load(Ordering::Acquire) {
                        pace.take(if partly { missing * PAGE_SIZE } else { bytes });
                    }
                }
            }
            let item = if missing == 0 {
                Ok(Group::Resident { bytes })
            } else if partly {
                Ok(Group::Partly { slots, bytes })
            } else {
                let Ok(mut buf) = free.recv() else {
                    return;
                };
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                match self.image.read_chunks(group, count, &mut buf) {
                    Ok(n) => {
                        self.counters
                            .bytes_read
                            .fetch_add(n as u64, Ordering::Relaxed);
                        Ok(Group::Read {
                            first: group,
                            count,
                            buf,
                            bytes,
                        })
                    }
                    Err(e) => Err(e.into()),
                }
            };
            let failed = item.is_err();
            if ready.send(item).is_err() || failed {
                return;
            }
        }
    }

    /// The fill's installer: installs what the reader read, in order;
    /// groups that faults or the prefetch partly installed are read and
    /// installed here run by run of their missing pages.
    fn install_groups(
        &self,
        ready: &mpsc::Receiver<Result<Group, EngineError>>,
        free: &mpsc::SyncSender<PageBuffer>,
        buf_len: usize,
        progress: &dyn Progress,
    ) -> Result<(), EngineError> {
        let mut scratch: Option<PageBuffer> = None;
        // The reader closes the channel after the last group or on a stop.
        while let Ok(item) = ready.recv() {
            let item = item?;
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            match item {
                Group::Resident { bytes } => progress.advance(bytes),
                Group::Partly { slots, bytes } => {
                    let buf = scratch.get_or_insert_with(|| PageBuffer::new(buf_len));
                    match self.install_missing_slots(slots, buf, false)? {
                        Installed::All { fresh } => self.count_filled(fresh),
                        Installed::Stopped => return Ok(()),
                    }
                    progress.advance(bytes);
                }
                Group::Read {
                    first,
                    count,
                    buf,
                    bytes,
                } => {
                    let start = self.image.chunk_slots(first).start;
                    for c in first..first + count {
                        let slots = self.image.chunk_slots(c);
                        let off = usize_from(u64::from(slots.start - start)) * PAGE_BYTES;
                        let len = usize_from(u64::from(slots.end - slots.start)) * PAGE_BYTES;
                        match self.install_chunk(c, &buf[off..off + len])? {
                            Installed::All { fresh } => self.count_filled(fresh),
                            Installed::Stopped => return Ok(()),
                        }
                    }
                    // The reader may have finished: then the buffer goes.
                    let _ = free.send(buf);
                    progress.advance(bytes);
                }
            }
        }
        Ok(())
    }
}

/// One chunk group of the fill, as the reader hands it to the installer.
enum Group {
    /// Every page of it is resident already.
    Resident { bytes: u64 },
    /// Some pages are: the installer reads the missing ones itself.
    Partly {
        slots: std::ops::Range<u32>,
        bytes: u64,
    },
    /// Read and verified whole: `count` chunks from chunk `first`.
    Read {
        first: u32,
        count: u32,
        buf: PageBuffer,
        bytes: u64,
    },
}

impl Engine {
    /// The pages of `slots` not resident yet, and the runs they lie in.
    fn missing_in(&self, slots: std::ops::Range<u32>) -> (u64, usize) {
        let mut missing = 0;
        let mut runs = 0;
        let mut in_run = false;
        for s in slots {
            let absent = !self.pages.is_resident(self.image.slot_page(s));
            if absent {
                missing += 1;
                if !in_run {
                    runs += 1;
                }
            }
            in_run = absent;
        }
        (missing, runs)
    }

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
    crate::sched::set_policy(0, libc::SCHED_IDLE);
}
