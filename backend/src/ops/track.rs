//! `thaw track`: keeps a working-set estimate of a running VM from outside
//! QEMU, by access-bit style scanning (`abit`, VEE 2011) or by write
//! tracking (`dirty`, see [`crate::observe::dirty`]).
//!
//! `abit`: every interval thaw zaps QEMU's page-table entries for guest RAM (an
//! injected `madvise(MADV_DONTNEED)`: for a shared file mapping the data
//! stays in the page cache and the next access maps it again with a cheap
//! minor fault), waits, and reads back from `/proc/<qemu>/pagemap` which
//! pages are mapped again, i.e. were accessed during the interval. Each page
//! keeps the number of the last interval it was seen in (its age); the
//! estimate is the pages seen in the last K intervals, most recent first,
//! and is rewritten atomically after every scan into the VM's runtime
//! directory, where `thaw save` and `thaw checkpoint` pick it up as the
//! `abit` working set. `dirty` ages the pages written in each interval the
//! same way and leaves the `dirty` working set.
//!
//! A tracker holds the VM's owner lock ([`crate::ops::owner`]) until it
//! stops: a save or checkpoint meanwhile is refused, naming the tracker.
//! Its last estimate stays in the runtime directory, so stopping the
//! tracker and then saving stores it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::mem::{usize_from, PageIndex, PAGE_SIZE};
use crate::ops::owner::{LockError, OwnerLock};
use crate::vmm::{self, RamMapping, VmState};
use crate::wss::{self, Estimator};

