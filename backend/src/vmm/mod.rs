//! Running QEMU for thaw: where a VM's runtime files live, the command line
//! thaw builds from a [`VmConfig`], launching (daemonized) and stopping QEMU,
//! the KVM probe behind `accel: auto`, and finding guest RAM inside QEMU.
//!
//! QEMU is reached only through a [`QemuProcess`] handle (a pidfd checked
//! against the start time recorded in `vm.json`), never by a bare pid.

pub mod libvirt;
pub mod qmp;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Accel, VmConfig};
use crate::mem::{HostAddr, RamLayout};
use crate::remote::process::{ProcessError, QemuProcess};
pub use qmp::{Qmp, QmpError};

/// Errors running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what} {path}: {source}")]
    Fs {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {0:?} is already running (see `thaw status {0}`)")]
    AlreadyRunning(String),
    #[error("no running VM named {0:?} (see `thaw list`)")]
    NotRunning(String),
    #[error("QEMU binary {0:?} not found: install qemu-system-x86 (>= 8.2) or set `qemu:` in the config")]
    MissingBinary(String),
    #[error("QEMU failed to start: {0}")]
    Launch(String),
    #[error(
        "QEMU {found} is too old: thaw needs >= 8.2 (x-ignore-shared with file-backed shared RAM)"
    )]
    TooOld { found: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("guest RAM block {id:?} ({path}) is not mapped in QEMU process {pid}")]
    RamNotFound { id: String, path: PathBuf, pid: i32 },
    #[error("QEMU (pid {0}) did not exit within {1:?}")]
    StuckQemu(i32, Duration),
    #[error("{0}")]
    Libvirt(String),
    #[error("{0} is a symbolic link; thaw refuses to follow it for guest RAM or runtime files: remove it")]
    Symlink(PathBuf),
    #[error("{path} belongs to uid {owner}, not to this user; thaw keeps guest RAM only in its own directories: remove it or set {var}")]
    ForeignDir {
        path: PathBuf,
        owner: u32,
        var: &'static str,
    },
}

/// Refuses a symbolic link at `path` (planted where thaw would create
/// guest RAM, an image or a runtime file).
pub fn refuse_symlink(path: &Path) -> Result<(), QemuError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(QemuError::Symlink(path.to_owned())),
        _ => Ok(()),
    }
}

pub(crate) fn fs_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> QemuError + 'a {
    move |source| QemuError::Fs {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Root of the runtime directories: `$THAW_RUNTIME_DIR` or `/run/thaw`.
pub fn runtime_root() -> PathBuf {
    std::env::var_os("THAW_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/run/thaw".into())
}

/// Root of the guest RAM files: `$THAW_SHM_DIR` or `/dev/shm/thaw`.
pub fn shm_root() -> PathBuf {
    std::env::var_os("THAW_SHM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/dev/shm/thaw".into())
}

/// Where one VM's runtime files are.
#[derive(Clone, Debug)]
pub struct VmPaths {
    pub name: String,
    /// `<runtime root>/<name>`, mode 0700.
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    /// The [`VmState`] record.
    pub state: PathBuf,
    /// The owner lock: held by whatever thaw operation ptraces QEMU or
    /// holds a userfaultfd on it (see `ops::owner`).
    pub lock: PathBuf,
    /// Default guest console log when the config sets no `serial`.
    pub default_serial: PathBuf,
    /// The serial console's input and output (a unix socket; its output is
    /// also logged to the `serial` file).
    pub console: PathBuf,
    /// A second QMP monitor for queries (`thaw status`, `thaw list`): QEMU
    /// serves one client per monitor, and a save or restore holds `qmp`.
    pub query: PathBuf,
    /// `<shm root>/<name>`: RAM files live here until QEMU has opened them.
    pub shm_dir: PathBuf,
}

impl VmPaths {
    pub fn new(name: &str) -> VmPaths {
        let dir = runtime_root().join(name);
        VmPaths {
            name: name.to_string(),
            qmp: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
            state: dir.join("vm.json"),
            lock: dir.join("lock"),
            default_serial: dir.join("serial.log"),
            console: dir.join("console.sock"),
            query: dir.join("query.sock"),
            shm_dir: shm_root().join(name),
            dir,
        }
    }

    /// The RAM file of memory backend `id`.
    pub fn ram_file(&self, id: &str) -> PathBuf {
        self.shm_dir.join(id)
    }
}

/// What thaw records about a running VM in its runtime directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub config: VmConfig,
    /// The accelerator actually in use (`kvm` or `tcg`).
    pub accel: String,
    pub layout: RamLayout,
    pub qemu_pid: i32,
    /// QEMU's start time in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`): with the pid it identifies QEMU, so a reused
    /// pid is never taken for it. 0 in records written before it was kept.
    #[serde(default)]
    pub qemu_start_time: u64,
    pub qemu_version: String,
    /// Guest console log.
    pub serial: PathBuf,
    /// Creation time (seconds since the epoch).
    pub started_unix: u64,
    /// Set for a libvirt domain: thaw did not start its QEMU and reaches
    /// it through libvirtd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<libvirt::LibvirtRecord>,
}

