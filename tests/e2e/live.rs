//! Live (copy-on-write) checkpoints of a guest that keeps writing: two
//! vCPUs write sequence-numbered whole pages and a reader has virtio-blk
//! DMA into guest memory while thaw copies RAM (the workload's copy-on-write
//! mode, `tests/guest/workload/src/cow.rs`). The restored image must hold
//! one instant: every page exactly the value its writer's restored counter
//! says, none newer, none torn. And a checkpoint that fails mid-copy
//! (thaw SIGKILLed, the disk full, QEMU killed) must leave the guest
//! running and no partial image.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{guest_dir, Vm};

const TIMEOUT: Duration = Duration::from_secs(300);
/// Disk blocks of 4 KiB the DMA reader reads.
const DISK_BLOCKS: u64 = 4096;

/// Boots the copy-on-write guest: 2 vCPUs, 2 writers of 48 MiB each, a
/// DMA reader on a 16 MiB virtio-blk disk.
fn boot(test: &str) -> Vm {
    let kit = guest_dir();
    let (name, dir) = Vm::workspace(test);
    let disk = dir.join("disk.img");
    write_disk(&disk);
    let config = format!(
        "name: {name}\nmemory: 512M\ncpus: 2\nmachine: q35\naccel: tcg\nkernel: {}\ninitrd: {}\n\
         append: \"console=ttyS0 quiet panic=-1 thaw.cow_writers=2 thaw.cow_mem=48M \
         thaw.cow_rate=2000 thaw.cow_disk=/dev/vda\"\nserial: {}\nextra_args: {}\n",
        kit.join("vmlinuz").display(),
        kit.join("initrd.img").display(),
        dir.join("console.log").display(),
        serde_json::to_string(&[
            "-no-reboot",
            "-drive",
            &format!("file={},format=raw,if=virtio,readonly=on", disk.display()),
        ])
        .expect("json"),
    );
    let vm = Vm::start(name, dir, &config, "THAW-COW-READY");
    vm.wait_count("THAW-COW-TICK ", 2);
    vm
}

/// The disk the DMA reader checks: word `k` of block `b` is
/// `0xd15c << 48 ^ b << 9 ^ k` (the workload's `disk_word`).
fn write_disk(path: &Path) {
    let mut data = Vec::with_capacity((DISK_BLOCKS * 4096) as usize);
    for b in 0..DISK_BLOCKS {
        for k in 0..512u64 {
            data.extend_from_slice(&(0xd15c_0000_0000_0000 ^ (b << 9) ^ k).to_le_bytes());
        }
    }
    std::fs::write(path, data).expect("write the DMA disk");
}

