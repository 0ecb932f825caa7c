//! Measures this machine's physical limits for lazy restore (`thaw limits`):
//! the raw cross-process userfaultfd fault round trip, `UFFDIO_COPY`
//! throughput by batch size, cold sequential read bandwidth from disk and the
//! latency of one cold 4 KiB page read.
//!
//! The userfaultfd tests run against a child process ([`child_main`], reached
//! through [`ChildCommand`]) that maps a `MAP_SHARED` memfd, exactly as QEMU
//! maps guest RAM: thaw takes over a userfaultfd inside it
//! ([`thaw::remote::uffd::take_over`]), registers the mapping for missing faults and
//! serves it like the restore engine does. The child speaks a line protocol:
//! it prints `THAW-LIMITS-CHILD ready addr=.. len=.. memfd=..` on stdout, then
//! answers `touch N` (read one byte of each of the first `N` pages in order,
//! timing each touch) and `exit` read from stdin. Between passes the pages
//! are made missing again by punching a hole over the whole memfd through
//! `/proc/<child>/fd/<memfd>`.
//!
//! The round trip depends heavily on where the scheduler puts the two sides:
//! on one CPU it is two context switches, across CPUs it is two cross-CPU
//! wake-ups (an IPI and, in a VM, waking an idle vCPU). So besides the
//! scheduler's own placement it is also measured with the fault thread and
//! the child pinned to the same CPU and to two different CPUs.
//!
//! The read test writes a scratch file, fsyncs it and evicts *only that file*
//! from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` (no root
//! needed, the rest of the page cache is left alone), then reads it back with
//! 4 MiB buffered `pread`s as the restore filler does. On a virtual disk the
//! host may still cache the data, and on tmpfs nothing can be evicted: the
//! report shows how much of the file was still cached before the cold read.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;
use serde::Serialize;
use userfaultfd_sys::UFFD_FEATURE_MISSING_SHMEM;

use thaw::mem::{u64_from, usize_from, HostAddr, PAGE_BYTES, PAGE_SIZE};
use thaw::remote::uffd::{self, CopyResult, EventBuffer, FaultEvent, RemoteUffd, UffdError};

/// Marks the child's protocol lines (anything else on its stdout, such as a
/// test harness's chatter, is skipped).
const MARKER: &str = "THAW-LIMITS-CHILD";
/// Environment variable telling the child how many bytes to map.
const CHILD_BYTES_ENV: &str = "THAW_LIMITS_CHILD_BYTES";
/// Name of the memfd the child maps (visible in its `/proc/<pid>/maps`).
const MEMFD_NAME: &str = "thaw-limits";
/// Name of thaw's hidden subcommand that runs [`child_main`].
pub const CHILD_SUBCOMMAND: &str = "limits-child";
/// Where the read test puts its scratch file by default.
pub const DEFAULT_DIR: &str = "/var/lib/thaw";
/// Batch sizes of the copy test by default.
pub const DEFAULT_COPY_BATCHES: [u64; 6] =
    [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// Bytes per `pread` in the read test (the restore filler's request size).
pub const READ_REQUEST_BYTES: u64 = 4 << 20;
/// Cold single-page reads timed by the read test.
const PAGE_READS: u64 = 256;
/// How long the child may take to start and map its memory.
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the child may take to exit after `exit`.
const CHILD_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Byte installed in every page of the fault test (non-zero on purpose).
const FAULT_FILL: u8 = 0x5a;

/// Errors measuring the limits.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("starting the measurement child {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the measurement child (pid {pid}) while {what}: {source}")]
    ChildIo {
        pid: Pid,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the measurement child (pid {pid}) did not answer within {timeout:?} while {what}")]
    ChildTimeout {
        pid: Pid,
        what: &'static str,
        timeout: Duration,
    },
    #[error(
        "the measurement child (pid {pid}) closed its output while {what} (it exited or crashed)"
    )]
    ChildGone { pid: Pid, what: &'static str },
    #[error("the measurement child (pid {pid}) failed: {message}")]
    ChildFailed { pid: Pid, message: String },
    #[error("unexpected answer from the measurement child (pid {pid}): {line:?}")]
    ChildProtocol { pid: Pid, line: String },
    #[error("the measurement child (pid {pid}) exited with {status}")]
    ChildExit {
        pid: Pid,
        status: std::process::ExitStatus,
    },
    #[error("the child's mapping {what}")]
    Mapping { what: String },
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(
        "installing {len} bytes at {addr:#x} with UFFDIO_COPY failed after {copied} bytes: {errno}"
    )]
    Copy {
        addr: u64,
        len: usize,
        copied: usize,
        errno: Errno,
    },
    #[error(
        "{what} was already present at {addr:#x} (the hole punch did not make the pages missing)"
    )]
    Present { what: &'static str, addr: u64 },
    #[error("a fault at {addr:#x}, outside the child's mapping {start:#x}+{len:#x}")]
    StrayFault { addr: u64, start: u64, len: u64 },
    #[error("the fault thread: {0}")]
    FaultThread(String),
    #[error("{context}: {errno}")]
    Sys { context: String, errno: Errno },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LimitsError {
    let context = context.into();
    move |source| LimitsError::Io { context, source }
}

fn sys_err(context: impl Into<String>) -> impl FnOnce(Errno) -> LimitsError {
    let context = context.into();
    move |errno| LimitsError::Sys { context, errno }
}

/// How to start the measurement child: a program whose run ends in
/// [`child_main`]. The default is thaw itself with its hidden subcommand.
#[derive(Clone, Debug)]
pub struct ChildCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl ChildCommand {
    /// The running executable (`/proc/self/exe`) with `thaw limits-child`.
    pub fn thaw() -> ChildCommand {
        ChildCommand {
            program: "/proc/self/exe".into(),
            args: vec![CHILD_SUBCOMMAND.into()],
            env: Vec::new(),
        }
    }
}

/// What to measure, and how much.
#[derive(Clone, Debug)]
pub struct LimitsOptions {
    /// Pages the child touches in the fault test (one fault each).
    pub fault_pages: u64,
    /// Bytes copied per batch size in the copy test (a page multiple).
    pub copy_region_bytes: u64,
    /// Batch sizes of the copy test (page multiples), in the order run.
    pub copy_batch_bytes: Vec<u64>,
    /// Size of the read test's scratch file (a page multiple).
    pub read_bytes: u64,
    /// Directory for the scratch file; created 0700 if missing.
    pub dir: PathBuf,
    /// Also re-read the file once it is in the page cache.
    pub warm_read: bool,
    /// Also run the fault test pinned to one CPU and across two CPUs.
    pub pinned_faults: bool,
    pub child: ChildCommand,
}

impl Default for LimitsOptions {
    fn default() -> LimitsOptions {
        LimitsOptions {
            fault_pages: 20_000,
            copy_region_bytes: 256 << 20,
            copy_batch_bytes: DEFAULT_COPY_BATCHES.to_vec(),
            read_bytes: 1 << 30,
            dir: DEFAULT_DIR.into(),
            warm_read: true,
            pinned_faults: true,
            child: ChildCommand::thaw(),
        }
    }
}

/// Everything `thaw limits` measured (the `--json` output).
#[derive(Clone, Debug, Serialize)]
pub struct LimitsReport {
    /// `uname -r`.
    pub kernel_release: String,
    /// CPUs thaw may run on.
    pub cpus: usize,
    pub page_size_bytes: u64,
    /// The fault test where the scheduler places both sides.
    pub fault_round_trip: FaultRoundTrip,
    /// The fault test pinned: same CPU, then (with two CPUs or more) across
    /// two CPUs. Empty when not asked for.
    pub fault_round_trip_pinned: Vec<FaultRoundTrip>,
    pub copy_throughput: Vec<CopyThroughput>,
    pub seq_read: SeqRead,
}

/// The cross-process fault round trip: a child touches missing pages of a
/// registered shared mapping; a thaw thread serves each with one 4 KiB copy.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRoundTrip {
    pub placement: Placement,
    /// The CPU the fault thread was pinned to, if pinned.
    pub handler_cpu: Option<usize>,
    /// The CPU the child was pinned to, if pinned.
    pub child_cpu: Option<usize>,
    /// Pages the child touched (one first touch each).
    pub faults: u64,
    /// Page faults the handler read and served.
    pub served_faults: u64,
    /// One touch as the faulting process sees it (fault → page in place).
    pub child_p50_us: f64,
    pub child_p99_us: f64,
    pub child_mean_us: f64,
    pub child_max_us: f64,
    /// Handler service time: event read → `UFFDIO_COPY` (with wake) done.
    pub handler_p50_us: f64,
    pub handler_p99_us: f64,
    pub handler_mean_us: f64,
}

