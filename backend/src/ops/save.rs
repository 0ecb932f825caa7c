//! `thaw save`: pause a running VM, write its device state (QEMU migration
//! with `x-ignore-shared`) and its non-zero RAM pages (read by thaw straight
//! from the shared RAM files) into a new image, and only then stop QEMU.
//! Any failure resumes the VM as it was and removes the partial image.
//!
//! A save that keeps the VM running (a checkpoint) is live by default
//! ([`SaveMethod::Live`], [`crate::live`]): the pause only takes the device
//! state and write-protects guest RAM, and the RAM is copied while the
//! guest runs. [`SaveMethod::StopAndCopy`] keeps the guest paused for the
//! whole copy.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::image::throttle::Throttle;
use crate::image::{ImageInfo, ImageWriter};
use crate::live::{LiveCopy, LiveRange, Speculation};
use crate::mem::{u64_from, usize_from, PageIndex, RamLayout, PAGE_SIZE};
use crate::ops::owner::{LockError, OwnerLock};
use crate::vmm::{self, Qmp, RamMapping, VmPaths, VmState};
use crate::wss::{self, Estimator};

/// A write tracker's estimate older than this predicts no writes of a
/// live save.
const ESTIMATE_MAX_AGE: Duration = Duration::from_secs(300);
/// How long QEMU may take to pause for a live save.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU may take to write the device state.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes copied from guest RAM per read.
const READ_BLOCK: usize = 4 << 20;
/// How long a save waits for a running `thaw track` to stop and write its
/// last estimate ([`OwnerLock::acquire_after_tracker`]).
pub(crate) const TRACKER_PATIENCE: Duration = Duration::from_secs(60);

/// How long a failed save waits for QEMU to exit before blaming the
/// failure on something else.
const QEMU_EXIT_GRACE: Duration = Duration::from_millis(500);

/// Errors saving a VM.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Qemu(#[from] vmm::QemuError),
    #[error(transparent)]
    Qmp(#[from] vmm::QmpError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Busy(#[from] LockError),
    #[error("reading guest RAM block {id} from {path}: {source}")]
    ReadRam {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mapping guest RAM: {0}")]
    Map(String),
    #[error(
        "QEMU (pid {pid}) exited during the save; {outcome}; the VM's runtime and RAM files were removed ({cause})"
    )]
    QemuExited {
        pid: i32,
        outcome: String,
        cause: String,
    },
    #[error(transparent)]
    Live(#[from] crate::live::LiveError),
    #[error("taking over QEMU's userfaultfd for a live save: {0}")]
    TakeOver(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// How a save that keeps the VM running copies its RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaveMethod {
    /// Copy-on-write: pause for the device state and write protection
    /// only, copy RAM while the guest runs ([`crate::live`]).
    #[default]
    Live,
    /// Keep the guest paused until all of RAM is in the image.
    StopAndCopy,
}

/// Options of `thaw save`.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Replace an existing image at the target path.
    pub force: bool,
    /// Leave the VM running after the save (a checkpoint) instead of stopping it.
    pub keep_running: bool,
    /// With `keep_running`: leave the VM paused; the caller resumes it
    /// (when [`SaveReport::was_running`]) after preparing its own work.
    pub leave_paused: bool,
    /// Where the RAM copy reports its progress.
    pub progress: crate::progress::SharedProgress,
    /// The VM is a libvirt domain at this URI (`qemu:///system`): thaw
    /// takes it on first ([`vmm::libvirt::attach`]).
    pub libvirt: Option<String>,
    /// With `keep_running`: live (the default) or stop-and-copy. A save
    /// that stops the VM always copies with the guest paused.
    pub method: SaveMethod,
    /// Live saves: pace the background copy to this many bytes per second.
    pub copy_limit: Option<u64>,
    /// Write an incremental image of this earlier image of the VM: pages
    /// unchanged since are stored as the parent's.
    pub parent: Option<PathBuf>,
    /// Live saves: speculative pre-copy.
    pub speculate: SpeculateOptions,
    /// Live saves: the pages predicted to be written, likeliest first,
    /// and where they come from (a series passes what the previous
    /// checkpoint saw written). `None`: the estimate of a
    /// `thaw track --estimator dirty` of this VM, if any.
    pub predicted: Option<(Vec<PageIndex>, &'static str)>,
}

/// Live saves: speculative pre-copy ([`crate::live::Speculation`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SpeculateOptions {
    /// At most this many pages are copied ahead; `Some(0)` turns it
    /// off, `None` is [`crate::live::DEFAULT_SPECULATE_PAGES`].
    pub pages: Option<u64>,
    /// Copy them in the pause rather than first after the resume
    /// ([`crate::live::Speculation::in_pause`]).
    pub in_pause: bool,
}

