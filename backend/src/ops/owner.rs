//! The per-VM owner lock: at most one thaw operation at a time ptraces a
//! VM's QEMU or holds a userfaultfd on its RAM.
//!
//! Two tracers cannot both seize QEMU's threads, and a range of guest RAM
//! can be registered with one userfaultfd only (a second gets `EBUSY`). So
//! `thaw save`, `restore`, `recover`, `checkpoint` and `track` (`abit` and
//! `dirty`) each take this lock for their whole run: an exclusive,
//! non-blocking `flock` on `lock` in the VM's runtime directory, whose
//! content names the holder (operation, thaw's pid, since when). A second
//! operation is refused at once with one line naming the holder, e.g.
//! `VM demo is busy: thaw track (pid 1234) holds it since 12:01:02; stop it
//! first`.
//!
//! A running `thaw track` holds the lock until it stops. `thaw save` and
//! `thaw checkpoint` are what a tracker works for, so they take over from it
//! ([`OwnerLock::acquire_after_tracker`]): they ask the tracker to stop
//! (SIGINT, as Ctrl-C would), wait until it has written its last estimate
//! and let the lock go, and store that estimate with the image. Any other
//! pair is refused. Tracking and saving cannot overlap anyway: `dirty` keeps
//! a userfaultfd registered the whole time, and an `abit` tracker that went
//! on during a save would zap QEMU's page tables under it and count the
//! save's own pass as guest accesses.
//!
//! The lock belongs to the open file, so it goes away with the process that
//! held it, however that process ended. `thaw recover` relies on this: a
//! restore record whose lock nobody holds is a restore whose thaw died.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::vmm::VmPaths;

/// The holder's record is one short JSON line; anything longer is not one.
const MAX_RECORD: u64 = 4096;

/// Operations that serve a restore (`thaw status`, `thaw recover`).
const RESTORING: [&str; 2] = ["restore", "recover"];

/// Who holds a VM's owner lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The thaw operation: `save`, `restore`, `recover`, `checkpoint`, `track`.
    pub operation: String,
    /// The holding thaw process.
    pub pid: u32,
    /// When it took the lock (seconds since the epoch).
    pub since_unix: u64,
}

impl Holder {
    /// Whether the holder is serving a restore (a `restore` or `recover`).
    pub fn serves_restore(&self) -> bool {
        RESTORING.contains(&self.operation.as_str())
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "thaw {} (pid {}) holds it since {}",
            self.operation,
            self.pid,
            clock_time(self.since_unix)
        )
    }
}

/// Errors taking the owner lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("VM {vm} is busy: {}; stop it first", holder.as_ref().map_or_else(|| "another thaw holds it".to_string(), Holder::to_string))]
    Busy {
        vm: String,
        /// `None` when the holder's record cannot be read (it may be
        /// writing it this very moment).
        holder: Option<Holder>,
    },
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LockError {
    /// Who holds the lock, when the error is [`LockError::Busy`] and says.
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            LockError::Busy { holder, .. } => holder.as_ref(),
            LockError::Io { .. } => None,
        }
    }
}

/// A held owner lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct OwnerLock {
    file: Flock<File>,
    path: PathBuf,
    holder: Holder,
}

impl OwnerLock {
    /// Takes VM `paths`' owner lock for `operation`, or refuses at once with
    /// [`LockError::Busy`] naming the holder.
    pub fn acquire(paths: &VmPaths, operation: &str) -> Result<OwnerLock, LockError> {
        let path = paths.lock.clone();
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(LockError::Busy {
                    vm: paths.name.clone(),
                    holder: read_holder(&path),
                })
            }
            Err((_, errno)) => return Err(io_err("cannot lock", &path)(errno.into())),
        };
        let holder = Holder {
            operation: operation.to_string(),
            pid: std::process::id(),
            since_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let mut line = serde_json::to_vec(&holder).map_err(|e| LockError::Io {
            context: "cannot encode the holder for",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(&line))
            .map_err(io_err("cannot write", &path))?;
        log::debug!("{} holds VM {}'s owner lock", operation, paths.name);
        Ok(OwnerLock { file, path, holder })
    }

    /// [`OwnerLock::acquire`], except that a `thaw track` holding the lock is
    /// asked to stop (SIGINT) and waited for, at most `patience`: a save or
    /// checkpoint takes over from the tracker whose estimate it stores.
    pub async fn acquire_after_tracker(
        paths: &VmPaths,
        operation: &str,
        patience: std::time::Duration,
    ) -> Result<OwnerLock, LockError> {
        let tracker = match OwnerLock::acquire(paths, operation) {
            Err(LockError::Busy {
                holder: Some(h), ..
            }) if h.operation == "track" && h.pid != 0 => h,
            other => return other,
        };
        log::info!(
            "stopping thaw track (pid {}) of VM {}: {operation} stores its estimate",
            tracker.pid,
            paths.name
        );
        // The tracker holds the lock, so it is alive: its pid is its own.
        let pid = i32::try_from(tracker.pid).map_err(|_| LockError::Busy {
            vm: paths.name.clone(),
            holder: Some(tracker.clone()),
        })?;
        if let Err(errno) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        ) {
            log::debug!("signalling thaw track (pid {pid}): {errno}");
        }
        let deadline = std::time::Instant::now() + patience;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            match OwnerLock::acquire(paths, operation) {
                Err(LockError::Busy { holder, .. })
                    if std::time::Instant::now() < deadline
                        && holder.as_ref().is_none_or(|h| *h == tracker) => {}
                other => return other,
            }
        }
    }

    /// Who holds VM `paths`' owner lock now; `None` when nobody does.
    pub fn holder(paths: &VmPaths) -> Result<Option<Holder>, LockError> {
        let path = &paths.lock;
        let file = match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot open", path)(e)),
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // Free: let it go again at once.
            Ok(_) => Ok(None),
            Err((_, Errno::EWOULDBLOCK)) => Ok(Some(read_holder(path).unwrap_or(Holder {
                operation: "(unknown)".into(),
                pid: 0,
                since_unix: 0,
            }))),
            Err((_, errno)) => Err(io_err("cannot lock", path)(errno.into())),
        }
    }

    /// This lock's holder (this process).
    pub fn holder_record(&self) -> &Holder {
        &self.holder
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // Nobody holds it any more: no stale name in it (best effort; the
        // flock itself is released when the file is closed).
        if let Err(e) = self.file.set_len(0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::debug!("cannot clear {}: {e}", self.path.display());
            }
        }
    }
}

