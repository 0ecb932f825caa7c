//! thaw: save QEMU VMs and restore them lazily through userfaultfd, so a
//! restored guest runs again at once while its RAM streams in behind it.
//!
//! The modules follow the data's path: [`config`] (YAML → typed VM config)
//! → [`vmm`] (QEMU command line, launch, QMP, RAM discovery) → [`remote`]
//! (the QEMU process from outside: syscall injection, its userfaultfd) →
//! [`image`] (on-disk format, writer, verifying reader) → [`engine`] (every
//! page install: faults, fetches, prefetch, fill, discards) → [`observe`]
//! (watching a running guest's memory) → [`wss`] (working sets) → [`ops`]
//! (save, restore, recover, checkpoint, track: orchestration only);
//! [`store`] puts images in S3-compatible object stores.
//! [`mem`] holds the vocabulary they share. The command line and the
//! benchmark tooling live in the `thaw` binary on top of this library.

pub mod config;
pub(crate) mod engine;
pub mod failpoint;
pub mod image;
pub mod live;
pub mod mem;
pub(crate) mod observe;
pub mod ops;
pub mod progress;
pub mod remote;
mod sched;
pub mod store;
#[cfg(test)]
mod testing;
pub mod vmm;
pub mod wss;
