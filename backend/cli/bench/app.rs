//! Real applications in `thaw bench --app`: a server program from Debian's
//! packages runs in the guest (`tests/guest/build-app.sh`) and the host
//! drives it with the server's own client over the guest's virtio NIC, so
//! responsiveness is measured from the client's side.
//!
//! - **Data.** The bench loads `data` bytes of values with the server's own
//!   tools (`redis-cli --pipe`; memcached: `memccp` of one file per key), in
//!   a shuffled key order so that the hot keys lie all over the server's
//!   heap (as they do in a store filled over time). Values are printable
//!   and derived from the key and a seed, so they can be checked.
//! - **Client.** After each restore the client retries a connection every
//!   [`CONNECT_TIMEOUT`] like a reconnecting client on a real network, then
//!   asks the server for one trivial answer (`redis-cli ping`, `memcping`):
//!   that is the *first answer*. From then on it runs *passes* back to
//!   back, each one rate sample (requests/s over the pass): redis,
//!   `redis-benchmark -t get -n HOT -r HOT` (random hot keys, pipelined);
//!   memcached, `memccat` of every hot key in order (a fixed request set,
//!   one request at a time).
//! - **Network.** The guest's NIC is a tap device in a network namespace
//!   (`ci/app-net.sh`), not QEMU's user-mode network: a SYN sent while the
//!   VM is paused waits in the tap's queue or is retried by the client,
//!   as on a real link, instead of being held by QEMU's slirp stack.
//! - **Integrity.** After each restore the key count and a sample of values
//!   (hot and cold) are read back with the server's own CLI and compared.
//! - **Any other application** ([`CustomApp`], `--app-spec FILE`): the user
//!   names its load, ping, pass and verify commands (its own client), run
//!   with `sh -c` and the guest's address in `THAW_APP_ADDR`.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ttr::Sample;
use super::BenchError;

/// How long one connection attempt waits for the guest's SYN-ACK before
/// the client tries again.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(50);
/// Size of every value the bench loads (one page of data).
pub const VALUE_BYTES: usize = 4096;
/// Values read back per integrity check.
const VERIFY_SAMPLE: u64 = 64;
/// Files per `memccp` call (its arguments must fit the kernel's limit).
const MEMCCP_BATCH: usize = 4096;
/// How long the guest may take to boot and start its server.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// A server program the bench knows how to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// redis, driven by `redis-benchmark` and `redis-cli` (redis-tools).
    Redis,
    /// memcached, driven by `memccp`, `memccat`, `memcping` and `memcstat`
    /// (libmemcached-tools).
    Memcached,
    /// Any server, driven by the commands of a [`CustomApp`].
    Custom,
}

/// `--app-spec FILE`: how to drive a server the bench does not know, with
/// its own client. Every command runs with `sh -c` on the host (in the
/// bench's network namespace), the guest's address in `THAW_APP_ADDR`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomApp {
    /// What the report calls it.
    pub name: String,
    /// The guest's address (default: `thaw.ip=` of the config's `append`).
    #[serde(default)]
    pub addr: Option<Ipv4Addr>,
    /// A TCP port to connect to before each `ping` (a reconnecting client's
    /// connection attempt every [`CONNECT_TIMEOUT`]).
    #[serde(default)]
    pub port: Option<u16>,
    /// Loads the data once the server answers (optional).
    #[serde(default)]
    pub load: Option<String>,
    /// One trivial request: succeeds once the server answers.
    pub ping: String,
    /// One pass of a fixed request set over the hot data.
    pub pass: String,
    /// Requests one pass makes (for the rate).
    pub requests_per_pass: u64,
    /// Checks the data after a restore: exit 0 if intact (optional).
    #[serde(default)]
    pub verify: Option<String>,
}

