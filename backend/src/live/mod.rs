//! Live copy-on-write save of a running VM's RAM: the guest is paused only
//! while its device state is taken and its RAM write-protected, then runs
//! on while a copier writes the pages of that instant into the image.
//!
//! Before the pause thaw takes over a userfaultfd in QEMU (synchronous
//! write protection of shared memory, Linux ≥ 5.19, plus remove events),
//! closes QEMU's copy of it, registers guest RAM for write protection and
//! protects all of it while the guest still runs ("arming"): a write in
//! that phase is let go at once and its page noted, as is any discarded
//! range; then thaw finds each RAM file's data extents. In the pause,
//! [`LiveCopy::protect`] deals with the noted pages only, so the pause
//! does not grow with RAM. The pages to copy are the extents and the noted
//! pages: every page with data at the instant is among them (a hole there
//! reads as zeros and is dropped; holes elsewhere are never read). After
//! the resume [`LiveCopy::copy`] walks them in page order:
//!
//! - the copier claims a batch of pages ([`pages::PageStates`]), reads their
//!   bytes from the RAM file, marks them saved, lifts their protection
//!   (waking any vCPU or device thread that waited on them) and hands the
//!   batch to the image writer;
//! - a guest write to a page not yet saved faults; the fault thread claims
//!   the page, keeps its bytes in a scratch file ([`pages::SideStore`]),
//!   marks it saved and lets the write go on; the copier later takes that
//!   page from the scratch file. A write to a page the copier is reading
//!   waits for the copier's batch.
//!
//! So each page is saved exactly once, with its bytes at the instant.
//!
//! Speculative pre-copy (after Speculative Memory Checkpointing): a page
//! the guest writes again and again would fault once while arming and
//! once more after the resume. The pages predicted to be written
//! ([`Speculation`]: the write tracker's estimate, or what the previous
//! checkpoint of a series saw written) are left unprotected while arming;
//! in the pause they and the pages written while arming are protected
//! again like the rest, and the copier copies them first after the
//! resume, up to a budget, into memory, lifting their protection run by
//! run ([`LiveCopy::copy`]), so only a write that comes before the copier
//! faults, and the pause is that of plain copy-on-write. With
//! [`Speculation::in_pause`] they are copied in the pause instead, while
//! QEMU writes the device state ([`LiveCopy::protect_until`]), and never
//! protected again: no fault on them at all, but QEMU writes the device
//! state more slowly beside the copy. That copy stops when the device
//! state is done: what it has not copied by then, what exceeds the
//! budget, and every discarded range are protected again as before.
//! Every write fault seen is returned ([`LiveCopy::finish`]) as the next
//! prediction.
//!
//! QEMU holds no copy of the userfaultfd: if thaw dies, the kernel drops
//! the registration and every protection with thaw's copy, and the guest
//! runs on. If QEMU dies instead, no page can change any more and the
//! copier still completes the instant's image. A discard of guest memory
//! that has not been saved yet (a balloon, free page reporting) would lose
//! its instant bytes: the copy then fails rather than write a wrong image.

pub mod pages;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::Serialize;

use crate::image::is_zero;
use crate::image::throttle::Throttle;
use crate::mem::{u64_from, usize_from, HostAddr, PageIndex, PAGE_BYTES, PAGE_SIZE};
use crate::remote::uffd::{
    self, EventBuffer, FaultEvent, RegisterMode, RemoteUffd, UffdError, FEATURE_WP_HUGETLBFS_SHMEM,
};
use pages::{PageStates, SideStore, COPYING, NOT_SAVED, SAVED_ZERO};

/// Bytes the copier claims, reads and unprotects at once. A guest write
/// to a page in the batch waits at most this long a read.
const BATCH_BYTES: u64 = 256 << 10;
/// The copier lifts the protection of what it saved in steps of this many
/// bytes.
const RELEASE_BYTES: u64 = 16 << 20;
/// Pages copied ahead by default ([`Speculation::budget_pages`]):
/// 16 MiB.
pub const DEFAULT_SPECULATE_PAGES: u64 = 4096;
/// How long the fault thread waits for an event before checking for stop.
const EVENT_POLL: Duration = Duration::from_millis(50);
/// Fault service times kept for percentiles.
const MAX_SAMPLES: usize = 1 << 20;

/// The userfaultfd features a live copy takes over the userfaultfd with.
pub const FEATURES: u64 = FEATURE_WP_HUGETLBFS_SHMEM | userfaultfd_sys::UFFD_FEATURE_EVENT_REMOVE;

/// Errors of a live copy.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(
        "a live checkpoint needs synchronous userfaultfd write protection of shared memory \
         (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, Linux 5.19 or newer); this kernel ({kernel}) lacks it: \
         use --stop-copy"
    )]
    Unsupported { kernel: String },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("reading guest RAM block {id}: {source}")]
    ReadRam { id: String, source: std::io::Error },
    #[error("keeping a page the guest was about to write: {0}")]
    Side(std::io::Error),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(
        "the guest discarded {pages} pages of memory (a balloon or free page reporting) \
         before thaw had saved them, so the image could not hold one instant; \
         the checkpoint was abandoned and the VM runs on: retry, or use --stop-copy"
    )]
    Discarded { pages: u64 },
    #[error("the write-fault thread failed: {0}")]
    FaultThread(String),
    #[error("spawning the write-fault thread: {0}")]
    Spawn(std::io::Error),
}

