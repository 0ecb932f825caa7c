//! A guest with a virtio balloon (free-page reporting on) whose balloon is
//! inflated and deflated through QMP while a slow lazy restore is still
//! filling its RAM. QEMU discards the pages the guest gives back (a hole in
//! the RAM file, then `MADV_DONTNEED`); thaw must answer later touches of
//! them with zeros at once, never refill them from the image, and finish
//! the restore with the guest's data intact and the guest ticking
//! throughout.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{GuestSpec, Vm};

/// Slow enough that the restore is still filling RAM while the balloon
/// inflates and deflates (about a minute for the guest's ~120 MiB).
const SLOW: &str = "2M";
const MIB: u64 = 1 << 20;
/// Generous: TCG on a shared 2-core machine is slow.
const TIMEOUT: Duration = Duration::from_secs(300);

/// How long one read from the monitor waits before the test asks QEMU
/// directly: an event can be throttled or missed, `query-balloon` cannot.
const POLL: Duration = Duration::from_secs(10);

/// A QMP session on the VM's query monitor (the restore holds the main one).
struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Monitor {
    fn connect(vm: &Vm) -> Monitor {
        let stream = UnixStream::connect(vm.runtime_file("query.sock")).expect("query monitor");
        stream.set_read_timeout(Some(POLL)).expect("read timeout");
        let writer = stream.try_clone().expect("clone");
        let mut m = Monitor {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = m.next_before(Instant::now() + TIMEOUT);
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        m.execute("qmp_capabilities", json!({}));
        m
    }

    /// The next message, or `None` when none came within [`POLL`].
    fn next_within_poll(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("QMP closed"),
            Ok(_) => Some(serde_json::from_str(&line).expect("QMP JSON")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // QEMU writes each message whole, so a timeout never
                // falls inside a line; if one did, it would be lost here.
                assert!(line.is_empty(), "a QMP line was cut by the read timeout");
                None
            }
            Err(e) => panic!("read from QMP: {e}"),
        }
    }

    /// The next message; panics if none comes before `deadline`.
    fn next_before(&mut self, deadline: Instant) -> Value {
        loop {
            if let Some(msg) = self.next_within_poll() {
                return msg;
            }
            assert!(Instant::now() < deadline, "QEMU sent nothing in time");
        }
    }

    /// Runs `cmd`; returns its `return` value (events on the way are dropped).
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").expect("write to QMP");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let reply = self.next_before(deadline);
            if let Some(r) = reply.get("return") {
                return r.clone();
            }
            assert!(reply.get("error").is_none(), "{cmd} failed: {reply}");
        }
    }

    /// Sets the balloon target to `bytes` of guest RAM and waits until the
    /// guest got within 4 MiB of it.
    fn balloon_to(&mut self, bytes: u64) {
        self.execute("balloon", json!({ "value": bytes }));
        self.wait_balloon(bytes);
    }

    /// Waits until the guest's RAM is within 4 MiB of `bytes`: by a
    /// `BALLOON_CHANGE` event, or, when none came for [`POLL`], by asking
    /// `query-balloon`.
    fn wait_balloon(&mut self, bytes: u64) {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = None;
        loop {
            let actual = match self.next_within_poll() {
                Some(ev) if ev["event"] == "BALLOON_CHANGE" => ev["data"]["actual"].as_u64(),
                Some(_) => None,
                None => self.execute("query-balloon", json!({}))["actual"].as_u64(),
            };
            if let Some(actual) = actual {
                if actual.abs_diff(bytes) <= 4 * MIB {
                    return;
                }
                last = Some(actual);
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not reach a balloon of {} MiB (last seen: {:?} MiB)",
                bytes / MIB,
                last.map(|b| b / MIB)
            );
        }
    }
}

/// Asks the workload for a full verification pass at its next tick.
fn request_full_pass(vm: &Vm) {
    let mut console = UnixStream::connect(vm.runtime_file("console.sock")).expect("console");
    console.write_all(b"VERIFY\n").expect("write VERIFY");
}

