//! `thaw checkpoint`: save a running VM without stopping it, then trace the
//! order in which the guest touches its pages right after the checkpoint
//! (VEE's memory tracing, FREM's touch set) and store it in the image as
//! the `trace` working set.
//!
//! The image holds the RAM of the checkpoint instant. By default the save
//! is live ([`crate::live`]): the guest pauses only for its device state
//! and the write protection of its RAM, and runs on while thaw copies it;
//! tracing starts once the copy is done. With stop-and-copy the guest
//! stays paused for the whole copy and tracing starts from the instant.
//!
//! Tracing: thaw takes over a userfaultfd in QEMU, registers guest RAM for
//! missing and minor faults and zaps QEMU's page-table entries, then
//! records first touches until none arrive for a while (at most a
//! maximum), mapping each page back with `UFFDIO_CONTINUE`. QEMU's own
//! copy of the userfaultfd is closed at once: guest RAM is complete, so if
//! thaw dies the registration simply goes away and the guest runs on.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::engine::{Engine, FaultLog};
use crate::image::Image;
use crate::observe::window::{self, LearnWindow};
use crate::ops::owner::LockError;
use crate::ops::restore::{self, RestoreError};
use crate::ops::save::{self, SaveError, SaveMethod, SaveOptions, SaveReport, SpeculateOptions};
use crate::vmm::{self, Qmp, VmState};
use crate::wss::{self, Estimator, WorkingSet};

/// Errors of a checkpoint. A failed save leaves the VM running and no
/// image; a failed trace leaves the VM running and the image without a
/// trace working set.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error(transparent)]
    Busy(#[from] LockError),
    #[error("the checkpoint is saved, but tracing the guest afterwards failed: {0}")]
    Trace(#[from] RestoreError),
}

/// What a checkpoint did, for humans and `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    pub save: SaveReport,
    /// Pages in the traced working set, in first-touch order.
    pub trace_pages: u64,
    /// Length of the tracking window (resume → last page recorded + quiet).
    pub window_ms: f64,
    /// Minor faults served during the window.
    pub minor_faults: u64,
}

impl std::fmt::Display for CheckpointReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpointed {} to {}: {} MiB RAM, {} non-zero pages, paused {:.0} ms; \
             the VM keeps running",
            self.save.name,
            self.save.image.display(),
            self.save.ram_bytes >> 20,
            self.save.nonzero_pages,
            self.save.paused_ms,
        )?;
        if let Some(l) = &self.save.live {
            write!(
                f,
                "\n  copied live in {:.0} ms, {} pages: the guest took {} write faults ({} while \
                 arming, p50 {:.0} µs); {} pages copied ahead (prediction: {})",
                l.copy_ms,
                l.protected_pages,
                l.wp_faults,
                l.arm_faults,
                l.fault_p50_us,
                l.speculated_pages,
                l.prediction
            )?;
        }
        write!(
            f,
            "\n  traced working set: {} pages in a {:.0} ms window",
            self.trace_pages, self.window_ms
        )
    }
}

/// Options of `thaw checkpoint`.
#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    /// Replace an existing image.
    pub force: bool,
    /// The tracing window after the checkpoint.
    pub window: LearnWindow,
    /// The VM is a libvirt domain at this URI.
    pub libvirt: Option<String>,
    /// Live (copy-on-write) or stop-and-copy.
    pub method: SaveMethod,
    /// Live: pace the background copy to this many bytes per second.
    pub copy_limit: Option<u64>,
    /// Write an incremental image of this earlier image.
    pub parent: Option<std::path::PathBuf>,
    /// Live: speculative pre-copy ([`SaveOptions::speculate`]).
    pub speculate: SpeculateOptions,
    /// Live: the pages predicted to be written ([`SaveOptions::predicted`]).
    pub predicted: Option<(Vec<crate::mem::PageIndex>, &'static str)>,
    /// Where the RAM copy reports its progress.
    pub progress: crate::progress::SharedProgress,
}

