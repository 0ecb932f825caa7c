//! `thaw bench`: restores one saved VM by every method side by side and
//! measures what users feel: time until the guest runs, time to
//! responsiveness ([`ttr`]), time until all RAM is resident, faults and
//! bytes read; next to this machine's limits ([`crate::limits`]).
//!
//! The guest must run the guest kit's workload in throughput mode
//! (`thaw.tput_ms=50`), which reports its own rate on the console. One run:
//! boot, warm up, measure the warm rate; `thaw track` abit and dirty
//! estimates when asked for; `thaw checkpoint` (the image, with the trace
//! working set); then with the VM paused, the stock artifacts: a full
//! migration stream (what `virsh save` writes) and a `mapped-ram` file;
//! one learning restore when `ws:learned` is asked for. Then every method is
//! restored in turn, `runs` rounds, from a cold page cache (`drop_caches`) and watched
//! for `settle` after its RAM is resident. With `--libvirt` the VM is a
//! libvirt domain and the stock methods are virsh's ([`libvirt`]).

pub mod app;
pub mod checkpoint;
pub mod console;
pub mod libvirt;
pub mod plot;
pub mod probe;
pub mod store;
pub mod ttr;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use app::{App, AppKind, AppReport, Client};
use console::ConsoleTail;
use probe::{ProbeSample, Prober};
use thaw::config::VmConfig;
use thaw::mem::PAGE_SIZE;
use thaw::ops::restore::{self, EstimatorChoice, LearnWindow, Mode, RestoreOptions};
use thaw::ops::track::{self, TrackOptions};
use thaw::vmm::{self, Qmp, VmState};
use thaw::wss::Estimator;
use ttr::{median, Sample};

/// How long a stock migration may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// Share of the warm rate that counts as responsive, and for how long.
pub const TTR_FRACTION: f64 = 0.9;
pub const TTR_HOLD_MS: f64 = 1000.0;
/// How long an application may take to reach a steady rate before the
/// save, and after a restore's RAM is all resident.
const APP_STEADY_TIMEOUT: Duration = Duration::from_secs(180);
/// Client passes wanted after all RAM is resident (the steady reference).
const STEADY_PASSES: usize = 5;
/// Round trips a restore from a store cannot avoid before the guest runs
/// (the manifest, then the files: a lookup and a read each, some at once),
/// counted in its floor.
const FLOOR_ROUND_TRIPS: f64 = 4.0;
/// Default period of the interactive probe.
pub const PROBE_PERIOD_MS: u64 = 100;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Config(#[from] thaw::config::ConfigError),
    #[error(transparent)]
    Qemu(#[from] vmm::QemuError),
    #[error(transparent)]
    Qmp(#[from] vmm::QmpError),
    #[error(transparent)]
    Restore(#[from] restore::RestoreError),
    #[error(transparent)]
    Checkpoint(#[from] thaw::ops::checkpoint::CheckpointError),
    #[error(transparent)]
    Track(#[from] track::TrackError),
    #[error(transparent)]
    Save(#[from] thaw::ops::save::SaveError),
    #[error(
        "unknown method {0:?}: use stock, mapped-ram, eager, lazy, lazy:learn or ws:<auto|learned|trace|abit|dirty>, each of eager, lazy and ws:* also as <method>@hot (with --libvirt: virsh, virsh-sparse instead of stock, mapped-ram)"
    )]
    Method(String),
    #[error("{0}")]
    Options(String),
    #[error("{0}")]
    Libvirt(String),
    #[error("{0}")]
    App(String),
    #[error(
        "the guest printed no THAW-TPUT reports within {0:?}: does its config set thaw.tput_ms?"
    )]
    NoThroughput(Duration),
    #[error("the restored guest is not intact after a {0}")]
    Integrity(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

/// A way to restore the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Stock QEMU: `migrate-incoming` of a full migration stream (RAM
    /// included), what `virsh restore` does.
    Stock,
    /// Stock QEMU: a `mapped-ram` file loaded by multifd threads.
    MappedRam,
    /// libvirt: `virsh save` + `virsh restore`.
    Virsh,
    /// libvirt ≥ 10: `virsh save --image-format sparse --parallel-channels N` +
    /// `virsh restore --parallel-channels N` (mapped-ram).
    VirshSparse,
    Eager,
    Lazy,
    /// A lazy restore that learns (what users run by default): its
    /// learning window's cost shows in the client's rate.
    LazyLearn,
    Ws(Estimator),
    /// `ws` with `--estimator auto`: the working set the image's evidence
    /// favours.
    WsAuto,
    /// A thaw method restored from a hot page cache (`eager@hot`,
    /// `ws:learned@hot`, ...): the image's files are read into the cache
    /// just before, with no `drop_caches`, so the restore reads from
    /// memory. The floor of a local-disk restore, side by side with it.
    Hot(HotBase),
}

/// The thaw methods that have a hot-cache variant ([`Method::Hot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotBase {
    Eager,
    Lazy,
    Ws(Estimator),
    WsAuto,
}

impl HotBase {
    /// The cold method this one restores like.
    pub fn method(self) -> Method {
        match self {
            HotBase::Eager => Method::Eager,
            HotBase::Lazy => Method::Lazy,
            HotBase::Ws(e) => Method::Ws(e),
            HotBase::WsAuto => Method::WsAuto,
        }
    }
}

impl Method {
    pub fn parse(text: &str) -> Result<Method, BenchError> {
        if let Some(base) = text.strip_suffix("@hot") {
            return Ok(Method::Hot(match Method::parse(base)? {
                Method::Eager => HotBase::Eager,
                Method::Lazy => HotBase::Lazy,
                Method::Ws(e) => HotBase::Ws(e),
                Method::WsAuto => HotBase::WsAuto,
                _ => return Err(BenchError::Method(text.to_string())),
            }));
        }
        Ok(match text {
            "stock" => Method::Stock,
            "mapped-ram" => Method::MappedRam,
            "virsh" => Method::Virsh,
            "virsh-sparse" => Method::VirshSparse,
            "eager" => Method::Eager,
            "lazy" => Method::Lazy,
            "lazy:learn" => Method::LazyLearn,
            "ws:auto" => Method::WsAuto,
            "ws:learned" => Method::Ws(Estimator::Learned),
            "ws:trace" => Method::Ws(Estimator::Trace),
            "ws:abit" => Method::Ws(Estimator::Abit),
            "ws:dirty" => Method::Ws(Estimator::Dirty),
            _ => return Err(BenchError::Method(text.to_string())),
        })
    }

    pub fn name(self) -> String {
        match self {
            Method::Stock => "stock".into(),
            Method::MappedRam => "mapped-ram".into(),
            Method::Virsh => "virsh".into(),
            Method::VirshSparse => "virsh-sparse".into(),
            Method::Eager => "eager".into(),
            Method::Lazy => "lazy".into(),
            Method::LazyLearn => "lazy:learn".into(),
            Method::WsAuto => "ws:auto".into(),
            Method::Ws(e) => format!("ws:{}", e.name()),
            Method::Hot(base) => format!("{}@hot", base.method().name()),
        }
    }

    /// Restored from a hot page cache (no `drop_caches` before it).
    fn hot_cache(self, opts: &BenchOptions) -> bool {
        opts.hot_cache || matches!(self, Method::Hot(_))
    }

    /// Every method, in the order they are reported.
    pub fn all() -> Vec<Method> {
        let mut all = vec![
            Method::Stock,
            Method::MappedRam,
            Method::Eager,
            Method::Lazy,
        ];
        all.extend(Estimator::PREFERENCE.iter().map(|&e| Method::Ws(e)));
        all
    }

    /// Every method of a libvirt bench: virsh's instead of QEMU's.
    pub fn all_libvirt() -> Vec<Method> {
        let mut all = vec![
            Method::Virsh,
            Method::VirshSparse,
            Method::Eager,
            Method::Lazy,
        ];
        all.extend(Estimator::PREFERENCE.iter().map(|&e| Method::Ws(e)));
        all
    }
}

/// What `thaw bench` runs.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The VM (guest kit workload in throughput mode).
    pub config: PathBuf,
    pub methods: Vec<Method>,
    /// Restores per method (medians are reported).
    pub runs: u32,
    /// Read limit for thaw's methods (emulated network storage).
    pub read_limit: Option<u64>,
    /// Pace thaw's background fill once the guest runs.
    pub fill_limit: Option<u64>,
    /// Warm-up before the warm rate is measured, and its measuring window.
    pub warmup: Duration,
    pub measure: Duration,
    /// How long each restored guest is watched after its RAM is resident.
    pub settle: Duration,
    /// Where the image and stock files go.
    pub dir: PathBuf,
    /// Measure this machine's limits after the restores (`thaw limits`).
    pub limits: bool,
    /// Interactive probe period (a `PROBE` request on the console); None:
    /// no probes.
    pub probe_period: Option<Duration>,
    /// Run the VM as a libvirt domain at this URI and compare with virsh.
    pub libvirt: Option<String>,
    /// A real application in the guest, measured by its own client
    /// instead of the workload's reports.
    pub app: Option<AppOptions>,
    /// Restore from a hot page cache (the image read into it before each
    /// restore, no `drop_caches`): the floor a local-disk restore is
    /// compared with.
    pub hot_cache: bool,
    /// Restore from an object store (`--store`): the image and the stock
    /// stream put there, every restore read from there.
    pub store: Option<store::StoreOptions>,
    /// The windows in which the working sets are recorded: the trace
    /// after the checkpoint (`ws:trace`) and the learning restore's
    /// (`ws:learned`).
    pub record_window: LearnWindow,
}

/// `--app`: which server the guest runs and how much data it holds.
#[derive(Clone, Debug)]
pub struct AppOptions {
    pub kind: AppKind,
    /// Bytes of values loaded, and of them the hot ones each pass reads.
    pub data: u64,
    pub hot: u64,
    /// `--app-spec`: the commands of a custom application.
    pub spec: Option<PathBuf>,
}

/// One restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MethodRun {
    pub method: String,
    pub run: u32,
    /// Restore start → guest running.
    pub running_ms: f64,
    /// Restore start → throughput back to 90 % of warm for 1 s.
    pub ttr_ms: Option<f64>,
    /// Restore start → all RAM resident.
    pub complete_ms: f64,
    pub faults: u64,
    pub bytes_read: u64,
    /// thaw methods: background fill rate and fault service p50 (µs).
    pub fill_mib_per_s: Option<f64>,
    pub fault_p50_us: Option<f64>,
    /// The guest's throughput reports after the restore.
    pub samples: Vec<Sample>,
    /// Its steady rate once all RAM was resident (median of the reports
    /// after that), the reference its TTR is measured against.
    #[serde(default, alias = "steady_mib_per_s")]
    pub steady_rate: Option<f64>,
    /// Interactive probes during the run (sent time from the restore's
    /// start, latency).
    #[serde(default)]
    pub probes: Vec<ProbeSample>,
    /// An application's client: when the server first answered (ms from
    /// the restore's start).
    #[serde(default)]
    pub first_answer_ms: Option<f64>,
    /// A learning restore: its window after all RAM was resident (ms),
    /// the faults thaw served in it and the pages first touched in it.
    #[serde(default)]
    pub learn_window_ms: Option<f64>,
    #[serde(default)]
    pub window_faults: Option<u64>,
    #[serde(default)]
    pub window_pages: Option<u64>,
    /// thaw methods: faults answered with a zero page (the page was zero
    /// in the image), and the working set prefetched (pages).
    #[serde(default)]
    pub zero_faults: Option<u64>,
    #[serde(default)]
    pub ws_pages: Option<u64>,
    /// `ws` under a read limit: the floor of its time to be usable, QEMU's
    /// start + the device state + the working set's data at the read
    /// limit (ms).
    #[serde(default)]
    pub floor_ms: Option<f64>,
    /// `--store`: what the restore read from the store (requests, bytes),
    /// metadata and pages together.
    #[serde(default)]
    pub store_fetched: Option<thaw::image::source::Fetched>,
}

