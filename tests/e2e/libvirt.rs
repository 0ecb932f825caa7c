//! libvirt domains through a real libvirtd (`ci/setup-libvirt.sh`): thaw
//! saves, checkpoints and restores a domain that libvirt started, the domain
//! comes back under libvirt, survives a plain `virsh save`/`virsh restore`
//! round trip, and `virsh destroy` leaves nothing behind. Also: refusals,
//! two NUMA cells, recovery after a killed restore, and x-ignore-shared
//! switched off again after a failed or killed save.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, Vm};

const URI: &str = "qemu:///system";

/// What the test domain looks like.
struct DomainSpec {
    numa_cells: u32,
    /// `<access mode='shared'/>` in `<memoryBacking>`.
    shared: bool,
    /// `virsh define` + `virsh start` instead of `virsh create`.
    persistent: bool,
}

impl Default for DomainSpec {
    fn default() -> Self {
        DomainSpec {
            numa_cells: 0,
            shared: true,
            persistent: false,
        }
    }
}

/// A libvirt domain running the guest kit; destroyed on drop. `vm` runs
/// thaw with the test's own runtime directory and reads the console.
struct Domain {
    vm: Vm,
}

fn virsh_raw(args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("virsh runs (ci/setup-libvirt.sh installs it)")
}

fn virsh(args: &[&str]) -> String {
    let out = virsh_raw(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Domain {
    /// Writes the domain XML and starts it with `virsh create` (a transient
    /// domain, as `virsh restore` makes them); waits for the workload.
    fn create(test: &str, spec: &DomainSpec) -> Domain {
        assert!(
            virsh_raw(&["version"]).status.success(),
            "libvirtd is not reachable at {URI}: run ci/setup-libvirt.sh"
        );
        let kit = harness::guest_dir();
        let (name, dir) = Vm::workspace(&format!("lv-{test}"));
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(16 << 20))
            .expect("disk image");
        let numa = if spec.numa_cells == 0 {
            String::new()
        } else {
            let cells: String = (0..spec.numa_cells)
                .map(|i| {
                    format!(
                        "<cell id='{i}' cpus='{i}' memory='{}' unit='MiB' memAccess='shared'/>",
                        512 / spec.numa_cells
                    )
                })
                .collect();
            format!("<cpu><numa>{cells}</numa></cpu>")
        };
        let access = if spec.shared {
            "<access mode='shared'/>"
        } else {
            ""
        };
        let vcpus = spec.numa_cells.max(1);
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>{vcpus}</vcpu>
  <memoryBacking><source type='file'/>{access}</memoryBacking>
  {numa}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 thaw.mem=96M thaw.hot=8M thaw.tick_ms=100 thaw.full_every=5</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{console}' append='on'/></serial>
    <memballoon model='virtio'/>
  </devices>
</domain>
",
            kernel = kit.join("vmlinuz").display(),
            initrd = kit.join("initrd.img").display(),
            disk = disk.display(),
            console = dir.join("console.log").display(),
        );
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, xml).expect("write domain XML");
        if spec.persistent {
            virsh(&["define", xml_path.to_str().expect("utf-8")]);
            virsh(&["start", &name]);
        } else {
            virsh(&["create", xml_path.to_str().expect("utf-8")]);
        }
        let vm = Vm::attach(name, dir);
        let domain = Domain { vm };
        domain
            .vm
            .wait_for(Duration::from_secs(300), "the guest to be ready", |t| {
                t.contains("THAW-READY")
            });
        domain
    }

    fn name(&self) -> &str {
        &self.vm.name
    }

    /// `virsh domstate`, or "" when libvirt has no such domain.
    fn state(&self) -> String {
        let out = virsh_raw(&["domstate", self.name()]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn uuid(&self) -> String {
        virsh(&["domuuid", self.name()]).trim().to_string()
    }

    /// Whether the domain's QEMU has x-ignore-shared on (asked through
    /// libvirt, as a user would).
    fn ignore_shared(&self) -> bool {
        let out = virsh(&[
            "qemu-monitor-command",
            self.name(),
            r#"{"execute":"query-migrate-capabilities"}"#,
        ]);
        let v: Value = serde_json::from_str(&out).expect("QMP JSON");
        v["return"]
            .as_array()
            .expect("capabilities")
            .iter()
            .any(|c| c["capability"] == "x-ignore-shared" && c["state"] == true)
    }

    /// `thaw save NAME IMAGE --libvirt --json`; a transient domain is gone
    /// afterwards.
    fn save(&self, file: &str) -> PathBuf {
        let image = self.save_keeping_definition(file);
        assert_eq!(self.state(), "", "the domain is still there after the save");
        image
    }

    /// `thaw save NAME IMAGE --libvirt --json`.
    fn save_keeping_definition(&self, file: &str) -> PathBuf {
        let image = self.vm.dir.join(file);
        self.vm.thaw(&[
            "save",
            self.name(),
            image.to_str().expect("utf-8"),
            "--libvirt",
            "--json",
        ]);
        assert!(image.join("meta.json").is_file());
        image
    }

    /// The directory of libvirt's RAM files of running domains.
    fn ram_files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        walk(Path::new("/dev/shm/libvirt-ram"), &mut found);
        found
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(self.name()))
            .collect()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.clone());
        if p.is_dir() {
            walk(&p, out);
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh_raw(&["destroy", &self.vm.name]);
        // A persistent test domain goes too (a transient one is gone).
        let _ = virsh_raw(&["undefine", &self.vm.name]);
    }
}

