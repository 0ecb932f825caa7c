//! `thaw recover NAME`: finishes a restore whose thaw process died.
//!
//! While pages are missing, QEMU keeps its own copy of the userfaultfd open
//! (DESIGN.md, invariant 2), so a dead thaw leaves the guest blocked on its
//! faults, never reading a hole as zeros. The restore's record in the runtime
//! directory (`restore.json`: image, QEMU's pid, the fd number inside QEMU)
//! lets a new thaw take that userfaultfd again with `pidfd_getfd` and carry
//! on from what the RAM files already hold:
//!
//! - guest running: every page present in a RAM file was installed (or
//!   prefetched into the page cache) whole by the dead thaw and is kept;
//!   every thread that waits on a fault is woken, so that faults whose
//!   messages died with the old thaw are raised again; then faults are
//!   served and the rest is filled, as in a lazy restore;
//! - guest never resumed (thaw died while prefetching or in an eager fill):
//!   the rest is filled and then the guest resumed; after a `ws` restore
//!   the RAM files are emptied first (the prefetcher writes into the page
//!   cache, a kill can leave a page half written), which is safe since the
//!   guest has not run since its device state was loaded;
//! - QEMU still loading the device state: that stream died with thaw, so
//!   QEMU is stopped and the image must be restored again (nothing of the
//!   image is lost).

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::discard::DISCARD_LOG;
use crate::engine::faults::EventDrainer;
use crate::engine::Engine;
use crate::image::Image;
use crate::ops::restore::{
    block_maps, check_layout, drop_early_pages, finish_fill, ms, unregister, Mode, RecoveryRecord,
    RestoreError, RECORD_FILE,
};
use crate::remote::uffd;
use crate::vmm::{self, VmPaths, VmState};

/// What `thaw recover` did; its `--json` output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecoverStats {
    pub name: String,
    pub image: PathBuf,
    pub mode: Mode,
    /// The guest had run before thaw died (else the restore was redone
    /// from its device state on).
    pub guest_was_running: bool,
    /// The dead restore had already finished (only its record was left).
    pub already_complete: bool,
    /// Non-zero pages the RAM files already held.
    pub pages_kept: u64,
    /// Pages the guest had discarded during the dead restore (kept as
    /// holes, not refilled).
    pub discarded_pages: u64,
    /// Pages recovery installed: on demand and in the background.
    pub faults: u64,
    pub background_pages: u64,
    pub bytes_read: u64,
    /// Command start → all RAM resident and QEMU's userfaultfd released.
    pub complete_ms: f64,
}

impl std::fmt::Display for RecoverStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.already_complete {
            return write!(
                f,
                "{}: the restore had already completed; removed its stale record",
                self.name
            );
        }
        write!(
            f,
            "recovered {} ({} restore of {}): guest {}, {} pages kept, {} faults, \
             {} pages filled, {:.1} MiB read, all RAM resident after {:.0} ms",
            self.name,
            serde_json::to_value(self.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            self.image.display(),
            if self.guest_was_running {
                "was running"
            } else {
                "had not run yet (restore redone)"
            },
            self.pages_kept,
            self.faults,
            self.background_pages,
            self.bytes_read as f64 / (1 << 20) as f64,
            self.complete_ms
        )
    }
}

