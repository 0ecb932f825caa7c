//! `thaw restore`: start QEMU from an image's config with empty RAM and
//! `-incoming defer -S`, take over its userfaultfd, register guest RAM, load
//! the verified device state, then either install every page before `cont`
//! (eager) or `cont` at once and let the [`engine`] serve faults while it
//! fills the rest in the background (lazy). Returns when all RAM is resident,
//! leaving a normal thaw VM running.

pub mod engine;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::image::Image;
use crate::mem::{RamLayout, PAGE_SIZE};
use crate::qemu::{self, Launched, RamMapping};
use crate::uffd;
use engine::{BlockMap, Engine};

/// How long QEMU may take to load the device state.
const DEVICE_LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// How RAM is brought back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Install every non-zero page, then resume the guest.
    Eager,
    /// Resume at once; serve first touches on demand, fill the rest behind.
    Lazy,
}

/// Options of `thaw restore`.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub mode: Mode,
    /// Run the VM under this name instead of the saved one.
    pub name: Option<String>,
}

/// Errors restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error(transparent)]
    Qmp(#[from] qemu::QmpError),
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    #[error("the image's RAM layout {saved} does not match what QEMU created: {actual}")]
    LayoutMismatch { saved: String, actual: String },
    #[error("restore failed, the VM was stopped: {0}")]
    Engine(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// What a restore did; the `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreStats {
    pub name: String,
    pub mode: Mode,
    pub ram_bytes: u64,
    pub nonzero_pages: u64,
    /// Command start → QEMU up with empty RAM.
    pub launch_ms: f64,
    /// Command start → guest running.
    pub resume_ms: f64,
    /// Loading the device state (migrate-incoming → completed).
    pub device_state_ms: f64,
    /// Non-zero pages resident when the guest resumed.
    pub prefetched_pages: u64,
    /// Pages served on demand after the guest resumed.
    pub faults: u64,
    /// Pages QEMU faulted on while loading the device state.
    pub faults_before_resume: u64,
    /// Faults on all-zero pages (answered with a zero page, never read).
    pub zero_page_faults: u64,
    /// Pages the background filler installed after the guest resumed.
    pub background_pages: u64,
    /// Command start → all RAM resident.
    pub complete_ms: f64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub bytes_read: u64,
    /// Background fill rate over the fill phase, MiB/s.
    pub fill_mib_per_s: f64,
}

impl std::fmt::Display for RestoreStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "restored {} ({:?}): {} MiB RAM, {} non-zero pages",
            self.name,
            self.mode,
            self.ram_bytes >> 20,
            self.nonzero_pages
        )?;
        writeln!(
            f,
            "  guest running after   {:>9.1} ms (QEMU up {:.1} ms, device state {:.1} ms)",
            self.resume_ms, self.launch_ms, self.device_state_ms
        )?;
        writeln!(
            f,
            "  all RAM resident after{:>9.1} ms (fill {:.0} MiB/s)",
            self.complete_ms, self.fill_mib_per_s
        )?;
        writeln!(
            f,
            "  pages: {} prefetched, {} on-demand faults ({} zero), {} background",
            self.prefetched_pages, self.faults, self.zero_page_faults, self.background_pages
        )?;
        write!(
            f,
            "  fault service: p50 {:.1} us, p99 {:.1} us",
            self.fault_p50_us, self.fault_p99_us
        )
    }
}

