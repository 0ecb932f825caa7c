//! The restore engine: installs saved pages into QEMU's registered RAM
//! through the stolen userfaultfd. A prefetcher puts a working set into the
//! RAM files' page cache before the guest runs (so each first touch of it
//! is still seen, as a minor fault); one fault thread serves first touches
//! (minimal work, no allocation: one verified chunk read and one copy, or
//! one `UFFDIO_CONTINUE`) and records them in order; one filler streams the
//! remaining non-zero pages in address order with large reads and one
//! `UFFDIO_COPY` per contiguous run. A page is installed at most once: the
//! resident bitmap is the only shared state and is lock-free.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::image::{Image, PageLocation};
use crate::mem::{HostAddr, PageIndex, PAGE_SIZE};
use crate::remote::uffd::{CopyResult, EventBuffer, FaultEvent, RemoteUffd};
use crate::wss::{WsError, WsFile};

/// Bytes the filler reads per request.
const FILL_READ_BYTES: u64 = 4 << 20;
/// How long the fault thread waits for an event before checking for stop.
const FAULT_POLL: Duration = Duration::from_millis(20);

/// Errors inside the engine; fatal for the restore.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Uffd(#[from] crate::remote::uffd::UffdError),
    #[error("installing {what} at {addr:#x}: {errno}")]
    Install {
        what: &'static str,
        addr: u64,
        errno: nix::errno::Errno,
    },
    #[error("QEMU faulted on {0:#x}, outside guest RAM")]
    StrayFault(u64),
    #[error(transparent)]
    Ws(#[from] WsError),
}

/// Where one RAM block lives in QEMU.
#[derive(Debug)]
pub struct BlockMap {
    pub start: HostAddr,
    pub first_page: u64,
    pub pages: u64,
    /// QEMU's RAM file, opened read-write through `/proc/<pid>/fd`: the
    /// prefetcher writes into its page cache.
    pub file: File,
}

/// What the fault thread saw: service time of each fault (µs) and every
/// page's first touch, in order.
#[derive(Debug, Default)]
pub struct FaultLog {
    pub latencies: Vec<u32>,
    pub touches: Vec<PageIndex>,
}

/// Counters the engine keeps while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub faults_before_resume: AtomicU64,
    pub faults_after_resume: AtomicU64,
    pub zero_faults: AtomicU64,
    pub fault_pages: AtomicU64,
    pub fill_pages: AtomicU64,
    pub fill_pages_after_resume: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Minor faults served (pages already in the page cache).
    pub minor_faults: AtomicU64,
    /// First touches after resume that found their page prefetched.
    pub skipped_faults: AtomicU64,
    /// Pages the prefetcher installed.
    pub prefetched_pages: AtomicU64,
    /// Distinct pages touched (first touches recorded).
    pub touched_pages: AtomicU64,
    /// Pages installed because a fault read their chunk.
    pub neighbour_pages: AtomicU64,
}

/// Shared state of one restore.
pub struct Engine {
    image: Arc<Image>,
    uffd: Arc<RemoteUffd>,
    blocks: Vec<BlockMap>,
    resident: Box<[AtomicU64]>,
    prefetched: Box<[AtomicU64]>,
    touched: Box<[AtomicU64]>,
    remaining: AtomicU64,
    resumed: AtomicBool,
    in_window: AtomicBool,
    /// Guest RAM is about to be (or was) unregistered: an install that
    /// finds its range gone (`ENOENT`) lost a harmless race, since
    /// unregistering wakes every thread that waited on a fault there.
    released: AtomicBool,
    /// Tracing a running VM whose RAM is all there: a missing page is a
    /// page the guest never wrote (or discarded), served as zeros.
    live: bool,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Paces the background fill once the guest runs (`--fill-limit`).
    fill_pace: Option<crate::image::throttle::Throttle>,
    pub counters: Counters,
}

