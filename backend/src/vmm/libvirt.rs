//! libvirt domains as thaw VMs: a connection to libvirtd and a handle on one
//! domain (through the `virt` binding of libvirt's C API), the checks a
//! domain's XML must pass before thaw takes its RAM over, the XML a restore
//! starts the domain from (paused, waiting for an incoming device state),
//! and the record thaw keeps about a domain it handles.
//!
//! What libvirt marks: commands thaw sends to QEMU through libvirtd taint
//! the domain `custom-monitor`; a domain thaw restored was started with a
//! `<qemu:commandline>` argument (`-incoming defer`) and is tainted
//! `custom-argv`.
//!
//! The one dangerous setting is `x-ignore-shared`: left on, a later
//! `virsh save` writes an image without guest RAM and destroys the domain.
//! thaw marks the domain's runtime directory before switching it on
//! ([`IgnoreSharedMark`]) and clears the mark once it is off again; a later
//! thaw command repairs a domain whose mark a killed thaw left behind
//! ([`repair_ignore_shared`]).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use virt::connect::Connect;
use virt::domain::Domain;

/// libvirt's URI for the system QEMU driver, the default of `--connect`.
pub const DEFAULT_URI: &str = "qemu:///system";
/// The namespace of `<qemu:commandline>`.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// Where libvirt's system QEMU driver keeps pid files.
const SYSTEM_PID_DIR: &str = "/run/libvirt/qemu";
/// The mark of a domain whose QEMU may have `x-ignore-shared` on.
const IGNORE_SHARED_MARK: &str = "ignore-shared.on";

/// Errors handling a libvirt domain.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt at {uri} has no domain {name:?} (see `virsh list --all`)")]
    NoDomain { uri: String, name: String },
    #[error("libvirt domain {name}: {message}")]
    Call { name: String, message: String },
    #[error("QEMU refused: {class}: {desc}")]
    Qmp { class: String, desc: String },
    /// One sentence naming what to change.
    #[error("libvirt domain {name}: {reason}")]
    Refused { name: String, reason: String },
    #[error("domain XML: {0}")]
    Xml(String),
    #[error("libvirt domain {0} is not running")]
    NotRunning(String),
    #[error("{what} {path}: {source}")]
    Fs {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn call_err(name: &str) -> impl FnOnce(virt::error::Error) -> LibvirtError + '_ {
    move |e| LibvirtError::Call {
        name: name.to_string(),
        message: e.message().to_string(),
    }
}

/// What thaw records about a libvirt domain it handles (in `vm.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtRecord {
    /// The connection URI (`qemu:///system`).
    pub uri: String,
    /// The domain's name and UUID.
    pub name: String,
    pub uuid: String,
    /// The directory of the domain's RAM files (libvirt's
    /// `memory_backing_dir/…/<id>-<name>`).
    pub ram_dir: PathBuf,
}

/// What an image of a libvirt domain keeps to bring it back under libvirt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtImage {
    pub uri: String,
    pub name: String,
    pub uuid: String,
    /// The domain's migratable XML when it was saved.
    pub xml: String,
}

/// A connection to libvirtd and one of its domains.
pub struct LibvirtDomain {
    // Field order: the domain is released before its connection.
    domain: Domain,
    _conn: Connect,
    pub uri: String,
    pub name: String,
    pub uuid: String,
}

impl std::fmt::Debug for LibvirtDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "libvirt domain {} ({})", self.name, self.uri)
    }
}

fn connect(uri: &str) -> Result<Connect, LibvirtError> {
    // libvirt prints every error to stderr unless told not to; thaw
    // reports the errors it does not expect itself.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(virt::error::clear_error_callback);
    Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
        uri: uri.to_string(),
        message: e.message().to_string(),
    })
}

impl LibvirtDomain {
    /// Looks up domain `name` at `uri`.
    pub fn open(uri: &str, name: &str) -> Result<LibvirtDomain, LibvirtError> {
        let conn = connect(uri)?;
        let domain = conn
            .lookup_domain_by_name(name)
            .map_err(|_| LibvirtError::NoDomain {
                uri: uri.to_string(),
                name: name.to_string(),
            })?;
        Self::wrap(conn, domain, uri)
    }

    fn wrap(conn: Connect, domain: Domain, uri: &str) -> Result<LibvirtDomain, LibvirtError> {
        let name = domain.name().map_err(call_err("?"))?;
        let uuid = domain.uuid_string().map_err(call_err(&name))?;
        Ok(LibvirtDomain {
            domain,
            _conn: conn,
            uri: uri.to_string(),
            name,
            uuid,
        })
    }

    /// Starts a transient domain from `xml` (`virDomainCreateXML`, as
    /// `virsh create`), paused (`VIR_DOMAIN_START_PAUSED`) or running. A
    /// persistent domain of the same name and UUID runs with this XML as
    /// its live definition.
    pub fn create(uri: &str, xml: &str, paused: bool) -> Result<LibvirtDomain, LibvirtError> {
        let conn = connect(uri)?;
        let flags = if paused {
            virt::sys::VIR_DOMAIN_START_PAUSED
        } else {
            virt::sys::VIR_DOMAIN_NONE
        };
        let domain = conn
            .create_domain_xml(xml, flags)
            .map_err(|e| LibvirtError::Call {
                name: inspect_name(xml).unwrap_or_default(),
                message: e.message().to_string(),
            })?;
        Self::wrap(conn, domain, uri)
    }