/// What a save did, for humans and `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct SaveReport {
    pub name: String,
    pub image: PathBuf,
    pub ram_bytes: u64,
    pub nonzero_pages: u64,
    pub data_bytes_scanned: u64,
    pub device_state_bytes: u64,
    /// Pause → device state written.
    pub device_state_ms: f64,
    /// How long the guest was paused: until the image was complete
    /// (stop-and-copy), or until RAM was write-protected (live).
    pub paused_ms: f64,
    /// When the guest was paused and when it ran again (the image
    /// complete, for stop-and-copy), in ms since the Unix epoch: a client
    /// of the guest can tell which of its requests came before the instant.
    pub paused_at_unix_ms: f64,
    pub resumed_at_unix_ms: f64,
    /// `live` or `stop-and-copy`.
    pub method: SaveMethod,
    /// A live save's copy: pages protected, write faults, copy time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<crate::live::LiveStats>,
    pub total_ms: f64,
    /// Whether the VM was running when the save began.
    pub was_running: bool,
    /// Working sets stored from running trackers' estimates.
    pub working_sets: Vec<Estimator>,
    /// An incremental image: its parent, and the pages taken from it
    /// unchanged (`nonzero_pages` are those written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    pub inherited_pages: u64,
    /// A live save: the pages seen written, likeliest to be written again
    /// first (the prediction for the next checkpoint of a series).
    #[serde(skip)]
    pub written_pages: Vec<PageIndex>,
}

/// Saves VM `name` into a new image directory `image`, holding the VM's
/// owner lock: a running `thaw track` is stopped first (its last estimate
/// is stored), any other holder (a restore, a checkpoint) makes it refuse.
pub async fn save(name: &str, image: &Path, opts: &SaveOptions) -> Result<SaveReport, SaveError> {
    let owner = own(name, opts.libvirt.as_deref(), "save").await?;
    save_owned(name, image, opts, &owner).await
}

/// Attaches to VM `name` (a libvirt domain at `libvirt`, taken on first)
/// and takes its owner lock for `operation`, stopping a running tracker
/// first (its last estimate stays for the save to store).
pub(crate) async fn own(
    name: &str,
    libvirt: Option<&str>,
    operation: &str,
) -> Result<OwnerLock, SaveError> {
    let paths = match libvirt {
        Some(uri) => vmm::libvirt::attach(uri, name).await?.0,
        None => VmState::load(name)?.0,
    };
    Ok(OwnerLock::acquire_after_tracker(&paths, operation, TRACKER_PATIENCE).await?)
}

/// [`save`] for an operation that holds the VM's owner lock already
/// (`thaw checkpoint`, which goes on to trace the guest).
pub async fn save_owned(
    name: &str,
    image: &Path,
    opts: &SaveOptions,
    _owner: &OwnerLock,
) -> Result<SaveReport, SaveError> {
    let (paths, state) = VmState::load(name)?;
    let qemu = state.qemu().map_err(vmm::QemuError::from)?;
    let mut written = false;
    let saved = save_locked(name, image, opts, &paths, &state, &mut written).await;
    // A QEMU being killed loses its memory before its pidfd says it
    // exited (a register of its RAM then fails with ENOMEM): an error gets
    // a moment to show whether QEMU is going.
    let qemu_gone = match &saved {
        Err(_) => qemu.wait_exit(QEMU_EXIT_GRACE).await,
        Ok(_) => false,
    };
    match saved {
        Err(e) if qemu_gone => {
            // The partial image is gone already (the writer removes it when
            // dropped); so must be what the dead QEMU left.
            vmm::remove_runtime(&paths);
            // QEMU can die after everything was captured (then only the
            // final resume or stop failed, or a live copy completed the
            // instant's image): that image is whole, keep it. Whatever is
            // at the path otherwise is not this save's.
            let outcome = if written {
                format!("the image {} is complete and restorable", image.display())
            } else {
                "no image was written".to_string()
            };
            Err(SaveError::QemuExited {
                pid: state.qemu_pid,
                outcome,
                cause: e.to_string(),
            })
        }
        r => r,
    }
}

