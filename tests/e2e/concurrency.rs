//! Many restores: two of one image at once (the image is read-only to
//! them, the learned working set is replaced atomically), and a soak of
//! consecutive save → restore cycles of one guest.

use serde_json::Value;

use crate::harness::{GuestSpec, Restore, Tick, Vm};

fn listed(vm: &Vm) -> Vec<String> {
    let list: Value =
        serde_json::from_slice(&vm.thaw(&["list", "--json"]).stdout).expect("list JSON");
    list.as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect()
}

/// A restored copy runs on from the saved guest: its own console shows
/// ticks past `before`, a full verification among them, all good, the
/// same nonce and no reboot.
fn assert_copy_continues(copy: &Vm, before: &Tick) {
    let target = before.n + 10;
    let text = copy.wait_for(
        std::time::Duration::from_secs(300),
        &format!("{}: tick {target}", copy.name),
        |t| {
            crate::harness::parse_ticks(t)
                .iter()
                .any(|k| k.n >= target && k.full)
        },
    );
    let ticks = crate::harness::parse_ticks(&text);
    assert!(!text.contains("THAW-CORRUPT"), "{}: {text}", copy.name);
    assert!(!text.contains("THAW-READY"), "{} rebooted", copy.name);
    assert!(
        ticks
            .iter()
            .all(|k| k.ok && k.nonce == before.nonce && k.n > before.n),
        "{}: {text}",
        copy.name
    );
}

#[test]
fn two_restores_of_one_image_at_once() {
    let vm = Vm::boot("twins", &GuestSpec::default());
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let path = image.to_str().expect("utf-8");
    // A learned working set to refine, so both restores update it.
    vm.restore(&image, Restore::Lazy);
    vm.wait_ticks(before.n + 3);
    vm.stop();
    let copies: Vec<Vm> = ["a", "b"]
        .iter()
        .map(|s| vm.renamed(&format!("{}-{s}", vm.name)))
        .collect();
    let running: Vec<_> = copies
        .iter()
        .map(|c| vm.thaw_spawn(&["restore", path, "--name", &c.name, "--json"]))
        .collect();
    for (child, copy) in running.into_iter().zip(&copies) {
        let out = child.wait_with_output().expect("restore");
        assert!(
            out.status.success(),
            "{}: {}",
            copy.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let names = listed(&vm);
    for copy in &copies {
        assert!(names.contains(&copy.name), "{names:?}");
        assert_copy_continues(copy, &before);
    }
    assert!(!names.contains(&vm.name), "{names:?}");
    // The learned set is whole (inspect reads and checks it) and the image
    // itself is unchanged: it restores once more.
    let inspect = vm.inspect(&image);
    assert!(
        inspect.to_string().contains("learned"),
        "no learned working set: {inspect}"
    );
    for copy in &copies {
        copy.stop();
    }
    assert!(listed(&vm).iter().all(|n| !n.starts_with(&vm.name)));
}

#[test]
fn soak_twenty_save_restore_cycles() {
    let vm = Vm::boot("soak", &GuestSpec::default());
    let mut before = vm.wait_ticks(3);
    for cycle in 0..20 {
        let image = vm.save_as(&format!("image-{}", cycle % 2));
        let mode = ["ws", "lazy", "eager"][cycle % 3];
        let stats = vm.restore_with(&image, &["--mode", mode]);
        stats.assert_fields();
        // Same guest, same RAM: every checksum (a full pass included) good.
        vm.assert_continues_after(&before);
        before = vm.last_tick();
        std::fs::remove_dir_all(&image).expect("remove image");
    }
    vm.stop();
}