/// Speculative pre-copy: pages predicted to be written during the copy,
/// and how many pages the pause may copy.
#[derive(Clone, Debug, Default)]
pub struct Speculation {
    /// Most likely first; the first `budget_pages` are left unprotected
    /// while arming and copied ahead of the walk.
    pub predicted: Vec<PageIndex>,
    /// At most this many pages are copied ahead (predicted ones first,
    /// then those written while arming); 0 turns speculation off.
    pub budget_pages: u64,
    /// Where the prediction came from, for reports.
    pub source: &'static str,
    /// Copy them in the pause, beside QEMU's device state (no fault on
    /// them at all, but the pause grows with the memory traffic), rather
    /// than first thing after the resume (the pause as without
    /// speculation; a write in the first milliseconds may still fault).
    pub in_pause: bool,
}

/// One guest RAM block as a live copy sees it.
pub struct LiveRange {
    /// The block's id, for messages.
    pub id: String,
    /// Where the block is mapped in QEMU.
    pub start: HostAddr,
    pub len: u64,
    /// Global number of the block's first page.
    pub first_page: u64,
    /// The block's RAM file, read by thaw.
    pub file: File,
}

impl LiveRange {
    /// The global page at QEMU address `addr`, if in this block.
    fn page_at(&self, addr: u64) -> Option<PageIndex> {
        (addr >= self.start.0 && addr - self.start.0 < self.len)
            .then(|| PageIndex(self.first_page + (addr - self.start.0) / PAGE_SIZE))
    }

    /// Whether global page `p` is in this block.
    fn holds(&self, p: PageIndex) -> bool {
        p.0 >= self.first_page && (p.0 - self.first_page) * PAGE_SIZE < self.len
    }
}

/// What a live copy did, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LiveStats {
    /// Time to protect all of guest RAM before the pause.
    pub arm_ms: f64,
    /// Where the prediction of writes came from (`none`,
    /// `dirty-estimate`, `previous-checkpoint`, `caller`).
    pub prediction: String,
    /// Pages predicted to be written, left unprotected while arming.
    pub predicted_pages: u64,
    /// Pages copied ahead of the walk (predicted, or written while
    /// arming): in the pause, never protected again, or first thing after
    /// the resume (speculative pre-copy).
    pub speculated_pages: u64,
    /// When they were copied: `pause`, `resume`, or empty without
    /// speculation.
    pub speculated_at: String,
    /// Pages protected again in the pause: written, discarded or
    /// predicted, and not copied there.
    pub reprotected_pages: u64,
    /// Pages to copy: every page with data at the instant, and maybe a few
    /// holes (read as zeros).
    pub protected_pages: u64,
    /// Time in the pause to copy or protect the noted pages.
    pub protect_ms: f64,
    /// Resume → every page in the image writer's hands.
    pub copy_ms: f64,
    /// Write faults the guest took on protected pages, while arming and
    /// after the instant.
    pub wp_faults: u64,
    /// Of those, faults while arming (let go at once).
    pub arm_faults: u64,
    /// Of those, pages the fault thread saved ahead of the copier.
    pub saved_ahead: u64,
    /// Of those, writes that waited for the copier's batch.
    pub waited_for_copier: u64,
    /// Fault service time (event read → write let go), median and 99th
    /// percentile, in µs; a write waiting for the copier is not counted.
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
}

/// Before the instant: which ranges lost their protection since guest RAM
/// was protected. The fault thread lifts a protection only while holding
/// this, so the list taken at the instant is complete.
#[derive(Default)]
struct Arming {
    /// The instant has come: writes are copy-on-write from now on.
    instant: bool,
    /// Pages (QEMU addresses) written while arming, in fault order.
    written: Vec<u64>,
    /// `(start, len)` in QEMU's space discarded while arming.
    removed: Vec<(u64, u64)>,
}

/// State shared by the copier and the fault thread.
struct Shared {
    arming: Mutex<Arming>,
    /// Per range: the byte ranges to copy, fixed at the instant (a
    /// superset of the data at the instant).
    extents: OnceLock<Vec<Vec<(u64, u64)>>>,
    states: PageStates,
    side: SideStore,
    stop: AtomicBool,
    /// Set by the fault thread when it fails; the copier gives up.
    failed: AtomicBool,
    /// Guest RAM is being unregistered: a write there is released by that.
    tearing_down: AtomicBool,
    /// `arming.instant`, readable without the lock (set under it): the
    /// fault thread's polling and counting.
    past_instant: AtomicBool,
    /// Pages discarded by the guest before they were saved.
    discarded: AtomicU64,
}

/// What the fault thread counted.
#[derive(Default)]
struct FaultCounts {
    wp_faults: u64,
    arm_faults: u64,
    /// Guest pages written after the instant, in fault order.
    written: Vec<PageIndex>,
    waited_for_copier: u64,
    service_us: Vec<u32>,
}

/// A live copy of one VM's RAM; see the module documentation. Dropping it
/// unregisters guest RAM (every waiting write goes on) and stops the fault
/// thread.
pub struct LiveCopy {
    uffd: Arc<RemoteUffd>,
    ranges: Arc<Vec<LiveRange>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<FaultCounts, LiveError>>>,
    /// Per range: its data extents once RAM was protected (byte offsets).
    armed_extents: Vec<Vec<(u64, u64)>>,
    /// Predicted pages left unprotected while arming, sorted.
    predicted: Vec<PageIndex>,
    budget_pages: u64,
    /// Copy the speculated pages in the pause, not after the resume.
    in_pause: bool,
    /// Room for the speculated pages, allocated and touched before the
    /// pause.
    speculated_memory: Vec<u8>,
    /// The pages to copy first after the resume (sorted), when not
    /// copied in the pause.
    copy_first: Vec<PageIndex>,
    /// Pages written while arming (the instant's noted writes).
    arm_written: Vec<PageIndex>,
    stats: LiveStats,
    registered: bool,
}