/// QEMU processes of domain `name`, by their command line.
fn qemu_processes(name: &str) -> Vec<i32> {
    let needle = format!("guest={name},");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

#[test]
fn libvirt_domain_restores_under_libvirt_and_survives_virsh_save_restore() {
    let d = Domain::create("main", &DomainSpec::default());
    let uuid = d.uuid();
    let before = d.vm.wait_ticks(3);

    // Write tracking through /dev/userfaultfd handed to the unprivileged
    // QEMU; the save below stores its estimate.
    d.vm.thaw(&[
        "track",
        d.name(),
        "--libvirt",
        "--estimator",
        "dirty",
        "--duration-ms",
        "3000",
    ]);
    assert_eq!(d.state(), "running");

    // A checkpoint keeps the domain running and traces its working set.
    let cp = d.vm.dir.join("checkpoint");
    d.vm.thaw(&[
        "checkpoint",
        d.name(),
        cp.to_str().expect("utf-8"),
        "--libvirt",
        "--window-max-ms",
        "3000",
    ]);
    assert_eq!(d.state(), "running");
    assert!(
        !d.ignore_shared(),
        "x-ignore-shared left on by the checkpoint"
    );

    // Save, then a lazy restore over an emulated slow disk.
    let image = d.save("image");
    let info = d.vm.inspect(&image);
    assert_eq!(info["libvirt"]["name"], d.name(), "{info}");
    assert!(
        info["working_sets"]
            .as_array()
            .expect("working sets")
            .iter()
            .any(|w| w["estimator"] == "dirty" && w["pages"].as_u64() > Some(0)),
        "{info}"
    );
    let stats =
        d.vm.restore_with(&image, &["--mode", "lazy", "--read-limit", "16M"]);
    stats.assert_fields();
    assert_eq!(d.state(), "running");
    assert_eq!(d.uuid(), uuid, "the domain came back with another UUID");
    assert!(!d.ignore_shared(), "x-ignore-shared left on by the restore");
    d.vm.assert_continues_after(&before);
    let list: Value =
        serde_json::from_slice(&d.vm.thaw(&["list", "--json"]).stdout).expect("list JSON");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|v| v["name"] == d.name() && v["libvirt"] == URI),
        "{list}"
    );
    let dominfo = virsh(&["dominfo", d.name()]);
    // libvirt's words for the custom-argv taint.
    assert!(
        dominfo.contains("custom configuration parameters"),
        "{dominfo}"
    );

    // The older checkpoint, with its working set, replaces it.
    virsh(&["destroy", d.name()]);
    let nonce = before.nonce.clone();
    let stats = d.vm.restore_with(&cp, &["--mode", "ws"]);
    assert!(stats.u64("ws_pages") > 0, "{}", stats.json);
    assert_eq!(stats.json["estimator"], "trace");
    assert_eq!(d.state(), "running");
    d.vm.assert_keeps_ticking(&nonce, 10);

    // What a libvirt user does next: a plain virsh save and restore.
    let saved = d.vm.dir.join("virsh.save");
    virsh(&["save", d.name(), saved.to_str().expect("utf-8")]);
    assert_eq!(d.state(), "");
    // The image holds guest RAM (not a RAM-less x-ignore-shared stream).
    let size = std::fs::metadata(&saved).expect("virsh save image").len();
    assert!(size > 96 << 20, "virsh save wrote only {size} bytes");
    virsh(&["restore", saved.to_str().expect("utf-8")]);
    assert_eq!(d.state(), "running");
    d.vm.assert_keeps_ticking(&nonce, 10);

    // virsh destroy leaves nothing behind: no QEMU, no RAM file, and thaw
    // drops its record.
    virsh(&["destroy", d.name()]);
    assert_eq!(d.state(), "");
    let list: Value =
        serde_json::from_slice(&d.vm.thaw(&["list", "--json"]).stdout).expect("list JSON");
    assert!(
        !list
            .as_array()
            .expect("array")
            .iter()
            .any(|v| v["name"] == d.name()),
        "{list}"
    );
    assert!(!d.vm.runtime_file("vm.json").exists());
    assert_eq!(qemu_processes(d.name()), Vec::<i32>::new());
    assert_eq!(d.ram_files(), Vec::<PathBuf>::new());
}

