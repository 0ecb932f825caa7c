//! `thaw bench-checkpoint`: what a checkpoint costs the running guest,
//! live (copy-on-write) against stop-and-copy, side by side in one run and
//! at several RAM sizes.
//!
//! For each size the VM boots with that much RAM (the workload fills three
//! quarters of it), warms up and its warm rate is measured. Then each run
//! takes one checkpoint per method (`thaw save --keep-running`) while the
//! guest's throughput reports and the console probe are watched, from a
//! second before the checkpoint to two seconds after it. Per checkpoint:
//! the pause thaw measured (stop → resume), the copy window (the whole
//! command), the guest's work during the window as a share of its work in
//! the second just before it (side by side in one run: TCG's rate drifts
//! between boots and minutes on a shared host), its longest silence (the largest gap between two throughput
//! reports, 50 ms when nothing stalls it), the probe latency during the
//! window, and the write faults a live copy served.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use thaw::config::{ByteSize, VmConfig};
use thaw::ops::save::{SaveMethod, SaveOptions};
use thaw::vmm::{self, VmState};

use super::console::ConsoleTail;
use super::probe::{ProbeSample, Prober};
use super::ttr::{median, Sample};
use super::{io, BenchError};

/// Watched before each checkpoint, and after it.
const BEFORE: Duration = Duration::from_secs(1);
const AFTER: Duration = Duration::from_secs(2);

/// What `thaw bench-checkpoint` runs.
#[derive(Clone, Debug)]
pub struct CheckpointBenchOptions {
    /// The VM; its guest runs the workload in throughput mode.
    pub config: PathBuf,
    pub methods: Vec<SaveMethod>,
    /// Checkpoints per method and size (medians are reported).
    pub runs: u32,
    /// RAM sizes to boot the VM with (empty: the config's).
    pub sizes: Vec<u64>,
    /// Live copies: pace to this many bytes per second.
    pub copy_limit: Option<u64>,
    pub warmup: Duration,
    pub measure: Duration,
    /// Where the images go (each is removed after its run).
    pub dir: PathBuf,
    /// Console probe period (None: no probes).
    pub probe_period: Option<Duration>,
}

/// One checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointRun {
    pub method: SaveMethod,
    pub run: u32,
    /// Stop → resume, as thaw measured it.
    pub paused_ms: f64,
    /// The whole checkpoint command (for stop-and-copy: the pause, and the
    /// image sync after it).
    pub window_ms: f64,
    /// The guest's rate in the second before the checkpoint (MiB/s).
    pub rate_before: f64,
    /// The guest's work during the window / its work in that second.
    pub window_rate_vs_before: f64,
    /// The guest's work during the window / its warm rate.
    pub window_rate_vs_warm: f64,
    /// The longest gap between two throughput reports around the
    /// checkpoint (50 ms when nothing stalls the guest).
    pub max_gap_ms: f64,
    /// Console probes sent during the window, and their latencies.
    pub probes: usize,
    pub probe_p50_ms: Option<f64>,
    pub probe_max_ms: Option<f64>,
    pub wp_faults: u64,
    pub nonzero_pages: u64,
}

/// Medians of one method at one size.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointSummary {
    pub method: SaveMethod,
    pub paused_ms: f64,
    pub window_ms: f64,
    pub window_rate_vs_before: f64,
    pub window_rate_vs_warm: f64,
    pub max_gap_ms: f64,
    pub probe_max_ms: Option<f64>,
    pub wp_faults: f64,
}

/// One RAM size.
#[derive(Clone, Debug, Serialize)]
pub struct SizeReport {
    pub memory: u64,
    /// The workload's warm rate (MiB/s) and its warm probe latency.
    pub warm: f64,
    pub warm_probe_p50_ms: Option<f64>,
    pub runs: Vec<CheckpointRun>,
    pub summary: Vec<CheckpointSummary>,
}