async fn save_locked(
    name: &str,
    image: &Path,
    opts: &SaveOptions,
    paths: &VmPaths,
    state: &VmState,
    written: &mut bool,
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    let (paths, state) = (paths.clone(), state.clone());
    let mut qmp = state.monitor(&paths).await?;
    let run_state = qmp.run_state().await?;
    let was_running = run_state == "running";
    // What brings a libvirt domain back under libvirt: its XML as `virsh
    // save` keeps it.
    let libvirt = match &state.libvirt {
        Some(l) => {
            let domain = vmm::libvirt::LibvirtDomain::open(&l.uri, &l.name)
                .map_err(|e| vmm::QemuError::Libvirt(e.to_string()))?;
            let xml = domain
                .xml(true)
                .and_then(|x| vmm::libvirt::without_incoming(&x))
                .map_err(|e| vmm::QemuError::Libvirt(e.to_string()))?;
            Some(vmm::libvirt::LibvirtImage {
                uri: l.uri.clone(),
                name: l.name.clone(),
                uuid: l.uuid.clone(),
                xml,
            })
        }
        None => None,
    };
    let live_method = opts.keep_running && opts.method == SaveMethod::Live;
    if live_method {
        crate::live::check_kernel()?;
    }
    let mut writer = ImageWriter::create(image, state.layout.clone(), opts.force)?;
    if let Some(parent) = &opts.parent {
        let parent = crate::image::Image::open(parent)?;
        writer.set_parent(&parent)?;
    }
    // A live save takes over QEMU's userfaultfd and registers guest RAM
    // before the pause, so that the pause only protects it.
    let mut live = if live_method {
        match start_live(&mut qmp, &state, &paths, &writer, opts).await {
            Ok(l) => Some(l),
            Err(e) => {
                drop(writer);
                return Err(e);
            }
        }
    } else {
        None
    };

    let paused = Instant::now();
    let paused_at = unix_ms();
    if was_running {
        match &live {
            None => {
                qmp.execute("stop", json!({})).await?;
            }
            Some(l) => {
                // A write the fault thread read before failing would be
                // held, and QEMU's stop could wait on it for ever.
                l.check_healthy()?;
                match tokio::time::timeout(STOP_TIMEOUT, qmp.execute("stop", json!({}))).await {
                    Ok(r) => {
                        r?;
                    }
                    Err(_) => {
                        drop(live);
                        drop(writer);
                        return Err(SaveError::Io {
                            context: "pausing the VM for a live save".into(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("QEMU did not stop within {STOP_TIMEOUT:?}; write protection was released"),
                            ),
                        });
                    }
                }
            }
        }
    }
    let mut resumed = None;
    let result = async {
        // A live copy fixes its pages and copies the predicted ones while
        // QEMU writes the device state (RAM stands still from the stop
        // on), and protects again what it could not copy by then.
        let pause_done = Arc::new(crate::live::PauseDone::default());
        let protecting = live.take().map(|mut l| {
            let pause_done = pause_done.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("thaw-live-pause".into())
                .spawn(move || {
                    let r = l.protect_until(&pause_done);
                    let _ = tx.send((l, r));
                });
            (rx, spawned)
        });
        let device_state = write_device_state(&mut qmp, &state, &paths, &mut writer, paused).await;
        pause_done.set();
        if let Some((task, spawned)) = protecting {
            let failed = |e: String| SaveError::Io {
                context: "protecting guest RAM in the pause".into(),
                source: std::io::Error::other(e),
            };
            spawned.map_err(|e| failed(e.to_string()))?;
            let (l, protected) = task
                .await
                .map_err(|_| failed("the pause copy thread ended early".into()))?;
            live = Some(l);
            protected?;
        }
        let (device_state_ms, device_state_bytes) = device_state?;
        let scanned = match &mut live {
            None => {
                let qemu = state.qemu().map_err(vmm::QemuError::from)?;
                let ram = vmm::find_ram(&qemu, &paths, &state)?;
                copy_ram(&qemu, &ram, &state.layout, &mut writer, &*opts.progress)?
            }
            Some(live) => {
                if was_running {
                    qmp.cont_after_migration().await?;
                }
                resumed = Some(paused.elapsed());
                let throttle = opts.copy_limit.map(Throttle::new);
                let w = &mut writer;
                live.copy(
                    |first, data| Ok(w.write_run(first, data)?),
                    throttle.as_ref(),
                    &*opts.progress,
                )?;
                live.stats().protected_pages * PAGE_SIZE
            }
        };
        Ok::<_, SaveError>((device_state_ms, device_state_bytes, scanned))
    }
    .await;
    let mut written_pages = Vec::new();
    let live_stats = match (result.is_ok(), live.take()) {
        (true, Some(l)) => match l.finish() {
            Ok((stats, written)) => {
                written_pages = written;
                Some(stats)
            }
            Err(e) => {
                drop(writer);
                return Err(e.into());
            }
        },
        // Dropping a failed live copy releases every held write.
        (false, Some(l)) => {
            drop(l);
            None
        }
        (_, None) => None,
    };
    let (device_state_ms, device_state_bytes, scanned) = match result {
        Ok(v) => v,
        Err(e) => {
            drop(writer);
            if resumed.is_none() {
                resume_after_failure(&mut qmp, was_running).await;
            }
            return Err(e);
        }
    };
    let summary = match writer.finish(ImageInfo {
        qemu_version: state.qemu_version.clone(),
        accel: state.accel.clone(),
        vm: state.config.clone(),
        libvirt,
    }) {
        Ok(s) => s,
        Err(e) => {
            if resumed.is_none() {
                resume_after_failure(&mut qmp, was_running).await;
            }
            return Err(e.into());
        }
    };
    *written = true;
    if live_stats.is_some() {
        // QEMU may die while a live copy runs: the copy still completes
        // the instant's image (nothing can write guest RAM any more), but
        // the VM is gone and the caller must hear so.
        vmm::ensure_alive(&state.qemu().map_err(vmm::QemuError::from)?)?;
    }
    let working_sets = attach_estimates(&paths, image, state.layout.total_pages());
    let paused_ms = ms(resumed.unwrap_or_else(|| paused.elapsed()));
    let resumed_at = paused_at + paused_ms;
    if opts.keep_running {
        if was_running && !opts.leave_paused && resumed.is_none() {
            qmp.cont_after_migration().await?;
        }
    } else {
        drop(qmp);
        vmm::stop(&paths, &state, false).await?;
    }
    Ok(SaveReport {
        name: name.to_string(),
        image: image.to_path_buf(),
        ram_bytes: state.layout.total_bytes(),
        nonzero_pages: summary.nonzero_pages,
        data_bytes_scanned: scanned,
        device_state_bytes,
        device_state_ms,
        paused_ms,
        paused_at_unix_ms: paused_at,
        resumed_at_unix_ms: resumed_at,
        method: if live_stats.is_some() {
            SaveMethod::Live
        } else {
            SaveMethod::StopAndCopy
        },
        live: live_stats,
        total_ms: ms(started.elapsed()),
        was_running,
        working_sets,
        parent: opts.parent.clone(),
        inherited_pages: summary.inherited_pages,
        written_pages,
    })
}