/// Finishes the interrupted restore of VM `name`.
pub async fn recover(
    name: &str,
    progress: crate::progress::SharedProgress,
) -> Result<RecoverStats, RestoreError> {
    let started = Instant::now();
    let (paths, state) = VmState::load(name)?;
    let record_path = paths.dir.join(RECORD_FILE);
    let record: RecoveryRecord = match std::fs::read(&record_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RestoreError::Io {
            context: format!("reading {}", record_path.display()),
            source: std::io::Error::other(e),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RestoreError::NothingToRecover(name.to_string()))
        }
        Err(source) => {
            return Err(RestoreError::Io {
                context: format!("reading {}", record_path.display()),
                source,
            })
        }
    };
    // A live restore holds the VM's lock; a dead one released it.
    let _lock = crate::ops::owner::OwnerLock::acquire(&paths, "recover")?;
    if record.qemu_pid != state.qemu_pid {
        let _ = std::fs::remove_file(&record_path);
        return Err(RestoreError::NothingToRecover(name.to_string()));
    }
    let mut stats = RecoverStats {
        name: name.to_string(),
        image: record.image.clone(),
        mode: record.mode,
        guest_was_running: false,
        already_complete: false,
        pages_kept: 0,
        discarded_pages: 0,
        faults: 0,
        background_pages: 0,
        bytes_read: 0,
        complete_ms: 0.0,
    };
    let pid = state.qemu().map_err(vmm::QemuError::from)?;
    let uffd = match uffd::reattach(&pid, record.uffd_fd_in_qemu) {
        Ok(u) => Arc::new(u),
        // QEMU's copy is closed only once every page is resident: the dead
        // thaw had finished and only its record was left.
        Err(uffd::UffdError::NotUserfaultfd { .. })
        | Err(uffd::UffdError::GetFd {
            errno: nix::errno::Errno::EBADF,
            ..
        }) => {
            log::info!("QEMU holds no userfaultfd at fd {}", record.uffd_fd_in_qemu);
            let _ = std::fs::remove_file(&record_path);
            stats.already_complete = true;
            stats.guest_was_running = true;
            return Ok(stats);
        }
        Err(e) => return Err(e.into()),
    };
    // QEMU may be blocked in a guest discard until its remove event is
    // read (and answer no QMP meanwhile): read events until the engine
    // serves them.
    let drainer = EventDrainer::start(uffd.clone())?;
    // A guest the dead restore resumed owns what RAM holds, even when it
    // is paused now (the user paused it, or thaw died right before `cont`).
    // Its vCPUs may wait for pages, and so may QEMU's monitor when a device
    // touched a missing page under QEMU's lock (a restore whose object
    // store stopped answering leaves that more often than a dead thaw):
    // its faults are served before QEMU is asked anything.
    let resumed_on_record = record.resumed;
    let mut qmp = None;
    if !resumed_on_record {
        qmp = Some(query_run_state(name, &paths, &state, &record_path, &mut stats).await?);
    }
    let resumed = stats.guest_was_running || resumed_on_record;
    let image = Arc::new(Image::open(&record.image)?);
    check_layout(&image.meta().layout, &state.layout)?;
    let ram = vmm::find_ram(&pid, &paths, &state)?;
    let blocks = block_maps(&pid, &ram, &state.layout)?;
    if !resumed && record.mode == Mode::Ws {
        // The working-set prefetch writes into the page cache, which a kill
        // can interrupt mid-page. Nothing has run since the device state
        // was loaded: what the dead thaw left goes, every page comes from
        // the image again. (Eager and lazy restores install whole pages
        // with UFFDIO_COPY only: those are kept.)
        drop_early_pages(&ram, &blocks)?;
    }
    // The guest's own discards, as the dead restore logged them: holes
    // that must stay holes. Later ones go on in the same log.
    let discards_path = paths.dir.join(DISCARD_LOG);
    let logged = match std::fs::read(&discards_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(RestoreError::Io {
                context: format!("reading {}", discards_path.display()),
                source,
            })
        }
    };
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&discards_path)
        .map_err(|source| RestoreError::Io {
            context: format!("opening {}", discards_path.display()),
            source,
        })?;
    let engine = Arc::new(Engine::new(image.clone(), uffd.clone(), blocks).with_discard_log(log));
    stats.discarded_pages = engine.adopt_discards(&logged);
    engine.replay_removes(&drainer.finish()?)?;
    stats.pages_kept = engine
        .adopt_resident_pages()
        .map_err(|source| RestoreError::Io {
            context: "reading which guest pages the RAM files hold".into(),
            source,
        })?;
    // Threads whose fault messages died with the old thaw wait on pages
    // that may be resident by now: wake them all; a missing page faults
    // again and reaches the new fault thread.
    for m in &ram {
        uffd.wake(m.start, m.len)?;
    }
    let service = engine.start(0)?;
    let mut qmp = match qmp {
        Some(q) => q,
        None => match query_run_state(name, &paths, &state, &record_path, &mut stats).await {
            Ok(q) => q,
            Err(e) => {
                let _ = service.stop(&engine);
                return Err(e);
            }
        },
    };
    let bar = progress;
    bar.start(
        "recover",
        image.meta().nonzero_pages * crate::mem::PAGE_SIZE,
    );
    let outcome = async {
        if resumed {
            engine.set_resumed();
        }
        let filler = engine.start_fill(bar.clone())?;
        finish_fill(filler, &engine).await?;
        unregister(&uffd, &ram, &engine)?;
        if !resumed {
            qmp.execute("cont", json!({})).await?;
        } else if !stats.guest_was_running {
            let how = if state.libvirt.is_some() {
                format!("virsh resume {name}")
            } else {
                format!("thaw qmp {name} cont")
            };
            log::warn!("VM {name} stays paused as it was (resume it with `{how}`)");
        }
        Ok::<_, RestoreError>(())
    }
    .await;
    let stopped = service.stop(&engine);
    bar.finish();
    // A thread's own error explains a failed phase better than the phase.
    stopped?;
    outcome?;
    if let Err(e) = uffd.close_remote() {
        log::warn!("could not close the userfaultfd inside QEMU: {e}");
    }
    let _ = std::fs::remove_file(&record_path);
    let _ = std::fs::remove_file(&discards_path);
    let c = &engine.counters;
    use std::sync::atomic::Ordering::Relaxed;
    stats.faults = c.faults_after_resume.load(Relaxed) + c.faults_before_resume.load(Relaxed);
    stats.background_pages = c.fill_pages.load(Relaxed);
    stats.bytes_read = c.bytes_read.load(Relaxed);
    stats.complete_ms = ms(started.elapsed());
    Ok(stats)
}