/// The whole benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointBenchReport {
    pub config: PathBuf,
    pub copy_limit: Option<u64>,
    pub sizes: Vec<SizeReport>,
}

/// Runs the benchmark.
pub async fn run(opts: &CheckpointBenchOptions) -> Result<CheckpointBenchReport, BenchError> {
    let base = VmConfig::load(&opts.config)?;
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("creating {}", opts.dir.display())))?;
    let sizes = if opts.sizes.is_empty() {
        vec![base.memory.0]
    } else {
        opts.sizes.clone()
    };
    let mut reports = Vec::new();
    for &memory in &sizes {
        let mut cfg = base.clone();
        cfg.memory = ByteSize(memory);
        // The workload fills three quarters of RAM.
        cfg.append = cfg.append.as_deref().map(|a| with_fill(a, memory / 4 * 3));
        log::info!("checkpoint benchmark at {} MiB of RAM", memory >> 20);
        let report = run_size(opts, &cfg).await;
        if let Ok((paths, state)) = VmState::load(&cfg.name) {
            vmm::stop(&paths, &state, true).await?;
        }
        reports.push(report?);
    }
    Ok(CheckpointBenchReport {
        config: opts.config.clone(),
        copy_limit: opts.copy_limit,
        sizes: reports,
    })
}

/// `append` with the workload's fill (`thaw.mem=`) set to `bytes`.
fn with_fill(append: &str, bytes: u64) -> String {
    let mut words: Vec<String> = append
        .split_whitespace()
        .filter(|w| !w.starts_with("thaw.mem="))
        .map(str::to_string)
        .collect();
    words.push(format!("thaw.mem={}M", bytes >> 20));
    words.join(" ")
}

