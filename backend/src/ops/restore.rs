//! `thaw restore`: start QEMU from an image's config with empty RAM and
//! `-incoming defer -S`, take over its userfaultfd, register guest RAM, load
//! the verified device state, then bring RAM back in one of three ways:
//!
//! - `ws` (default): put the image's best working set ([`crate::wss`]) into
//!   the RAM files' page cache in one sequential read, `cont`, and let the
//!   [`engine`] serve the other first touches while it fills the rest;
//! - `lazy`: the same without a working set;
//! - `eager`: install every page, then `cont`.
//!
//! After `ws` and `lazy` restores thaw learns: it records the guest's first
//! touches (faults, and the pages the kernel mapped on first touch, read
//! from QEMU's page tables, [`crate::engine::scanner`]; minor faults on
//! kernels without the means) during the restore and, once all RAM is
//! resident, during a short window until they stop, and refines the
//! image's `learned` working set with them. Returns when RAM is resident
//! and the window closed, leaving a normal thaw VM running.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::discard::DISCARD_LOG;
pub use crate::engine::EngineError;
use crate::engine::{BlockMap, Engine, FaultLog, Fill};
use crate::image::Image;
use crate::mem::{PageIndex, RamLayout, PAGE_SIZE};
use crate::observe::pagemap::Pagemap;
use crate::observe::window;
use crate::remote::uffd;
use crate::vmm::{self, Launched, RamMapping};
use crate::wss::evidence::{Evidence, RestoreEvidence};
use crate::wss::{self, Estimator, WorkingSet, WsFile};

/// How long QEMU may take to load the device state.
const DEVICE_LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a restore checks on its filler.
const FILL_POLL: Duration = Duration::from_millis(10);

/// How RAM is brought back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Install every non-zero page, then resume the guest.
    Eager,
    /// Resume at once; serve first touches on demand, fill the rest behind.
    Lazy,
    /// Prefetch the working set, resume, then as lazy.
    Ws,
}

/// Which working set a `ws` restore prefetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EstimatorChoice {
    /// The best the image has: learned, trace, abit, dirty.
    Auto,
    Learned,
    Trace,
    Abit,
    Dirty,
    /// No working set (a lazy restore that still learns).
    None,
}

impl EstimatorChoice {
    pub(crate) fn candidates(self) -> Vec<Estimator> {
        match self {
            EstimatorChoice::Auto => Estimator::PREFERENCE.to_vec(),
            EstimatorChoice::Learned => vec![Estimator::Learned],
            EstimatorChoice::Trace => vec![Estimator::Trace],
            EstimatorChoice::Abit => vec![Estimator::Abit],
            EstimatorChoice::Dirty => vec![Estimator::Dirty],
            EstimatorChoice::None => vec![],
        }
    }
}

pub use crate::engine::DEFAULT_FETCH_WORKERS;
pub use crate::observe::window::LearnWindow;

/// Options of `thaw restore`.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub mode: Mode,
    /// Run the VM under this name instead of the saved one.
    pub name: Option<String>,
    /// Which working set `ws` prefetches.
    pub estimator: EstimatorChoice,
    /// Learn from this restore (`None`: do not record or update).
    pub learn: Option<LearnWindow>,
    /// Without `learn`: still install the working set so that first
    /// touches are seen, to report skipped and unused prefetched pages.
    pub observe: bool,
    /// Limit image reads to this many bytes per second (emulated network
    /// storage; the same for every method).
    pub read_limit: Option<u64>,
    /// Limit the background fill to this many bytes per second once the
    /// guest runs, leaving it more of the machine (faults and prefetch are
    /// not limited).
    pub fill_limit: Option<u64>,
    /// Reads in flight at once for faults (fetch workers, at least one).
    pub fetch_workers: usize,
    /// Where the fill reports its progress.
    pub progress: crate::progress::SharedProgress,
}