/// Connects to QEMU's monitor and checks the state a recovery can take
/// over (noted in `stats`); QEMU still loading the device state is
/// stopped (the restore is redone from the image).
async fn query_run_state(
    name: &str,
    paths: &VmPaths,
    state: &vmm::VmState,
    record_path: &std::path::Path,
    stats: &mut RecoverStats,
) -> Result<vmm::Qmp, RestoreError> {
    let mut qmp = state.monitor(paths).await?;
    let run_state = qmp.run_state().await?;
    log::info!("recovering {name}: QEMU {} is {run_state}", state.qemu_pid);
    match run_state.as_str() {
        "running" => stats.guest_was_running = true,
        "paused" => {}
        "inmigrate" | "prelaunch" => {
            drop(qmp);
            vmm::stop(paths, state, true).await?;
            let _ = std::fs::remove_file(record_path);
            return Err(RestoreError::DiedLoading(name.to_string()));
        }
        other => {
            return Err(RestoreError::Unrecoverable(
                name.to_string(),
                other.to_string(),
            ))
        }
    }
    // The dead restore may have left x-ignore-shared on.
    if vmm::libvirt::IgnoreSharedMark::present(&paths.dir) {
        qmp.clear_ignore_shared().await?;
        vmm::libvirt::IgnoreSharedMark::remove(&paths.dir);
    }
    Ok(qmp)
}

/// Where a VM's restore stands, from its runtime directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreProgress {
    /// No restore on record.
    None,
    /// A thaw process is serving it.
    Running,
    /// Its thaw died: `thaw recover` finishes it.
    Interrupted,
}

/// Where the restore of the VM at `paths` stands (`thaw status`).
pub fn progress(paths: &VmPaths) -> RestoreProgress {
    if !paths.dir.join(RECORD_FILE).exists() {
        return RestoreProgress::None;
    }
    match crate::ops::owner::OwnerLock::holder(paths) {
        Ok(Some(h)) if !h.serves_restore() && h.pid != 0 => RestoreProgress::Interrupted,
        Ok(None) => RestoreProgress::Interrupted,
        _ => RestoreProgress::Running,
    }
}
