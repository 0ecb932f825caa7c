//! The fault thread: reads every userfaultfd event and answers it without
//! ever waiting on an image read. A missing fault on a saved page becomes a
//! fetch request ([`super::fetch`]; faults on one chunk share one read); a
//! zero page, a discarded page or a page installed meanwhile is answered at
//! once with a zero page (whatever is there already stays); a minor fault
//! is mapped with `UFFDIO_CONTINUE`; a remove event is a guest discard
//! ([`super::discard`]). First touches are recorded in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fetch::{Request, Waiter};
use super::installer::Answer;
use super::{Engine, EngineError, FaultLog};
use crate::image::PageLocation;
use crate::mem::PageIndex;
use crate::remote::uffd::{EventBuffer, FaultEvent, RemoteUffd, UffdError};

/// How long the fault thread waits for an event before checking for stop.
const FAULT_POLL: Duration = Duration::from_millis(20);
/// Events read per `read(2)`.
const EVENTS_PER_READ: usize = 64;

impl Engine {
    /// Serves events until asked to stop; returns the service time of the
    /// faults it answered itself and the order of first touches.
    pub(crate) fn serve_faults(&self, capacity: usize) -> FaultLog {
        let mut log = FaultLog {
            latencies: Vec::with_capacity(capacity),
            touches: Vec::with_capacity(capacity),
        };
        let mut events = EventBuffer::new(EVENTS_PER_READ);
        // Faults whose answer the kernel refused until a queued event is
        // read (EAGAIN); their threads stay blocked and are answered again
        // after the next read, which returns that event.
        let mut retry: Vec<(FaultEvent, Instant)> = Vec::with_capacity(EVENTS_PER_READ);
        let mut again: Vec<(FaultEvent, Instant)> = Vec::with_capacity(EVENTS_PER_READ);
        while !self.stop.load(Ordering::Acquire) {
            // Counted before the read: a zap's events are read by a read
            // that started before its madvise returned (see `zapping`).
            self.batches_read.fetch_add(1, Ordering::AcqRel);
            let served = self.serve_batch(&mut events, &mut retry, &mut again, &mut log);
            self.batches_handled.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = served {
                self.fail(e);
                break;
            }
        }
        log
    }

    /// One read of events: removes first (the kernel puts events behind
    /// the faults of a read), then the faults waiting for a retry, then the
    /// new faults.
    fn serve_batch(
        &self,
        events: &mut EventBuffer,
        retry: &mut Vec<(FaultEvent, Instant)>,
        again: &mut Vec<(FaultEvent, Instant)>,
        log: &mut FaultLog,
    ) -> Result<(), EngineError> {
        let batch = self.uffd.read_events(events, Some(FAULT_POLL))?;
        let read_at = Instant::now();
        for ev in batch {
            match *ev {
                FaultEvent::Remove { start, end } => self.on_remove(start, end)?,
                FaultEvent::PageFault { .. } | FaultEvent::MinorFault { .. } => {}
                ref other => log::warn!("userfaultfd event not handled: {other:?}"),
            }
        }
        std::mem::swap(retry, again);
        for (ev, since) in again.drain(..) {
            self.serve_fault_event(ev, since, retry, log)?;
        }
        for ev in batch {
            self.serve_fault_event(*ev, read_at, retry, log)?;
        }
        Ok(())
    }

    /// Answers a missing or minor fault (other events are no faults).
    fn serve_fault_event(
        &self,
        ev: FaultEvent,
        since: Instant,
        retry: &mut Vec<(FaultEvent, Instant)>,
        log: &mut FaultLog,
    ) -> Result<(), EngineError> {
        let answer = match ev {
            FaultEvent::PageFault { addr } => self.on_missing(addr, since, log)?,
            FaultEvent::MinorFault { addr } => self.on_minor(addr, since, log)?,
            _ => return Ok(()),
        };
        if answer == Some(Answer::Retry) {
            retry.push((ev, since));
        }
        Ok(())
    }

