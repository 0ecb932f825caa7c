//! End-to-end tests: real `qemu-system-x86_64`, the guest kit's kernel and
//! workload, the real `thaw` binary. Each test boots its own VM under a
//! unique name and runtime directory, saves and restores it, and checks the
//! guest kept running with the same RAM-only nonce, passing checksums and a
//! tick counter that continues past its value at save time.
//!
//! Needs root and the guest kit (`tests/guest/build.sh`); `ci/test.sh` runs them.

// The tests' own casts: pids of their children and of QEMU as `thaw
// status` reports them, counts from files the tests just had written; a
// wrong one fails a test.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod apps;
mod bad_input;
mod balloon;
mod bench;
mod concurrency;
mod faults;
mod foreign;
mod harness;
mod libvirt;
mod live;
mod live_app;
mod secrets;
mod store;
mod working_set;

use harness::{Restore, Vm};

#[test]
fn lazy_restore_keeps_the_guest_running() {
    let vm = Vm::boot("lazy", &harness::GuestSpec::default());
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let stats = vm.restore(&image, Restore::Lazy);
    stats.assert_fields();
    assert_eq!(stats.json["mode"], "lazy");
    assert!(stats.u64("nonzero_pages") > 0);
    vm.assert_continues_after(&before);
    vm.stop();
}

#[test]
fn eager_restore_keeps_the_guest_running() {
    let vm = Vm::boot("eager", &harness::GuestSpec::default());
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let stats = vm.restore(&image, Restore::Eager);
    stats.assert_fields();
    assert_eq!(stats.json["mode"], "eager");
    // Eager installs everything before the guest runs: nothing on demand.
    assert_eq!(stats.u64("faults"), 0);
    assert_eq!(stats.u64("prefetched_pages"), stats.u64("nonzero_pages"));
    vm.assert_continues_after(&before);
    vm.stop();
}

#[test]
fn two_numa_nodes_restore() {
    let spec = harness::GuestSpec {
        numa_nodes: 2,
        ..Default::default()
    };
    let vm = Vm::boot("numa", &spec);
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let info = vm.inspect(&image);
    assert_eq!(
        info["layout"]["blocks"].as_array().map(|b| b.len()),
        Some(2),
        "{info}"
    );
    vm.restore(&image, Restore::Lazy).assert_fields();
    vm.assert_continues_after(&before);
    vm.stop();
}

#[test]
fn virtio_devices_restore() {
    let spec = harness::GuestSpec {
        extra_args: [
            "-device",
            "virtio-rng-pci",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-drive",
            "if=none,id=d0,driver=null-co,size=16M,read-zeroes=on",
            "-device",
            "virtio-blk-pci,drive=d0",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let vm = Vm::boot("virtio", &spec);
    let before = vm.wait_ticks(3);
    let image = vm.save();
    vm.restore(&image, Restore::Lazy).assert_fields();
    vm.assert_continues_after(&before);
    vm.stop();
}

#[test]
fn save_restore_twice_in_a_row() {
    let vm = Vm::boot("twice", &harness::GuestSpec::default());
    let mut before = vm.wait_ticks(3);
    for (round, mode) in [Restore::Lazy, Restore::Eager].into_iter().enumerate() {
        let image = vm.save_as(&format!("img{round}"));
        vm.restore(&image, mode).assert_fields();
        vm.assert_continues_after(&before);
        before = vm.last_tick();
    }
    vm.stop();
}
