//! VM configuration: the YAML file a user writes, parsed strictly into a
//! typed [`VmConfig`] (unknown keys and bad values are errors with line and
//! column), with relative paths resolved against the file's directory.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::mem::PAGE_SIZE;

/// Errors from reading or validating a VM config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Which accelerator QEMU runs the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe shows it can boot a guest, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// A byte size written as a number of bytes or with a suffix
/// (`512M`, `2G`, `1536MiB`; K/M/G/T are binary multiples).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `2G`, `512M`, `1536MiB`, `4096`.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {text:?}: expected e.g. 512M or 2G"))?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(format!("invalid size unit in {text:?}: use K, M, G or T")),
        };
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (suffix, shift) in UNITS {
            if self.0 != 0 && self.0 % (1u64 << shift) == 0 {
                return write!(f, "{}{}", self.0 >> shift, suffix);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 512M or 2G, or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_machine() -> String {
    "q35".into()
}
fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}
fn default_numa_nodes() -> u32 {
    1
}

/// A VM as the user describes it. thaw adds the RAM backends, QMP socket,
/// pid file and serial chardev itself (see [`crate::vmm`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name: letters, digits, `-`, `_`, `.`; names the runtime and RAM directories.
    pub name: String,
    /// Guest RAM size.
    pub memory: ByteSize,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// QEMU machine type (`q35`, `pc`, or a versioned one such as `pc-q35-10.0`).
    #[serde(default = "default_machine")]
    pub machine: String,
    /// `auto` (KVM if a probe boots a guest, else TCG), `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// Guest kernel for direct boot (`-kernel`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (`-initrd`).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    #[serde(default)]
    pub append: Option<String>,
    /// File that receives the guest's serial console (appended to across restores).
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// QEMU binary, a path or a name looked up in `PATH`.
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// Guest NUMA nodes; RAM is split evenly into one memory backend per node.
    #[serde(default = "default_numa_nodes")]
    pub numa_nodes: u32,
    /// Further QEMU arguments, passed through unchanged (devices, netdevs, ...).
    #[serde(default)]
    pub extra_args: Vec<String>,
}

impl VmConfig {
    /// Reads and validates a config file; relative paths in it are taken
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        let base = std::fs::canonicalize(base).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        VmConfig::parse(&text, path, &base)
    }

    /// Parses YAML text; `origin` names it in errors, `base` anchors relative paths.
    pub fn parse(text: &str, origin: &Path, base: &Path) -> Result<VmConfig, ConfigError> {
        let mut cfg: VmConfig = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            let message = e.to_string();
            // serde_yaml appends " at line L column C"; the prefix already says it.
            let message = match message.find(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            ConfigError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message,
            }
        })?;
        for p in [&mut cfg.kernel, &mut cfg.initrd, &mut cfg.serial]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.check()
            .map_err(|bad| match key_position(text, bad.key) {
                Some((line, column)) => ConfigError::Syntax {
                    path: origin.to_owned(),
                    line,
                    column,
                    message: format!("{}: {}", bad.key, bad.message),
                },
                None => ConfigError::Invalid {
                    path: origin.to_owned(),
                    message: format!("{}: {}", bad.key, bad.message),
                },
            })?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), String> {
        self.check()
            .map_err(|bad| format!("{}: {}", bad.key, bad.message))
    }

    /// Like [`VmConfig::validate`], naming the offending key.
    fn check(&self) -> Result<(), BadValue> {
        let bad = |key: &'static str, message: String| Err(BadValue { key, message });
        if let Err(m) = validate_name(&self.name) {
            return bad("name", m);
        }
        if self.memory.0 == 0 || self.memory.0 % (1 << 20) != 0 {
            return bad(
                "memory",
                format!(
                    "{} must be a positive whole number of MiB (a bare number is bytes: write e.g. 2048M)",
                    self.memory
                ),
            );
        }
        if self.cpus == 0 || self.cpus > 1024 {
            return bad("cpus", format!("{} is out of range (1..=1024)", self.cpus));
        }
        if self.numa_nodes == 0 || self.numa_nodes > 64 {
            return bad(
                "numa_nodes",
                format!("{} is out of range (1..=64)", self.numa_nodes),
            );
        }
        if self.memory.0 % (u64::from(self.numa_nodes) << 20) != 0 {
            return bad(
                "memory",
                format!(
                    "{} does not split evenly into {} NUMA nodes of whole MiB",
                    self.memory, self.numa_nodes
                ),
            );
        }
        if self.machine.is_empty() || self.machine.contains(',') {
            return bad(
                "machine",
                format!(
                    "{:?} must be a machine type name; put machine options in extra_args",
                    self.machine
                ),
            );
        }
        for (key, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(p) = p {
                if !p.is_file() {
                    return bad(
                        key,
                        format!("{} does not exist or is not a file", p.display()),
                    );
                }
            }
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return bad("initrd", "initrd is set but kernel is not".into());
        }
        if let Some(m) = owned_option(&self.extra_args) {
            return bad("extra_args", m);
        }
        Ok(())
    }

    /// Size of each memory backend: RAM split evenly over the NUMA nodes.
    pub fn backend_size(&self) -> u64 {
        let size = self.memory.0 / u64::from(self.numa_nodes);
        debug_assert_eq!(size % PAGE_SIZE, 0);
        size
    }
}

/// A value the types accept but thaw does not, and the key it sits under.
struct BadValue {
    key: &'static str,
    message: String,
}