/// Where the fault thread and the faulting child ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Wherever the scheduler put them.
    Scheduler,
    /// Both pinned to one CPU.
    SameCpu,
    /// Pinned to two different CPUs.
    CrossCpu,
}

/// A pinning of the fault test.
#[derive(Clone, Copy, Debug)]
struct Pin {
    placement: Placement,
    handler_cpu: usize,
    child_cpu: usize,
}

/// `UFFDIO_COPY` throughput for one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct CopyThroughput {
    pub batch_bytes: u64,
    pub region_bytes: u64,
    /// `UFFDIO_COPY` calls made.
    pub calls: u64,
    pub per_call_us: f64,
    pub mib_per_s: f64,
}

/// Sequential buffered read bandwidth of a scratch file.
#[derive(Clone, Debug, Serialize)]
pub struct SeqRead {
    pub dir: PathBuf,
    pub file_bytes: u64,
    pub request_bytes: u64,
    /// Writing the file and `fsync` (informational).
    pub write_fsync_mib_per_s: f64,
    /// Share of the file still in the page cache after the eviction (0 when
    /// `POSIX_FADV_DONTNEED` worked; 100 on tmpfs).
    pub cached_before_cold_read_pct: f64,
    pub cold_mib_per_s: f64,
    /// One 4 KiB buffered `pread` of a page not in the page cache, at
    /// spread-out offsets (what a fault's own page costs to read), µs.
    #[serde(default)]
    pub cold_page_read_p50_us: f64,
    #[serde(default)]
    pub cold_page_read_p99_us: f64,
    /// Re-read from the page cache, when asked for.
    pub warm_mib_per_s: Option<f64>,
}

/// Runs every measurement; takes seconds (mostly the read test).
///
/// Needs what a restore needs: ptrace over a child and userfaultfd
/// (root or `CAP_SYS_PTRACE`). The child is always reaped, killed on errors.
pub fn measure(opts: &LimitsOptions) -> Result<LimitsReport, LimitsError> {
    validate(opts)?;
    let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(io_err("reading /proc/sys/kernel/osrelease"))?
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map_err(io_err("counting the CPUs"))?
        .get();
    log::info!("measuring limits on Linux {kernel_release} with {cpus} CPUs");

    let (fault_round_trip, fault_round_trip_pinned, copy_throughput) = measure_uffd(opts)?;
    let seq_read = measure_seq_read(&opts.dir, opts.read_bytes, opts.warm_read)?;
    Ok(LimitsReport {
        kernel_release,
        cpus,
        page_size_bytes: PAGE_SIZE,
        fault_round_trip,
        fault_round_trip_pinned,
        copy_throughput,
        seq_read,
    })
}