impl VmState {
    /// Loads the record of running VM `name`; a VM whose QEMU has gone is
    /// cleaned up and reported as not running.
    pub fn load(name: &str) -> Result<(VmPaths, VmState), QemuError> {
        crate::config::validate_name(name).map_err(|_| QemuError::NotRunning(name.to_string()))?;
        let paths = VmPaths::new(name);
        let text = match fs::read_to_string(&paths.state) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(QemuError::NotRunning(name.to_string()))
            }
            Err(e) => return Err(fs_err("cannot read", &paths.state)(e)),
        };
        let state: VmState = serde_json::from_str(&text).map_err(|e| QemuError::Fs {
            what: "corrupt VM record",
            path: paths.state.clone(),
            source: std::io::Error::other(e),
        })?;
        match state.qemu() {
            Ok(_) => Ok((paths, state)),
            Err(
                e @ (ProcessError::Gone { .. }
                | ProcessError::Reused { .. }
                | ProcessError::NotQemu { .. }),
            ) => {
                if state.libvirt.is_some() {
                    // libvirt stops and starts its domains itself.
                    log::info!(
                        "libvirt domain {name}: the QEMU thaw knew (pid {}) has exited; removing thaw's record",
                        state.qemu_pid
                    );
                } else {
                    log::warn!(
                        "QEMU of VM {name} (pid {}) has exited ({e}); removing its runtime files",
                        state.qemu_pid
                    );
                }
                remove_runtime(&paths);
                Err(QemuError::NotRunning(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A handle on this VM's QEMU, opened and checked against the recorded
    /// start time before anything is sent to it.
    pub fn qemu(&self) -> Result<QemuProcess, ProcessError> {
        QemuProcess::open_vm(&self.config.name, self.qemu_pid, self.qemu_start_time)
    }

    /// The RAM file of memory backend `id` (where QEMU opened it).
    pub fn ram_file(&self, paths: &VmPaths, id: &str) -> PathBuf {
        match &self.libvirt {
            Some(l) => l.ram_dir.join(id),
            None => paths.ram_file(id),
        }
    }

    /// A monitor session with this VM's QEMU: its QMP socket, or libvirtd
    /// for a libvirt domain.
    pub async fn monitor(&self, paths: &VmPaths) -> Result<Qmp, QemuError> {
        match &self.libvirt {
            Some(l) => {
                let domain = libvirt::LibvirtDomain::open(&l.uri, &l.name)
                    .map_err(|e| QemuError::Libvirt(e.to_string()))?;
                Ok(Qmp::libvirt(std::sync::Arc::new(domain)))
            }
            None => Ok(Qmp::connect(&paths.qmp).await?),
        }
    }

    /// Whether this VM's QEMU (the recorded process, not whatever has its
    /// pid now) is still running.
    pub fn qemu_alive(&self) -> bool {
        self.qemu().is_ok_and(|q| q.alive())
    }

    pub(crate) fn store(&self, paths: &VmPaths) -> Result<(), QemuError> {
        let tmp = paths.dir.join("vm.json.tmp");
        let text = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .map_err(fs_err("cannot encode", &tmp))?;
        write_private(&tmp, &text)?;
        fs::rename(&tmp, &paths.state).map_err(fs_err("cannot write", &paths.state))
    }
}

/// Names of all VMs with a runtime directory.
pub fn list_vms() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(runtime_root())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("vm.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Creates a file 0600 that must not exist yet, refusing symlinks.
pub fn create_private(path: &Path) -> Result<File, QemuError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(fs_err("cannot create", path))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), QemuError> {
    let _ = fs::remove_file(path);
    let mut f = create_private(path)?;
    f.write_all(data).map_err(fs_err("cannot write", path))
}

pub(crate) fn create_private_dir(path: &Path) -> Result<(), QemuError> {
    DirBuilder::new()
        .recursive(false)
        .mode(0o700)
        .create(path)
        .map_err(fs_err("cannot create directory", path))
}

pub(crate) fn ensure_root_dir(path: &Path) -> Result<(), QemuError> {
    refuse_symlink(path)?;
    if let Ok(m) = fs::symlink_metadata(path) {
        // /dev/shm is world-writable: someone else could have made the
        // directory first.
        let me = nix::unistd::geteuid().as_raw();
        if std::os::unix::fs::MetadataExt::uid(&m) != me {
            return Err(QemuError::ForeignDir {
                path: path.to_owned(),
                owner: std::os::unix::fs::MetadataExt::uid(&m),
                var: if path.starts_with(shm_root()) {
                    "THAW_SHM_DIR"
                } else {
                    "THAW_RUNTIME_DIR"
                },
            });
        }
    }
    ensure_dir(path)
}

/// Creates `path` (and its parents, 0700) if it does not exist.
fn ensure_dir(path: &Path) -> Result<(), QemuError> {
    if !path.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(fs_err("cannot create directory", path))?;
    }
    Ok(())
}

/// The run state of a VM through its query monitor, or `busy` if QEMU
/// does not answer within a few seconds (e.g. a migration holds it).
pub async fn query_run_state(paths: &VmPaths, state: &VmState) -> String {
    if let Some(l) = &state.libvirt {
        // libvirt's own view, without a monitor command.
        return match libvirt::LibvirtDomain::open(&l.uri, &l.name) {
            Ok(d) => tokio::task::spawn_blocking(move || d.state())
                .await
                .unwrap_or_else(|_| "unknown".into()),
            Err(e) => {
                log::debug!("querying {}: {e}", paths.name);
                "unknown".into()
            }
        };
    }
    let ask = async {
        let mut q = Qmp::connect(&paths.query).await?;
        q.run_state().await
    };
    match tokio::time::timeout(Duration::from_secs(5), ask).await {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => {
            log::debug!("querying {}: {e}", paths.name);
            "unknown".into()
        }
        Err(_) => "busy".into(),
    }
}

/// The process named by a pid file of VM `vm`, if it still runs and looks
/// like that VM's QEMU (no start time is known for it yet).
fn pidfile_process(pidfile: &Path, vm: &str) -> Option<QemuProcess> {
    let pid: i32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let process = QemuProcess::open(pid).ok()?;
    match process.check_looks_like_qemu(vm) {
        Ok(()) => Some(process),
        Err(e) => {
            log::warn!("ignoring {}: {e}", pidfile.display());
            None
        }
    }
}

/// Removes a VM's runtime directory and RAM directory (best effort).
pub fn remove_runtime(paths: &VmPaths) {
    for dir in [&paths.dir, &paths.shm_dir] {
        if let Err(e) = fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Resolves `accel: auto` by probing KVM; explicit choices are kept.
pub fn resolve_accel(cfg: &VmConfig) -> Result<&'static str, QemuError> {
    Ok(match cfg.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
        Accel::Auto => {
            if kvm_boots_guest(&cfg.qemu)? {
                "kvm"
            } else {
                "tcg"
            }
        }
    })
}

/// Firmware for the KVM probe, loaded as a 64 KiB BIOS at 0xF0000. Source
/// (GNU as, linked at 0 as a flat binary; reset vector `ljmp $0xF000,$0`):
///
/// ```text
/// .code16: cli; lgdtl %cs:gdtr; cr0 |= PE; ljmpl $0x08, pm32
/// .code32: ds = es = ss = 0x10; out 'P' to 0x3f8
///          PML4@0x1000 -> PDPT@0x2000 -> PD@0x3000, PD[0] = 2 MiB identity page
///          cr3 = 0x1000; cr4 |= PAE; EFER |= LME; cr0 |= PG; ljmp $0x18, lm64
/// .code64: out 'L' to 0x3f8; 1: hlt; jmp 1b
/// gdt: null, code32 0x00CF9A000000FFFF, data 0x00CF92000000FFFF,
///      code64 0x00AF9A000000FFFF; gdtr at offset 0xA8
/// ```
///
/// Real mode alone is not a test: paravirtualized KVM (PVM) runs real-mode
/// code and then fails as soon as a guest enters protected mode.
const KVM_PROBE_CODE: [u8; 0xAE] = [
    0xFA, 0x2E, 0x66, 0x0F, 0x01, 0x16, 0xA8, 0x00, 0x0F, 0x20, 0xC0, 0x66, 0x83, 0xC8, 0x01, 0x0F,
    0x22, 0xC0, 0x66, 0xEA, 0x1A, 0x00, 0x0F, 0x00, 0x08, 0x00, 0x66, 0xB8, 0x10, 0x00, 0x8E, 0xD8,
    0x8E, 0xC0, 0x8E, 0xD0, 0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x50, 0xEE, 0xC7, 0x05, 0x00, 0x10, 0x00,
    0x00, 0x03, 0x20, 0x00, 0x00, 0xC7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03, 0x30, 0x00, 0x00, 0xC7,
    0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00, 0x00, 0xB8, 0x00, 0x10, 0x00, 0x00, 0x0F, 0x22,
    0xD8, 0x0F, 0x20, 0xE0, 0x83, 0xC8, 0x20, 0x0F, 0x22, 0xE0, 0xB9, 0x80, 0x00, 0x00, 0xC0, 0x0F,
    0x32, 0x0D, 0x00, 0x01, 0x00, 0x00, 0x0F, 0x30, 0x0F, 0x20, 0xC0, 0x0D, 0x00, 0x00, 0x00, 0x80,
    0x0F, 0x22, 0xC0, 0xEA, 0x7A, 0x00, 0x0F, 0x00, 0x18, 0x00, 0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x4C,
    0xEE, 0xF4, 0xEB, 0xFD, 0x8D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00,
    0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xAF, 0x00, 0x1F, 0x00, 0x88, 0x00, 0x0F, 0x00,
];
/// `ljmp $0xF000, $0` at the reset vector (0xFFFF0).
const KVM_PROBE_RESET: [u8; 5] = [0xEA, 0x00, 0x00, 0x00, 0xF0];

/// Whether KVM can really run a guest here: boots a 64 KiB firmware that
/// enters long mode and writes `L` to the serial port ([`KVM_PROBE_CODE`]).
/// `/dev/kvm` existing is not enough (some hosts only run paravirtualized
/// guests).
pub fn kvm_boots_guest(qemu: &str) -> Result<bool, QemuError> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(false);
    }
    let ok = probe_firmware_runs(qemu, "kvm", Duration::from_secs(5))?;
    log::info!(
        "KVM probe: {}",
        if ok {
            "guest reached long mode, using kvm"
        } else {
            "guest did not reach long mode, using tcg"
        }
    );
    Ok(ok)
}