impl CustomApp {
    /// Reads a spec file.
    pub fn load_file(path: &Path) -> Result<CustomApp, BenchError> {
        let text = std::fs::read_to_string(path)
            .map_err(super::io(format!("reading {}", path.display())))?;
        let spec: CustomApp = serde_yaml::from_str(&text)
            .map_err(|e| BenchError::App(format!("{}: {e}", path.display())))?;
        if spec.requests_per_pass == 0 {
            return Err(BenchError::App(format!(
                "{}: requests_per_pass must be at least 1",
                path.display()
            )));
        }
        Ok(spec)
    }
}

impl AppKind {
    pub fn parse(text: &str) -> Result<AppKind, BenchError> {
        match text {
            "redis" => Ok(AppKind::Redis),
            "memcached" => Ok(AppKind::Memcached),
            _ => Err(BenchError::App(format!(
                "unknown application {text:?}: the bench knows redis and memcached"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AppKind::Redis => "redis",
            AppKind::Memcached => "memcached",
            AppKind::Custom => "custom",
        }
    }

    fn port(self) -> u16 {
        match self {
            AppKind::Redis => 6379,
            AppKind::Memcached => 11211,
            AppKind::Custom => 0,
        }
    }

    /// The host programs this application's client needs, and the Debian
    /// package that has them.
    fn client_programs(self) -> (&'static [&'static str], &'static str) {
        match self {
            AppKind::Redis => (&["redis-cli", "redis-benchmark"], "redis-tools"),
            AppKind::Memcached => (
                &["memccp", "memccat", "memcping", "memcstat"],
                "libmemcached-tools",
            ),
            AppKind::Custom => (&["sh"], "dash"),
        }
    }
}

/// An application under test: what runs, where, and its data.
#[derive(Clone, Debug)]
pub struct App {
    pub kind: AppKind,
    pub addr: Ipv4Addr,
    /// Keys loaded (`data` / [`VALUE_BYTES`]) and the hot ones among them
    /// (`key:0` … `key:hot-1`).
    pub keys: u64,
    pub hot_keys: u64,
    /// Requests per pass.
    pub pass_requests: u64,
    seed: u64,
    /// The commands of an [`AppKind::Custom`] application.
    custom: Option<std::sync::Arc<CustomApp>>,
}

/// What the report says about the application.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppReport {
    pub app: AppKind,
    /// The application's name (a custom one's own).
    #[serde(default)]
    pub name: String,
    pub client: String,
    pub keys: u64,
    pub hot_keys: u64,
    pub value_bytes: usize,
    pub pass_requests: u64,
    /// Median pass before the save.
    pub warm_pass_ms: f64,
    /// How long loading the data took (the server's bulk loader).
    pub load_ms: f64,
}

impl App {
    /// The application `kind` in the VM of `append` (its kernel command
    /// line names the guest's address as `thaw.ip=ADDR/PREFIX`), with
    /// `data` bytes of values of which `hot` are read by each pass.
    pub fn new(kind: AppKind, append: &str, data: u64, hot: u64) -> Result<App, BenchError> {
        let addr = guest_addr(append)?;
        let keys = data / VALUE_BYTES as u64;
        let hot_keys = hot / VALUE_BYTES as u64;
        if keys == 0 || hot_keys == 0 || hot_keys > keys {
            return Err(BenchError::App(format!(
                "--app-data {data} and --app-hot {hot}: both must hold at least one {VALUE_BYTES}-byte value, and the hot set must fit in the data"
            )));
        }
        let (programs, package) = kind.client_programs();
        for program in programs {
            if which(program).is_none() {
                return Err(BenchError::App(format!(
                    "{program} is not installed: the {} client runs on the host (Debian: {package}; ci/setup-host.sh installs it)",
                    kind.name()
                )));
            }
        }
        Ok(App {
            kind,
            addr,
            keys,
            hot_keys,
            pass_requests: hot_keys,
            seed: 0x7468_6177_2d61_7070,
            custom: None,
        })
    }

