//! A QEMU process held by pidfd.
//!
//! A pid alone names whatever process has that number *now*: after QEMU
//! died and the number was reused, a signal, a ptrace attach or a
//! `pidfd_getfd` sent by pid would reach an unrelated process. A
//! [`QemuProcess`] opens a pidfd first and then checks that the process
//! behind it is the one thaw recorded: its start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot) must be the one stored in the
//! VM's record. From then on the pidfd pins the identity: signals go through
//! `pidfd_send_signal`, liveness is the pidfd's readability (readable once
//! the process has exited), and file descriptors are copied with
//! `pidfd_getfd` on the same pidfd. Code that must use the pid itself
//! (ptrace, `/proc/<pid>/...`) checks [`QemuProcess::alive`] after
//! attaching: while the process has not exited its pid cannot be reused.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;

/// Errors opening or using a process handle.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {pid} does not exist (any more)")]
    Gone { pid: i32 },
    #[error("process {pid} is not VM {vm}'s QEMU any more (pid reused: it started at tick {found}, QEMU at tick {expected})")]
    Reused {
        pid: i32,
        vm: String,
        expected: u64,
        found: u64,
    },
    #[error("process {pid} does not look like VM {vm}'s QEMU ({why}); thaw leaves it alone")]
    NotQemu { pid: i32, vm: String, why: String },
    #[error("pidfd_open({pid}) failed: {errno}")]
    Open { pid: i32, errno: Errno },
    #[error("signalling process {pid} failed: {errno}")]
    Signal { pid: i32, errno: Errno },
    #[error("reading {path}: {source}")]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A process (QEMU, or in tests any child) held by a pidfd and identified
/// by its start time.
#[derive(Debug)]
pub struct QemuProcess {
    pid: Pid,
    pidfd: OwnedFd,
    start_time: u64,
}

impl QemuProcess {
    /// Opens a handle on process `pid` as it is now, recording its start
    /// time. Only for a process whose pid thaw knows to be right at this
    /// moment: one it just started (and has not reaped) or just verified.
    pub fn open(pid: i32) -> Result<QemuProcess, ProcessError> {
        let pidfd = pidfd_open(pid)?;
        let start_time = start_time(pid)?;
        let process = QemuProcess {
            pid: Pid::from_raw(pid),
            pidfd,
            start_time,
        };
        // The start time was read after the pidfd was opened: if the
        // process is still running, both name the same process.
        if !process.alive() {
            return Err(ProcessError::Gone { pid });
        }
        Ok(process)
    }

    /// Opens the QEMU of VM `vm` recorded as `pid` started at
    /// `recorded_start` (clock ticks since boot; 0 in records written
    /// before thaw kept it). A different start time means the pid was
    /// reused: [`ProcessError::Reused`], and the process is not touched.
    /// Without a recorded start time the process must at least look like
    /// this VM's QEMU (its command line), and a warning says so.
    pub fn open_vm(vm: &str, pid: i32, recorded_start: u64) -> Result<QemuProcess, ProcessError> {
        let process = QemuProcess::open(pid)?;
        if recorded_start != 0 {
            if process.start_time != recorded_start {
                return Err(ProcessError::Reused {
                    pid,
                    vm: vm.to_string(),
                    expected: recorded_start,
                    found: process.start_time,
                });
            }
            return Ok(process);
        }
        process.check_looks_like_qemu(vm)?;
        log::warn!(
            "VM {vm}'s record predates start-time checks; process {pid} was identified by its command line only"
        );
        Ok(process)
    }

