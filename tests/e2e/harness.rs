//! Test harness: boots a guest-kit VM through the `thaw` binary in its own
//! runtime directory and reads the guest's console.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous: TCG on a shared 2-core machine is slow.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const TICK_TIMEOUT: Duration = Duration::from_secs(300);

/// What the test guest looks like.
pub struct GuestSpec {
    pub memory: &'static str,
    pub fill: &'static str,
    pub hot: &'static str,
    pub numa_nodes: u32,
    pub extra_args: Vec<String>,
    /// Verify all memory every this many ticks (0: only the hot set).
    pub full_every: u32,
    /// The guest prints its hot set's page frames (`THAW-HOT`).
    pub report_hot: bool,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            memory: "512M",
            fill: "96M",
            hot: "8M",
            numa_nodes: 1,
            extra_args: Vec::new(),
            full_every: 5,
            report_hot: false,
        }
    }
}

/// One parsed `THAW-TICK` console line.
#[derive(Clone, Debug)]
pub struct Tick {
    pub n: u64,
    pub nonce: String,
    pub ok: bool,
    pub full: bool,
}

pub enum Restore {
    Eager,
    Lazy,
}

/// The `--json` output of `thaw restore`.
pub struct RestoreJson {
    pub json: Value,
}

impl RestoreJson {
    pub fn u64(&self, key: &str) -> u64 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("restore JSON lacks integer {key}: {}", self.json))
    }

    /// Every field the restore statistics promise.
    pub fn assert_fields(&self) {
        for key in [
            "ram_bytes",
            "nonzero_pages",
            "prefetched_pages",
            "faults",
            "background_pages",
            "discarded_pages",
            "discarded_faults",
            "window_faults",
            "window_pages",
        ] {
            self.u64(key);
        }
        for key in [
            "resume_ms",
            "device_state_ms",
            "complete_ms",
            "fault_p50_us",
            "fault_p99_us",
        ] {
            assert!(
                self.json[key].is_number(),
                "restore JSON lacks {key}: {}",
                self.json
            );
        }
        assert!(self.json["mode"].is_string());
        assert!(self.json["complete_ms"].as_f64() >= self.json["resume_ms"].as_f64());
    }
}

/// A VM under test; stopped (and its files removed) on drop.
pub struct Vm {
    pub name: String,
    pub dir: PathBuf,
    runtime: PathBuf,
    serial: PathBuf,
}

pub fn repo_root() -> PathBuf {
    // The tests belong to backend/cli.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("backend/cli has a grandparent")
        .to_path_buf()
}

pub fn guest_dir() -> PathBuf {
    std::env::var_os("THAW_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"))
}