impl MethodRun {
    /// A restore that read `file` whole before the guest ran (stock QEMU,
    /// virsh), now running: started at `t0`.
    pub fn stock(file: &Path, t0: Instant) -> MethodRun {
        let running_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // Allocated bytes: a mapped-ram file is sparse where RAM was zero.
        let bytes_read = std::fs::metadata(file)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        MethodRun {
            method: String::new(),
            run: 0,
            running_ms,
            ttr_ms: None,
            complete_ms: running_ms,
            faults: 0,
            bytes_read,
            fill_mib_per_s: None,
            fault_p50_us: None,
            samples: Vec::new(),
            steady_rate: None,
            probes: Vec::new(),
            first_answer_ms: None,
            learn_window_ms: None,
            window_faults: None,
            window_pages: None,
            zero_faults: None,
            ws_pages: None,
            floor_ms: None,
            store_fetched: None,
        }
    }

    /// When the guest first answered (ms from the restore's start): the
    /// application's client, or the first probe.
    pub fn first_answer(&self) -> Option<f64> {
        if self.first_answer_ms.is_some() {
            return self.first_answer_ms;
        }
        self.probes
            .iter()
            .map(|p| p.sent_ms + p.latency_ms)
            .min_by(f64::total_cmp)
    }

    /// A learning restore: the median rate of the work done wholly inside
    /// its learning window, as a share of its steady rate.
    pub fn window_rate_vs_steady(&self) -> Option<f64> {
        let window = self.learn_window_ms?;
        let from = self.complete_ms.max(self.running_ms);
        let inside = self
            .samples
            .iter()
            .filter(|s| s.at_ms - s.interval_ms >= from && s.at_ms <= from + window)
            .map(|s| s.rate);
        median(inside).zip(self.steady_rate).map(|(w, s)| w / s)
    }

    /// Probe latencies of the requests sent once the guest was running.
    pub fn probes_while_running(&self) -> probe::ProbeSummary {
        probe::summarize(&self.probes, self.running_ms)
    }
}

/// Medians per method.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MethodSummary {
    pub method: String,
    pub runs: usize,
    pub running_ms: Option<f64>,
    pub ttr_ms: Option<f64>,
    pub complete_ms: Option<f64>,
    pub faults: Option<f64>,
    pub bytes_read_mib: Option<f64>,
    /// Runs that never reached the TTR threshold while watched.
    pub without_ttr: usize,
    /// thaw methods: background fill rate and fault service p50 (µs)...
    #[serde(default)]
    pub fill_mib_per_s: Option<f64>,
    #[serde(default)]
    pub fault_p50_us: Option<f64>,
    /// ...as ratios to this machine's limits measured in the same run:
    /// fill / min(cold sequential read, `UFFDIO_COPY` in 4 MiB calls), and
    /// fault p50 / raw cross-process fault round trip p50.
    #[serde(default)]
    pub fill_vs_limit: Option<f64>,
    #[serde(default)]
    pub fault_p50_vs_round_trip: Option<f64>,
    /// Fault p50 / (one cold page read + that page's time at the read
    /// limit + the fault round trip): the floor of a fault that reads
    /// its own page.
    #[serde(default)]
    pub fault_p50_vs_page_floor: Option<f64>,
    /// First answer (ms from the restore's start) of the application's
    /// client or the interactive probe, and the probe's p50 / max latency
    /// of the requests sent once the guest ran.
    #[serde(default, alias = "probe_first_answer_ms")]
    pub first_answer_ms: Option<f64>,
    #[serde(default)]
    pub probe_p50_ms: Option<f64>,
    /// A learning restore: its window (ms) and the client's rate inside it
    /// as a share of the steady rate.
    #[serde(default)]
    pub learn_window_ms: Option<f64>,
    #[serde(default)]
    pub window_rate_vs_steady: Option<f64>,
    #[serde(default)]
    pub window_faults: Option<f64>,
    #[serde(default)]
    pub window_pages: Option<f64>,
    #[serde(default)]
    pub probe_max_ms: Option<f64>,
    /// Faults on pages saved with data (not zero in the image), the
    /// working set, and the share of the set those faults are.
    #[serde(default)]
    pub saved_page_faults: Option<f64>,
    #[serde(default)]
    pub ws_pages: Option<f64>,
    #[serde(default)]
    pub saved_faults_vs_ws: Option<f64>,
    /// `ws` under a read limit: its floor (see [`MethodRun::floor_ms`]) and
    /// TTR and first answer against it.
    #[serde(default)]
    pub floor_ms: Option<f64>,
    #[serde(default)]
    pub ttr_vs_floor: Option<f64>,
    #[serde(default)]
    pub first_answer_vs_floor: Option<f64>,
    /// `--store`: requests sent to the store and MiB received.
    #[serde(default)]
    pub store_requests: Option<f64>,
    #[serde(default)]
    pub store_mib: Option<f64>,
}

/// This machine's limits, measured in the same run (`thaw limits`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineLimits {
    pub seq_read_mib_per_s: f64,
    /// `UFFDIO_COPY` in 4 MiB calls (the filler's largest run).
    pub copy_4m_mib_per_s: f64,
    pub fault_round_trip_p50_us: f64,
    pub fault_round_trip_p99_us: f64,
    /// One cold 4 KiB read from the image's storage, p50 (µs).
    #[serde(default)]
    pub page_read_p50_us: f64,
}