fn validate(opts: &LimitsOptions) -> Result<(), LimitsError> {
    let bad = |m: String| Err(LimitsError::InvalidOption(m));
    if opts.fault_pages == 0 {
        return bad("the fault test needs at least one page".into());
    }
    for (what, v) in [
        ("copy region", opts.copy_region_bytes),
        ("read file size", opts.read_bytes),
    ] {
        if v == 0 || v % PAGE_SIZE != 0 {
            return bad(format!(
                "the {what} must be a non-zero multiple of {PAGE_SIZE} bytes (got {v})"
            ));
        }
    }
    if opts.copy_batch_bytes.is_empty() {
        return bad("no copy batch sizes given".into());
    }
    for &b in &opts.copy_batch_bytes {
        if b == 0 || b % PAGE_SIZE != 0 || b > opts.copy_region_bytes {
            return bad(format!(
                "copy batch size {b} must be a non-zero multiple of {PAGE_SIZE} bytes, \
                 at most the copy region ({})",
                opts.copy_region_bytes
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// userfaultfd tests (thaw's side)

/// The running child, its pipes, and the guarantee that it is reaped.
struct ChildGuard {
    child: std::process::Child,
    pid: Pid,
    stdin: Option<ChildStdin>,
    out: LineReader,
}

impl ChildGuard {
    fn spawn(cmd: &ChildCommand, bytes: u64) -> Result<ChildGuard, LimitsError> {
        let mut child = std::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .env(CHILD_BYTES_ENV, bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| LimitsError::Spawn {
                program: cmd.program.clone(),
                source,
            })?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        // Both pipes were asked for; a missing one reads as a child gone.
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let guard = ChildGuard {
            child,
            pid,
            stdin,
            out: LineReader::new(stdout),
        };
        log::debug!("started the measurement child, pid {pid}");
        Ok(guard)
    }

    fn send(&mut self, line: &str, what: &'static str) -> Result<(), LimitsError> {
        let pid = self.pid;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or(LimitsError::ChildGone { pid, what })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|source| LimitsError::ChildIo { pid, what, source })
    }

    /// The next protocol line (after the marker), split into its verb and
    /// `key=value` fields.
    fn answer(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<(String, Fields), LimitsError> {
        let pid = self.pid;
        loop {
            let line = match self.out.read_line(Instant::now() + timeout) {
                Ok(Some(line)) => line,
                Ok(None) => return Err(LimitsError::ChildGone { pid, what }),
                Err(LineError::Timeout) => {
                    return Err(LimitsError::ChildTimeout { pid, what, timeout })
                }
                Err(LineError::Io(source)) => {
                    return Err(LimitsError::ChildIo { pid, what, source })
                }
            };
            let Some(at) = line.find(MARKER) else {
                log::debug!("measurement child said: {line}");
                continue;
            };
            let rest = line[at + MARKER.len()..].trim();
            let (verb, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if verb == "error" {
                return Err(LimitsError::ChildFailed {
                    pid,
                    message: tail.to_string(),
                });
            }
            return Ok((verb.to_string(), Fields(tail.to_string())));
        }
    }

    /// Asks the child to exit and reaps it; fails unless it exits 0.
    fn finish(mut self) -> Result<(), LimitsError> {
        let pid = self.pid;
        self.send("exit", "asking it to exit")?;
        // Its stdout closes when it exits.
        loop {
            match self.out.read_line(Instant::now() + CHILD_EXIT_TIMEOUT) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(LineError::Timeout) => {
                    return Err(LimitsError::ChildTimeout {
                        pid,
                        what: "exiting",
                        timeout: CHILD_EXIT_TIMEOUT,
                    })
                }
                Err(LineError::Io(source)) => {
                    return Err(LimitsError::ChildIo {
                        pid,
                        what: "exiting",
                        source,
                    })
                }
            }
        }
        self.stdin = None;
        let status = self.child.wait().map_err(|source| LimitsError::ChildIo {
            pid,
            what: "reaping it",
            source,
        })?;
        if !status.success() {
            return Err(LimitsError::ChildExit { pid, status });
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // After `finish` the child is reaped and `try_wait` returns its status.
        match self.child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => log::warn!("checking the measurement child {}: {e}", self.pid),
        }
        if let Err(e) = self.child.kill() {
            log::warn!("killing the measurement child {}: {e}", self.pid);
        }
        if let Err(e) = self.child.wait() {
            log::warn!("reaping the measurement child {}: {e}", self.pid);
        }
    }
}

/// `key=value` fields of a protocol line.
struct Fields(String);

impl Fields {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    fn num(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

enum LineError {
    Timeout,
    Io(std::io::Error),
}

/// Reads lines from the child's stdout, waiting on the pipe with a deadline.
struct LineReader {
    pipe: Option<ChildStdout>,
    buf: Vec<u8>,
}

impl LineReader {
    fn new(pipe: Option<ChildStdout>) -> LineReader {
        LineReader {
            pipe,
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at end of output.
    fn read_line(&mut self, deadline: Instant) -> Result<Option<String>, LineError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..nl]).trim_end().to_string(),
                ));
            }
            let Some(pipe) = self.pipe.as_mut() else {
                return Ok(None);
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => return Err(LineError::Timeout),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(LineError::Io(errno.into())),
            }
            let mut chunk = [0u8; 4096];
            match pipe.read(&mut chunk) {
                Ok(0) => {
                    self.pipe = None;
                    if !self.buf.is_empty() {
                        let rest = std::mem::take(&mut self.buf);
                        return Ok(Some(String::from_utf8_lossy(&rest).trim_end().to_string()));
                    }
                    return Ok(None);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

/// The child's mapping as it announced it.
struct ChildMap {
    start: HostAddr,
    len: u64,
    memfd: i32,
}

/// The fault round trips (scheduler's placement, pinned ones) and the copy
/// throughputs.
type UffdResults = (FaultRoundTrip, Vec<FaultRoundTrip>, Vec<CopyThroughput>);

fn measure_uffd(opts: &LimitsOptions) -> Result<UffdResults, LimitsError> {
    let len = (opts.fault_pages * PAGE_SIZE).max(opts.copy_region_bytes);
    let mut child = ChildGuard::spawn(&opts.child, len)?;
    let result = measure_with_child(&mut child, opts, len);
    match result {
        Ok(r) => {
            child.finish()?;
            Ok(r)
        }
        // Dropping the guard kills and reaps the child.
        Err(e) => Err(e),
    }
}

fn measure_with_child(
    child: &mut ChildGuard,
    opts: &LimitsOptions,
    len: u64,
) -> Result<UffdResults, LimitsError> {
    let pid = child.pid;
    let (verb, f) = child.answer(CHILD_START_TIMEOUT, "starting")?;
    let memfd = f.num("memfd").and_then(|m| i32::try_from(m).ok());
    let map = match (verb.as_str(), f.num("addr"), f.num("len"), memfd) {
        ("ready", Some(addr), Some(l), Some(memfd)) => ChildMap {
            start: HostAddr(addr),
            len: l,
            memfd,
        },
        _ => {
            return Err(LimitsError::ChildProtocol {
                pid,
                line: format!("{verb} {}", f.0),
            })
        }
    };
    check_mapping(pid, &map, len)?;

    // The child is ours and not reaped: its pid cannot have been reused.
    let process =
        thaw::remote::process::QemuProcess::open(pid.as_raw()).map_err(uffd::UffdError::from)?;
    let uffd = uffd::take_over(&process, UFFD_FEATURE_MISSING_SHMEM)?;
    uffd.register_missing(map.start, map.len)?;
    let memfd_path = format!("/proc/{pid}/fd/{}", map.memfd);
    let memfd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memfd_path)
        .map_err(io_err(format!("opening the child's memfd {memfd_path}")))?;
    let punch = || punch_hole(&memfd, map.len);

    let mut runs = vec![None];
    if opts.pinned_faults {
        runs.extend(pins()?.into_iter().map(Some));
    }
    let mut faults = Vec::with_capacity(runs.len());
    for pin in runs {
        punch()?;
        let f = fault_test(child, &uffd, &map, opts.fault_pages, pin)?;
        log::info!(
            "fault round trip ({:?}) over {} faults: child p50 {:.1} us, handler p50 {:.1} us",
            f.placement,
            f.faults,
            f.child_p50_us,
            f.handler_p50_us
        );
        faults.push(f);
    }
    let pinned = faults.split_off(1);
    let Some(faults) = faults.pop() else {
        return Err(LimitsError::FaultThread("no fault test ran".into()));
    };

    let max_batch = opts
        .copy_batch_bytes
        .iter()
        .copied()
        .max()
        .unwrap_or(PAGE_SIZE);
    let src = pattern(usize_from(max_batch));
    let mut copies = Vec::with_capacity(opts.copy_batch_bytes.len());
    for &batch in &opts.copy_batch_bytes {
        punch()?;
        let c = copy_pass(
            &uffd,
            map.start,
            opts.copy_region_bytes,
            &src[..usize_from(batch)],
        )?;
        log::info!(
            "UFFDIO_COPY in {} KiB batches: {:.0} MiB/s",
            batch >> 10,
            c.mib_per_s
        );
        copies.push(c);
    }
    Ok((faults, pinned, copies))
}

/// The pinnings to measure: one CPU, and two CPUs when thaw may use two.
fn pins() -> Result<Vec<Pin>, LimitsError> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0))
        .map_err(sys_err("reading thaw's CPU affinity"))?;
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .take(2)
        .collect();
    let mut pins = Vec::new();
    if let Some(&a) = cpus.first() {
        pins.push(Pin {
            placement: Placement::SameCpu,
            handler_cpu: a,
            child_cpu: a,
        });
    }
    if let [a, b] = cpus[..] {
        pins.push(Pin {
            placement: Placement::CrossCpu,
            handler_cpu: a,
            child_cpu: b,
        });
    }
    Ok(pins)
}

/// Pins thread or process `pid` (0: the calling thread) to `cpu`.
fn pin_to(pid: Pid, cpu: usize) -> Result<(), LimitsError> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)
        .map_err(sys_err(format!("CPU {cpu} is out of range")))?;
    nix::sched::sched_setaffinity(pid, &set).map_err(sys_err(format!(
        "pinning {} to CPU {cpu}",
        if pid.as_raw() == 0 {
            "the fault thread".to_string()
        } else {
            format!("process {pid}")
        }
    )))
}

/// Checks the announced mapping against the child's `/proc/<pid>/maps`.
fn check_mapping(pid: Pid, map: &ChildMap, len: u64) -> Result<(), LimitsError> {
    let maps = uffd::find_mapping(pid, MEMFD_NAME)?;
    let found = maps.iter().find(|m| m.start == map.start);
    match found {
        Some(m) if m.len == map.len && map.len >= len && m.shared && m.offset == 0 => Ok(()),
        Some(m) => Err(LimitsError::Mapping {
            what: format!(
                "{:#x}+{:#x} does not fit: maps shows {m:?}, {len:#x} bytes were asked for",
                map.start.0, map.len
            ),
        }),
        None => Err(LimitsError::Mapping {
            what: format!(
                "{:#x}+{:#x} is not in /proc/{pid}/maps (found {maps:?})",
                map.start.0, map.len
            ),
        }),
    }
}

/// Frees every page of the memfd, so each is missing again.
fn punch_hole(memfd: &File, len: u64) -> Result<(), LimitsError> {
    use nix::fcntl::FallocateFlags as F;
    nix::fcntl::fallocate(
        memfd,
        F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        0,
        libc::off_t::try_from(len).map_err(|_| LimitsError::Sys {
            context: format!("punching a hole of {len} bytes"),
            errno: Errno::EFBIG,
        })?,
    )
    .map_err(sys_err("punching a hole over the child's memfd"))
}

/// `len` bytes of non-zero data that is not one repeated byte.
fn pattern(len: usize) -> Vec<u8> {
    // The low byte of the index (truncation intended), scrambled.
    (0..len)
        .map(|i| (i.to_le_bytes()[0]).wrapping_mul(31) | 1)
        .collect()
}

/// What the fault thread measured.
struct Served {
    faults: u64,
    service_ns: Vec<u64>,
}

fn fault_test(
    child: &mut ChildGuard,
    uffd: &RemoteUffd,
    map: &ChildMap,
    pages: u64,
    pin: Option<Pin>,
) -> Result<FaultRoundTrip, LimitsError> {
    let (stop_r, stop_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| {
            LimitsError::Sys {
                context: "creating a pipe".into(),
                errno: Errno::from_raw(e.raw_os_error()),
            }
        })?;
    let pid = child.pid;
    if let Some(p) = pin {
        // The child keeps this pinning for the rest of its (short) life.
        pin_to(pid, p.child_cpu)?;
    }
    let timeout = Duration::from_secs(30) + Duration::from_millis(pages);
    let (served, answer) = std::thread::scope(|s| {
        let server = std::thread::Builder::new()
            .name("limits-faults".into())
            .spawn_scoped(s, || {
                let r = match pin {
                    // Pins only this thread, which ends with the test.
                    Some(p) => pin_to(Pid::from_raw(0), p.handler_cpu),
                    None => Ok(()),
                }
                .and_then(|()| serve_faults(uffd, map, usize_from(pages), &stop_r));
                if r.is_err() {
                    // Unblocks the main thread waiting for the child's answer;
                    // the child is not reaped before this scope ends.
                    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL) {
                        log::warn!("killing the measurement child {pid}: {e}");
                    }
                }
                r
            });
        let answer = match &server {
            Ok(_) => child
                .send(&format!("touch {pages}"), "running the fault test")
                .and_then(|()| child.answer(timeout, "running the fault test")),
            Err(e) => Err(LimitsError::FaultThread(format!("cannot start it: {e}"))),
        };
        // Always stop the thread, whatever happened.
        let stopped = rustix::io::write(&stop_w, b"x");
        let served = match server {
            Ok(h) => match h.join() {
                Ok(r) => r,
                Err(_) => Err(LimitsError::FaultThread("it panicked".into())),
            },
            Err(e) => Err(LimitsError::FaultThread(format!("cannot start it: {e}"))),
        };
        if let Err(e) = stopped {
            log::warn!("signalling the fault thread to stop: {e}");
        }
        (served, answer)
    });
    // A fault-thread error explains a missing answer better than the answer's error.
    let served = served?;
    let (verb, f) = answer?;
    let parse = |k: &str| f.num(k);
    let (touched, sum, p50, p99, mean, max) = match (
        verb.as_str(),
        parse("pages"),
        parse("sum"),
        parse("p50_ns"),
        parse("p99_ns"),
        parse("mean_ns"),
        parse("max_ns"),
    ) {
        ("touched", Some(n), Some(sum), Some(p50), Some(p99), Some(mean), Some(max)) => {
            (n, sum, p50, p99, mean, max)
        }
        _ => {
            return Err(LimitsError::ChildProtocol {
                pid,
                line: format!("{verb} {}", f.0),
            })
        }
    };
    if touched != pages || sum != pages * u64::from(FAULT_FILL) {
        return Err(LimitsError::ChildFailed {
            pid,
            message: format!(
                "touched {touched} pages with byte sum {sum}; expected {pages} pages of {FAULT_FILL:#x} \
                 (some pages were not served through the userfaultfd)"
            ),
        });
    }
    if served.faults != pages {
        return Err(LimitsError::FaultThread(format!(
            "served {} faults for {pages} first touches",
            served.faults
        )));
    }
    let handler = Stats::of(served.service_ns);
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(FaultRoundTrip {
        placement: pin.map_or(Placement::Scheduler, |p| p.placement),
        handler_cpu: pin.map(|p| p.handler_cpu),
        child_cpu: pin.map(|p| p.child_cpu),
        faults: touched,
        served_faults: served.faults,
        child_p50_us: us(p50),
        child_p99_us: us(p99),
        child_mean_us: us(mean),
        child_max_us: us(max),
        handler_p50_us: us(handler.p50),
        handler_p99_us: us(handler.p99),
        handler_mean_us: us(handler.mean),
    })
}

