//! The `thaw` command line: a thin layer mapping subcommands onto the library.

mod bench;
mod limits;
mod progress;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use thaw::config::VmConfig;
use thaw::ops::recover::RestoreProgress;
use thaw::ops::restore::{EstimatorChoice, LearnWindow, Mode, RestoreOptions};
use thaw::ops::save::{SaveMethod, SaveOptions, SpeculateOptions};
use thaw::store::{client::Store, settings::StoreSettings, Location, StoreUrl};
use thaw::vmm::{self, VmState};
use thaw::wss::Estimator;

/// Save QEMU VMs and restore them lazily: the guest runs again at once while
/// its RAM streams in behind it through userfaultfd.
#[derive(Parser)]
#[command(name = "thaw", version, about, long_about = None)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// How long `thaw qmp` waits for QEMU's answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// `--mode` of `thaw restore`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    /// Install every non-zero page, then resume the guest.
    Eager,
    /// Resume at once; serve first touches on demand, fill the rest behind.
    Lazy,
    /// Prefetch the working set, resume, then as lazy.
    Ws,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Eager => Mode::Eager,
            ModeArg::Lazy => Mode::Lazy,
            ModeArg::Ws => Mode::Ws,
        }
    }
}

/// `--estimator` of `thaw restore`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EstimatorChoiceArg {
    /// The best the image has: learned, trace, abit, dirty.
    Auto,
    Learned,
    Trace,
    Abit,
    Dirty,
    /// No working set (a lazy restore that still learns).
    None,
}

impl From<EstimatorChoiceArg> for EstimatorChoice {
    fn from(e: EstimatorChoiceArg) -> EstimatorChoice {
        match e {
            EstimatorChoiceArg::Auto => EstimatorChoice::Auto,
            EstimatorChoiceArg::Learned => EstimatorChoice::Learned,
            EstimatorChoiceArg::Trace => EstimatorChoice::Trace,
            EstimatorChoiceArg::Abit => EstimatorChoice::Abit,
            EstimatorChoiceArg::Dirty => EstimatorChoice::Dirty,
            EstimatorChoiceArg::None => EstimatorChoice::None,
        }
    }
}

/// `--estimator` of `thaw track`: the estimators that watch a running VM.
#[derive(Clone, Copy, clap::ValueEnum)]
enum TrackerArg {
    /// Access-bit scanning.
    Abit,
    /// Write tracking.
    Dirty,
}

impl From<TrackerArg> for Estimator {
    fn from(t: TrackerArg) -> Estimator {
        match t {
            TrackerArg::Abit => Estimator::Abit,
            TrackerArg::Dirty => Estimator::Dirty,
        }
    }
}

/// How a save that keeps the VM running copies its RAM.
#[derive(clap::Args, Clone, Debug)]
struct LiveArgs {
    /// Keep the guest paused until all of RAM is in the image (the guest
    /// then pauses for about as long as the copy takes) instead of
    /// copying it live, copy-on-write, while the guest runs.
    #[arg(long)]
    stop_copy: bool,
    /// Live copy: pace it to this rate per second (e.g. 256M), leaving the
    /// guest more of the machine; writes still never wait for the pace.
    #[arg(long, value_parser = parse_size, conflicts_with = "stop_copy")]
    copy_limit: Option<u64>,
    /// Live copy, speculative pre-copy: at most this many pages predicted
    /// to be written (a recent `thaw track --estimator dirty` estimate, or
    /// in a series what the previous checkpoint saw written) or written
    /// while RAM is being protected are copied first, right after the
    /// resume, so the guest's writes there rarely fault; 0 turns it off
    /// [default: 4096]
    #[arg(long, conflicts_with = "stop_copy")]
    speculate_pages: Option<u64>,
    /// Copy the speculated pages in the pause instead, beside QEMU's
    /// device state: no write fault on them at all, but the pause grows
    /// by up to about a microsecond per page
    #[arg(long, conflicts_with = "stop_copy")]
    speculate_in_pause: bool,
}

impl LiveArgs {
    fn method(&self) -> SaveMethod {
        if self.stop_copy {
            SaveMethod::StopAndCopy
        } else {
            SaveMethod::Live
        }
    }

    fn speculate(&self) -> SpeculateOptions {
        SpeculateOptions {
            pages: self.speculate_pages,
            in_pause: self.speculate_in_pause,
        }
    }
}

/// Which VMs a command addresses: thaw's own, or libvirt's domains.
#[derive(clap::Args, Clone, Debug)]
struct LibvirtArgs {
    /// NAME is a libvirt domain (its QEMU runs under libvirtd, RAM shared
    /// and file-backed; see the README's libvirt section).
    #[arg(long)]
    libvirt: bool,
    /// libvirt connection URI (with --libvirt).
    #[arg(long, requires = "libvirt", default_value = thaw::vmm::libvirt::DEFAULT_URI)]
    connect: String,
}