/// Boots the probe firmware under `accel`; true once it printed `L` within
/// `within`.
fn probe_firmware_runs(qemu: &str, accel: &str, within: Duration) -> Result<bool, QemuError> {
    let dir = tempdir_in_runtime()?;
    let bios = dir.join("probe.bin");
    let out = dir.join("probe.out");
    let mut image = vec![0u8; 64 << 10];
    image[..KVM_PROBE_CODE.len()].copy_from_slice(&KVM_PROBE_CODE);
    let at = image.len() - 16;
    image[at..at + KVM_PROBE_RESET.len()].copy_from_slice(&KVM_PROBE_RESET);
    fs::write(&bios, &image).map_err(fs_err("cannot write", &bios))?;
    let mut child = std::process::Command::new(qemu)
        .args([
            "-accel",
            accel,
            "-machine",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-bios",
        ])
        .arg(&bios)
        .arg("-chardev")
        .arg(format!("file,id=probe,path={}", out.display()))
        .args(["-serial", "chardev:probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => QemuError::MissingBinary(qemu.to_string()),
            _ => QemuError::Launch(e.to_string()),
        })?;
    let mut ok = false;
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if fs::read(&out).is_ok_and(|b| b.contains(&b'L')) {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_dir_all(&dir);
    Ok(ok)
}

fn tempdir_in_runtime() -> Result<PathBuf, QemuError> {
    let root = runtime_root();
    ensure_root_dir(&root)?;
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!(".probe-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    create_private_dir(&dir)?;
    Ok(dir)
}

/// Builds QEMU's argument list for `cfg`: thaw's RAM backends, QMP socket,
/// pid file and serial chardev, then the user's settings. `incoming` adds
/// `-incoming defer -S` for a restore.
pub fn command_line(
    cfg: &VmConfig,
    accel: &str,
    paths: &VmPaths,
    serial: &Path,
    incoming: bool,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},process=thaw-{}", cfg.name, cfg.name)]);
    push(&["-accel", accel]);
    let nodes = cfg.numa_nodes;
    let size = cfg.backend_size();
    if nodes == 1 {
        push(&["-machine", &format!("{},memory-backend=ram0", cfg.machine)]);
    } else {
        push(&["-machine", &cfg.machine]);
    }
    push(&["-m", &format!("{}M", cfg.memory.0 >> 20)]);
    push(&["-smp", &cfg.cpus.to_string()]);
    for i in 0..nodes {
        let id = format!("ram{i}");
        let file = paths.ram_file(&id);
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id={id},size={size},share=on,mem-path={}",
                file.display()
            ),
        ]);
        if nodes > 1 {
            push(&["-numa", &format!("node,nodeid={i},memdev={id}")]);
        }
    }
    if let Some(k) = &cfg.kernel {
        push(&["-kernel", &k.display().to_string()]);
    }
    if let Some(i) = &cfg.initrd {
        push(&["-initrd", &i.display().to_string()]);
    }
    if let Some(ap) = &cfg.append {
        push(&["-append", ap]);
    }
    push(&["-nodefaults", "-display", "none"]);
    // The serial console: its output is appended to the log whether or not
    // anyone is connected, and the socket takes input (`thaw bench`'s probes).
    push(&[
        "-chardev",
        &format!(
            "socket,id=thaw-serial,path={},server=on,wait=off,logfile={},logappend=on",
            paths.console.display(),
            serial.display()
        ),
    ]);
    push(&["-serial", "chardev:thaw-serial"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.qmp.display()),
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.query.display()),
    ]);
    push(&["-pidfile", &paths.pidfile.display().to_string()]);
    push(&["-daemonize"]);
    if incoming {
        push(&["-incoming", "defer", "-S"]);
    }
    a.extend(cfg.extra_args.iter().cloned());
    a
}

