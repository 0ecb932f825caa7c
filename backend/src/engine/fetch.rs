//! Fetching saved chunks for faults, off the fault thread. The fault thread
//! only queues a request; a pool of fetch workers reads and verifies the
//! chunk, installs all of it and wakes everyone who waits on it. With an
//! image that has page digests (format version 2) a worker first reads,
//! verifies and installs each faulting page alone and wakes its threads;
//! the chunk's other missing pages (the neighbours) are read later, when no
//! fault is waiting for a worker, by at most half of the workers at once,
//! and a new fault on a chunk whose neighbours are still to come is served
//! page-first again: a fault waits for one page, not for its chunk or for
//! another fault's neighbours. Requests
//! for a chunk already in flight join it (two vCPUs faulting on one chunk
//! share one read), so no fault ever waits behind another fault's read,
//! and with several workers several reads are in flight at once: a store
//! with 10–100 ms per request serves as many faults in parallel as there
//! are workers. Fault reads go ahead of the prefetch and the fill at the
//! image's read limiter. From an object store, where each read costs a
//! round trip and a chunk's 64 KiB little more than one page, a fault's
//! whole chunk is read at once, in one request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::installer::{Answer, Installed, RETRY_BACKOFF};
use super::{Engine, EngineError};
use crate::image::PageLocation;
use crate::mem::{usize_from, PageIndex, PAGE_BYTES};

/// How long an idle worker waits before checking for stop.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// A faulting access waiting for its chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waiter {
    pub(crate) page: PageIndex,
    /// When its fault was read.
    pub(crate) since: Instant,
}

/// What became of a fetch request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// A read of the chunk was queued.
    Queued,
    /// A read of the chunk was in flight already; the waiter joined it.
    Joined,
    /// The page became resident before a read was needed: answer it now.
    Settled,
}

/// Chunks queued or being read, and who waits on each.
#[derive(Default)]
struct Pending {
    /// Chunks with faulting pages to serve, first come first served...
    queue: VecDeque<u32>,
    queued: HashSet<u32>,
    /// ...and, when none is left, chunks whose neighbours are still to be
    /// read (page digests only), with the neighbour reads in flight.
    neighbours: VecDeque<u32>,
    neighbours_queued: HashSet<u32>,
    neighbour_reads: usize,
    /// Chunks a worker is serving: one worker per chunk at a time, so no
    /// page is read twice and a chunk's waiters are answered only once
    /// their pages are in.
    busy: HashSet<u32>,
    waiting: HashMap<u32, Vec<Waiter>>,
}

/// A worker's next job.
enum Job {
    /// Serve the faulting pages of a chunk (the whole chunk without page
    /// digests).
    Faults(u32),
    /// Read the rest of a chunk and answer whoever still waits on it.
    Neighbours(u32),
}

/// The fetch queue shared by the fault thread and the workers.
#[derive(Default)]
pub(crate) struct FetchQueue {
    pending: Mutex<Pending>,
    work: Condvar,
}

impl FetchQueue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A worker that panicked aborts the process (release builds) or
        // leaves consistent data behind: the map only holds plain values.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every idle worker (to see a stop request).
    pub(crate) fn wake_all(&self) {
        self.work.notify_all();
    }
}

impl Engine {
    /// Asks for chunk `chunk` on behalf of `waiter` (from the fault thread;
    /// never blocks on a read).
    pub(crate) fn request_fetch(&self, chunk: u32, waiter: Waiter) -> Request {
        let mut p = self.fetch.lock();
        if let Some(list) = p.waiting.get_mut(&chunk) {
            list.push(waiter);
            // The worker serving the chunk sees it; otherwise (its
            // neighbours are still to come) its page is served first.
            if !p.busy.contains(&chunk) && p.queued.insert(chunk) {
                p.queue.push_back(chunk);
                drop(p);
                self.fetch.work.notify_one();
            }
            return Request::Joined;
        }
        // A worker marks pages resident before it retires its chunk: under
        // the lock, a missing entry and a resident page mean it is done.
        if self.pages.is_resident(waiter.page) {
            return Request::Settled;
        }
        p.waiting.insert(chunk, vec![waiter]);
        p.queued.insert(chunk);
        p.queue.push_back(chunk);
        drop(p);
        self.fetch.work.notify_one();
        Request::Queued
    }

    /// Chunks queued or in flight.
    #[cfg(test)]
    pub(crate) fn fetches_pending(&self) -> usize {
        self.fetch.lock().waiting.len()
    }

