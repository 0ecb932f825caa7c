//! Bad input gets one clear sentence naming what is wrong and how to fix
//! it: invalid YAML, an unknown VM, a missing or too old QEMU, an image of
//! a different RAM layout, no permission for userfaultfd.

use std::path::Path;
use std::process::Output;

use crate::harness::{GuestSpec, Vm};

/// The error text of a failed `thaw` run (its first line holds the point).
fn error_of(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.trim().is_empty(), "no error message");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("write");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn bad_input_is_named_in_one_sentence() {
    let (name, dir) = Vm::workspace("bad-input");
    let vm = Vm::attach(name.clone(), dir.clone());
    let kit = crate::harness::guest_dir();
    let base = format!(
        "name: {name}\nmemory: 256M\nkernel: {}\ninitrd: {}\n",
        kit.join("vmlinuz").display(),
        kit.join("initrd.img").display()
    );

    // Invalid YAML: file, line and column.
    let cfg = write(&dir.join("broken.yaml"), &format!("{base}cpus: [2\n"));
    let err = error_of(&vm.thaw_raw(&["start", "--config", &cfg]));
    assert!(err.contains("broken.yaml:5:"), "{err}");
    // A bad value: the same, and what would be valid.
    let cfg = write(&dir.join("value.yaml"), &format!("{base}memory: lots\n"));
    let err = error_of(&vm.thaw_raw(&["start", "--config", &cfg]));
    assert!(err.contains("value.yaml:"), "{err}");

    // An unknown VM.
    let err = error_of(&vm.thaw_raw(&["save", "e2e-no-such-vm", "/tmp/e2e-nothing"]));
    assert!(
        err.contains("no running VM named \"e2e-no-such-vm\"") && err.contains("thaw list"),
        "{err}"
    );

    // A missing QEMU binary.
    let cfg = write(
        &dir.join("noqemu.yaml"),
        &format!("{base}qemu: /nonexistent/qemu-system-x86_64\n"),
    );
    let err = error_of(&vm.thaw_raw(&["start", "--config", &cfg]));
    assert!(
        err.contains("/nonexistent/qemu-system-x86_64") && err.contains("not found"),
        "{err}"
    );

    // A QEMU too old to skip file-backed RAM in its migration stream.
    let old = dir.join("qemu-7.2");
    write(
        &old,
        "#!/bin/sh\necho 'QEMU emulator version 7.2.11 (Debian 1:7.2+dfsg-7)'\n",
    );
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let cfg = write(
        &dir.join("oldqemu.yaml"),
        &format!("{base}qemu: {}\n", old.display()),
    );
    let err = error_of(&vm.thaw_raw(&["start", "--config", &cfg]));
    assert!(err.contains("7.2.11") && err.contains("8.2"), "{err}");

    // Something that is not an image.
    let err = error_of(&vm.thaw_raw(&["restore", dir.to_str().expect("utf-8")]));
    assert!(err.contains("is not a thaw image"), "{err}");

    // No permission for userfaultfd: an unprivileged user.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "limits",
            "--faults",
            "10",
            "--copy-bytes",
            "4M",
            "--read-bytes",
            "1M",
            "--dir",
            "/tmp",
            "--no-pinned",
        ])
        .env("RUST_LOG", "off")
        .output()
        .expect("run setpriv");
    let err = error_of(&out);
    assert!(
        err.contains("CAP_SYS_PTRACE") || err.contains("unprivileged_userfaultfd"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_of_another_ram_layout_is_refused() {
    let vm = Vm::boot("layout", &GuestSpec::default());
    vm.wait_ticks(2);
    let image = vm.save();
    // The image's config asks for less RAM than its layout holds.
    let meta = image.join("meta.json");
    let text = std::fs::read_to_string(&meta).expect("meta");
    assert!(text.contains("\"memory\": \"512M\""), "{text}");
    std::fs::write(
        &meta,
        text.replace("\"memory\": \"512M\"", "\"memory\": \"256M\""),
    )
    .expect("write");
    let err = error_of(&vm.thaw_raw(&["restore", image.to_str().expect("utf-8")]));
    assert!(
        err.contains("RAM layout") && err.contains("does not match"),
        "{err}"
    );
    // Nothing of the attempt is left running.
    let list = vm.thaw(&["list", "--json"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&vm.name),
        "the failed restore left its VM behind"
    );
}