    pub fn is_active(&self) -> bool {
        self.domain.is_active().unwrap_or(false)
    }

    /// The domain's XML: migratable (what `virsh save` keeps) or live.
    pub fn xml(&self, migratable: bool) -> Result<String, LibvirtError> {
        let flags = if migratable {
            virt::sys::VIR_DOMAIN_XML_MIGRATABLE | virt::sys::VIR_DOMAIN_XML_SECURE
        } else {
            0
        };
        self.domain.xml_desc(flags).map_err(call_err(&self.name))
    }

    pub fn suspend(&self) -> Result<(), LibvirtError> {
        self.domain.suspend().map_err(call_err(&self.name))
    }

    pub fn resume(&self) -> Result<(), LibvirtError> {
        self.domain.resume().map_err(call_err(&self.name))
    }

    /// Stops the domain's QEMU at once (`virsh destroy`).
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        self.domain.destroy().map_err(call_err(&self.name))
    }

    /// libvirt's state of the domain: `running`, `paused`, `shut off`, ...
    pub fn state(&self) -> String {
        let mut state: libc::c_int = -1;
        let mut reason: libc::c_int = -1;
        // SAFETY: the domain pointer is valid while `self` lives; libvirt
        // writes two ints through the pointers, which outlive the call.
        let rc = unsafe {
            virt::sys::virDomainGetState(self.domain.as_ptr(), &mut state, &mut reason, 0)
        };
        if rc < 0 {
            return "unknown".into();
        }
        match u32::try_from(state).unwrap_or(u32::MAX) {
            virt::sys::VIR_DOMAIN_RUNNING => "running",
            virt::sys::VIR_DOMAIN_PAUSED => "paused",
            virt::sys::VIR_DOMAIN_SHUTOFF => "shut off",
            virt::sys::VIR_DOMAIN_SHUTDOWN => "shutting down",
            virt::sys::VIR_DOMAIN_CRASHED => "crashed",
            virt::sys::VIR_DOMAIN_BLOCKED => "blocked",
            virt::sys::VIR_DOMAIN_PMSUSPENDED => "pmsuspended",
            _ => "unknown",
        }
        .into()
    }

    /// Runs one QMP command in the domain's QEMU through libvirtd,
    /// attaching `fd` if given (`virDomainQemuMonitorCommandWithFiles`).
    /// Returns the command's `return` value.
    pub fn monitor_command(
        &self,
        command: &str,
        arguments: &Value,
        fd: Option<&OwnedFd>,
    ) -> Result<Value, LibvirtError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments.clone();
        }
        let cmd = CString::new(msg.to_string())
            .map_err(|_| LibvirtError::Xml("a QMP command with a NUL byte".into()))?;
        let mut result: *mut libc::c_char = std::ptr::null_mut();
        let mut files = fd.map(|f| vec![f.as_raw_fd()]).unwrap_or_default();
        let count = libc::c_uint::try_from(files.len()).unwrap_or(0);
        // SAFETY: the domain pointer is valid while `self` lives; `cmd` is a
        // NUL-terminated string and `files` an array of `count` open fds,
        // both alive across the call; libvirt stores a malloc'ed string in
        // `result` on success (freed below) and writes no output fds when
        // their pointers are null.
        let rc = unsafe {
            virt::sys::virDomainQemuMonitorCommandWithFiles(
                self.domain.as_ptr(),
                cmd.as_ptr(),
                count,
                if files.is_empty() {
                    std::ptr::null_mut()
                } else {
                    files.as_mut_ptr()
                },
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut result,
                0,
            )
        };
        if rc < 0 || result.is_null() {
            return Err(LibvirtError::Call {
                name: self.name.clone(),
                message: virt::error::Error::last_error().message().to_string(),
            });
        }
        // SAFETY: libvirt returned a valid NUL-terminated string it
        // allocated; it is copied, then freed exactly once.
        let text = unsafe {
            let text = std::ffi::CStr::from_ptr(result)
                .to_string_lossy()
                .into_owned();
            libc::free(result.cast());
            text
        };
        let reply: Value = serde_json::from_str(&text)
            .map_err(|e| LibvirtError::Xml(format!("QEMU's reply {text:?}: {e}")))?;
        if let Some(err) = reply.get("error") {
            return Err(LibvirtError::Qmp {
                class: err["class"].as_str().unwrap_or("Error").to_string(),
                desc: err["desc"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The pid of the domain's QEMU, from libvirt's pid file (system
    /// driver only).
    pub fn qemu_pid(&self) -> Result<i32, LibvirtError> {
        if self.uri != DEFAULT_URI {
            return Err(LibvirtError::Refused {
                name: self.name.clone(),
                reason: format!(
                    "thaw handles domains of {DEFAULT_URI} only (their QEMU runs as a process thaw can reach); {} is not supported",
                    self.uri
                ),
            });
        }
        let path = Path::new(SYSTEM_PID_DIR).join(format!("{}.pid", self.name));
        let text = std::fs::read_to_string(&path).map_err(|source| LibvirtError::Fs {
            what: "cannot read QEMU's pid file",
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|_| LibvirtError::Fs {
            what: "unreadable pid in",
            path,
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })
    }
}

/// What thaw needs to know from a domain's XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub uuid: String,
    /// Guest RAM in bytes (`<memory>`).
    pub memory: u64,
    pub vcpus: u32,
    /// `<os><type machine=…>`.
    pub machine: String,
    /// `kvm` or `qemu` (TCG).
    pub domain_type: String,
    /// QEMU's memory backend ids, in guest-RAM order: `pc.ram`, or
    /// `ram-node0`… with NUMA cells.
    pub backends: Vec<String>,
    pub emulator: String,
}

fn inspect_name(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    child(doc.root_element(), "name").and_then(|n| n.text().map(str::to_string))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn path<'a, 'i>(node: roxmltree::Node<'a, 'i>, names: &[&str]) -> Option<roxmltree::Node<'a, 'i>> {
    names.iter().try_fold(node, |n, name| child(n, name))
}

/// A libvirt size element (`<memory unit='MiB'>512</memory>`) in bytes.
fn size_bytes(node: roxmltree::Node) -> Option<u64> {
    let value: u64 = node.text()?.trim().parse().ok()?;
    let unit = node.attribute("unit").unwrap_or("KiB").to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "b" | "bytes" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    value.checked_mul(mult)
}

/// Reads a domain's XML and refuses, in one sentence naming the element
/// to change, what thaw cannot restore lazily: RAM that is not a shared
/// file, hugepages, and devices that write guest RAM where userfaultfd
/// does not see it.
pub fn inspect(xml: &str) -> Result<DomainFacts, LibvirtError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| LibvirtError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(LibvirtError::Xml("the root element is not <domain>".into()));
    }
    let text = |names: &[&str]| {
        path(root, names)
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
    };
    let name = text(&["name"]).ok_or_else(|| LibvirtError::Xml("no <name>".into()))?;
    let refuse = |reason: String| LibvirtError::Refused {
        name: name.clone(),
        reason,
    };
    let uuid = text(&["uuid"]).unwrap_or_default();
    let memory = path(root, &["memory"])
        .and_then(size_bytes)
        .ok_or_else(|| LibvirtError::Xml("no readable <memory>".into()))?;
    let vcpus = text(&["vcpu"]).and_then(|t| t.parse().ok()).unwrap_or(1);
    let machine = path(root, &["os", "type"])
        .and_then(|n| n.attribute("machine"))
        .unwrap_or("pc")
        .to_string();
    let domain_type = root.attribute("type").unwrap_or("kvm").to_string();
    let emulator = text(&["devices", "emulator"]).unwrap_or_else(|| "qemu-system-x86_64".into());

    let backing = child(root, "memoryBacking");
    let source = backing
        .and_then(|b| child(b, "source"))
        .and_then(|s| s.attribute("type"));
    if source != Some("file") {
        return Err(refuse(format!(
            "guest RAM must be file-backed so thaw can share it with QEMU: add <source type='file'/> to <memoryBacking> (found {})",
            source.map_or("no <source>".to_string(), |s| format!("type='{s}'"))
        )));
    }
    if backing.and_then(|b| child(b, "hugepages")).is_some() {
        return Err(refuse(
            "hugepage-backed RAM is not supported yet: remove <hugepages/> from <memoryBacking>"
                .into(),
        ));
    }
    let global_shared = backing
        .and_then(|b| child(b, "access"))
        .and_then(|a| a.attribute("mode"))
        == Some("shared");
    let cells: Vec<roxmltree::Node> = path(root, &["cpu", "numa"])
        .map(|n| {
            n.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "cell")
                .collect()
        })
        .unwrap_or_default();
    let backends = if cells.is_empty() {
        if !global_shared {
            return Err(refuse(
                "guest RAM must be shared with thaw: add <access mode='shared'/> to <memoryBacking>"
                    .into(),
            ));
        }
        vec!["pc.ram".to_string()]
    } else {
        let mut ids = Vec::new();
        for (i, cell) in cells.iter().enumerate() {
            let shared = match cell.attribute("memAccess") {
                Some("shared") => true,
                Some(_) => false,
                None => global_shared,
            };
            if !shared {
                return Err(refuse(format!(
                    "NUMA cell {i} is not shared with thaw: set memAccess='shared' on its <cell> or add <access mode='shared'/> to <memoryBacking>"
                )));
            }
            ids.push(format!(
                "ram-node{}",
                cell.attribute("id").unwrap_or(&i.to_string())
            ));
        }
        ids
    };
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(|c| c.is_element()) {
            let kind = dev.tag_name().name();
            let ty = dev.attribute("type").unwrap_or("");
            let refusal = match (kind, ty) {
                ("hostdev", _) => Some(
                    "an assigned host device (<hostdev>) writes guest RAM by DMA where userfaultfd cannot see it: remove it from <devices>",
                ),
                ("interface", "vhostuser") => Some(
                    "a vhost-user interface (<interface type='vhostuser'>) writes guest RAM from another process: use type='network' or 'bridge'",
                ),
                ("filesystem", _)
                    if child(dev, "driver").and_then(|d| d.attribute("type"))
                        == Some("virtiofs") =>
                {
                    Some(
                        "virtiofs (<filesystem> with <driver type='virtiofs'/>) writes guest RAM from virtiofsd: remove it from <devices>",
                    )
                }
                ("memory", _) => Some(
                    "hot-pluggable memory (<memory> in <devices>) is not supported yet: remove it",
                ),
                _ => None,
            };
            if let Some(reason) = refusal {
                return Err(refuse(reason.into()));
            }
        }
    }
    Ok(DomainFacts {
        name,
        uuid,
        memory,
        vcpus,
        machine,
        domain_type,
        backends,
        emulator,
    })
}

/// The XML a restore starts the domain from: the saved XML with
/// `-incoming defer` added in a `<qemu:commandline>` (QEMU then waits for
/// the device state thaw feeds it; libvirt marks the domain `custom-argv`).
pub fn incoming_xml(xml: &str) -> Result<String, LibvirtError> {
    // Never twice: the XML of a domain thaw restored may still carry it.
    let xml = without_incoming(xml)?;
    let doc = roxmltree::Document::parse(&xml).map_err(|e| LibvirtError::Xml(e.to_string()))?;
    let root = doc.root_element();
    let prefix = root
        .namespaces()
        .find(|ns| ns.uri() == QEMU_NS)
        .and_then(|ns| ns.name().map(str::to_string));
    let range = root.range();
    let body = &xml[range.clone()];
    let (prefix, declare) = match prefix {
        Some(p) => (p, String::new()),
        None => (
            "thawqemu".to_string(),
            format!(" xmlns:thawqemu='{QEMU_NS}'"),
        ),
    };
    // The namespace goes right after the root's name.
    let name_end = body[1..]
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .map(|i| i + 1)
        .ok_or_else(|| LibvirtError::Xml("<domain> has no start tag".into()))?;
    let ours = format!(
        "  <{prefix}:commandline>\n    <{prefix}:arg value='-incoming'/>\n    <{prefix}:arg value='defer'/>\n  </{prefix}:commandline>\n"
    );
    let mut out = String::with_capacity(xml.len() + 200);
    out.push_str(&xml[..range.start]);
    out.push_str(&body[..name_end]);
    out.push_str(&declare);
    if body.ends_with("/>") {
        // `<domain .../>`: no children to add to (libvirt refuses it anyway).
        out.push_str(&body[name_end..body.len() - 2]);
        out.push_str(">\n");
        out.push_str(&ours);
        out.push_str(&format!("</{}>", root.tag_name().name()));
    } else {
        let close = body
            .rfind("</")
            .ok_or_else(|| LibvirtError::Xml("<domain> is not closed".into()))?;
        out.push_str(&body[name_end..close]);
        out.push_str(&ours);
        out.push_str(&body[close..]);
    }
    out.push_str(&xml[range.end..]);
    Ok(out)
}

/// The saved XML without the `-incoming defer` a thaw restore added:
/// the argument pair goes wherever it is (libvirt merges all
/// `<qemu:commandline>` arguments into one element), and the element
/// too once nothing else is left in it.
pub fn without_incoming(xml: &str) -> Result<String, LibvirtError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| LibvirtError::Xml(e.to_string()))?;
    let is_qemu = |n: &roxmltree::Node, name: &str| {
        n.is_element() && n.tag_name().namespace() == Some(QEMU_NS) && n.tag_name().name() == name
    };
    let mut cuts: Vec<std::ops::Range<usize>> = Vec::new();
    for cmd in doc
        .root_element()
        .children()
        .filter(|c| is_qemu(c, "commandline"))
    {
        let args: Vec<roxmltree::Node> = cmd.children().filter(|c| c.is_element()).collect();
        let mut drop = vec![false; args.len()];
        for i in 0..args.len().saturating_sub(1) {
            if is_qemu(&args[i], "arg")
                && args[i].attribute("value") == Some("-incoming")
                && args[i + 1].attribute("value") == Some("defer")
                && !drop[i]
            {
                drop[i] = true;
                drop[i + 1] = true;
            }
        }
        if !drop.iter().any(|&d| d) {
            continue;
        }
        if drop.iter().all(|&d| d) {
            cuts.push(with_line(xml, cmd.range()));
        } else {
            cuts.extend(
                args.iter()
                    .zip(&drop)
                    .filter(|(_, &d)| d)
                    .map(|(a, _)| with_line(xml, a.range())),
            );
        }
    }
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for cut in cuts {
        out.push_str(&xml[at..cut.start]);
        at = cut.end;
    }
    out.push_str(&xml[at..]);
    Ok(out)
}