/// The end of the pause's other work (QEMU's device state), told to the
/// pause copy ([`LiveCopy::protect_until`]): it then stops copying, and
/// its thread, which copies at `SCHED_IDLE` so as not to slow QEMU down,
/// is lifted back to the normal policy at once, so that protecting the
/// rest again never waits for an idle core.
#[derive(Default)]
pub struct PauseDone {
    done: AtomicBool,
    /// The copying thread while it runs at `SCHED_IDLE` (0: none).
    idle_tid: std::sync::atomic::AtomicI32,
}

impl PauseDone {
    /// The pause's other work is done. (Sequentially consistent with
    /// [`IdleWhileCopying::enter`]: one of the two sees the other.)
    pub fn set(&self) {
        self.done.store(true, Ordering::SeqCst);
        let tid = self.idle_tid.load(Ordering::SeqCst);
        if tid != 0 {
            crate::sched::set_policy(tid, libc::SCHED_OTHER);
        }
    }

    fn is_set(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

/// The calling thread at `SCHED_IDLE` while this lives (and
/// [`PauseDone`] is not set), then at the normal policy. Best effort:
/// where a change is refused the thread runs as it was.
struct IdleWhileCopying<'a> {
    pause_done: &'a PauseDone,
}

impl<'a> IdleWhileCopying<'a> {
    fn enter(pause_done: &'a PauseDone) -> IdleWhileCopying<'a> {
        let tid = nix::unistd::gettid().as_raw();
        pause_done.idle_tid.store(tid, Ordering::SeqCst);
        crate::sched::set_policy(0, libc::SCHED_IDLE);
        // Set meanwhile: nobody lifts this thread but itself.
        if pause_done.is_set() {
            crate::sched::set_policy(0, libc::SCHED_OTHER);
        }
        IdleWhileCopying { pause_done }
    }
}

impl Drop for IdleWhileCopying<'_> {
    fn drop(&mut self) {
        self.pause_done.idle_tid.store(0, Ordering::SeqCst);
        crate::sched::set_policy(0, libc::SCHED_OTHER);
    }
}

/// Refuses a kernel without synchronous write protection of shared memory.
pub fn check_kernel() -> Result<(), LiveError> {
    let available = uffd::kernel_features().map_err(|errno| UffdError::Api {
        requested: FEATURES,
        errno,
    })?;
    if available & FEATURE_WP_HUGETLBFS_SHMEM == 0 {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        return Err(LiveError::Unsupported { kernel });
    }
    Ok(())
}

impl LiveCopy {
    /// Registers `ranges` for write protection with `uffd` (taken over
    /// with [`FEATURES`], QEMU's copy closed), starts the fault thread and
    /// protects all of guest RAM but the predicted pages of `speculation`
    /// (the guest may run: see the module documentation). `scratch` is an
    /// empty private file on the image's file system for pages saved
    /// ahead.
    pub fn start(
        uffd: Arc<RemoteUffd>,
        ranges: Vec<LiveRange>,
        scratch: File,
        total_pages: u64,
        speculation: &Speculation,
    ) -> Result<LiveCopy, LiveError> {
        let shared = Arc::new(Shared {
            arming: Mutex::new(Arming::default()),
            extents: OnceLock::new(),
            states: PageStates::new(total_pages),
            side: SideStore::new(scratch, total_pages),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            tearing_down: AtomicBool::new(false),
            past_instant: AtomicBool::new(false),
            discarded: AtomicU64::new(0),
        });
        let mut predicted: Vec<PageIndex> = first_of_each(
            speculation
                .predicted
                .iter()
                .copied()
                .filter(|&p| ranges.iter().any(|r| r.holds(p))),
        );
        predicted.truncate(usize_from(speculation.budget_pages));
        predicted.sort_unstable_by_key(|p| p.0);
        let mut live = LiveCopy {
            uffd,
            armed_extents: Vec::new(),
            predicted,
            budget_pages: speculation.budget_pages.min(total_pages),
            // Not zeros: every page of it is touched now, not in the pause
            // or the copy window.
            speculated_memory: vec![
                0x5a;
                usize_from(speculation.budget_pages.min(total_pages))
                    * PAGE_BYTES
            ],
            in_pause: speculation.in_pause,
            copy_first: Vec::new(),
            arm_written: Vec::new(),
            ranges: Arc::new(ranges),
            shared,
            thread: None,
            stats: LiveStats::default(),
            registered: false,
        };
        live.registered = true;
        for (i, r) in live.ranges.iter().enumerate() {
            if let Err(e) = live
                .uffd
                .register(r.start, r.len, RegisterMode::WRITE_PROTECT)
            {
                for r in &live.ranges[..i] {
                    let _ = live.uffd.unregister(r.start, r.len);
                }
                live.registered = false;
                return Err(e.into());
            }
        }
        let (uffd, ranges, shared) = (live.uffd.clone(), live.ranges.clone(), live.shared.clone());
        live.thread = Some(
            std::thread::Builder::new()
                .name("thaw-live-wp".into())
                .spawn(move || {
                    // Raised however the thread ends early, a panic included:
                    // the copier must not wait for a page it would save.
                    struct FailOnUnwind<'a>(&'a AtomicBool);
                    impl Drop for FailOnUnwind<'_> {
                        fn drop(&mut self) {
                            if std::thread::panicking() {
                                self.0.store(true, Ordering::Release);
                            }
                        }
                    }
                    let _guard = FailOnUnwind(&shared.failed);
                    let r = serve_faults(&uffd, &ranges, &shared);
                    if r.is_err() {
                        shared.failed.store(true, Ordering::Release);
                    }
                    r
                })
                .map_err(LiveError::Spawn)?,
        );
        let t = Instant::now();
        for r in live.ranges.iter() {
            for (from, to) in gaps(r, &live.predicted) {
                live.retry_eagain(|| live.uffd.write_protect(r.start.offset(from), to - from))?;
            }
        }
        live.stats.predicted_pages = u64_from(live.predicted.len());
        live.stats.prediction = speculation.source.to_string();
        // After the protection: what changes from now on is noted.
        for r in live.ranges.iter() {
            let extents =
                crate::mem::data_extents(&r.file, r.len).map_err(|source| LiveError::ReadRam {
                    id: r.id.clone(),
                    source,
                })?;
            live.armed_extents.push(extents);
        }
        live.stats.arm_ms = ms(t.elapsed());
        Ok(live)
    }

    /// The checkpoint instant (the guest is paused): protects again what
    /// lost its protection since [`LiveCopy::start`] (the predicted pages
    /// and those written; with [`Speculation::in_pause`] it copies them
    /// instead, up to the budget) and fixes the pages to copy. Returns how
    /// many there are.
    pub fn protect(&mut self) -> Result<u64, LiveError> {
        self.protect_until(&PauseDone::default())
    }

    /// [`LiveCopy::protect`], run while QEMU writes the device state:
    /// once `pause_done` is set the pages not copied in the pause yet are
    /// protected again instead.
    pub fn protect_until(&mut self, pause_done: &PauseDone) -> Result<u64, LiveError> {
        let t = Instant::now();
        // The instant and the pages to copy are fixed together: a remove
        // event is judged against both or neither.
        let (speculate, again, pages, arm_written) = {
            let mut arming = lock(&self.shared.arming);
            arming.instant = true;
            self.shared.past_instant.store(true, Ordering::Release);
            let written = std::mem::take(&mut arming.written);
            let removed = merge_ranges(std::mem::take(&mut arming.removed));
            let is_removed = |p: PageIndex| {
                self.address_of(p).is_some_and(|addr| {
                    let i = removed.partition_point(|&(s, _)| s <= addr);
                    i > 0 && addr < removed[i - 1].0 + removed[i - 1].1
                })
            };
            let arm_written = first_of_each(
                written
                    .iter()
                    .filter_map(|&addr| self.ranges.iter().find_map(|r| r.page_at(addr))),
            );
            // Predicted pages are unprotected and known likeliest: first.
            let mut speculate = Vec::new();
            let mut again: Vec<(u64, u64)> = removed.clone();
            let candidates = self.predicted.iter().chain(
                arm_written
                    .iter()
                    .filter(|p| self.predicted.binary_search_by_key(&p.0, |q| q.0).is_err()),
            );
            for &p in candidates {
                if is_removed(p) {
                    continue;
                }
                if u64_from(speculate.len()) < self.budget_pages {
                    speculate.push(p);
                } else if let Some(addr) = self.address_of(p) {
                    again.push((addr, PAGE_SIZE));
                }
            }
            speculate.sort_unstable_by_key(|p| p.0);
            let again = merge_ranges(again);
            let mut all = Vec::with_capacity(self.ranges.len());
            let mut pages = 0;
            for (r, armed) in self.ranges.iter().zip(&self.armed_extents) {
                let noted = again
                    .iter()
                    .filter_map(|&(start, len)| {
                        let (s, e) = (start.max(r.start.0), (start + len).min(r.start.0 + r.len));
                        (s < e).then(|| (s - r.start.0, e - r.start.0))
                    })
                    .chain(speculate.iter().filter(|p| r.holds(**p)).map(|p| {
                        let off = (p.0 - r.first_page) * PAGE_SIZE;
                        (off, off + PAGE_SIZE)
                    }));
                let extents = union(armed.iter().copied(), noted);
                pages += extents
                    .iter()
                    .map(|(s, e)| (e - s) / PAGE_SIZE)
                    .sum::<u64>();
                all.push(extents);
            }
            let _ = self.shared.extents.set(all);
            (speculate, again, pages, arm_written)
        };
        self.arm_written = arm_written;
        if !speculate.is_empty() {
            self.stats.speculated_at = if self.in_pause { "pause" } else { "resume" }.into();
        }
        let (copied, left) = if self.in_pause {
            self.copy_in_pause(&speculate, pause_done)?
        } else {
            // Protected like every other page; copied first after the
            // resume ([`LiveCopy::copy`]).
            self.copy_first = speculate.clone();
            (0, speculate)
        };
        let mut again = again;
        if !left.is_empty() {
            again = merge_ranges(
                again
                    .into_iter()
                    .chain(
                        left.iter()
                            .filter_map(|&p| self.address_of(p).map(|a| (a, PAGE_SIZE))),
                    )
                    .collect(),
            );
        }
        for &(start, len) in &again {
            if let Err(e) = self.retry_eagain(|| self.uffd.write_protect(HostAddr(start), len)) {
                log::error!(
                    "protecting {start:#x}+{len:#x} again failed ({}guest RAM); QEMU's mapping there: {}",
                    if self.ranges.iter().any(|r| r.page_at(start).is_some()) { "" } else { "not " },
                    describe_vma(self.uffd.owner(), start)
                );
                return Err(e);
            }
            self.stats.reprotected_pages += len / PAGE_SIZE;
        }
        self.stats.speculated_pages = u64_from(copied);
        log::debug!(
            "copied {copied} pages and protected {} ranges again in the pause, {pages} pages to copy, in {:.2} ms",
            again.len(),
            ms(t.elapsed())
        );
        self.stats.protected_pages = pages;
        self.stats.protect_ms = ms(t.elapsed());
        Ok(pages)
    }

    /// In the pause: keeps the bytes of `pages` (sorted, unprotected, at
    /// most the budget) in memory, read in runs, and marks them saved,
    /// until `pause_done` is set. Returns how many it copied and the pages
    /// it did not reach.
    fn copy_in_pause(
        &mut self,
        pages: &[PageIndex],
        pause_done: &PauseDone,
    ) -> Result<(usize, Vec<PageIndex>), LiveError> {
        let states = &self.shared.states;
        let runs = runs_of(&self.ranges, pages);
        let mut memory = std::mem::take(&mut self.speculated_memory);
        // Each page copied, with its page number in `memory`.
        let mut copied: Vec<(PageIndex, usize)> = Vec::with_capacity(pages.len());
        // Only the copy yields to QEMU; protecting the rest again, which
        // the pause waits for, runs at the thread's normal priority.
        let idle = (!runs.is_empty()).then(|| IdleWhileCopying::enter(pause_done));
        let mut left = Vec::new();
        let mut at = 0;
        for &(range, first, n) in &runs {
            let run = (first.0..first.0 + n).map(PageIndex);
            if pause_done.is_set() {
                left.extend(run);
                continue;
            }
            let end = self.read_run(&mut memory, at, range, first, n)?;
            // A page the fault thread took (a write fault read before the
            // instant and handled after it) is saved by that thread; the
            // others are this copy's. Their slots must stay in step with
            // `memory`, so a taken page keeps its slot, unused.
            for (i, p) in run.enumerate() {
                if states.claim(p) {
                    copied.push((p, at / PAGE_BYTES + i));
                }
            }
            at = end;
        }
        drop(idle);
        self.shared
            .side
            .put_in_memory(memory, &copied)
            .map_err(LiveError::Side)?;
        for &(p, _) in &copied {
            // Read in the pause: exactly its bytes at the instant, zero or
            // not, whatever is discarded later.
            states.saved(p, false);
        }
        Ok((copied.len(), left))
    }

    /// First thing after the resume: keeps the bytes of the speculated
    /// pages in memory, read in runs, and lifts the protection of each
    /// run as soon as it is read, so the guest's next writes there do not
    /// fault. A page the fault thread took first is left to it.
    fn copy_speculated_first(&mut self) -> Result<(), LiveError> {
        let pages = std::mem::take(&mut self.copy_first);
        if pages.is_empty() {
            return Ok(());
        }
        let states = &self.shared.states;
        let mut memory = std::mem::take(&mut self.speculated_memory);
        let mut copied: Vec<(PageIndex, usize)> = Vec::with_capacity(pages.len());
        let mut mine = Vec::new();
        let mut at = 0;
        for (range, first, n) in runs_of(&self.ranges, &pages) {
            self.check_failed()?;
            let r = &self.ranges[range];
            let end = at + usize_from(n) * PAGE_BYTES;
            mine.clear();
            mine.extend((0..n).map(|i| states.claim(PageIndex(first.0 + i))));
            if mine.iter().any(|&m| m) {
                // Claimed, so still protected: the instant's bytes.
                self.read_run(&mut memory, at, range, first, n)?;
                for (i, &m) in mine.iter().enumerate() {
                    if m {
                        let p = PageIndex(first.0 + u64_from(i));
                        copied.push((p, at / PAGE_BYTES + i));
                        // Only this thread reads the store, after this
                        // pass: the page may count as saved already.
                        states.saved(p, false);
                    }
                }
                // Lift only this pass's pages: one the fault thread is
                // still reading must stay protected.
                let mut i = 0;
                while i < mine.len() {
                    if !mine[i] {
                        i += 1;
                        continue;
                    }
                    let from = i;
                    while i < mine.len() && mine[i] {
                        i += 1;
                    }
                    let off = (first.0 - r.first_page + u64_from(from)) * PAGE_SIZE;
                    let len = u64_from(i - from) * PAGE_SIZE;
                    self.retry_eagain(|| self.uffd.unprotect(r.start.offset(off), len, true))?;
                }
            }
            at = end;
        }
        self.stats.speculated_pages = u64_from(copied.len());
        self.shared
            .side
            .put_in_memory(memory, &copied)
            .map_err(LiveError::Side)
    }

    /// Reads the `n` pages from `first` of range `range` into `memory` at
    /// byte `at` (the speculated pages' memory); returns where they end.
    fn read_run(
        &self,
        memory: &mut [u8],
        at: usize,
        range: usize,
        first: PageIndex,
        n: u64,
    ) -> Result<usize, LiveError> {
        let r = &self.ranges[range];
        let end = at + usize_from(n) * PAGE_BYTES;
        let data = memory.get_mut(at..end).ok_or_else(|| {
            LiveError::Side(std::io::Error::other(
                "more pages to copy ahead than the speculation budget",
            ))
        })?;
        r.file
            .read_exact_at(data, (first.0 - r.first_page) * PAGE_SIZE)
            .map_err(|source| LiveError::ReadRam {
                id: r.id.clone(),
                source,
            })?;
        Ok(end)
    }

    /// QEMU's address of guest page `p`.
    fn address_of(&self, p: PageIndex) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| r.holds(p))
            .map(|r| r.start.0 + (p.0 - r.first_page) * PAGE_SIZE)
    }

    /// Fails if the fault thread has failed (before the pause: a write it
    /// read may be held).
    pub fn check_healthy(&self) -> Result<(), LiveError> {
        self.check_failed()
    }

    /// Copies every page of the instant to `sink` in page order, in runs
    /// (the guest runs meanwhile), after the speculated pages if they were
    /// not copied in the pause; `throttle` paces the copier. Returns when
    /// every page is in `sink`'s hands.
    pub fn copy(
        &mut self,
        mut sink: impl FnMut(PageIndex, &[u8]) -> Result<(), LiveError>,
        throttle: Option<&Throttle>,
        progress: &dyn crate::progress::Progress,
    ) -> Result<(), LiveError> {
        let t = Instant::now();
        self.copy_speculated_first()?;
        let no_extents = Vec::new();
        let extents = self.shared.extents.get().unwrap_or(&no_extents);
        let total: u64 = extents
            .iter()
            .flat_map(|e| e.iter().map(|(s, e)| e - s))
            .sum();
        progress.start("RAM", total);
        let mut buf = vec![0u8; usize_from(BATCH_BYTES)];
        let mut claimed = Vec::with_capacity(usize_from(BATCH_BYTES / PAGE_SIZE));
        let result = (|| {
            for (r, extents) in self.ranges.iter().zip(extents) {
                // Everything before this offset is saved (or was a hole at
                // the instant): its protection is lifted in large steps.
                let mut released = 0;
                for &(start, end) in extents {
                    let mut off = start;
                    while off < end {
                        let len = (end - off).min(BATCH_BYTES);
                        let first = r.first_page + off / PAGE_SIZE;
                        let data = &mut buf[..usize_from(len)];
                        self.copy_batch(r, off, first, data, &mut claimed)?;
                        off += len;
                        if off - released >= RELEASE_BYTES {
                            self.release(r, released, off)?;
                            released = off;
                        }
                        sink(PageIndex(first), data)?;
                        progress.advance(len);
                        if let Some(t) = throttle {
                            t.take(len);
                        }
                    }
                }
                self.release(r, released, r.len)?;
            }
            Ok(())
        })();
        progress.finish();
        self.stats.copy_ms = ms(t.elapsed());
        result
    }

    /// One batch of the copier: `data` gets the instant's bytes of the
    /// pages at byte `off` of `r` (global page `first` on).
    fn copy_batch(
        &self,
        r: &LiveRange,
        off: u64,
        first: u64,
        data: &mut [u8],
        claimed: &mut Vec<bool>,
    ) -> Result<(), LiveError> {
        self.check_failed()?;
        let states = &self.shared.states;
        claimed.clear();
        claimed.extend(
            (0..u64_from(data.len()) / PAGE_SIZE).map(|i| states.claim(PageIndex(first + i))),
        );
        if claimed.iter().any(|&c| c) {
            // Every claimed page is still write-protected: these are its
            // bytes at the instant.
            r.file
                .read_exact_at(data, off)
                .map_err(|source| LiveError::ReadRam {
                    id: r.id.clone(),
                    source,
                })?;
            for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
                if claimed[i] {
                    states.saved(PageIndex(first + u64_from(i)), is_zero(page));
                }
            }
        }
        // Wake whoever waited on the batch. Its protection stays until the
        // copier lifts it for [`RELEASE_BYTES`] at once (each lift flushes
        // every CPU's TLB); a write before that faults once more and the
        // fault thread lifts it for that page alone.
        let (start, len) = (r.start.offset(off), u64_from(data.len()));
        match self.uffd.wake(start, len) {
            // QEMU is gone: nobody waits.
            Err(UffdError::Wake {
                errno: Errno::ESRCH,
                ..
            }) => {}
            r => r?,
        }
        for (i, page) in data.chunks_exact_mut(PAGE_BYTES).enumerate() {
            if claimed[i] {
                continue;
            }
            let p = PageIndex(first + u64_from(i));
            self.wait_saved(p)?;
            if !self.shared.side.get(p, page).map_err(LiveError::Side)? {
                return Err(LiveError::FaultThread(format!(
                    "page {} was saved ahead but is not in the scratch file",
                    p.0
                )));
            }
        }
        Ok(())
    }

    /// Lifts the protection of bytes `from..to` of `r`, all saved (or
    /// holes at the instant), waking any write waiting there.
    fn release(&self, r: &LiveRange, from: u64, to: u64) -> Result<(), LiveError> {
        if from >= to {
            return Ok(());
        }
        let start = r.start.offset(from);
        self.retry_eagain(|| self.uffd.unprotect(start, to - from, true))
    }

    /// Waits until the fault thread has saved page `p`.
    fn wait_saved(&self, p: PageIndex) -> Result<(), LiveError> {
        let mut spins = 0u32;
        while !self.shared.states.is_saved(p) {
            self.check_failed()?;
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn check_failed(&self) -> Result<(), LiveError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(LiveError::FaultThread(
                "it stopped (its error follows when the copy is torn down)".into(),
            ));
        }
        let discarded = self.shared.discarded.load(Ordering::Acquire);
        if discarded > 0 {
            return Err(LiveError::Discarded { pages: discarded });
        }
        Ok(())
    }

    /// Runs a protection change, again while the kernel refuses it with
    /// `EAGAIN` because a remove event is pending (the fault thread reads it).
    /// QEMU being gone (`ESRCH`: its memory is torn down) is success:
    /// nothing can write guest RAM any more.
    fn retry_eagain(&self, op: impl Fn() -> Result<(), UffdError>) -> Result<(), LiveError> {
        loop {
            match op() {
                Err(UffdError::WriteProtect {
                    errno: Errno::EAGAIN,
                    ..
                }) => {
                    self.check_failed()?;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(UffdError::WriteProtect {
                    errno: Errno::ESRCH,
                    ..
                }) => return Ok(()),
                r => return Ok(r?),
            }
        }
    }

    /// Ends the copy: unregisters guest RAM (no write waits any more),
    /// stops the fault thread and returns the statistics and the pages
    /// seen written, likeliest to be written again first (the prediction
    /// for the next checkpoint: written after the instant, then while
    /// arming, then predicted this time). A discard of an unsaved page
    /// seen until the end still fails it.
    pub fn finish(mut self) -> Result<(LiveStats, Vec<PageIndex>), LiveError> {
        let counts = self.teardown()?;
        let discarded = self.shared.discarded.load(Ordering::Acquire);
        if discarded > 0 {
            return Err(LiveError::Discarded { pages: discarded });
        }
        let mut stats = self.stats.clone();
        stats.wp_faults = counts.wp_faults;
        stats.arm_faults = counts.arm_faults;
        // The scratch file holds only what the fault thread saved.
        stats.saved_ahead = self.shared.side.len();
        stats.waited_for_copier = counts.waited_for_copier;
        let mut samples = counts.service_us;
        samples.sort_unstable();
        stats.fault_p50_us = percentile(&samples, 50);
        stats.fault_p99_us = percentile(&samples, 99);
        let written = first_of_each(
            counts
                .written
                .iter()
                .chain(&self.arm_written)
                .chain(&self.predicted)
                .copied(),
        );
        Ok((stats, written))
    }

    /// Unregisters (lifting every protection and waking every waiter),
    /// then stops and joins the fault thread.
    fn teardown(&mut self) -> Result<FaultCounts, LiveError> {
        let mut first_err = None;
        self.shared.tearing_down.store(true, Ordering::Release);
        if self.registered {
            self.registered = false;
            for r in self.ranges.iter() {
                if let Err(e) = self.uffd.unregister(r.start, r.len) {
                    // The owner may be gone: then there is nothing to release.
                    if self.uffd.owner_alive() {
                        log::error!("unregistering {} after the live copy: {e}", r.id);
                        first_err.get_or_insert(LiveError::from(e));
                    }
                }
            }
        }
        self.shared.stop.store(true, Ordering::Release);
        let counts = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(LiveError::FaultThread("it panicked".into())),
            None => Ok(FaultCounts::default()),
        };
        match (first_err, counts) {
            (_, Err(e)) | (Some(e), Ok(_)) => Err(e),
            (None, Ok(c)) => Ok(c),
        }
    }

    /// Statistics so far.
    pub fn stats(&self) -> &LiveStats {
        &self.stats
    }
}