/// Errors while tracking.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error(transparent)]
    Qemu(#[from] vmm::QemuError),
    #[error(transparent)]
    Busy(#[from] LockError),
    #[error(transparent)]
    Inject(#[from] crate::remote::inject::InjectError),
    #[error(transparent)]
    Ws(#[from] wss::WsError),
    #[error("reading {path}: {source}")]
    Pagemap {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dirty(#[from] crate::observe::dirty::DirtyError),
    #[error("--interval-ms and --keep must be at least 1")]
    BadOptions,
    #[error("thaw track keeps abit or dirty estimates, not {0}")]
    Estimator(&'static str),
}

/// How `thaw track` scans.
#[derive(Clone, Copy, Debug)]
pub struct TrackOptions {
    /// Time between scans.
    pub interval: Duration,
    /// K: the estimate holds pages seen in the last K intervals.
    pub keep: u32,
    /// Stop after this long (None: until the VM goes away or a signal).
    pub duration: Option<Duration>,
    /// `Abit` or `Dirty`.
    pub estimator: Estimator,
    /// Dirty: synchronous write-protect faults even where `WP_ASYNC` exists.
    pub sync_wp: bool,
}

/// What tracking did, for humans and `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrackReport {
    pub name: String,
    pub estimator: String,
    pub scans: u64,
    /// Pages in the last estimate written.
    pub estimate_pages: u64,
    /// Mean time per scan spent zapping (inside QEMU) and reading pagemap.
    pub mean_zap_ms: f64,
    pub mean_scan_ms: f64,
    /// Why tracking ended: `vm-gone`, `duration` or `signal`.
    pub ended: String,
    /// Dirty: write faults were synchronous (no `WP_ASYNC`).
    pub sync_wp: bool,
}

impl std::fmt::Display for TrackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tracked {} ({}): {} scans, last estimate {} pages; per scan: zap {:.2} ms, scan {:.2} ms (ended: {})",
            self.name, self.estimator, self.scans, self.estimate_pages, self.mean_zap_ms, self.mean_scan_ms, self.ended
        )
    }
}

/// Per-page ages and the estimate they give.
#[derive(Debug)]
pub struct Ages {
    /// Interval number in which each page was last seen (0: never).
    last_seen: Vec<u32>,
    interval: u32,
}

impl Ages {
    pub fn new(pages: u64) -> Ages {
        Ages {
            last_seen: vec![0; usize_from(pages)],
            interval: 0,
        }
    }

    /// Starts the next interval; pages seen now get its number.
    pub fn next_interval(&mut self) {
        self.interval += 1;
    }

    pub fn seen(&mut self, page: PageIndex) {
        if let Some(s) = self.last_seen.get_mut(usize_from(page.0)) {
            *s = self.interval;
        }
    }

    /// Pages seen in the last `keep` intervals, most recently seen first,
    /// in address order within an interval.
    pub fn estimate(&self, keep: u32) -> Vec<PageIndex> {
        let oldest = self.interval.saturating_sub(keep.saturating_sub(1)).max(1);
        let mut pages: Vec<(u32, u64)> = self
            .last_seen
            .iter()
            .enumerate()
            .filter(|(_, &s)| s >= oldest)
            .map(|(p, &s)| (s, p as u64))
            .collect();
        pages.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        pages.into_iter().map(|(_, p)| PageIndex(p)).collect()
    }
}

/// Marks every page of `ram` that `pagemap` shows as mapped.
fn scan(
    pagemap: &File,
    path: &str,
    ram: &[(RamMapping, u64)],
    ages: &mut Ages,
) -> Result<(), TrackError> {
    const BATCH: u64 = 1 << 16;
    let mut buf = vec![0u8; usize_from(BATCH * 8)];
    for (m, first_page) in ram {
        let pages = m.len / PAGE_SIZE;
        let mut done = 0;
        while done < pages {
            let n = BATCH.min(pages - done);
            let off = (m.start.0 / PAGE_SIZE + done) * 8;
            pagemap
                .read_exact_at(&mut buf[..usize_from(n * 8)], off)
                .map_err(|source| TrackError::Pagemap {
                    path: path.to_string(),
                    source,
                })?;
            for (i, e) in buf[..usize_from(n * 8)].chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if v >> 63 != 0 {
                    ages.seen(PageIndex(first_page + done + i as u64));
                }
            }
            done += n;
        }
    }
    Ok(())
}

/// Tracks VM `name` until it goes away, `opts.duration` passes or `stop`
/// resolves (e.g. on SIGINT).
pub async fn track(
    name: &str,
    opts: TrackOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<TrackReport, TrackError> {
    if opts.interval.is_zero() || opts.keep == 0 {
        return Err(TrackError::BadOptions);
    }
    if !matches!(opts.estimator, Estimator::Abit | Estimator::Dirty) {
        return Err(TrackError::Estimator(opts.estimator.name()));
    }
    let (paths, state) = VmState::load(name)?;
    let _owner = OwnerLock::acquire(&paths, "track")?;
    let qemu = state.qemu().map_err(vmm::QemuError::from)?;
    let ram = vmm::find_ram(state.qemu_pid, &paths, &state.layout)?;
    let ram: Vec<(RamMapping, u64)> = ram
        .into_iter()
        .zip(&state.layout.blocks)
        .map(|(m, b)| (m, b.first_page))
        .collect();
    let path = format!("/proc/{}/pagemap", qemu.pid());
    let pagemap = File::open(&path).map_err(|source| TrackError::Pagemap {
        path: path.clone(),
        source,
    })?;
    let out = wss::estimate_path(&paths.dir, opts.estimator);
    let mut ages = Ages::new(state.layout.total_pages());
    let mut report = TrackReport {
        name: name.to_string(),
        estimator: opts.estimator.name().to_string(),
        ..Default::default()
    };
    let (mut zap_total, mut scan_total) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    tokio::pin!(stop);
    let zap = |ram: &[(RamMapping, u64)]| -> Result<(), TrackError> {
        for (m, _) in ram {
            crate::remote::inject::madvise_dontneed(&qemu, m.start, m.len)?;
        }
        Ok(())
    };
    let alive = || qemu.alive();
    let mut writes = None;
    let t = Instant::now();
    if opts.estimator == Estimator::Dirty {
        let w = crate::observe::dirty::WriteTracker::start(&qemu, ram.clone(), opts.sync_wp)?;
        report.sync_wp = w.synchronous();
        writes = Some(w);
    } else {
        zap(&ram)?;
    }
    zap_total += t.elapsed();
    let ended: Result<String, TrackError> = async {
        loop {
            tokio::select! {
                _ = &mut stop => return Ok("signal".to_string()),
                _ = tokio::time::sleep(opts.interval) => {}
            }
            if !alive() {
                return Ok("vm-gone".into());
            }
            let t = Instant::now();
            ages.next_interval();
            let scanned = match &mut writes {
                Some(w) => w
                    .collect(|p| ages.seen(p))
                    .map(|_| ())
                    .map_err(TrackError::from),
                None => scan(&pagemap, &path, &ram, &mut ages),
            };
            if let Err(e) = scanned {
                return if alive() {
                    Err(e)
                } else {
                    Ok("vm-gone".into())
                };
            }
            scan_total += t.elapsed();
            report.scans += 1;
            let estimate = ages.estimate(opts.keep);
            report.estimate_pages = estimate.len() as u64;
            wss::write_estimate(&out, &estimate)?;
            if opts.duration.is_some_and(|d| started.elapsed() >= d) {
                return Ok("duration".into());
            }
            if writes.is_some() {
                continue;
            }
            let t = Instant::now();
            match zap(&ram) {
                Ok(()) => zap_total += t.elapsed(),
                // Something outside thaw (a debugger) may hold QEMU for a moment.
                Err(TrackError::Inject(crate::remote::inject::InjectError::AlreadyTraced {
                    ..
                })) => {
                    log::info!("QEMU is being traced by another process; skipping one zap");
                }
                Err(_) if !alive() => return Ok("vm-gone".into()),
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    if let Some(w) = writes {
        if alive() {
            if let Err(e) = w.stop() {
                log::warn!("ending write tracking: {e}");
            }
        }
    }
    report.ended = ended?;
    let scans = report.scans.max(1) as f64;
    report.mean_zap_ms = zap_total.as_secs_f64() * 1000.0 / (scans + 1.0);
    report.mean_scan_ms = scan_total.as_secs_f64() * 1000.0 / scans;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_keeps_the_last_k_intervals_most_recent_first() {
        let mut a = Ages::new(10);
        a.next_interval();
        a.seen(PageIndex(5));
        a.seen(PageIndex(1));
        a.next_interval();
        a.seen(PageIndex(8));
        a.seen(PageIndex(3));
        a.next_interval();
        a.seen(PageIndex(1));
        let e = |a: &Ages, k| a.estimate(k).iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(e(&a, 1), [1]);
        assert_eq!(e(&a, 2), [1, 3, 8]);
        assert_eq!(e(&a, 3), [1, 3, 8, 5]);
        assert_eq!(e(&a, 30), [1, 3, 8, 5]);
    }
}
