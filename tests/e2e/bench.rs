//! `thaw bench` end to end on a small guest: stock QEMU and thaw methods
//! restore the same VM, the guest's throughput reports come back after
//! each restore with its nonce and integrity intact (the bench refuses
//! otherwise), and the report carries every number it promises. Nothing is
//! timed here: the numbers come from the benchmark, not from this test.

use crate::harness::{self, Vm};

#[test]
fn bench_restores_by_each_method_and_reports_ttr_fields() {
    let (name, dir) = Vm::workspace("bench");
    let cfg_path = harness::small_bench_config(&name, &dir);
    let vm = Vm::attach(name, dir.clone());
    let args = harness::quick_bench_args(
        &cfg_path,
        &dir,
        "stock,mapped-ram,lazy,ws:trace,ws:learned",
        1500,
    );
    let out = vm.thaw(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    assert!(report["warm_rate"].as_f64() > Some(0.0), "{report}");
    let summary = report["summary"].as_array().expect("summary");
    let methods: Vec<&str> = summary
        .iter()
        .filter_map(|s| s["method"].as_str())
        .collect();
    assert_eq!(
        methods,
        ["stock", "mapped-ram", "lazy", "ws:trace", "ws:learned"]
    );
    for run in report["runs"].as_array().expect("runs") {
        assert!(run["running_ms"].as_f64() > Some(0.0), "{run}");
        assert!(
            run["complete_ms"].as_f64() >= run["running_ms"].as_f64(),
            "{run}"
        );
        assert!(
            run["samples"].as_array().is_some_and(|s| !s.is_empty()),
            "no throughput reports after a {} restore",
            run["method"]
        );
        assert!(run.get("ttr_ms").is_some(), "{run}");
    }
    let lazy = &report["runs"][2];
    assert!(lazy["bytes_read"].as_u64() > Some(0), "{lazy}");
    // This machine's limits, measured in the same run, and thaw's fill rate
    // and fault latency as ratios to them.
    assert!(
        report["limits"]["seq_read_mib_per_s"].as_f64() > Some(0.0),
        "{report}"
    );
    assert!(
        report["limits"]["fault_round_trip_p50_us"].as_f64() > Some(0.0),
        "{report}"
    );
    assert!(
        summary[2]["fault_p50_vs_round_trip"].is_number(),
        "{}",
        summary[2]
    );
    assert!(
        summary[0]["fault_p50_vs_round_trip"].is_null(),
        "stock has no faults"
    );
    let md = std::fs::read_to_string(dir.join("out/bench.md")).expect("bench.md");
    assert!(md.contains("| ws:trace |"), "{md}");
}