/// The fault thread: serves every missing-page fault in the child's mapping
/// with one 4 KiB `UFFDIO_COPY` (with wake), as the restore engine does,
/// until `stop` becomes readable. Allocates nothing per fault.
fn serve_faults(
    uffd: &RemoteUffd,
    map: &ChildMap,
    expected: usize,
    stop: &OwnedFd,
) -> Result<Served, LimitsError> {
    let page = vec![FAULT_FILL; PAGE_BYTES];
    let mut events = EventBuffer::new(64);
    let mut served = Served {
        faults: 0,
        service_ns: Vec::with_capacity(expected),
    };
    let end = map.start.0 + map.len;
    loop {
        let batch = uffd.read_events(&mut events, Some(Duration::ZERO))?;
        if batch.is_empty() {
            // Wait for a fault or the stop signal; no timeout needed.
            let mut fds = [
                PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => return Err(UffdError::Poll(errno).into()),
            }
            let ready = |fd: &PollFd| fd.revents().unwrap_or(PollFlags::empty());
            if !ready(&fds[1]).is_empty() {
                return Ok(served);
            }
            let u = ready(&fds[0]);
            if u.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
                return Err(UffdError::PollError(u.bits()).into());
            }
            continue;
        }
        let read_at = Instant::now();
        for ev in batch {
            let FaultEvent::PageFault { addr } = *ev else {
                log::debug!("userfaultfd event ignored: {ev:?}");
                continue;
            };
            if addr < map.start.0 || addr >= end {
                return Err(LimitsError::StrayFault {
                    addr,
                    start: map.start.0,
                    len: map.len,
                });
            }
            let dst = HostAddr(addr & !(PAGE_SIZE - 1));
            match uffd.copy(dst, &page, true) {
                CopyResult::Done(_) => {}
                // Another installer won (cannot happen here): just wake.
                CopyResult::Exists { .. } => uffd.wake(dst, PAGE_SIZE)?,
                CopyResult::Failed { copied, errno } => {
                    return Err(LimitsError::Copy {
                        addr: dst.0,
                        len: page.len(),
                        copied,
                        errno,
                    })
                }
            }
            served.faults += 1;
            if served.service_ns.len() < served.service_ns.capacity() {
                served
                    .service_ns
                    .push(read_at.elapsed().as_nanos().try_into().unwrap_or(u64::MAX));
            }
        }
    }
}