impl Engine {
    pub fn new(image: Arc<Image>, uffd: Arc<RemoteUffd>, blocks: Vec<BlockMap>) -> Engine {
        let total: u64 = blocks.iter().map(|b| b.pages).sum();
        let words = total.div_ceil(64) as usize;
        let remaining = image.meta().nonzero_pages;
        let bitmap = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Engine {
            image,
            uffd,
            blocks,
            resident: bitmap(),
            prefetched: bitmap(),
            touched: bitmap(),
            remaining: AtomicU64::new(remaining),
            resumed: AtomicBool::new(false),
            in_window: AtomicBool::new(false),
            released: AtomicBool::new(false),
            live: false,
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            fill_pace: None,
            counters: Counters::default(),
        }
    }

    /// Limits the background fill to `bytes_per_sec` while the guest runs
    /// (faults and the working-set prefetch are not limited), so that the
    /// fill takes less of the memory bandwidth and CPU the guest needs.
    pub fn with_fill_limit(mut self, bytes_per_sec: Option<u64>) -> Engine {
        self.fill_pace = bytes_per_sec.map(crate::image::throttle::Throttle::new);
        self
    }

    /// An engine that only observes a running VM whose RAM is complete
    /// (a checkpoint's tracking window): minor faults are mapped and
    /// recorded, missing pages get zero pages, nothing is filled.
    pub fn observer(image: Arc<Image>, uffd: Arc<RemoteUffd>, blocks: Vec<BlockMap>) -> Engine {
        let mut e = Engine::new(image, uffd, blocks);
        e.live = true;
        e.remaining = AtomicU64::new(0);
        e.resumed = AtomicBool::new(true);
        e
    }

    /// Marks every page the RAM files already hold as resident (recovery
    /// after a thaw died: what it installed or prefetched is whole, see
    /// [`crate::ops::recover`]). Returns the non-zero pages among them.
    pub fn adopt_resident_pages(&self) -> std::io::Result<u64> {
        let mut kept = 0;
        for b in &self.blocks {
            for (start, end) in crate::ops::save::data_extents(&b.file, b.pages * PAGE_SIZE)? {
                for p in start / PAGE_SIZE..end.div_ceil(PAGE_SIZE).min(b.pages) {
                    let page = PageIndex(b.first_page + p);
                    let nonzero = matches!(self.image.locate(page), PageLocation::Slot(_));
                    if nonzero && !self.is_resident(page) {
                        kept += 1;
                    }
                    self.mark_resident(page, nonzero);
                }
            }
        }
        Ok(kept)
    }

    /// Non-zero pages not installed yet.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Marks the moment the guest is resumed (faults after it count as on-demand).
    pub fn set_resumed(&self) {
        self.resumed.store(true, Ordering::Release);
    }

    /// Marks the start of the tracking window: touches are still recorded,
    /// but no longer count as skipped faults of this restore.
    pub fn begin_window(&self) {
        self.in_window.store(true, Ordering::Release);
    }

    /// Call right before unregistering guest RAM (see `released`).
    pub fn release(&self) {
        self.released.store(true, Ordering::Release);
    }

    /// Whether a failed install only found its range unregistered.
    fn unregistered(&self, errno: nix::errno::Errno) -> bool {
        errno == nix::errno::Errno::ENOENT && self.released.load(Ordering::Acquire)
    }