/// Asks the guest to check every writer's pages and the DMA buffer;
/// asserts all hold and returns the summary line.
fn verify(vm: &Vm) -> String {
    let before = vm.console().matches("THAW-COW-VERIFY ").count();
    let mut console = UnixStream::connect(vm.runtime_file("console.sock")).expect("console");
    console.write_all(b"VERIFY\n").expect("write VERIFY");
    let text = vm.wait_count("THAW-COW-VERIFY ", before + 1);
    let line = text
        .lines()
        .filter(|l| l.starts_with("THAW-COW-VERIFY "))
        .nth(before)
        .expect("the verify line")
        .to_string();
    assert!(
        line.contains(" ok=1 ") && !text.contains("THAW-COW-BAD"),
        "the guest's pages do not hold one instant:\n{}",
        text.lines()
            .filter(|l| l.starts_with("THAW-COW-BAD") || l.starts_with("THAW-COW-VERIFY"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Both writers' regions (2 × 12288 pages) and some DMA pages.
    assert!(line.contains(" pages=24576 "), "{line}");
    assert!(!line.ends_with(" dma=0"), "no DMA page was checked: {line}");
    line
}

/// Restores `image` as a second VM (`<name>-<suffix>`) with `mode`
/// (`lazy` without learning, or `eager`) and checks it holds one instant.
/// The copy shares `vm`'s directory, which it removes when dropped: keep
/// it until the test ends.
fn restore_copy(vm: &Vm, image: &Path, suffix: &str, mode: &str) -> Vm {
    let copy = vm.renamed(&format!("{}-{suffix}", vm.name));
    let mut args = vec![
        "restore",
        image.to_str().expect("utf-8"),
        "--name",
        &copy.name,
        "--mode",
        mode,
        "--json",
    ];
    if mode == "lazy" {
        args.push("--no-learn");
    }
    json(&vm.thaw(&args));
    verify(&copy);
    copy
}

/// Total pages written so far by the guest's writers (last tick line).
fn writes(vm: &Vm) -> u64 {
    vm.console()
        .lines()
        .rfind(|l| l.starts_with("THAW-COW-TICK "))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("writes=")))
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

/// The guest keeps writing: two more tick lines with more writes.
fn assert_writing(vm: &Vm) {
    let (ticks, before) = (vm.console().matches("THAW-COW-TICK ").count(), writes(vm));
    vm.wait_count("THAW-COW-TICK ", ticks + 2);
    assert!(writes(vm) > before, "the guest stopped writing");
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Partial images (`<name>.partial-<pid>`) in `dir`.
fn partials(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".partial-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until a background checkpoint to `image` is copying RAM: its
/// partial image's `pages.bin` has data.
fn wait_copying(image: &Path, child: &mut std::process::Child) {
    let start = Instant::now();
    let dir = image.parent().expect("image dir");
    loop {
        if let Some(status) = child.try_wait().expect("poll thaw") {
            panic!("thaw exited ({status}) before copying RAM");
        }
        let copying = partials(dir)
            .iter()
            .any(|p| std::fs::metadata(p.join("pages.bin")).is_ok_and(|m| m.len() > 0));
        if copying {
            return;
        }
        assert!(start.elapsed() < TIMEOUT, "the checkpoint never copied RAM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
}

#[test]
fn live_checkpoint_holds_one_instant_under_writes_and_dma() {
    let vm = boot("live");
    verify(&vm);
    // A write tracker holds guest RAM's userfaultfd registration: the
    // checkpoint stops it and keeps its estimate rather than fail on it.
    let tracker = vm.thaw_spawn(&[
        "track",
        &vm.name,
        "--estimator",
        "dirty",
        "--interval-ms",
        "200",
    ]);
    vm.wait_for(TIMEOUT, "the tracker's first estimate", |_| {
        vm.runtime_file("estimate-dirty.bin").exists()
    });
    let image = vm.dir.join("live");
    // Paced so that the copy overlaps many guest writes.
    let out = vm.thaw(&[
        "checkpoint",
        &vm.name,
        image.to_str().expect("utf-8"),
        "--copy-limit",
        "64M",
        "--window-max-ms",
        "1000",
        "--json",
    ]);
    let tracked = tracker.wait_with_output().expect("the tracker");
    assert!(
        tracked.status.success(),
        "{}",
        String::from_utf8_lossy(&tracked.stderr)
    );
    let report = json(&out);
    let save = &report["save"];
    assert_eq!(save["method"], "live", "{report}");
    let full_pages = save["nonzero_pages"].as_u64().expect("pages");
    let live = &save["live"];
    assert!(live["protected_pages"].as_u64() > Some(24576), "{report}");
    assert!(
        live["wp_faults"].as_u64() > Some(0),
        "no write met the copy: the test proved nothing\n{report}"
    );
    // Speculative pre-copy from the tracker's estimate: the pages it
    // predicted were copied first after the resume (and the restore below
    // checks them like every other page).
    assert_eq!(live["prediction"], "dirty-estimate", "{report}");
    assert_eq!(live["speculated_at"], "resume", "{report}");
    assert!(live["predicted_pages"].as_u64() > Some(0), "{report}");
    assert!(live["speculated_pages"].as_u64() > Some(0), "{report}");
    assert!(save["paused_ms"].as_f64().is_some(), "{report}");
    assert!(
        save["working_sets"]
            .as_array()
            .is_some_and(|w| w.iter().any(|e| e == "dirty")),
        "the tracker's estimate was not kept: {report}"
    );
    assert!(partials(&vm.dir).is_empty());
    // The original keeps running, intact.
    verify(&vm);

    // The checkpoint restored as a second VM: one instant.
    let copy = restore_copy(&vm, &image, "r", "lazy");
    assert_writing(&copy);
    copy.stop();

    // An incremental checkpoint on top: only what changed is written, and
    // the chain restores to one instant; merged, it needs no parent.
    let incremental = vm.dir.join("incremental");
    let out = vm.thaw(&[
        "checkpoint",
        &vm.name,
        incremental.to_str().expect("utf-8"),
        "--parent",
        image.to_str().expect("utf-8"),
        "--window-max-ms",
        "500",
        "--json",
    ]);
    let report = json(&out);
    let (written, inherited) = (
        report["save"]["nonzero_pages"].as_u64().expect("pages"),
        report["save"]["inherited_pages"]
            .as_u64()
            .expect("inherited"),
    );
    // The writers rewrite their 24576 pages every ~6 s; the kernel and the
    // rest stay: an increment writes part of what a full image holds.
    assert!(
        inherited > 1000 && written + inherited >= full_pages / 2 && written < full_pages,
        "an increment of {full_pages} pages wrote {written}, took {inherited}: {report}"
    );
    let info = vm.inspect(&incremental);
    assert_eq!(info["chain_depth"], 1, "{info}");
    // (A copy shares the test's directory: it lives to the end.)
    let from_chain = restore_copy(&vm, &incremental, "i", "lazy");
    from_chain.stop();
    let merged = vm.dir.join("merged");
    vm.thaw(&[
        "merge",
        incremental.to_str().expect("utf-8"),
        merged.to_str().expect("utf-8"),
    ]);
    std::fs::remove_dir_all(&image).expect("remove the parent");
    let refused = vm.thaw_raw(&[
        "restore",
        incremental.to_str().expect("utf-8"),
        "--name",
        "x",
    ]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("is missing"),
        "a chain without its parent: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let from_merged = restore_copy(&vm, &merged, "m", "eager");
    from_merged.stop();

    // The same with stop-and-copy, side by side: also one instant.
    let stopped = vm.dir.join("stopped");
    let out = vm.thaw(&[
        "save",
        &vm.name,
        stopped.to_str().expect("utf-8"),
        "--keep-running",
        "--stop-copy",
        "--json",
    ]);
    assert_eq!(json(&out)["method"], "stop-and-copy");
    verify(&vm);
    vm.stop();
}

#[test]
fn failed_live_checkpoints_leave_the_guest_running_and_no_image() {
    let vm = boot("livefail");
    let image = vm.dir.join("ckpt");
    let image_arg = image.to_str().expect("utf-8");

    // thaw SIGKILLed mid-copy: the kernel drops every protection with
    // thaw's userfaultfd, the guest writes on.
    let mut child = vm.thaw_spawn(&[
        "save",
        &vm.name,
        image_arg,
        "--keep-running",
        "--copy-limit",
        "4M",
    ]);
    wait_copying(&image, &mut child);
    sigkill(child.id() as i32);
    let _ = child.wait();
    assert_writing(&vm);
    verify(&vm);
    assert!(!image.exists(), "an image appeared");
    // The next checkpoint to the same path works and clears what the
    // killed one left.
    vm.thaw(&["save", &vm.name, image_arg, "--keep-running", "--json"]);
    assert!(image.join("meta.json").exists());
    assert!(partials(&vm.dir).is_empty(), "{:?}", partials(&vm.dir));
    verify(&vm);

    // The disk full mid-copy: a clear error, the guest runs on, nothing left.
    let small = vm.dir.join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24M", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a small tmpfs failed");
    let full = small.join("ckpt");
    let out = vm.thaw_raw(&[
        "save",
        &vm.name,
        full.to_str().expect("utf-8"),
        "--keep-running",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = Command::new("umount").arg(&small).status();
    assert!(!out.status.success(), "a 24 MiB disk held the checkpoint?");
    assert!(
        err.contains("No space left on device"),
        "the error does not say the disk is full: {err}"
    );
    assert!(!full.exists());
    assert_writing(&vm);
    verify(&vm);

    // QEMU killed mid-copy: nothing can write guest RAM any more, so thaw
    // completes the instant's image and says the VM is gone. (A new path:
    // the image restored must be this save's, not the one before.)
    let image = vm.dir.join("after-qemu-died");
    let image_arg = image.to_str().expect("utf-8");
    let mut child = vm.thaw_spawn(&[
        "save",
        &vm.name,
        image_arg,
        "--keep-running",
        "--copy-limit",
        "8M",
    ]);
    wait_copying(&image, &mut child);
    let pid: i32 = std::fs::read_to_string(vm.runtime_file("qemu.pid"))
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("pid");
    sigkill(pid);
    let out = child.wait_with_output().expect("thaw");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "thaw did not notice QEMU died");
    assert!(
        err.contains("exited during the save") && err.contains("complete and restorable"),
        "{err}"
    );
    let restored = vm.thaw(&["restore", image_arg, "--mode", "eager", "--json"]);
    json(&restored);
    verify(&vm);
    vm.stop();
}

#[test]
fn continuous_checkpoints_keep_the_last_k_restorable() {
    let vm = boot("series");
    let dir = vm.dir.join("series");
    let out = vm.thaw(&[
        "checkpoint",
        &vm.name,
        dir.to_str().expect("utf-8"),
        "--interval-ms",
        "1000",
        "--keep",
        "2",
        "--count",
        "5",
        // The other way of speculating than the default's (checked
        // above): copied in the pause, never protected again.
        "--speculate-in-pause",
        "--json",
    ]);
    let report = json(&out);
    assert_eq!(report["ended_by"], "count", "{report}");
    let taken = report["taken"].as_array().expect("taken");
    assert_eq!(taken.len(), 5, "{report}");
    // keep 2: chains 1-2, 3-4, 5; after the fifth, 3, 4 and 5 remain.
    let name = |n: u64| dir.join(format!("ckpt-{n:06}"));
    let kept: Vec<String> = report["kept"]
        .as_array()
        .expect("kept")
        .iter()
        .map(|k| k.as_str().expect("path").to_string())
        .collect();
    assert_eq!(
        kept,
        [3, 4, 5].map(|n| name(n).display().to_string()).to_vec(),
        "{report}"
    );
    assert!(!name(1).exists() && !name(2).exists());
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("series.json")).expect("series.json"))
            .expect("series.json is JSON");
    assert_eq!(index.as_array().map(Vec::len), Some(3), "{index}");
    // Every second one builds on the one before and writes only changes.
    for (i, t) in taken.iter().enumerate() {
        assert_eq!(t["parent"].is_null(), i % 2 == 0, "{t}");
        // From the second on, the writes the one before saw are predicted
        // and copied in the pause.
        if i > 0 {
            assert!(t["speculated_pages"].as_u64() > Some(0), "{t}");
        }
    }
    assert!(
        taken[1]["pages_written"].as_u64() < taken[0]["pages_written"].as_u64(),
        "{report}"
    );
    // The incremental one, with its speculated pages, restores to one
    // instant.
    let copy = restore_copy(&vm, &name(4), "s", "lazy");
    copy.stop();
    verify(&vm);
    vm.stop();
}