/// Sets a live copy up while the guest still runs: takes over a
/// userfaultfd in QEMU, closes QEMU's copy (a dying thaw must release the
/// guest), opens the RAM files and registers guest RAM.
async fn start_live(
    qmp: &mut Qmp,
    state: &VmState,
    paths: &VmPaths,
    writer: &ImageWriter,
    opts: &SaveOptions,
) -> Result<LiveCopy, SaveError> {
    let qemu = state.qemu().map_err(vmm::QemuError::from)?;
    let ram = vmm::find_ram(&qemu, paths, state)?;
    let mut ranges = Vec::new();
    for (m, block) in ram.iter().zip(&state.layout.blocks) {
        let file = File::open(&m.fd_path).map_err(|source| SaveError::ReadRam {
            id: m.id.clone(),
            path: m.fd_path.clone(),
            source,
        })?;
        ranges.push(LiveRange {
            id: m.id.clone(),
            start: m.start,
            len: m.len.min(block.size),
            first_page: block.first_page,
            file,
        });
    }
    // Opened through /proc/<pid>/fd while QEMU was alive: QEMU's files.
    vmm::ensure_alive(&qemu)?;
    let uffd = crate::ops::restore::take_over_uffd(state, qmp, &qemu, crate::live::FEATURES)
        .await
        .map_err(|e| SaveError::TakeOver(e.to_string()))?;
    uffd.close_remote().map_err(crate::live::LiveError::from)?;
    let scratch = writer.scratch_file()?;
    let speculation = speculation(opts, paths, state.layout.total_pages());
    Ok(LiveCopy::start(
        Arc::new(uffd),
        ranges,
        scratch,
        state.layout.total_pages(),
        &speculation,
    )?)
}