/// A QEMU process thaw launched, with its QMP session.
pub struct Launched {
    pub paths: VmPaths,
    pub state: VmState,
    pub qmp: Qmp,
}

/// Starts QEMU daemonized for `cfg` with fresh, empty RAM files; returns once
/// QMP answers. The RAM files are unlinked as soon as QEMU holds them open.
pub async fn launch(cfg: &VmConfig, accel: &str, incoming: bool) -> Result<Launched, QemuError> {
    let paths = VmPaths::new(&cfg.name);
    ensure_root_dir(&runtime_root())?;
    ensure_root_dir(&shm_root())?;
    refuse_symlink(&paths.dir)?;
    refuse_symlink(&paths.shm_dir)?;
    // Before anything is created: a QEMU too old for thaw is refused here.
    if let Some(version) = binary_version(&cfg.qemu).await? {
        check_version(&version)?;
    }
    if paths.state.exists() {
        match VmState::load(&cfg.name) {
            Ok(_) => return Err(QemuError::AlreadyRunning(cfg.name.clone())),
            Err(QemuError::NotRunning(_)) => {}
            Err(e) => return Err(e),
        }
    }
    // Leftovers of a VM that died before writing its record.
    if paths.dir.exists() {
        if pidfile_process(&paths.pidfile, &cfg.name).is_some_and(|p| p.alive()) {
            return Err(QemuError::AlreadyRunning(cfg.name.clone()));
        }
        remove_runtime(&paths);
    }
    create_private_dir(&paths.dir)?;
    let result = launch_in(cfg, accel, incoming, paths.clone()).await;
    if result.is_err() {
        if let Some(qemu) = pidfile_process(&paths.pidfile, &cfg.name) {
            if let Err(e) = qemu.kill() {
                log::warn!("cannot stop the QEMU of a failed launch: {e}");
            }
        }
        remove_runtime(&paths);
    }
    result
}

