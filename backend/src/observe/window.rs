//! Observation windows: watch the guest's first touches until they stop
//! arriving. Shared by a restore's learning window and a checkpoint's
//! trace. Two ways to see a touch:
//!
//! - a fault: QEMU's page-table entries for guest RAM are zapped (an
//!   injected `madvise(MADV_DONTNEED)`; a shared file mapping keeps its
//!   data in the page cache), so the guest's next touch of every page
//!   faults once more and an [`Engine`] records it; each touch costs the
//!   guest a round trip through thaw;
//! - QEMU's page tables ([`watch_mapped`]): when no page was mapped
//!   before the guest touched it (a learning restore), a page mapped now
//!   was touched. Guest RAM is unregistered first, so the kernel maps each
//!   page itself on first touch (a minor fault, no thaw in the way), and
//!   the pages are read from QEMU's pagemap every [`SCAN_TICK`]: a touch
//!   then costs the guest what it costs without thaw.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::mem::PageIndex;
use crate::observe::pagemap::Pagemap;
use crate::remote::inject::{madvise_dontneed, InjectError};
use crate::remote::process::QemuProcess;
use crate::vmm::RamMapping;

/// How often a window checks whether new pages still arrive.
const WINDOW_TICK: Duration = Duration::from_millis(50);
/// How often [`watch_mapped`] reads QEMU's pagemap.
pub(crate) const SCAN_TICK: Duration = Duration::from_millis(100);

/// The tracking window after a lazy or ws restore: it ends once no new
/// page was touched for `quiet`, or after `max`.
#[derive(Clone, Copy, Debug)]
pub struct LearnWindow {
    pub quiet: Duration,
    pub max: Duration,
}

impl Default for LearnWindow {
    fn default() -> Self {
        LearnWindow {
            quiet: Duration::from_millis(1000),
            max: Duration::from_secs(10),
        }
    }
}

/// Once all RAM is resident: zaps QEMU's page-table entries for guest RAM
/// (an injected `madvise(MADV_DONTNEED)`; for a shared file mapping the
/// data stays in the page cache) so that every page the guest uses next
/// faults once more as a minor fault, and records those first touches until
/// none arrive for `w.quiet` (at most `w.max`). Returns the window's length.
pub(crate) async fn tracking_window(
    qemu: &QemuProcess,
    ram: &[RamMapping],
    engine: &Engine,
    w: LearnWindow,
) -> Result<f64, InjectError> {
    let t = Instant::now();
    engine.zapping(|| zap(qemu, ram))?;
    Ok(watch(engine, w, t).await)
}

/// Drops QEMU's page-table entries for guest RAM (an injected
/// `madvise(MADV_DONTNEED)`; a shared file mapping keeps its data in the
/// page cache), so the next touch of every page faults once more.
pub(crate) fn zap(qemu: &QemuProcess, ram: &[RamMapping]) -> Result<(), InjectError> {
    for m in ram {
        madvise_dontneed(qemu, m.start, m.len)?;
    }
    Ok(())
}

/// Waits while new first touches arrive: returns (ms since `t`) once none
/// came for `w.quiet`, or `w.max` after `t`.
pub(crate) async fn watch(engine: &Engine, w: LearnWindow, t: Instant) -> f64 {
    let mut seen = engine.counters.touched_pages.load(Ordering::Acquire);
    let mut last_new = Instant::now();
    while t.elapsed() < w.max && last_new.elapsed() < w.quiet {
        if engine.has_failed() {
            break;
        }
        tokio::time::sleep(WINDOW_TICK).await;
        let now = engine.counters.touched_pages.load(Ordering::Acquire);
        if now != seen {
            seen = now;
            last_new = Instant::now();
        }
    }
    t.elapsed().as_secs_f64() * 1000.0
}

/// The pages first touched in a window read from QEMU's pagemap.
#[derive(Debug, Default)]
pub(crate) struct MappedTouches {
    /// Window length, ms since it began.
    pub(crate) ms: f64,
    /// New first touches, scan by scan (address order within a scan).
    pub(crate) pages: Vec<PageIndex>,
    /// Pagemap reads, and the time they took in all.
    pub(crate) scans: u64,
    pub(crate) scan_ms: f64,
}

/// Watches first touches in QEMU's page tables: reads which pages of
/// `ranges` (each RAM mapping with its first global page) are mapped
/// every [`SCAN_TICK`], and records those the engine has not seen touched
/// yet, until none arrive for `w.quiet` (at most `w.max` after `t`). Only
/// valid when no page was mapped before the guest touched it, and guest
/// RAM is no longer registered (else a first touch of a page in the page
/// cache would wait for thaw). A failed read (QEMU gone) ends the window
/// with what it found.
pub(crate) async fn watch_mapped(
    pagemap: &mut Pagemap,
    ranges: &[(RamMapping, u64)],
    engine: &Engine,
    w: LearnWindow,
    t: Instant,
) -> MappedTouches {
    let mut found = MappedTouches::default();
    let mut last_new = Instant::now();
    loop {
        let scan = Instant::now();
        let before = found.pages.len();
        if let Err(e) = pagemap.mapped(ranges, |p| {
            if engine.note_touch(p) {
                found.pages.push(p);
            }
        }) {
            log::warn!("learning window: reading {}: {e}", pagemap.path());
            break;
        }
        found.scans += 1;
        found.scan_ms += scan.elapsed().as_secs_f64() * 1000.0;
        if found.pages.len() > before {
            last_new = Instant::now();
        }
        if t.elapsed() >= w.max || last_new.elapsed() >= w.quiet || engine.has_failed() {
            break;
        }
        tokio::time::sleep(SCAN_TICK).await;
    }
    found.ms = t.elapsed().as_secs_f64() * 1000.0;
    log::debug!(
        "learning window: {} first touches from {} pagemap reads ({:.2} ms each)",
        found.pages.len(),
        found.scans,
        found.scan_ms / found.scans.max(1) as f64
    );
    found
}