/// `range` widened to its whole line when nothing else is on it.
fn with_line(xml: &str, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let before = &xml[..range.start];
    let start = before.trim_end_matches([' ', '\t']).len();
    let after = &xml[range.end..];
    let rest = after.len() - after.trim_start_matches([' ', '\t']).len();
    let own_line =
        (start == 0 || before[..start].ends_with('\n')) && after[rest..].starts_with('\n');
    if own_line {
        start..range.end + rest + 1
    } else {
        range
    }
}

/// Refuses a RAM directory where userfaultfd cannot serve shared RAM (it
/// must be tmpfs; libvirt's default is on disk).
pub fn check_ram_dir(dir: &Path, name: &str) -> Result<(), LibvirtError> {
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| LibvirtError::Fs {
        what: "cannot inspect the RAM directory",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(LibvirtError::Refused {
            name: name.to_string(),
            reason: format!(
                "its RAM file is in {}, which is not tmpfs, and userfaultfd cannot serve it there: set memory_backing_dir = \"/dev/shm/libvirt-ram\" in /etc/libvirt/qemu.conf and restart the domain",
                dir.display()
            ),
        });
    }
    Ok(())
}

/// The mark of a domain whose QEMU may have `x-ignore-shared` on. Created
/// before thaw switches it on; [`IgnoreSharedMark::clear`] removes it once
/// it is off. Dropped without `clear` it stays: a later thaw command
/// repairs the domain.
pub struct IgnoreSharedMark {
    path: PathBuf,
}