/// The whole result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub vm: String,
    pub memory: String,
    pub nonzero_pages: u64,
    pub accel: String,
    pub read_limit: Option<u64>,
    /// thaw's background fill pace once the guest runs (`--fill-limit`).
    #[serde(default)]
    pub fill_limit: Option<u64>,
    /// Restored from a hot page cache (`--hot-cache`), not a cold one.
    #[serde(default)]
    pub hot_cache: bool,
    /// The warm rate before the save, in `rate_unit`.
    #[serde(alias = "warm_mib_per_s")]
    pub warm_rate: f64,
    /// Unit of every rate sample: MiB/s for the workload's own reports,
    /// requests/s for an application's client.
    #[serde(default = "mib_per_s")]
    pub rate_unit: String,
    /// Probe latency p50 of the warm VM before the save (ms).
    #[serde(default)]
    pub warm_probe_p50_ms: Option<f64>,
    #[serde(default)]
    pub probe_period_ms: Option<u64>,
    pub ttr_definition: String,
    /// None when `--no-limits`.
    #[serde(default)]
    pub limits: Option<MachineLimits>,
    pub summary: Vec<MethodSummary>,
    pub runs: Vec<MethodRun>,
    /// The libvirt URI when the VM ran as a libvirt domain.
    #[serde(default)]
    pub libvirt: Option<String>,
    /// The real application and its client, when the bench ran one.
    #[serde(default)]
    pub app: Option<AppReport>,
    /// `--store`: where the restores read from, and over what link.
    #[serde(default)]
    pub store: Option<store::StoreReport>,
    /// The windows that recorded the working sets (`--record-quiet-ms`,
    /// `--record-max-ms`): [quiet, max] in ms.
    #[serde(default)]
    pub record_window_ms: Option<[u64; 2]>,
}

fn mib_per_s() -> String {
    "MiB/s".into()
}

