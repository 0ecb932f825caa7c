//! The restore engine: everything that installs saved pages into QEMU's
//! registered guest RAM through the stolen userfaultfd, and the threads
//! that do it.
//!
//! - [`residency`]: where every page stands (resident, discarded,
//!   prefetched, touched) and how many saved pages are still missing;
//! - [`installer`]: the one install path and its policy per kernel answer;
//! - [`faults`]: the fault thread, which answers every event without
//!   waiting on a read;
//! - [`fetch`]: the fetch workers that read chunks for faults, one read per
//!   chunk however many faults wait on it;
//! - [`prefetch`]: the working set, before the guest runs;
//! - [`fill`]: the rest of RAM in the background;
//! - [`discard`]: pages the guest gives back while thaw watches;
//! - [`scanner`]: first touches read from QEMU's page tables (a learning
//!   restore).
//!
//! One restore runs one fault thread, a few fetch workers ([`Service`]) and
//! at most one filler ([`Fill`]) over one shared [`Engine`]. An engine built
//! with [`Engine::observer`] watches a running VM whose RAM is complete (a
//! checkpoint's tracking window): it maps and records touches and installs
//! nothing saved.

pub(crate) mod discard;
pub(crate) mod faults;
pub(crate) mod fetch;
pub(crate) mod fill;
pub(crate) mod installer;
pub(crate) mod prefetch;
pub(crate) mod residency;
pub(crate) mod scanner;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::image::throttle::Throttle;
use crate::image::{Image, PageLocation};
use crate::mem::{HostAddr, PageIndex, PAGE_SIZE};
use crate::progress::SharedProgress;
use crate::remote::uffd::RemoteUffd;
use fetch::FetchQueue;
use residency::Residency;

/// Fetch workers a restore runs by default: reads in flight at once.
pub const DEFAULT_FETCH_WORKERS: usize = 4;

