//! Test support shared by the modules' tests: a helper process that is
//! the test binary itself, re-run to execute one named test as a stand-in
//! for QEMU (it maps a shared memfd the way QEMU maps guest RAM).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;

/// A helper process and its pipes.
pub(crate) struct Helper {
    pub child: Child,
    pub stdin: ChildStdin,
    /// Its stdout lines that carry the tag, with the tag cut off.
    pub lines: Receiver<String>,
}

/// Re-runs the test binary as `test` (its full path, e.g.
/// `engine::tests::mapper_process`) with `env` set, `memfd` at fd
/// `child_fd`, stdin and stdout piped; forwards the stdout lines that
/// contain `tag`.
pub(crate) fn spawn(
    test: &str,
    env: &str,
    memfd: &OwnedFd,
    child_fd: i32,
    tag: &'static str,
) -> Helper {
    let raw = memfd.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: dup2 is async-signal-safe; it puts the memfd at the fd
    // number the helper expects (clearing close-on-exec there).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, child_fd) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the helper process");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest's own "test ... " may precede the tag on a line.
            if let Some(at) = line.find(tag) {
                if tx.send(line[at + tag.len()..].to_string()).is_err() {
                    break;
                }
            }
        }
    });
    Helper {
        child,
        stdin,
        lines,
    }
}

/// Maps `len` bytes of fd `fd` shared and writable in this (helper)
/// process; returns the address.
pub(crate) fn map_shared(fd: i32, len: usize) -> usize {
    // SAFETY: a fresh shared read-write mapping of an inherited memfd at a
    // place the kernel picks; the helpers touch it only at page offsets
    // inside it, through volatile accesses.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "helper: mmap failed");
    base as usize
}