/// Runs the benchmark described by `opts`.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let cfg = VmConfig::load(&opts.config)?;
    let name = cfg.name.clone();
    let uri = opts.libvirt.as_deref();
    check_methods(opts)?;
    if let Ok((paths, state)) = VmState::load(&name) {
        vmm::stop(&paths, &state, true).await?;
    }
    if let Some(uri) = uri {
        libvirt::destroy(uri, &name)?;
    }
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("creating {}", opts.dir.display())))?;
    let image = opts.dir.join("thaw.img");
    let stock_file = opts.dir.join("stock.mig");
    let mapped_file = opts.dir.join("mapped-ram.mig");
    let virsh_file = opts.dir.join("virsh.save");
    let sparse_file = opts.dir.join("virsh-sparse.save");

    // Boot and warm up. The console log is appended to: this boot's
    // output starts at its current end.
    let accel = vmm::resolve_accel(&cfg)?;
    let boot_offset = cfg
        .serial
        .clone()
        .or_else(|| {
            uri.is_none()
                .then(|| vmm::VmPaths::new(&name).default_serial)
        })
        .and_then(|s| std::fs::metadata(s).ok())
        .map_or(0, |m| m.len());
    let serial = match uri {
        Some(uri) => {
            let serial = cfg
                .serial
                .clone()
                .unwrap_or_else(|| opts.dir.join("console.log"));
            if let Some(parent) = serial.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("creating {}", parent.display())))?;
            }
            libvirt::boot(uri, &libvirt::domain_xml(&cfg, accel, &serial)?)?;
            serial
        }
        None => {
            let launched = vmm::launch(&cfg, accel, false).await?;
            launched.state.serial.clone()
        }
    };
    // A libvirt domain has no console socket: its bench measures
    // throughput only, without probes. An application is measured by its
    // client, not by probes on the console.
    let console = (uri.is_none() && opts.app.is_none()).then(|| vmm::VmPaths::new(&name).console);
    let append = cfg.append.as_deref().unwrap_or("");
    let app = match &opts.app {
        Some(AppOptions {
            spec: Some(spec), ..
        }) => Some(App::custom(app::CustomApp::load_file(spec)?, append)?),
        Some(a) => Some(App::new(a.kind, append, a.data, a.hot)?),
        None => None,
    };
    let warm_state = match &app {
        Some(app) => warm_app(opts, app, &serial, boot_offset).await?,
        None => warm_console(opts, &serial, console.as_deref()).await?,
    };
    let WarmState {
        warm,
        nonce,
        warm_probe_p50_ms,
        ..
    } = warm_state.clone();
    log::info!("warm rate {warm:.1} {}", warm_state.unit());

    // The measured restores' observer (an application's client, or the
    // workload's probes) from `t0`: it also runs while the working sets
    // are recorded, so that they see what it makes the guest touch.
    let observe =
        |t0: Instant| Observer::start(app.as_ref(), &serial, opts, console.as_deref(), t0);
    // Working sets of the running VM, then the image; the observer keeps
    // working meanwhile, as a user's client does at a checkpoint.
    let background = observe(Instant::now())?;
    for (e, wanted) in [
        (
            Estimator::Abit,
            opts.methods.contains(&Method::Ws(Estimator::Abit)),
        ),
        (
            Estimator::Dirty,
            opts.methods.contains(&Method::Ws(Estimator::Dirty)),
        ),
    ] {
        if wanted {
            let t = TrackOptions {
                interval: Duration::from_millis(1000),
                keep: 3,
                duration: Some(Duration::from_secs(4)),
                estimator: e,
                sync_wp: false,
                libvirt: opts.libvirt.clone(),
            };
            track::track(&name, t, std::future::pending()).await?;
        }
    }
    // Stop-and-copy: the trace window opens at the instant, as in the
    // measurements this benchmark has always made.
    thaw::ops::checkpoint::checkpoint(
        &name,
        &image,
        &thaw::ops::checkpoint::CheckpointOptions {
            force: true,
            window: opts.record_window,
            libvirt: uri.map(str::to_string),
            method: thaw::ops::save::SaveMethod::StopAndCopy,
            copy_limit: None,
            parent: None,
            speculate: Default::default(),
            predicted: None,
            progress: Default::default(),
        },
    )
    .await?;
    background
        .finish(&nonce)
        .map_err(|e| BenchError::Integrity(format!("while checkpointing: {e}")))?;

    if let Some(uri) = uri {
        // What a libvirt user has: virsh's save images. The domain can be
        // saved once; it is restored (untimed) between the two saves.
        let plain = opts.methods.contains(&Method::Virsh);
        let sparse = opts.methods.contains(&Method::VirshSparse);
        if plain {
            libvirt::save(uri, &name, &virsh_file, false)?;
        }
        if sparse {
            if plain {
                libvirt::restore(uri, &virsh_file, false, Instant::now())?;
            }
            libvirt::save(uri, &name, &sparse_file, true)?;
        }
        stop_any(&name, uri).await?;
    }
    if uri.is_none() {
        // Stock artifacts from the paused VM, then it goes.
        let (paths, state) = VmState::load(&name)?;
        let mut qmp = Qmp::connect(&paths.qmp).await?;
        qmp.execute("stop", json!({})).await?;
        if opts.methods.contains(&Method::Stock) {
            stock_save(&mut qmp, &stock_file, false).await?;
        }
        if opts.methods.contains(&Method::MappedRam) {
            if opts.methods.contains(&Method::Stock) {
                // QEMU refuses a second migration from the post-migration
                // state: run the guest for a moment in between.
                qmp.cont_after_migration().await?;
                qmp.execute("stop", json!({})).await?;
            }
            stock_save(&mut qmp, &mapped_file, true).await?;
        }
        drop(qmp);
        vmm::stop(&paths, &state, false).await?;
    }

    let restore_opts = |mode, estimator, learn| RestoreOptions {
        mode,
        name: None,
        estimator,
        learn,
        observe: false,
        read_limit: opts.read_limit,
        fill_limit: opts.fill_limit,
        fetch_workers: thaw::ops::restore::DEFAULT_FETCH_WORKERS,
        progress: Default::default(),
    };
    // The learning restore of the image in a directory: it sees what the
    // measured restores' observer makes the guest touch (the
    // application's client, or the workload's console and its probes).
    let learning_restore = async |dir: &Path| -> Result<restore::RestoreStats, BenchError> {
        let observer = observe(Instant::now())?;
        let stats = restore::restore(
            dir,
            &restore_opts(Mode::Lazy, EstimatorChoice::None, Some(opts.record_window)),
        )
        .await?;
        observer
            .finish(&nonce)
            .map_err(|e| BenchError::Integrity(format!("the learning restore: {e}")))?;
        stop_vm(&name, uri).await?;
        Ok(stats)
    };
    let learn_from_store = opts.store.as_ref().is_some_and(|s| s.learn_from_store);
    if opts.methods.contains(&Method::Ws(Estimator::Learned)) && !learn_from_store {
        learning_restore(&image).await?;
    }

    // The image (with what the learning restore learned) and the stock
    // stream into the store, when the restores read from one.
    let mut store_setup = match &opts.store {
        Some(so) => Some(
            store::StoreSetup::upload(
                so,
                &image,
                opts.methods
                    .contains(&Method::Stock)
                    .then_some(stock_file.as_path()),
                &opts.dir,
            )
            .await?,
        ),
        None => None,
    };
    if let Some(setup) = store_setup
        .as_mut()
        .filter(|_| learn_from_store && opts.methods.contains(&Method::Ws(Estimator::Learned)))
    {
        // A first host: it restores the image as pushed from the store,
        // learns while the observer works, and publishes what it learned.
        let (dir, _) = setup
            .prepare_image(&thaw::store::lazy::WorkingSets::for_restore(
                Mode::Lazy,
                EstimatorChoice::None,
                true,
            ))
            .await?;
        drop_caches();
        let learned = learning_restore(&dir).await?;
        setup.publish_learned(&dir, learned.learned_pages).await?;
    }
    let downloaded_stock = opts.dir.join("stock.downloaded");
    let device_state_bytes = thaw::image::Image::open(&image)
        .map_err(restore::RestoreError::from)?
        .meta()
        .device_state
        .len;

    let mut runs = Vec::new();
    // Round robin (run 1 of every method, then run 2, ...): a slow spell
    // of a shared host hits every method alike, not all runs of one.
    for run in 1..=opts.runs {
        for &method in &opts.methods {
            // A hot restore reads its image into the cache first: the fill
            // reads with O_DIRECT where the cache does not hold it, so an
            // earlier restore no longer leaves it there.
            if method.hot_cache(opts) {
                warm_page_cache(&image)?;
            } else {
                drop_caches();
            }
            let t0 = Instant::now();
            let observer = observe(t0)?;
            let mut r = match method {
                Method::Stock => match &store_setup {
                    Some(setup) => {
                        let fetched = setup.download_stock(&downloaded_stock).await?;
                        let mut r =
                            stock_restore(&cfg, accel, &downloaded_stock, false, None, t0).await?;
                        r.store_fetched = Some(fetched);
                        r
                    }
                    None => {
                        stock_restore(&cfg, accel, &stock_file, false, opts.read_limit, t0).await?
                    }
                },
                Method::MappedRam => {
                    stock_restore(&cfg, accel, &mapped_file, true, opts.read_limit, t0).await?
                }
                Method::Virsh | Method::VirshSparse => {
                    let uri = uri.ok_or_else(|| BenchError::Method(method.name()))?;
                    let sparse = method == Method::VirshSparse;
                    let file = if sparse { &sparse_file } else { &virsh_file };
                    let file = file.clone();
                    let uri = uri.to_string();
                    tokio::task::spawn_blocking(move || libvirt::restore(&uri, &file, sparse, t0))
                        .await
                        .map_err(|e| BenchError::Libvirt(e.to_string()))??
                }
                _ => {
                    let cold = match method {
                        Method::Hot(base) => base.method(),
                        m => m,
                    };
                    let (mode, estimator) = match cold {
                        Method::Eager => (Mode::Eager, EstimatorChoice::None),
                        Method::Lazy | Method::LazyLearn => (Mode::Lazy, EstimatorChoice::None),
                        Method::Ws(Estimator::Learned) => (Mode::Ws, EstimatorChoice::Learned),
                        Method::Ws(Estimator::Trace) => (Mode::Ws, EstimatorChoice::Trace),
                        Method::Ws(Estimator::Abit) => (Mode::Ws, EstimatorChoice::Abit),
                        Method::WsAuto => (Mode::Ws, EstimatorChoice::Auto),
                        _ => (Mode::Ws, EstimatorChoice::Dirty),
                    };
                    let learn = (method == Method::LazyLearn).then(LearnWindow::default);
                    // From a store: its metadata first, fetched again each time.
                    let (dir, metadata) = match &store_setup {
                        Some(setup) => {
                            let (dir, fetched) = setup
                                .prepare_image(&thaw::store::lazy::WorkingSets::for_restore(
                                    mode,
                                    estimator,
                                    learn.is_some(),
                                ))
                                .await?;
                            (dir, Some(fetched))
                        }
                        None => (image.clone(), None),
                    };
                    let before_ms = t0.elapsed().as_secs_f64() * 1000.0;
                    let s = restore::restore(&dir, &restore_opts(mode, estimator, learn)).await?;
                    let link = opts.store.as_ref().and_then(|so| so.link);
                    let floor_ms = match (link, opts.read_limit) {
                        // What must cross the link before the guest runs:
                        // the metadata, index, device state and working
                        // set, as fetched.
                        (Some(link), _) => Some(
                            s.launch_ms
                                + s.device_state_ms
                                + metadata.map_or(device_state_bytes, |m| m.bytes) as f64 * 1000.0
                                    / link.rate.max(1) as f64
                                + FLOOR_ROUND_TRIPS * link.rtt_ms,
                        ),
                        (None, Some(limit)) => Some(
                            s.launch_ms
                                + s.device_state_ms
                                + (s.prefetched_pages * PAGE_SIZE) as f64 * 1000.0
                                    / limit.max(1) as f64,
                        ),
                        (None, None) => None,
                    }
                    .filter(|_| mode == Mode::Ws);
                    MethodRun {
                        learn_window_ms: learn.map(|_| s.learn_window_ms),
                        window_faults: learn.map(|_| s.window_faults),
                        window_pages: learn.map(|_| s.window_pages),
                        zero_faults: Some(s.zero_page_faults),
                        ws_pages: (mode == Mode::Ws).then_some(s.ws_pages),
                        floor_ms,
                        store_fetched: metadata.map(|m| m + s.store_fetched.unwrap_or_default()),
                        method: String::new(),
                        run,
                        running_ms: before_ms + s.resume_ms,
                        ttr_ms: None,
                        complete_ms: before_ms + s.complete_ms,
                        faults: s.lazy_faults,
                        bytes_read: s.bytes_read,
                        fill_mib_per_s: Some(s.fill_mib_per_s),
                        fault_p50_us: Some(s.fault_p50_us),
                        samples: Vec::new(),
                        steady_rate: None,
                        probes: Vec::new(),
                        first_answer_ms: None,
                    }
                }
            };
            // Resident and, for a learning restore, past its window: the
            // guest's steady state is measured after both.
            let settled_ms = r.complete_ms.max(r.running_ms) + r.learn_window_ms.unwrap_or(0.0);
            let until = Duration::from_secs_f64(settled_ms / 1000.0) + opts.settle;
            let left = until.saturating_sub(t0.elapsed());
            tokio::time::sleep(left).await;
            // An application's passes take a while: watch until enough of
            // them ran on resident RAM to know its steady rate.
            if let Observer::App(client) = &observer {
                let by = Instant::now() + APP_STEADY_TIMEOUT;
                while client.passes_from(settled_ms) < STEADY_PASSES && Instant::now() < by {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let seen = observer.finish(&nonce);
            let intact = match (&app, &seen) {
                (Some(app), Ok(_)) => app.verify(),
                (_, Err(e)) => Err(BenchError::App(e.clone())),
                (None, Ok(_)) => Ok(()),
            };
            stop_vm(&name, uri).await?;
            let seen = intact
                .and(seen.map_err(BenchError::App))
                .map_err(|e| BenchError::Integrity(format!("{}: {e}", method.name())))?;
            r.probes = seen.probes;
            r.first_answer_ms = seen.first_answer_ms;
            r.method = method.name();
            r.run = run;
            r.samples = seen.samples;
            r.settle_ttr(warm);
            log::info!(
                "{} run {run}: running {:.0} ms, TTR {:?} ms, complete {:.0} ms",
                r.method,
                r.running_ms,
                r.ttr_ms,
                r.complete_ms
            );
            runs.push(r);
        }
    }

    let methods: Vec<String> = opts.methods.iter().map(|m| m.name()).collect();
    let limits = if opts.limits {
        Some(measure_limits(&opts.dir).await?)
    } else {
        None
    };
    let summary = summarize(&methods, &runs, limits.as_ref(), opts.read_limit);
    let meta = thaw::image::Image::open(&image).map_err(restore::RestoreError::from)?;
    Ok(BenchReport {
        vm: name,
        memory: cfg.memory.to_string(),
        nonzero_pages: meta.meta().nonzero_pages,
        accel: accel.to_string(),
        read_limit: opts.read_limit,
        fill_limit: opts.fill_limit,
        hot_cache: opts.hot_cache,
        warm_rate: warm,
        warm_probe_p50_ms,
        probe_period_ms: opts
            .probe_period
            .map(|p| u64::try_from(p.as_millis()).unwrap_or(u64::MAX)),
        ttr_definition: ttr_definition(),
        limits,
        summary,
        runs,
        libvirt: opts.libvirt.clone(),
        rate_unit: warm_state.unit().to_string(),
        app: warm_state.app,
        store: store_setup.map(|s| s.report),
        record_window_ms: Some(
            [opts.record_window.quiet, opts.record_window.max]
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        ),
    })
}

/// The VM before the save: its warm rate and what identifies its state.
#[derive(Clone, Debug)]
struct WarmState {
    /// MiB/s of the workload, or requests/s of the application's client.
    warm: f64,
    /// The workload's nonce (empty for an application).
    nonce: String,
    warm_probe_p50_ms: Option<f64>,
    app: Option<AppReport>,
}

impl WarmState {
    fn unit(&self) -> &'static str {
        if self.app.is_some() {
            "requests/s"
        } else {
            "MiB/s"
        }
    }
}