    /// A fetch worker: reads queued chunks until asked to stop. Returns the
    /// service time (µs, fault read → faulting thread woken) of each fault
    /// it completed.
    pub(crate) fn fetch_worker(&self, capacity: usize) -> Vec<u32> {
        let mut latencies = Vec::with_capacity(capacity);
        let chunk_bytes = usize_from(u64::from(self.image.meta().chunk_pages)) * PAGE_BYTES;
        let mut buf = vec![0u8; chunk_bytes];
        let neighbour_readers = (self.fetch_workers / 2).max(1);
        loop {
            let job = {
                let mut p = self.fetch.lock();
                loop {
                    if self.stop.load(Ordering::Acquire) {
                        return latencies;
                    }
                    if let Some(c) = p.queue.pop_front() {
                        p.queued.remove(&c);
                        if p.busy.insert(c) {
                            break Job::Faults(c);
                        }
                        // Its worker sees the new waiter.
                        continue;
                    }
                    if p.neighbour_reads < neighbour_readers {
                        if let Some(c) = p.neighbours.pop_front() {
                            p.neighbours_queued.remove(&c);
                            if p.busy.insert(c) {
                                p.neighbour_reads += 1;
                                break Job::Neighbours(c);
                            }
                            // Served by page now; it queues the neighbours
                            // again when done.
                            continue;
                        }
                    }
                    p = self
                        .fetch
                        .work
                        .wait_timeout(p, IDLE_POLL)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            };
            let done = match job {
                // From a store a request costs a round trip, the chunk's
                // other pages next to nothing: the chunk comes at once.
                Job::Faults(chunk) if self.image.has_page_sums() && !self.image.reads_remote() => {
                    self.serve_faulting_pages(chunk, &mut buf, &mut latencies)
                }
                Job::Faults(chunk) => self.complete_fetch(chunk, &mut buf, &mut latencies),
                Job::Neighbours(chunk) => {
                    let r = self.complete_fetch(chunk, &mut buf, &mut latencies);
                    self.fetch.lock().neighbour_reads -= 1;
                    r
                }
            };
            if let Err(e) = done {
                self.fail(e);
                return latencies;
            }
        }
    }

    /// Reads, verifies and installs what chunk `chunk` still misses (with
    /// page digests: only its missing pages; without: the whole chunk),
    /// then answers everyone still waiting on it.
    fn complete_fetch(
        &self,
        chunk: u32,
        buf: &mut [u8],
        latencies: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        // From a store, one request for the whole chunk (resident pages
        // are skipped when installing), not one per run of missing pages.
        let by_page = self.image.has_page_sums() && !self.image.reads_remote();
        let installed = if by_page {
            self.install_missing_slots(self.image.chunk_slots(chunk), buf, true)?
        } else {
            let n = self.image.read_chunks_urgent(chunk, 1, buf)?;
            self.counters
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
            self.install_chunk(chunk, buf)?
        };
        let fresh = match installed {
            Installed::All { fresh } => fresh,
            Installed::Stopped => return Ok(()),
        };
        // Every page of the chunk is in: whoever waits on it is done.
        let waiters = {
            let mut p = self.fetch.lock();
            p.busy.remove(&chunk);
            p.waiting.remove(&chunk).unwrap_or_default()
        };
        let faulted = self.answer_waiters(&waiters, latencies)?;
        self.counters
            .neighbour_pages
            .fetch_add(fresh.saturating_sub(faulted), Ordering::Relaxed);
        Ok(())
    }

    /// Reads, verifies and installs each page that threads wait on in
    /// chunk `chunk` (which this worker owns), alone, and answers its
    /// waiters, until none is left; then queues the read of the chunk's
    /// neighbours.
    fn serve_faulting_pages(
        &self,
        chunk: u32,
        buf: &mut [u8],
        latencies: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        loop {
            // The pages waited on now, or (none left) the chunk handed on
            // to the neighbour queue, under one lock: a waiter that joins
            // later finds the chunk no longer busy and queues it again.
            let mut pages: Vec<PageIndex> = {
                let mut p = self.fetch.lock();
                let pages: Vec<PageIndex> = p
                    .waiting
                    .get(&chunk)
                    .map(|list| list.iter().map(|w| w.page).collect())
                    .unwrap_or_default();
                if pages.is_empty() {
                    p.busy.remove(&chunk);
                    if p.waiting.contains_key(&chunk) && p.neighbours_queued.insert(chunk) {
                        p.neighbours.push_back(chunk);
                        drop(p);
                        self.fetch.work.notify_one();
                    }
                    return Ok(());
                }
                pages
            };
            pages.sort_unstable_by_key(|p| p.0);
            pages.dedup();
            for page in pages {
                if !self.pages.is_resident(page) {
                    if let PageLocation::Slot(slot) = self.image.locate(page) {
                        let n = self
                            .image
                            .read_slots(slot, 1, &mut buf[..PAGE_BYTES], true)?;
                        self.counters
                            .bytes_read
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if self.install_saved(page, &buf[..PAGE_BYTES], true)? == Installed::Stopped
                        {
                            return Ok(());
                        }
                    }
                }
                // Its waiters (more may have joined meanwhile) are done.
                let mine: Vec<Waiter> = {
                    let mut p = self.fetch.lock();
                    match p.waiting.get_mut(&chunk) {
                        Some(list) => {
                            let (mine, rest) = list.drain(..).partition(|w| w.page == page);
                            *list = rest;
                            mine
                        }
                        None => Vec::new(),
                    }
                };
                self.answer_waiters(&mine, latencies)?;
            }
        }
    }

    /// Answers `waiters` (their pages are resident, or discarded) and
    /// records their service times; returns how many there were.
    fn answer_waiters(
        &self,
        waiters: &[Waiter],
        latencies: &mut Vec<u32>,
    ) -> Result<u64, EngineError> {
        for w in waiters {
            // Installed (and woken) above, or discarded meanwhile: a zero
            // page, or a wake for a page that is there.
            self.answer_waiter(w.page)?;
            let record = latencies.len() < latencies.capacity();
            if record || log::log_enabled!(log::Level::Debug) {
                let us = w.since.elapsed().as_micros();
                log::debug!("fault on page {:#x} answered after {us} µs", w.page.0);
                if record {
                    latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
        }
        let n = waiters.len() as u64;
        self.counters.fault_pages.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Reads (one pread per run of missing slots, each page verified
    /// against its digest) and installs the pages of `slots` that are not
    /// resident yet; `urgent` for a fault's neighbours. Needs page digests.
    pub(crate) fn install_missing_slots(
        &self,
        slots: std::ops::Range<u32>,
        buf: &mut [u8],
        urgent: bool,
    ) -> Result<Installed, EngineError> {
        let mut fresh = 0;
        let mut s = slots.start;
        while s < slots.end {
            if self.pages.is_resident(self.image.slot_page(s)) {
                s += 1;
                continue;
            }
            let mut e = s + 1;
            while e < slots.end && !self.pages.is_resident(self.image.slot_page(e)) {
                e += 1;
            }
            let len = usize_from(u64::from(e - s)) * PAGE_BYTES;
            let n = self.image.read_slots(s, e - s, &mut buf[..len], urgent)?;
            self.counters
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
            match self.install_slots(s..e, &buf[..len])? {
                Installed::All { fresh: f } => fresh += f,
                Installed::Stopped => return Ok(Installed::Stopped),
            }
            s = e;
        }
        Ok(Installed::All { fresh })
    }

    /// Answers a waiter whose page is resident (or discarded); retries
    /// while the kernel waits for a queued event to be read.
    fn answer_waiter(&self, page: PageIndex) -> Result<(), EngineError> {
        while self.answer_with_zeros(page, true)? == Answer::Retry {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(RETRY_BACKOFF);
        }
        Ok(())
    }

    /// Installs the verified pages of chunk `chunk` (in `data`), one
    /// `UFFDIO_COPY` per run of adjacent guest pages, waking waiters.
    pub(crate) fn install_chunk(&self, chunk: u32, data: &[u8]) -> Result<Installed, EngineError> {
        self.install_slots(self.image.chunk_slots(chunk), data)
    }

    /// Installs the verified pages of `slots` (in `data`, in slot order),
    /// one install per run of adjacent guest pages (mapped, waking waiters;
    /// or cached while the restore learns, see
    /// [`Engine::install_unwaited`]).
    fn install_slots(
        &self,
        slots: std::ops::Range<u32>,
        data: &[u8],
    ) -> Result<Installed, EngineError> {
        let mut fresh = 0;
        let mut s = slots.start;
        while s < slots.end {
            let first = self.image.slot_page(s);
            let mut e = s + 1;
            while e < slots.end
                && self.image.slot_page(e).0 == first.0 + u64::from(e - s)
                && self.same_block(first, self.image.slot_page(e))
            {
                e += 1;
            }
            let off = usize_from(u64::from(s - slots.start)) * PAGE_BYTES;
            let len = usize_from(u64::from(e - s)) * PAGE_BYTES;
            match self.install_unwaited(first, &data[off..off + len])? {
                Installed::All { fresh: f } => fresh += f,
                Installed::Stopped => return Ok(Installed::Stopped),
            }
            s = e;
        }
        Ok(Installed::All { fresh })
    }
}