impl Drop for LiveCopy {
    fn drop(&mut self) {
        if self.registered || self.thread.is_some() {
            if let Err(e) = self.teardown() {
                log::warn!("tearing down the live copy: {e}");
            }
        }
    }
}

/// What became of a write fault.
enum Handled {
    /// The write goes on.
    Released,
    /// The kernel refused to lift the protection for now (`EAGAIN`, a
    /// remove event is pending): handle the fault again after the next read.
    Again,
    /// The copier holds the page; its release wakes the write.
    CopierHolds,
}

/// The fault thread: before the instant lets every write go on and notes
/// its page; after it saves each page the guest is about to write unless
/// saved already, then lets the write go on; counts discards of pages not
/// saved yet. Returns when asked to stop, or when QEMU is gone (nothing
/// can write guest RAM any more).
fn serve_faults(
    uffd: &RemoteUffd,
    ranges: &[LiveRange],
    shared: &Shared,
) -> Result<FaultCounts, LiveError> {
    let mut events = EventBuffer::new(64);
    let mut page = vec![0u8; PAGE_BYTES];
    let mut counts = FaultCounts::default();
    let mut again: Vec<u64> = Vec::new();
    let mut retry: Vec<u64> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let wait = if !again.is_empty() {
            Duration::ZERO
        } else if shared.past_instant.load(Ordering::Acquire) {
            EVENT_POLL
        } else {
            // Arming is short; stay responsive to the instant.
            Duration::from_millis(1)
        };
        let batch = match uffd.read_events(&mut events, Some(wait)) {
            Ok(b) => b,
            Err(UffdError::OwnerExited { .. }) => return Ok(counts),
            Err(e) => return Err(e.into()),
        };
        retry.clear();
        retry.append(&mut again);
        for ev in batch {
            match *ev {
                FaultEvent::WriteProtectFault { addr } => {
                    counts.wp_faults += 1;
                    if !shared.past_instant.load(Ordering::Acquire) {
                        counts.arm_faults += 1;
                    } else if let Some(p) = ranges.iter().find_map(|r| r.page_at(addr)) {
                        if counts.written.len() < MAX_SAMPLES {
                            counts.written.push(p);
                        }
                    }
                    retry.push(addr & !(PAGE_SIZE - 1));
                }
                FaultEvent::Remove { start, end } => note_removed(ranges, shared, start, end),
                _ => {}
            }
        }
        for &addr in &retry {
            let t = Instant::now();
            match handle_write(uffd, ranges, shared, addr, &mut page)? {
                Handled::Again => again.push(addr),
                Handled::CopierHolds => counts.waited_for_copier += 1,
                Handled::Released => {
                    if counts.service_us.len() < MAX_SAMPLES {
                        counts
                            .service_us
                            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                }
            }
        }
    }
    Ok(counts)
}

