//! A live checkpoint of a real server while its client writes: redis from
//! Debian's packages in the guest (`tests/guest/build-app.sh redis`), a
//! client of the test's own in the test's network namespace writing one
//! key after another (each `SET` waits for its `+OK`). The checkpoint is
//! restored after the original VM is gone; the restored redis must hold
//! every key acknowledged before the guest paused, none sent after it ran
//! again, each value whole, and nothing else.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::{self, Vm};

const NETNS: &str = "thaw-e2e-live";
const REDIS: &str = "10.77.0.2:6379";
const TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of each value: several per page, so a torn page shows.
const VALUE_BYTES: usize = 1500;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Key `i`'s value: its number, then a pattern made from it.
fn value(i: u64) -> Vec<u8> {
    let mut v = format!("{i}:").into_bytes();
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < VALUE_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b'a' + (x % 26) as u8);
    }
    v
}

/// Runs `f` on a thread inside the test's network namespace.
fn in_netns<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{NETNS}")).expect("open the netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// A minimal RESP client: one request, one reply.
struct Redis {
    out: TcpStream,
    inp: BufReader<TcpStream>,
}

impl Redis {
    /// Connects, retrying until `deadline` (the server may still start).
    fn connect(deadline: Instant) -> Redis {
        let addr: SocketAddr = REDIS.parse().expect("addr");
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60)))
                        .expect("timeout");
                    let inp = BufReader::new(s.try_clone().expect("clone"));
                    let mut r = Redis { out: s, inp };
                    if r.command(&[b"PING"]).is_some_and(|p| p == b"PONG") {
                        return r;
                    }
                }
                Err(e) => assert!(Instant::now() < deadline, "redis unreachable: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends a command; the reply's payload (`None`: a nil bulk string).
    fn command(&mut self, args: &[&[u8]]) -> Option<Vec<u8>> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.out.write_all(&req).ok()?;
        let mut line = String::new();
        self.inp.read_line(&mut line).ok()?;
        let line = line.trim_end();
        match line.as_bytes().first() {
            Some(b'+') | Some(b':') => Some(line.as_bytes()[1..].to_vec()),
            Some(b'$') => {
                let len: i64 = line[1..].parse().ok()?;
                if len < 0 {
                    return None;
                }
                let mut data = vec![0; len as usize + 2];
                self.inp.read_exact(&mut data).ok()?;
                data.truncate(len as usize);
                Some(data)
            }
            _ => panic!("redis answered {line:?}"),
        }
    }
}

/// One write: its key number, when it was sent and acknowledged (unix ms).
struct Write1 {
    i: u64,
    sent: f64,
    acked: Option<f64>,
}

/// `program ARGS`' standard output, trimmed.
fn run(program: &Path, args: &[&str]) -> String {
    let out = crate::apps::run(program, args);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `thaw ARGS` inside the namespace (QEMU opens the namespace's tap).
fn thaw_in_netns(vm: &Vm, args: &[&str]) -> std::process::Output {
    let out = Command::new("ip")
        .args(["netns", "exec", NETNS, env!("CARGO_BIN_EXE_thaw")])
        .args(args)
        .env("THAW_RUNTIME_DIR", vm.dir.join("run"))
        .env("RUST_LOG", "info")
        .output()
        .expect("run thaw");
    assert!(
        out.status.success(),
        "thaw {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_live_checkpoint_of_redis_holds_exactly_the_writes_acknowledged_before_it() {
    let root = harness::repo_root();
    let initrd = run(&root.join("tests/guest/build-app.sh"), &["redis"]);
    run(&root.join("ci/app-net.sh"), &["up", NETNS]);
    let (name, dir) = Vm::workspace("liveapp");
    let config = crate::apps::app_config(&name, &initrd);
    let cfg = dir.join("vm.yaml");
    std::fs::write(&cfg, config).expect("config");
    let vm = Vm::attach(name, dir.clone());
    thaw_in_netns(&vm, &["start", "--config", cfg.to_str().expect("utf-8")]);
    vm.wait_for(TIMEOUT, "redis to be ready", |t| {
        t.contains("THAW-APP-READY")
    });

    // The client writes key after key until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        in_netns(move || {
            let mut r = Redis::connect(Instant::now() + TIMEOUT);
            let mut log = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let sent = now_ms();
                let v = value(i);
                let ok = r.command(&[b"SET", format!("k{i}").as_bytes(), &v]);
                log.push(Write1 {
                    i,
                    sent,
                    acked: ok.filter(|o| o == b"OK").map(|_| now_ms()),
                });
                i += 1;
            }
            log
        })
    };
    // Writes before the checkpoint...
    std::thread::sleep(Duration::from_secs(2));
    let image = dir.join("ckpt");
    let out = vm.thaw(&[
        "checkpoint",
        &vm.name,
        image.to_str().expect("utf-8"),
        "--copy-limit",
        "32M",
        "--window-max-ms",
        "500",
        "--json",
    ]);
    // ...and after it.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let log = writer.join().expect("the writer");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let save = &report["save"];
    assert_eq!(save["method"], "live", "{report}");
    let paused_at = save["paused_at_unix_ms"].as_f64().expect("paused_at");
    let resumed_at = save["resumed_at_unix_ms"].as_f64().expect("resumed_at");
    let copy_ms = save["live"]["copy_ms"].as_f64().expect("copy_ms");
    let before = log
        .iter()
        .filter(|w| w.acked.is_some_and(|a| a < paused_at))
        .count();
    let during_copy = log
        .iter()
        .filter(|w| w.sent > resumed_at && w.acked.is_some_and(|a| a < resumed_at + copy_ms))
        .count();
    assert!(
        before > 50,
        "too few writes before the checkpoint: {before}"
    );
    assert!(
        during_copy > 0,
        "no write was acknowledged during the copy: the test proved nothing ({report})"
    );

    // The original goes; the checkpoint comes back in its place.
    vm.stop();
    thaw_in_netns(
        &vm,
        &[
            "restore",
            image.to_str().expect("utf-8"),
            "--mode",
            "lazy",
            "--no-learn",
        ],
    );
    let checked = in_netns(move || {
        let mut r = Redis::connect(Instant::now() + TIMEOUT);
        let mut present = 0u64;
        for w in &log {
            let got = r.command(&[b"GET", format!("k{}", w.i).as_bytes()]);
            if let Some(v) = &got {
                assert!(
                    *v == value(w.i),
                    "key k{} holds a torn or foreign value",
                    w.i
                );
                present += 1;
            }
            if w.acked.is_some_and(|a| a < paused_at) {
                assert!(
                    got.is_some(),
                    "k{} was acknowledged before the pause but is lost",
                    w.i
                );
            }
            if w.sent > resumed_at {
                assert!(
                    got.is_none(),
                    "k{} was sent after the resume but is in the image",
                    w.i
                );
            }
        }
        let size = r.command(&[b"DBSIZE"]).expect("DBSIZE");
        (
            present,
            String::from_utf8_lossy(&size).into_owned(),
            log.len(),
        )
    })
    .join()
    .expect("the checker");
    let (present, size, written) = checked;
    eprintln!(
        "{written} writes: {before} acknowledged before the pause, {during_copy} during the copy; \
         {present} in the restored redis; paused {:.1} ms",
        save["paused_ms"].as_f64().unwrap_or(0.0)
    );
    assert_eq!(size, present.to_string(), "keys no write of the test made");
    assert!(present as usize >= before && (present as usize) < written);
    vm.stop();
}