/// Errors restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Ws(#[from] wss::WsError),
    #[error(transparent)]
    Qemu(#[from] vmm::QemuError),
    #[error(transparent)]
    Qmp(#[from] vmm::QmpError),
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    #[error(transparent)]
    Inject(#[from] crate::remote::inject::InjectError),
    #[error("the image's RAM layout {saved} does not match what QEMU created: {actual}")]
    LayoutMismatch { saved: String, actual: String },
    #[error("the image has no {0} working set (see `thaw inspect`); use --estimator auto or another one")]
    NoWorkingSet(String),
    #[error("restore failed, the VM was stopped: {0}")]
    Engine(#[from] EngineError),
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error(
        "QEMU (pid {pid}) exited during the restore; its runtime and RAM files were removed, the image is unchanged ({cause})"
    )]
    QemuExited { pid: i32, cause: String },
    #[error(
        "the object store stopped answering: VM {name} is kept as it is (its vCPUs wait for \
         the pages they miss); run `thaw recover {name}` once the store answers again ({cause})"
    )]
    StoreUnavailable { name: String, cause: String },
    #[error("VM {0} has no interrupted restore to recover (no restore record for its QEMU)")]
    NothingToRecover(String),
    #[error("a thaw process is still serving VM {0}'s restore; recover only after it died")]
    StillServed(String),
    #[error(transparent)]
    Busy(crate::ops::owner::LockError),
    #[error(
        "thaw died while QEMU was still loading VM {0}'s device state; QEMU was stopped: restore the image again (it is unchanged)"
    )]
    DiedLoading(String),
    #[error(
        "VM {0} cannot be recovered: QEMU is in state {1:?}; stop it and restore the image again"
    )]
    Unrecoverable(String, String),
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
    /// The working set prefetched (`ws` mode), if any.
    pub estimator: Option<Estimator>,
    /// Every working set prefetched, in order (`auto` may take the union
    /// of two, see [`crate::wss::evidence`]).
    pub ws_sets: Vec<Estimator>,
    /// Pages in that working set (zero pages included).
    pub ws_pages: u64,
    /// Command start → QEMU up with empty RAM.
    pub launch_ms: f64,
    /// Loading the device state (migrate-incoming → completed).
    pub device_state_ms: f64,
    /// Reading and installing the working set.
    pub prefetch_ms: f64,
    /// Command start → guest running.
    pub resume_ms: f64,
    /// Non-zero pages resident when the guest resumed.
    pub prefetched_pages: u64,
    /// First touches after resume (until all RAM was resident) that found
    /// their page prefetched; null when the prefetch was not observed
    /// (`--no-learn` without `--observe` maps prefetched pages directly).
    pub skipped_faults: Option<u64>,
    /// Pages served on demand after the guest resumed (missing faults).
    pub faults: u64,
    /// The same, under the name of the VEE table.
    pub lazy_faults: u64,
    /// Prefetched pages the guest had not touched when all RAM was
    /// resident; null when the prefetch was not observed.
    pub unused_prefetched_pages: Option<u64>,
    /// Pages QEMU faulted on while loading the device state.
    pub faults_before_resume: u64,
    /// Faults on all-zero pages (answered with a zero page, never read).
    pub zero_page_faults: u64,
    /// Pages the background filler installed after the guest resumed.
    pub background_pages: u64,
    /// Pages installed alongside on-demand faults: the rest of each
    /// faulting page's chunk, read and verified with it.
    pub neighbour_pages: u64,
    /// Command start → all RAM resident.
    pub complete_ms: f64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub bytes_read: u64,
    /// Background fill rate over the fill phase, MiB/s.
    pub fill_mib_per_s: f64,
    /// Tracking window after completion (0 when not learning).
    pub learn_window_ms: f64,
    /// Faults thaw served during that window (where the restore reads
    /// QEMU's page tables, only first touches of zero or discarded pages).
    pub window_faults: u64,
    /// Pages the guest touched first during that window.
    #[serde(default)]
    pub window_pages: u64,
    /// Reads of QEMU's page tables that found first touches, and the time
    /// they took in all (0 where the restore does not read them).
    #[serde(default)]
    pub page_table_reads: u64,
    #[serde(default)]
    pub page_table_read_ms: f64,
    /// Distinct pages the guest touched while thaw recorded.
    pub touched_pages: u64,
    /// Size of the image's learned working set after this restore (0: not updated).
    pub learned_pages: u64,
    /// Pages the guest discarded while thaw served its RAM (balloon,
    /// free-page reporting): they read as zeros and were not filled.
    pub discarded_pages: u64,
    /// Faults on discarded pages, answered with zero pages.
    pub discarded_faults: u64,
    /// Pages read straight from an object store: the ranged GETs sent and
    /// the bytes they brought (absent for a local image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_fetched: Option<crate::image::source::Fetched>,
    /// A restore straight from a store: what was read before it began
    /// (the manifest and every file but the pages: metadata, device
    /// state, working sets), set by the caller that read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_metadata: Option<crate::image::source::Fetched>,
}

impl std::fmt::Display for RestoreStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            Mode::Eager => "eager",
            Mode::Lazy => "lazy",
            Mode::Ws => "ws",
        };
        writeln!(
            f,
            "restored {} ({mode}): {} MiB RAM, {} non-zero pages",
            self.name,
            self.ram_bytes >> 20,
            self.nonzero_pages
        )?;
        if self.mode == Mode::Ws {
            match self.estimator {
                Some(e) => writeln!(
                    f,
                    "  working set: {} ({} pages), prefetched in {:.1} ms",
                    e.name(),
                    self.ws_pages,
                    self.prefetch_ms
                )?,
                None => writeln!(f, "  working set: none in the image (restored lazily)")?,
            }
        }
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
            "  {:>12} {:>12} {:>12} {:>12}",
            "prefetched", "skipped", "lazy", "unused"
        )?;
        let seen = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        writeln!(
            f,
            "  {:>12} {:>12} {:>12} {:>12}",
            self.prefetched_pages,
            seen(self.skipped_faults),
            self.lazy_faults,
            seen(self.unused_prefetched_pages)
        )?;
        writeln!(
            f,
            "  pages: {} zero-page faults, {} with faulted chunks, {} background, {} touched",
            self.zero_page_faults, self.neighbour_pages, self.background_pages, self.touched_pages
        )?;
        if let Some(fetched) = self.store_fetched {
            writeln!(
                f,
                "  from the object store: {} MiB of pages in {} reads",
                fetched.bytes >> 20,
                fetched.requests
            )?;
        }
        if let Some(fetched) = self.store_metadata {
            writeln!(
                f,
                "  before it: {:.1} MiB of metadata, device state and working sets in {} reads",
                fetched.bytes as f64 / f64::from(1u32 << 20),
                fetched.requests
            )?;
        }
        if self.discarded_pages > 0 {
            writeln!(
                f,
                "  discarded by the guest: {} pages ({} faults on them, answered with zeros)",
                self.discarded_pages, self.discarded_faults
            )?;
        }
        if self.learned_pages > 0 {
            writeln!(
                f,
                "  learned working set: {} pages (window {:.0} ms: {} first touches, {} faults through thaw)",
                self.learned_pages, self.learn_window_ms, self.window_pages, self.window_faults
            )?;
            if self.page_table_reads > 0 {
                writeln!(
                    f,
                    "  first touches read from QEMU's page tables: {} reads, {:.1} ms in all",
                    self.page_table_reads, self.page_table_read_ms
                )?;
            }
        }
        write!(
            f,
            "  fault service: p50 {:.1} us, p99 {:.1} us",
            self.fault_p50_us, self.fault_p99_us
        )
    }
}