/// One write fault at page-aligned `addr`.
fn handle_write(
    uffd: &RemoteUffd,
    ranges: &[LiveRange],
    shared: &Shared,
    addr: u64,
    page: &mut [u8],
) -> Result<Handled, LiveError> {
    let in_ram = ranges.iter().any(|r| r.page_at(addr).is_some());
    let release = || match uffd.unprotect(HostAddr(addr), PAGE_SIZE, true) {
        Ok(()) => Ok(Handled::Released),
        Err(UffdError::WriteProtect {
            errno: Errno::EAGAIN,
            ..
        }) => Ok(Handled::Again),
        // Not registered (any more): nothing can wait there. Outside guest
        // RAM that is harmless; inside, writes there would go unseen.
        Err(UffdError::WriteProtect {
            errno: Errno::ENOENT,
            ..
        }) if !in_ram || shared.tearing_down.load(Ordering::Acquire) => {
            log::debug!("a write fault at {addr:#x} outside registered guest RAM");
            Ok(Handled::Released)
        }
        // QEMU is gone: nothing waits, nothing can write any more.
        Err(UffdError::WriteProtect {
            errno: Errno::ESRCH,
            ..
        }) => Ok(Handled::Released),
        Err(e) => {
            log::error!(
                "releasing a write at {addr:#x} failed: {e}; QEMU's mapping there: {}",
                describe_vma(uffd.owner(), addr)
            );
            Err(LiveError::from(e))
        }
    };
    {
        let mut arming = lock(&shared.arming);
        if !arming.instant {
            let handled = release()?;
            // Outside guest RAM (not registered by thaw): nothing to note.
            if in_ram && matches!(handled, Handled::Released) {
                arming.written.push(addr);
            }
            return Ok(handled);
        }
    }
    let Some((r, p)) = ranges.iter().find_map(|r| r.page_at(addr).map(|p| (r, p))) else {
        // Not guest RAM thaw protected: nothing to save.
        return release();
    };
    if shared.states.claim(p) {
        // Still protected: these are its bytes at the instant.
        r.file
            .read_exact_at(page, addr - r.start.0)
            .map_err(|source| LiveError::ReadRam {
                id: r.id.clone(),
                source,
            })?;
        shared.side.put(p, page).map_err(LiveError::Side)?;
        shared.states.saved(p, is_zero(page));
        return release();
    }
    match shared.states.get(p) {
        COPYING => Ok(Handled::CopierHolds),
        _ => release(),
    }
}