#[test]
fn balloon_inflated_and_deflated_during_a_lazy_restore() {
    let spec = GuestSpec {
        extra_args: [
            "-device",
            "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        ]
        .map(String::from)
        .to_vec(),
        // Full passes on request only: one would wait for every missing page.
        full_every: 0,
        ..Default::default()
    };
    let vm = Vm::boot("balloon", &spec);
    let before = vm.wait_ticks(3);
    let image = vm.save();

    let ticks_before = vm.console().matches("THAW-TICK ").count();
    let started = Instant::now();
    let child = vm.slow_restore(&image, SLOW, &["--json"]);
    // The guest runs while its RAM streams in.
    vm.wait_count("THAW-TICK ", ticks_before + 1);
    let mut monitor = Monitor::connect(&vm);
    monitor.balloon_to(384 * MIB);
    let inflated = vm.console().matches("THAW-TICK ").count();
    vm.wait_count("THAW-TICK ", inflated + 3);
    monitor.balloon_to(512 * MIB);
    let deflated = vm.console().matches("THAW-TICK ").count();
    vm.wait_count("THAW-TICK ", deflated + 3);
    let ticked_by = started.elapsed();
    drop(monitor);

    let out = child.wait_with_output().expect("wait for the restore");
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).expect("restore JSON");
    let complete =
        Duration::from_secs_f64(stats["complete_ms"].as_f64().expect("complete_ms") / 1e3);
    assert!(
        complete > ticked_by,
        "the restore ended ({complete:?}) before the guest ticked after the balloon ops ({ticked_by:?}): not a test of a restore in progress"
    );
    let discarded = stats["discarded_pages"].as_u64().expect("discarded_pages");
    assert!(
        discarded > 0,
        "the balloon discarded nothing during the restore: {stats}"
    );
    eprintln!(
        "balloon restore: {discarded} pages discarded, {} faults on them, complete after {complete:?}",
        stats["discarded_faults"]
    );

    // `thaw qmp` reaches the same monitor from the command line.
    let out = vm.thaw(&["qmp", &vm.name, "query-balloon"]);
    let reply: Value = serde_json::from_slice(&out.stdout).expect("query-balloon JSON");
    assert_eq!(reply["actual"].as_u64(), Some(512 * MIB), "{reply}");
    let bad = vm.thaw_raw(&["qmp", &vm.name, "balloon", "384M"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not JSON"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // Every page of the workload is intact, and the guest never rebooted.
    request_full_pass(&vm);
    vm.assert_continues_after(&before);
    vm.stop();
}

/// The restoring thaw dies while the guest's balloon inflates; QEMU then
/// blocks in its next discard (the remove event waits to be read) and
/// answers no QMP. `thaw recover` must read those events before it talks to
/// QEMU, keep the holes the dead restore logged and the new ones, and
/// finish with the guest intact.
#[test]
fn recover_after_a_restore_killed_during_ballooning() {
    let spec = GuestSpec {
        extra_args: ["-device", "virtio-balloon-pci,id=balloon0"]
            .map(String::from)
            .to_vec(),
        full_every: 0,
        ..Default::default()
    };
    let vm = Vm::boot("balloon-recover", &spec);
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let ticks_before = vm.console().matches("THAW-TICK ").count();
    let mut child = vm.slow_restore(&image, SLOW, &[]);
    vm.wait_count("THAW-TICK ", ticks_before + 1);
    let mut monitor = Monitor::connect(&vm);
    eprintln!("balloon-recover: inflating to 448 MiB during the restore");
    monitor.balloon_to(448 * MIB);
    // Ask for more, then kill the restore while the guest inflates: QEMU's
    // discards then wait for a thaw to read them. (No QMP until recover:
    // with TCG the vCPU thread discards while holding QEMU's big lock, so
    // the monitors wait too.)
    monitor.execute("balloon", json!({ "value": 384 * MIB }));
    eprintln!("balloon-recover: killing the restore");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    let _ = child.wait();

    eprintln!("balloon-recover: recovering");
    let out = vm.thaw(&["recover", &vm.name, "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).expect("recover JSON");
    assert_eq!(stats["guest_was_running"], true, "{stats}");
    assert!(
        stats["discarded_pages"].as_u64() > Some(0),
        "the dead restore's discards were not kept: {stats}"
    );
    eprintln!("balloon-recover: waiting for 384 MiB");
    monitor.wait_balloon(384 * MIB);
    eprintln!("balloon-recover: deflating");
    monitor.balloon_to(512 * MIB);
    drop(monitor);
    request_full_pass(&vm);
    vm.assert_continues_after(&before);
    vm.stop();
}