async fn launch_in(
    cfg: &VmConfig,
    accel: &str,
    incoming: bool,
    paths: VmPaths,
) -> Result<Launched, QemuError> {
    let _ = fs::remove_dir_all(&paths.shm_dir);
    create_private_dir(&paths.shm_dir)?;
    let layout =
        RamLayout::from_sizes((0..cfg.numa_nodes).map(|i| (format!("ram{i}"), cfg.backend_size())));
    for block in &layout.blocks {
        create_private(&paths.ram_file(&block.id))?;
    }
    let serial = cfg
        .serial
        .clone()
        .unwrap_or_else(|| paths.default_serial.clone());
    if let Some(parent) = serial.parent() {
        ensure_dir(parent)?;
    }
    let args = command_line(cfg, accel, &paths, &serial, incoming);
    log::debug!("launching {} {}", cfg.qemu, args.join(" "));
    let mut command = tokio::process::Command::new(&cfg.qemu);
    command.args(&args).stdin(Stdio::null());
    // SAFETY: umask(2) is async-signal-safe and touches no memory; it runs
    // in the child between fork and exec. QEMU then creates its QMP and
    // console sockets, console log and pid file for the owner only.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    let out = command.output().await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => QemuError::MissingBinary(cfg.qemu.clone()),
        _ => QemuError::Launch(format!("{}: {e}", cfg.qemu)),
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(QemuError::Launch(if msg.is_empty() {
            format!("exit status {}", out.status)
        } else {
            msg
        }));
    }
    let pid: i32 = fs::read_to_string(&paths.pidfile)
        .map_err(fs_err("cannot read", &paths.pidfile))?
        .trim()
        .parse()
        .map_err(|_| QemuError::Launch("QEMU wrote an unreadable pid file".into()))?;
    // Held by pidfd from here on; its start time goes into the record.
    let qemu = QemuProcess::open(pid)?;
    qemu.check_looks_like_qemu(&cfg.name)?;
    // QEMU has the RAM files open and mapped: unlink them so nothing leaks.
    remove_dir_files(&paths.shm_dir);
    // QEMU's daemonizing sets umask 027: the sockets and the console log
    // are the owner's alone (the runtime directory is 0700 anyway).
    for f in [
        &paths.qmp,
        &paths.query,
        &paths.console,
        &paths.pidfile,
        &serial,
    ] {
        if let Err(e) = fs::set_permissions(f, fs::Permissions::from_mode(0o600)) {
            log::warn!("cannot make {} private: {e}", f.display());
        }
    }
    let mut qmp = Qmp::connect(&paths.qmp).await?;
    let qemu_version = qmp.version().await?;
    check_version(&qemu_version)?;
    let state = VmState {
        config: cfg.clone(),
        accel: accel.to_string(),
        layout,
        qemu_pid: pid,
        qemu_start_time: qemu.start_time(),
        qemu_version,
        serial,
        started_unix: now_unix(),
        libvirt: None,
    };
    check_memdevs(&mut qmp, &state.layout).await?;
    state.store(&paths)?;
    Ok(Launched { paths, state, qmp })
}