/// Writes `dir/vm.yaml`: a small throughput-mode guest of the kit for
/// `thaw bench` (512 MiB, 96 MiB filled, 16 MiB hot); returns its path.
pub fn small_bench_config(name: &str, dir: &Path) -> PathBuf {
    let kit = guest_dir();
    let config = format!(
        "name: {name}\nmemory: 512M\ncpus: 1\naccel: tcg\nkernel: {}\ninitrd: {}\n\
         append: \"console=ttyS0 quiet panic=-1 thaw.mem=96M thaw.hot=16M thaw.tput_ms=50\"\n\
         serial: console.log\nextra_args: [\"-no-reboot\"]\n",
        kit.join("vmlinuz").display(),
        kit.join("initrd.img").display()
    );
    let path = dir.join("vm.yaml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// `thaw bench` arguments for a quick run of `methods` (one run each,
/// short warm-up, measure and settle windows, artefacts and report under
/// `dir`, JSON out); callers add their own options.
pub fn quick_bench_args(config: &Path, dir: &Path, methods: &str, settle_ms: u64) -> Vec<String> {
    let path = |p: PathBuf| p.to_str().expect("utf-8").to_string();
    [
        "bench",
        "--config",
        config.to_str().expect("utf-8"),
        "--methods",
        methods,
        "--runs",
        "1",
        "--warmup-ms",
        "1000",
        "--measure-ms",
        "1000",
        "--settle-ms",
        &settle_ms.to_string(),
        "--dir",
        &path(dir.join("art")),
        "--out",
        &path(dir.join("out")),
        "--json",
    ]
    .map(String::from)
    .to_vec()
}

impl Vm {
    /// Writes a config for the guest kit and starts it with `thaw start`.
    pub fn boot(test: &str, spec: &GuestSpec) -> Vm {
        let kit = guest_dir();
        let (kernel, initrd) = (kit.join("vmlinuz"), kit.join("initrd.img"));
        assert!(
            kernel.is_file() && initrd.is_file(),
            "guest kit missing in {}: run tests/guest/build.sh first",
            kit.display()
        );
        let (name, dir) = Vm::workspace(test);
        let serial = dir.join("console.log");
        let extra: Vec<String> = std::iter::once("-no-reboot".to_string())
            .chain(spec.extra_args.iter().cloned())
            .collect();
        let config = format!(
            "name: {name}\nmemory: {}\ncpus: 1\nmachine: q35\naccel: tcg\nkernel: {}\ninitrd: {}\n\
             append: \"console=ttyS0 quiet panic=-1 thaw.mem={} thaw.hot={} thaw.tick_ms=100 thaw.full_every={} thaw.report_hot={}\"\n\
             serial: {}\nnuma_nodes: {}\nextra_args: {}\n",
            spec.memory,
            kernel.display(),
            initrd.display(),
            spec.fill,
            spec.hot,
            spec.full_every,
            u8::from(spec.report_hot),
            serial.display(),
            spec.numa_nodes,
            serde_json::to_string(&extra).expect("json"),
        );
        Vm::start(name, dir, &config, "THAW-READY")
    }

    /// A fresh name and empty directory for test `test`'s VM.
    pub fn workspace(test: &str) -> (String, PathBuf) {
        let name = format!("e2e-{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        (name, dir)
    }

    /// A handle for VM `name` whose files live in `dir`, started by someone
    /// else (e.g. `thaw bench`): it is stopped on drop like any other.
    pub fn attach(name: String, dir: PathBuf) -> Vm {
        Vm {
            name,
            runtime: dir.join("run"),
            serial: dir.join("console.log"),
            dir,
        }
    }

    /// A handle for the copy of this VM that `thaw restore --name NAME`
    /// starts: same directories, its console in `<dir>/<NAME>-console.log`.
    pub fn renamed(&self, name: &str) -> Vm {
        Vm {
            name: name.to_string(),
            runtime: self.runtime.clone(),
            serial: self.dir.join(format!("{name}-console.log")),
            dir: self.dir.clone(),
        }
    }

    /// Starts a VM from config text (its serial console must be
    /// `<dir>/console.log`) and waits for `ready` on the console.
    pub fn start(name: String, dir: PathBuf, config: &str, ready: &str) -> Vm {
        let cfg_path = dir.join("vm.yaml");
        std::fs::write(&cfg_path, config).expect("write config");
        let vm = Vm {
            name,
            runtime: dir.join("run"),
            serial: dir.join("console.log"),
            dir,
        };
        vm.thaw(&["start", "--config", cfg_path.to_str().expect("utf-8 path")]);
        vm.wait_for(BOOT_TIMEOUT, "the guest to be ready", |text| {
            text.contains(ready)
        });
        vm
    }

    /// Runs `thaw` with this VM's runtime dir; panics with its output on failure.
    pub fn thaw(&self, args: &[&str]) -> Output {
        let out = self.thaw_raw(args);
        assert!(
            out.status.success(),
            "thaw {args:?} failed ({}):\nstdout: {}\nstderr: {}\nconsole tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.console_tail(15)
        );
        out
    }

    /// Starts `thaw ARGS` in the background (output captured).
    pub fn thaw_spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(args)
            .env("THAW_RUNTIME_DIR", &self.runtime)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn thaw")
    }

    /// Starts `thaw restore IMAGE --mode lazy --no-learn --read-limit RATE
    /// ARGS...` in the background: a restore still filling RAM for a while
    /// after the guest runs.
    pub fn slow_restore(&self, image: &Path, rate: &str, args: &[&str]) -> std::process::Child {
        let mut all = vec![
            "restore",
            image.to_str().expect("utf-8"),
            "--mode",
            "lazy",
            "--no-learn",
            "--read-limit",
            rate,
        ];
        all.extend_from_slice(args);
        self.thaw_spawn(&all)
    }

    /// Sends SIGINT to a background `thaw` and waits for it; it must exit 0.
    pub fn interrupt(&self, child: std::process::Child) -> Output {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        let out = child.wait_with_output().expect("wait for thaw");
        assert!(
            out.status.success(),
            "thaw failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn thaw_raw(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(args)
            .env("THAW_RUNTIME_DIR", &self.runtime)
            .env("RUST_LOG", "info")
            .output()
            .expect("run thaw")
    }

    pub fn console(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Polls the console until `pred` holds (the guest writes it; there is
    /// no other event to wait on).
    pub fn wait_for(&self, within: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.console();
            if pred(&text) {
                return text;
            }
            assert!(
                start.elapsed() < within,
                "timed out after {within:?} waiting for {what}; console tail:\n{}",
                self.console_tail(15)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn ticks(&self) -> Vec<Tick> {
        parse_ticks(&self.console())
    }

    pub fn last_tick(&self) -> Tick {
        self.ticks().pop().expect("the guest printed no tick")
    }

    /// Waits until the guest has printed at least `n` ticks; returns the last.
    pub fn wait_ticks(&self, n: u64) -> Tick {
        self.wait_for(TICK_TIMEOUT, &format!("tick {n}"), |t| {
            parse_ticks(t).last().is_some_and(|k| k.n >= n)
        });
        self.last_tick()
    }

    pub fn save(&self) -> PathBuf {
        self.save_as("image")
    }

    /// `thaw save`; checks the VM is gone afterwards.
    pub fn save_as(&self, file: &str) -> PathBuf {
        let image = self.dir.join(file);
        self.thaw(&["save", &self.name, image.to_str().expect("utf-8")]);
        assert!(
            image.join("meta.json").is_file(),
            "image {} incomplete",
            image.display()
        );
        let list: Value =
            serde_json::from_slice(&self.thaw(&["list", "--json"]).stdout).expect("list JSON");
        assert!(
            !list
                .as_array()
                .expect("list is an array")
                .iter()
                .any(|v| v["name"] == self.name.as_str()),
            "VM still listed after save: {list}"
        );
        image
    }

    pub fn inspect(&self, image: &Path) -> Value {
        serde_json::from_slice(
            &self
                .thaw(&["inspect", "--json", image.to_str().expect("utf-8")])
                .stdout,
        )
        .expect("inspect JSON")
    }

    /// Waits until `needle` occurs `n` or more times in the console's
    /// complete lines; returns the console up to its last complete line
    /// (the line the guest is writing may hold only its start yet).
    pub fn wait_count(&self, needle: &str, n: usize) -> String {
        let text = self.wait_for(TICK_TIMEOUT, &format!("{n} x {needle:?}"), |t| {
            complete_lines(t).matches(needle).count() >= n
        });
        complete_lines(&text).to_string()
    }

    pub fn restore(&self, image: &Path, mode: Restore) -> RestoreJson {
        let mode = match mode {
            Restore::Eager => "eager",
            Restore::Lazy => "lazy",
        };
        self.restore_with(image, &["--mode", mode])
    }

    /// `thaw restore IMAGE --json ARGS...`.
    pub fn restore_with(&self, image: &Path, args: &[&str]) -> RestoreJson {
        let mut all = vec!["restore", image.to_str().expect("utf-8"), "--json"];
        all.extend_from_slice(args);
        let out = self.thaw(&all);
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "restore printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        RestoreJson { json }
    }

    /// The guest resumed where it was: same nonce, tick counter beyond the
    /// value at save time, a full checksum pass after the restore, no
    /// mismatch ever, and no reboot.
    pub fn assert_continues_after(&self, before: &Tick) {
        let target = before.n + 10;
        self.wait_for(TICK_TIMEOUT, &format!("tick {target} after restore"), |t| {
            parse_ticks(t)
                .iter()
                .any(|k| k.n >= target && k.full && k.n > before.n + 1)
        });
        let text = self.console();
        let ticks = parse_ticks(&text);
        assert!(
            !text.contains("THAW-CORRUPT"),
            "guest reported corruption:\n{}",
            self.console_tail(20)
        );
        assert!(
            ticks.iter().all(|k| k.ok),
            "a tick reported ok=0:\n{}",
            self.console_tail(20)
        );
        assert!(
            ticks.iter().all(|k| k.nonce == before.nonce),
            "nonce changed: the guest rebooted or lost RAM"
        );
        assert_eq!(
            text.matches("THAW-READY").count(),
            1,
            "the workload started twice"
        );
        // The counter moves on from where it was, without restarting.
        assert!(
            ticks
                .windows(2)
                .all(|w| w[1].n == w[0].n + 1 || w[1].n == w[0].n),
            "tick sequence broken"
        );
        assert!(ticks.iter().filter(|k| k.n > before.n && k.full).count() >= 1);
    }

    pub fn stop(&self) {
        self.thaw(&["stop", &self.name]);
    }

    /// Where thaw creates this VM's RAM files (`$THAW_SHM_DIR` or
    /// `/dev/shm/thaw`, then the name).
    pub fn shm_dir(&self) -> PathBuf {
        std::env::var_os("THAW_SHM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/dev/shm/thaw".into())
            .join(&self.name)
    }

    /// A file in this VM's runtime directory.
    pub fn runtime_file(&self, file: &str) -> PathBuf {
        self.runtime.join(&self.name).join(file)
    }

    /// `thaw checkpoint`; returns its JSON report.
    pub fn checkpoint(&self, file: &str) -> (PathBuf, Value) {
        let image = self.dir.join(file);
        let out = self.thaw(&[
            "checkpoint",
            &self.name,
            image.to_str().expect("utf-8"),
            "--json",
        ]);
        let json = serde_json::from_slice(&out.stdout).expect("checkpoint JSON");
        (image, json)
    }

    /// Waits for `n` more tick lines than the console holds now; asserts the
    /// guest stayed intact (same nonce, every tick ok, no corruption, no
    /// second start). Tick numbers may repeat after a restore of an older
    /// checkpoint, so only their count is used.
    pub fn assert_keeps_ticking(&self, nonce: &str, n: usize) {
        let seen = self.console().matches("THAW-TICK ").count();
        self.wait_count("THAW-TICK ", seen + n);
        let text = self.console();
        assert!(
            !text.contains("THAW-CORRUPT"),
            "corruption:\n{}",
            self.console_tail(20)
        );
        let ticks = parse_ticks(&text);
        assert!(
            ticks.iter().all(|k| k.ok && k.nonce == nonce),
            "{}",
            self.console_tail(20)
        );
        assert_eq!(
            text.matches("THAW-READY").count(),
            1,
            "the workload started twice"
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Best effort: a failed test must not leave QEMU running.
        let _ = self.thaw_raw(&["stop", "--force", &self.name]);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The guest-physical pages of the hot set, from the `THAW-HOT` lines.
pub fn hot_pages(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("THAW-HOT "))
        .flat_map(|runs| runs.split_whitespace())
        .filter_map(|run| {
            let (first, n) = run.split_once('+')?;
            Some((first.parse::<u64>().ok()?, n.parse::<u64>().ok()?))
        })
        .flat_map(|(first, n)| first..first + n)
        .collect()
}

/// The pages of an image's working set, read from `ws-<estimator>.bin`
/// (format: backend/src/wss/mod.rs; 64-byte header with the entry count at
/// byte 24, then 16-byte entries starting with the page number).
pub fn ws_pages(image: &Path, estimator: &str) -> Vec<u64> {
    let path = image.join(format!("ws-{estimator}.bin"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&data[..8], b"THAWWS01");
    let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let entries = le(&data[24..32]) as usize;
    (0..entries)
        .map(|i| le(&data[64 + i * 16..64 + i * 16 + 8]))
        .collect()
}

/// The pages of a tracker's estimate file (`THAWEST1`, count u64, pages).
pub fn estimate_pages(path: &Path) -> Vec<u64> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&data[..8], b"THAWEST1");
    let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let n = le(&data[8..16]) as usize;
    (0..n).map(|i| le(&data[16 + i * 8..24 + i * 8])).collect()
}

pub fn parse_ticks(text: &str) -> Vec<Tick> {
    // Only whole lines: the guest's serial output reaches the log a few
    // bytes at a time, and a tick line read half-written would show a
    // truncated nonce or `ok=`.
    complete_lines(text)
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("THAW-TICK ")?;
            let mut parts = rest.split_whitespace();
            let n = parts.next()?.parse().ok()?;
            let mut tick = Tick {
                n,
                nonce: String::new(),
                ok: false,
                full: false,
            };
            for kv in parts {
                match kv.split_once('=') {
                    Some(("nonce", v)) => tick.nonce = v.to_string(),
                    Some(("ok", v)) => tick.ok = v == "1",
                    Some(("full", v)) => tick.full = v == "1",
                    _ => {}
                }
            }
            Some(tick)
        })
        .collect()
}

/// `text` up to and with its last newline.
fn complete_lines(text: &str) -> &str {
    text.rfind('\n').map_or("", |end| &text[..=end])
}