/// Copies `region` bytes from `start` in batches of `src.len()` bytes into
/// missing pages, timing the whole pass.
fn copy_pass(
    uffd: &RemoteUffd,
    start: HostAddr,
    region: u64,
    src: &[u8],
) -> Result<CopyThroughput, LimitsError> {
    let batch = src.len() as u64;
    let mut calls = 0u64;
    let began = Instant::now();
    let mut off = 0u64;
    while off < region {
        let n = usize_from(batch.min(region - off));
        let dst = start.offset(off);
        calls += 1;
        match uffd.copy(dst, &src[..n], true) {
            CopyResult::Done(_) => off += n as u64,
            CopyResult::Exists { copied } => {
                return Err(LimitsError::Present {
                    what: "a page",
                    addr: dst.0 + copied as u64,
                })
            }
            CopyResult::Failed {
                copied,
                errno: Errno::EAGAIN,
            } => off += copied as u64, // mappings changing: retry the rest
            CopyResult::Failed { copied, errno } => {
                return Err(LimitsError::Copy {
                    addr: dst.0,
                    len: n,
                    copied,
                    errno,
                })
            }
        }
    }
    let secs = began.elapsed().as_secs_f64().max(1e-9);
    Ok(CopyThroughput {
        batch_bytes: batch,
        region_bytes: region,
        calls,
        per_call_us: secs * 1e6 / calls as f64,
        mib_per_s: region as f64 / (1u64 << 20) as f64 / secs,
    })
}