/// What a restore leaves in the runtime directory so another thaw can take
/// QEMU's userfaultfd again (`pidfd_getfd`) if this one dies.
#[derive(Serialize)]
struct RecoveryRecord {
    image: PathBuf,
    qemu_pid: i32,
    uffd_fd_in_qemu: i32,
    mode: Mode,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Restores the image at `path`; see the module documentation.
pub async fn restore(path: &Path, opts: &RestoreOptions) -> Result<RestoreStats, RestoreError> {
    let started = Instant::now();
    let image = Arc::new(Image::open(path)?);
    // Structure and device state are verified before anything starts.
    let device_state = image.read_device_state()?;
    let meta = image.meta().clone();
    let mut cfg = meta.vm.clone();
    if let Some(name) = &opts.name {
        crate::config::validate_name(name).map_err(|m| RestoreError::Io {
            context: "--name".into(),
            source: std::io::Error::other(m),
        })?;
        cfg.name = name.clone();
    }
    let launched = qemu::launch(&cfg, &meta.accel, true).await?;
    let launch_ms = ms(started.elapsed());
    let pid = launched.state.qemu_pid;
    let (paths, state) = (launched.paths.clone(), launched.state.clone());
    match run(launched, image, device_state, opts, started, launch_ms).await {
        Ok(stats) => Ok(stats),
        Err(e) => {
            log::error!("restore failed; stopping QEMU (pid {pid})");
            let _ = qemu::stop(&paths, &state, true).await;
            Err(e)
        }
    }
}

async fn run(
    launched: Launched,
    image: Arc<Image>,
    device_state: Vec<u8>,
    opts: &RestoreOptions,
    started: Instant,
    launch_ms: f64,
) -> Result<RestoreStats, RestoreError> {
    let Launched {
        paths,
        state,
        mut qmp,
    } = launched;
    let meta = image.meta().clone();
    check_layout(&meta.layout, &state.layout)?;
    let ram = qemu::find_ram(state.qemu_pid, &paths, &state.layout)?;

    // Take over QEMU's userfaultfd and register all guest RAM before
    // anything can touch it.
    let uffd = Arc::new(uffd::take_over(
        nix::unistd::Pid::from_raw(state.qemu_pid),
        userfaultfd_sys::UFFD_FEATURE_MISSING_SHMEM,
    )?);
    for m in &ram {
        uffd.register_missing(m.start, m.len)?;
    }
    drop_early_pages(&ram)?;
    let record = RecoveryRecord {
        image: std::fs::canonicalize(image.dir()).unwrap_or_else(|_| image.dir().to_path_buf()),
        qemu_pid: state.qemu_pid,
        uffd_fd_in_qemu: uffd.remote_fd(),
        mode: opts.mode,
    };
    let record_path = paths.dir.join("restore.json");
    write_record(&record_path, &record)?;

    let blocks: Vec<BlockMap> = ram
        .iter()
        .zip(&state.layout.blocks)
        .map(|(m, b)| BlockMap {
            start: m.start,
            first_page: b.first_page,
            pages: b.pages(),
        })
        .collect();
    let engine = Arc::new(Engine::new(image.clone(), uffd.clone(), blocks));
    let latency_capacity = (meta.total_pages as usize).min(1 << 22);
    let faults = {
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("thaw-faults".into())
            .spawn(move || engine.serve_faults(latency_capacity))
            .map_err(|source| RestoreError::Io {
                context: "spawning the fault thread".into(),
                source,
            })?
    };
    let bar = crate::progress::bytes_bar(meta.nonzero_pages * PAGE_SIZE, "restore");
    let spawn_filler = |engine: Arc<Engine>, bar: indicatif::ProgressBar| {
        std::thread::Builder::new()
            .name("thaw-fill".into())
            .spawn(move || {
                let t = Instant::now();
                let r = engine.fill(&bar);
                (r, t.elapsed())
            })
            .map_err(|source| RestoreError::Io {
                context: "spawning the filler".into(),
                source,
            })
    };

    let outcome = async {
        let mut filler = None;
        if opts.mode == Mode::Eager {
            filler = Some(spawn_filler(engine.clone(), bar.clone())?);
        }
        let device_state_ms = load_device_state(&mut qmp, device_state).await?;
        let mut fill_time = Duration::ZERO;
        if let Some(f) = filler.take() {
            fill_time = finish_fill(f, &engine).await?;
            // Every non-zero page is in; the holes left are the zero pages,
            // which read as zeros once unregistered: the guest runs without
            // thaw in its way.
            unregister(&uffd, &ram)?;
        }
        let prefetched = meta.nonzero_pages - engine.remaining();
        engine.set_resumed();
        qmp.execute("cont", json!({})).await?;
        let resume_ms = ms(started.elapsed());
        log::info!("guest resumed after {resume_ms:.1} ms with {prefetched} pages resident");
        if opts.mode == Mode::Lazy {
            let f = spawn_filler(engine.clone(), bar.clone())?;
            fill_time = finish_fill(f, &engine).await?;
            unregister(&uffd, &ram)?;
        }
        Ok::<_, RestoreError>((device_state_ms, prefetched, resume_ms, fill_time))
    }
    .await;
    engine.request_stop();
    let latencies = faults.join().unwrap_or_default();
    bar.finish_and_clear();
    if let Some(msg) = engine.failure() {
        return Err(RestoreError::Engine(msg));
    }
    let (device_state_ms, prefetched, resume_ms, fill_time) = outcome?;
    let complete_ms = ms(started.elapsed());
    if let Err(e) = uffd.close_remote() {
        log::warn!("could not close the userfaultfd inside QEMU: {e}");
    }
    let _ = std::fs::remove_file(&record_path);

    let c = &engine.counters;
    let fill_pages = c.fill_pages.load(Ordering::Relaxed);
    let (p50, p99) = percentiles(latencies);
    Ok(RestoreStats {
        name: state.config.name.clone(),
        mode: opts.mode,
        ram_bytes: meta.layout.total_bytes(),
        nonzero_pages: meta.nonzero_pages,
        launch_ms,
        resume_ms,
        device_state_ms,
        prefetched_pages: prefetched,
        faults: c.faults_after_resume.load(Ordering::Relaxed),
        faults_before_resume: c.faults_before_resume.load(Ordering::Relaxed),
        zero_page_faults: c.zero_faults.load(Ordering::Relaxed),
        background_pages: c.fill_pages_after_resume.load(Ordering::Relaxed),
        complete_ms,
        fault_p50_us: p50,
        fault_p99_us: p99,
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        fill_mib_per_s: (fill_pages * PAGE_SIZE) as f64
            / (1 << 20) as f64
            / fill_time.as_secs_f64().max(1e-9),
    })
}

/// Compares saved and launched layouts block by block.
fn check_layout(saved: &RamLayout, actual: &RamLayout) -> Result<(), RestoreError> {
    if saved != actual {
        let show = |l: &RamLayout| {
            l.blocks
                .iter()
                .map(|b| format!("{}={}M", b.id, b.size >> 20))
                .collect::<Vec<_>>()
                .join(",")
        };
        return Err(RestoreError::LayoutMismatch {
            saved: show(saved),
            actual: show(actual),
        });
    }
    Ok(())
}

/// Pages QEMU wrote into the fresh RAM files before registration would
/// shadow the saved ones (no fault would ever be raised for them). A normal
/// incoming migration overwrites all RAM, so dropping them is what QEMU
/// itself would end up with.
fn drop_early_pages(ram: &[RamMapping]) -> Result<(), RestoreError> {
    for m in ram {
        let file = File::options()
            .write(true)
            .open(&m.fd_path)
            .map_err(|source| RestoreError::Io {
                context: format!("opening {}", m.fd_path.display()),
                source,
            })?;
        let extents =
            crate::save::data_extents(&file, m.len).map_err(|source| RestoreError::Io {
                context: format!("scanning {}", m.fd_path.display()),
                source,
            })?;
        for (start, end) in extents {
            log::warn!(
                "RAM block {} had data at {start:#x}..{end:#x} before the restore; dropping it",
                m.id
            );
            nix::fcntl::fallocate(
                &file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                start as i64,
                (end - start) as i64,
            )
            .map_err(|e| RestoreError::Io {
                context: format!("punching {}", m.id),
                source: e.into(),
            })?;
        }
    }
    Ok(())
}

fn write_record(path: &Path, record: &RecoveryRecord) -> Result<(), RestoreError> {
    let io = |source| RestoreError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = qemu::create_private(path)?;
    let text = serde_json::to_vec_pretty(record).map_err(|e| io(std::io::Error::other(e)))?;
    f.write_all(&text).map_err(io)
}

/// Feeds the verified device state to QEMU through a pipe and waits until
/// QEMU has loaded it. Returns the load time in ms.
async fn load_device_state(qmp: &mut qemu::Qmp, data: Vec<u8>) -> Result<f64, RestoreError> {
    let io = |context: &str| {
        let context = context.to_string();
        move |source| RestoreError::Io { context, source }
    };
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| io("creating a pipe")(e.into()))?;
    qmp.set_migration_capabilities(&["x-ignore-shared", "events"])
        .await?;
    qmp.execute_with_fd("getfd", json!({ "fdname": "thaw-restore" }), rd.as_fd())
        .await?;
    drop(rd);
    let t = Instant::now();
    let writer = std::thread::Builder::new()
        .name("thaw-devstate".into())
        .spawn(move || File::from(wr).write_all(&data))
        .map_err(io("spawning the device-state writer"))?;
    qmp.execute("migrate-incoming", json!({ "uri": "fd:thaw-restore" }))
        .await?;
    let loaded = qmp.wait_migration(DEVICE_LOAD_TIMEOUT).await;
    let elapsed = ms(t.elapsed());
    let written = writer
        .join()
        .map_err(|_| RestoreError::Engine("device-state writer panicked".into()))?;
    loaded?;
    written.map_err(io("writing the device state to QEMU"))?;
    Ok(elapsed)
}

