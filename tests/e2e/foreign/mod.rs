//! A guest thaw's own workload knows nothing about (`foreign/init`: a
//! busybox shell loop with its own integrity checks and a virtio disk), in a
//! YAML of its own that leaves `machine` and `accel` to their defaults. It is
//! saved and restored lazily, saved again and restored eagerly; each time it
//! must carry on with the same RAM-only nonce and intact memory and disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{self, Restore, Vm};

/// Packs `foreign/init`, the host's static busybox and the guest kit's
/// virtio modules into an initramfs at `out`.
fn build_initramfs(out: &Path) {
    let root = out.with_extension("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "lib"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let here = crate::harness::repo_root().join("tests/e2e/foreign");
    std::fs::copy(here.join("init"), root.join("init")).expect("copy init");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    let modules = harness::guest_dir().join("modules");
    let status = Command::new("cp")
        .arg("-r")
        .arg(&modules)
        .arg(root.join("lib/modules"))
        .status()
        .expect("run cp");
    assert!(status.success(), "copying {}", modules.display());
    let script = format!(
        "cd '{}' && find . | cpio --quiet -o -H newc --owner=0:0 | gzip -1 > '{}'",
        root.display(),
        out.display()
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run cpio");
    assert!(status.success(), "building the foreign initramfs");
}

/// The console's `FOREIGN-TICK` lines as (n, nonce, mem ok, disk ok).
fn ticks(vm: &Vm) -> Vec<(u64, String, bool, bool)> {
    vm.console()
        .lines()
        .filter_map(|l| {
            let mut p = l.trim().strip_prefix("FOREIGN-TICK ")?.split_whitespace();
            let n = p.next()?.parse().ok()?;
            let nonce = p.next()?.strip_prefix("nonce=")?.to_string();
            let mem = p.next()? == "mem=1";
            let disk = p.next()? == "disk=1";
            Some((n, nonce, mem, disk))
        })
        .collect()
}

/// Waits for three more ticks than there are now; asserts every tick so far
/// passed its checks with one nonce and the counter never restarted.
fn assert_carries_on(vm: &Vm) -> u64 {
    let seen = vm.console().matches("FOREIGN-TICK ").count();
    vm.wait_count("FOREIGN-TICK ", seen + 3);
    let t = ticks(vm);
    let nonce = &t[0].1;
    for (n, k_nonce, mem, disk) in &t {
        assert_eq!(
            k_nonce, nonce,
            "tick {n}: the nonce changed (guest rebooted?)"
        );
        assert!(*mem, "tick {n}: the guest's md5 of its RAM file failed");
        assert!(
            *disk,
            "tick {n}: the guest read its nonce back wrong from disk"
        );
    }
    assert!(
        t.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "tick counter broken: {:?}",
        t.iter().map(|k| k.0).collect::<Vec<_>>()
    );
    assert_eq!(vm.console().matches("FOREIGN-READY").count(), 1);
    t.last().map(|k| k.0).unwrap_or(0)
}

#[test]
fn a_foreign_guest_survives_lazy_and_eager_restores() {
    let (name, dir) = Vm::workspace("foreign");
    let initrd: PathBuf = dir.join("foreign.img");
    build_initramfs(&initrd);
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create disk");
    let config = format!(
        "# A guest of its own, not the guest kit's workload.\n\
         name: {name}\nmemory: 768M\ncpus: 2\n\
         kernel: {kernel}\ninitrd: foreign.img\n\
         append: \"console=ttyS0 quiet panic=-1\"\n\
         serial: console.log\n\
         extra_args:\n  - -no-reboot\n  - -drive\n  - file=disk.raw,format=raw,if=none,id=d0\n\
         \x20 - -device\n  - virtio-blk-pci,drive=d0\n",
        kernel = harness::guest_dir().join("vmlinuz").display(),
    );
    // Relative paths in extra_args are QEMU's business: run from `dir`.
    let config = config.replace("file=disk.raw", &format!("file={}", disk.display()));
    let vm = Vm::start(name, dir, &config, "FOREIGN-READY");
    assert_carries_on(&vm);

    let image = vm.save_as("img-lazy");
    vm.restore(&image, Restore::Lazy).assert_fields();
    let after_lazy = assert_carries_on(&vm);

    let image = vm.save_as("img-eager");
    let stats = vm.restore(&image, Restore::Eager);
    stats.assert_fields();
    assert_eq!(stats.u64("faults"), 0);
    assert!(assert_carries_on(&vm) > after_lazy);
    vm.stop();
}