/// Nearest-rank percentiles and mean of nanosecond samples.
struct Stats {
    p50: u64,
    p99: u64,
    mean: u64,
    max: u64,
}

impl Stats {
    fn of(mut ns: Vec<u64>) -> Stats {
        if ns.is_empty() {
            return Stats {
                p50: 0,
                p99: 0,
                mean: 0,
                max: 0,
            };
        }
        ns.sort_unstable();
        // Nearest rank: ceil(p * n) for p in (0, 1], an integer in 1..=n.
        let rank = |p: f64| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // in 1..=n
            let r = (p * ns.len() as f64).ceil() as usize;
            ns[r.clamp(1, ns.len()) - 1]
        };
        let sum: u128 = ns.iter().map(|&v| u128::from(v)).sum();
        Stats {
            p50: rank(0.50),
            p99: rank(0.99),
            // The mean of u64 values fits a u64.
            mean: u64::try_from(sum / u128::from(u64_from(ns.len()))).unwrap_or(u64::MAX),
            max: ns[ns.len() - 1],
        }
    }
}

// ---------------------------------------------------------------------------
// The child

/// The measurement child's whole life; returns its exit code. Reached as
/// `thaw limits-child` (hidden) and, in tests, by re-executing the test
/// binary. Maps a memfd of `$THAW_LIMITS_CHILD_BYTES` bytes and answers
/// commands on stdin (see the module documentation); errors are printed as
/// `THAW-LIMITS-CHILD error <message>` for the parent to report.
pub fn child_main() -> i32 {
    let out = std::io::stdout();
    match child_run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("limits child: {e}");
            let mut out = out.lock();
            // Nothing more to do if the parent has gone away too.
            let _ = writeln!(out, "{MARKER} error {e}").and_then(|()| out.flush());
            1
        }
    }
}

/// A mapping of the child's memfd, unmapped on drop.
struct ChildMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Drop for ChildMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `child_run`, which
        // nothing references any more.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn child_run() -> Result<(), LimitsError> {
    // If thaw dies while this process waits on a fault nobody will serve,
    // die too rather than hang forever. (Had thaw died before this call,
    // stdin reads end-of-file before any fault can happen.)
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(sys_err("setting the parent-death signal"))?;
    let bytes = match std::env::var(CHILD_BYTES_ENV) {
        Ok(v) => v.parse::<u64>().map_err(|_| {
            LimitsError::InvalidOption(format!("{CHILD_BYTES_ENV}={v:?} is not a byte count"))
        })?,
        Err(_) => 256 << 20,
    };
    let len = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    if len == 0 {
        return Err(LimitsError::InvalidOption(format!(
            "{CHILD_BYTES_ENV} must not be 0"
        )));
    }
    let memfd = nix::sys::memfd::memfd_create(MEMFD_NAME, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(sys_err("memfd_create"))?;
    let size = libc::off_t::try_from(len)
        .map_err(|_| LimitsError::InvalidOption(format!("{CHILD_BYTES_ENV} {len} is too large")))?;
    nix::unistd::ftruncate(&memfd, size)
        .map_err(sys_err(format!("sizing the memfd to {len} bytes")))?;
    // SAFETY: a fresh shared read-only mapping of our own memfd; the result
    // is checked and owned by `ChildMapping`, which unmaps it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            usize_from(len),
            libc::PROT_READ,
            libc::MAP_SHARED,
            memfd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(LimitsError::Sys {
            context: format!("mapping {len} bytes of the memfd"),
            errno: Errno::last(),
        });
    }
    let mapping = ChildMapping {
        ptr,
        len: usize_from(len),
    };
    let pages = len / PAGE_SIZE;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let say = |out: &mut std::io::StdoutLock, line: String| {
        writeln!(out, "{MARKER} {line}")
            .and_then(|()| out.flush())
            .map_err(io_err("writing to stdout"))
    };
    say(
        &mut out,
        format!(
            "ready addr={:#x} len={len} memfd={} pid={}",
            mapping.ptr as u64,
            memfd.as_raw_fd(),
            std::process::id()
        ),
    )?;
    let mut times = Vec::new();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdin
            .read_line(&mut line)
            .map_err(io_err("reading commands from stdin"))?;
        if n == 0 {
            return Ok(()); // the parent went away
        }
        let cmd = line.trim();
        let mut words = cmd.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("touch"), Some(n), None) => {
                let n: u64 = n.parse().map_err(|_| {
                    LimitsError::InvalidOption(format!("bad page count in {cmd:?}"))
                })?;
                if n == 0 || n > pages {
                    return Err(LimitsError::InvalidOption(format!(
                        "cannot touch {n} pages of {pages}"
                    )));
                }
                times.clear();
                times.reserve(usize_from(n));
                let sum = touch(&mapping, usize_from(n), &mut times);
                let s = Stats::of(std::mem::take(&mut times));
                say(
                    &mut out,
                    format!(
                        "touched pages={n} sum={sum} p50_ns={} p99_ns={} mean_ns={} max_ns={}",
                        s.p50, s.p99, s.mean, s.max
                    ),
                )?;
            }
            (Some("exit"), None, None) => {
                say(&mut out, "bye".into())?;
                return Ok(());
            }
            _ => {
                return Err(LimitsError::InvalidOption(format!(
                    "unknown command {cmd:?}"
                )))
            }
        }
    }
}

/// Reads one byte of each of the first `n` pages in order, timing each read
/// (a first touch: a userfaultfd round trip). Returns the sum of the bytes.
/// `times` must have room for `n` samples (no allocation while timing).
fn touch(mapping: &ChildMapping, n: usize, times: &mut Vec<u64>) -> u64 {
    let base = mapping.ptr as *const u8;
    let mut sum = 0u64;
    for i in 0..n.min(mapping.len / PAGE_BYTES) {
        let began = Instant::now();
        // SAFETY: page `i` lies inside the live mapping (checked by the loop
        // bound); a volatile read so every touch really happens, in order.
        let byte = unsafe { std::ptr::read_volatile(base.add(i * PAGE_BYTES)) };
        let ns = began.elapsed().as_nanos().try_into().unwrap_or(u64::MAX);
        sum += u64::from(byte);
        times.push(ns);
    }
    sum
}

// ---------------------------------------------------------------------------
// Sequential read

/// Removes the scratch file when dropped (also on errors).
struct Scratch {
    path: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => log::debug!("removed {}", self.path.display()),
            Err(e) => log::warn!("removing {}: {e}", self.path.display()),
        }
    }
}