impl LibvirtArgs {
    fn uri(&self) -> Option<String> {
        self.libvirt.then(|| self.connect.clone())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM from a YAML config (QEMU daemonized); returns once QMP is up.
    Start {
        /// The VM config (see configs/).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Save a running VM into an image directory; the VM is gone afterwards
    /// (virsh save semantics). On failure the VM keeps running. IMAGE may
    /// be in an object store (s3://BUCKET/PREFIX): the image is written
    /// under $THAW_CACHE_DIR/staging first, then uploaded (kept there if
    /// the upload fails).
    Save {
        name: String,
        image: PathBuf,
        /// Replace an existing image.
        #[arg(long)]
        force: bool,
        /// Resume the VM after the save instead of stopping QEMU (a plain
        /// checkpoint; `thaw checkpoint` also traces the working set). Live
        /// unless --stop-copy: the guest pauses only while its device state
        /// is taken and its RAM write-protected, and runs on during the copy.
        #[arg(long)]
        keep_running: bool,
        /// Write an incremental image of PREV, an earlier image of this
        /// VM: pages unchanged since PREV are not written again (restore
        /// then needs PREV, see `thaw merge`).
        #[arg(long, value_name = "PREV")]
        parent: Option<PathBuf>,
        #[command(flatten)]
        live: LiveArgs,
        #[command(flatten)]
        libvirt: LibvirtArgs,
    },
    /// Restore a VM from an image; returns once all its RAM is resident
    /// (and, after ws and lazy restores, the learning window has closed).
    /// IMAGE may be in an object store (s3://BUCKET/PREFIX): its metadata,
    /// device state and working sets are read first (kept under
    /// $THAW_CACHE_DIR, default /var/cache/thaw), its pages by ranged
    /// reads as the restore needs them.
    Restore {
        image: PathBuf,
        /// ws: prefetch the working set, run, load the rest behind; lazy:
        /// run at once, load RAM behind; eager: load all RAM, then run.
        #[arg(long, value_enum, default_value_t = ModeArg::Ws)]
        mode: ModeArg,
        /// Which working set ws mode prefetches (auto: the best the image
        /// has: learned, trace, abit, dirty).
        #[arg(long, value_enum, default_value_t = EstimatorChoiceArg::Auto)]
        estimator: EstimatorChoiceArg,
        /// Run the restored VM under another name.
        #[arg(long)]
        name: Option<String>,
        /// Do not record this restore's touches nor update the image's
        /// learned working set (no tracking window); the working set is
        /// then mapped directly, which costs the guest no faults.
        #[arg(long)]
        no_learn: bool,
        /// With --no-learn: still install the working set so that the
        /// guest's first touches are seen (skipped and unused pages).
        #[arg(long)]
        observe: bool,
        /// The tracking window after all RAM is resident ends once no new
        /// page was touched for this long (ms)...
        #[arg(long, default_value_t = 1000)]
        learn_quiet_ms: u64,
        /// ...or after this long (ms) at most.
        #[arg(long, default_value_t = 10_000)]
        learn_max_ms: u64,
        /// Limit image reads to this rate per second (e.g. 32M, 7M), to
        /// emulate networked storage; applies to faults, prefetch and fill.
        #[arg(long, value_parser = parse_size)]
        read_limit: Option<u64>,
        /// Pace the background fill to this rate per second once the guest
        /// runs (e.g. 512M), leaving the guest more of the machine; faults
        /// and the working-set prefetch are not limited.
        #[arg(long, value_parser = parse_size)]
        fill_limit: Option<u64>,
        /// Image reads in flight at once for page faults: a fault never
        /// waits behind another fault's read (raise it for slow, parallel
        /// storage).
        #[arg(long, default_value_t = thaw::ops::restore::DEFAULT_FETCH_WORKERS as u64,
              value_parser = clap::value_parser!(u64).range(1..=256))]
        fetch_workers: u64,
        /// IMAGE in an object store: once the learning window has closed,
        /// publish the refined learned working set and its evidence back to
        /// it, so the next restore on any host prefetches what this one saw
        /// (needs write access; a failure is reported, the VM runs on).
        #[arg(long, conflicts_with = "no_learn")]
        publish_learned: bool,
    },
    /// Save a running VM into an image and keep it running (live,
    /// copy-on-write: the guest pauses for milliseconds, see --stop-copy);
    /// then trace the order in which the guest touches its pages (the
    /// `trace` working set). With --interval-ms: continuous, incremental
    /// checkpoints into a directory. IMAGE may be in an object store
    /// (s3://BUCKET/PREFIX), as for save.
    Checkpoint {
        name: String,
        image: PathBuf,
        /// Replace an existing image.
        #[arg(long)]
        force: bool,
        /// The tracking window ends once no new page was touched for this
        /// long (ms)...
        #[arg(long, default_value_t = 1000)]
        window_quiet_ms: u64,
        /// ...or after this long (ms) at most.
        #[arg(long, default_value_t = 10_000)]
        window_max_ms: u64,
        /// Write an incremental image of PREV, an earlier checkpoint of
        /// this VM: pages unchanged since PREV are not written again.
        #[arg(long, value_name = "PREV", conflicts_with = "interval_ms")]
        parent: Option<PathBuf>,
        /// Continuous checkpoints: one every this many ms into the
        /// directory IMAGE (ckpt-000001, ...), each incremental on the one
        /// before, until SIGINT/SIGTERM or --count; no tracing window.
        #[arg(long)]
        interval_ms: Option<u64>,
        /// With --interval-ms: keep the last K checkpoints restorable
        /// (every K-th is a full image; at most 2K images exist).
        #[arg(long, default_value_t = 5, requires = "interval_ms")]
        keep: u32,
        /// With --interval-ms: stop after this many checkpoints.
        #[arg(long, requires = "interval_ms")]
        count: Option<u64>,
        #[command(flatten)]
        live: LiveArgs,
        #[command(flatten)]
        libvirt: LibvirtArgs,
    },
    /// Keep a working-set estimate of a running VM (the abit or dirty
    /// working set that `thaw save`/`checkpoint` store); runs until the VM
    /// goes away, --duration-ms passes, or SIGINT/SIGTERM.
    Track {
        name: String,
        /// abit: access scanning (zap page tables, read back what was
        /// mapped again); dirty: write tracking (uffd-wp + PAGEMAP_SCAN).
        #[arg(long, value_enum, default_value_t = TrackerArg::Abit)]
        estimator: TrackerArg,
        /// Time between scans (ms).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// K: the estimate holds the pages seen in the last K intervals.
        #[arg(long, default_value_t = 5)]
        keep: u32,
        /// Stop after this long (ms).
        #[arg(long)]
        duration_ms: Option<u64>,
        /// dirty: track writes with synchronous write-protect faults even
        /// where the kernel has UFFD_FEATURE_WP_ASYNC (the automatic
        /// fallback on older kernels).
        #[arg(long)]
        sync_wp: bool,
        #[command(flatten)]
        libvirt: LibvirtArgs,
    },
    /// Restore one saved VM by every method side by side (stock QEMU, thaw
    /// eager, lazy, ws per estimator) from a cold cache and report time to
    /// running, time to responsiveness, time to full residency, faults and
    /// bytes read (Markdown; --json for everything, samples included).
    Bench {
        /// VM config; its guest must run the workload in throughput mode
        /// (thaw.tput_ms=50), e.g. configs/bench-tput-2g.yaml.
        #[arg(long, short, required_unless_present = "reanalyse")]
        config: Option<PathBuf>,
        /// Instead of running: re-derive TTRs and the summary from the
        /// samples of an earlier run's bench.json (with --out: rewrite its
        /// files there).
        #[arg(long, conflicts_with = "config")]
        reanalyse: Option<PathBuf>,
        /// Comma-separated: stock, mapped-ram, eager, lazy, ws:learned,
        /// ws:trace, ws:abit, ws:dirty (default: all); also lazy:learn (a
        /// learning lazy restore) and ws:auto (the set the image's evidence
        /// favours). eager, lazy and ws:* with `@hot` (e.g. ws:learned@hot)
        /// restore from a hot page cache in the same run: the floor of a
        /// local-disk restore.
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Restores per method; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Limit thaw's image reads to this rate per second (e.g. 32M).
        #[arg(long, value_parser = parse_size)]
        read_limit: Option<u64>,
        /// Pace thaw's background fill to this rate per second once the
        /// guest runs (restore's --fill-limit).
        #[arg(long, value_parser = parse_size)]
        fill_limit: Option<u64>,
        /// Warm-up before the warm rate is measured (ms)...
        #[arg(long, default_value_t = 5000)]
        warmup_ms: u64,
        /// ...and the window it is measured over (ms).
        #[arg(long, default_value_t = 3000)]
        measure_ms: u64,
        /// How long each restored guest is watched after its RAM is resident (ms).
        #[arg(long, default_value_t = 3000)]
        settle_ms: u64,
        /// Where the image and the stock migration files go.
        #[arg(long, default_value = "/var/lib/thaw/bench")]
        dir: PathBuf,
        /// Skip measuring this machine's limits after the restores.
        #[arg(long)]
        no_limits: bool,
        /// Interactive probe period (ms): a `PROBE` request on the guest's
        /// console, answered by the workload after one hot-block check; 0 = off.
        #[arg(long, default_value_t = crate::bench::PROBE_PERIOD_MS)]
        probe_ms: u64,
        /// Also write bench.json, bench.md and throughput.svg (the guest's
        /// throughput after each method's first restore) into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run the VM as a libvirt domain (its XML made from the config)
        /// and compare with what libvirt users do: methods virsh (virsh
        /// save + restore) and virsh-sparse (--image-format sparse
        /// --parallel-channels 2) instead of stock and mapped-ram; no probes.
        #[command(flatten)]
        libvirt: LibvirtArgs,
        /// Measure a real server in the guest with its own client from the
        /// host instead of the workload's reports: redis (the guest of
        /// tests/guest/build-app.sh redis, e.g. configs/apps/redis.yaml; run
        /// inside the network namespace of ci/app-net.sh). TTR and the first
        /// answer are then the client's.
        #[arg(long, conflicts_with_all = ["libvirt", "app_spec"])]
        app: Option<String>,
        /// Measure any other server with its own client: a YAML file naming
        /// `name`, `ping`, `pass` and `requests_per_pass` (and optionally
        /// `addr`, `port`, `load`, `verify`): shell commands run on the host
        /// with the guest's address in THAW_APP_ADDR (see the README).
        #[arg(long, conflicts_with = "libvirt")]
        app_spec: Option<PathBuf>,
        /// Bytes of values loaded into the application before the save.
        #[arg(long, value_parser = parse_size, default_value = "1G", requires = "app")]
        app_data: u64,
        /// Bytes of them (the hot keys) each client pass reads.
        #[arg(long, value_parser = parse_size, default_value = "20M", requires = "app")]
        app_hot: u64,
        /// Restore from a hot page cache (the image read into it before
        /// each restore, no drop_caches): the floor of a local-disk restore.
        #[arg(long)]
        hot_cache: bool,
        /// Restore from an object store: the image (PREFIX/thaw) and stock
        /// QEMU's migration stream (PREFIX/stock) are put at
        /// s3://BUCKET/PREFIX, and every restore reads from there: thaw's
        /// straight from the store, stock's by downloading the stream
        /// before migrate-incoming (store settings as for `thaw push`).
        #[arg(long, conflicts_with_all = ["read_limit", "hot_cache"])]
        store: Option<String>,
        /// The link to the store, as shaped (e.g. by ci/store-link.sh): its
        /// round-trip time in ms...
        #[arg(long, requires_all = ["store", "link_rate"])]
        link_rtt_ms: Option<f64>,
        /// ...and its rate per second each way (e.g. 12.5M): the floors the
        /// results are compared with.
        #[arg(long, value_parser = parse_size, requires_all = ["store", "link_rtt_ms"])]
        link_rate: Option<u64>,
        /// With --store: the learning restore before ws:learned is a first
        /// host's, from the store across the link (the image as pushed,
        /// an empty cache), and publishes what it learned there
        /// (`--publish-learned`); the measured restores prefetch that.
        #[arg(long, requires = "store")]
        learn_from_store: bool,
        /// The windows in which the working sets are recorded (the trace
        /// after the checkpoint, and the learning restore's before
        /// ws:learned) end once no new page was touched for this long
        /// (ms)...
        #[arg(long, default_value_t = 1000)]
        record_quiet_ms: u64,
        /// ...or after this long (ms) at most.
        #[arg(long, default_value_t = 10_000)]
        record_max_ms: u64,
    },
    /// Measure what a checkpoint costs the running guest: live
    /// (copy-on-write) against stop-and-copy, side by side, at one or
    /// more RAM sizes: the pause, the guest's work during the copy, its
    /// longest stall and the probe latency.
    BenchCheckpoint {
        /// VM config; its guest must run the workload in throughput mode
        /// (thaw.tput_ms=50), e.g. configs/bench-tput-2g.yaml.
        #[arg(long, short)]
        config: PathBuf,
        /// Comma-separated: live, stop-and-copy.
        #[arg(long, value_delimiter = ',', default_value = "live,stop-and-copy")]
        methods: Vec<String>,
        /// Checkpoints per method and size; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Comma-separated RAM sizes to boot the VM with (e.g.
        /// 1G,2G,4G,8G; the workload fills three quarters); default: the
        /// config's.
        #[arg(long, value_delimiter = ',', value_parser = parse_size)]
        sizes: Vec<u64>,
        /// Pace live copies to this rate per second.
        #[arg(long, value_parser = parse_size)]
        copy_limit: Option<u64>,
        /// Warm-up before the warm rate is measured (ms)...
        #[arg(long, default_value_t = 5000)]
        warmup_ms: u64,
        /// ...and the window it is measured over (ms).
        #[arg(long, default_value_t = 3000)]
        measure_ms: u64,
        /// Console probe period (ms); 0 = off.
        #[arg(long, default_value_t = crate::bench::PROBE_PERIOD_MS)]
        probe_ms: u64,
        /// Where the images go (each is removed after its run).
        #[arg(long, default_value = "/var/lib/thaw/bench-checkpoint")]
        dir: PathBuf,
        /// Also write checkpoint.json and checkpoint.md into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write an incremental image and the chain of parents below it into
    /// one full image OUT that no longer needs them.
    Merge {
        image: PathBuf,
        out: PathBuf,
        /// Replace an existing image at OUT.
        #[arg(long)]
        force: bool,
    },
    /// Describe an image: VM, QEMU, RAM layout, sizes, working sets. An
    /// image in an object store (s3://BUCKET/PREFIX): its manifest and
    /// metadata.
    Inspect { image: PathBuf },
    /// Upload the image in directory LOCAL to an object store
    /// (s3://BUCKET/PREFIX); it becomes visible there only once complete.
    /// The store is found as S3 tools find it: AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or a profile
    /// of ~/.aws/credentials and ~/.aws/config (AWS_PROFILE).
    Push {
        local: PathBuf,
        url: String,
        /// Replace an image already at URL.
        #[arg(long)]
        force: bool,
        /// Only publish LOCAL's working sets and their evidence to the same
        /// image already at URL (new versions, named by its manifest in one
        /// atomic write); what the store has as it is here is skipped.
        #[arg(long, conflicts_with = "force")]
        working_sets: bool,
    },
    /// Download the image at s3://BUCKET/PREFIX into directory LOCAL,
    /// every file checked against the image's manifest (store settings as
    /// for push).
    Pull {
        url: String,
        local: PathBuf,
        /// Replace an image already at LOCAL.
        #[arg(long)]
        force: bool,
    },
    /// List running VMs.
    List,
    /// Show a VM's state.
    Status {
        name: String,
        #[command(flatten)]
        libvirt: LibvirtArgs,
    },
    /// Run a QMP command on a VM's second monitor (`query.sock` in its
    /// runtime directory), which thaw never holds for long: usable while a
    /// save or restore holds the main one, e.g.
    /// `thaw qmp demo balloon '{"value": 402653184}'`. Prints the reply.
    Qmp {
        name: String,
        /// The command, e.g. query-balloon, balloon, query-status.
        command: String,
        /// Its arguments as a JSON object.
        #[arg(default_value = "{}")]
        arguments: String,
    },
    /// Finish a restore whose thaw process died (killed, crashed): take
    /// QEMU's userfaultfd again from the runtime directory's record, keep the
    /// pages already in guest RAM, serve the guest's faults and fill the rest.
    Recover { name: String },
    /// Stop a VM (QMP quit; SIGKILL with --force or if quit fails).
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Measure this machine's physical limits for lazy restore: the
    /// cross-process userfaultfd fault round trip, UFFDIO_COPY throughput by
    /// batch size, cold sequential read bandwidth and one cold page read. Needs root (ptrace
    /// and userfaultfd over a child process).
    Limits {
        /// Pages a child process touches in the fault test (one fault each).
        #[arg(long, default_value_t = 20_000)]
        faults: u64,
        /// Bytes copied per batch size in the UFFDIO_COPY test (e.g. 256M).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        copy_bytes: u64,
        /// Size of the scratch file of the read test (e.g. 1G).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        read_bytes: u64,
        /// Directory for the read test's scratch file (created 0700 if
        /// missing); put it on the disk that holds your images.
        #[arg(long, default_value = crate::limits::DEFAULT_DIR)]
        dir: PathBuf,
        /// Skip the warm re-read from the page cache.
        #[arg(long)]
        no_warm: bool,
        /// Skip the fault tests pinned to one CPU and across two CPUs
        /// (they show what the scheduler's placement costs).
        #[arg(long)]
        no_pinned: bool,
    },
    /// Internal: the process `thaw limits` measures faults in.
    #[command(name = crate::limits::CHILD_SUBCOMMAND, hide = true)]
    LimitsChild,
}

fn parse_size(text: &str) -> Result<u64, String> {
    thaw::config::ByteSize::parse(text).map(|b| b.0)
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    if let Command::LimitsChild = cli.command {
        // Single-threaded on purpose: no async runtime in the measured child.
        std::process::exit(crate::limits::child_main());
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thaw: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = rt.block_on(run(cli));
    // A libvirt call that timed out may still block its thread: never
    // wait for it on the way out.
    rt.shutdown_timeout(Duration::from_millis(100));
    if let Err(e) = result {
        eprintln!("thaw: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// Resolves on SIGINT or SIGTERM (never, if the handlers cannot be set).
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message before it already carries (library errors name their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn print(
    json_out: bool,
    value: &impl serde::Serialize,
    text: impl std::fmt::Display,
) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let j = cli.json;
    // A thaw that died mid-save or mid-restore of a libvirt domain may have
    // left x-ignore-shared on there: every command repairs that first.
    thaw::vmm::libvirt::repair_ignore_shared().await;
    match cli.command {
        Command::Start { config } => {
            let cfg = VmConfig::load(&config)?;
            let accel = vmm::resolve_accel(&cfg)?;
            let launched = vmm::launch(&cfg, accel, false)
                .await
                .with_context(|| format!("starting VM {}", cfg.name))?;
            let s = &launched.state;
            let out = json!({ "name": cfg.name, "pid": s.qemu_pid, "accel": s.accel,
                "qemu_version": s.qemu_version, "serial": s.serial, "qmp": launched.paths.qmp });
            print(
                j,
                &out,
                format_args!(
                    "started {} (pid {}, {}, QEMU {}); console: {}",
                    cfg.name,
                    s.qemu_pid,
                    s.accel,
                    s.qemu_version,
                    s.serial.display()
                ),
            )
        }
        Command::Save {
            name,
            image,
            force,
            keep_running,
            parent,
            live,
            libvirt,
        } => {
            if !keep_running
                && (live.stop_copy
                    || live.copy_limit.is_some()
                    || live.speculate_pages.is_some()
                    || live.speculate_in_pause)
            {
                anyhow::bail!(
                    "--stop-copy, --copy-limit, --speculate-pages and --speculate-in-pause \
                     choose how a save that \
                     keeps the VM running copies it; without --keep-running the guest stays \
                     paused until QEMU stops"
                );
            }
            let target = StoreTarget::of(&image, &name, parent.as_deref(), force).await?;
            let local = target.as_ref().map_or(image.clone(), |t| t.staging.clone());
            let report = thaw::ops::save::save(
                &name,
                &local,
                &SaveOptions {
                    // A staging directory is thaw's own: never in the way.
                    force: force || target.is_some(),
                    keep_running,
                    leave_paused: false,
                    progress: progress::terminal_bar(),
                    libvirt: libvirt.uri(),
                    method: live.method(),
                    copy_limit: live.copy_limit,
                    parent,
                    speculate: live.speculate(),
                    predicted: None,
                },
            )
            .await
            .with_context(|| format!("saving VM {name} to {}", image.display()))?;
            if let Some(target) = target {
                let pushed = target.push(force).await?;
                let mut out = serde_json::to_value(&report)?;
                out["pushed"] = serde_json::to_value(&pushed)?;
                return print(j, &out, format_args!(
                    "saved {} to {}: {} MiB RAM, {} non-zero pages; paused {:.0} ms; uploaded {} MiB in {:.1} s",
                    report.name, pushed.url, report.ram_bytes >> 20, report.nonzero_pages,
                    report.paused_ms, pushed.bytes >> 20, pushed.seconds
                ));
            }
            let copied = match &report.live {
                Some(l) => format!(
                    "; copied live in {:.0} ms, {} write faults, {} pages copied ahead",
                    l.copy_ms, l.wp_faults, l.speculated_pages
                ),
                None => String::new(),
            };
            print(j, &report, format_args!(
                "saved {} to {}: {} MiB RAM, {} non-zero pages, device state {} KiB; paused {:.0} ms{copied}",
                report.name, report.image.display(), report.ram_bytes >> 20, report.nonzero_pages,
                report.device_state_bytes >> 10, report.paused_ms
            ))
        }
        Command::Restore {
            image,
            mode,
            estimator,
            name,
            no_learn,
            observe,
            learn_quiet_ms,
            learn_max_ms,
            read_limit,
            fill_limit,
            fetch_workers,
            publish_learned,
        } => {
            let learn = (!no_learn).then_some(LearnWindow {
                quiet: Duration::from_millis(learn_quiet_ms),
                max: Duration::from_millis(learn_max_ms),
            });
            let opts = RestoreOptions {
                mode: mode.into(),
                name,
                estimator: estimator.into(),
                learn,
                observe,
                read_limit,
                fill_limit,
                // At most 256 (checked by clap).
                fetch_workers: usize::try_from(fetch_workers).unwrap_or(1),
                progress: progress::terminal_bar(),
            };
            // From an object store: everything but the pages first, then
            // the pages by ranged reads as the restore needs them.
            let location = Location::parse(&image)?;
            if publish_learned && !matches!(location, Location::Store(_)) {
                anyhow::bail!(
                    "--publish-learned publishes to the store the image came from; for an image \
                     in a directory use `thaw push {} s3://… --working-sets`",
                    image.display()
                );
            }
            let (local, metadata) = match &location {
                Location::Local(dir) => (dir.clone(), None),
                Location::Store(url) => {
                    let store = connect(url)?;
                    let prepared = thaw::store::lazy::prepare(
                        &store,
                        url,
                        &thaw::store::lazy::cache_root(),
                        &thaw::store::lazy::WorkingSets::for_restore(
                            opts.mode,
                            opts.estimator,
                            opts.learn.is_some(),
                        ),
                        &*progress::terminal_bar(),
                    )
                    .await
                    .with_context(|| format!("reading {url}"))?;
                    (prepared.dir, Some(prepared.fetched))
                }
            };
            let mut stats = thaw::ops::restore::restore(&local, &opts)
                .await
                .with_context(|| format!("restoring {}", image.display()))?;
            stats.store_metadata = metadata;
            let (true, Location::Store(url)) = (publish_learned, &location) else {
                return print(j, &stats, &stats);
            };
            // The VM runs whatever happens here: a failed publish is
            // reported, not an error of the restore.
            let published = if stats.learned_pages == 0 {
                Err(anyhow::anyhow!(
                    "nothing to publish: this restore did not update the learned working set"
                ))
            } else {
                let learned = thaw::wss::Estimator::Learned.file_name();
                publish_to(url, &local, &|name| {
                    name == learned || name == thaw::wss::evidence::FILE
                })
                .await
            };
            let mut out = serde_json::to_value(&stats)?;
            let line = match &published {
                Ok(report) => {
                    out["publish"] = serde_json::to_value(report)?;
                    report.to_string()
                }
                Err(e) => {
                    log::warn!("the learned working set was not published: {e:#}");
                    out["publish_error"] = format!("{e:#}").into();
                    format!("not published: {e:#}")
                }
            };
            print(j, &out, format_args!("{stats}\n{line}"))
        }
        Command::Checkpoint {
            name,
            image,
            force,
            window_quiet_ms,
            window_max_ms,
            parent,
            interval_ms,
            keep,
            count,
            live,
            libvirt,
        } => {
            if let Some(interval_ms) = interval_ms {
                if Location::parse(&image)? != Location::Local(image.clone()) {
                    anyhow::bail!(
                        "a series (--interval-ms) is kept in a directory; push the images \
                         you want to keep with `thaw push`"
                    );
                }
                let opts = thaw::ops::series::SeriesOptions {
                    interval: Duration::from_millis(interval_ms),
                    keep,
                    count,
                    method: live.method(),
                    copy_limit: live.copy_limit,
                    speculate: live.speculate(),
                    libvirt: libvirt.uri(),
                };
                let report = thaw::ops::series::run(&name, &image, &opts, termination())
                    .await
                    .with_context(|| format!("checkpointing VM {name} into {}", image.display()))?;
                print(j, &report, &report)?;
                if report.ended_by != "count" && report.ended_by != "signal" {
                    anyhow::bail!(
                        "the series ended with a failed checkpoint: {}",
                        report.ended_by
                    );
                }
                return Ok(());
            }
            let window = LearnWindow {
                quiet: Duration::from_millis(window_quiet_ms),
                max: Duration::from_millis(window_max_ms),
            };
            let target = StoreTarget::of(&image, &name, parent.as_deref(), force).await?;
            let local = target.as_ref().map_or(image.clone(), |t| t.staging.clone());
            let report = thaw::ops::checkpoint::checkpoint(
                &name,
                &local,
                &thaw::ops::checkpoint::CheckpointOptions {
                    force: force || target.is_some(),
                    window,
                    libvirt: libvirt.uri(),
                    method: live.method(),
                    copy_limit: live.copy_limit,
                    parent,
                    speculate: live.speculate(),
                    predicted: None,
                    progress: progress::terminal_bar(),
                },
            )
            .await
            .with_context(|| format!("checkpointing VM {name} to {}", image.display()))?;
            if let Some(target) = target {
                let pushed = target.push(force).await?;
                let mut out = serde_json::to_value(&report)?;
                out["pushed"] = serde_json::to_value(&pushed)?;
                return print(
                    j,
                    &out,
                    format_args!(
                        "{report}\nuploaded to {}: {} MiB in {:.1} s",
                        pushed.url,
                        pushed.bytes >> 20,
                        pushed.seconds
                    ),
                );
            }
            print(j, &report, &report)
        }
        Command::Track {
            name,
            estimator,
            interval_ms,
            keep,
            duration_ms,
            sync_wp,
            libvirt,
        } => {
            let opts = thaw::ops::track::TrackOptions {
                interval: Duration::from_millis(interval_ms),
                keep,
                duration: duration_ms.map(Duration::from_millis),
                estimator: estimator.into(),
                sync_wp,
                libvirt: libvirt.uri(),
            };
            let report = thaw::ops::track::track(&name, opts, termination())
                .await
                .with_context(|| format!("tracking VM {name}"))?;
            print(j, &report, &report)
        }
        Command::BenchCheckpoint {
            config,
            methods,
            runs,
            sizes,
            copy_limit,
            warmup_ms,
            measure_ms,
            probe_ms,
            dir,
            out,
        } => {
            let opts = crate::bench::checkpoint::CheckpointBenchOptions {
                config,
                methods: methods
                    .iter()
                    .map(|m| crate::bench::checkpoint::parse_method(m))
                    .collect::<Result<Vec<_>, _>>()?,
                runs: runs.max(1),
                sizes,
                copy_limit,
                warmup: Duration::from_millis(warmup_ms),
                measure: Duration::from_millis(measure_ms),
                dir,
                probe_period: (probe_ms > 0).then(|| Duration::from_millis(probe_ms)),
            };
            let report = crate::bench::checkpoint::run(&opts)
                .await
                .context("checkpoint benchmark")?;
            if let Some(out) = out {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("creating {}", out.display()))?;
                std::fs::write(
                    out.join("checkpoint.json"),
                    serde_json::to_vec_pretty(&report)?,
                )
                .context("writing checkpoint.json")?;
                std::fs::write(out.join("checkpoint.md"), report.markdown())
                    .context("writing checkpoint.md")?;
            }
            print(j, &report, &report)
        }
        Command::Bench {
            config,
            reanalyse,
            methods,
            runs,
            read_limit,
            fill_limit,
            warmup_ms,
            measure_ms,
            settle_ms,
            dir,
            out,
            no_limits,
            probe_ms,
            libvirt,
            app,
            app_spec,
            app_data,
            app_hot,
            hot_cache,
            store,
            link_rtt_ms,
            link_rate,
            learn_from_store,
            record_quiet_ms,
            record_max_ms,
        } => {
            let methods = if methods.is_empty() && libvirt.libvirt {
                crate::bench::Method::all_libvirt()
            } else if methods.is_empty() {
                crate::bench::Method::all()
            } else {
                methods
                    .iter()
                    .map(|m| crate::bench::Method::parse(m))
                    .collect::<Result<Vec<_>, _>>()?
            };
            let report = match (reanalyse, config) {
                (Some(path), _) => {
                    let text = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let mut report: crate::bench::BenchReport = serde_json::from_slice(&text)
                        .with_context(|| format!("{} is not a bench.json", path.display()))?;
                    report.reanalyse();
                    report
                }
                (None, config) => {
                    let config = config.context("--config is required")?;
                    let opts = crate::bench::BenchOptions {
                        config,
                        methods,
                        runs: runs.max(1),
                        read_limit,
                        fill_limit,
                        warmup: Duration::from_millis(warmup_ms),
                        measure: Duration::from_millis(measure_ms),
                        settle: Duration::from_millis(settle_ms),
                        dir,
                        limits: !no_limits,
                        probe_period: (probe_ms > 0).then(|| Duration::from_millis(probe_ms)),
                        libvirt: libvirt.uri(),
                        app: match (app, app_spec) {
                            (_, Some(spec)) => Some(crate::bench::AppOptions {
                                kind: crate::bench::app::AppKind::Custom,
                                data: app_data,
                                hot: app_hot,
                                spec: Some(spec),
                            }),
                            (Some(a), None) => Some(crate::bench::AppOptions {
                                kind: crate::bench::app::AppKind::parse(&a)?,
                                data: app_data,
                                hot: app_hot,
                                spec: None,
                            }),
                            (None, None) => None,
                        },
                        hot_cache,
                        store: store
                            .map(|url| {
                                Ok::<_, anyhow::Error>(crate::bench::store::StoreOptions {
                                    url: StoreUrl::parse(&url)?,
                                    link: link_rtt_ms.zip(link_rate).map(|(rtt_ms, rate)| {
                                        crate::bench::store::Link { rtt_ms, rate }
                                    }),
                                    learn_from_store,
                                })
                            })
                            .transpose()?,
                        record_window: LearnWindow {
                            quiet: Duration::from_millis(record_quiet_ms),
                            max: Duration::from_millis(record_max_ms),
                        },
                    };
                    crate::bench::run(&opts).await.context("benchmark")?
                }
            };
            if let Some(out) = out {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("creating {}", out.display()))?;
                std::fs::write(out.join("bench.json"), serde_json::to_vec_pretty(&report)?)
                    .context("writing bench.json")?;
                std::fs::write(out.join("bench.md"), report.markdown())
                    .context("writing bench.md")?;
                crate::bench::plot::throughput_svg(&report, &out.join("throughput.svg"))?;
            }
            print(j, &report, &report)
        }
        Command::Merge { image, out, force } => {
            let img = thaw::image::Image::open(&image)
                .with_context(|| format!("opening {}", image.display()))?;
            let summary = thaw::image::chain::merge(&img, &out, force, &*progress::terminal_bar())
                .with_context(|| format!("merging {} into {}", image.display(), out.display()))?;
            print(
                j,
                &summary,
                format_args!(
                    "merged {} ({} image(s) below it) into {}: {} non-zero pages",
                    image.display(),
                    img.parent().map_or(0, |(_, d)| d),
                    out.display(),
                    summary.nonzero_pages
                ),
            )
        }
        Command::Inspect { image } => {
            if let Location::Store(url) = Location::parse(&image)? {
                let store = connect(&url)?;
                let stored = thaw::store::transfer::describe(&store, &url)
                    .await
                    .with_context(|| format!("inspecting {url}"))?;
                return print(j, &stored, &stored);
            }
            let img = thaw::image::Image::open(&image)
                .with_context(|| format!("opening {}", image.display()))?;
            let report = thaw::image::inspect(&img);
            let mut sets = Vec::new();
            let mut text = report.to_string();
            for s in thaw::wss::summarize(&img) {
                match s {
                    Ok(s) => {
                        text.push_str(&format!("\n{s}"));
                        sets.push(serde_json::to_value(&s)?);
                    }
                    Err(e) => {
                        text.push_str(&format!("\n  {e}"));
                        sets.push(json!({ "error": e.to_string() }));
                    }
                }
            }
            let mut out = serde_json::to_value(&report)?;
            out["working_sets"] = serde_json::Value::Array(sets);
            match thaw::wss::evidence::Evidence::load(&img) {
                Ok(evidence) => {
                    text.push_str(&format!("\n{evidence}"));
                    out["evidence"] = serde_json::to_value(&evidence)?;
                }
                Err(e) => {
                    text.push_str(&format!("\n  {e}"));
                    out["evidence"] = json!({ "error": e.to_string() });
                }
            }
            print(j, &out, text)
        }
        Command::Push {
            local,
            url,
            working_sets: true,
            ..
        } => {
            let url = StoreUrl::parse(&url)?;
            let report = publish_to(&url, &local, &|_| true).await?;
            print(j, &report, &report)
        }
        Command::Push {
            local, url, force, ..
        } => {
            let url = StoreUrl::parse(&url)?;
            let store = connect(&url)?;
            let report = thaw::store::transfer::push(
                &store,
                &local,
                &url,
                force,
                &*progress::terminal_bar(),
            )
            .await
            .with_context(|| format!("pushing {} to {url}", local.display()))?;
            print(
                j,
                &report,
                format_args!(
                    "pushed {} to {}: {} files, {} MiB in {:.1} s ({:.0} MiB/s)",
                    local.display(),
                    report.url,
                    report.files,
                    report.bytes >> 20,
                    report.seconds,
                    report.mib_per_sec
                ),
            )
        }
        Command::Pull { url, local, force } => {
            let url = StoreUrl::parse(&url)?;
            let store = connect(&url)?;
            let report = thaw::store::transfer::pull(
                &store,
                &url,
                &local,
                force,
                &*progress::terminal_bar(),
            )
            .await
            .with_context(|| format!("pulling {url} into {}", local.display()))?;
            print(
                j,
                &report,
                format_args!(
                "pulled {} into {}: {} files, {} MiB in {:.1} s ({:.0} MiB/s), every file verified",
                report.url, local.display(), report.files, report.bytes >> 20,
                report.seconds, report.mib_per_sec
            ),
            )
        }
        Command::List => {
            let mut rows = Vec::new();
            for name in vmm::list_vms() {
                if let Ok((paths, state)) = VmState::load(&name) {
                    let status = vmm::query_run_state(&paths, &state).await;
                    let ignore_shared = vmm::libvirt::IgnoreSharedMark::present(&paths.dir);
                    rows.push(
                        json!({ "name": name, "pid": state.qemu_pid, "status": status,
                        "memory": state.config.memory, "accel": state.accel,
                        "libvirt": state.libvirt.as_ref().map(|l| &l.uri),
                        "ignore_shared_may_be_on": ignore_shared }),
                    );
                }
            }
            let text = rows
                .iter()
                .map(|r| {
                    format!(
                        "{:<20} {:>8} {:<10} {:>6} {}{}{}",
                        r["name"].as_str().unwrap_or(""),
                        r["pid"],
                        r["status"].as_str().unwrap_or(""),
                        r["memory"].as_str().unwrap_or(""),
                        r["accel"].as_str().unwrap_or(""),
                        r["libvirt"]
                            .as_str()
                            .map(|u| format!(" libvirt {u}"))
                            .unwrap_or_default(),
                        if r["ignore_shared_may_be_on"] == true {
                            " WARNING: x-ignore-shared may be on"
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                j,
                &rows,
                if text.is_empty() {
                    "no VMs running".to_string()
                } else {
                    text
                },
            )
        }
        Command::Qmp {
            name,
            command,
            arguments,
        } => {
            let args: serde_json::Value = serde_json::from_str(&arguments)
                .with_context(|| format!("QMP arguments {arguments:?} are not JSON"))?;
            anyhow::ensure!(
                args.is_object(),
                "QMP arguments must be a JSON object, not {arguments}"
            );
            let (paths, state) = VmState::load(&name)?;
            let ask = async {
                // A libvirt domain's commands pass through libvirtd.
                let mut qmp = match state.libvirt {
                    Some(_) => state.monitor(&paths).await,
                    None => vmm::Qmp::connect(&paths.query).await.map_err(Into::into),
                }
                .with_context(|| format!("connecting to VM {name}'s monitor"))?;
                qmp.execute(&command, args)
                    .await
                    .with_context(|| format!("QMP {command} on VM {name}"))
            };
            // QEMU answers no monitor while a vCPU waits in a guest discard
            // for a thaw that died (see `thaw status`, `thaw recover`).
            let reply = tokio::time::timeout(QMP_TIMEOUT, ask)
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "VM {name}'s QEMU did not answer within {QMP_TIMEOUT:?} (busy: see `thaw status {name}`)"
                    )
                })??;
            // The reply is JSON either way.
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(())
        }
        Command::Status { name, libvirt } => {
            let (paths, state) = match libvirt.uri() {
                Some(uri) => vmm::libvirt::attach(&uri, &name).await?,
                None => VmState::load(&name)?,
            };
            let status = vmm::query_run_state(&paths, &state).await;
            let restore = thaw::ops::recover::progress(&paths);
            let ignore_shared = vmm::libvirt::IgnoreSharedMark::present(&paths.dir);
            if ignore_shared {
                log::warn!(
                    "{name}: x-ignore-shared may be on (a thaw operation is running or stopped early): \
                     a `virsh save` now would leave guest RAM out; `thaw recover {name}` or any thaw command repairs it"
                );
            }
            let out = json!({ "name": name, "status": status, "pid": state.qemu_pid, "accel": state.accel,
                "memory": state.config.memory, "qemu_version": state.qemu_version,
                "serial": state.serial, "restore": restore,
                "restore_in_progress": restore == RestoreProgress::Running,
                "libvirt": state.libvirt, "ignore_shared_may_be_on": ignore_shared });
            print(
                j,
                &out,
                format_args!(
                    "{name}: {status} (pid {}, {}, {} RAM, QEMU {}{}){}",
                    state.qemu_pid,
                    state.accel,
                    state.config.memory,
                    state.qemu_version,
                    state
                        .libvirt
                        .as_ref()
                        .map(|l| format!(", libvirt domain at {}", l.uri))
                        .unwrap_or_default(),
                    match restore {
                        RestoreProgress::None => String::new(),
                        RestoreProgress::Running => ", restore in progress".into(),
                        RestoreProgress::Interrupted => format!(
                            ", restore interrupted (its thaw died): run `thaw recover {name}`"
                        ),
                    }
                ),
            )
        }
        Command::Recover { name } => {
            let stats = thaw::ops::recover::recover(&name, progress::terminal_bar())
                .await
                .with_context(|| format!("recovering {name}"))?;
            print(j, &stats, &stats)
        }
        Command::Stop { name, force } => {
            let (paths, state) = VmState::load(&name)?;
            vmm::stop(&paths, &state, force).await?;
            print(
                j,
                &json!({ "name": name, "stopped": true }),
                format_args!("stopped {name}"),
            )
        }
        Command::Limits {
            faults,
            copy_bytes,
            read_bytes,
            dir,
            no_warm,
            no_pinned,
        } => {
            let opts = crate::limits::LimitsOptions {
                fault_pages: faults,
                copy_region_bytes: copy_bytes,
                read_bytes,
                dir,
                warm_read: !no_warm,
                pinned_faults: !no_pinned,
                ..Default::default()
            };
            let report = tokio::task::spawn_blocking(move || crate::limits::measure(&opts))
                .await
                .context("the measurement thread failed")?
                .context("measuring this machine's limits")?;
            print(j, &report, &report)
        }
        Command::LimitsChild => {
            anyhow::bail!(
                "{} runs before the async runtime starts",
                crate::limits::CHILD_SUBCOMMAND
            )
        }
    }
}

/// A client of the bucket of `url`, with the settings S3 tools would use.
fn connect(url: &StoreUrl) -> anyhow::Result<Store> {
    let settings = StoreSettings::from_environment()?;
    log::debug!("object store: {}", settings.source);
    Ok(Store::connect(&settings, &url.bucket)?)
}

/// Publishes the working sets of the image in `local` that `wanted`
/// selects to the same image at `url`.
async fn publish_to(
    url: &StoreUrl,
    local: &Path,
    wanted: &dyn Fn(&str) -> bool,
) -> anyhow::Result<thaw::store::publish::PublishReport> {
    let store = connect(url)?;
    thaw::store::publish::publish(&store, url, local, wanted, &*progress::terminal_bar())
        .await
        .with_context(|| {
            format!(
                "publishing the working sets of {} to {url}",
                local.display()
            )
        })
}

/// A save or checkpoint into an object store: written into a staging
/// directory of thaw's own, its pages uploaded while they are written
/// (unless an image is being replaced there: then after the save), then
/// the rest pushed (the image is visible there once complete) and the
/// staging directory removed. If the save fails the upload is aborted; if
/// the push fails the image stays in the staging directory, and the error
/// says where.
struct StoreTarget {
    url: StoreUrl,
    staging: PathBuf,
    upload: Option<thaw::store::stream::StreamedUpload>,
}

impl Drop for StoreTarget {
    fn drop(&mut self) {
        // Not pushed: the save failed.
        if let Some(upload) = self.upload.take() {
            upload.abort();
        }
    }
}

impl StoreTarget {
    /// `Some` if `image` is an `s3://` URL.
    async fn of(
        image: &Path,
        name: &str,
        parent: Option<&Path>,
        force: bool,
    ) -> anyhow::Result<Option<StoreTarget>> {
        let Location::Store(url) = Location::parse(image)? else {
            return Ok(None);
        };
        // Fail before the VM is touched if the store cannot be reached,
        // an image is in the way or an incremental image's parent is not
        // in the store next to it.
        let store = connect(&url)?;
        if let Some(parent) = parent {
            let opened = thaw::image::Image::open(parent)
                .with_context(|| format!("opening the parent {}", parent.display()))?;
            // Named as the image will record it (its real path).
            let real = std::fs::canonicalize(parent)
                .with_context(|| format!("resolving the parent {}", parent.display()))?;
            let dir_name = real
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: not a directory name", parent.display()))?;
            let expected = thaw::store::transfer::ManifestParent {
                url: url.sibling(dir_name).to_string(),
                identity: format!("{:016x}", opened.identity()),
            };
            thaw::store::transfer::check_parent(&store, &expected, parent).await?;
        }
        let manifest = url.object(thaw::store::transfer::MANIFEST);
        let replacing = store.head(&manifest).await?.is_some();
        if replacing && !force {
            anyhow::bail!("{url}: an image is already there (use --force to replace it)");
        }
        let root = thaw::store::lazy::cache_root()
            .parent()
            .map(|p| p.join("staging"))
            .unwrap_or_else(|| PathBuf::from("/var/cache/thaw/staging"));
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating the staging directory {}", root.display()))?;
        let staging = root.join(format!("{name}.{}", std::process::id()));
        // The old image's pages stay readable until its manifest goes: a
        // replacement uploads after the save.
        let upload = if replacing {
            None
        } else {
            thaw::store::stream::StreamedUpload::start(
                StoreSettings::from_environment()?,
                url.clone(),
                &staging,
            )
            .map_err(|e| log::warn!("{e}: uploading after the save"))
            .ok()
        };
        Ok(Some(StoreTarget {
            url,
            staging,
            upload,
        }))
    }

    async fn push(mut self, force: bool) -> anyhow::Result<thaw::store::transfer::TransferReport> {
        let store = connect(&self.url)?;
        let uploaded = self.upload.take().and_then(|u| {
            u.finish()
                .map_err(|e| {
                    log::warn!("uploading the pages while saving: {e}; uploading them now")
                })
                .ok()
        });
        let pushed = thaw::store::transfer::push_uploaded(
            &store,
            &self.staging,
            &self.url,
            force,
            &*progress::terminal_bar(),
            uploaded,
        )
        .await
        .with_context(|| {
            format!(
                "uploading to {}: the image is kept in {}; push it with `thaw push {} {}`",
                self.url,
                self.staging.display(),
                self.staging.display(),
                self.url
            )
        })?;
        if let Err(e) = std::fs::remove_dir_all(&self.staging) {
            log::warn!(
                "removing the staging directory {}: {e}",
                self.staging.display()
            );
        }
        Ok(pushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_takes_the_windows_that_record_its_working_sets() {
        let window = |args: &[&str]| {
            let mut all = vec!["thaw", "bench", "--config", "vm.yaml"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).expect("parses").command {
                Command::Bench {
                    record_quiet_ms,
                    record_max_ms,
                    ..
                } => (record_quiet_ms, record_max_ms),
                _ => panic!("not bench"),
            }
        };
        // thaw's own defaults, as `restore --learn-quiet-ms/--learn-max-ms`.
        let defaults = LearnWindow::default();
        assert_eq!(
            window(&[]),
            (
                u64::try_from(defaults.quiet.as_millis()).expect("ms"),
                u64::try_from(defaults.max.as_millis()).expect("ms")
            )
        );
        assert_eq!(
            window(&["--record-quiet-ms", "5000", "--record-max-ms", "30000"]),
            (5000, 30_000)
        );
        assert!(Cli::try_parse_from(["thaw", "bench", "--record-quiet-ms", "soon"]).is_err());
    }

    #[test]
    fn publishing_flags_go_with_what_they_publish_from() {
        let parses = |args: &[&str]| Cli::try_parse_from(args).is_ok();
        assert!(parses(&[
            "thaw",
            "restore",
            "s3://b0b/img",
            "--publish-learned"
        ]));
        // A restore that does not learn has nothing to publish.
        assert!(!parses(&[
            "thaw",
            "restore",
            "s3://b0b/img",
            "--publish-learned",
            "--no-learn"
        ]));
        assert!(parses(&[
            "thaw",
            "push",
            "dir",
            "s3://b0b/img",
            "--working-sets"
        ]));
        // Only the working sets of the image there: never a replacement.
        assert!(!parses(&[
            "thaw",
            "push",
            "dir",
            "s3://b0b/img",
            "--working-sets",
            "--force"
        ]));
        let bench = ["thaw", "bench", "--config", "vm.yaml", "--learn-from-store"];
        assert!(!parses(&bench), "--learn-from-store without --store");
        assert!(parses(
            &[&bench[..], &["--store", "s3://b0b/bench"]].concat()
        ));
    }
}