/// Waits for the workload's reports, warms up and measures its rate (and
/// the probe's latency) from its console.
async fn warm_console(
    opts: &BenchOptions,
    serial: &Path,
    console: Option<&Path>,
) -> Result<WarmState, BenchError> {
    let tail = ConsoleTail::start(serial, Instant::now()).map_err(io("reading the console"))?;
    let deadline = Instant::now() + opts.warmup + Duration::from_secs(300);
    while tail.reports().len() < 2 {
        if Instant::now() > deadline {
            return Err(BenchError::NoThroughput(
                opts.warmup + Duration::from_secs(300),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(opts.warmup).await;
    let warm_from = tail.reports().len();
    let prober = start_prober(opts, console, Instant::now())?;
    tokio::time::sleep(opts.measure).await;
    let warm_reports = tail.finish();
    let warm_probe_p50_ms = prober.and_then(|p| probe::summarize(&p.finish().0, 0.0).p50_ms);
    let warm = median(warm_reports[warm_from..].iter().map(|r| r.sample.rate))
        .ok_or(BenchError::NoThroughput(opts.measure))?;
    let nonce = warm_reports
        .last()
        .map(|r| r.nonce.clone())
        .unwrap_or_default();
    Ok(WarmState {
        warm,
        nonce,
        warm_probe_p50_ms,
        app: None,
    })
}

/// Waits for the application's server, loads its data, warms up with the
/// client and measures the client's rate over passes started in the
/// measuring window.
async fn warm_app(
    opts: &BenchOptions,
    app: &App,
    serial: &Path,
    boot_offset: u64,
) -> Result<WarmState, BenchError> {
    app.wait_ready(serial, boot_offset).await?;
    let loader = app.clone();
    let load = tokio::task::spawn_blocking(move || loader.load())
        .await
        .map_err(|e| BenchError::App(format!("the loader thread: {e}")))??;
    let client = Client::start(app, Instant::now())?;
    tokio::time::sleep(opts.warmup).await;
    // A server that just took its data may still be settling (redis
    // rehashes its dictionary incrementally): warm up until the client's
    // rate is steady, then measure.
    let steady_by = Instant::now() + APP_STEADY_TIMEOUT;
    while !app::steady(&client.rates()) && Instant::now() < steady_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warm_from = client.passes();
    tokio::time::sleep(opts.measure).await;
    // At least three passes measured, however long a pass takes.
    while client.passes() < warm_from + 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = client.finish();
    let passes = &record.passes[warm_from..];
    let warm = median(passes.iter().map(|p| p.rate)).ok_or_else(|| {
        BenchError::App(format!("the {} client completed no pass", app.kind.name()))
    })?;
    let warm_pass_ms = median(passes.iter().map(|p| p.interval_ms)).unwrap_or(0.0);
    Ok(WarmState {
        warm,
        nonce: String::new(),
        warm_probe_p50_ms: None,
        app: Some(app.report(warm_pass_ms, load)),
    })
}

/// What watches one restore: the workload's console (and the probe), or
/// the application's client.
enum Observer {
    Console {
        tail: ConsoleTail,
        prober: Option<Prober>,
    },
    App(Client),
}

/// What an [`Observer`] saw.
struct Seen {
    samples: Vec<Sample>,
    probes: Vec<ProbeSample>,
    first_answer_ms: Option<f64>,
}

impl Observer {
    fn start(
        app: Option<&App>,
        serial: &Path,
        opts: &BenchOptions,
        console: Option<&Path>,
        t0: Instant,
    ) -> Result<Observer, BenchError> {
        Ok(match app {
            Some(app) => Observer::App(Client::start(app, t0)?),
            None => Observer::Console {
                tail: ConsoleTail::start(serial, t0).map_err(io("reading the console"))?,
                prober: start_prober(opts, console, t0)?,
            },
        })
    }

    /// Stops watching; an error says what showed the guest's state was
    /// not intact (the workload's nonce or checks) or that the client never
    /// got an answer.
    fn finish(self, nonce: &str) -> Result<Seen, String> {
        match self {
            Observer::Console { tail, prober } => {
                let reports = tail.finish();
                let (probes, probe_failed) = prober.map(Prober::finish).unwrap_or_default();
                if probe_failed || reports.iter().any(|x| !x.ok || x.nonce != nonce) {
                    return Err(
                        "the workload's integrity check failed (nonce changed or ok=0)".into(),
                    );
                }
                Ok(Seen {
                    samples: reports.iter().map(|x| x.sample).collect(),
                    probes,
                    first_answer_ms: None,
                })
            }
            Observer::App(client) => {
                let record = client.finish();
                if record.first_answer_ms.is_none() {
                    return Err("the application never answered its client".into());
                }
                Ok(Seen {
                    samples: record.passes,
                    probes: Vec::new(),
                    first_answer_ms: record.first_answer_ms,
                })
            }
        }
    }
}

/// What TTR means in this report.
fn ttr_definition() -> String {
    format!(
        "start of the first throughput interval (not before the guest runs) from which the \
         guest's throughput over the next {TTR_HOLD_MS} ms is at least {:.0}% of its steady \
         rate (median once all RAM is resident; the pre-save warm rate if too few reports); \
         from the restore command's start",
        TTR_FRACTION * 100.0
    )
}

impl MethodRun {
    /// Derives the steady rate and the TTR from the samples; `warm` (the
    /// pre-save rate) is the reference when fewer than 5 reports came after
    /// all RAM was resident.
    pub fn settle_ttr(&mut self, warm: f64) {
        // Steady means after a learning window, too.
        let complete = self.complete_ms.max(self.running_ms) + self.learn_window_ms.unwrap_or(0.0);
        let after: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.at_ms - s.interval_ms >= complete)
            .map(|s| s.rate)
            .collect();
        let steady = if after.len() >= 5 {
            median(after)
        } else {
            None
        };
        self.steady_rate = steady;
        self.ttr_ms = ttr::time_to_responsiveness(
            &self.samples,
            steady.unwrap_or(warm),
            TTR_FRACTION,
            TTR_HOLD_MS,
            self.running_ms,
        );
    }
}

/// Runs `thaw limits` (smaller fault test, no pinned runs) next to the images.
async fn measure_limits(dir: &Path) -> Result<MachineLimits, BenchError> {
    let opts = crate::limits::LimitsOptions {
        dir: dir.to_path_buf(),
        warm_read: false,
        pinned_faults: false,
        ..Default::default()
    };
    let report = tokio::task::spawn_blocking(move || crate::limits::measure(&opts))
        .await
        .map_err(|e| BenchError::Io {
            context: "the limits thread".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|e| BenchError::Io {
            context: "measuring this machine's limits".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let copy_4m = report
        .copy_throughput
        .iter()
        .find(|c| c.batch_bytes == 4 << 20)
        .or(report.copy_throughput.last())
        .map_or(0.0, |c| c.mib_per_s);
    Ok(MachineLimits {
        seq_read_mib_per_s: report.seq_read.cold_mib_per_s,
        copy_4m_mib_per_s: copy_4m,
        fault_round_trip_p50_us: report.fault_round_trip.child_p50_us,
        fault_round_trip_p99_us: report.fault_round_trip.child_p99_us,
        page_read_p50_us: report.seq_read.cold_page_read_p50_us,
    })
}

/// The least a fault that reads its own page can take (µs): one cold page
/// read, the page's time at `read_limit` (bytes/s) and the fault round trip.
fn page_fault_floor_us(l: &MachineLimits, read_limit: Option<u64>) -> f64 {
    let limited = read_limit.map_or(0.0, |r| PAGE_SIZE as f64 * 1e6 / r.max(1) as f64);
    l.page_read_p50_us + limited + l.fault_round_trip_p50_us
}

/// Medians per method, in `methods` order, with ratios to `limits`.
fn summarize(
    methods: &[String],
    runs: &[MethodRun],
    limits: Option<&MachineLimits>,
    read_limit: Option<u64>,
) -> Vec<MethodSummary> {
    methods
        .iter()
        .map(|m| {
            let mine: Vec<&MethodRun> = runs.iter().filter(|r| &r.method == m).collect();
            let fill = median(
                mine.iter()
                    .filter_map(|r| r.fill_mib_per_s)
                    .filter(|f| *f > 0.0),
            );
            let fault = median(mine.iter().filter_map(|r| r.fault_p50_us));
            let floor = limits.map(|l| l.seq_read_mib_per_s.min(l.copy_4m_mib_per_s));
            MethodSummary {
                fill_mib_per_s: fill,
                fault_p50_us: fault,
                fill_vs_limit: fill.zip(floor).map(|(f, l)| f / l),
                fault_p50_vs_round_trip: fault
                    .zip(limits)
                    .map(|(f, l)| f / l.fault_round_trip_p50_us),
                fault_p50_vs_page_floor: fault
                    .zip(limits.filter(|l| l.page_read_p50_us > 0.0))
                    .map(|(f, l)| f / page_fault_floor_us(l, read_limit)),
                method: m.clone(),
                runs: mine.len(),
                running_ms: median(mine.iter().map(|r| r.running_ms)),
                ttr_ms: median(mine.iter().filter_map(|r| r.ttr_ms)),
                complete_ms: median(mine.iter().map(|r| r.complete_ms)),
                faults: median(mine.iter().map(|r| r.faults as f64)),
                bytes_read_mib: median(mine.iter().map(|r| r.bytes_read as f64 / (1 << 20) as f64)),
                without_ttr: mine.iter().filter(|r| r.ttr_ms.is_none()).count(),
                first_answer_ms: median(mine.iter().filter_map(|r| r.first_answer())),
                learn_window_ms: median(mine.iter().filter_map(|r| r.learn_window_ms)),
                window_faults: median(
                    mine.iter()
                        .filter_map(|r| r.window_faults.map(|f| f as f64)),
                ),
                window_pages: median(mine.iter().filter_map(|r| r.window_pages.map(|f| f as f64))),
                window_rate_vs_steady: median(
                    mine.iter().filter_map(|r| r.window_rate_vs_steady()),
                ),
                probe_p50_ms: median(mine.iter().filter_map(|r| r.probes_while_running().p50_ms)),
                probe_max_ms: median(mine.iter().filter_map(|r| r.probes_while_running().max_ms)),
                saved_page_faults: median(
                    mine.iter()
                        .filter_map(|r| r.zero_faults.map(|z| r.faults.saturating_sub(z) as f64)),
                ),
                ws_pages: median(mine.iter().filter_map(|r| r.ws_pages.map(|p| p as f64))),
                saved_faults_vs_ws: median(mine.iter().filter_map(|r| {
                    let saved = r.faults.saturating_sub(r.zero_faults?) as f64;
                    r.ws_pages.filter(|&p| p > 0).map(|p| saved / p as f64)
                })),
                floor_ms: median(mine.iter().filter_map(|r| r.floor_ms)),
                ttr_vs_floor: median(mine.iter().filter_map(|r| Some(r.ttr_ms? / r.floor_ms?))),
                first_answer_vs_floor: median(
                    mine.iter()
                        .filter_map(|r| Some(r.first_answer()? / r.floor_ms?)),
                ),
                store_requests: median(
                    mine.iter()
                        .filter_map(|r| r.store_fetched.map(|f| f.requests as f64)),
                ),
                store_mib: median(
                    mine.iter()
                        .filter_map(|r| r.store_fetched.map(|f| f.bytes as f64 / (1 << 20) as f64)),
                ),
            }
        })
        .collect()
}

impl BenchReport {
    /// Re-derives every run's TTR and the summary from the recorded samples
    /// (e.g. a `bench.json` of an earlier run, after the definition changed).
    pub fn reanalyse(&mut self) {
        for r in &mut self.runs {
            r.settle_ttr(self.warm_rate);
        }
        let methods: Vec<String> = self.summary.iter().map(|s| s.method.clone()).collect();
        self.summary = summarize(&methods, &self.runs, self.limits.as_ref(), self.read_limit);
        self.ttr_definition = ttr_definition();
    }
}

/// Stops the restored VM: through thaw's record, or (a domain virsh
/// restored) through libvirt.
async fn stop_vm(name: &str, uri: Option<&str>) -> Result<(), BenchError> {
    match (VmState::load(name), uri) {
        (Ok((paths, state)), _) => vmm::stop(&paths, &state, false).await?,
        (Err(vmm::QemuError::NotRunning(_)), Some(uri)) => libvirt::destroy(uri, name)?,
        (Err(e), _) => return Err(e.into()),
    }
    Ok(())
}

/// [`stop_vm`] for a domain that may be gone already.
async fn stop_any(name: &str, uri: &str) -> Result<(), BenchError> {
    if let Ok((paths, state)) = VmState::load(name) {
        vmm::stop(&paths, &state, false).await?;
    }
    libvirt::destroy(uri, name)
}

/// Refuses methods that do not fit the kind of VM (and a read limit the
/// virsh methods cannot honour).
fn check_methods(opts: &BenchOptions) -> Result<(), BenchError> {
    if opts.methods.contains(&Method::VirshSparse) && !libvirt::virsh_has_sparse_save() {
        return Err(BenchError::Libvirt(
            "this virsh has no `save --image-format` (libvirt >= 11 has): leave out virsh-sparse"
                .into(),
        ));
    }
    if opts.store.is_some() {
        if opts.libvirt.is_some() || opts.read_limit.is_some() || opts.hot_cache {
            return Err(BenchError::Options(
                "--store: the link to the store is the limit; leave out --libvirt, --read-limit and --hot-cache".into(),
            ));
        }
        if let Some(m) = opts
            .methods
            .iter()
            .find(|m| matches!(m, Method::MappedRam | Method::Hot(_)))
        {
            return Err(BenchError::Options(format!(
                "--store: method {} reads a local file; use stock, eager, lazy, lazy:learn or ws:*",
                m.name()
            )));
        }
    }
    if opts.store.as_ref().is_some_and(|s| s.learn_from_store)
        && !opts.methods.contains(&Method::Ws(Estimator::Learned))
    {
        return Err(BenchError::Options(
            "--learn-from-store learns the set ws:learned prefetches: add ws:learned to the methods"
                .into(),
        ));
    }
    for &m in &opts.methods {
        let fits = match m {
            Method::Stock | Method::MappedRam => opts.libvirt.is_none(),
            Method::Virsh | Method::VirshSparse => opts.libvirt.is_some(),
            _ => true,
        };
        if !fits {
            return Err(BenchError::Libvirt(format!(
                "method {} is for {} VMs: with --libvirt use virsh and virsh-sparse, without it stock and mapped-ram",
                m.name(),
                if opts.libvirt.is_some() { "thaw's own" } else { "libvirt" }
            )));
        }
        if opts.read_limit.is_some() && matches!(m, Method::Hot(_)) {
            return Err(BenchError::Options(format!(
                "{}: a hot-cache restore is the floor of a local-disk one; leave out --read-limit",
                m.name()
            )));
        }
        if opts.read_limit.is_some() && matches!(m, Method::Virsh | Method::VirshSparse) {
            return Err(BenchError::Libvirt(
                "--read-limit cannot pace virsh restore (libvirt reads the file itself): leave out virsh and virsh-sparse, or the limit".into(),
            ));
        }
    }
    Ok(())
}

/// Reads every file of the image into the page cache, so that the next
/// restore reads from memory ([`Method::Hot`]).
fn warm_page_cache(image: &Path) -> Result<(), BenchError> {
    let context = || format!("reading {} into the page cache", image.display());
    for entry in std::fs::read_dir(image).map_err(io(context()))? {
        let path = entry.map_err(io(context()))?.path();
        if path.is_file() {
            let mut file = std::fs::File::open(&path).map_err(io(context()))?;
            std::io::copy(&mut file, &mut std::io::sink()).map_err(io(context()))?;
        }
    }
    Ok(())
}

/// Empties the page cache so every restore reads from the disk.
fn drop_caches() {
    nix::unistd::sync();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        log::warn!("cannot drop the page cache ({e}): restores are not cold");
    }
}

/// The migration capabilities of a stock save or restore.
async fn stock_capabilities(qmp: &mut Qmp, mapped_ram: bool) -> Result<(), BenchError> {
    let caps = json!([
        { "capability": "events", "state": true },
        { "capability": "x-ignore-shared", "state": false },
        { "capability": "mapped-ram", "state": mapped_ram },
        { "capability": "multifd", "state": mapped_ram },
    ]);
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .await?;
    if mapped_ram {
        qmp.execute("migrate-set-parameters", json!({ "multifd-channels": 2 }))
            .await?;
    }
    Ok(())
}

/// Writes the paused VM's whole state, RAM included, into `file` with
/// QEMU's own migration (`file:` URI), as a stock save would.
async fn stock_save(qmp: &mut Qmp, file: &Path, mapped_ram: bool) -> Result<(), BenchError> {
    let _ = std::fs::remove_file(file);
    stock_capabilities(qmp, mapped_ram).await?;
    qmp.execute(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    )
    .await?;
    qmp.wait_migration(MIGRATION_TIMEOUT).await?;
    Ok(())
}

/// A stock restore: QEMU with `-incoming defer -S` loads `file`, then runs.
/// With a read limit (full stream only) thaw feeds the file to QEMU through
/// a pipe at that rate, as `virsh restore` feeds its fd; otherwise QEMU
/// reads the file itself (`file:` URI; the only way for `mapped-ram`).
async fn stock_restore(
    cfg: &VmConfig,
    accel: &str,
    file: &Path,
    mapped_ram: bool,
    read_limit: Option<u64>,
    t0: Instant,
) -> Result<MethodRun, BenchError> {
    let launched = vmm::launch(cfg, accel, true).await?;
    let mut qmp = launched.qmp;
    stock_capabilities(&mut qmp, mapped_ram).await?;
    let feeder = match read_limit.filter(|_| !mapped_ram) {
        None => {
            qmp.execute(
                "migrate-incoming",
                json!({ "uri": format!("file:{}", file.display()) }),
            )
            .await?;
            None
        }
        Some(rate) => {
            let (rd, wr) =
                rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| {
                    BenchError::Io {
                        context: "creating a pipe".into(),
                        source: e.into(),
                    }
                })?;
            qmp.execute_with_fd(
                "getfd",
                json!({ "fdname": "thaw-bench" }),
                std::os::fd::AsFd::as_fd(&rd),
            )
            .await?;
            drop(rd);
            let path = file.to_path_buf();
            let feeder = std::thread::Builder::new()
                .name("thaw-bench-feed".into())
                .spawn(move || feed(&path, std::fs::File::from(wr), rate))
                .map_err(io("spawning the stream feeder"))?;
            qmp.execute("migrate-incoming", json!({ "uri": "fd:thaw-bench" }))
                .await?;
            Some(feeder)
        }
    };
    qmp.wait_migration(MIGRATION_TIMEOUT).await?;
    if let Some(f) = feeder {
        f.join()
            .map_err(|_| BenchError::Io {
                context: "the stream feeder panicked".into(),
                source: std::io::Error::other("panic"),
            })?
            .map_err(io("feeding the migration stream"))?;
    }
    qmp.execute("cont", json!({})).await?;
    Ok(MethodRun::stock(file, t0))
}

/// Starts the interactive probe on the console socket when asked for.
fn start_prober(
    opts: &BenchOptions,
    console: Option<&Path>,
    t0: Instant,
) -> Result<Option<Prober>, BenchError> {
    opts.probe_period
        .zip(console)
        .map(|(p, console)| Prober::start(console.to_path_buf(), t0, p))
        .transpose()
        .map_err(io("starting the console probe"))
}

/// Copies `path` into `out` at `rate` bytes per second.
fn feed(path: &Path, mut out: std::fs::File, rate: u64) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let throttle = thaw::image::throttle::Throttle::new(rate);
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        throttle.take(n as u64);
        out.write_all(&buf[..n])?;
    }
}

impl BenchReport {
    /// The summary as a Markdown table.
    pub fn markdown(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.0}"));
        let probe_ms = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1}"));
        let mut out = format!(
            "VM {} ({} RAM, {} non-zero pages, {}{}), warm {} before the save {:.1} {}{}\n{}\n\
             | method | running ms | TTR ms | all RAM resident ms | faults | MiB read | runs without TTR | first answer ms | probe p50 / max ms |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.vm,
            self.memory,
            self.nonzero_pages,
            self.accel,
            self.libvirt
                .as_ref()
                .map(|u| format!(", a libvirt domain at {u}"))
                .unwrap_or_default(),
            if self.app.is_some() { "client rate" } else { "throughput" },
            self.warm_rate,
            self.rate_unit,
            self.read_limit.map_or(String::new(), |r| format!(
                ", reads limited to {} MiB/s (thaw, and stock's stream; not mapped-ram)",
                r >> 20
            )) + &self.fill_limit.map_or(String::new(), |r| format!(
                ", thaw's background fill paced to {} MiB/s once the guest runs",
                r >> 20
            )) + if self.hot_cache { ", restored from a hot page cache" } else { "" },
            self.app.as_ref().map_or(String::new(), |a| {
                let data = if a.keys > 0 {
                    format!(
                        " with {} keys of {} bytes ({} MiB; loaded in {:.1} s); each client pass: `{}` \
                         over the {} hot keys ({} MiB)",
                        a.keys,
                        a.value_bytes,
                        (a.keys * a.value_bytes as u64) >> 20,
                        a.load_ms / 1000.0,
                        a.client,
                        a.hot_keys,
                        (a.hot_keys * a.value_bytes as u64) >> 20,
                    )
                } else {
                    format!("; each client pass: `{}` ({} requests)", a.client, a.pass_requests)
                };
                format!(
                    "\n{}{data}, {:.0} ms warm. First answer: the client's first reply after \
                     reconnecting every {} ms from the restore's start.\n",
                    if a.name.is_empty() { a.app.name() } else { &a.name },
                    a.warm_pass_ms,
                    app::CONNECT_TIMEOUT.as_millis()
                )
            })
        );
        for s in &self.summary {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {}/{} | {} | {} / {} |\n",
                s.method,
                ms(s.running_ms),
                ms(s.ttr_ms),
                ms(s.complete_ms),
                ms(s.faults),
                ms(s.bytes_read_mib),
                s.without_ttr,
                s.runs,
                ms(s.first_answer_ms),
                probe_ms(s.probe_p50_ms),
                probe_ms(s.probe_max_ms),
            ));
        }
        out.push_str(&format!("\nTTR: {}. Medians.\n", self.ttr_definition));
        if let Some(st) = &self.store {
            out.push_str(&self.store_markdown(st));
        }
        for sm in self.summary.iter().filter(|s| s.learn_window_ms.is_some()) {
            out.push_str(&format!(
                "\n{}: learning window {} ms after all RAM was resident, {} first touches in it, {} of them through thaw; the guest's rate inside it: {} of its steady rate.\n",
                sm.method,
                ms(sm.learn_window_ms),
                ms(sm.window_pages),
                ms(sm.window_faults),
                sm.window_rate_vs_steady
                    .map_or("— (no work wholly inside it)".to_string(), |r| format!("{:.0}%", r * 100.0))
            ));
        }
        for sm in self.summary.iter().filter(|s| s.ws_pages.is_some()) {
            out.push_str(&format!(
                "\n{}: working set {} pages; {} of its faults on pages saved with data ({}% of the set), the rest on pages zero in the image.{}\n",
                sm.method,
                ms(sm.ws_pages),
                ms(sm.saved_page_faults),
                sm.saved_faults_vs_ws
                    .map_or("—".to_string(), |r| format!("{:.1}", r * 100.0)),
                sm.floor_ms.map_or(String::new(), |f| format!(
                    " Floor ({}) {f:.0} ms: TTR {}× it, first answer {}× it.",
                    if self.store.is_some() {
                        "QEMU start + device state + what crosses the link before the guest runs, at its rate"
                    } else {
                        "QEMU start + device state + the set's data at the read limit"
                    },
                    sm.ttr_vs_floor.map_or("—".to_string(), |r| format!("{r:.2}")),
                    sm.first_answer_vs_floor.map_or("—".to_string(), |r| format!("{r:.2}")),
                ))
            ));
        }
        for hot in self.summary.iter() {
            let Some(cold_name) = hot.method.strip_suffix("@hot") else {
                continue;
            };
            let Some(cold) = self.summary.iter().find(|s| s.method == cold_name) else {
                continue;
            };
            let ratio = |c: Option<f64>, h: Option<f64>| match (c, h) {
                (Some(c), Some(h)) if h > 0.0 => format!("{:.2}×", c / h),
                _ => "—".to_string(),
            };
            out.push_str(&format!(
                "
{cold_name} from a cold cache against a hot one (same image, same run): TTR {} vs {} ms = {}, first answer {} vs {} ms = {}.\n",
                ms(cold.ttr_ms),
                ms(hot.ttr_ms),
                ratio(cold.ttr_ms, hot.ttr_ms),
                ms(cold.first_answer_ms),
                ms(hot.first_answer_ms),
                ratio(cold.first_answer_ms, hot.first_answer_ms),
            ));
        }
        if let Some([quiet, max]) = self.record_window_ms {
            out.push_str(&format!(
                "\nWorking sets recorded (the trace after the checkpoint, the learning restore's \
                 first touches) until {quiet} ms passed without a new page, {max} ms at most.\n"
            ));
        }
        if let (Some(p), Some(period)) = (self.warm_probe_p50_ms, self.probe_period_ms) {
            out.push_str(&format!(
                "\nInteractive probe: a `PROBE` request on the serial console every {period} ms \
                 (one outstanding; the guest verifies one hot block and answers). First answer: \
                 from the restore's start (requests wait while the guest is not running); p50 / max: \
                 requests sent once it ran. Before the save: p50 {p:.1} ms.\n"
            ));
        }
        if let Some(l) = &self.limits {
            out.push_str(&format!(
                "\nThis machine, same run: cold sequential read {:.0} MiB/s, one cold 4 KiB page read \
                 p50 {:.1} us, UFFDIO_COPY (4 MiB calls) {:.0} MiB/s, cross-process fault round trip \
                 p50 {:.1} us (p99 {:.1} us). Page floor: page read + its time at the read limit + \
                 round trip = {:.1} us.\n\n\
                 | method | fill MiB/s | fill / min(read, copy) | fault p50 us | fault p50 / round trip | fault p50 / page floor |\n\
                 |---|---:|---:|---:|---:|---:|\n",
                l.seq_read_mib_per_s,
                l.page_read_p50_us,
                l.copy_4m_mib_per_s,
                l.fault_round_trip_p50_us,
                l.fault_round_trip_p99_us,
                page_fault_floor_us(l, self.read_limit)
            ));
            let f = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |v| format!("{v:.d$}"));
            for s in self.summary.iter().filter(|s| s.fault_p50_us.is_some()) {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    s.method,
                    f(s.fill_mib_per_s, 0),
                    f(s.fill_vs_limit, 2),
                    f(s.fault_p50_us, 1),
                    f(s.fault_p50_vs_round_trip, 1),
                    f(s.fault_p50_vs_page_floor, 1)
                ));
            }
        }
        out
    }
}

