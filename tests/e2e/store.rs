//! Images in a real S3-compatible object store (SeaweedFS on loopback,
//! started by `ci/s3-server.sh`): push, inspect, pull and restore a saved
//! VM; a damaged, a missing and a never-completed object; bad credentials
//! and a stopped store; a VM saved to and restored from a store across a
//! slow emulated link (`ci/store-link.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{repo_root, GuestSpec, Restore, Vm};

/// The store of one test: started on creation, stopped and removed on
/// drop. Its S3 port is not SeaweedFS's default, so a store a user runs
/// on this host is left alone.
struct S3Server {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

const PORT: &str = "18333";

/// The store tests one at a time: two SeaweedFS starting beside the rest
/// of the suite on 2 cores answered writes with 500 for seconds.
static ONE_STORE_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_store_test() -> std::sync::MutexGuard<'static, ()> {
    ONE_STORE_TEST.lock().unwrap_or_else(|p| p.into_inner())
}

impl S3Server {
    fn start(dir: &Path) -> S3Server {
        let dir = dir.join("s3");
        let out = S3Server::script(&dir, "up");
        if !out.status.success() {
            // Not left running for the next test to trip over.
            S3Server::script(&dir, "down");
            panic!("ci/s3-server.sh up failed:\n{}", text(&out));
        }
        let env = exported(&S3Server::script(&dir, "env"));
        assert!(
            env.iter().any(|(k, _)| k == "AWS_SECRET_ACCESS_KEY"),
            "{env:?}"
        );
        S3Server { dir, env }
    }

    fn script(dir: &Path, cmd: &str) -> Output {
        Command::new("bash")
            .arg(repo_root().join("ci/s3-server.sh"))
            .arg(cmd)
            .env("THAW_S3_DIR", dir)
            .env("THAW_S3_PORT", PORT)
            .env("THAW_S3_BUCKET", "thaw-test")
            .output()
            .expect("run ci/s3-server.sh")
    }

    fn var(&self, key: &str) -> &str {
        lookup(&self.env, key)
    }

    /// `thaw ARGS` against this store (and `vm`'s runtime directory).
    fn thaw(&self, vm: &Vm, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
        cmd.args(args)
            .env("THAW_RUNTIME_DIR", vm.dir.join("run"))
            .env("RUST_LOG", "info")
            // Only this store's settings count.
            .env("HOME", vm.dir.join("no-home"));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("run thaw")
    }

    /// A request signed with the store's keys, as any S3 tool sends it:
    /// curl's SigV4 (`--aws-sigv4`; the payload is not part of the
    /// signature).
    fn curl(&self, method: &str, key: &str, body: Option<&Path>) -> Output {
        let url = format!("{}/thaw-test/{key}", self.var("AWS_ENDPOINT_URL"));
        let user = format!(
            "{}:{}",
            self.var("AWS_ACCESS_KEY_ID"),
            self.var("AWS_SECRET_ACCESS_KEY")
        );
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-f",
            "-X",
            method,
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &user,
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        ]);
        if let Some(b) = body {
            cmd.arg("--data-binary").arg(format!("@{}", b.display()));
        }
        let out = cmd.arg(url).output().expect("run curl");
        assert!(out.status.success(), "curl {method} {key}: {}", text(&out));
        out
    }

    fn stop(&self) {
        S3Server::script(&self.dir, "down");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `export K=V` lines a script printed.
fn exported(out: &Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn lookup<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} is not in the store's environment"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output) -> Value {
    assert!(out.status.success(), "thaw failed: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {}", text(&out)))
}

fn refused(out: &Output, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "thaw succeeded where it must not: {}",
        text(out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "the error does not name {n:?}: {err}");
    }
}

/// No `<name>.partial-*` directory left next to `dir`'s children.
fn no_partials(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "partial downloads left: {left:?}");
}