/// A live save's speculative pre-copy: the caller's prediction, else a
/// write tracker's estimate of this VM not older than
/// [`ESTIMATE_MAX_AGE`], else only what the guest writes while RAM is
/// being protected.
fn speculation(opts: &SaveOptions, paths: &VmPaths, total_pages: u64) -> Speculation {
    let budget_pages = opts
        .speculate
        .pages
        .unwrap_or(crate::live::DEFAULT_SPECULATE_PAGES);
    if budget_pages == 0 {
        return Speculation {
            source: "off",
            ..Speculation::default()
        };
    }
    let (predicted, source) = match &opts.predicted {
        Some((p, source)) => (p.clone(), *source),
        None => fresh_dirty_estimate(paths, total_pages),
    };
    Speculation {
        predicted,
        budget_pages,
        source,
        in_pause: opts.speculate.in_pause,
    }
}

/// The estimate of a `thaw track --estimator dirty` of this VM, if one
/// is younger than [`ESTIMATE_MAX_AGE`], as a prediction of writes.
fn fresh_dirty_estimate(paths: &VmPaths, total_pages: u64) -> (Vec<PageIndex>, &'static str) {
    let path = wss::estimate_path(&paths.dir, Estimator::Dirty);
    let fresh = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age <= ESTIMATE_MAX_AGE));
    if !fresh {
        return (Vec::new(), "none");
    }
    match wss::read_estimate(&path, total_pages) {
        Ok(Some(p)) => {
            log::debug!(
                "predicting writes from the dirty estimate ({} pages)",
                p.len()
            );
            (p, "dirty-estimate")
        }
        Ok(None) => (Vec::new(), "none"),
        Err(e) => {
            log::warn!("not predicting writes from the dirty estimate: {e}");
            (Vec::new(), "none")
        }
    }
}

/// Stores the estimates running trackers keep for this VM (`thaw track`)
/// as working sets of the new image. A missing or bad estimate only costs
/// its working set, never the save.
fn attach_estimates(paths: &VmPaths, image: &Path, max_pages: u64) -> Vec<Estimator> {
    let mut attached = Vec::new();
    for estimator in [Estimator::Abit, Estimator::Dirty] {
        let path = wss::estimate_path(&paths.dir, estimator);
        let pages = match wss::read_estimate(&path, max_pages) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("ignoring the {} estimate: {e}", estimator.name());
                continue;
            }
        };
        let stored = crate::image::Image::open(image)
            .map_err(wss::WsError::from)
            .and_then(|img| wss::write(&img, &wss::WorkingSet::from_touches(estimator, &pages)));
        match stored {
            Ok(_) => attached.push(estimator),
            Err(e) => log::warn!("could not store the {} working set: {e}", estimator.name()),
        }
    }
    attached
}

async fn resume_after_failure(qmp: &mut Qmp, was_running: bool) {
    if was_running {
        match qmp.cont_after_migration().await {
            Ok(_) => log::warn!("save failed; the VM was resumed"),
            Err(e) => log::error!("save failed and resuming the VM failed too: {e}"),
        }
    }
}