    /// Records a service time that ended now (not during the tracking
    /// window, whose minor faults are not part of the restore).
    fn note_latency(&self, read_at: Instant, log: &mut FaultLog) {
        if log.latencies.len() < log.latencies.capacity() && !self.in_window.load(Ordering::Acquire)
        {
            let us = read_at.elapsed().as_micros();
            log.latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }

    /// Records the first touch of `page` (not of a page the guest
    /// discarded: its content came from no image). True if it is the first.
    fn record_touch(&self, page: PageIndex, log: &mut FaultLog) -> bool {
        if !self.note_touch(page) {
            return false;
        }
        if log.touches.len() < log.touches.capacity() {
            log.touches.push(page);
        }
        true
    }

    /// Marks `page` touched (not a page the guest discarded) and counts
    /// it; true if it is its first touch. The caller keeps the order:
    /// the fault thread in its log, the page-table scanner
    /// ([`super::scanner`]) in its own.
    pub(crate) fn note_touch(&self, page: PageIndex) -> bool {
        // Most pages a scanner sees are touched already: test first.
        if self.pages.touched.test(page)
            || self.pages.discarded.test(page)
            || !self.pages.touched.set(page)
        {
            return false;
        }
        self.counters.touched_pages.fetch_add(1, Ordering::Release);
        true
    }

    /// Answers a missing fault, or queues its fetch (`None`).
    fn on_missing(
        &self,
        addr: u64,
        read_at: Instant,
        log: &mut FaultLog,
    ) -> Result<Option<Answer>, EngineError> {
        let page = self.page_of(addr).ok_or(EngineError::StrayFault(addr))?;
        self.record_touch(page, log);
        let counter = if self.resumed.load(Ordering::Acquire) {
            &self.counters.faults_after_resume
        } else {
            &self.counters.faults_before_resume
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let location = if self.live {
            // A running VM's RAM is complete: a hole was never written or
            // was discarded.
            PageLocation::Zero
        } else {
            self.image.locate(page)
        };
        let saved = matches!(location, PageLocation::Slot(_));
        if self.pages.is_resident(page) {
            // Discarded by the guest, or installed after this fault was
            // queued: a zero page, or a wake if the page is there.
            if self.pages.discarded.test(page) {
                self.counters
                    .discarded_faults
                    .fetch_add(1, Ordering::Relaxed);
            }
            let answer = self.answer_with_zeros(page, saved)?;
            self.note_answer(answer, read_at, log);
            return Ok(Some(answer));
        }
        match location {
            PageLocation::Zero => {
                let answer = self.answer_with_zeros(page, false)?;
                if answer != Answer::Retry {
                    self.counters.zero_faults.fetch_add(1, Ordering::Relaxed);
                }
                self.note_answer(answer, read_at, log);
                Ok(Some(answer))
            }
            PageLocation::Slot(slot) => {
                let chunk = self.image.chunk_of(slot);
                let waiter = Waiter {
                    page,
                    since: read_at,
                };
                match self.request_fetch(chunk, waiter) {
                    Request::Queued | Request::Joined => Ok(None),
                    Request::Settled => {
                        let answer = self.answer_with_zeros(page, true)?;
                        self.note_answer(answer, read_at, log);
                        Ok(Some(answer))
                    }
                }
            }
        }
    }

    /// Records the service time of an answer that woke its thread.
    fn note_answer(&self, answer: Answer, read_at: Instant, log: &mut FaultLog) {
        if answer != Answer::Retry {
            self.note_latency(read_at, log);
        }
    }

    /// A page in the page cache (prefetched, or installed and then zapped
    /// out of QEMU's page tables) was touched: map it.
    fn on_minor(
        &self,
        addr: u64,
        read_at: Instant,
        log: &mut FaultLog,
    ) -> Result<Option<Answer>, EngineError> {
        let page = self.page_of(addr).ok_or(EngineError::StrayFault(addr))?;
        self.counters.minor_faults.fetch_add(1, Ordering::Relaxed);
        if self.record_touch(page, log)
            && self.resumed.load(Ordering::Acquire)
            && !self.in_window.load(Ordering::Acquire)
            && self.pages.prefetched.test(page)
        {
            self.counters.skipped_faults.fetch_add(1, Ordering::Relaxed);
        }
        let answer = self.answer_minor(page)?;
        self.note_answer(answer, read_at, log);
        Ok(Some(answer))
    }
}

/// Reads a userfaultfd's events while no engine serves it yet. A recovery
/// needs it: with remove events enabled, QEMU blocks in a guest discard
/// until thaw reads the event, and meanwhile answers no QMP. Fault
/// messages are dropped (their threads stay blocked until the recovery
/// wakes all of guest RAM, then fault again); remove events are kept for
/// the engine ([`Engine::replay_removes`]).
pub(crate) struct EventDrainer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Removes, UffdError>>>,
}

/// Remove events, as QEMU address ranges `(start, end)`.
type Removes = Vec<(u64, u64)>;

impl EventDrainer {
    /// Starts draining `uffd`.
    pub(crate) fn start(uffd: Arc<RemoteUffd>) -> Result<EventDrainer, EngineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("thaw-drain".into())
            .spawn(move || {
                let mut removes = Vec::new();
                let mut events = EventBuffer::new(EVENTS_PER_READ);
                while !flag.load(Ordering::Acquire) {
                    for ev in uffd.read_events(&mut events, Some(FAULT_POLL))? {
                        if let FaultEvent::Remove { start, end } = *ev {
                            removes.push((start, end));
                        }
                    }
                }
                Ok(removes)
            })
            .map_err(|source| EngineError::Spawn {
                name: "drain",
                source,
            })?;
        Ok(EventDrainer {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops draining; the remove events read meanwhile, in order.
    pub(crate) fn finish(mut self) -> Result<Vec<(u64, u64)>, EngineError> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => Ok(r?),
            Some(Err(_)) => Err(EngineError::Panicked("drain")),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for EventDrainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Engine {
    /// Handles remove events read before this engine served (see
    /// [`EventDrainer`]).
    pub(crate) fn replay_removes(&self, removes: &[(u64, u64)]) -> Result<(), EngineError> {
        for &(start, end) in removes {
            self.on_remove(start, end)?;
        }
        Ok(())
    }
}