/// QEMU options thaw sets itself, and the config key that controls each.
const OWNED_OPTIONS: &[(&str, &str)] = &[
    ("-m", "memory"),
    ("-smp", "cpus"),
    ("-machine", "machine"),
    ("-M", "machine"),
    ("-accel", "accel"),
    ("-enable-kvm", "accel"),
    ("-numa", "numa_nodes"),
    ("-mem-path", "memory"),
    ("-mem-prealloc", "memory"),
    ("-kernel", "kernel"),
    ("-initrd", "initrd"),
    ("-append", "append"),
    ("-serial", "serial"),
    ("-name", "name"),
    ("-pidfile", "(thaw's own pid file)"),
    ("-daemonize", "(thaw daemonizes QEMU)"),
    ("-incoming", "(thaw restore)"),
    ("-S", "(thaw restore)"),
];

/// The first argument in `args` that would fight thaw's own QEMU options
/// (RAM backends, QMP, daemonizing, incoming migration), as a message.
fn owned_option(args: &[String]) -> Option<String> {
    for (i, arg) in args.iter().enumerate() {
        let opt = arg
            .strip_prefix('-')
            .filter(|o| o.starts_with('-'))
            .unwrap_or(arg);
        if let Some((_, key)) = OWNED_OPTIONS.iter().find(|(o, _)| *o == opt) {
            return Some(format!(
                "{arg:?} is set by thaw itself (config key: {key}); remove it from extra_args"
            ));
        }
        let value = args.get(i + 1).map(String::as_str).unwrap_or("");
        // A monitor of the user's own is welcome next to thaw's two, as
        // long as QEMU does not wait for a client on it before it runs.
        if (opt == "-qmp" || opt == "-qmp-pretty")
            && value.contains("server")
            && !(value.contains("wait=off") || value.contains("nowait"))
        {
            return Some(format!(
                "\"{arg} {value}\": add wait=off, or QEMU waits for a client on it before it starts"
            ));
        }
        if opt == "-object" && value.starts_with("memory-backend-") {
            return Some(format!(
                "\"-object {value}\": thaw creates guest RAM itself as shared file backends \
                 (set memory and numa_nodes); remove it from extra_args"
            ));
        }
    }
    None
}

/// Line and column (1-based) of a top-level `key:` in YAML `text`.
fn key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(i, line)| {
        let rest = line.strip_prefix(key)?;
        rest.trim_start().starts_with(':').then_some((i + 1, 1))
    })
}

/// A VM name must be safe as a single path component and a QEMU `-name`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name: {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(text, Path::new("vm.yaml"), Path::new("/base"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse("name: a\nmemory: 512M\n").expect("valid config");
        assert_eq!(cfg.memory, ByteSize(512 << 20));
        assert_eq!(cfg.cpus, 1);
        assert_eq!(cfg.machine, "q35");
        assert_eq!(cfg.accel, Accel::Auto);
        assert_eq!(cfg.backend_size(), 512 << 20);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = parse("name: a\nmemory: 1G\nmemroy: 2G\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("vm.yaml:3:1:"), "{text}");
        assert!(text.contains("memroy"), "{text}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("name: a\nmemory: 12Q\n")
            .unwrap_err()
            .to_string()
            .contains("vm.yaml:2:"));
        assert!(parse("name: a\nmemory: 1G\naccel: hvf\n").is_err());
        assert!(parse("name: a/b\nmemory: 1G\n")
            .unwrap_err()
            .to_string()
            .contains("name"));
        assert!(parse("name: a\nmemory: 1G\ncpus: 0\n")
            .unwrap_err()
            .to_string()
            .starts_with("vm.yaml:3:1: cpus:"));
        assert!(parse("name: a\nmemory: 100M\nnuma_nodes: 3\n")
            .unwrap_err()
            .to_string()
            .starts_with("vm.yaml:2:1: memory:"));
    }

    #[test]
    fn options_thaw_sets_itself_are_refused_in_extra_args() {
        for args in [
            r#"["-m", "2G"]"#,
            r#"["--smp", "4"]"#,
            r#"["-object", "memory-backend-ram,id=m,size=1G"]"#,
            r#"["-daemonize"]"#,
        ] {
            let text = format!("name: a\nmemory: 1G\nextra_args: {args}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("vm.yaml:3:1: extra_args:"), "{err}");
        }
        let ok = r#"["-object", "rng-random,id=r,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=r"]"#;
        parse(&format!("name: a\nmemory: 1G\nextra_args: {ok}\n")).expect("devices are fine");
        let own_monitor = r#"["-qmp", "unix:/tmp/m.sock,server=on,wait=off"]"#;
        parse(&format!("name: a\nmemory: 1G\nextra_args: {own_monitor}\n"))
            .expect("a monitor of one's own is fine");
        let waiting = r#"["-qmp", "unix:/tmp/m.sock,server=on"]"#;
        let err = parse(&format!("name: a\nmemory: 1G\nextra_args: {waiting}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("wait=off"), "{err}");
    }

    #[test]
    fn the_example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                VmConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 4, "only {seen} configs found in {}", dir.display());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let cfg = parse("name: a\nmemory: 1G\nserial: out/console.log\n").expect("valid");
        assert_eq!(cfg.serial, Some(PathBuf::from("/base/out/console.log")));
    }

    #[test]
    fn sizes_round_trip() {
        for s in ["512M", "2G", "1000", "1T"] {
            assert_eq!(ByteSize::parse(s).map(|b| b.to_string()), Ok(s.to_string()));
        }
        assert_eq!(ByteSize::parse("1536MiB"), Ok(ByteSize(1536 << 20)));
    }
}