#[test]
fn libvirt_refusals_name_what_to_change_and_leave_the_domain_running() {
    let d = Domain::create(
        "refuse",
        &DomainSpec {
            shared: false,
            ..Default::default()
        },
    );
    let image = d.vm.dir.join("image");
    let out = d.vm.thaw_raw(&[
        "save",
        d.name(),
        image.to_str().expect("utf-8"),
        "--libvirt",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("<access mode='shared'/>"), "{err}");
    assert!(!image.exists());
    assert_eq!(d.state(), "running");

    let out = d.vm.thaw_raw(&[
        "save",
        "no-such-domain-here",
        image.to_str().expect("utf-8"),
        "--libvirt",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no domain \"no-such-domain-here\""), "{err}");
}

#[test]
fn libvirt_failed_or_killed_save_leaves_x_ignore_shared_off() {
    let d = Domain::create("failsave", &DomainSpec::default());
    let before = d.vm.wait_ticks(3);
    let image = d.vm.dir.join("image");
    let image_arg = image.to_str().expect("utf-8");

    // A save that fails after the device state: the domain runs on as it
    // was, with x-ignore-shared off and no image.
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["save", d.name(), image_arg, "--libvirt"])
        .env("THAW_RUNTIME_DIR", d.vm.dir.join("run"))
        .env("THAW_FAILPOINT", "save-device-state")
        .output()
        .expect("run thaw");
    assert!(!out.status.success());
    assert!(!image.exists(), "a failed save left {}", image.display());
    assert_eq!(d.state(), "running");
    assert!(!d.ignore_shared());
    d.vm.assert_continues_after(&before);

    // A save killed while x-ignore-shared is on: the next thaw command
    // switches it off.
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["save", d.name(), image_arg, "--libvirt"])
        .env("THAW_RUNTIME_DIR", d.vm.dir.join("run"))
        .env("THAW_FAILPOINT", "save-device-state:hang")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn thaw");
    let stderr = child.stderr.take().expect("stderr");
    let reached = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("failpoint save-device-state: hanging"))
    });
    let started = Instant::now();
    while !reached.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "thaw never reached the failpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        reached.join().expect("reader"),
        "thaw exited before the failpoint"
    );
    child.kill().expect("SIGKILL thaw");
    let _ = child.wait();
    assert!(
        d.ignore_shared(),
        "the killed save had not switched x-ignore-shared on"
    );
    let out = d.vm.thaw(&["status", d.name(), "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["ignore_shared_may_be_on"], false, "{status}");
    assert!(!d.ignore_shared(), "thaw did not repair x-ignore-shared");
    // The killed save had paused the guest; resumed, it is intact.
    assert_eq!(d.state(), "paused");
    virsh(&["resume", d.name()]);
    d.vm.assert_keeps_ticking(&before.nonce, 10);
}

#[test]
fn libvirt_two_numa_cells_restore_and_recover_after_a_killed_restore() {
    let d = Domain::create(
        "numa",
        &DomainSpec {
            numa_cells: 2,
            ..Default::default()
        },
    );
    let before = d.vm.wait_ticks(3);
    let image = d.save("image");
    let info = d.vm.inspect(&image);
    assert_eq!(
        info["layout"]["blocks"].as_array().map(|b| b.len()),
        Some(2),
        "{info}"
    );
    // A slow restore, killed once the guest runs: `thaw recover` finishes it.
    let mut child = d.vm.slow_restore(&image, "2M", &[]);
    d.vm.wait_for(
        Duration::from_secs(300),
        "the restored guest to tick",
        |t| harness::parse_ticks(t).iter().any(|k| k.n > before.n + 2),
    );
    child.kill().expect("SIGKILL thaw");
    let _ = child.wait();
    let status: Value =
        serde_json::from_slice(&d.vm.thaw(&["status", d.name(), "--json"]).stdout).expect("JSON");
    assert_eq!(status["restore"], "interrupted", "{status}");
    d.vm.thaw(&["recover", d.name()]);
    assert_eq!(d.state(), "running");
    assert!(!d.ignore_shared());
    d.vm.assert_continues_after(&before);
}

#[test]
fn libvirt_persistent_domain_keeps_its_definition() {
    let d = Domain::create(
        "persist",
        &DomainSpec {
            persistent: true,
            ..Default::default()
        },
    );
    let before = d.vm.wait_ticks(3);
    let defined = virsh(&["dumpxml", "--inactive", d.name()]);
    let image = d.save_keeping_definition("image");
    // As after `virsh save`: stopped, still defined.
    assert_eq!(d.state(), "shut off");
    d.vm.restore_with(&image, &["--mode", "lazy"])
        .assert_fields();
    assert_eq!(d.state(), "running");
    let info = virsh(&["dominfo", d.name()]);
    assert!(info.contains("Persistent:     yes"), "{info}");
    d.vm.assert_continues_after(&before);
    // The restore's extra argument is in the live definition only.
    assert!(virsh(&["dumpxml", d.name()]).contains("-incoming"));
    assert_eq!(virsh(&["dumpxml", "--inactive", d.name()]), defined);
    // Saved and restored again by thaw: the argument does not pile up.
    let again = d.save_keeping_definition("again");
    d.vm.restore_with(&again, &["--mode", "ws"]).assert_fields();
    assert_eq!(
        virsh(&["dumpxml", d.name()]).matches("-incoming").count(),
        1
    );
    d.vm.assert_keeps_ticking(&before.nonce, 10);
    virsh(&["destroy", d.name()]);
    assert_eq!(d.state(), "shut off");
    assert_eq!(qemu_processes(d.name()), Vec::<i32>::new());
}
