//! Working-set restores with real QEMU: a guest that reports which physical
//! pages its hot set occupies (`thaw.report_hot=1`) and touches nothing else
//! of its data (`thaw.full_every=0`). Each estimator's working set must hold
//! most of the hot set; a `ws` restore must need few on-demand faults for
//! it; learning must not get worse from one restore to the next; every
//! integrity check of the guest must pass throughout.

use std::collections::HashSet;

use crate::harness::{self, GuestSpec, Vm};

fn hot_guest(test: &str) -> (Vm, HashSet<u64>) {
    let spec = GuestSpec {
        fill: "96M",
        hot: "8M",
        full_every: 0,
        report_hot: true,
        ..Default::default()
    };
    let vm = Vm::boot(test, &spec);
    let text = vm.wait_for(
        std::time::Duration::from_secs(300),
        "the hot set report",
        |t| t.contains("THAW-HOT-END"),
    );
    let hot: HashSet<u64> = harness::hot_pages(&text).into_iter().collect();
    assert_eq!(
        hot.len(),
        8 << 20 >> 12,
        "the guest reported its 8 MiB hot set"
    );
    (vm, hot)
}

/// Share of the hot set inside `image`'s working set of `estimator`.
fn coverage(image: &std::path::Path, estimator: &str, hot: &HashSet<u64>) -> f64 {
    let ws: HashSet<u64> = harness::ws_pages(image, estimator).into_iter().collect();
    hot.intersection(&ws).count() as f64 / hot.len() as f64
}

#[test]
fn checkpoint_traces_the_hot_set_and_a_ws_restore_prefetches_it() {
    let (vm, hot) = hot_guest("trace");
    let nonce = vm.wait_ticks(3).nonce;
    let (image, report) = vm.checkpoint("ckpt");
    assert!(report["trace_pages"].as_u64() > Some(0), "{report}");
    // The VM kept running with intact memory.
    let status: serde_json::Value =
        serde_json::from_slice(&vm.thaw(&["status", &vm.name, "--json"]).stdout).expect("JSON");
    assert_eq!(status["status"], "running");
    vm.assert_keeps_ticking(&nonce, 5);
    let cov = coverage(&image, "trace", &hot);
    assert!(
        cov >= 0.9,
        "trace working set holds {:.0}% of the hot set",
        cov * 100.0
    );

    vm.stop();
    let stats = vm.restore_with(&image, &["--mode", "ws", "--estimator", "trace"]);
    stats.assert_fields();
    assert_eq!(stats.json["estimator"], "trace");
    assert!(stats.u64("prefetched_pages") >= hot.len() as u64 * 9 / 10);
    assert!(
        stats.u64("lazy_faults") <= hot.len() as u64 / 20,
        "{} lazy faults for a hot set of {} pages",
        stats.u64("lazy_faults"),
        hot.len()
    );
    vm.assert_keeps_ticking(&nonce, 10);
    vm.stop();
}

#[test]
fn learned_working_set_is_recorded_and_refined() {
    let (vm, hot) = hot_guest("learned");
    let nonce = vm.wait_ticks(3).nonce;
    let image = vm.save();
    // A lazy restore learns: it records first touches and writes ws-learned.
    let lazy = vm.restore(&image, harness::Restore::Lazy);
    lazy.assert_fields();
    assert!(lazy.u64("learned_pages") > 0, "{}", lazy.json);
    let cov = coverage(&image, "learned", &hot);
    assert!(
        cov >= 0.9,
        "learned working set holds {:.0}% of the hot set",
        cov * 100.0
    );
    vm.assert_keeps_ticking(&nonce, 5);

    let mut lazy_faults = Vec::new();
    for _ in 0..2 {
        vm.stop();
        let ws = vm.restore_with(&image, &["--mode", "ws"]);
        ws.assert_fields();
        assert_eq!(ws.json["estimator"], "learned", "auto picks learned");
        assert!(
            ws.u64("lazy_faults") <= hot.len() as u64 / 20,
            "{}",
            ws.json
        );
        lazy_faults.push(ws.u64("lazy_faults"));
        vm.assert_keeps_ticking(&nonce, 5);
        assert!(coverage(&image, "learned", &hot) >= 0.9);
    }
    assert!(
        lazy_faults[1] <= lazy_faults[0],
        "the second learned restore needed more lazy faults: {lazy_faults:?}"
    );
    let info = vm.inspect(&image);
    let sets = info["working_sets"]
        .as_array()
        .expect("working sets listed");
    assert!(
        sets.iter()
            .any(|s| s["estimator"] == "learned" && s["updates"] == 2),
        "{info}"
    );
    vm.stop();
}

#[test]
fn trackers_estimate_the_hot_set_for_save() {
    let (vm, hot) = hot_guest("track");
    let nonce = vm.wait_ticks(3).nonce;
    // Access scanning, then write tracking with synchronous and with
    // asynchronous write-protect faults, each for a few intervals; the
    // estimates stay in the runtime dir for `thaw save` to store.
    for (estimator, extra) in [
        ("abit", None),
        ("dirty", Some("--sync-wp")),
        ("dirty", None),
    ] {
        let mut args = vec![
            "track",
            &vm.name,
            "--estimator",
            estimator,
            "--interval-ms",
            "300",
            "--keep",
            "8",
            "--duration-ms",
            "3000",
            "--json",
        ];
        args.extend(extra);
        let out = vm.thaw(&args);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("track JSON");
        assert_eq!(report["ended"], "duration", "{report}");
        assert!(report["scans"].as_u64() >= Some(5), "{report}");
        assert_eq!(report["sync_wp"], extra.is_some(), "{report}");
        if extra.is_some() {
            let estimate = vm.runtime_file(&format!("estimate-{estimator}.bin"));
            let pages: HashSet<u64> = harness::estimate_pages(&estimate).into_iter().collect();
            let cov = hot.intersection(&pages).count() as f64 / hot.len() as f64;
            assert!(
                cov >= 0.9,
                "synchronous dirty tracking saw {:.0}% of the hot set",
                cov * 100.0
            );
        }
    }
    vm.assert_keeps_ticking(&nonce, 3);
    let image = vm.save();
    for estimator in ["abit", "dirty"] {
        let cov = coverage(&image, estimator, &hot);
        assert!(
            cov >= 0.9,
            "{estimator} working set holds {:.0}% of the hot set",
            cov * 100.0
        );
    }
    let stats = vm.restore_with(&image, &["--mode", "ws", "--estimator", "abit"]);
    stats.assert_fields();
    assert_eq!(stats.json["estimator"], "abit");
    assert!(
        stats.u64("lazy_faults") <= hot.len() as u64 / 20,
        "{}",
        stats.json
    );
    vm.assert_keeps_ticking(&nonce, 5);
    vm.stop();
}