impl IgnoreSharedMark {
    pub fn set(runtime_dir: &Path) -> Result<IgnoreSharedMark, LibvirtError> {
        let path = runtime_dir.join(IGNORE_SHARED_MARK);
        std::fs::write(&path, b"x-ignore-shared may be on\n").map_err(|source| {
            LibvirtError::Fs {
                what: "cannot write",
                path: path.clone(),
                source,
            }
        })?;
        Ok(IgnoreSharedMark { path })
    }

    pub fn clear(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }

    /// Whether a domain's runtime directory carries the mark.
    pub fn present(runtime_dir: &Path) -> bool {
        runtime_dir.join(IGNORE_SHARED_MARK).exists()
    }

    /// Removes the mark of a domain whose `x-ignore-shared` is off.
    pub fn remove(runtime_dir: &Path) {
        let _ = std::fs::remove_file(runtime_dir.join(IGNORE_SHARED_MARK));
    }
}

/// The backends of `facts` as QEMU has them: the RAM layout (sizes from
/// `query-memdev`) and the directory of their files (`mem-path`).
async fn ram_of(
    qmp: &mut super::Qmp,
    facts: &DomainFacts,
) -> Result<(crate::mem::RamLayout, PathBuf), super::QemuError> {
    let devs = qmp.execute("query-memdev", json!({})).await?;
    let mut sizes = Vec::new();
    let mut dir: Option<PathBuf> = None;
    for id in &facts.backends {
        let size = devs
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["id"].as_str() == Some(id.as_str()))
            .and_then(|d| d["size"].as_u64())
            .ok_or_else(|| {
                super::QemuError::Libvirt(format!(
                    "libvirt domain {}: QEMU has no memory backend {id} (query-memdev: {devs})",
                    facts.name
                ))
            })?;
        let file = qmp
            .execute(
                "qom-get",
                json!({ "path": format!("/objects/{id}"), "property": "mem-path" }),
            )
            .await?;
        let file = PathBuf::from(file.as_str().unwrap_or_default());
        let parent = file.parent().map(Path::to_path_buf).unwrap_or_default();
        if file.file_name().and_then(|f| f.to_str()) != Some(id.as_str())
            || dir.as_ref().is_some_and(|d| *d != parent)
        {
            return Err(super::QemuError::Libvirt(format!(
                "libvirt domain {}: memory backend {id} has an unexpected file {}",
                facts.name,
                file.display()
            )));
        }
        dir = Some(parent);
        sizes.push((id.clone(), size));
    }
    let dir = dir.ok_or_else(|| {
        super::QemuError::Libvirt(format!("libvirt domain {} has no RAM backend", facts.name))
    })?;
    Ok((crate::mem::RamLayout::from_sizes(sizes), dir))
}