/// Seconds since the epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn remove_dir_files(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        log::warn!("cannot remove {}: {e}", dir.display());
    }
}

/// The version `qemu -version` reports (`QEMU emulator version X.Y.Z ...`);
/// None if its output does not say.
pub async fn binary_version(qemu: &str) -> Result<Option<String>, QemuError> {
    let out = tokio::process::Command::new(qemu)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => QemuError::MissingBinary(qemu.to_string()),
            _ => QemuError::Launch(format!("{qemu} -version: {e}")),
        })?;
    Ok(parse_version_banner(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_version_banner(text: &str) -> Option<String> {
    let rest = text.split("version ").nth(1)?;
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Refuses QEMU older than 8.2 (x-ignore-shared skipping file-backed RAM).
pub fn check_version(version: &str) -> Result<(), QemuError> {
    let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (major, minor) < (8, 2) {
        return Err(QemuError::TooOld {
            found: version.to_string(),
        });
    }
    Ok(())
}

/// Checks QEMU's memory backends against the expected layout.
pub(crate) async fn check_memdevs(qmp: &mut Qmp, layout: &RamLayout) -> Result<(), QemuError> {
    let devs = qmp.execute("query-memdev", json!({})).await?;
    for block in &layout.blocks {
        let found = devs
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["id"].as_str() == Some(block.id.as_str()));
        match found {
            Some(d)
                if d["size"].as_u64() == Some(block.size) && d["share"].as_bool() == Some(true) => {
            }
            Some(d) => {
                return Err(QemuError::Launch(format!(
                    "memory backend {} is {d}, expected a shared backend of {} bytes",
                    block.id, block.size
                )))
            }
            None => {
                return Err(QemuError::Launch(format!(
                    "QEMU has no memory backend {}",
                    block.id
                )))
            }
        }
    }
    Ok(())
}

/// One RAM block as QEMU has it: its mapping and its file descriptor.
#[derive(Clone, Debug)]
pub struct RamMapping {
    pub id: String,
    pub start: HostAddr,
    pub len: u64,
    /// `/proc/<pid>/fd/<n>`: opens QEMU's RAM file even after it was unlinked.
    pub fd_path: PathBuf,
}

/// Fails if `qemu` has exited: what was read through its `/proc` entries
/// before (its RAM files' fds) was its own only while it lived.
pub fn ensure_alive(qemu: &QemuProcess) -> Result<(), QemuError> {
    if qemu.alive() {
        return Ok(());
    }
    Err(QemuError::from(ProcessError::Gone {
        pid: qemu.pid().as_raw(),
    }))
}

/// Finds every block of `layout` in QEMU's address space (`/proc/<pid>/maps`)
/// and file table (`/proc/<pid>/fd`), by RAM file path. What was read
/// belongs to `qemu`: it is checked to be alive afterwards (its pidfd is
/// held, so its pid cannot have been reused meanwhile). Whoever opens a
/// returned `fd_path` checks the same after opening it.
pub fn find_ram(
    qemu: &QemuProcess,
    paths: &VmPaths,
    state: &VmState,
) -> Result<Vec<RamMapping>, QemuError> {
    let layout = &state.layout;
    let pid = qemu.pid().as_raw();
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = fs::read_to_string(&maps_path).map_err(fs_err("cannot read", &maps_path))?;
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let fds: Vec<(PathBuf, String)> = fs::read_dir(&fd_dir)
        .map_err(fs_err("cannot read", &fd_dir))?
        .flatten()
        .filter_map(|e| {
            fs::read_link(e.path())
                .ok()
                .map(|t| (e.path(), t.to_string_lossy().into_owned()))
        })
        .collect();
    let mut out = Vec::new();
    for block in &layout.blocks {
        let file = state
            .ram_file(paths, &block.id)
            .to_string_lossy()
            .into_owned();
        let deleted = format!("{file} (deleted)");
        let same = |t: &str| t == file || t == deleted;
        let not_found = || QemuError::RamNotFound {
            id: block.id.clone(),
            path: file.clone().into(),
            pid,
        };
        let mapping = maps
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(6, ' ');
                let range = parts.next()?;
                let path = parts.nth(4)?.trim_start();
                same(path).then_some(range)
            })
            .filter_map(|range| {
                let (s, e) = range.split_once('-')?;
                let (s, e) = (
                    u64::from_str_radix(s, 16).ok()?,
                    u64::from_str_radix(e, 16).ok()?,
                );
                Some((s, e - s))
            })
            .find(|&(_, len)| len == block.size)
            .ok_or_else(not_found)?;
        let fd_path = fds
            .iter()
            .find(|(_, t)| same(t))
            .map(|(p, _)| p.clone())
            .ok_or_else(not_found)?;
        out.push(RamMapping {
            id: block.id.clone(),
            start: HostAddr(mapping.0),
            len: mapping.1,
            fd_path,
        });
    }
    if !qemu.alive() {
        return Err(QemuError::Process(ProcessError::Gone { pid }));
    }
    Ok(out)
}

