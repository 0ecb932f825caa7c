//! Faults injected into a restore in progress: the thaw process is killed
//! (SIGKILL) and `thaw recover` finishes the job; QEMU is killed and thaw
//! fails cleanly. Restores read through `--read-limit` so that they are
//! still filling RAM, with the guest running, when the fault hits.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{GuestSpec, Vm};

/// Slow enough that ~100 MiB take tens of seconds to fill.
const SLOW: &str = "4M";
const TIMEOUT: Duration = Duration::from_secs(300);

fn status(vm: &Vm) -> Value {
    serde_json::from_slice(&vm.thaw(&["status", &vm.name, "--json"]).stdout).expect("status JSON")
}

/// Starts a slow lazy restore of `image` in the background and waits until
/// the restored guest has run (a tick after the restore) while its restore
/// is still in progress.
fn restore_until_guest_runs(vm: &Vm, image: &Path) -> std::process::Child {
    let ticks_before = vm.console().matches("THAW-TICK ").count();
    let child = vm.slow_restore(image, SLOW, &[]);
    vm.wait_count("THAW-TICK ", ticks_before + 1);
    let s = status(vm);
    assert_eq!(
        (s["status"].as_str(), s["restore"].as_str()),
        (Some("running"), Some("running")),
        "the restore should still be filling RAM: {s}"
    );
    assert!(flock_held(&vm.runtime_file("lock")));
    child
}

fn kill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
}