/// A thaw config describing the domain (thaw's records and images carry
/// one; libvirt's XML stays the domain's real definition).
fn config_of(facts: &DomainFacts) -> crate::config::VmConfig {
    crate::config::VmConfig {
        name: facts.name.clone(),
        memory: crate::config::ByteSize(facts.memory),
        cpus: facts.vcpus,
        machine: facts.machine.clone(),
        accel: if facts.domain_type == "kvm" {
            crate::config::Accel::Kvm
        } else {
            crate::config::Accel::Tcg
        },
        kernel: None,
        initrd: None,
        append: None,
        serial: None,
        qemu: facts.emulator.clone(),
        numa_nodes: u32::try_from(facts.backends.len()).unwrap_or(1),
        extra_args: Vec::new(),
    }
}

fn libvirt_err(e: LibvirtError) -> super::QemuError {
    super::QemuError::Libvirt(e.to_string())
}

/// Takes a running libvirt domain on as a thaw VM: checks its XML and
/// its RAM directory, finds its QEMU and RAM, and writes thaw's record
/// (`vm.json` in the runtime directory). A domain thaw already has a
/// record of is returned as it is.
pub async fn attach(
    uri: &str,
    name: &str,
) -> Result<(super::VmPaths, super::VmState), super::QemuError> {
    crate::config::validate_name(name).map_err(|m| {
        super::QemuError::Libvirt(format!(
            "libvirt domain {name:?}: thaw cannot name a VM so ({m})"
        ))
    })?;
    let domain = LibvirtDomain::open(uri, name).map_err(libvirt_err)?;
    if !domain.is_active() {
        return Err(libvirt_err(LibvirtError::NotRunning(name.to_string())));
    }
    let paths = super::VmPaths::new(name);
    match super::VmState::load(name) {
        Ok((paths, state)) => {
            // libvirt may have restarted the domain since: the record is
            // of the QEMU it names, which VmState::load checked is alive.
            return match &state.libvirt {
                Some(l) if l.uuid == domain.uuid => Ok((paths, state)),
                _ => Err(super::QemuError::Libvirt(format!(
                    "a VM named {name} that is not this libvirt domain is running under thaw (see `thaw list`)"
                ))),
            };
        }
        Err(super::QemuError::NotRunning(_)) => {}
        Err(e) => return Err(e),
    }
    leftover(&paths)?;
    let facts = inspect(&domain.xml(false).map_err(libvirt_err)?).map_err(libvirt_err)?;
    let domain = std::sync::Arc::new(domain);
    let (paths, state) = record(domain, &facts, paths).await?;
    Ok((paths, state))
}