/// Stops a VM: `quit` over QMP (or SIGKILL through QEMU's pidfd when
/// `force` or QMP fails), waits for QEMU to exit, removes the runtime
/// files. A QEMU that has gone already only has its files removed; a pid
/// now held by another process is reported and left alone.
pub async fn stop(paths: &VmPaths, state: &VmState, force: bool) -> Result<(), QemuError> {
    let qemu = match state.qemu() {
        Ok(q) => q,
        Err(ProcessError::Gone { .. }) => {
            remove_runtime(paths);
            return Ok(());
        }
        Err(e @ (ProcessError::Reused { .. } | ProcessError::NotQemu { .. })) => {
            remove_runtime(paths);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let pid = state.qemu_pid;
    if let Some(l) = &state.libvirt {
        // libvirt's QEMU is stopped by libvirt (`virsh destroy`), which
        // cleans up after it; thaw's record goes.
        let destroyed = libvirt::LibvirtDomain::open(&l.uri, &l.name).and_then(|d| d.destroy());
        if let Err(e) = destroyed {
            if qemu.alive() {
                return Err(QemuError::Libvirt(e.to_string()));
            }
        }
        if !qemu.wait_exit(Duration::from_secs(30)).await {
            return Err(QemuError::StuckQemu(pid, Duration::from_secs(30)));
        }
        remove_runtime(paths);
        return Ok(());
    }
    let mut quit_sent = false;
    if !force {
        if let Ok(mut qmp) = Qmp::connect(&paths.qmp).await {
            quit_sent = qmp.execute("quit", json!({})).await.is_ok() || !qemu.alive();
        }
    }
    if !quit_sent || !qemu.wait_exit(Duration::from_secs(30)).await {
        qemu.kill()?;
        if !qemu.wait_exit(Duration::from_secs(10)).await {
            return Err(QemuError::StuckQemu(pid, Duration::from_secs(40)));
        }
    }
    remove_runtime(paths);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_firmware_reaches_long_mode_under_tcg() {
        // The same firmware decides `accel: auto`; under TCG it must print
        // `L`, or a host with working KVM would be misjudged.
        let ran = probe_firmware_runs("qemu-system-x86_64", "tcg", Duration::from_secs(120))
            .expect("qemu-system-x86_64 runs");
        assert!(ran, "the probe firmware did not reach long mode under TCG");
    }

    #[test]
    fn old_qemu_is_refused() {
        assert!(check_version("7.2.11").is_err());
        assert!(check_version("8.1.0").is_err());
        assert!(check_version("8.2.0").is_ok());
        assert!(check_version("10.0.2").is_ok());
        assert_eq!(
            parse_version_banner("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some("10.0.2".to_string())
        );
        assert_eq!(parse_version_banner("something else"), None);
    }
}