#[test]
fn killed_restore_is_finished_by_recover() {
    let vm = Vm::boot("recover", &GuestSpec::default());
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let mut child = restore_until_guest_runs(&vm, &image);
    kill(child.id() as i32);
    let _ = child.wait();

    // The guest is left waiting on its faults, QEMU keeps running, and the
    // runtime directory says what happened.
    let s = status(&vm);
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(s["restore"], "interrupted", "{s}");
    assert!(vm.runtime_file("restore.json").is_file());
    let text = String::from_utf8_lossy(&vm.thaw(&["status", &vm.name]).stdout).into_owned();
    assert!(
        text.contains("thaw recover"),
        "status should say how: {text}"
    );

    let out = vm.thaw(&["recover", &vm.name, "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).expect("recover JSON");
    assert_eq!(stats["guest_was_running"], true, "{stats}");
    assert_eq!(stats["already_complete"], false, "{stats}");
    assert!(stats["pages_kept"].as_u64() > Some(0), "{stats}");
    assert!(
        stats["background_pages"].as_u64() > Some(0),
        "the dead restore should have left pages to fill: {stats}"
    );
    assert!(!vm.runtime_file("restore.json").exists());
    assert_eq!(status(&vm)["restore"], "none");

    // Every page the guest checks is its saved content: same nonce, all
    // checksums (a full pass included) good, ticking on.
    vm.assert_continues_after(&before);

    // Nothing left to recover: one clear sentence, non-zero exit.
    let again = vm.thaw_raw(&["recover", &vm.name]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("no interrupted restore"), "{err}");
    vm.stop();
}

#[test]
fn restore_killed_before_the_guest_ran_is_redone_by_recover() {
    let vm = Vm::boot("recover-paused", &GuestSpec::default());
    let before = vm.wait_ticks(3);
    let image = vm.save();
    // An eager restore keeps the guest paused while it fills RAM.
    let mut child = vm.thaw_spawn(&[
        "restore",
        image.to_str().expect("utf-8"),
        "--mode",
        "eager",
        "--read-limit",
        SLOW,
    ]);
    let deadline = Instant::now() + TIMEOUT;
    // Wait until QEMU has loaded the device state (paused) mid-fill.
    while !(vm.runtime_file("restore.json").is_file()
        && flock_held(&vm.runtime_file("lock"))
        && status(&vm)["status"] == "paused")
    {
        assert!(Instant::now() < deadline, "the restore never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(child.id() as i32);
    let _ = child.wait();
    let s = status(&vm);
    assert_eq!(
        (s["status"].as_str(), s["restore"].as_str()),
        (Some("paused"), Some("interrupted")),
        "{s}"
    );
    let out = vm.thaw(&["recover", &vm.name, "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).expect("recover JSON");
    assert_eq!(stats["guest_was_running"], false, "{stats}");
    assert_eq!(status(&vm)["status"], "running");
    vm.assert_continues_after(&before);
    vm.stop();
}

#[test]
fn qemu_killed_during_restore_fails_cleanly() {
    let vm = Vm::boot("qemu-dies", &GuestSpec::default());
    vm.wait_ticks(3);
    let image = vm.save();
    let child = restore_until_guest_runs(&vm, &image);
    let pid = status(&vm)["pid"].as_i64().expect("pid") as i32;
    kill(pid);
    let started = Instant::now();
    let out = child.wait_with_output().expect("wait for thaw");
    assert!(started.elapsed() < TIMEOUT);
    assert!(!out.status.success(), "thaw must fail when QEMU dies");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("QEMU") && err.contains("exited"),
        "the error should say QEMU went away: {err}"
    );
    // No stray process, no runtime or RAM files left behind.
    assert!(!vm.runtime_file("vm.json").exists());
    assert!(!vm.runtime_file("restore.json").exists());
    let shm = vm.shm_dir();
    assert!(!shm.exists(), "{} left behind", shm.display());
    let list: Value =
        serde_json::from_slice(&vm.thaw(&["list", "--json"]).stdout).expect("list JSON");
    assert!(
        !list
            .as_array()
            .expect("array")
            .iter()
            .any(|v| v["name"] == vm.name.as_str()),
        "{list}"
    );
    // The image is untouched: it restores fine afterwards.
    let before = vm.last_tick();
    let stats = vm.restore(&image, crate::harness::Restore::Lazy);
    stats.assert_fields();
    vm.wait_ticks(before.n + 3);
    vm.stop();
}

/// Whether some process holds the flock on `path` (from /proc/locks, so
/// that looking does not take the lock from its owner).
fn flock_held(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(path).map(|m| m.ino()) else {
        return false;
    };
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("FLOCK"))
        .filter_map(|l| l.split_whitespace().nth(5))
        .any(|dev_ino| dev_ino.rsplit(':').next() == Some(&ino.to_string()))
}

/// Starts `thaw ARGS` and stops it (SIGSTOP) once it holds VM `vm`'s
/// save/restore lock; None if it finished before that was seen.
/// Whether the lock at `path` is held and its record names `pid`: a
/// holder frozen between taking the lock and writing its record would
/// leave others nothing to name.
fn held_by(path: &Path, pid: u32) -> bool {
    flock_held(path)
        && std::fs::read_to_string(path).is_ok_and(|r| r.contains(&format!("\"pid\":{pid},")))
}

fn spawn_and_freeze_holding_the_lock(vm: &Vm, args: &[&str]) -> Option<std::process::Child> {
    let lock = vm.runtime_file("lock");
    let mut child = vm.thaw_spawn(args);
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if held_by(&lock, child.id()) {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
            // Still holding it (it may have finished in between)?
            if held_by(&lock, child.id()) {
                return Some(child);
            }
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        }
        if child.try_wait().expect("try_wait").is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("thaw {args:?} never took the lock");
}

/// A `thaw save --keep-running` to `base.<n>` frozen while it holds the
/// VM's lock (retried: a save can finish between two looks).
fn catch_a_save(vm: &Vm, base: &Path) -> (std::process::Child, std::path::PathBuf) {
    (0..20)
        .find_map(|i| {
            let target = base.with_extension(i.to_string());
            let args = [
                "save",
                &vm.name,
                target.to_str().expect("utf-8"),
                "--keep-running",
            ];
            spawn_and_freeze_holding_the_lock(vm, &args).map(|c| (c, target))
        })
        .expect("a save was caught holding the lock")
}

fn resume(child: &std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
}

/// A small tmpfs mounted for one test; unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }

    fn remount(&self, options: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(ok.success());
    }

    fn entries(&self) -> usize {
        std::fs::read_dir(&self.0).expect("ls").count()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn failed(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn failed_saves_leave_the_vm_running_and_no_partial_image() {
    let vm = Vm::boot("save-fails", &GuestSpec::default());
    let nonce = vm.wait_ticks(3).nonce;
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();

    // The disk fills up: a 16 MiB file system for a ~100 MiB image.
    let disk = SmallDisk::mount(&vm.dir.join("small"), "16m");
    let err = failed(&vm.thaw_raw(&["save", &vm.name, &path(&disk.0.join("img"))]));
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(disk.entries(), 0, "a partial image was left behind");
    assert_eq!(status(&vm)["status"], "running");

    // The image directory is not writable (root ignores modes: read-only fs).
    disk.remount("ro");
    let err = failed(&vm.thaw_raw(&["save", &vm.name, &path(&disk.0.join("img"))]));
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(status(&vm)["status"], "running");

    // The image exists already: refused without --force, left intact.
    let existing = vm.dir.join("existing");
    vm.thaw(&["save", &vm.name, &path(&existing), "--keep-running"]);
    let err = failed(&vm.thaw_raw(&["save", &vm.name, &path(&existing)]));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    vm.inspect(&existing);
    assert_eq!(status(&vm)["status"], "running");

    // Two saves at once: the second is refused, naming the first, while
    // the first holds the VM's owner lock (frozen there), then the first
    // completes.
    let first = vm.dir.join("first");
    let second = vm.dir.join("second");
    let frozen = catch_a_save(&vm, &first);
    let err = failed(&vm.thaw_raw(&["save", &vm.name, &path(&second)]));
    assert!(
        err.contains(&format!("VM {} is busy: thaw save (pid ", vm.name))
            && err.contains("stop it first"),
        "{err}"
    );
    assert!(!second.exists());
    resume(&frozen.0);
    let out = frozen.0.wait_with_output().expect("first save");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.inspect(&frozen.1);

    // Through all of it the guest ran on with its memory intact (a full
    // verification pass included: full_every is 5).
    vm.assert_keeps_ticking(&nonce, 12);
    vm.stop();
}

#[test]
fn qemu_killed_during_save_fails_cleanly() {
    let vm = Vm::boot("save-qemu-dies", &GuestSpec::default());
    vm.wait_ticks(3);
    let pid = status(&vm)["pid"].as_i64().expect("pid") as i32;
    let (child, image) = catch_a_save(&vm, &vm.dir.join("img"));
    kill(pid);
    resume(&child);
    let out = child.wait_with_output().expect("wait for thaw");
    let err = failed(&out);
    assert!(err.contains("QEMU") && err.contains("exited"), "{err}");
    // Either nothing was written, or QEMU died after all was captured and
    // the image is whole (it says which).
    if image.exists() {
        assert!(err.contains("complete and restorable"), "{err}");
        vm.inspect(&image);
    } else {
        assert!(err.contains("no image was written"), "{err}");
    }
    let partials: Vec<_> = std::fs::read_dir(&vm.dir)
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
    assert!(!vm.runtime_file("vm.json").exists());
    let shm = vm.shm_dir();
    assert!(!shm.exists(), "{} left behind", shm.display());
}

#[test]
fn a_damaged_chunk_is_never_installed_and_stops_the_vm() {
    let vm = Vm::boot("bad-chunk", &GuestSpec::default());
    vm.wait_ticks(3);
    let image = vm.save();
    // One flipped byte in the middle of the page data: the structure is
    // intact, so only the chunk's own checksum can tell.
    let pages = image.join("pages.bin");
    let len = std::fs::metadata(&pages).expect("stat").len();
    let at = len / 2 / 4096 * 4096 + 123;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pages)
            .expect("open pages.bin");
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).expect("read");
        f.write_all_at(&[b[0] ^ 0x01], at).expect("write");
    }
    // Reads of whole chunks name the chunk; a page read alone (a fault, or
    // the fill around pages faults installed) names its slot.
    let (slot, chunk) = (at / 4096, at / 4096 / 16);
    for mode in ["lazy", "eager"] {
        let err = failed(&vm.thaw_raw(&[
            "restore",
            image.to_str().expect("utf-8"),
            "--mode",
            mode,
            "--no-learn",
        ]));
        assert!(
            (err.contains(&format!("chunk {chunk} ")) || err.contains(&format!("slot {slot} ")))
                && err.contains("fails its checksum"),
            "{mode}: {err}"
        );
        assert!(err.contains("the VM was stopped"), "{mode}: {err}");
        assert!(
            !vm.runtime_file("vm.json").exists(),
            "{mode}: VM left behind"
        );
    }
    assert!(
        !vm.console().contains("THAW-CORRUPT"),
        "the guest saw the damaged page"
    );
}