/// The runtime directory's record of a restore in progress.
pub const RECORD_FILE: &str = "restore.json";

/// What a restore leaves in the runtime directory so another thaw can take
/// QEMU's userfaultfd again (`pidfd_getfd`) if this one dies
/// ([`recover`]).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct RecoveryRecord {
    pub(crate) image: PathBuf,
    pub(crate) qemu_pid: i32,
    pub(crate) uffd_fd_in_qemu: i32,
    pub(crate) mode: Mode,
    /// The guest was (about to be) resumed: what RAM holds is the guest's.
    #[serde(default)]
    pub(crate) resumed: bool,
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Restores the image at `path`; see the module documentation.
pub async fn restore(path: &Path, opts: &RestoreOptions) -> Result<RestoreStats, RestoreError> {
    let started = Instant::now();
    let mut image = Image::open(path)?;
    if let Some(rate) = opts.read_limit {
        image.set_read_limit(rate);
    }
    let image = Arc::new(image);
    // Structure, device state and the working set's tables are verified
    // before anything starts.
    let device_state = image.read_device_state()?;
    let ws = match (opts.mode, opts.estimator) {
        (Mode::Ws, EstimatorChoice::Auto) => choose_by_evidence(&image)?,
        (Mode::Ws, e) => {
            let ws = wss::open_best(&image, &e.candidates())?;
            match (ws, e) {
                (None, EstimatorChoice::None) => Vec::new(),
                (None, e) => {
                    return Err(RestoreError::NoWorkingSet(format!("{e:?}").to_lowercase()));
                }
                (Some(ws), _) => vec![ws],
            }
        }
        _ => Vec::new(),
    };
    let meta = image.meta().clone();
    let mut cfg = meta.vm.clone();
    if let Some(name) = &opts.name {
        crate::config::validate_name(name).map_err(|m| RestoreError::Io {
            context: "--name".into(),
            source: std::io::Error::other(m),
        })?;
        cfg.name = name.clone();
        // Its own console log next to the saved one: two restores of one
        // image must not write into the same file.
        if let Some(serial) = &cfg.serial {
            let file = serial.file_name().map_or_else(
                || "console.log".into(),
                |f| f.to_string_lossy().into_owned(),
            );
            cfg.serial = Some(serial.with_file_name(format!("{name}-{file}")));
        }
    }
    let launched = match &meta.libvirt {
        Some(saved) => {
            if opts.name.is_some() {
                return Err(RestoreError::Io {
                    context: "--name".into(),
                    source: std::io::Error::other(format!(
                        "the image holds libvirt domain {}, which comes back under its own name and UUID (define a copy with another name in libvirt instead)",
                        saved.name
                    )),
                });
            }
            vmm::libvirt::launch_incoming(saved).await?
        }
        None => vmm::launch(&cfg, &meta.accel, true).await?,
    };
    let launch_ms = ms(started.elapsed());
    let pid = launched.state.qemu_pid;
    let (paths, state) = (launched.paths.clone(), launched.state.clone());
    match run(launched, image, device_state, ws, opts, started, launch_ms).await {
        Ok(stats) => Ok(stats),
        Err(e) => {
            let gone = !state.qemu_alive();
            if !gone && store_unavailable(&e) {
                match keep_for_recovery(&paths) {
                    Ok(()) => {
                        return Err(RestoreError::StoreUnavailable {
                            name: paths.name.clone(),
                            cause: e.to_string(),
                        })
                    }
                    Err(keep) => log::error!("could not keep the VM for a recovery: {keep}"),
                }
            }
            if !gone {
                log::error!("restore failed; stopping QEMU (pid {pid})");
            }
            let _ = vmm::stop(&paths, &state, true).await;
            if gone {
                return Err(RestoreError::QemuExited {
                    pid,
                    cause: e.to_string(),
                });
            }
            Err(e)
        }
    }
}