/// Saves VM `name` into `image`, leaves it running and traces its first
/// touches during the window. The VM's owner lock is held throughout.
pub async fn checkpoint(
    name: &str,
    image: &Path,
    opts: &CheckpointOptions,
) -> Result<CheckpointReport, CheckpointError> {
    let owner = save::own(name, opts.libvirt.as_deref(), "checkpoint").await?;
    let report = save::save_owned(
        name,
        image,
        &SaveOptions {
            force: opts.force,
            keep_running: true,
            // Stop-and-copy: tracing starts at the instant, set up while
            // the guest is still paused. A live save resumes it itself.
            leave_paused: true,
            progress: opts.progress.clone(),
            libvirt: None,
            method: opts.method,
            copy_limit: opts.copy_limit,
            parent: opts.parent.clone(),
            speculate: opts.speculate,
            predicted: opts.predicted.clone(),
        },
        &owner,
    )
    .await?;
    let (paths, state) = VmState::load(name).map_err(RestoreError::from)?;
    let mut qmp = state.monitor(&paths).await.map_err(RestoreError::from)?;
    let paused = report.was_running && report.live.is_none();
    let traced = trace(&paths, &state, &mut qmp, image, paused, opts.window).await;
    if paused {
        // Whatever happened to the trace, the VM runs on.
        if let Err(e) = qmp.cont_after_migration().await {
            log::error!("resuming {name} after the checkpoint failed: {e}");
        }
    }
    let (trace_pages, window_ms, minor_faults) = traced?;
    Ok(CheckpointReport {
        save: report,
        trace_pages,
        window_ms,
        minor_faults,
    })
}

/// Sets up tracing while the VM is paused, resumes it (if it was running),
/// records first touches, tears tracing down and writes `ws-trace.bin`.
async fn trace(
    paths: &vmm::VmPaths,
    state: &VmState,
    qmp: &mut Qmp,
    image_dir: &Path,
    resume: bool,
    learn: LearnWindow,
) -> Result<(u64, f64, u64), RestoreError> {
    let image = Arc::new(Image::open(image_dir)?);
    let qemu = state.qemu().map_err(vmm::QemuError::from)?;
    let ram = vmm::find_ram(&qemu, paths, state)?;
    let uffd = Arc::new(
        restore::take_over_uffd(
            state,
            qmp,
            &qemu,
            userfaultfd_sys::UFFD_FEATURE_MISSING_SHMEM
                | userfaultfd_sys::UFFD_FEATURE_MINOR_SHMEM
                | userfaultfd_sys::UFFD_FEATURE_EVENT_REMOVE,
        )
        .await?,
    );
    // RAM is complete: a dying thaw must release the guest, not hang it.
    uffd.close_remote()?;
    let mut registered = Vec::new();
    let result = async {
        for m in &ram {
            uffd.register_missing_minor(m.start, m.len)?;
            registered.push(m);
        }
        let blocks = restore::block_maps(&qemu, &ram, &state.layout)?;
        let engine = Arc::new(Engine::observer(image.clone(), uffd.clone(), blocks));
        let capacity = crate::mem::usize_from(image.meta().total_pages).min(1 << 22);
        // The fault thread runs before the zap: QEMU's madvise waits until
        // its remove events are read.
        let service = engine.start(capacity)?;
        let zapped = engine.zapping(|| window::zap(&qemu, &ram));
        let t = Instant::now();
        let watched = async {
            zapped?;
            if resume {
                qmp.cont_after_migration().await?;
            }
            Ok::<_, RestoreError>(window::watch(&engine, learn, t).await)
        }
        .await;
        // Unregister before the fault thread stops: nothing may wait on a
        // fault nobody reads.
        engine.release();
        for m in registered.drain(..) {
            uffd.unregister(m.start, m.len)?;
        }
        let FaultLog { touches, .. } = service.stop(&engine)?;
        let window_ms = watched?;
        let set = WorkingSet::from_touches(Estimator::Trace, &touches);
        wss::write(&image, &set)?;
        let minor = engine
            .counters
            .minor_faults
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok((set.pages.len() as u64, window_ms, minor))
    }
    .await;
    for m in registered {
        if let Err(e) = uffd.unregister(m.start, m.len) {
            log::error!("unregistering guest RAM after a failed trace: {e}");
        }
    }
    result
}