/// Errors inside the engine; fatal for the restore.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Uffd(#[from] crate::remote::uffd::UffdError),
    #[error(transparent)]
    Ws(#[from] crate::wss::WsError),
    #[error("installing {what} at {addr:#x}: {errno}")]
    Install {
        what: &'static str,
        addr: u64,
        errno: nix::errno::Errno,
    },
    #[error("writing the working set into RAM block {block} at {offset:#x}: {source}")]
    CacheWrite {
        block: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("dropping discarded pages of RAM block {block} at {offset:#x}: {errno}")]
    Discard {
        block: String,
        offset: u64,
        errno: nix::errno::Errno,
    },
    #[error("logging a guest discard: {0}")]
    DiscardLog(std::io::Error),
    #[error("QEMU faulted on {0:#x}, outside guest RAM")]
    StrayFault(u64),
    #[error("the image has more chunks than the engine can address")]
    TooManyChunks,
    #[error("{0} saved pages are still missing after the fill")]
    StillMissing(u64),
    #[error("starting the {name} thread: {source}")]
    Spawn {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// Where one RAM block lives in QEMU.
#[derive(Debug)]
pub(crate) struct BlockMap {
    /// QEMU's id of its memory backend.
    pub(crate) id: String,
    pub(crate) start: HostAddr,
    pub(crate) first_page: u64,
    pub(crate) pages: u64,
    /// QEMU's RAM file, opened read-write through `/proc/<pid>/fd`: the
    /// prefetcher writes into its page cache, discards punch it.
    pub(crate) file: File,
}

/// What the threads saw: service time of each fault (µs) and every
/// page's first touch, in order.
#[derive(Debug, Default)]
pub(crate) struct FaultLog {
    pub(crate) latencies: Vec<u32>,
    pub(crate) touches: Vec<PageIndex>,
}

/// Counters the engine keeps while it runs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) faults_before_resume: AtomicU64,
    pub(crate) faults_after_resume: AtomicU64,
    pub(crate) zero_faults: AtomicU64,
    /// Faulting pages installed by a fetch.
    pub(crate) fault_pages: AtomicU64,
    pub(crate) fill_pages: AtomicU64,
    pub(crate) fill_pages_after_resume: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    /// Minor faults served (pages already in the page cache).
    pub(crate) minor_faults: AtomicU64,
    /// First touches after resume that found their page prefetched.
    pub(crate) skipped_faults: AtomicU64,
    /// Pages the prefetcher installed.
    pub(crate) prefetched_pages: AtomicU64,
    /// Distinct pages touched (first touches recorded).
    pub(crate) touched_pages: AtomicU64,
    /// Pages installed because a fault read their chunk.
    pub(crate) neighbour_pages: AtomicU64,
    /// Remove events that were guest discards.
    pub(crate) discards: AtomicU64,
    /// Pages the guest discarded.
    pub(crate) discarded_pages: AtomicU64,
    /// Faults on discarded pages (answered with zeros).
    pub(crate) discarded_faults: AtomicU64,
}

/// Shared state of one restore (or one observation window).
pub(crate) struct Engine {
    image: Arc<Image>,
    uffd: Arc<RemoteUffd>,
    blocks: Vec<BlockMap>,
    pages: Residency,
    /// Installs share it; handling a guest discard takes it alone.
    discard_lock: RwLock<()>,
    fetch: FetchQueue,
    fetch_workers: usize,
    resumed: AtomicBool,
    in_window: AtomicBool,
    /// Guest RAM is about to be (or was) unregistered: an install that
    /// finds its range gone (`ENOENT`) lost a harmless race, since
    /// unregistering wakes every thread that waited on a fault there.
    released: AtomicBool,
    /// Watching a running VM whose RAM is all there: a missing page is a
    /// page the guest never wrote (or discarded), served as zeros.
    live: bool,
    stop: AtomicBool,
    /// Zaps in progress (their remove events are no discards).
    zaps: AtomicU32,
    /// Event batches the fault thread read / finished handling.
    batches_read: AtomicU64,
    batches_handled: AtomicU64,
    failure: Mutex<Option<EngineError>>,
    failed: AtomicBool,
    /// Paces the background fill once the guest runs (`--fill-limit`).
    fill_pace: Option<Throttle>,
    /// Where guest discards are logged for a recovery ([`discard`]).
    discard_log: Mutex<Option<File>>,
    /// Pages no thread waits on go into the page cache (a learning
    /// restore), under `stripes` ([`installer`]).
    cached_installs: bool,
    stripes: Box<[Mutex<()>]>,
    pub(crate) counters: Counters,
}

impl Engine {
    /// An engine restoring `image` into QEMU's `blocks` through `uffd`.
    pub(crate) fn new(image: Arc<Image>, uffd: Arc<RemoteUffd>, blocks: Vec<BlockMap>) -> Engine {
        let total: u64 = blocks.iter().map(|b| b.pages).sum();
        let missing = image.meta().nonzero_pages;
        Engine {
            image,
            uffd,
            blocks,
            pages: Residency::new(total, missing),
            discard_lock: RwLock::new(()),
            fetch: FetchQueue::default(),
            fetch_workers: DEFAULT_FETCH_WORKERS,
            resumed: AtomicBool::new(false),
            in_window: AtomicBool::new(false),
            released: AtomicBool::new(false),
            live: false,
            stop: AtomicBool::new(false),
            zaps: AtomicU32::new(0),
            batches_read: AtomicU64::new(0),
            batches_handled: AtomicU64::new(0),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            fill_pace: None,
            discard_log: Mutex::new(None),
            cached_installs: false,
            stripes: Box::new([]),
            counters: Counters::default(),
        }
    }

    /// Puts the pages no thread waits on (a fault's neighbours, the fill)
    /// into the RAM files' page cache instead of mapping them, so that the
    /// guest's first touch of every page is seen (a learning restore): no
    /// page is then mapped before the guest touched it.
    pub(crate) fn with_cached_installs(mut self, on: bool) -> Engine {
        self.cached_installs = on;
        self.stripes = if on {
            (0..installer::STRIPE_LOCKS)
                .map(|_| Mutex::new(()))
                .collect()
        } else {
            Box::new([])
        };
        self
    }

    /// Whether every page mapped so far was touched by the guest first
    /// (see [`Engine::with_cached_installs`]).
    pub(crate) fn maps_only_touched_pages(&self) -> bool {
        self.cached_installs
    }

    /// Limits the background fill to `bytes_per_sec` while the guest runs
    /// (faults and the working-set prefetch are not limited), so that the
    /// fill takes less of the memory bandwidth and CPU the guest needs.
    pub(crate) fn with_fill_limit(mut self, bytes_per_sec: Option<u64>) -> Engine {
        self.fill_pace = bytes_per_sec.map(Throttle::new);
        self
    }

    /// Appends every guest discard to `log` (opened for appending), for
    /// `thaw recover` ([`discard`]).
    pub(crate) fn with_discard_log(self, log: File) -> Engine {
        if let Ok(mut l) = self.discard_log.lock() {
            *l = Some(log);
        }
        self
    }

    /// Runs `n` fetch workers (at least one): reads in flight at once.
    pub(crate) fn with_fetch_workers(mut self, n: usize) -> Engine {
        self.fetch_workers = n.max(1);
        self
    }

    /// An engine that only observes a running VM whose RAM is complete
    /// (a checkpoint's tracking window): minor faults are mapped and
    /// recorded, missing pages get zero pages, nothing is filled.
    pub(crate) fn observer(
        image: Arc<Image>,
        uffd: Arc<RemoteUffd>,
        blocks: Vec<BlockMap>,
    ) -> Engine {
        let total: u64 = blocks.iter().map(|b| b.pages).sum();
        let mut e = Engine::new(image, uffd, blocks);
        e.live = true;
        // Nothing saved is ever read: no fetch workers.
        e.fetch_workers = 0;
        e.pages = Residency::new(total, 0);
        e.resumed = AtomicBool::new(true);
        e
    }

    /// Marks every page the RAM files already hold as resident (recovery
    /// after a thaw died: what it installed or prefetched is whole, see
    /// [`crate::ops::recover`]). Returns the saved pages among them.
    pub(crate) fn adopt_resident_pages(&self) -> std::io::Result<u64> {
        let mut kept = 0;
        for b in &self.blocks {
            for (start, end) in crate::mem::data_extents(&b.file, b.pages * PAGE_SIZE)? {
                for p in start / PAGE_SIZE..end.div_ceil(PAGE_SIZE).min(b.pages) {
                    let page = PageIndex(b.first_page + p);
                    let saved = matches!(self.image.locate(page), PageLocation::Slot(_));
                    if self.pages.mark_resident(page, saved) && saved {
                        kept += 1;
                    }
                }
            }
        }
        Ok(kept)
    }

    /// Saved pages not installed yet.
    pub(crate) fn remaining(&self) -> u64 {
        self.pages.remaining()
    }

    /// Marks the moment the guest is resumed (faults after it count as on-demand).
    pub(crate) fn set_resumed(&self) {
        self.resumed.store(true, Ordering::Release);
    }

    /// Marks the start of the tracking window: touches are still recorded,
    /// but no longer count as skipped faults of this restore.
    pub(crate) fn begin_window(&self) {
        self.in_window.store(true, Ordering::Release);
    }

    /// Call right before unregistering guest RAM (see `released`).
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::Release);
    }

    /// Asks the threads to stop at their next check.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.fetch.wake_all();
    }

    /// Whether a thread hit a fatal error.
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first fatal error a thread hit, taken out (later calls: `None`).
    pub(crate) fn take_failure(&self) -> Option<EngineError> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// Records `e` (the first error wins) and stops every thread.
    fn fail(&self, e: EngineError) {
        log::error!("restore engine: {e}");
        if let Ok(mut f) = self.failure.lock() {
            if f.is_none() && !self.failed.load(Ordering::Acquire) {
                *f = Some(e);
            }
        }
        self.failed.store(true, Ordering::Release);
        self.request_stop();
    }

    /// Prefetched pages the guest has not touched (so far).
    pub(crate) fn unused_prefetched(&self) -> u64 {
        self.pages.prefetched.count_without(&self.pages.touched)
    }

    /// Pages the guest discarded.
    pub(crate) fn discarded_pages(&self) -> u64 {
        self.pages.discarded.count()
    }

    fn host_addr(&self, page: PageIndex) -> HostAddr {
        let b = self.block_of(page);
        b.start.offset((page.0 - b.first_page) * PAGE_SIZE)
    }

    fn page_of(&self, addr: u64) -> Option<PageIndex> {
        self.blocks.iter().find_map(|b| {
            let off = addr.checked_sub(b.start.0)?;
            (off < b.pages * PAGE_SIZE).then(|| PageIndex(b.first_page + off / PAGE_SIZE))
        })
    }

    fn block_of(&self, page: PageIndex) -> &BlockMap {
        // Pages come from the image's own layout, which matches `blocks`
        // (checked before the engine is built).
        self.blocks
            .iter()
            .find(|b| page.0 >= b.first_page && page.0 < b.first_page + b.pages)
            .unwrap_or(&self.blocks[0])
    }

    fn same_block(&self, a: PageIndex, b: PageIndex) -> bool {
        std::ptr::eq(self.block_of(a), self.block_of(b))
    }

    /// Starts the fault thread and the fetch workers. `log_capacity`
    /// bounds the touches and service times recorded.
    pub(crate) fn start(self: &Arc<Self>, log_capacity: usize) -> Result<Service, EngineError> {
        let engine = self.clone();
        let faults = spawn("fault", move || engine.serve_faults(log_capacity))?;
        let mut service = Service {
            faults: Some(faults),
            fetchers: Vec::new(),
        };
        for _ in 0..self.fetch_workers {
            let engine = self.clone();
            match spawn("fetch", move || engine.fetch_worker(log_capacity)) {
                Ok(h) => service.fetchers.push(h),
                Err(e) => {
                    self.request_stop();
                    let _ = service.stop(self);
                    return Err(e);
                }
            }
        }
        Ok(service)
    }

    /// Starts the background filler, reporting to `progress`.
    pub(crate) fn start_fill(
        self: &Arc<Self>,
        progress: SharedProgress,
    ) -> Result<Fill, EngineError> {
        let engine = self.clone();
        let handle = spawn("fill", move || {
            let t = Instant::now();
            let r = engine.fill(&*progress);
            (r, t.elapsed())
        })?;
        Ok(Fill(handle))
    }
}