/// Whether `e` is the image's object store not answering (as opposed to
/// damage, which no retry mends).
fn store_unavailable(e: &RestoreError) -> bool {
    matches!(
        e,
        RestoreError::Engine(EngineError::Image(crate::image::ImageError::Io { source, .. }))
            if crate::store::pages::is_unavailable(source)
    )
}

/// After the object store stopped answering: QEMU, its userfaultfd and
/// the restore record stay as a dead restore leaves them (the guest's
/// vCPUs wait for the pages they miss; QEMU's monitor may wait with
/// them), for `thaw recover` to finish the restore. Fails if there is no
/// record to recover from.
fn keep_for_recovery(paths: &vmm::VmPaths) -> Result<(), RestoreError> {
    let record_path = paths.dir.join(RECORD_FILE);
    if record_path.exists() {
        Ok(())
    } else {
        Err(RestoreError::NothingToRecover(paths.name.clone()))
    }
}

/// How a restore sees the guest's first touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TouchWatch {
    /// It does not (eager, or a kernel without the means).
    Blind,
    /// The kernel maps a page in the page cache on first touch by itself;
    /// thaw reads QEMU's page tables ([`crate::engine::scanner`]). Guest
    /// RAM is registered for missing faults and write protection (Linux ≥
    /// 5.19), read with `PAGEMAP_SCAN` (≥ 6.7). Used when the restore
    /// learns or observes: a touch costs the guest no round trip.
    PageTables,
    /// Each first touch of a page in the page cache is a minor fault thaw
    /// answers (`UFFDIO_CONTINUE`; Linux ≥ 5.14).
    MinorFaults,
}

impl TouchWatch {
    fn choose(opts: &RestoreOptions) -> TouchWatch {
        if opts.mode == Mode::Eager {
            return TouchWatch::Blind;
        }
        let features = uffd::kernel_features().unwrap_or(0);
        let watching = opts.learn.is_some() || opts.observe;
        // Only a learning restore puts every page no fault waits on into
        // the page cache (so that only touched pages are ever mapped). A
        // huge shmem page would be mapped whole on one touch.
        if opts.learn.is_some()
            && features & uffd::FEATURE_WP_HUGETLBFS_SHMEM != 0
            && Pagemap::scan_supported()
            && !shmem_huge_pages()
        {
            return TouchWatch::PageTables;
        }
        if features & userfaultfd_sys::UFFD_FEATURE_MINOR_SHMEM != 0 {
            if watching {
                log::info!(
                    "this kernel cannot map pages on first touch unobserved (needs write \
                     protection of shared memory and PAGEMAP_SCAN): each first touch of a \
                     prefetched or filled page is a minor fault thaw answers"
                );
            }
            return TouchWatch::MinorFaults;
        }
        if watching {
            log::warn!("the kernel lacks UFFD_FEATURE_MINOR_SHMEM: this restore cannot learn");
        }
        TouchWatch::Blind
    }
}