/// Finds the domain's QEMU and RAM and writes thaw's record of it.
async fn record(
    domain: std::sync::Arc<LibvirtDomain>,
    facts: &DomainFacts,
    paths: super::VmPaths,
) -> Result<(super::VmPaths, super::VmState), super::QemuError> {
    let pid = domain.qemu_pid().map_err(libvirt_err)?;
    let qemu = crate::remote::process::QemuProcess::open(pid)?;
    qemu.check_looks_like_qemu(&facts.name)?;
    let mut qmp = super::Qmp::libvirt(domain.clone());
    let qemu_version = qmp.version().await?;
    super::check_version(&qemu_version)?;
    let (layout, ram_dir) = ram_of(&mut qmp, facts).await?;
    check_ram_dir(&ram_dir, &facts.name).map_err(libvirt_err)?;
    super::check_memdevs(&mut qmp, &layout).await?;
    let state = super::VmState {
        config: config_of(facts),
        accel: if facts.domain_type == "kvm" {
            "kvm"
        } else {
            "tcg"
        }
        .into(),
        layout,
        qemu_pid: pid,
        qemu_start_time: qemu.start_time(),
        qemu_version,
        serial: PathBuf::new(),
        started_unix: super::now_unix(),
        libvirt: Some(LibvirtRecord {
            uri: domain.uri.clone(),
            name: domain.name.clone(),
            uuid: domain.uuid.clone(),
            ram_dir,
        }),
    };
    publish(&paths, &state)?;
    Ok((paths, state))
}