    /// An application driven by the commands of `spec`, in the VM of
    /// `append`.
    pub fn custom(spec: CustomApp, append: &str) -> Result<App, BenchError> {
        let addr = match spec.addr {
            Some(a) => a,
            None => guest_addr(append)?,
        };
        Ok(App {
            kind: AppKind::Custom,
            addr,
            keys: 0,
            hot_keys: 0,
            pass_requests: spec.requests_per_pass,
            seed: 0,
            custom: Some(std::sync::Arc::new(spec)),
        })
    }

    /// Runs a custom application's command with `sh -c`; its output, or
    /// why it failed.
    fn shell(&self, command: &str) -> Result<std::process::Output, String> {
        let out = Command::new("sh")
            .args(["-c", command])
            .env("THAW_APP_ADDR", self.addr.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {command:?}: {e}"))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(format!(
                "{command:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn socket(&self) -> SocketAddr {
        SocketAddr::from((self.addr, self.kind.port()))
    }

    fn cli(&self) -> Command {
        let mut c = Command::new("redis-cli");
        c.args([
            "-h",
            &self.addr.to_string(),
            "-p",
            &self.kind.port().to_string(),
        ]);
        c
    }

    /// A libmemcached tool aimed at the server.
    fn memc(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.arg(format!("--servers={}:{}", self.addr, self.kind.port()));
        c
    }

    /// Waits until the guest's server listens (`THAW-APP-READY` on the
    /// console log `serial`, after byte `offset`).
    pub async fn wait_ready(&self, serial: &Path, offset: u64) -> Result<(), BenchError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        if self.custom.is_some() {
            // Ready when its ping succeeds.
            while !self.ping() {
                if Instant::now() > deadline {
                    return Err(BenchError::App(format!(
                        "the application did not answer its ping within {READY_TIMEOUT:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return Ok(());
        }
        loop {
            let bytes = std::fs::read(serial).unwrap_or_default();
            let from = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            let text = String::from_utf8_lossy(&bytes[from..]);
            if text.contains("THAW-APP-READY") {
                return Ok(());
            }
            if let Some(line) = text.lines().find(|l| l.contains("THAW-APP-EXIT")) {
                return Err(BenchError::App(format!(
                    "the guest's server stopped: {line}"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::App(format!(
                    "the guest printed no THAW-APP-READY within {READY_TIMEOUT:?} (console: {})",
                    serial.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Loads every key with the server's own tools, in a shuffled order.
    /// Returns how long it took.
    pub fn load(&self) -> Result<Duration, BenchError> {
        let t = Instant::now();
        match (self.kind, &self.custom) {
            (AppKind::Custom, Some(c)) => {
                if let Some(load) = &c.load {
                    self.shell(load).map_err(BenchError::App)?;
                }
                return Ok(t.elapsed());
            }
            (AppKind::Memcached, _) => self.load_memcached()?,
            _ => self.load_redis()?,
        }
        log::info!(
            "loaded {} keys ({} MiB) in {:.1} s",
            self.keys,
            (self.keys * VALUE_BYTES as u64) >> 20,
            t.elapsed().as_secs_f64()
        );
        Ok(t.elapsed())
    }

    /// `memccp` of one file per key (named as the key), in batches.
    fn load_memcached(&self) -> Result<(), BenchError> {
        let base = if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let dir = tempfile::Builder::new()
            .prefix("thaw-memcached-")
            .tempdir_in(base)
            .map_err(super::io("creating the directory of memccp's files"))?;
        for batch in shuffled(self.keys, self.seed).chunks(MEMCCP_BATCH) {
            let mut files = Vec::with_capacity(batch.len());
            for &i in batch {
                let path = dir.path().join(key_name(i));
                std::fs::write(&path, self.value(i))
                    .map_err(super::io(format!("writing {}", path.display())))?;
                files.push(path);
            }
            let out = self
                .memc("memccp")
                .args(&files)
                .stdin(Stdio::null())
                .output()
                .map_err(super::io("running memccp"))?;
            if !out.status.success() {
                return Err(BenchError::App(format!(
                    "loading keys with memccp failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(())
    }

    /// `redis-cli --pipe` fed with one SET per key.
    fn load_redis(&self) -> Result<(), BenchError> {
        let mut child = self
            .cli()
            .arg("--pipe")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(super::io("running redis-cli --pipe"))?;
        let mut stdin = std::io::BufWriter::with_capacity(
            1 << 20,
            child
                .stdin
                .take()
                .ok_or_else(|| BenchError::App("redis-cli --pipe has no stdin".into()))?,
        );
        let mut written = Ok(());
        for i in shuffled(self.keys, self.seed) {
            let key = key_name(i);
            let value = self.value(i);
            let command = format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                key.len(),
                value.len()
            );
            written = stdin
                .write_all(command.as_bytes())
                .and_then(|()| stdin.write_all(&value))
                .and_then(|()| stdin.write_all(b"\r\n"));
            if written.is_err() {
                break;
            }
        }
        let flushed = written.and_then(|()| stdin.flush());
        drop(stdin);
        let out = child
            .wait_with_output()
            .map_err(super::io("waiting for redis-cli --pipe"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let wanted = format!("errors: 0, replies: {}", self.keys);
        if !out.status.success() || flushed.is_err() || !text.contains(&wanted) {
            return Err(BenchError::App(format!(
                "loading {} keys with redis-cli --pipe failed ({}): {}{}",
                self.keys,
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The value of key `i`: printable, different for every key and seed.
    fn value(&self, i: u64) -> Vec<u8> {
        let mut state = self.seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::with_capacity(VALUE_BYTES);
        while out.len() < VALUE_BYTES {
            let word = splitmix64(&mut state);
            out.extend_from_slice(format!("{word:016x}").as_bytes());
        }
        out.truncate(VALUE_BYTES);
        out
    }

    /// The keys an integrity check reads back: hot ones and ones spread
    /// over the whole set.
    fn verify_sample(&self) -> Vec<u64> {
        (0..VERIFY_SAMPLE)
            .map(|j| {
                if j % 2 == 0 {
                    j / 2 * self.hot_keys / (VERIFY_SAMPLE / 2)
                } else {
                    j / 2 * self.keys / (VERIFY_SAMPLE / 2)
                }
            })
            .collect()
    }

    /// Reads back the key count and a sample of values with the server's
    /// own tools; an error says what differs.
    pub fn verify(&self) -> Result<(), BenchError> {
        match (self.kind, &self.custom) {
            (AppKind::Custom, Some(c)) => match &c.verify {
                Some(v) => self.shell(v).map(drop).map_err(BenchError::App),
                None => Ok(()),
            },
            (AppKind::Memcached, _) => self.verify_memcached(),
            _ => self.verify_redis(),
        }
    }

    /// `memcstat`'s `curr_items`, then `memccat` of each sampled key.
    fn verify_memcached(&self) -> Result<(), BenchError> {
        let out = self
            .memc("memcstat")
            .output()
            .map_err(super::io("running memcstat"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let items = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("curr_items:"))
            .map(str::trim)
            .unwrap_or_default()
            .to_string();
        if items != self.keys.to_string() {
            return Err(BenchError::App(format!(
                "memcached: curr_items is {items:?}, {} keys were loaded",
                self.keys
            )));
        }
        for i in self.verify_sample() {
            let out = self
                .memc("memccat")
                .arg(key_name(i))
                .output()
                .map_err(super::io("running memccat"))?;
            let got = out.stdout.strip_suffix(b"\n").unwrap_or(&out.stdout);
            if !out.status.success() || got != self.value(i).as_slice() {
                return Err(BenchError::App(format!(
                    "memcached: the value of {} differs from the one loaded",
                    key_name(i)
                )));
            }
        }
        Ok(())
    }

    /// `DBSIZE`, then a `GET` of each sampled key, through `redis-cli`.
    fn verify_redis(&self) -> Result<(), BenchError> {
        let sample = self.verify_sample();
        let mut script = String::from("DBSIZE\n");
        for &i in &sample {
            script.push_str(&format!("GET {}\n", key_name(i)));
        }
        let mut child = self
            .cli()
            .arg("--raw")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(super::io("running redis-cli"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(super::io("writing to redis-cli"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(super::io("waiting for redis-cli"))?;
        let mut lines = out.stdout.lines();
        let count = lines.next().and_then(Result::ok).unwrap_or_default();
        if count.trim() != self.keys.to_string() {
            return Err(BenchError::App(format!(
                "{}: DBSIZE is {:?}, {} keys were loaded",
                self.kind.name(),
                count.trim(),
                self.keys
            )));
        }
        for &i in &sample {
            let got = lines.next().and_then(Result::ok).unwrap_or_default();
            if got.as_bytes() != self.value(i).as_slice() {
                return Err(BenchError::App(format!(
                    "{}: the value of {} differs from the one loaded",
                    self.kind.name(),
                    key_name(i)
                )));
            }
        }
        Ok(())
    }

    /// One connection attempt and one trivial request: true once the
    /// server answered.
    fn ping(&self) -> bool {
        if let Some(c) = &self.custom {
            let reachable = c.port.is_none_or(|port| {
                TcpStream::connect_timeout(&SocketAddr::from((self.addr, port)), CONNECT_TIMEOUT)
                    .is_ok()
            });
            return reachable && self.shell(&c.ping).is_ok();
        }
        if TcpStream::connect_timeout(&self.socket(), CONNECT_TIMEOUT).is_err() {
            return false;
        }
        match self.kind {
            AppKind::Redis => self
                .cli()
                .arg("ping")
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"PONG")),
            _ => self
                .memc("memcping")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        }
    }

    /// One pass of `pass_requests` requests over the hot keys. Errors
    /// when the client did not finish.
    fn pass(&self) -> Result<(), String> {
        match (self.kind, &self.custom) {
            (AppKind::Custom, Some(c)) => self.shell(&c.pass).map(drop),
            (AppKind::Memcached, _) => self.pass_memcached(),
            _ => self.pass_redis(),
        }
    }

    /// `memccat` of every hot key, in key order, one request at a time.
    fn pass_memcached(&self) -> Result<(), String> {
        let status = self
            .memc("memccat")
            .args((0..self.hot_keys).map(key_name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    }

    /// GETs of random hot keys, 4 connections of 8 pipelined requests each.
    fn pass_redis(&self) -> Result<(), String> {
        let out = Command::new("redis-benchmark")
            .args([
                "-h",
                &self.addr.to_string(),
                "-p",
                &self.kind.port().to_string(),
                "-t",
                "get",
                "-n",
                &self.pass_requests.to_string(),
                "-r",
                &self.hot_keys.to_string(),
                "-c",
                "4",
                "-P",
                "8",
                "-q",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("requests per second") {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The report's description of the application.
    pub fn report(&self, warm_pass_ms: f64, load: Duration) -> AppReport {
        AppReport {
            app: self.kind,
            name: self
                .custom
                .as_ref()
                .map_or_else(|| self.kind.name().to_string(), |c| c.name.clone()),
            client: match (self.kind, &self.custom) {
                (AppKind::Custom, Some(c)) => c.pass.clone(),
                (AppKind::Redis, _) => format!(
                    "redis-benchmark -t get -n {} -r {} -c 4 -P 8",
                    self.pass_requests, self.hot_keys
                ),
                _ => {
                    format!("memccat key:000000000000 … {}", key_name(self.hot_keys - 1))
                }
            },
            keys: self.keys,
            hot_keys: self.hot_keys,
            value_bytes: VALUE_BYTES,
            pass_requests: self.pass_requests,
            warm_pass_ms,
            load_ms: load.as_secs_f64() * 1000.0,
        }
    }
}

/// Whether a client's rate has settled: the median of its last
/// [`STEADY_WINDOW`] passes is within [`STEADY_TOLERANCE`] of the median of
/// the ones before them.
pub fn steady(rates: &[f64]) -> bool {
    let n = rates.len();
    if n < 2 * STEADY_WINDOW {
        return false;
    }
    let median = |v: &[f64]| super::ttr::median(v.iter().copied()).unwrap_or(0.0);
    let last = median(&rates[n - STEADY_WINDOW..]);
    let before = median(&rates[n - 2 * STEADY_WINDOW..n - STEADY_WINDOW]);
    before > 0.0 && (last - before).abs() <= STEADY_TOLERANCE * before
}

/// Passes compared by [`steady`], and how close their medians must be.
const STEADY_WINDOW: usize = 5;
const STEADY_TOLERANCE: f64 = 0.05;

/// The guest's address: `thaw.ip=ADDR/PREFIX` of its kernel command line.
fn guest_addr(append: &str) -> Result<Ipv4Addr, BenchError> {
    let addr = append
        .split_whitespace()
        .find_map(|w| w.strip_prefix("thaw.ip="))
        .and_then(|a| a.split('/').next())
        .ok_or_else(|| {
            BenchError::App(
                "the config's append has no thaw.ip=ADDR/PREFIX: an application guest needs \
                 the address of its NIC (see configs/apps/)"
                    .into(),
            )
        })?;
    addr.parse()
        .map_err(|_| BenchError::App(format!("thaw.ip={addr} is not an IPv4 address")))
}

/// The key of index `i`, as `redis-benchmark -r` names its random keys.
fn key_name(i: u64) -> String {
    format!("key:{i:012}")
}

/// 0..n in an order shuffled by `seed` (Fisher–Yates).
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut state = seed;
    for i in (1..v.len()).rev() {
        // At most i: it fits.
        let j = usize::try_from(splitmix64(&mut state) % (i as u64 + 1)).unwrap_or(i);
        v.swap(i, j);
    }
    v
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The path of `program` on `PATH`, if it is there.
fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// What the client saw after one restore.
#[derive(Clone, Debug, Default)]
pub struct ClientRecord {
    /// When the server first answered (ms from `t0`).
    pub first_answer_ms: Option<f64>,
    /// One sample per completed pass (requests/s over the pass).
    pub passes: Vec<Sample>,
    /// Passes that failed (e.g. the last one, cut off when the VM stopped).
    pub failed_passes: u32,
}

/// The host-side client, running in its own thread until finished.
pub struct Client {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<ClientRecord>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    /// Starts the client: first answer, then passes back to back. Times
    /// are relative to `t0`.
    pub fn start(app: &App, t0: Instant) -> Result<Client, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(ClientRecord::default()));
        let (halt, out, app) = (stop.clone(), record.clone(), app.clone());
        let thread = std::thread::Builder::new()
            .name("thaw-app-client".into())
            .spawn(move || {
                let ms = |at: Instant| at.duration_since(t0).as_secs_f64() * 1000.0;
                while !halt.load(Ordering::Acquire) {
                    if app.ping() {
                        if let Ok(mut r) = out.lock() {
                            r.first_answer_ms = Some(ms(Instant::now()));
                        }
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                while !halt.load(Ordering::Acquire) {
                    let began = Instant::now();
                    let result = app.pass();
                    let end = Instant::now();
                    let Ok(mut r) = out.lock() else { return };
                    match result {
                        Ok(()) => {
                            let secs = end.duration_since(began).as_secs_f64();
                            r.passes.push(Sample {
                                at_ms: ms(end),
                                interval_ms: secs * 1000.0,
                                rate: app.pass_requests as f64 / secs.max(1e-9),
                            });
                        }
                        Err(e) => {
                            log::debug!("{} pass failed: {e}", app.kind.name());
                            r.failed_passes += 1;
                            drop(r);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(super::io("starting the application client"))?;
        Ok(Client {
            stop,
            record,
            thread: Some(thread),
        })
    }

    /// Passes completed so far.
    pub fn passes(&self) -> usize {
        self.record.lock().map(|r| r.passes.len()).unwrap_or(0)
    }

    /// Passes that started at or after `ms` (from `t0`).
    pub fn passes_from(&self, ms: f64) -> usize {
        self.record
            .lock()
            .map(|r| {
                r.passes
                    .iter()
                    .filter(|p| p.at_ms - p.interval_ms >= ms)
                    .count()
            })
            .unwrap_or(0)
    }

    /// The rates of the passes so far, in order.
    pub fn rates(&self) -> Vec<f64> {
        self.record
            .lock()
            .map(|r| r.passes.iter().map(|p| p.rate).collect())
            .unwrap_or_default()
    }

    /// Stops the client after its current pass; returns what it saw.
    pub fn finish(mut self) -> ClientRecord {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_steady_once_two_windows_agree() {
        assert!(!steady(&[100.0; 9]));
        assert!(steady(&[100.0; 10]));
        // Still speeding up: 50 % faster over the last five passes.
        let rising: Vec<f64> = (0..10).map(|i| 100.0 + 10.0 * f64::from(i)).collect();
        assert!(!steady(&rising));
        let mut settled = rising.clone();
        settled.extend([
            200.0, 203.0, 198.0, 201.0, 199.0, 202.0, 200.0, 197.0, 204.0, 200.0,
        ]);
        assert!(steady(&settled));
    }

    #[test]
    fn a_custom_spec_parses_and_bad_ones_are_refused() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/apps/custom-redis.yaml");
        let spec = CustomApp::load_file(&example).expect("the example spec parses");
        assert_eq!((spec.port, spec.requests_per_pass), (Some(6379), 4096));
        let app = App::custom(spec, "console=ttyS0 thaw.ip=10.77.0.2/24").expect("app");
        assert_eq!(app.addr, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(app.report(1.0, Duration::ZERO).name, "redis, own spec");
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, why) in [
            (
                "name: x\nping: true\npass: true\nrequests_per_pass: 0\n",
                "requests_per_pass",
            ),
            (
                "name: x\nping: true\npass: true\nrequests_per_pass: 1\ntypo: 1\n",
                "typo",
            ),
            ("name: x\nping: true\nrequests_per_pass: 1\n", "pass"),
        ] {
            let path = dir.path().join("spec.yaml");
            std::fs::write(&path, text).expect("write");
            let err = CustomApp::load_file(&path).expect_err(text).to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn shuffle_is_a_permutation_and_depends_on_the_seed() {
        let a = shuffled(1000, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, shuffled(1000, 2));
    }

    #[test]
    fn values_are_printable_distinct_and_page_sized() {
        let app = App {
            kind: AppKind::Redis,
            addr: Ipv4Addr::LOCALHOST,
            keys: 10,
            hot_keys: 2,
            pass_requests: 2,
            seed: 5,
            custom: None,
        };
        let (a, b) = (app.value(0), app.value(1));
        assert_eq!(a.len(), VALUE_BYTES);
        assert!(a.iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(a, app.value(0));
        assert_eq!(key_name(42), "key:000000000042");
    }

    #[test]
    fn the_address_comes_from_the_kernel_command_line() {
        let app = App::new(
            AppKind::Redis,
            "console=ttyS0 thaw.ip=10.77.0.2/24",
            1 << 20,
            1 << 16,
        );
        match app {
            Ok(app) => {
                assert_eq!(app.addr, Ipv4Addr::new(10, 77, 0, 2));
                assert_eq!((app.keys, app.hot_keys), (256, 16));
            }
            // A host without redis-tools refuses with that reason.
            Err(e) => assert!(e.to_string().contains("redis-tools"), "{e}"),
        }
        let missing = App::new(AppKind::Redis, "console=ttyS0", 1 << 20, 1 << 16);
        assert!(missing.is_err_and(|e| e.to_string().contains("thaw.ip")));
        let too_hot = App::new(AppKind::Redis, "thaw.ip=10.0.0.2/24", 1 << 16, 1 << 20);
        assert!(too_hot.is_err_and(|e| e.to_string().contains("--app-hot")));
    }
}