fn io_err<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LockError + 'a {
    move |source| LockError::Io {
        context,
        path: path.to_owned(),
        source,
    }
}

/// The holder's record, if it is readable and well formed.
fn read_holder(path: &Path) -> Option<Holder> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut text = Vec::new();
    file.take(MAX_RECORD).read_to_end(&mut text).ok()?;
    serde_json::from_slice(text.trim_ascii()).ok()
}

/// `HH:MM:SS` in local time, or the date and time if it is not today.
fn clock_time(unix: u64) -> String {
    let Ok(t) = libc::time_t::try_from(unix) else {
        return unix.to_string();
    };
    let now = libc::time_t::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
    .unwrap_or(t);
    let (Some(then), Some(today)) = (local_time(t), local_time(now)) else {
        return unix.to_string();
    };
    let clock = format!("{:02}:{:02}:{:02}", then.tm_hour, then.tm_min, then.tm_sec);
    if (then.tm_year, then.tm_yday) == (today.tm_year, today.tm_yday) {
        clock
    } else {
        format!(
            "{}-{:02}-{:02} {clock}",
            then.tm_year + 1900,
            then.tm_mon + 1,
            then.tm_mday
        )
    }
}

fn local_time(t: libc::time_t) -> Option<libc::tm> {
    // SAFETY: `tm` is plain integers (and a pointer the C library fills in),
    // valid when zeroed; localtime_r writes only into it and reads `t`.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&t, &mut tm).is_null()).then_some(tm)
    }
}

impl From<LockError> for crate::ops::restore::RestoreError {
    /// A restore or recovery that holds the lock is "still served"; any
    /// other holder is reported as such.
    fn from(e: LockError) -> Self {
        match &e {
            LockError::Busy {
                vm,
                holder: Some(h),
            } if h.serves_restore() => crate::ops::restore::RestoreError::StillServed(vm.clone()),
            _ => crate::ops::restore::RestoreError::Busy(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> VmPaths {
        let mut p = VmPaths::new("demo");
        p.dir = dir.to_owned();
        p.lock = dir.join("lock");
        p
    }

    #[test]
    fn a_second_operation_is_refused_with_the_holder_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = paths(tmp.path());
        assert_eq!(OwnerLock::holder(&p).expect("probe"), None);
        let lock = OwnerLock::acquire(&p, "track").expect("acquire");
        assert_eq!(lock.holder_record().operation, "track");
        let err = OwnerLock::acquire(&p, "save").expect_err("busy");
        let holder = err.holder().expect("holder named").clone();
        assert_eq!(holder.operation, "track");
        assert_eq!(holder.pid, std::process::id());
        let text = err.to_string();
        let want = format!(
            "VM demo is busy: thaw track (pid {}) holds it since ",
            std::process::id()
        );
        assert!(text.starts_with(&want), "{text}");
        assert!(text.ends_with("; stop it first"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
        assert_eq!(OwnerLock::holder(&p).expect("probe"), Some(holder));
    }

    #[test]
    fn the_lock_is_released_on_drop() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = paths(tmp.path());
        drop(OwnerLock::acquire(&p, "checkpoint").expect("acquire"));
        assert_eq!(OwnerLock::holder(&p).expect("probe"), None);
        let again = OwnerLock::acquire(&p, "restore").expect("free again");
        assert!(OwnerLock::holder(&p)
            .expect("probe")
            .is_some_and(|h| h.serves_restore()));
        drop(again);
        assert_eq!(OwnerLock::holder(&p).expect("probe"), None);
    }

    #[test]
    fn an_unreadable_record_still_refuses() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = paths(tmp.path());
        let _lock = OwnerLock::acquire(&p, "save").expect("acquire");
        std::fs::write(&p.lock, b"garbage").expect("write");
        let err = OwnerLock::acquire(&p, "track").expect_err("busy");
        assert_eq!(
            err.to_string(),
            "VM demo is busy: another thaw holds it; stop it first"
        );
    }

    #[test]
    fn times_of_today_show_the_clock_only() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let t = clock_time(now);
        assert_eq!(t.len(), 8, "{t}");
        assert_eq!(t.matches(':').count(), 2, "{t}");
    }
}
