//! `thaw bench --libvirt`: the same VM as a libvirt domain, and what a
//! libvirt user does today to restore it: `virsh save` + `virsh restore`
//! (a full migration stream behind libvirt's header), and on libvirt ≥ 10
//! `virsh save --image-format sparse --parallel-channels N` +
//! `virsh restore --parallel-channels N` (QEMU's mapped-ram format, loaded
//! by multifd channels). The stock methods run `virsh` itself, exactly as a user
//! would type it.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use thaw::config::{Accel, VmConfig};
use thaw::vmm::libvirt::LibvirtDomain;

use super::{BenchError, MethodRun};

/// Channels of the sparse (mapped-ram) save and restore: one per core here.
pub const PARALLEL_CHANNELS: u32 = 2;

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML for a bench VM config: its RAM a shared file backend
/// (per NUMA cell), direct kernel boot, the serial console into `serial`.
pub fn domain_xml(cfg: &VmConfig, accel: &str, serial: &Path) -> Result<String, BenchError> {
    if cfg.numa_nodes > cfg.cpus {
        return Err(BenchError::Libvirt(format!(
            "libvirt needs a vCPU per NUMA cell: the config has {} nodes and {} cpus",
            cfg.numa_nodes, cfg.cpus
        )));
    }
    let mib = cfg.memory.0 >> 20;
    let numa = if cfg.numa_nodes > 1 {
        let per = mib / u64::from(cfg.numa_nodes);
        let cells: String = (0..cfg.numa_nodes)
            .map(|i| {
                let cpu = i % cfg.cpus.max(1);
                format!(
                    "<cell id='{i}' cpus='{cpu}' memory='{per}' unit='MiB' memAccess='shared'/>"
                )
            })
            .collect();
        format!("<cpu><numa>{cells}</numa></cpu>")
    } else {
        String::new()
    };
    let path = |p: &Option<std::path::PathBuf>, tag: &str| {
        p.as_ref()
            .map(|p| format!("<{tag}>{}</{tag}>", xml_escape(&p.display().to_string())))
            .unwrap_or_default()
    };
    let kind = if accel == "kvm" || cfg.accel == Accel::Kvm {
        "kvm"
    } else {
        "qemu"
    };
    Ok(format!(
        "<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>{cpus}</vcpu>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  {numa}
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    {kernel}{initrd}<cmdline>{append}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{qemu}</emulator>
    <serial type='file'><source path='{serial}' append='on'/></serial>
    <memballoon model='virtio'/>
  </devices>
</domain>
",
        name = xml_escape(&cfg.name),
        cpus = cfg.cpus,
        machine = xml_escape(&cfg.machine),
        kernel = path(&cfg.kernel, "kernel"),
        initrd = path(&cfg.initrd, "initrd"),
        append = xml_escape(cfg.append.as_deref().unwrap_or("")),
        qemu = xml_escape(&which(&cfg.qemu)),
        serial = xml_escape(&serial.display().to_string()),
    ))
}

/// libvirt wants the emulator's full path.
fn which(program: &str) -> String {
    if program.contains('/') {
        return program.to_string();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .map_or_else(|| program.to_string(), |p| p.display().to_string())
}

/// Whether `virsh save` can write the sparse (mapped-ram) format.
pub fn virsh_has_sparse_save() -> bool {
    Command::new("virsh")
        .args(["help", "save"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--image-format"))
}

/// Starts the domain (running).
pub fn boot(uri: &str, xml: &str) -> Result<(), BenchError> {
    LibvirtDomain::create(uri, xml, false)
        .map(|_| ())
        .map_err(|e| BenchError::Libvirt(e.to_string()))
}

/// `virsh destroy NAME`, through the API; a domain that is not running
/// is fine.
pub fn destroy(uri: &str, name: &str) -> Result<(), BenchError> {
    match LibvirtDomain::open(uri, name) {
        Ok(d) if d.is_active() => d.destroy().map_err(|e| BenchError::Libvirt(e.to_string())),
        _ => Ok(()),
    }
}

fn virsh(uri: &str, args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .map_err(super::io("running virsh"))?;
    if !out.status.success() {
        return Err(BenchError::Libvirt(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `virsh save NAME FILE`, or with `sparse` the mapped-ram format written
/// by parallel channels. The domain is gone afterwards.
pub fn save(uri: &str, name: &str, file: &Path, sparse: bool) -> Result<(), BenchError> {
    let _ = std::fs::remove_file(file);
    let file = file
        .to_str()
        .ok_or_else(|| BenchError::Libvirt("non-UTF-8 path".into()))?;
    let channels = PARALLEL_CHANNELS.to_string();
    if sparse {
        virsh(
            uri,
            &[
                "save",
                name,
                file,
                "--image-format",
                "sparse",
                "--parallel-channels",
                &channels,
            ],
        )
    } else {
        virsh(uri, &["save", name, file])
    }
}

/// `virsh restore FILE` (with `sparse`: `--parallel-channels`), timed from `t0`;
/// virsh returns once the guest runs.
pub fn restore(uri: &str, file: &Path, sparse: bool, t0: Instant) -> Result<MethodRun, BenchError> {
    let path = file
        .to_str()
        .ok_or_else(|| BenchError::Libvirt("non-UTF-8 path".into()))?;
    let channels = PARALLEL_CHANNELS.to_string();
    if sparse {
        virsh(uri, &["restore", path, "--parallel-channels", &channels])?;
    } else {
        virsh(uri, &["restore", path])?;
    }
    Ok(MethodRun::stock(file, t0))
}