/// Waits for the filler, checks it installed every non-zero page; returns
/// how long it ran.
async fn finish_fill(
    filler: std::thread::JoinHandle<(Result<(), engine::EngineError>, Duration)>,
    engine: &Engine,
) -> Result<Duration, RestoreError> {
    wait_thread(&filler, engine).await?;
    let (result, took) = filler
        .join()
        .map_err(|_| RestoreError::Engine("the filler thread panicked".into()))?;
    result.map_err(|e| RestoreError::Engine(e.to_string()))?;
    if engine.remaining() != 0 {
        return Err(RestoreError::Engine(format!(
            "{} pages still missing after the fill",
            engine.remaining()
        )));
    }
    Ok(took)
}

/// Ends userfaultfd handling of guest RAM. Only once every non-zero page is
/// resident: the holes left then read as the zero pages they are.
fn unregister(uffd: &uffd::RemoteUffd, ram: &[RamMapping]) -> Result<(), RestoreError> {
    for m in ram {
        uffd.unregister(m.start, m.len)?;
    }
    Ok(())
}

/// Waits for a thread to finish while watching the engine for failures.
async fn wait_thread<T>(
    t: &std::thread::JoinHandle<T>,
    engine: &Engine,
) -> Result<(), RestoreError> {
    while !t.is_finished() {
        if let Some(msg) = engine.failure() {
            return Err(RestoreError::Engine(msg));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// p50 and p99 of fault service times, in µs.
fn percentiles(mut v: Vec<u32>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64;
    (at(0.50), at(0.99))
}