/// Spawns a named engine thread.
fn spawn<T: Send + 'static>(
    name: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, EngineError> {
    std::thread::Builder::new()
        .name(format!("thaw-{name}"))
        .spawn(f)
        .map_err(|source| EngineError::Spawn { name, source })
}

/// The fault thread and the fetch workers of a running engine.
pub(crate) struct Service {
    faults: Option<JoinHandle<FaultLog>>,
    fetchers: Vec<JoinHandle<Vec<u32>>>,
}

impl Service {
    /// Stops the threads and joins them: what they recorded, or the first
    /// fatal error one of them hit, or which one panicked.
    pub(crate) fn stop(mut self, engine: &Engine) -> Result<FaultLog, EngineError> {
        engine.request_stop();
        let mut log = match self.faults.take().map(JoinHandle::join) {
            Some(Ok(log)) => Some(log),
            Some(Err(_)) => None,
            None => Some(FaultLog::default()),
        };
        let mut fetch_panicked = false;
        for f in self.fetchers.drain(..) {
            match f.join() {
                Ok(mut lat) => {
                    if let Some(log) = &mut log {
                        log.latencies.append(&mut lat);
                    }
                }
                Err(_) => fetch_panicked = true,
            }
        }
        if let Some(e) = engine.take_failure() {
            return Err(e);
        }
        if fetch_panicked {
            return Err(EngineError::Panicked("fetch"));
        }
        log.ok_or(EngineError::Panicked("fault"))
    }
}

/// The background filler's thread.
pub(crate) struct Fill(JoinHandle<(Result<(), EngineError>, Duration)>);

impl Fill {
    /// Whether the filler has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Waits for the filler and checks that no saved page is missing;
    /// returns how long it ran.
    pub(crate) fn join(self, engine: &Engine) -> Result<Duration, EngineError> {
        let (result, took) = self.0.join().map_err(|_| EngineError::Panicked("fill"))?;
        result?;
        if let Some(e) = engine.take_failure() {
            return Err(e);
        }
        match engine.remaining() {
            0 => Ok(took),
            n => Err(EngineError::StillMissing(n)),
        }
    }
}