/// Puts thaw's record of a domain in place atomically: written into a
/// private directory that is then renamed to the runtime directory. Two
/// thaws taking the same domain on at once never remove each other's
/// files (lock, x-ignore-shared mark): the second finds the first's
/// record.
fn publish(paths: &super::VmPaths, state: &super::VmState) -> Result<(), super::QemuError> {
    let root = super::runtime_root();
    super::ensure_root_dir(&root)?;
    super::refuse_symlink(&paths.dir)?;
    let tmp = root.join(format!(".{}.new-{}", paths.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    super::create_private_dir(&tmp)?;
    let staged = super::VmPaths {
        dir: tmp.clone(),
        state: tmp.join("vm.json"),
        ..paths.clone()
    };
    let result = state.store(&staged).and_then(|()| {
        std::fs::rename(&tmp, &paths.dir).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST | libc::ENOTEMPTY) => super::QemuError::Libvirt(format!(
                "another thaw is taking libvirt domain {} on right now (see `thaw status {} --libvirt`)",
                paths.name, paths.name
            )),
            _ => super::fs_err("cannot create", &paths.dir)(e),
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A runtime directory without a record (a thaw died before writing it,
/// or its QEMU's record was just cleaned up): removed unless something
/// in it is held or marked.
fn leftover(paths: &super::VmPaths) -> Result<(), super::QemuError> {
    if !paths.dir.exists() || paths.state.exists() {
        return Ok(());
    }
    let busy = !matches!(crate::ops::owner::OwnerLock::holder(paths), Ok(None));
    if busy || IgnoreSharedMark::present(&paths.dir) {
        return Err(super::QemuError::Libvirt(format!(
            "{} holds files of another thaw operation on {}: wait for it, or run `thaw recover {}`",
            paths.dir.display(),
            paths.name,
            paths.name
        )));
    }
    super::remove_runtime(paths);
    Ok(())
}

/// Starts the domain of a saved image under libvirt, paused and waiting
/// for its device state (`-incoming defer`), with empty RAM; returns it
/// as a thaw VM whose monitor is libvirtd. A domain of that name that is
/// running is refused; on failure the domain is destroyed again.
pub async fn launch_incoming(saved: &LibvirtImage) -> Result<super::Launched, super::QemuError> {
    let facts = inspect(&saved.xml).map_err(libvirt_err)?;
    crate::config::validate_name(&facts.name).map_err(super::QemuError::Libvirt)?;
    if let Ok(existing) = LibvirtDomain::open(&saved.uri, &facts.name) {
        if existing.is_active() {
            return Err(super::QemuError::AlreadyRunning(facts.name.clone()));
        }
    }
    let paths = super::VmPaths::new(&facts.name);
    if paths.state.exists() {
        match super::VmState::load(&facts.name) {
            Ok(_) => return Err(super::QemuError::AlreadyRunning(facts.name.clone())),
            Err(super::QemuError::NotRunning(_)) => {}
            Err(e) => return Err(e),
        }
    }
    leftover(&paths)?;
    let xml = incoming_xml(&saved.xml).map_err(libvirt_err)?;
    let uri = saved.uri.clone();
    let domain = tokio::task::spawn_blocking(move || LibvirtDomain::create(&uri, &xml, true))
        .await
        .map_err(|e| super::QemuError::Launch(e.to_string()))?
        .map_err(libvirt_err)?;
    let domain = std::sync::Arc::new(domain);
    match record(domain.clone(), &facts, paths).await {
        Ok((paths, state)) => Ok(super::Launched {
            paths,
            state,
            qmp: super::Qmp::libvirt(domain),
        }),
        Err(e) => {
            if let Err(d) = domain.destroy() {
                log::warn!("cannot destroy the domain of a failed restore: {d}");
            }
            Err(e)
        }
    }
}

/// An fd of `/dev/userfaultfd` that thaw handed to QEMU.
#[derive(Clone, Copy, Debug)]
pub struct UffdDevice {
    /// Its number inside QEMU.
    pub fd: i32,
    /// The fd set QEMU keeps it in (`add-fd`).
    fdset: i64,
}

/// What thaw's fd set is called inside QEMU (`query-fdsets`).
const UFFD_DEVICE_OPAQUE: &str = "thaw-userfaultfd";

/// Gives QEMU an fd of `/dev/userfaultfd` through the monitor (`add-fd`,
/// whose answer names the fd inside QEMU); [`release_uffd_device`] closes
/// it there. For a QEMU that runs unprivileged and so may not call
/// `userfaultfd(2)` for kernel faults.
pub async fn plant_uffd_device(
    qmp: &mut super::Qmp,
    qemu: &crate::remote::process::QemuProcess,
) -> Result<UffdDevice, super::QemuError> {
    let device = Path::new("/dev/userfaultfd");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(device)
        .map_err(super::fs_err("cannot open", device))?;
    let added = qmp
        .execute_with_fd(
            "add-fd",
            json!({ "opaque": UFFD_DEVICE_OPAQUE }),
            std::os::fd::AsFd::as_fd(&file),
        )
        .await?;
    let want = std::os::unix::fs::MetadataExt::rdev(
        &file
            .metadata()
            .map_err(super::fs_err("cannot stat", device))?,
    );
    let pid = qemu.pid().as_raw();
    let fd = added["fd"].as_i64().and_then(|f| i32::try_from(f).ok());
    let fdset = added["fdset-id"].as_i64();
    // The number QEMU gave is checked against what is at it.
    let is_device = fd.is_some_and(|fd| {
        std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::rdev(&m) == want)
    });
    match (fd, fdset) {
        (Some(fd), Some(fdset)) if is_device && qemu.alive() => Ok(UffdDevice { fd, fdset }),
        (_, fdset) => {
            if let Some(fdset) = fdset {
                release_uffd_device(qmp, UffdDevice { fd: -1, fdset }).await;
            }
            Err(super::QemuError::Libvirt(format!(
                "QEMU did not take the /dev/userfaultfd fd as expected (add-fd answered {added})"
            )))
        }
    }
}

/// Closes the `/dev/userfaultfd` fd [`plant_uffd_device`] gave QEMU.
pub async fn release_uffd_device(qmp: &mut super::Qmp, device: UffdDevice) {
    if let Err(e) = qmp
        .execute("remove-fd", json!({ "fdset-id": device.fdset }))
        .await
    {
        log::warn!("cannot close the /dev/userfaultfd fd inside QEMU: {e}");
    }
}

/// How long a repair waits for QEMU's answer.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(5);

/// Switches `x-ignore-shared` off in every libvirt domain whose mark a
/// thaw that died left behind (no thaw operation holds the domain).
/// Returns the domains repaired; failures are logged and retried by the
/// next command.
pub async fn repair_ignore_shared() -> Vec<String> {
    let mut repaired = Vec::new();
    for name in super::list_vms() {
        let paths = super::VmPaths::new(&name);
        if !IgnoreSharedMark::present(&paths.dir) {
            continue;
        }
        // Held across the switch-off and the mark's removal: an operation
        // starting meanwhile waits for the repair, not the other way round.
        let Ok(_lock) = crate::ops::owner::OwnerLock::acquire(&paths, "repair") else {
            continue;
        };
        // An interrupted restore's QEMU may be blocked on a page nobody
        // serves, its monitor silent: `thaw recover` repairs it.
        if paths.dir.join(crate::ops::restore::RECORD_FILE).exists() {
            continue;
        }
        let Ok((_, state)) = super::VmState::load(&name) else {
            continue;
        };
        let Some(lv) = &state.libvirt else {
            IgnoreSharedMark::remove(&paths.dir);
            continue;
        };
        let fix = async {
            let (uri, domain_name) = (lv.uri.clone(), lv.name.clone());
            let domain =
                tokio::task::spawn_blocking(move || LibvirtDomain::open(&uri, &domain_name))
                    .await
                    .map_err(|e| LibvirtError::Call {
                        name: name.clone(),
                        message: e.to_string(),
                    })??;
            let mut qmp = super::Qmp::libvirt(std::sync::Arc::new(domain));
            qmp.clear_ignore_shared()
                .await
                .map_err(|e| LibvirtError::Call {
                    name: name.clone(),
                    message: e.to_string(),
                })
        };
        match tokio::time::timeout(REPAIR_TIMEOUT, fix).await {
            Ok(Ok(())) => {
                IgnoreSharedMark::remove(&paths.dir);
                log::warn!("{name}: x-ignore-shared was left on by a thaw that stopped early; switched it off");
                repaired.push(name);
            }
            Ok(Err(e)) => log::warn!("{name}: x-ignore-shared may still be on: {e}"),
            Err(_) => log::warn!("{name}: QEMU did not answer; x-ignore-shared may still be on"),
        }
    }
    repaired
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "<domain type='qemu'>\n  <name>t</name>\n  <uuid>449dfe29-53ab-40b8-aaaa-53ea58a5c957</uuid>\n  <memory unit='KiB'>524288</memory>\n  <vcpu>2</vcpu>\n  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>\n  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>\n  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='virtio'/></devices>\n</domain>\n";

    #[test]
    fn shared_file_backed_domain_is_accepted() {
        let f = inspect(BASE).expect("accepted");
        assert_eq!(f.name, "t");
        assert_eq!(f.memory, 512 << 20);
        assert_eq!(f.vcpus, 2);
        assert_eq!(f.machine, "pc-q35-10.0");
        assert_eq!(f.backends, vec!["pc.ram"]);
    }

    #[test]
    fn refusals_name_the_element_to_change() {
        let cases = [
            (
                BASE.replace("<source type='file'/>", ""),
                "<source type='file'/>",
            ),
            (
                BASE.replace("<source type='file'/>", "<source type='memfd'/>"),
                "type='memfd'",
            ),
            (
                BASE.replace("<access mode='shared'/>", ""),
                "<access mode='shared'/>",
            ),
            (
                BASE.replace(
                    "<access mode='shared'/>",
                    "<access mode='shared'/><hugepages/>",
                ),
                "<hugepages/>",
            ),
            (
                BASE.replace(
                    "<memballoon",
                    "<hostdev mode='subsystem' type='pci'/><memballoon",
                ),
                "<hostdev>",
            ),
            (
                BASE.replace("<memballoon", "<interface type='vhostuser'/><memballoon"),
                "vhostuser",
            ),
        ];
        for (xml, needle) in cases {
            match inspect(&xml) {
                Err(LibvirtError::Refused { reason, .. }) => {
                    assert!(reason.contains(needle), "{reason:?} does not name {needle}")
                }
                other => panic!("expected a refusal naming {needle}, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_ram_directory_on_disk_is_refused_naming_memory_backing_dir() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let on_tmpfs = nix::sys::statfs::statfs(dir)
            .is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        match check_ram_dir(dir, "t") {
            Err(LibvirtError::Refused { reason, .. }) => {
                assert!(reason.contains("memory_backing_dir"), "{reason}")
            }
            Ok(()) => assert!(on_tmpfs, "{} is not tmpfs but was accepted", dir.display()),
            Err(e) => panic!("{e}"),
        }
        check_ram_dir(Path::new("/dev/shm"), "t").expect("/dev/shm is tmpfs");
    }

    #[test]
    fn example_domains_are_accepted() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/libvirt");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/libvirt") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "xml") {
                let xml = std::fs::read_to_string(&path).expect("read");
                inspect(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                incoming_xml(&xml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 2, "no example domains in {}", dir.display());
    }

    #[test]
    fn numa_cells_give_one_backend_each_and_must_be_shared() {
        let numa = BASE.replace("<access mode='shared'/>", "").replace(
            "<vcpu>2</vcpu>",
            "<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB' memAccess='shared'/><cell id='1' cpus='1' memory='256' unit='MiB' memAccess='shared'/></numa></cpu>",
        );
        assert_eq!(
            inspect(&numa).expect("accepted").backends,
            vec!["ram-node0", "ram-node1"]
        );
        let private = numa.replacen("memAccess='shared'", "memAccess='private'", 1);
        assert!(matches!(
            inspect(&private),
            Err(LibvirtError::Refused { .. })
        ));
    }

    #[test]
    fn incoming_xml_adds_incoming_defer_and_stays_valid() {
        let out = incoming_xml(BASE).expect("rewritten");
        let doc = roxmltree::Document::parse(&out).expect("still XML");
        let args: Vec<&str> = doc
            .descendants()
            .filter(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.tag_name().name() == "arg")
            .filter_map(|n| n.attribute("value"))
            .collect();
        assert_eq!(args, vec!["-incoming", "defer"]);
        assert_eq!(
            inspect(&out).expect("same domain"),
            inspect(BASE).expect("base")
        );
        // A domain that already declares the namespace keeps its prefix.
        let declared = BASE.replace(
            "<domain type='qemu'>",
            &format!("<domain type='qemu' xmlns:qemu='{QEMU_NS}'>"),
        );
        let out = incoming_xml(&declared).expect("rewritten");
        assert!(out.contains("<qemu:arg value='-incoming'/>"), "{out}");
        // Saving a restored domain drops what the restore added.
        assert_eq!(without_incoming(&out).expect("stripped"), declared);
        assert_eq!(without_incoming(BASE).expect("unchanged"), BASE);
        // Restoring that again adds it once, not twice.
        assert_eq!(
            incoming_xml(&out)
                .expect("again")
                .matches("'-incoming'")
                .count(),
            1
        );
        // libvirt merges every <qemu:commandline> argument into one element:
        // only thaw's pair goes, the user's stay.
        let merged = declared.replace(
            "</devices>",
            "</devices>\n  <qemu:commandline>\n    <qemu:arg value='-msg'/>\n    <qemu:arg value='timestamp=on'/>\n    <qemu:arg value='-incoming'/>\n    <qemu:arg value='defer'/>\n  </qemu:commandline>",
        );
        let kept = without_incoming(&merged).expect("stripped");
        assert!(
            !kept.contains("-incoming") && kept.contains("timestamp=on"),
            "{kept}"
        );
        roxmltree::Document::parse(&kept).expect("still XML");
        // An attribute holding '>' before the namespace is added.
        let odd = BASE.replace("<domain type='qemu'>", "<domain type='qemu' id='a>b'>");
        let out = incoming_xml(&odd).expect("rewritten");
        assert_eq!(inspect(&out).expect("parses"), inspect(&odd).expect("base"));
    }
}