    /// The process id (also the id of its main thread).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The process's start time, in clock ticks since boot.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The pidfd.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// A second handle on the same process (a duplicated pidfd).
    pub fn try_clone(&self) -> Result<QemuProcess, ProcessError> {
        let pidfd = self.pidfd.try_clone().map_err(|e| ProcessError::Open {
            pid: self.pid.as_raw(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)),
        })?;
        Ok(QemuProcess {
            pid: self.pid,
            pidfd,
            start_time: self.start_time,
        })
    }

    /// Whether the process is still running: its pidfd is not readable yet
    /// and it is not a zombie.
    pub fn alive(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        if !matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(0)) {
            return false;
        }
        // A zombie's pid is still taken, so /proc/<pid> is this process.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let state = stat_fields(&stat).and_then(|f| f.first().copied());
        !state.is_none_or(|s| s.starts_with('Z'))
    }

    /// Sends SIGKILL through the pidfd (never to a reused pid). A process
    /// that has exited already is not an error.
    pub fn kill(&self) -> Result<(), ProcessError> {
        match rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
            Err(e) => Err(ProcessError::Signal {
                pid: self.pid.as_raw(),
                errno: Errno::from_raw(e.raw_os_error()),
            }),
        }
    }

    /// Waits up to `within` for the process to exit; true once it has.
    pub async fn wait_exit(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.alive() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Copies the process's file descriptor `fd` into thaw (`pidfd_getfd`
    /// on the held pidfd).
    pub fn get_fd(&self, fd: i32) -> Result<OwnedFd, Errno> {
        rustix::process::pidfd_getfd(&self.pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
            .map_err(|e| Errno::from_raw(e.raw_os_error()))
    }

    /// Refuses a process whose command line is not QEMU's for VM `vm`
    /// (`qemu` in its program name, `-name <vm>[,...]` among its arguments).
    pub fn check_looks_like_qemu(&self, vm: &str) -> Result<(), ProcessError> {
        let pid = self.pid.as_raw();
        let path = PathBuf::from(format!("/proc/{pid}/cmdline"));
        let cmdline = std::fs::read(&path).map_err(|source| ProcessError::Proc { path, source })?;
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let not = |why: &str| ProcessError::NotQemu {
            pid,
            vm: vm.to_string(),
            why: why.to_string(),
        };
        let program = args.first().map(String::as_str).unwrap_or_default();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let is_qemu = |p: &str| {
            std::path::Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("qemu"))
        };
        if !is_qemu(program) && !is_qemu(&exe.to_string_lossy()) {
            return Err(not("its program is not QEMU"));
        }
        let named = args.windows(2).any(|w| {
            w[0] == "-name"
                && w[1]
                    .split(',')
                    .next()
                    .is_some_and(|n| n == vm || n.strip_prefix("guest=") == Some(vm))
        });
        if !named {
            return Err(not("its -name is another VM's"));
        }
        Ok(())
    }
}

impl AsFd for QemuProcess {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, ProcessError> {
    let rpid = rustix::process::Pid::from_raw(pid).ok_or(ProcessError::Gone { pid })?;
    rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty()).map_err(|e| {
        if e == rustix::io::Errno::SRCH || e == rustix::io::Errno::INVAL {
            ProcessError::Gone { pid }
        } else {
            ProcessError::Open {
                pid,
                errno: Errno::from_raw(e.raw_os_error()),
            }
        }
    })
}

/// The fields of a `/proc/<pid>/stat` line after the command name (which
/// may itself hold spaces and parentheses): field 3 (state) first.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// Process `pid`'s start time: field 22 of `/proc/<pid>/stat`, in clock
/// ticks since boot.
pub fn start_time(pid: i32) -> Result<u64, ProcessError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ProcessError::Gone { pid })
        }
        Err(source) => return Err(ProcessError::Proc { path, source }),
    };
    parse_start_time(&stat).ok_or_else(|| ProcessError::Proc {
        path,
        source: std::io::Error::other("no start time in it"),
    })
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // Field 22 is the 20th after the command name (fields 3 onwards).
    stat_fields(stat)?.get(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::inject::tests::Child;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "1234 (qemu) x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 \
                    7 0 987654 1000000 200 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("1 (init) S 0"), None);
    }

    #[test]
    fn a_handle_follows_its_process_and_refuses_a_reused_pid() {
        let mut child = Child::spawn(|| loop {
            // SAFETY: pause(2) only waits for a signal.
            unsafe { libc::pause() };
        });
        let raw = child.pid.as_raw();
        let p = QemuProcess::open(raw).expect("open");
        assert!(p.alive());
        assert_eq!(p.start_time(), start_time(raw).expect("start time"));
        let same = QemuProcess::open_vm("demo", raw, p.start_time()).expect("same process");
        assert_eq!(same.pid(), p.pid());
        let err = QemuProcess::open_vm("demo", raw, p.start_time() + 1).expect_err("reused");
        assert!(matches!(err, ProcessError::Reused { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "process {raw} is not VM demo's QEMU any more (pid reused"
            )),
            "{err}"
        );
        // Not QEMU: without a recorded start time it is left alone.
        let err = QemuProcess::open_vm("demo", raw, 0).expect_err("not qemu");
        assert!(matches!(err, ProcessError::NotQemu { .. }), "{err:?}");
        p.kill().expect("kill");
        let _ = child.wait();
        assert!(!p.alive());
        p.kill().expect("killing an exited process is no error");
        assert!(matches!(
            QemuProcess::open(raw),
            Err(ProcessError::Gone { .. })
        ));
    }
}
