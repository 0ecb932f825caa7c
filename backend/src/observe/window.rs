//! Observation windows: watch the guest's first touches (recorded by an
//! [`Engine`]: its fault thread, or its scanner of QEMU's page tables,
//! [`crate::engine::scanner`]) until they stop arriving. Shared by a
//! restore's learning window and a checkpoint's trace; the trace first
//! zaps QEMU's page-table entries for guest RAM (an injected
//! `madvise(MADV_DONTNEED)`; a shared file mapping keeps its data in the
//! page cache) so that the guest's next touch of every page faults once
//! more.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::remote::inject::{madvise_dontneed, InjectError};
use crate::remote::process::QemuProcess;
use crate::vmm::RamMapping;

/// How often a window checks whether new pages still arrive.
const WINDOW_TICK: Duration = Duration::from_millis(50);

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
