//! `thaw bench --app` end to end: a real redis or memcached from Debian's
//! packages in the guest (`tests/guest/build-app.sh`), its data loaded with
//! the server's own tools (`redis-cli --pipe`, `memccp`), driven over a
//! tap device in a network namespace of the test's own (`ci/app-net.sh`)
//! by its own client (`redis-benchmark`, `memccat`), saved while the
//! client runs and restored by stock QEMU and by thaw. The bench itself
//! refuses a restore after which the key count or a sampled value differs;
//! this test checks that the client's numbers are there and consistent.
//! Nothing is timed here.

use std::path::Path;
use std::process::Command;

use crate::harness::{self, Vm};

/// The tests' network namespaces, one per application (each tap0 is
/// 10.77.0.1/24), so both tests can run at once.
fn netns(app: &str) -> String {
    format!("thaw-e2e-{app}")
}

/// Runs `program ARGS`; panics with its output if it fails.
pub(crate) fn run(program: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{}{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The config of an application guest `name` booting `initrd` (from
/// `build-app.sh`), its NIC on the namespace's tap0 at 10.77.0.2.
pub(crate) fn app_config(name: &str, initrd: &str) -> String {
    format!(
        "name: {name}\nmemory: 512M\ncpus: 1\nmachine: q35\naccel: tcg\nkernel: {}\ninitrd: {initrd}\n\
         append: \"console=ttyS0 quiet panic=-1 thaw.ip=10.77.0.2/24\"\nserial: console.log\n\
         extra_args: [\"-no-reboot\", \"-netdev\", \"tap,id=n0,ifname=tap0,script=no,downscript=no\", \
         \"-device\", \"virtio-net-pci,netdev=n0\"]\n",
        harness::guest_dir().join("vmlinuz").display(),
    )
}

#[test]
fn redis_bench_measures_the_client_and_keeps_the_data() {
    bench_app("redis");
}

#[test]
fn memcached_bench_measures_the_client_and_keeps_the_data() {
    bench_app("memcached");
}

fn bench_app(app: &str) {
    let root = harness::repo_root();
    let image = run(&root.join("tests/guest/build-app.sh"), &[app]);
    let image = String::from_utf8_lossy(&image.stdout).trim().to_string();
    let ns = netns(app);
    run(&root.join("ci/app-net.sh"), &["up", &ns]);
    let (name, dir) = Vm::workspace(&format!("app-{app}"));
    let config = app_config(&name, &image);
    let cfg_path = dir.join("vm.yaml");
    std::fs::write(&cfg_path, config).expect("write config");
    let _vm = Vm::attach(name, dir.clone());
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_thaw")])
        .args(harness::quick_bench_args(
            &cfg_path,
            &dir,
            "stock,lazy,ws:trace,ws:learned",
            2000,
        ))
        .args([
            "--app",
            app,
            "--app-data",
            "48M",
            "--app-hot",
            "4M",
            "--no-limits",
        ])
        .env("THAW_RUNTIME_DIR", dir.join("run"))
        .env("RUST_LOG", "info")
        .output()
        .expect("run thaw bench");
    assert!(
        out.status.success(),
        "thaw bench --app {app} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    assert_eq!(report["rate_unit"], "requests/s", "{report}");
    let about = &report["app"];
    assert_eq!(about["app"], app, "{about}");
    assert_eq!(about["keys"].as_u64(), Some(48 * 256), "{about}");
    assert_eq!(about["hot_keys"].as_u64(), Some(4 * 256), "{about}");
    assert!(about["warm_pass_ms"].as_f64() > Some(0.0), "{about}");
    assert!(report["warm_rate"].as_f64() > Some(0.0), "{report}");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{report}");
    for run in runs {
        let running = run["running_ms"].as_f64().expect("running_ms");
        let first = run["first_answer_ms"].as_f64();
        // The server cannot answer before its guest runs.
        assert!(
            first.is_some_and(|f| f >= running),
            "first answer before the guest ran: {run}"
        );
        assert!(
            run["samples"].as_array().is_some_and(|s| !s.is_empty()),
            "no client passes after a {} restore",
            run["method"]
        );
        let ttr = run["ttr_ms"].as_f64();
        assert!(
            ttr.is_none() || ttr >= first,
            "TTR before the first answer: {run}"
        );
    }
    let md = std::fs::read_to_string(dir.join("out/bench.md")).expect("bench.md");
    assert!(md.contains(&format!("{app} with 12288 keys")), "{md}");
    assert!(md.contains("| ws:learned |"), "{md}");
}
