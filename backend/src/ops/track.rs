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
//! stops. A save or checkpoint stops it (SIGINT) and stores its last
//! estimate, which stays in the runtime directory; anything else is
//! refused, naming the tracker. The scanning itself is
//! [`crate::observe::abit`] and [`crate::observe::dirty`].

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::observe::abit::Ages;
use crate::observe::pagemap::Pagemap;
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
#[derive(Clone, Debug)]
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
    /// The VM is a libvirt domain at this URI: thaw takes it on first.
    pub libvirt: Option<String>,
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
    let (paths, state) = match &opts.libvirt {
        Some(uri) => vmm::libvirt::attach(uri, name).await?,
        None => VmState::load(name)?,
    };
    let _owner = OwnerLock::acquire(&paths, "track")?;
    let qemu = state.qemu().map_err(vmm::QemuError::from)?;
    let ram = vmm::find_ram(&qemu, &paths, &state)?;
    let ram: Vec<(RamMapping, u64)> = ram
        .into_iter()
        .zip(&state.layout.blocks)
        .map(|(m, b)| (m, b.first_page))
        .collect();
    let path = format!("/proc/{}/pagemap", qemu.pid());
    let mut pagemap = Pagemap::open(qemu.pid()).map_err(|source| TrackError::Pagemap {
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
        // A libvirt domain's QEMU runs unprivileged: it creates its
        // userfaultfd through /dev/userfaultfd, handed over its monitor.
        let mut monitor = None;
        let mut device = None;
        if state.libvirt.is_some() {
            let mut qmp = state.monitor(&paths).await?;
            device = Some(vmm::libvirt::plant_uffd_device(&mut qmp, &qemu).await?);
            monitor = Some(qmp);
        }
        let started = crate::observe::dirty::WriteTracker::start(
            &qemu,
            ram.clone(),
            opts.sync_wp,
            device.map(|d| d.fd),
        );
        if let (Some(qmp), Some(device)) = (&mut monitor, device) {
            vmm::libvirt::release_uffd_device(qmp, device).await;
        }
        let w = started?;
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
            let scanned =
                match &mut writes {
                    Some(w) => w
                        .collect(|p| ages.seen(p))
                        .map(|_| ())
                        .map_err(TrackError::from),
                    None => pagemap.mapped(&ram, |p| ages.seen(p)).map_err(|source| {
                        TrackError::Pagemap {
                            path: path.clone(),
                            source,
                        }
                    }),
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