/// A discarded range: before the instant it must be protected again (a
/// punched page loses its protection); after it, a discarded page with
/// data at the instant that is not saved yet has lost its instant bytes.
fn note_removed(ranges: &[LiveRange], shared: &Shared, start: u64, end: u64) {
    let mut arming = lock(&shared.arming);
    if !arming.instant {
        for r in ranges {
            let (s, e) = (start.max(r.start.0), end.min(r.start.0 + r.len));
            if s < e {
                arming.removed.push((s, e - s));
            }
        }
        return;
    }
    drop(arming);
    let Some(extents) = shared.extents.get() else {
        return;
    };
    let mut lost = 0u64;
    for (r, extents) in ranges.iter().zip(extents) {
        let (s, e) = (start.max(r.start.0), end.min(r.start.0 + r.len));
        for addr in (s..e).step_by(PAGE_BYTES) {
            let off = addr - r.start.0;
            let had_data = extents.iter().any(|&(a, b)| off >= a && off < b);
            let Some(p) = r.page_at(addr) else { continue };
            // A page saved as zeros may have been read after QEMU punched
            // it and before this event came: its instant bytes are lost too.
            if had_data && matches!(shared.states.get(p), NOT_SAVED | COPYING | SAVED_ZERO) {
                lost += 1;
            }
        }
    }
    if lost > 0 {
        log::error!("the guest discarded {lost} unsaved pages at {start:#x}..{end:#x}");
        shared.discarded.fetch_add(lost, Ordering::AcqRel);
    }
}