impl BenchReport {
    /// `--store`: what each method read from the store, and against the link.
    fn store_markdown(&self, st: &store::StoreReport) -> String {
        let f = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |v| format!("{v:.d$}"));
        let rtt = st.link.map(|l| l.rtt_ms);
        let rate_mib = st.link.map(|l| l.rate as f64 / (1 << 20) as f64);
        let mut out = format!(
            "\nEvery restore read from the object store {}{} with an empty local cache: thaw's \
             straight from it (metadata, device state and working sets, then pages by ranged reads), \
             stock's by downloading its stream (ranged reads in flight) before `migrate-incoming`. \
             The image is {:.0} MiB there{}.{}\n\n\
             | method | MiB fetched | requests | fault p50 ms | fault p50 / RTT | fault p50 / request | fill MiB/s | fill / link | TTR / floor | first answer / floor |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            st.url,
            st.link.map_or(String::new(), |l| format!(
                ", over a link of {} ms round trip and {:.1} MiB/s each way",
                l.rtt_ms,
                l.rate as f64 / (1 << 20) as f64
            )),
            st.image_bytes as f64 / (1 << 20) as f64,
            st.stock_bytes.map_or(String::new(), |b| format!(
                ", the stock stream {:.0} MiB",
                b as f64 / (1 << 20) as f64
            )),
            st.learned_from_store.as_ref().map_or(String::new(), |l| format!(
                " The learned set ({} pages) was learned by a first restore from the store, \
                 across the same link, and published there ({:.1} MiB in {:.0} ms).",
                l.pages,
                l.bytes as f64 / (1 << 20) as f64,
                l.publish_ms
            )),
        );
        for s in &self.summary {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.method,
                f(s.store_mib, 0),
                f(s.store_requests, 0),
                f(s.fault_p50_us.map(|u| u / 1000.0), 1),
                f(s.fault_p50_us.zip(rtt).map(|(u, r)| u / 1000.0 / r), 2),
                f(
                    s.fault_p50_us
                        .zip(st.request_ms)
                        .map(|(u, r)| u / 1000.0 / r),
                    2
                ),
                f(s.fill_mib_per_s, 0),
                f(s.fill_mib_per_s.zip(rate_mib).map(|(f, r)| f / r), 2),
                f(s.ttr_vs_floor, 2),
                f(s.first_answer_vs_floor, 2),
            ));
        }
        if let Some(ms) = st.request_ms {
            out.push_str(&format!(
                "\nRequest: a 4 KiB ranged GET of the pages with nothing else in flight takes {ms:.1} ms \
                 (median of {}): the store's own round trip.\n",
                store::REQUEST_PROBES
            ));
        }
        if st.link.is_some() {
            out.push_str(&format!(
                "\nFloor (ws): QEMU's start + loading the device state + what must cross the link \
                 before the guest runs (metadata, index, device state, working set) at the link \
                 rate + {FLOOR_ROUND_TRIPS} round trips.\n"
            ));
        }
        out
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.markdown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_methods_parse_and_name_round_trip() {
        for text in [
            "eager@hot",
            "lazy@hot",
            "ws:learned@hot",
            "ws:trace@hot",
            "ws:auto@hot",
        ] {
            let m = Method::parse(text).expect(text);
            assert!(matches!(m, Method::Hot(_)), "{text}");
            assert_eq!(m.name(), text);
        }
        assert_eq!(
            Method::parse("ws:learned@hot").ok(),
            Some(Method::Hot(HotBase::Ws(Estimator::Learned)))
        );
        for bad in [
            "stock@hot",
            "lazy:learn@hot",
            "virsh@hot",
            "eager@hot@hot",
            "@hot",
        ] {
            assert!(Method::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn summary_counts_faults_on_saved_pages_against_the_set_and_ttr_against_the_floor() {
        let run = |faults, zero, ttr| MethodRun {
            method: "ws:learned".into(),
            run: 1,
            running_ms: 900.0,
            ttr_ms: Some(ttr),
            complete_ms: 5000.0,
            faults,
            bytes_read: 0,
            fill_mib_per_s: None,
            fault_p50_us: None,
            samples: Vec::new(),
            steady_rate: None,
            probes: Vec::new(),
            first_answer_ms: Some(1000.0),
            learn_window_ms: None,
            window_faults: None,
            window_pages: None,
            zero_faults: Some(zero),
            ws_pages: Some(10_000),
            floor_ms: Some(800.0),
            store_fetched: None,
        };
        let runs = [run(300, 100, 1600.0), run(500, 100, 2400.0)];
        let s = &summarize(&["ws:learned".into()], &runs, None, Some(100 << 20))[0];
        assert_eq!(s.saved_page_faults, Some(300.0));
        let share = s.saved_faults_vs_ws.expect("a share of the set");
        assert!((share - 0.03).abs() < 1e-9, "{share}");
        assert_eq!(s.ttr_vs_floor, Some(2.5));
        assert_eq!(s.first_answer_vs_floor, Some(1.25));
    }

    #[test]
    fn hot_methods_refuse_a_read_limit() {
        let mut opts = BenchOptions {
            config: PathBuf::from("vm.yaml"),
            methods: vec![Method::Eager, Method::Hot(HotBase::Eager)],
            runs: 1,
            read_limit: None,
            fill_limit: None,
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(1),
            settle: Duration::from_secs(1),
            dir: PathBuf::from("/nonexistent"),
            limits: false,
            probe_period: None,
            libvirt: None,
            app: None,
            hot_cache: false,
            store: None,
            record_window: LearnWindow::default(),
        };
        assert!(check_methods(&opts).is_ok());
        opts.read_limit = Some(100 << 20);
        let err = check_methods(&opts).expect_err("a hot method with a read limit");
        assert!(err.to_string().contains("eager@hot"), "{err}");
        // From a store, only methods that can read from one.
        opts.read_limit = None;
        opts.store = Some(store::StoreOptions {
            url: thaw::store::StoreUrl::parse("s3://bench/p").expect("a URL"),
            link: None,
            learn_from_store: false,
        });
        let err = check_methods(&opts).expect_err("a hot method from a store");
        assert!(err.to_string().contains("eager@hot"), "{err}");
        opts.methods = vec![Method::Stock, Method::Eager, Method::Lazy];
        assert!(check_methods(&opts).is_ok());
        opts.read_limit = Some(100 << 20);
        assert!(check_methods(&opts).is_err(), "a read limit with a store");
    }
}