/// The device state through QEMU (`x-ignore-shared`: no guest RAM);
/// returns its time since the pause and its size.
async fn write_device_state(
    qmp: &mut Qmp,
    state: &VmState,
    paths: &VmPaths,
    writer: &mut ImageWriter,
    paused: Instant,
) -> Result<(f64, u64), SaveError> {
    let device_file = writer.device_state_file()?;
    let mark = match state.libvirt {
        Some(_) => Some(
            vmm::libvirt::IgnoreSharedMark::set(&paths.dir)
                .map_err(|e| vmm::QemuError::Libvirt(e.to_string()))?,
        ),
        None => None,
    };
    let migrated = async {
        qmp.set_migration_capabilities(&["x-ignore-shared", "events"])
            .await?;
        qmp.execute_with_fd(
            "getfd",
            json!({ "fdname": "thaw-save" }),
            device_file.as_fd(),
        )
        .await?;
        qmp.execute("migrate", json!({ "uri": "fd:thaw-save" }))
            .await?;
        qmp.wait_migration(DEVICE_STATE_TIMEOUT).await?;
        crate::failpoint::check("save-device-state").map_err(|source| SaveError::Io {
            context: "device state".into(),
            source,
        })
    }
    .await;
    // Off again whatever happened: left on, a later save that is not
    // thaw's would leave guest RAM out.
    let cleared = qmp.clear_ignore_shared().await;
    if let (Ok(()), Some(mark)) = (&cleared, mark) {
        mark.clear();
    }
    migrated?;
    cleared?;
    let device_state_ms = ms(paused.elapsed());
    let device_state_bytes = device_file
        .metadata()
        .map_err(|source| SaveError::Io {
            context: "device state".into(),
            source,
        })?
        .len();
    log::info!("device state: {device_state_bytes} bytes in {device_state_ms:.1} ms");

    Ok((device_state_ms, device_state_bytes))
}

/// Copies every data extent of every RAM file into the image; holes are
/// zero pages and are never read. Returns the bytes scanned.
fn copy_ram(
    qemu: &crate::remote::process::QemuProcess,
    ram: &[RamMapping],
    layout: &RamLayout,
    writer: &mut ImageWriter,
    progress: &dyn crate::progress::Progress,
) -> Result<u64, SaveError> {
    let mut files = Vec::new();
    for (m, block) in ram.iter().zip(&layout.blocks) {
        let file = File::open(&m.fd_path).map_err(|source| SaveError::ReadRam {
            id: m.id.clone(),
            path: m.fd_path.clone(),
            source,
        })?;
        let extents =
            crate::mem::data_extents(&file, block.size).map_err(|source| SaveError::ReadRam {
                id: m.id.clone(),
                path: m.fd_path.clone(),
                source,
            })?;
        files.push((file, extents));
    }
    // Opened through /proc/<pid>/fd while QEMU was alive: QEMU's files.
    vmm::ensure_alive(qemu)?;
    let memory = map_guest_ram(&files, layout)?;
    let total: u64 = files
        .iter()
        .flat_map(|(_, e)| e.iter().map(|r| r.1 - r.0))
        .sum();
    progress.start("RAM", total);
    let mut buf = vec![0u8; READ_BLOCK];
    for ((_, extents), block) in files.iter().zip(&layout.blocks) {
        let base = block.first_page * PAGE_SIZE;
        for &(start, end) in extents {
            let mut off = start;
            while off < end {
                let len = usize_from((end - off).min(u64_from(READ_BLOCK)));
                memory
                    .read_slice(&mut buf[..len], GuestAddress(base + off))
                    .map_err(|e| SaveError::Map(format!("reading {}+{off:#x}: {e}", block.id)))?;
                writer.write_run(PageIndex((base + off) / PAGE_SIZE), &buf[..len])?;
                off += len as u64;
                progress.advance(len as u64);
            }
        }
    }
    progress.finish();
    Ok(total)
}

/// Maps each RAM file read-only into thaw, at the guest-RAM offsets of the
/// layout (block after block), as one `GuestMemoryMmap`.
fn map_guest_ram(
    files: &[(File, Vec<(u64, u64)>)],
    layout: &RamLayout,
) -> Result<GuestMemoryMmap, SaveError> {
    let mut regions = Vec::new();
    for ((file, _), block) in files.iter().zip(&layout.blocks) {
        let file = file.try_clone().map_err(|source| SaveError::Io {
            context: "duplicating RAM fd".into(),
            source,
        })?;
        let region = MmapRegionBuilder::new(usize_from(block.size))
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SaveError::Map(format!("{}: {e}", block.id)))?;
        let region = GuestRegionMmap::new(region, GuestAddress(block.first_page * PAGE_SIZE))
            .ok_or_else(|| SaveError::Map(format!("{}: invalid region", block.id)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SaveError::Map(e.to_string()))
}

/// Now, in ms since the Unix epoch.
fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