/// The mapping of process `pid` holding `addr`, with its flags (`uw`:
/// registered for userfaultfd write protection), from its `smaps`.
fn describe_vma(pid: nix::unistd::Pid, addr: u64) -> String {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return "unknown (smaps unreadable)".into();
    };
    let mut header: Option<&str> = None;
    for line in smaps.lines() {
        let is_header = line
            .split_once(' ')
            .and_then(|(range, _)| range.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((a, b)) = is_header {
            header = (addr >= a && addr < b).then_some(line);
        } else if let (Some(h), Some(flags)) = (header, line.strip_prefix("VmFlags:")) {
            return format!("{h} [{}]", flags.trim());
        }
    }
    "none".into()
}

/// Sorted `pages` grouped into runs of neighbours within one range, at
/// most a batch long: `(range, first page, pages)`.
fn runs_of(ranges: &[LiveRange], pages: &[PageIndex]) -> Vec<(usize, PageIndex, u64)> {
    let max_run = BATCH_BYTES / PAGE_SIZE;
    let mut runs: Vec<(usize, PageIndex, u64)> = Vec::new();
    for &p in pages {
        let Some(range) = ranges.iter().position(|r| r.holds(p)) else {
            continue;
        };
        match runs.last_mut() {
            Some((r, first, n)) if *r == range && first.0 + *n == p.0 && *n < max_run => {
                *n += 1;
            }
            _ => runs.push((range, p, 1)),
        }
    }
    runs
}