/// Copies the files of the image directory `from` into a new `to`.
fn copy_image(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A pull of the image at `url` (as another host would) holds the same
/// learned working set as the directory `here`.
fn assert_pull_has_learned_set(s3: &S3Server, vm: &Vm, url: &str, here: &Path) {
    let there = vm.dir.join("another-host");
    ok(s3.thaw(
        vm,
        &["pull", url, there.to_str().expect("utf-8"), "--json"],
        &[],
    ));
    assert_eq!(
        std::fs::read(here.join("ws-learned.bin")).expect("learned here"),
        std::fs::read(there.join("ws-learned.bin")).expect("learned there"),
        "the published learned set did not come back"
    );
    std::fs::remove_dir_all(&there).expect("remove the pull");
}

#[test]
fn an_image_pushed_to_a_real_store_pulls_back_verified_and_restores() {
    let _one = one_store_test();
    let vm = Vm::boot("store", &GuestSpec::default());
    let s3 = S3Server::start(&vm.dir);
    let before = vm.wait_ticks(3);
    let image = vm.save();
    let image_arg = image.to_str().expect("utf-8");
    let prefix = format!("e2e/{}/img", std::process::id());
    let url = format!("s3://thaw-test/{prefix}");

    let pushed = ok(s3.thaw(&vm, &["push", image_arg, &url, "--json"], &[]));
    assert_eq!(pushed["url"], url.as_str(), "{pushed}");
    assert!(pushed["files"].as_u64() >= Some(4), "{pushed}");
    let bytes = pushed["bytes"].as_u64().expect("bytes");
    assert!(bytes > 1 << 20, "{pushed}");
    // An image is never replaced by accident.
    refused(
        &s3.thaw(&vm, &["push", image_arg, &url], &[]),
        &["already there", "--force"],
    );

    let inspected = ok(s3.thaw(&vm, &["inspect", &url, "--json"], &[]));
    assert_eq!(
        inspected["meta"]["vm"]["name"],
        vm.name.as_str(),
        "{inspected}"
    );
    assert_eq!(inspected["identity"], pushed["identity"], "{inspected}");

    let pulled = vm.dir.join("pulled");
    let pulled_arg = pulled.to_str().expect("utf-8");
    let report = ok(s3.thaw(&vm, &["pull", &url, pulled_arg, "--json"], &[]));
    assert_eq!(report["bytes"].as_u64(), Some(bytes), "{report}");
    for f in ["meta.json", "device.state", "index.bin", "pages.bin"] {
        assert_eq!(
            std::fs::read(image.join(f)).expect("original"),
            std::fs::read(pulled.join(f)).expect("pulled"),
            "{f} differs after the round trip"
        );
    }
    // The pulled image restores the guest where it was.
    let restored = vm.restore(&pulled, Restore::Lazy);
    restored.assert_fields();
    vm.assert_continues_after(&before);

    // What that restore learned goes back to the image in the store: a
    // new version of the learned set, named by its manifest.
    assert!(restored.u64("learned_pages") > 0, "{}", restored.json);
    let published = ok(s3.thaw(
        &vm,
        &["push", pulled_arg, &url, "--working-sets", "--json"],
        &[],
    ));
    let learned = published["published"]
        .as_array()
        .and_then(|p| p.iter().find(|f| f["name"] == "ws-learned.bin"))
        .unwrap_or_else(|| panic!("the learned set was not published: {published}"))
        .clone();
    let learned_object = learned["object"].as_str().expect("object").to_string();
    assert_eq!(
        learned_object,
        format!(
            "ws-learned.bin.v-{}",
            learned["xxh3"].as_str().expect("xxh3")
        ),
        "{published}"
    );
    // Published again: the store has it already.
    let again = ok(s3.thaw(
        &vm,
        &["push", pulled_arg, &url, "--working-sets", "--json"],
        &[],
    ));
    assert_eq!(
        again["published"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    assert!(
        again["unchanged"].to_string().contains("ws-learned.bin"),
        "{again}"
    );
    let inspected = ok(s3.thaw(&vm, &["inspect", &url, "--json"], &[]));
    assert!(
        inspected["files"].to_string().contains(&learned_object),
        "{inspected}"
    );
    // Another host pulls the image with it.
    assert_pull_has_learned_set(&s3, &vm, &url, &pulled);
    // Two hosts publish at once: the one whose manifest write comes
    // second finds the manifest changed (If-Match), reads it again and
    // publishes over the other's version, which stays in the store for
    // restores that read the manifest before.
    let other_host = vm.dir.join("other-host");
    copy_image(&pulled, &other_host);
    // The same evidence in other bytes: another version.
    let evidence: Value =
        serde_json::from_slice(&std::fs::read(pulled.join("ws-evidence.json")).expect("evidence"))
            .expect("evidence JSON");
    std::fs::write(
        other_host.join("ws-evidence.json"),
        serde_json::to_vec(&evidence).expect("compact"),
    )
    .expect("write");
    let mut first = Command::new(env!("CARGO_BIN_EXE_thaw"));
    first
        .args([
            "push",
            other_host.to_str().expect("utf-8"),
            &url,
            "--working-sets",
            "--json",
        ])
        .env("THAW_RUNTIME_DIR", vm.dir.join("run"))
        .env("HOME", vm.dir.join("no-home"))
        .env("THAW_FAILPOINT", "publish-before-manifest:stop")
        .envs(s3.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let first = first.spawn().expect("spawn the first publish");
    let first_pid = nix::unistd::Pid::from_raw(i32::try_from(first.id()).expect("pid"));
    // Should the test fail while the publish is stopped, it goes on and
    // ends (SIGCONT is harmless to a process that runs).
    struct ContinueOnDrop(nix::unistd::Pid);
    impl Drop for ContinueOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let _continue = ContinueOnDrop(first_pid);
    // Returns once the publish stopped itself before its manifest write.
    let stopped = nix::sys::wait::waitpid(first_pid, Some(nix::sys::wait::WaitPidFlag::WUNTRACED))
        .expect("wait for the publish to stop");
    assert!(
        matches!(stopped, nix::sys::wait::WaitStatus::Stopped(..)),
        "{stopped:?}"
    );
    // Meanwhile the other publishes the evidence as it was.
    let meanwhile = vm.dir.join("meanwhile");
    copy_image(&pulled, &meanwhile);
    let mut changed = evidence.clone();
    changed["restores"]
        .as_array_mut()
        .expect("restores")
        .truncate(0);
    std::fs::write(
        meanwhile.join("ws-evidence.json"),
        serde_json::to_vec_pretty(&changed).expect("json"),
    )
    .expect("write");
    let second = ok(s3.thaw(
        &vm,
        &[
            "push",
            meanwhile.to_str().expect("utf-8"),
            &url,
            "--working-sets",
            "--json",
        ],
        &[],
    ));
    let second_object = second["published"][0]["object"]
        .as_str()
        .unwrap_or_else(|| panic!("{second}"))
        .to_string();
    nix::sys::signal::kill(first_pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let first = ok(first
        .wait_with_output()
        .expect("wait for the first publish"));
    assert_eq!(first["attempts"].as_u64(), Some(2), "{first}");
    let first_object = first["published"][0]["object"]
        .as_str()
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let inspected = ok(s3.thaw(&vm, &["inspect", &url, "--json"], &[]));
    let files = inspected["files"].to_string();
    assert!(
        files.contains(&first_object) && !files.contains(&second_object),
        "{inspected}"
    );
    let listed = text(&s3.curl(
        "GET",
        &format!(
            "?list-type=2&prefix={}",
            format!("{prefix}/").replace('/', "%2F")
        ),
        None,
    ));
    assert!(
        listed.contains(&second_object),
        "the version a manifest named a moment ago was removed: {listed}"
    );
    std::fs::remove_dir_all(&other_host).expect("rm");
    std::fs::remove_dir_all(&meanwhile).expect("rm");

    // Not an image of that store: nothing to publish it to.
    refused(
        &s3.thaw(&vm, &["restore", pulled_arg, "--publish-learned"], &[]),
        &["--working-sets"],
    );

    // A save into the store that fails once its pages are written (and
    // uploaded while written): the guest runs on, and nothing of the
    // image is left in the store.
    let cache = vm.dir.join("cache");
    let cache_env = [("THAW_CACHE_DIR", cache.to_str().expect("utf-8"))];
    let before = vm.wait_ticks(3);
    let failed_url = format!("s3://thaw-test/{prefix}-failed");
    refused(
        &s3.thaw(
            &vm,
            &["save", &vm.name, &failed_url],
            &[cache_env[0], ("THAW_FAILPOINT", "image-finish")],
        ),
        &["failpoint image-finish"],
    );
    vm.assert_continues_after(&before);
    let listed = text(&s3.curl(
        "GET",
        // (The query percent-encoded, as SigV4 signs it.)
        &format!(
            "?list-type=2&prefix={}",
            format!("{prefix}-failed/").replace('/', "%2F")
        ),
        None,
    ));
    assert!(
        !listed.contains("<Key>"),
        "a failed save left objects in the store: {listed}"
    );

    // Saved again straight into the store (through a staging directory
    // that is removed; the pages uploaded while they are written), and
    // restored straight from it, lazily: metadata and device state
    // first, the pages by ranged reads.
    let before = vm.wait_ticks(3);
    let lazy_url = format!("s3://thaw-test/{prefix}-lazy");
    let saved = ok(s3.thaw(&vm, &["save", &vm.name, &lazy_url, "--json"], &cache_env));
    assert_eq!(saved["pushed"]["url"], lazy_url.as_str(), "{saved}");
    let pages_len = saved["nonzero_pages"].as_u64().expect("nonzero_pages") * 4096;
    assert_eq!(
        saved["pushed"]["while_writing"].as_u64(),
        Some(pages_len),
        "the pages were not uploaded while the image was written: {saved}"
    );
    assert_eq!(
        std::fs::read_dir(cache.join("staging"))
            .expect("staging")
            .count(),
        0,
        "the staging directory was left behind"
    );
    // An image in the way is refused before any VM is touched.
    refused(
        &s3.thaw(&vm, &["save", &vm.name, &lazy_url], &cache_env),
        &["already there"],
    );
    // The restore learns, and publishes what it learned to the store.
    let stats = ok(s3.thaw(
        &vm,
        &[
            "restore",
            &lazy_url,
            "--mode",
            "lazy",
            "--publish-learned",
            "--learn-quiet-ms",
            "500",
            "--learn-max-ms",
            "3000",
            "--json",
        ],
        &cache_env,
    ));
    assert_eq!(stats["mode"], "lazy", "{stats}");
    assert!(stats["nonzero_pages"].as_u64() > Some(0), "{stats}");
    vm.assert_continues_after(&before);
    let learned = stats["publish"]["published"]
        .as_array()
        .and_then(|p| p.iter().find(|f| f["name"] == "ws-learned.bin"))
        .unwrap_or_else(|| panic!("the restore published no learned set: {stats}"))
        .clone();
    // Only the pages stayed in the store.
    let kept: Vec<_> = std::fs::read_dir(cache.join("store"))
        .expect("the cache")
        .filter_map(Result::ok)
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let local = kept[0].path();
    assert!(local.join("meta.json").is_file() && local.join("device.state").is_file());
    assert!(!local.join("pages.bin").exists());
    assert!(local.join("pages.remote").is_file());
    // The store has what this host learned, and knows it has it.
    let versions =
        std::fs::read_to_string(local.join(".store-versions.json")).expect("the store's versions");
    assert!(
        versions.contains(learned["xxh3"].as_str().expect("xxh3")),
        "{versions}"
    );
    assert_pull_has_learned_set(&s3, &vm, &lazy_url, &local);

    // The store stops answering in the middle of a restore from it (the
    // fill paced so that it is still running): the VM and its restore
    // record are kept, and `thaw recover` finishes once the store is back.
    let before = vm.wait_ticks(3);
    let outage_url = format!("s3://thaw-test/{prefix}-outage");
    ok(s3.thaw(&vm, &["save", &vm.name, &outage_url, "--json"], &cache_env));
    let mut restoring = Command::new(env!("CARGO_BIN_EXE_thaw"));
    restoring
        .args([
            "restore",
            &outage_url,
            "--mode",
            "lazy",
            "--no-learn",
            "--read-limit",
            "4M",
        ])
        .env("THAW_RUNTIME_DIR", vm.dir.join("run"))
        .env("HOME", vm.dir.join("no-home"))
        .env("RUST_LOG", "info")
        .envs(s3.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(cache_env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let restoring = restoring.spawn().expect("spawn thaw restore");
    let record = vm.runtime_file("restore.json");
    let waited = std::time::Instant::now();
    while !std::fs::read_to_string(&record).is_ok_and(|r| r.contains("\"resumed\": true")) {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(300),
            "the guest never resumed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    S3Server::script(&s3.dir, "stop");
    let out = restoring.wait_with_output().expect("wait for the restore");
    refused(&out, &["object store stopped answering", "thaw recover"]);
    assert!(
        vm.runtime_file("vm.json").exists() && vm.runtime_file("restore.json").exists(),
        "the VM or its restore record is gone"
    );
    let back = S3Server::script(&s3.dir, "up");
    assert!(back.status.success(), "{}", text(&back));
    ok(s3.thaw(&vm, &["recover", &vm.name, "--json"], &cache_env));
    vm.assert_continues_after(&before);

    // An incremental image into the store: refused until its parent is
    // there next to it; then saved straight into the store and restored
    // straight from it, the parent's pages read from the store too.
    let base = vm.dir.join("base");
    let base_arg = base.to_str().expect("utf-8");
    ok(s3.thaw(
        &vm,
        &["save", &vm.name, base_arg, "--keep-running", "--json"],
        &cache_env,
    ));
    let chain = format!("s3://thaw-test/{prefix}-chain");
    let child_url = format!("{chain}/child");
    refused(
        &s3.thaw(
            &vm,
            &["save", &vm.name, &child_url, "--parent", base_arg],
            &cache_env,
        ),
        &["must be in the store first", "thaw push"],
    );
    ok(s3.thaw(
        &vm,
        &["push", base_arg, &format!("{chain}/base"), "--json"],
        &[],
    ));
    let before = vm.wait_ticks(3);
    let child = ok(s3.thaw(
        &vm,
        &["save", &vm.name, &child_url, "--parent", base_arg, "--json"],
        &cache_env,
    ));
    assert!(child["inherited_pages"].as_u64() > Some(0), "{child}");
    std::fs::remove_dir_all(&base).expect("remove the local parent");
    std::fs::remove_dir_all(cache.join("store")).expect("empty the cache");
    let stats = ok(s3.thaw(
        &vm,
        &[
            "restore",
            &child_url,
            "--mode",
            "lazy",
            "--no-learn",
            "--json",
        ],
        &cache_env,
    ));
    assert!(
        stats["store_fetched"]["bytes"].as_u64() > Some(0),
        "no pages came from the store: {stats}"
    );
    vm.assert_continues_after(&before);
    vm.stop();

    // A damaged object (one byte changed, same length): refused by name,
    // nothing left locally.
    let mut state = std::fs::read(image.join("device.state")).expect("device.state");
    let middle = state.len() / 2;
    state[middle] ^= 0x40;
    let junk = vm.dir.join("junk");
    std::fs::write(&junk, &state).expect("write");
    s3.curl("PUT", &format!("{prefix}/device.state"), Some(&junk));
    let again = vm.dir.join("again");
    let again_arg = again.to_str().expect("utf-8");
    refused(
        &s3.thaw(&vm, &["pull", &url, again_arg], &[]),
        &["device.state", "content digest", "the manifest says"],
    );
    assert!(!again.exists());
    no_partials(&vm.dir);
    // A missing object (in an image pushed whole again).
    ok(s3.thaw(&vm, &["push", image_arg, &url, "--force", "--json"], &[]));
    s3.curl("DELETE", &format!("{prefix}/index.bin"), None);
    refused(
        &s3.thaw(&vm, &["pull", &url, again_arg], &[]),
        &["index.bin", "missing"],
    );
    assert!(!again.exists());

    // A push that died before its manifest leaves no image; the next push
    // completes it and removes what the dead one left.
    let second = format!("s3://thaw-test/{prefix}-2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"));
    child
        .args(["push", image_arg, &second])
        .env("THAW_RUNTIME_DIR", vm.dir.join("run"))
        .env("HOME", vm.dir.join("no-home"))
        .env("THAW_FAILPOINT", "push-before-manifest:hang")
        .env("RUST_LOG", "info")
        .envs(s3.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stderr(std::process::Stdio::piped());
    let mut child = child.spawn().expect("spawn thaw push");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut seen = String::new();
    {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while !seen.contains("failpoint push-before-manifest") {
            let n = stderr.read(&mut buf).expect("read the push's log");
            assert!(n > 0, "the push ended before its manifest: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    child.kill().expect("kill the push");
    child.wait().expect("reap the push");
    refused(
        &s3.thaw(&vm, &["pull", &second, again_arg], &[]),
        &["no complete image", "thaw-image.json"],
    );
    ok(s3.thaw(&vm, &["push", image_arg, &second, "--json"], &[]));
    ok(s3.thaw(&vm, &["pull", &second, again_arg, "--json"], &[]));
    no_partials(&vm.dir);

    // Wrong keys: refused, and the secret is never shown.
    let wrong = s3.thaw(
        &vm,
        &["inspect", &second],
        &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-shown")],
    );
    refused(&wrong, &[]);
    assert!(
        !text(&wrong).contains("wrong-secret-never-shown"),
        "{}",
        text(&wrong)
    );
    assert!(!text(&wrong).contains(s3.var("AWS_SECRET_ACCESS_KEY")));
    // A stopped store: a clear error, not a hang.
    s3.stop();
    let gone = s3.thaw(&vm, &["inspect", &second], &[]);
    refused(&gone, &[&second]);
}

/// The store at the far end of a slow link (`ci/store-link.sh`: two
/// network namespaces of this test's own, 30 ms round trip, 32 MB/s each
/// way): thaw runs in the client namespace, as on another host.
struct LinkStore {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

const LINK_NAME: &str = "thaw-e2e-link";
/// SeaweedFS's S3 port inside the store's namespace (`ci/store-link.sh`).
const LINK_STORE_PORT: &str = "18334";

impl LinkStore {
    fn start(dir: &Path, profile: &str) -> LinkStore {
        let dir = dir.join("s3-link");
        let out = LinkStore::script(&dir, &["up", profile]);
        if !out.status.success() {
            // Not left running for the next test to trip over.
            LinkStore::script(&dir, &["down"]);
            panic!("ci/store-link.sh up failed:\n{}", text(&out));
        }
        let env = exported(&LinkStore::script(&dir, &["env"]));
        assert!(
            env.iter()
                .any(|(k, v)| k == "AWS_ENDPOINT_URL" && v.contains("10.79.0.2")),
            "{env:?}"
        );
        LinkStore { dir, env }
    }

    fn script(dir: &Path, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(repo_root().join("ci/store-link.sh"))
            .args(args)
            .env("THAW_S3_DIR", dir)
            .env("THAW_LINK_NAME", LINK_NAME)
            .output()
            .expect("run ci/store-link.sh")
    }

    fn var(&self, key: &str) -> &str {
        lookup(&self.env, key)
    }

    /// `thaw ARGS` in the link's client namespace.
    fn thaw(&self, vm: &Vm, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{LINK_NAME}-client")])
            .arg(env!("CARGO_BIN_EXE_thaw"))
            .args(args)
            .env("THAW_RUNTIME_DIR", vm.dir.join("run"))
            .env("THAW_CACHE_DIR", vm.dir.join("link-cache"))
            .env("RUST_LOG", "info")
            .env("HOME", vm.dir.join("no-home"));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run thaw in the client namespace")
    }
}

impl Drop for LinkStore {
    fn drop(&mut self) {
        LinkStore::script(&self.dir, &["down"]);
    }
}

#[test]
fn a_vm_saved_across_a_slow_link_restores_lazily_from_there_intact() {
    let _one = one_store_test();
    let vm = Vm::boot("link", &GuestSpec::default());
    let link = LinkStore::start(&vm.dir, "far");
    let url = format!("s3://thaw-test/e2e/{}/link", std::process::id());
    // Saved across the link (its pages uploaded while written)...
    let before = vm.wait_ticks(3);
    let saved = ok(link.thaw(&vm, &["save", &vm.name, &url, "--json"]));
    assert!(
        saved["pushed"]["while_writing"].as_u64() > Some(0),
        "{saved}"
    );
    // ...and restored lazily from the other end: the guest runs before its
    // pages are there, and they all arrive, verified.
    let stats = ok(link.thaw(
        &vm,
        &["restore", &url, "--mode", "lazy", "--no-learn", "--json"],
    ));
    let fetched = stats["store_fetched"]["bytes"]
        .as_u64()
        .expect("store_fetched");
    assert!(
        fetched >= stats["nonzero_pages"].as_u64().expect("pages") * 4096 / 2,
        "the pages did not come from the store: {stats}"
    );
    assert!(
        stats["store_metadata"]["bytes"].as_u64() > Some(0),
        "{stats}"
    );
    vm.assert_continues_after(&before);
    vm.stop();
    // A damaged object at the far end is refused by name, and the VM is
    // not started: the device state flipped in the store (same length).
    let dev = vm.dir.join("link-cache/store");
    let cached: Vec<_> = std::fs::read_dir(&dev)
        .expect("the cache")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    let mut state = std::fs::read(cached[0].join("device.state")).expect("device.state");
    let middle = state.len() / 2;
    state[middle] ^= 0x40;
    let junk = vm.dir.join("junk-state");
    std::fs::write(&junk, &state).expect("write");
    std::fs::remove_dir_all(&dev).expect("empty the cache");
    let prefix = url.trim_start_matches("s3://thaw-test/");
    // Put straight into the store, in its own namespace (curl retries
    // what a store busy with the other tests may answer with a 5xx).
    let put = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{LINK_NAME}-store"),
            "curl",
            "-sS",
            "-f",
            "-X",
            "PUT",
        ])
        .args(["--retry", "5", "--retry-all-errors", "--retry-delay", "1"])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!(
            "{}:{}",
            link.var("AWS_ACCESS_KEY_ID"),
            link.var("AWS_SECRET_ACCESS_KEY")
        ))
        .args([
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "--data-binary",
        ])
        .arg(format!("@{}", junk.display()))
        .arg(format!(
            "http://127.0.0.1:{LINK_STORE_PORT}/thaw-test/{prefix}/device.state"
        ))
        .output()
        .expect("curl");
    assert!(put.status.success(), "{}", text(&put));
    refused(
        &link.thaw(&vm, &["restore", &url, "--mode", "lazy", "--no-learn"]),
        &["device.state", "content digest"],
    );
    assert!(
        !vm.runtime_file("vm.json").exists(),
        "a VM was started from a damaged image"
    );
}

/// `thaw bench --store`: the image and stock's stream go to the store,
/// every restore reads from there (stock after downloading its stream,
/// thaw's straight from the store, each from an empty cache), and the
/// report counts what each fetched and times one small request. The
/// learning restore ran under the workload's observer, and the learned
/// set it made is restored intact.
#[test]
fn the_bench_restores_from_a_store_and_counts_what_each_method_fetched() {
    let _one = one_store_test();
    let (name, dir) = Vm::workspace("store-bench");
    let cfg_path = crate::harness::small_bench_config(&name, &dir);
    let vm = Vm::attach(name, dir.clone());
    let s3 = S3Server::start(&dir);
    let url = format!("s3://thaw-test/e2e/{}/bench", std::process::id());
    let mut args = crate::harness::quick_bench_args(&cfg_path, &dir, "stock,ws:learned", 1500);
    args.extend([
        "--store".to_string(),
        url.clone(),
        "--no-limits".to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = s3.thaw(&vm, &args, &[]);
    let report = ok(out);
    let store = &report["store"];
    assert_eq!(store["url"], url.as_str(), "{store}");
    assert!(store["image_bytes"].as_u64() > Some(1 << 20), "{store}");
    assert!(store["stock_bytes"].as_u64() > Some(1 << 20), "{store}");
    assert!(store["request_ms"].as_f64() > Some(0.0), "{store}");
    let summary = report["summary"].as_array().expect("summary");
    for s in summary {
        assert!(s["store_requests"].as_f64() > Some(0.0), "{s}");
        assert!(s["store_mib"].as_f64() > Some(1.0), "{s}");
    }
    let learned = summary
        .iter()
        .find(|s| s["method"] == "ws:learned")
        .expect("ws:learned in the summary");
    assert!(learned["ws_pages"].as_f64() > Some(0.0), "{learned}");
    for run in report["runs"].as_array().expect("runs") {
        assert!(
            run["samples"].as_array().is_some_and(|s| !s.is_empty()),
            "no throughput reports after a {} restore",
            run["method"]
        );
    }
    let md = std::fs::read_to_string(dir.join("out/bench.md")).expect("bench.md");
    assert!(md.contains("Request: a 4 KiB ranged GET"), "{md}");
}