fn measure_seq_read(dir: &Path, bytes: u64, warm: bool) -> Result<SeqRead, LimitsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = dir.join(format!(
        ".thaw-limits-{}-{nanos:08x}.tmp",
        std::process::id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    let scratch = Scratch { path };
    let name = scratch.path.display().to_string();

    // Write and fsync.
    let request = usize_from(READ_REQUEST_BYTES.min(bytes));
    let data = pattern(request);
    let began = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        let n = usize_from((bytes - off).min(u64_from(request)));
        file.write_all_at(&data[..n], off)
            .map_err(io_err(format!("writing {name}")))?;
        off += n as u64;
    }
    file.sync_all()
        .map_err(io_err(format!("fsyncing {name}")))?;
    let write_fsync_mib_per_s = mib_per_s(bytes, began.elapsed());

    // Evict this file (only this one) from the page cache.
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(sys_err(format!("evicting {name} from the page cache")))?;
    let cached = cached_fraction(&file, bytes)
        .map_err(sys_err(format!("checking what of {name} is cached")))?;
    if cached > 0.1 {
        log::warn!(
            "{:.0}% of {name} is still in the page cache after POSIX_FADV_DONTNEED \
             (tmpfs?): the cold read is not cold",
            cached * 100.0
        );
    }

    let (page_p50, page_p99) =
        cold_page_reads(&file, bytes).map_err(io_err(format!("reading pages of {name}")))?;
    // The page reads brought some of the file back: evict it again.
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(sys_err(format!("evicting {name} from the page cache")))?;
    let mut buf = vec![0u8; request];
    let cold = read_all(&file, bytes, &mut buf).map_err(io_err(format!("reading {name}")))?;
    let warm = if warm {
        Some(read_all(&file, bytes, &mut buf).map_err(io_err(format!("re-reading {name}")))?)
    } else {
        None
    };
    drop(file);
    drop(scratch);
    Ok(SeqRead {
        dir: dir.to_path_buf(),
        file_bytes: bytes,
        request_bytes: request as u64,
        write_fsync_mib_per_s,
        cached_before_cold_read_pct: cached * 100.0,
        cold_mib_per_s: mib_per_s(bytes, cold),
        cold_page_read_p50_us: page_p50,
        cold_page_read_p99_us: page_p99,
        warm_mib_per_s: warm.map(|d| mib_per_s(bytes, d)),
    })
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// Single pages read from the (evicted) file: up to [`PAGE_READS`] 4 KiB
/// `pread`s at offsets 64 KiB apart or more, visited in a scrambled order
/// so that no read finds its page brought in by the one before; their
/// p50 and p99 in µs.
fn cold_page_reads(file: &File, bytes: u64) -> std::io::Result<(f64, f64)> {
    const STRIDE: u64 = 64 << 10;
    let slots = (bytes / STRIDE).max(1);
    let n = PAGE_READS.min(slots);
    let mut page = vec![0u8; usize_from(PAGE_SIZE)];
    let mut took = Vec::with_capacity(usize_from(n));
    for i in 0..n {
        // A multiplier coprime with `slots` visits each slot once.
        let mut step = 7919 % slots;
        while step == 0 || gcd(step, slots) != 1 {
            step += 1;
        }
        let slot = (i * step) % slots;
        let began = Instant::now();
        file.read_exact_at(&mut page, slot * STRIDE)?;
        took.push(began.elapsed().as_secs_f64() * 1e6);
    }
    std::hint::black_box(&page);
    took.sort_by(f64::total_cmp);
    // The sample at `pct` percent (nearest rank).
    let at = |pct: usize| {
        let i = (took.len().saturating_sub(1) * pct + 50) / 100;
        took.get(i).copied().unwrap_or(0.0)
    };
    Ok((at(50), at(99)))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Reads the whole file sequentially with `buf.len()`-byte `pread`s.
fn read_all(file: &File, bytes: u64, buf: &mut [u8]) -> std::io::Result<Duration> {
    let began = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        let n = usize_from((bytes - off).min(u64_from(buf.len())));
        file.read_exact_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    let elapsed = began.elapsed();
    std::hint::black_box(&buf);
    Ok(elapsed)
}

/// Share (0..=1) of the file's pages in the page cache, by `mincore` on a
/// mapping that is never touched.
fn cached_fraction(file: &File, bytes: u64) -> Result<f64, Errno> {
    let len = usize_from(bytes);
    // SAFETY: a fresh read-only shared mapping of our own file, only passed
    // to mincore (never read) and unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    let pages = usize_from(bytes.div_ceil(PAGE_SIZE));
    let mut vec = vec![0u8; pages];
    // SAFETY: `p..p+len` is the live mapping made above; `vec` has one byte
    // per page of it.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    let errno = Errno::last();
    // SAFETY: unmaps exactly the mapping made above; nothing refers to it.
    unsafe { libc::munmap(p, len) };
    if r != 0 {
        return Err(errno);
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count();
    Ok(resident as f64 / pages as f64)
}

// ---------------------------------------------------------------------------
// Text output

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

impl fmt::Display for LimitsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "machine: Linux {}, {} CPUs, {} pages",
            self.kernel_release,
            self.cpus,
            size(self.page_size_bytes)
        )?;
        writeln!(
            f,
            "userfaultfd fault round trip: {} first touches, one 4 KiB UFFDIO_COPY each (us)",
            self.fault_round_trip.faults
        )?;
        writeln!(
            f,
            "  {:<18} {:^26}   {:^26}",
            "", "faulting process", "handler service"
        )?;
        writeln!(
            f,
            "  {:<18} {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8}",
            "placement", "p50", "p99", "mean", "p50", "p99", "mean"
        )?;
        for r in std::iter::once(&self.fault_round_trip).chain(&self.fault_round_trip_pinned) {
            let placement = match (r.placement, r.handler_cpu, r.child_cpu) {
                (Placement::SameCpu, Some(h), _) => format!("same CPU ({h})"),
                (Placement::CrossCpu, Some(h), Some(c)) => format!("cross CPU ({h}, {c})"),
                _ => "scheduler's".to_string(),
            };
            writeln!(
                f,
                "  {:<18} {:>8.1} {:>8.1} {:>8.1}   {:>8.1} {:>8.1} {:>8.1}",
                placement,
                r.child_p50_us,
                r.child_p99_us,
                r.child_mean_us,
                r.handler_p50_us,
                r.handler_p99_us,
                r.handler_mean_us
            )?;
        }
        if let Some(c) = self.copy_throughput.first() {
            writeln!(
                f,
                "UFFDIO_COPY into a registered shared mapping ({} per batch size)",
                size(c.region_bytes)
            )?;
        }
        writeln!(
            f,
            "  {:<10} {:>8} {:>11} {:>10}",
            "batch", "calls", "us/call", "MiB/s"
        )?;
        for c in &self.copy_throughput {
            writeln!(
                f,
                "  {:<10} {:>8} {:>11.2} {:>10.0}",
                size(c.batch_bytes),
                c.calls,
                c.per_call_us,
                c.mib_per_s
            )?;
        }
        let s = &self.seq_read;
        writeln!(
            f,
            "sequential read of a {} file in {} ({} buffered preads)",
            size(s.file_bytes),
            s.dir.display(),
            size(s.request_bytes)
        )?;
        writeln!(
            f,
            "  {:<22} {:>10.0} MiB/s   ({:.1}% cached before)",
            "cold", s.cold_mib_per_s, s.cached_before_cold_read_pct
        )?;
        writeln!(
            f,
            "  {:<22} {:>10.1} µs p50, {:.1} µs p99 (one cold 4 KiB pread)",
            "page read", s.cold_page_read_p50_us, s.cold_page_read_p99_us
        )?;
        if let Some(w) = s.warm_mib_per_s {
            writeln!(f, "  {:<22} {:>10.0} MiB/s", "warm (page cache)", w)?;
        }
        write!(
            f,
            "  {:<22} {:>10.0} MiB/s",
            "write + fsync", s.write_fsync_mib_per_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the environment of a re-executed test binary that must act as
    /// the measurement child.
    const TEST_CHILD_ENV: &str = "THAW_LIMITS_TEST_CHILD";

    /// Not a test of its own: the entry point of the measurement child when
    /// the test binary is re-executed with `--exact` (see `child_command`).
    #[test]
    fn limits_child() {
        if std::env::var_os(TEST_CHILD_ENV).is_some() {
            std::process::exit(child_main());
        }
    }

    /// Re-executes this test binary to run only `limits_child`, which then
    /// becomes the child (the harness's own output is skipped by the parent).
    fn child_command() -> ChildCommand {
        ChildCommand {
            program: "/proc/self/exe".into(),
            args: [
                "limits::tests::limits_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ]
            .map(OsString::from)
            .to_vec(),
            env: vec![(TEST_CHILD_ENV.into(), "1".into())],
        }
    }

    #[test]
    fn measures_a_small_run_end_to_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let scratch_dir = dir.path().join("limits");
        let opts = LimitsOptions {
            fault_pages: 500,
            copy_region_bytes: 16 << 20,
            copy_batch_bytes: DEFAULT_COPY_BATCHES.to_vec(),
            read_bytes: 16 << 20,
            dir: scratch_dir.clone(),
            warm_read: true,
            pinned_faults: true,
            child: child_command(),
        };
        let r = measure(&opts).expect("measure");

        assert!(!r.kernel_release.is_empty() && r.cpus >= 1);
        assert_eq!(r.fault_round_trip.placement, Placement::Scheduler);
        let placements: Vec<_> = r
            .fault_round_trip_pinned
            .iter()
            .map(|f| f.placement)
            .collect();
        let expected = if r.cpus >= 2 {
            vec![Placement::SameCpu, Placement::CrossCpu]
        } else {
            vec![Placement::SameCpu]
        };
        assert_eq!(placements, expected);
        for f in std::iter::once(&r.fault_round_trip).chain(&r.fault_round_trip_pinned) {
            assert_eq!((f.faults, f.served_faults), (500, 500));
            for v in [
                f.child_p50_us,
                f.child_p99_us,
                f.child_mean_us,
                f.child_max_us,
                f.handler_p50_us,
                f.handler_p99_us,
                f.handler_mean_us,
            ] {
                assert!(v > 0.0 && v.is_finite(), "{f:?}");
            }
            assert!(f.child_p50_us <= f.child_p99_us && f.child_p99_us <= f.child_max_us);
        }

        let batches: Vec<u64> = r.copy_throughput.iter().map(|c| c.batch_bytes).collect();
        assert_eq!(batches, DEFAULT_COPY_BATCHES.to_vec());
        for c in &r.copy_throughput {
            assert_eq!(c.region_bytes, 16 << 20);
            assert_eq!(c.calls, (16 << 20) / c.batch_bytes, "{c:?}");
            assert!(c.mib_per_s > 0.0 && c.per_call_us > 0.0, "{c:?}");
        }

        let s = &r.seq_read;
        assert_eq!((s.file_bytes, s.request_bytes), (16 << 20, 4 << 20));
        assert!(s.cold_mib_per_s > 0.0 && s.write_fsync_mib_per_s > 0.0);
        assert!(
            s.cold_page_read_p50_us > 0.0 && s.cold_page_read_p99_us >= s.cold_page_read_p50_us
        );
        assert!(s.warm_mib_per_s.is_some_and(|w| w > 0.0));
        assert!((0.0..=100.0).contains(&s.cached_before_cold_read_pct));
        // The scratch file is gone; the directory was created 0700.
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&scratch_dir).expect("dir");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&scratch_dir).expect("ls").count(), 0);

        let text = r.to_string();
        assert!(
            text.contains("fault round trip") && text.contains("MiB/s"),
            "{text}"
        );
        let json = serde_json::to_value(&r).expect("json");
        assert!(json["fault_round_trip"]["child_p50_us"].is_f64());
    }

    #[test]
    fn bad_options_are_refused_before_anything_starts() {
        let opts = LimitsOptions {
            copy_batch_bytes: vec![3000],
            ..LimitsOptions::default()
        };
        assert!(matches!(measure(&opts), Err(LimitsError::InvalidOption(_))));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = Stats::of((1..=100).rev().collect());
        assert_eq!((s.p50, s.p99, s.mean, s.max), (50, 99, 50, 100));
        let one = Stats::of(vec![7]);
        assert_eq!((one.p50, one.p99, one.max), (7, 7, 7));
    }
}
