//! thaw: save QEMU VMs and restore them lazily through userfaultfd, so a
//! restored guest runs again at once while its RAM streams in behind it.
//!
//! The modules follow the data's path: [`config`] (YAML → typed VM config) →
//! [`qemu`] (command line, launch, QMP, RAM discovery) → [`inject`] (ptrace
//! syscall injection) → [`uffd`] (userfaultfd takeover and typed ioctls) →
//! [`image`] (on-disk format, writer, verifying reader) → [`save`] /
//! [`restore`] (orchestration and the restore engine). [`limits`] measures
//! the machine's physical limits the restore path runs into.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dirty;
pub mod image;
pub mod inject;
pub mod limits;
pub mod mem;
pub mod progress;
pub mod qemu;
pub mod restore;
pub mod save;
pub mod throttle;
pub mod track;
pub mod uffd;
pub mod wss;