async fn run_size(opts: &CheckpointBenchOptions, cfg: &VmConfig) -> Result<SizeReport, BenchError> {
    let name = cfg.name.clone();
    if let Ok((paths, state)) = VmState::load(&name) {
        vmm::stop(&paths, &state, true).await?;
    }
    let accel = vmm::resolve_accel(cfg)?;
    let launched = vmm::launch(cfg, accel, false).await?;
    let serial = launched.state.serial.clone();
    // QMP takes one client at a time: each save connects on its own.
    drop(launched);
    let console = vmm::VmPaths::new(&name).console;

    // Warm up, then the warm rate and probe latency.
    let tail = ConsoleTail::start(&serial, Instant::now()).map_err(io("reading the console"))?;
    let deadline = Instant::now() + opts.warmup + Duration::from_secs(600);
    while tail.reports().len() < 2 {
        if Instant::now() > deadline {
            return Err(BenchError::NoThroughput(Duration::from_secs(600)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(opts.warmup).await;
    let warm_from = tail.reports().len();
    let prober = start_prober(opts, &console, Instant::now())?;
    tokio::time::sleep(opts.measure).await;
    let warm_reports = tail.finish();
    let warm_probe_p50_ms = prober.and_then(|p| median(p.finish().0.iter().map(|s| s.latency_ms)));
    let warm = median(warm_reports[warm_from..].iter().map(|r| r.sample.rate))
        .ok_or(BenchError::NoThroughput(opts.measure))?;
    let nonce = warm_reports
        .last()
        .map(|r| r.nonce.clone())
        .unwrap_or_default();
    log::info!("warm rate {warm:.1} MiB/s");

    let image = opts.dir.join("checkpoint.img");
    let mut runs = Vec::new();
    for run in 0..opts.runs {
        for &method in &opts.methods {
            let t0 = Instant::now();
            let tail = ConsoleTail::start(&serial, t0).map_err(io("reading the console"))?;
            let prober = start_prober(opts, &console, t0)?;
            tokio::time::sleep(BEFORE).await;
            let start_ms = ms(t0.elapsed());
            let report = thaw::ops::save::save(
                &name,
                &image,
                &SaveOptions {
                    force: true,
                    keep_running: true,
                    method,
                    copy_limit: opts.copy_limit,
                    ..Default::default()
                },
            )
            .await?;
            let end_ms = ms(t0.elapsed());
            tokio::time::sleep(AFTER).await;
            let reports = tail.finish();
            let (probes, probe_failed) = prober.map(Prober::finish).unwrap_or_default();
            if probe_failed || reports.iter().any(|r| !r.ok || r.nonce != nonce) {
                return Err(BenchError::Integrity(format!(
                    "{} checkpoint",
                    method_name(method)
                )));
            }
            let _ = std::fs::remove_dir_all(&image);
            let samples: Vec<Sample> = reports.iter().map(|r| r.sample).collect();
            let probes_in_window: Vec<&ProbeSample> = probes
                .iter()
                .filter(|p| p.sent_ms >= start_ms && p.sent_ms <= end_ms)
                .collect();
            let rate_before = window_rate(&samples, start_ms - ms(BEFORE) + 100.0, start_ms);
            let in_window = window_rate(&samples, start_ms, end_ms);
            let r = CheckpointRun {
                method,
                run,
                paused_ms: report.paused_ms,
                window_ms: end_ms - start_ms,
                rate_before,
                window_rate_vs_before: if rate_before > 0.0 {
                    in_window / rate_before
                } else {
                    0.0
                },
                window_rate_vs_warm: in_window / warm,
                max_gap_ms: max_gap(&samples, start_ms - 500.0, end_ms + 500.0),
                probes: probes_in_window.len(),
                probe_p50_ms: median(probes_in_window.iter().map(|p| p.latency_ms)),
                probe_max_ms: probes_in_window
                    .iter()
                    .map(|p| p.latency_ms)
                    .reduce(f64::max),
                wp_faults: report.live.as_ref().map_or(0, |l| l.wp_faults),
                nonzero_pages: report.nonzero_pages,
            };
            log::info!(
                "{} run {run}: paused {:.1} ms, window {:.0} ms at {:.0} % of the second before, max gap {:.0} ms",
                method_name(method),
                r.paused_ms,
                r.window_ms,
                r.window_rate_vs_before * 100.0,
                r.max_gap_ms
            );
            runs.push(r);
        }
    }
    let summary = opts
        .methods
        .iter()
        .map(|&method| {
            let of = |f: fn(&CheckpointRun) -> f64| {
                median(runs.iter().filter(|r| r.method == method).map(f)).unwrap_or(0.0)
            };
            CheckpointSummary {
                method,
                paused_ms: of(|r| r.paused_ms),
                window_ms: of(|r| r.window_ms),
                window_rate_vs_before: of(|r| r.window_rate_vs_before),
                window_rate_vs_warm: of(|r| r.window_rate_vs_warm),
                max_gap_ms: of(|r| r.max_gap_ms),
                probe_max_ms: median(
                    runs.iter()
                        .filter(|r| r.method == method)
                        .filter_map(|r| r.probe_max_ms),
                ),
                wp_faults: of(|r| r.wp_faults as f64),
            }
        })
        .collect();
    Ok(SizeReport {
        memory: cfg.memory.0,
        warm,
        warm_probe_p50_ms,
        runs,
        summary,
    })
}

fn start_prober(
    opts: &CheckpointBenchOptions,
    console: &Path,
    t0: Instant,
) -> Result<Option<Prober>, BenchError> {
    opts.probe_period
        .map(|p| Prober::start(console.to_path_buf(), t0, p))
        .transpose()
        .map_err(io("starting the console probe"))
}

/// The guest's mean rate over `[start, end]` ms: each report's rate
/// weighted by how much of its interval lies in the window; time no
/// report covers counts as no work.
pub fn window_rate(samples: &[Sample], start: f64, end: f64) -> f64 {
    let len = end - start;
    if len <= 0.0 {
        return 0.0;
    }
    let work: f64 = samples
        .iter()
        .map(|s| {
            let (a, b) = (s.at_ms - s.interval_ms, s.at_ms);
            let overlap = (b.min(end) - a.max(start)).max(0.0);
            s.rate * overlap
        })
        .sum();
    work / len
}

/// The largest gap between consecutive report arrivals in `[start, end]`.
pub fn max_gap(samples: &[Sample], start: f64, end: f64) -> f64 {
    samples
        .windows(2)
        .filter(|w| w[1].at_ms >= start && w[0].at_ms <= end)
        .map(|w| w[1].at_ms - w[0].at_ms)
        .fold(0.0, f64::max)
}

pub fn method_name(m: SaveMethod) -> &'static str {
    match m {
        SaveMethod::Live => "live",
        SaveMethod::StopAndCopy => "stop-and-copy",
    }
}

/// Parses `live` or `stop-and-copy` (also `stop-copy`).
pub fn parse_method(text: &str) -> Result<SaveMethod, BenchError> {
    match text {
        "live" => Ok(SaveMethod::Live),
        "stop-and-copy" | "stop-copy" => Ok(SaveMethod::StopAndCopy),
        other => Err(BenchError::Options(format!(
            "unknown checkpoint method {other:?} (live, stop-and-copy)"
        ))),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl CheckpointBenchReport {
    /// The report as a markdown table per RAM size.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| RAM | method | pause ms | window ms | guest work in window (vs the second before) | longest report gap ms | probe max ms | write faults |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for size in &self.sizes {
            for s in &size.summary {
                out.push_str(&format!(
                    "| {} GiB | {} | {:.1} | {:.0} | {:.0} % | {:.0} | {} | {:.0} |\n",
                    size.memory as f64 / f64::from(1u32 << 30),
                    method_name(s.method),
                    s.paused_ms,
                    s.window_ms,
                    s.window_rate_vs_before * 100.0,
                    s.max_gap_ms,
                    s.probe_max_ms.map_or("-".into(), |p| format!("{p:.0}")),
                    s.wp_faults
                ));
            }
        }
        out
    }
}

impl std::fmt::Display for CheckpointBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.markdown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_ms: f64, rate: f64) -> Sample {
        Sample {
            at_ms,
            interval_ms: 50.0,
            rate,
        }
    }

    #[test]
    fn window_rate_weights_reports_by_overlap() {
        let samples = [
            s(50.0, 100.0),
            s(100.0, 100.0),
            s(150.0, 0.0),
            s(200.0, 100.0),
        ];
        // [25, 175]: 25 ms at 100, 50 at 100, 50 at 0, 25 at 100.
        let r = window_rate(&samples, 25.0, 175.0);
        assert!((r - 10_000.0 / 150.0).abs() < 1e-9, "{r}");
        // Past the last report: no work.
        let r = window_rate(&samples, 150.0, 250.0);
        assert!((r - 50.0).abs() < 1e-9, "{r}");
        assert_eq!(window_rate(&samples, 10.0, 10.0), 0.0);
    }

    #[test]
    fn max_gap_finds_the_stall() {
        let samples = [s(50.0, 1.0), s(100.0, 1.0), s(900.0, 1.0), s(950.0, 1.0)];
        assert_eq!(max_gap(&samples, 0.0, 2000.0), 800.0);
        assert_eq!(max_gap(&samples, 920.0, 2000.0), 50.0);
    }

    #[test]
    fn fill_is_replaced() {
        assert_eq!(
            with_fill("console=ttyS0 thaw.mem=1536M thaw.tput_ms=50", 3 << 30),
            "console=ttyS0 thaw.tput_ms=50 thaw.mem=3072M"
        );
    }

    #[test]
    fn methods_parse() {
        assert_eq!(parse_method("live").ok(), Some(SaveMethod::Live));
        assert_eq!(
            parse_method("stop-copy").ok(),
            Some(SaveMethod::StopAndCopy)
        );
        assert!(parse_method("fast").is_err());
    }
}