/// Whether the kernel may back shared memory with huge pages
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` other than `never`
/// or `deny`; unreadable: no THP, so no).
fn shmem_huge_pages() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .ok()
        .and_then(|s| {
            let chosen = s.split_whitespace().find(|w| w.starts_with('['))?;
            Some(!matches!(chosen, "[never]" | "[deny]"))
        })
        .unwrap_or(false)
}

/// What the phases of one restore measured.
struct Phases {
    device_state_ms: f64,
    prefetch_ms: f64,
    /// Non-zero pages resident at resume.
    prefetched: u64,
    resume_ms: f64,
    complete_ms: f64,
    fill_time: Duration,
    window_ms: f64,
    window_faults: u64,
    /// First touches read from QEMU's page tables (the fault thread's log
    /// has the others), in how many reads, taking how long.
    scanned_touches: Vec<PageIndex>,
    page_table_reads: u64,
    page_table_read_ms: f64,
    /// First touches in the window, either way.
    window_pages: u64,
    /// Prefetched pages untouched when all RAM was resident.
    unused: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    launched: Launched,
    image: Arc<Image>,
    device_state: Vec<u8>,
    ws: Vec<WsFile>,
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
    // Held until the restore is over: `thaw recover` takes it only from a
    // dead restore, a concurrent `thaw save` is refused.
    let _lock = crate::ops::owner::OwnerLock::acquire(&paths, "restore")?;
    let qemu_pid = &state.qemu().map_err(vmm::QemuError::from)?;
    let ram = vmm::find_ram(qemu_pid, &paths, &state)?;

    // Take over QEMU's userfaultfd and register all guest RAM before
    // anything can touch it, in the way that lets thaw see the guest's
    // first touches (to count skipped faults and to learn); without kernel
    // support a restore still works, unobserved. Remove events tell thaw
    // about pages the guest discards (balloon, free-page reporting), so
    // they are never refilled from the image.
    let watch = TouchWatch::choose(opts);
    let features = userfaultfd_sys::UFFD_FEATURE_MISSING_SHMEM
        | userfaultfd_sys::UFFD_FEATURE_EVENT_REMOVE
        | match watch {
            TouchWatch::PageTables => uffd::FEATURE_WP_HUGETLBFS_SHMEM,
            TouchWatch::MinorFaults => userfaultfd_sys::UFFD_FEATURE_MINOR_SHMEM,
            TouchWatch::Blind => 0,
        };
    let uffd = Arc::new(take_over_uffd(&state, &mut qmp, qemu_pid, features).await?);
    for m in &ram {
        match watch {
            TouchWatch::PageTables => uffd.register_missing_wp(m.start, m.len)?,
            TouchWatch::MinorFaults => uffd.register_missing_minor(m.start, m.len)?,
            TouchWatch::Blind => uffd.register_missing(m.start, m.len)?,
        }
    }
    let blocks = block_maps(qemu_pid, &ram, &state.layout)?;
    drop_early_pages(&ram, &blocks)?;
    let record = RecoveryRecord {
        image: std::fs::canonicalize(image.dir()).unwrap_or_else(|_| image.dir().to_path_buf()),
        qemu_pid: state.qemu_pid,
        uffd_fd_in_qemu: uffd.remote_fd(),
        mode: opts.mode,
        resumed: false,
    };
    let record_path = paths.dir.join(RECORD_FILE);
    let discards_path = paths.dir.join(DISCARD_LOG);
    let _ = std::fs::remove_file(&discards_path);
    let discards = vmm::create_private(&discards_path)?;
    write_record(&record_path, &record)?;

    let engine = Arc::new(
        Engine::new(image.clone(), uffd.clone(), blocks)
            .with_fill_limit(opts.fill_limit)
            // A learning restore sees every first touch: what no fault
            // waits on goes into the page cache, mapped on first touch.
            .with_cached_installs(opts.learn.is_some() && watch != TouchWatch::Blind)
            .with_fetch_workers(opts.fetch_workers)
            .with_discard_log(discards),
    );
    let log_capacity = crate::mem::usize_from(meta.total_pages).min(1 << 22);
    let service = engine.start(log_capacity)?;
    let bar = opts.progress.clone();
    bar.start("restore", meta.nonzero_pages * PAGE_SIZE);
    let learn = opts.learn.filter(|_| watch != TouchWatch::Blind);
    let observed = watch != TouchWatch::Blind && (learn.is_some() || opts.observe);
    let ranges: Vec<(RamMapping, u64)> = ram
        .iter()
        .cloned()
        .zip(&state.layout.blocks)
        .map(|(m, b)| (m, b.first_page))
        .collect();

    let outcome = async {
        let mut filler = None;
        if opts.mode == Mode::Eager {
            filler = Some(engine.start_fill(bar.clone())?);
        }
        let device_state_ms = load_device_state(&mut qmp, &paths, &state, device_state).await?;
        let mut fill_time = Duration::ZERO;
        if let Some(f) = filler.take() {
            fill_time = finish_fill(f, &engine).await?;
            // Every non-zero page is in; the holes left are the zero pages,
            // which read as zeros once unregistered: the guest runs without
            // thaw in its way.
            unregister(&uffd, &ram, &engine)?;
            // All of RAM is in: nothing is left to recover.
            let _ = std::fs::remove_file(&record_path);
        }
        let mut prefetch_ms = 0.0;
        if !ws.is_empty() {
            let t = Instant::now();
            let engine = engine.clone();
            let sets: &[WsFile] = &ws;
            // The guest is paused: writing into the page cache is safe.
            // Sets after the first add the pages the earlier ones lacked.
            let observe = observed;
            std::thread::scope(|s| {
                s.spawn(|| {
                    sets.iter()
                        .try_for_each(|set| engine.prefetch(set, observe).map(drop))
                })
                .join()
            })
            .map_err(|_| RestoreError::Panicked("prefetch"))??;
            prefetch_ms = ms(t.elapsed());
        }
        let prefetched = meta.nonzero_pages - engine.remaining();
        // A thread that failed meanwhile (a damaged chunk read for a fault
        // during the device-state load or the prefetch) stops the restore
        // before the guest runs.
        if let Some(e) = engine.take_failure() {
            return Err(e.into());
        }
        // Recorded before `cont`: a recovery must never take a guest that
        // ran (or was paused since) for one that did not. (An eager restore
        // is complete by now and has no record left.)
        if opts.mode != Mode::Eager {
            write_record(
                &record_path,
                &RecoveryRecord {
                    resumed: true,
                    ..record.clone()
                },
            )?;
        }
        // Pages in the page cache are mapped by the kernel on first touch:
        // read QEMU's page tables from before the guest runs.
        let mut scanner = None;
        if watch == TouchWatch::PageTables && observed {
            let pagemap = Pagemap::open(qemu_pid.pid()).map_err(|source| RestoreError::Io {
                context: format!("opening /proc/{}/pagemap", qemu_pid.pid()),
                source,
            })?;
            scanner = Some(engine.start_touch_scanner(pagemap, ranges.clone())?);
        }
        engine.set_resumed();
        qmp.execute("cont", json!({})).await?;
        let resume_ms = ms(started.elapsed());
        log::info!("guest resumed after {resume_ms:.1} ms with {prefetched} pages resident");
        let mut window_ms = 0.0;
        let mut window_faults = 0;
        let mut scanned_touches = Vec::new();
        let (mut page_table_reads, mut page_table_read_ms) = (0, 0.0);
        let mut window_pages = 0;
        let complete_ms;
        let unused;
        if opts.mode == Mode::Eager {
            complete_ms = ms(started.elapsed());
            unused = 0;
        } else {
            let f = engine.start_fill(bar.clone())?;
            fill_time = finish_fill(f, &engine).await?;
            complete_ms = ms(started.elapsed());
            if let Some(scanner) = &scanner {
                scanner.wait_next_scan();
            }
            unused = engine.unused_prefetched();
            bar.finish();
            if let Some(w) = learn {
                let faults = || {
                    engine.counters.minor_faults.load(Ordering::Relaxed)
                        + engine.counters.faults_after_resume.load(Ordering::Relaxed)
                };
                let before = faults();
                let touched_before = engine.counters.touched_pages.load(Ordering::Acquire);
                engine.begin_window();
                // Every page mapped so far was touched (and recorded)
                // first: no need to zap QEMU's page tables, which would
                // make the guest fault its whole working set once more.
                window_ms = if engine.maps_only_touched_pages() {
                    window::watch(&engine, w, Instant::now()).await
                } else {
                    window::tracking_window(qemu_pid, &ram, &engine, w).await?
                };
                window_faults = faults() - before;
                window_pages =
                    engine.counters.touched_pages.load(Ordering::Acquire) - touched_before;
            }
            if let Some(scanner) = scanner.take() {
                let scanned = scanner.finish()?;
                scanned_touches = scanned.touches;
                page_table_reads = scanned.scans;
                page_table_read_ms = ms(scanned.scan_time);
            }
            unregister(&uffd, &ram, &engine)?;
            // All of RAM is in: nothing is left to recover.
            let _ = std::fs::remove_file(&record_path);
        }
        Ok::<_, RestoreError>(Phases {
            device_state_ms,
            prefetch_ms,
            prefetched,
            resume_ms,
            complete_ms,
            fill_time,
            window_ms,
            window_faults,
            scanned_touches,
            page_table_reads,
            page_table_read_ms,
            window_pages,
            unused,
        })
    }
    .await;
    let stopped = service.stop(&engine);
    bar.finish();
    // A thread's own error explains a failed phase better than the phase.
    let log = match (stopped, outcome) {
        (Err(e), _) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(e),
        (Ok(log), Ok(phases)) => (log, phases),
    };
    let (log, phases) = log;
    if let Err(e) = uffd.close_remote() {
        log::warn!("could not close the userfaultfd inside QEMU: {e}");
    }
    let _ = std::fs::remove_file(&record_path);
    let _ = std::fs::remove_file(&discards_path);

    let c = &engine.counters;
    let FaultLog {
        latencies,
        mut touches,
    } = log;
    // Faults first (pages the guest waited for), then what the page
    // tables showed.
    touches.extend_from_slice(&phases.scanned_touches);
    let learned_pages = match learn {
        Some(_) => {
            record_evidence(&image, opts.mode, &ws, &touches, c);
            update_learned(&image, &touches)
        }
        None => 0,
    };
    let fill_pages = c.fill_pages.load(Ordering::Relaxed);
    let faults_after = c.faults_after_resume.load(Ordering::Relaxed);
    let (p50, p99) = percentiles(latencies);
    Ok(RestoreStats {
        name: state.config.name.clone(),
        mode: opts.mode,
        ram_bytes: meta.layout.total_bytes(),
        nonzero_pages: meta.nonzero_pages,
        estimator: ws.first().map(|w| w.set.estimator),
        ws_sets: ws.iter().map(|w| w.set.estimator).collect(),
        ws_pages: distinct_pages(&ws),
        launch_ms,
        device_state_ms: phases.device_state_ms,
        prefetch_ms: phases.prefetch_ms,
        resume_ms: phases.resume_ms,
        prefetched_pages: phases.prefetched,
        skipped_faults: observed.then(|| c.skipped_faults.load(Ordering::Relaxed)),
        faults: faults_after,
        lazy_faults: faults_after,
        unused_prefetched_pages: observed.then_some(phases.unused),
        faults_before_resume: c.faults_before_resume.load(Ordering::Relaxed),
        zero_page_faults: c.zero_faults.load(Ordering::Relaxed),
        background_pages: c.fill_pages_after_resume.load(Ordering::Relaxed),
        neighbour_pages: c.neighbour_pages.load(Ordering::Relaxed),
        complete_ms: phases.complete_ms,
        fault_p50_us: p50,
        fault_p99_us: p99,
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        fill_mib_per_s: (fill_pages * PAGE_SIZE) as f64
            / (1 << 20) as f64
            / phases.fill_time.as_secs_f64().max(1e-9),
        learn_window_ms: phases.window_ms,
        window_faults: phases.window_faults,
        window_pages: phases.window_pages,
        page_table_reads: phases.page_table_reads,
        page_table_read_ms: phases.page_table_read_ms,
        touched_pages: c.touched_pages.load(Ordering::Relaxed),
        learned_pages,
        discarded_pages: engine.discarded_pages(),
        discarded_faults: c.discarded_faults.load(Ordering::Relaxed),
        store_fetched: image.fetched(),
        store_metadata: None,
    })
}

/// The working sets `auto` prefetches: the cheapest candidate by the
/// image's evidence ([`wss::evidence`]), else the first of learned, trace,
/// abit, dirty the image has (none at all: a restore without a prefetch).
fn choose_by_evidence(image: &Image) -> Result<Vec<WsFile>, RestoreError> {
    let mut sets = Vec::new();
    for e in Estimator::PREFERENCE {
        // A damaged or foreign set is left out (and said), not fatal:
        // `auto` takes the best of the others.
        match WsFile::open(image, e) {
            Ok(Some(f)) => sets.push(f),
            Ok(None) => {}
            Err(err) => log::warn!("auto: leaving out the {} working set: {err}", e.name()),
        }
    }
    let available: Vec<Estimator> = sets.iter().map(|f| f.set.estimator).collect();
    let evidence = Evidence::load(image).unwrap_or_else(|e| {
        log::warn!("ignoring the image's working-set evidence: {e}");
        Evidence::default()
    });
    let Some(best) = evidence.best(&available) else {
        sets.truncate(1);
        return Ok(sets);
    };
    log::info!("auto: prefetching {} (by evidence)", best.name());
    let mut chosen = Vec::new();
    for e in &best.0 {
        if let Some(i) = sets.iter().position(|f| f.set.estimator == *e) {
            chosen.push(sets.swap_remove(i));
        }
    }
    Ok(chosen)
}

/// Pages in the union of `sets`.
fn distinct_pages(sets: &[WsFile]) -> u64 {
    let all: std::collections::HashSet<u64> = sets
        .iter()
        .flat_map(|f| f.set.pages.iter().map(|p| p.page.0))
        .collect();
    all.len() as u64
}

/// Scores the image's working sets (as they were before this restore
/// refines the learned one) against this restore's first touches, and
/// keeps the verdict in the image ([`wss::evidence`]); a failure only
/// costs the evidence.
fn record_evidence(
    image: &Image,
    mode: Mode,
    used: &[WsFile],
    touches: &[PageIndex],
    counters: &crate::engine::Counters,
) {
    let mut sets = Vec::new();
    for e in Estimator::PREFERENCE {
        match WsFile::open(image, e) {
            Ok(Some(f)) => sets.push(f),
            Ok(None) => {}
            Err(err) => log::warn!("scoring working sets: {err}"),
        }
    }
    let verdicts = wss::evidence::verdicts(image, &sets, touches);
    let touched = touches
        .iter()
        .filter(|p| matches!(image.locate(**p), crate::image::PageLocation::Slot(_)))
        .count() as u64;
    let record = RestoreEvidence {
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        mode: match mode {
            Mode::Eager => "eager",
            Mode::Lazy => "lazy",
            Mode::Ws => "ws",
        }
        .into(),
        used: (!used.is_empty()).then(|| {
            wss::evidence::Candidate(used.iter().map(|f| f.set.estimator).collect()).name()
        }),
        touched,
        lazy_faults: counters.faults_after_resume.load(Ordering::Relaxed),
        verdicts,
    };
    if let Err(e) = Evidence::record(image, record) {
        log::warn!("could not record the working sets' evidence: {e}");
    }
}

/// Refines the image's learned working set with this restore's first
/// touches; returns its new size (0 if it could not be written: a restore
/// from a read-only image still succeeds).
fn update_learned(image: &Image, touches: &[PageIndex]) -> u64 {
    // Restores of one image that finish together refine the set one after
    // the other (each replaces the file atomically either way).
    let _serialized = File::open(image.dir())
        .ok()
        .and_then(|d| nix::fcntl::Flock::lock(d, nix::fcntl::FlockArg::LockExclusive).ok());
    let next = match WsFile::open(image, Estimator::Learned) {
        Ok(Some(old)) => old.set.refine(touches),
        Ok(None) => WorkingSet::from_touches(Estimator::Learned, touches),
        Err(e) => {
            log::warn!("replacing a damaged learned working set: {e}");
            WorkingSet::from_touches(Estimator::Learned, touches)
        }
    };
    match wss::write(image, &next) {
        Ok(path) => {
            log::info!(
                "learned working set: {} pages in {}",
                next.pages.len(),
                path.display()
            );
            next.pages.len() as u64
        }
        Err(e) => {
            log::warn!("could not update the learned working set: {e}");
            0
        }
    }
}

/// Each RAM block's place in QEMU and its file, opened read-write through
/// `/proc/<pid>/fd` while `qemu` is alive (so the files are QEMU's).
pub(crate) fn block_maps(
    qemu: &crate::remote::process::QemuProcess,
    ram: &[RamMapping],
    layout: &RamLayout,
) -> Result<Vec<BlockMap>, RestoreError> {
    let mut blocks = Vec::new();
    for (m, b) in ram.iter().zip(&layout.blocks) {
        let file = File::options()
            .read(true)
            .write(true)
            .open(&m.fd_path)
            .map_err(|source| RestoreError::Io {
                context: format!("opening {}", m.fd_path.display()),
                source,
            })?;
        blocks.push(BlockMap {
            id: m.id.clone(),
            start: m.start,
            first_page: b.first_page,
            pages: b.pages(),
            file,
        });
    }
    vmm::ensure_alive(qemu)?;
    Ok(blocks)
}

/// Compares saved and launched layouts block by block.
pub(crate) fn check_layout(saved: &RamLayout, actual: &RamLayout) -> Result<(), RestoreError> {
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
pub(crate) fn drop_early_pages(
    ram: &[RamMapping],
    blocks: &[BlockMap],
) -> Result<(), RestoreError> {
    for (m, b) in ram.iter().zip(blocks) {
        let file = &b.file;
        let extents = crate::mem::data_extents(file, m.len).map_err(|source| RestoreError::Io {
            context: format!("scanning {}", m.fd_path.display()),
            source,
        })?;
        for (start, end) in extents {
            log::warn!(
                "RAM block {} had data at {start:#x}..{end:#x} before the restore; dropping it",
                m.id
            );
            nix::fcntl::fallocate(
                file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                i64::try_from(start).unwrap_or(i64::MAX),
                i64::try_from(end - start).unwrap_or(i64::MAX),
            )
            .map_err(|e| RestoreError::Io {
                context: format!("punching {}", m.id),
                source: e.into(),
            })?;
        }
    }
    Ok(())
}

/// Writes the record next to `path` and renames it into place: a reader
/// (a recovery after thaw died) sees the old record or the new one.
fn write_record(path: &Path, record: &RecoveryRecord) -> Result<(), RestoreError> {
    let io = |source| RestoreError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = vmm::create_private(&tmp)?;
    let text = serde_json::to_vec_pretty(record).map_err(|e| io(std::io::Error::other(e)))?;
    f.write_all(&text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Takes over a userfaultfd in QEMU: created by QEMU itself, or, for a
/// libvirt domain (whose QEMU runs unprivileged and may not call
/// `userfaultfd(2)`), through an fd of `/dev/userfaultfd` thaw hands it.
pub(crate) async fn take_over_uffd(
    state: &vmm::VmState,
    qmp: &mut vmm::Qmp,
    qemu: &crate::remote::process::QemuProcess,
    features: u64,
) -> Result<uffd::RemoteUffd, RestoreError> {
    if state.libvirt.is_none() {
        return Ok(uffd::take_over(qemu, features)?);
    }
    let device = vmm::libvirt::plant_uffd_device(qmp, qemu).await?;
    let taken = uffd::take_over_with(qemu, features, Some(device.fd));
    vmm::libvirt::release_uffd_device(qmp, device).await;
    Ok(taken?)
}

/// Feeds the verified device state to QEMU through a pipe and waits until
/// QEMU has loaded it. Returns the load time in ms.
async fn load_device_state(
    qmp: &mut vmm::Qmp,
    paths: &vmm::VmPaths,
    state: &vmm::VmState,
    data: Vec<u8>,
) -> Result<f64, RestoreError> {
    let io = |context: &str| {
        let context = context.to_string();
        move |source| RestoreError::Io { context, source }
    };
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| io("creating a pipe")(e.into()))?;
    let mark = match state.libvirt {
        Some(_) => Some(
            vmm::libvirt::IgnoreSharedMark::set(&paths.dir)
                .map_err(|e| vmm::QemuError::Libvirt(e.to_string()))?,
        ),
        None => None,
    };
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
    // Off again once loaded: left on, a later save that is not thaw's
    // (`virsh save`) would leave guest RAM out. (A failed load ends with
    // QEMU stopped.)
    if loaded.is_ok() {
        qmp.clear_ignore_shared().await?;
        if let Some(mark) = mark {
            mark.clear();
        }
    }
    let written = writer
        .join()
        .map_err(|_| RestoreError::Panicked("device-state writer"))?;
    loaded?;
    written.map_err(io("writing the device state to QEMU"))?;
    Ok(elapsed)
}

/// Waits for the filler while watching the other engine threads for
/// failures; checks it installed every saved page and returns how long it
/// ran.
pub(crate) async fn finish_fill(filler: Fill, engine: &Engine) -> Result<Duration, RestoreError> {
    while !filler.is_finished() && !engine.has_failed() {
        tokio::time::sleep(FILL_POLL).await;
    }
    if !filler.is_finished() {
        engine.request_stop();
    }
    // Finished, or stopping at its next check: a short wait.
    Ok(filler.join(engine)?)
}

/// Ends userfaultfd handling of guest RAM. Only once every non-zero page is
/// resident: the holes left then read as the zero pages they are.
pub(crate) fn unregister(
    uffd: &uffd::RemoteUffd,
    ram: &[RamMapping],
    engine: &Engine,
) -> Result<(), RestoreError> {
    engine.release();
    for m in ram {
        uffd.unregister(m.start, m.len)?;
    }
    Ok(())
}

/// p50 and p99 of fault service times, in µs.
fn percentiles(mut v: Vec<u32>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_unstable();
    // The rank is in 0..len by construction (q in 0..=1).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let at = |q: f64| f64::from(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.50), at(0.99))
}