    /// Asks the threads to stop at their next check.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The first fatal error a thread hit, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn fail(&self, e: &EngineError) {
        log::error!("restore engine: {e}");
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert_with(|| e.to_string());
        }
        self.request_stop();
    }

    fn is_resident(&self, page: PageIndex) -> bool {
        test_bit(&self.resident, page)
    }

    /// Prefetched pages the guest has not touched (so far).
    pub fn unused_prefetched(&self) -> u64 {
        self.prefetched
            .iter()
            .zip(self.touched.iter())
            .map(|(p, t)| {
                (p.load(Ordering::Acquire) & !t.load(Ordering::Acquire)).count_ones() as u64
            })
            .sum()
    }

    /// Records the first touch of `page`; true if it is the first.
    fn record_touch(&self, page: PageIndex, log: &mut FaultLog) -> bool {
        if !set_bit(&self.touched, page) {
            return false;
        }
        if log.touches.len() < log.touches.capacity() {
            log.touches.push(page);
        }
        self.counters.touched_pages.fetch_add(1, Ordering::Release);
        true
    }

    /// Records `page` as installed; counts it once if it holds saved data.
    fn mark_resident(&self, page: PageIndex, nonzero: bool) {
        if set_bit(&self.resident, page) && nonzero {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn host_addr(&self, page: PageIndex) -> HostAddr {
        // Pages come from the image's own layout, which matches `blocks`.
        let b = self.block_of(page);
        b.start.offset((page.0 - b.first_page) * PAGE_SIZE)
    }

    fn page_of(&self, addr: u64) -> Option<PageIndex> {
        self.blocks.iter().find_map(|b| {
            let off = addr.checked_sub(b.start.0)?;
            (off < b.pages * PAGE_SIZE).then(|| PageIndex(b.first_page + off / PAGE_SIZE))
        })
    }

    /// The fault thread: serves page faults until asked to stop; returns the
    /// service time of each fault and the order of first touches.
    pub fn serve_faults(&self, capacity: usize) -> FaultLog {
        let mut log = FaultLog {
            latencies: Vec::with_capacity(capacity),
            touches: Vec::with_capacity(capacity),
        };
        let mut chunk = vec![0u8; self.image.meta().chunk_pages as usize * PAGE_SIZE as usize];
        let mut events = EventBuffer::new(64);
        while !self.stop.load(Ordering::Acquire) {
            let batch = match self.uffd.read_events(&mut events, Some(FAULT_POLL)) {
                Ok(b) => b,
                Err(e) => {
                    self.fail(&e.into());
                    break;
                }
            };
            let read_at = Instant::now();
            for ev in batch {
                // When the faulting thread was woken: neighbour pages
                // installed after that are not part of its wait.
                let mut woken = None;
                let served = match *ev {
                    FaultEvent::PageFault { addr } => {
                        self.serve_fault(addr, &mut chunk, &mut log, &mut woken)
                    }
                    FaultEvent::MinorFault { addr } => self.serve_minor(addr, &mut log),
                    ref other => {
                        log::debug!("userfaultfd event ignored: {other:?}");
                        continue;
                    }
                };
                if let Err(e) = served {
                    self.fail(&e);
                    return log;
                }
                // Service times describe the restore, not the tracking
                // window's minor faults after it.
                if log.latencies.len() < log.latencies.capacity()
                    && !self.in_window.load(Ordering::Acquire)
                {
                    let waited = woken.unwrap_or_else(Instant::now) - read_at;
                    let us = waited.as_micros().min(u32::MAX as u128) as u32;
                    log.latencies.push(us);
                }
            }
        }
        log
    }

    /// A page in the page cache (prefetched, or installed and then zapped
    /// out of QEMU's page tables) was touched: map it.
    fn serve_minor(&self, addr: u64, log: &mut FaultLog) -> Result<(), EngineError> {
        let page = self.page_of(addr).ok_or(EngineError::StrayFault(addr))?;
        let dst = self.host_addr(page);
        self.counters.minor_faults.fetch_add(1, Ordering::Relaxed);
        if self.record_touch(page, log)
            && self.resumed.load(Ordering::Acquire)
            && !self.in_window.load(Ordering::Acquire)
            && test_bit(&self.prefetched, page)
        {
            self.counters.skipped_faults.fetch_add(1, Ordering::Relaxed);
        }
        match self.uffd.continue_range(dst, PAGE_SIZE, true) {
            CopyResult::Done(_) | CopyResult::Exists { .. } => {
                Ok(self.uffd.wake(dst, PAGE_SIZE)?)
            }
            // Retried by the kernel's own re-fault once woken.
            CopyResult::Failed {
                errno: nix::errno::Errno::EAGAIN,
                ..
            } => Ok(self.uffd.wake(dst, PAGE_SIZE)?),
            CopyResult::Failed { errno, .. } if self.unregistered(errno) => Ok(()),
            CopyResult::Failed { errno, .. } => Err(EngineError::Install {
                what: "a page-cache page (UFFDIO_CONTINUE)",
                addr: dst.0,
                errno,
            }),
        }
    }

    /// Installs the working set in `ws`, in its order, before the guest
    /// runs. With `observe`, the pages go into the RAM files' page cache and
    /// nothing is mapped into QEMU, so the guest's first touch of each is
    /// still reported (a minor fault: skipped faults, learning); without,
    /// they are mapped with `UFFDIO_COPY` and cost the guest nothing more.
    /// Only for use while the guest is paused: a write into the page cache
    /// is not atomic against a guest write the way `UFFDIO_COPY` is.
    pub fn prefetch(&self, ws: &WsFile, observe: bool) -> Result<u64, EngineError> {
        let mut installed = 0u64;
        ws.stream(self.image.throttle(), |pages, data| {
            self.counters
                .bytes_read
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let mut i = 0;
            while i < pages.len() {
                // A run of adjacent pages in one block, none resident yet.
                let first = pages[i];
                let mut j = i + 1;
                while j < pages.len()
                    && pages[j].0 == first.0 + (j - i) as u64
                    && self.same_block(first, pages[j])
                    && !self.is_resident(pages[j])
                {
                    j += 1;
                }
                if !self.is_resident(first) {
                    let block = self.block_of(first);
                    let off = (first.0 - block.first_page) * PAGE_SIZE;
                    let bytes = &data[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize];
                    let written = if observe {
                        block.file.write_all_at(bytes, off)
                    } else {
                        match self.uffd.copy(block.start.offset(off), bytes, false) {
                            CopyResult::Done(_) => Ok(()),
                            CopyResult::Exists { .. } => {
                                Err(std::io::Error::from_raw_os_error(libc::EEXIST))
                            }
                            CopyResult::Failed { errno, .. } => {
                                Err(std::io::Error::from_raw_os_error(errno as i32))
                            }
                        }
                    };
                    written.map_err(|source| WsError::Io {
                        path: format!("guest RAM page {}", first.0).into(),
                        context: "cannot install the working set",
                        source,
                    })?;
                    for &p in &pages[i..j] {
                        self.mark_resident(p, true);
                        set_bit(&self.prefetched, p);
                    }
                    installed += (j - i) as u64;
                } else {
                    j = i + 1;
                }
                i = j;
            }
            Ok(())
        })?;
        self.counters
            .prefetched_pages
            .fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
    }

    fn block_of(&self, page: PageIndex) -> &BlockMap {
        self.blocks
            .iter()
            .find(|b| page.0 >= b.first_page && page.0 < b.first_page + b.pages)
            .unwrap_or(&self.blocks[0])
    }

    fn same_block(&self, a: PageIndex, b: PageIndex) -> bool {
        std::ptr::eq(self.block_of(a), self.block_of(b))
    }

    fn serve_fault(
        &self,
        addr: u64,
        chunk: &mut [u8],
        log: &mut FaultLog,
        woken: &mut Option<Instant>,
    ) -> Result<(), EngineError> {
        let page = self.page_of(addr).ok_or(EngineError::StrayFault(addr))?;
        let dst = self.host_addr(page);
        self.record_touch(page, log);
        if self.resumed.load(Ordering::Acquire) {
            self.counters
                .faults_after_resume
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters
                .faults_before_resume
                .fetch_add(1, Ordering::Relaxed);
        }
        if self.is_resident(page) {
            // Installed by the filler after this fault was queued.
            self.uffd.wake(dst, PAGE_SIZE)?;
            return Ok(());
        }
        let location = if self.live {
            PageLocation::Zero
        } else {
            self.image.locate(page)
        };
        match location {
            PageLocation::Zero => {
                let r = self.uffd.zeropage(dst, PAGE_SIZE, true);
                self.settle(r, dst, "a zero page")?;
                self.mark_resident(page, false);
                self.counters.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
            PageLocation::Slot(slot) => {
                let c = self.image.chunk_of(slot);
                let first = self.image.chunk_slots(c).start;
                let n = self.image.read_chunks_urgent(c, 1, chunk)?;
                self.counters
                    .bytes_read
                    .fetch_add(n as u64, Ordering::Relaxed);
                let off = (slot - first) as usize * PAGE_SIZE as usize;
                let r = self
                    .uffd
                    .copy(dst, &chunk[off..off + PAGE_SIZE as usize], true);
                self.settle(r, dst, "a page")?;
                *woken = Some(Instant::now());
                self.mark_resident(page, true);
                self.counters.fault_pages.fetch_add(1, Ordering::Relaxed);
                // The faulting guest is awake again. The rest of the chunk
                // was read and verified with its page: install it too
                // rather than read it again later.
                self.install_neighbours(c, slot, chunk)?;
            }
        }
        Ok(())
    }

    /// Installs the pages of chunk `c` (verified, in `chunk`) other than
    /// `slot`'s that are not resident yet. Nobody waits on them: no wake.
    /// A page installed meanwhile by the filler is simply left as it is.
    fn install_neighbours(&self, c: u32, slot: u32, chunk: &[u8]) -> Result<(), EngineError> {
        let slots = self.image.chunk_slots(c);
        for s in slots.clone() {
            let page = self.image.slot_page(s);
            if s == slot || self.is_resident(page) {
                continue;
            }
            let off = (s - slots.start) as usize * PAGE_SIZE as usize;
            let dst = self.host_addr(page);
            match self
                .uffd
                .copy(dst, &chunk[off..off + PAGE_SIZE as usize], false)
            {
                CopyResult::Done(_) => {
                    self.mark_resident(page, true);
                    self.counters
                        .neighbour_pages
                        .fetch_add(1, Ordering::Relaxed);
                }
                CopyResult::Exists { .. } => self.mark_resident(page, true),
                // A queued remove/unmap event: the filler will get it.
                CopyResult::Failed {
                    errno: nix::errno::Errno::EAGAIN,
                    ..
                } => {}
                CopyResult::Failed { errno, .. } if self.unregistered(errno) => return Ok(()),
                CopyResult::Failed { errno, .. } => {
                    return Err(EngineError::Install {
                        what: "a page of a faulted chunk",
                        addr: dst.0,
                        errno,
                    })
                }
            }
        }
        Ok(())
    }

    /// A single-page install either worked or lost a race to the filler
    /// (the page exists: wake the faulting thread); anything else is fatal.
    fn settle(&self, r: CopyResult, dst: HostAddr, what: &'static str) -> Result<(), EngineError> {
        match r {
            CopyResult::Done(_) => Ok(()),
            CopyResult::Exists { .. } => Ok(self.uffd.wake(dst, PAGE_SIZE)?),
            CopyResult::Failed { errno, .. } if self.unregistered(errno) => Ok(()),
            CopyResult::Failed { errno, .. } => Err(EngineError::Install {
                what,
                addr: dst.0,
                errno,
            }),
        }
    }

    /// The filler: every non-zero page not yet resident, in address order.
    pub fn fill(&self, progress: &dyn crate::progress::Progress) -> Result<(), EngineError> {
        if self.resumed.load(Ordering::Acquire) {
            yield_cpu_to_the_guest();
        }
        let r = self.fill_inner(progress);
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    fn fill_inner(&self, progress: &dyn crate::progress::Progress) -> Result<(), EngineError> {
        let meta = self.image.meta();
        let chunk_bytes = meta.chunk_pages as u64 * PAGE_SIZE;
        let chunk_count = meta.nonzero_pages.div_ceil(meta.chunk_pages as u64) as u32;
        let per_read = (FILL_READ_BYTES / chunk_bytes).max(1) as u32;
        let mut buf = vec![0u8; (per_read as u64 * chunk_bytes) as usize];
        let mut first = 0u32;
        while first < chunk_count {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let count = per_read.min(chunk_count - first);
            let start = self.image.chunk_slots(first).start;
            let end = self.image.chunk_slots(first + count - 1).end;
            first += count;
            if (start..end).all(|s| self.is_resident(self.image.slot_page(s))) {
                progress.advance((end - start) as u64 * PAGE_SIZE);
                continue;
            }
            if let Some(pace) = &self.fill_pace {
                if self.resumed.load(Ordering::Acquire) {
                    pace.take((end - start) as u64 * PAGE_SIZE);
                }
            }
            let n = self.image.read_chunks(first - count, count, &mut buf)?;
            self.counters
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
            let mut s = start;
            while s < end {
                let page = self.image.slot_page(s);
                if self.is_resident(page) {
                    s += 1;
                    continue;
                }
                // Extend the run while slots map to adjacent host pages.
                let dst = self.host_addr(page);
                let mut e = s + 1;
                while e < end {
                    let p = self.image.slot_page(e);
                    if self.is_resident(p)
                        || self.host_addr(p) != dst.offset((e - s) as u64 * PAGE_SIZE)
                    {
                        break;
                    }
                    e += 1;
                }
                let off = (s - start) as usize * PAGE_SIZE as usize;
                let len = (e - s) as usize * PAGE_SIZE as usize;
                self.install_run(s, dst, &buf[off..off + len])?;
                s = e;
            }
            progress.advance((end - start) as u64 * PAGE_SIZE);
        }
        Ok(())
    }

    /// Copies a run of pages starting at slot `slot`; pages that appeared
    /// meanwhile (served by the fault thread) are skipped.
    fn install_run(&self, slot: u32, dst: HostAddr, data: &[u8]) -> Result<(), EngineError> {
        let pages = (data.len() as u64 / PAGE_SIZE) as u32;
        let mut done = 0u32;
        while done < pages {
            let off = done as usize * PAGE_SIZE as usize;
            let at = dst.offset(done as u64 * PAGE_SIZE);
            let (copied, skip) = match self.uffd.copy(at, &data[off..], true) {
                CopyResult::Done(n) => (n, 0),
                CopyResult::Exists { copied } => (copied, 1),
                CopyResult::Failed {
                    copied,
                    errno: nix::errno::Errno::EAGAIN,
                } => (copied, 0),
                CopyResult::Failed { errno, .. } => {
                    return Err(EngineError::Install {
                        what: "a run of pages",
                        addr: at.0,
                        errno,
                    })
                }
            };
            let n = (copied as u64 / PAGE_SIZE) as u32 + skip;
            for i in done..done + n {
                self.mark_resident(self.image.slot_page(slot + i), true);
            }
            let fresh = (copied as u64 / PAGE_SIZE) as u32;
            self.counters
                .fill_pages
                .fetch_add(fresh as u64, Ordering::Relaxed);
            if self.resumed.load(Ordering::Acquire) {
                self.counters
                    .fill_pages_after_resume
                    .fetch_add(fresh as u64, Ordering::Relaxed);
            }
            done += n;
        }
        Ok(())
    }
}

/// Whether `page`'s bit is set in `bits`.
fn test_bit(bits: &[AtomicU64], page: PageIndex) -> bool {
    let (w, b) = ((page.0 / 64) as usize, page.0 % 64);
    bits[w].load(Ordering::Acquire) & (1 << b) != 0
}

/// Sets `page`'s bit; true if it was clear.
fn set_bit(bits: &[AtomicU64], page: PageIndex) -> bool {
    let (w, b) = ((page.0 / 64) as usize, page.0 % 64);
    bits[w].fetch_or(1 << b, Ordering::AcqRel) & (1 << b) == 0
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
