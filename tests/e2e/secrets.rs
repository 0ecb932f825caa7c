//! Guest RAM is secret: runtime files, RAM backing files and images are
//! the owner's alone, and thaw never follows a symbolic link planted where
//! it would create one of them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::harness::{GuestSpec, Vm};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn files_are_private_and_planted_symlinks_are_refused() {
    let vm = Vm::boot("secrets", &GuestSpec::default());
    vm.wait_ticks(2);

    // Runtime directory and everything QEMU and thaw put there.
    let runtime = vm
        .runtime_file("vm.json")
        .parent()
        .expect("runtime dir")
        .to_path_buf();
    assert_eq!(mode(&runtime), 0o700, "{}", runtime.display());
    for f in [
        "qmp.sock",
        "query.sock",
        "console.sock",
        "vm.json",
        "qemu.pid",
    ] {
        assert_eq!(mode(&vm.runtime_file(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&vm.dir.join("console.log")), 0o600, "console log");
    // The RAM files (created 0600 in a 0700 directory, both removed once
    // QEMU holds the files: found through its fds).
    assert!(!vm.shm_dir().exists(), "RAM files left in the open");
    let pid = std::fs::read_to_string(vm.runtime_file("qemu.pid")).expect("pid");
    let fds = PathBuf::from(format!("/proc/{}/fd", pid.trim()));
    let ram: Vec<PathBuf> = std::fs::read_dir(&fds)
        .expect("QEMU's fds")
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::read_link(p).is_ok_and(|t| t.starts_with(vm.shm_dir())))
        .collect();
    assert!(!ram.is_empty(), "no RAM file among QEMU's fds");
    for f in &ram {
        let m = std::fs::metadata(f).expect("stat RAM file");
        assert_eq!(m.mode() & 0o777, 0o600, "{}", f.display());
    }

    // A symlink where the image would go is refused, --force or not, and
    // nothing is written through it.
    let elsewhere = vm.dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let link = vm.dir.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
    for extra in [None, Some("--force")] {
        let mut args = vec!["save", &vm.name, link.to_str().expect("utf-8")];
        args.extend(extra);
        let out = vm.thaw_raw(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symbolic link"), "{err}");
    }
    assert_eq!(std::fs::read_dir(&elsewhere).expect("ls").count(), 0);

    // A real image: directory 0700, every file 0600.
    let image = vm.save();
    assert_eq!(mode(&image), 0o700);
    for e in std::fs::read_dir(&image).expect("ls").flatten() {
        assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
    }

    // A symlink planted where the restore would create guest RAM (or the
    // runtime directory) is refused before QEMU starts.
    for planted in [vm.shm_dir(), runtime] {
        let target = vm.dir.join("planted-target");
        std::fs::create_dir_all(&target).expect("mkdir");
        let _ = std::fs::remove_dir_all(&planted);
        std::os::unix::fs::symlink(&target, &planted).expect("plant");
        let out = vm.thaw_raw(&["restore", image.to_str().expect("utf-8")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&target).expect("ls").count(), 0);
        std::fs::remove_file(&planted).expect("unplant");
    }

    // Without the plants the image restores.
    vm.restore(&image, crate::harness::Restore::Lazy);
    assert_eq!(mode(&vm.runtime_file("lock")), 0o600, "lock");
    vm.wait_ticks(vm.last_tick().n + 2);
    vm.stop();
}