/// `pages` without repeats, each where it first came.
fn first_of_each(pages: impl Iterator<Item = PageIndex>) -> Vec<PageIndex> {
    let mut seen = std::collections::HashSet::new();
    pages.filter(|p| seen.insert(p.0)).collect()
}

/// `(start, len)` ranges sorted and merged where they touch or overlap.
fn merge_ranges(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    union(
        ranges.into_iter().map(|(start, len)| (start, start + len)),
        std::iter::empty(),
    )
    .into_iter()
    .map(|(start, end)| (start, end - start))
    .collect()
}

/// The byte ranges `[from, to)` of `r` outside the (sorted) pages `skip`.
fn gaps(r: &LiveRange, skip: &[PageIndex]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut from = 0;
    for p in skip.iter().filter(|p| r.holds(**p)) {
        let off = (p.0 - r.first_page) * PAGE_SIZE;
        if off > from {
            out.push((from, off));
        }
        from = off + PAGE_SIZE;
    }
    if from < r.len {
        out.push((from, r.len));
    }
    out
}

/// The union of two lists of `[start, end)` ranges as a sorted list of
/// disjoint ranges.
fn union(
    a: impl Iterator<Item = (u64, u64)>,
    b: impl Iterator<Item = (u64, u64)>,
) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.chain(b).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some((_, end)) if *end >= s => *end = (*end).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Locks `m`, also after a panic elsewhere (the data stays consistent:
/// every holder only pushes or takes whole entries).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[u32], pct: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = (sorted.len() - 1) * pct / 100;
    f64::from(sorted[i])
}
