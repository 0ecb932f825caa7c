//! Working-set restores with real QEMU: a guest that reports which physical
//! pages its hot set occupies (`thaw.report_hot=1`) and touches nothing else
//! of its data (`thaw.full_every=0`). Each estimator's working set must hold
//! most of the hot set; a `ws` restore must need few on-demand faults for
//! it; learning must not get worse from one restore to the next; every
//! integrity check of the guest must pass throughout.
//!
//! Restores that count lazy faults read the image at a limited rate
//! (`--read-limit`, emulated network storage), so that the guest runs
//! through its whole hot set many times before the background fill ends:
//! every hot page missing from a working set then really is a lazy fault.

use std::collections::HashSet;

use crate::harness::{self, GuestSpec, Vm};

/// Image read rate for restores that count lazy faults: the ~130 MB image
/// then takes seconds to fill, many guest ticks.
const READ_LIMIT: &str = "24M";

fn hot_guest(test: &str) -> (Vm, HashSet<u64>) {
    let spec = GuestSpec {
        fill: "96M",
        hot: "32M",
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
        32 << 20 >> 12,
        "the guest reported its 32 MiB hot set"
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
    let stats = vm.restore_with(
        &image,
        &[
            "--mode",
            "ws",
            "--estimator",
            "trace",
            "--read-limit",
            READ_LIMIT,
        ],
    );
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

    // That restore learned: the image now has a learned set, and evidence
    // of how the traced set predicted the guest's first touches. `auto`
    // goes by that evidence (the fixed order would take the learned set,
    // of which there is no evidence yet).
    let info = vm.inspect(&image);
    let restores = info["evidence"]["restores"].as_array().expect("evidence");
    assert_eq!(restores.len(), 1, "{info}");
    assert_eq!(restores[0]["used"], "trace", "{info}");
    vm.stop();
    let auto = vm.restore_with(&image, &["--mode", "ws", "--read-limit", READ_LIMIT]);
    assert_eq!(
        auto.json["ws_sets"],
        serde_json::json!(["trace"]),
        "{}",
        auto.json
    );
    vm.assert_keeps_ticking(&nonce, 3);
    // Now every set and the union of learned and trace have a verdict, and
    // `auto` takes the cheapest of them.
    let info = vm.inspect(&image);
    let latest = info["evidence"]["restores"]
        .as_array()
        .and_then(|r| r.last().cloned())
        .expect("evidence");
    let verdicts = latest["verdicts"].as_array().expect("verdicts");
    let names: Vec<String> = verdicts
        .iter()
        .map(|v| {
            v["candidate"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|e| e.as_str())
                        .collect::<Vec<_>>()
                        .join("+")
                })
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(names, ["learned", "trace", "learned+trace"], "{latest}");
    let cost = |v: &serde_json::Value| {
        v["missed"].as_u64().unwrap_or(u64::MAX) * 8 + v["unused"].as_u64().unwrap_or(u64::MAX)
    };
    let cheapest = verdicts
        .iter()
        .min_by_key(|v| (cost(v), v["candidate"].as_array().map_or(0, Vec::len)));
    let cheapest = cheapest.map(|v| v["candidate"].clone()).expect("a verdict");
    for v in verdicts {
        // Each verdict's counts add up to the pages touched and in the set.
        assert_eq!(
            v["hits"]
                .as_u64()
                .zip(v["missed"].as_u64())
                .map(|(h, m)| h + m),
            latest["touched"].as_u64(),
            "{v}"
        );
    }
    vm.stop();
    let auto = vm.restore_with(&image, &["--mode", "ws", "--read-limit", READ_LIMIT]);
    assert_eq!(auto.json["ws_sets"], cheapest, "{}", auto.json);
    vm.assert_keeps_ticking(&nonce, 3);
    vm.stop();
}

#[test]
fn learned_working_set_is_recorded_and_refined() {
    let (vm, hot) = hot_guest("learned");
    let nonce = vm.wait_ticks(3).nonce;
    let image = vm.save();
    // A fast lazy restore without a tracking window learns little: only the
    // few pages the guest faulted on before the fill was done.
    let lazy = vm.restore_with(&image, &["--mode", "lazy", "--learn-max-ms", "1"]);
    lazy.assert_fields();
    assert!(lazy.u64("learned_pages") > 0, "{}", lazy.json);
    vm.assert_keeps_ticking(&nonce, 3);

    // Two ws restores from slow storage: the first prefetches that thin
    // learned set and faults in the rest of the hot set lazily (and learns
    // it, with a full window); the second needs no more lazy faults.
    let mut lazy_faults = Vec::new();
    for round in 0..2 {
        vm.stop();
        let ws = vm.restore_with(&image, &["--mode", "ws", "--read-limit", READ_LIMIT]);
        ws.assert_fields();
        assert_eq!(ws.json["estimator"], "learned", "auto picks learned");
        lazy_faults.push(ws.u64("lazy_faults"));
        // The restore learned from QEMU's page tables (this kernel has
        // PAGEMAP_SCAN and write protection of shared memory): first
        // touches of cached pages went to the kernel alone.
        assert!(ws.u64("page_table_reads") > 0, "{}", ws.json);
        vm.assert_keeps_ticking(&nonce, 3);
        let cov = coverage(&image, "learned", &hot);
        assert!(
            cov >= 0.9,
            "after round {round} the learned set holds {:.0}% of the hot set",
            cov * 100.0
        );
    }
    eprintln!("lazy faults of the two learned restores: {lazy_faults:?}");
    assert!(
        lazy_faults[1] <= lazy_faults[0],
        "the second learned restore needed more lazy faults: {lazy_faults:?}"
    );
    assert!(
        lazy_faults[1] <= hot.len() as u64 / 20,
        "{} lazy faults after learning, for a hot set of {} pages",
        lazy_faults[1],
        hot.len()
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
    // estimates stay in the runtime dir for `thaw save` to store. The last
    // tracker is still running when the save starts: the save stops it
    // (as Ctrl-C would) and stores its last estimate.
    let mut running = None;
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
            "100000",
            "--json",
        ];
        args.extend(extra);
        // The guest rewrites one hot block per tick: track until it has
        // rewritten every block once more, then stop the tracker (SIGINT).
        let tracker = vm.thaw_spawn(&args);
        let ticks = vm.console().matches("THAW-TICK ").count();
        vm.wait_count("THAW-TICK ", ticks + 40);
        if extra.is_none() && estimator == "dirty" {
            running = Some(tracker);
            break;
        }
        let out = vm.interrupt(tracker);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("track JSON");
        assert_eq!(report["ended"], "signal", "{report}");
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
    let tracker = running.expect("the last tracker runs");
    let out = tracker.wait_with_output().expect("wait for the tracker");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("track JSON");
    assert_eq!(
        report["ended"], "signal",
        "the save stopped the tracker: {report}"
    );
    for estimator in ["abit", "dirty"] {
        let cov = coverage(&image, estimator, &hot);
        assert!(
            cov >= 0.9,
            "{estimator} working set holds {:.0}% of the hot set",
            cov * 100.0
        );
    }
    let stats = vm.restore_with(
        &image,
        &[
            "--mode",
            "ws",
            "--estimator",
            "abit",
            "--read-limit",
            READ_LIMIT,
        ],
    );
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
