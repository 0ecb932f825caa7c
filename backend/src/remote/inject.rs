//! Runs system calls inside another process (x86-64), invisibly to it: one
//! thread is seized and interrupted with ptrace, made to execute a `syscall`
//! instruction with chosen arguments, and put back exactly as it was.
//!
//! thaw uses this to make QEMU create a userfaultfd (only the process that
//! owns an mm can register its ranges) and to run calls such as `close` or
//! `madvise` in QEMU's address space.
//!
//! How a call is made invisible:
//! - all general registers (including `orig_rax`) are saved at the stop and
//!   restored after every call, so a system call the thread was blocked in
//!   (typically `ppoll`) restarts exactly as the kernel intended;
//! - the injected call runs with `orig_rax = -1`, so no restart logic is
//!   applied to it, and with every signal but `SIGTRAP` blocked (the mask is
//!   restored afterwards, as CRIU's compel does);
//! - the `syscall` instruction executed is, in order of preference, the one
//!   the thread is stopped behind (`rip - 2`), one inside the vDSO, or, as a
//!   last resort, two bytes written at `rip` and restored right after the call;
//! - only this one thread is stopped, except for that last resort: code is
//!   never patched while another thread of the process runs (it could
//!   execute the patched bytes), so before patching every other thread (in
//!   `/proc/<pid>/task`) is seized and interrupted too, and all of them are
//!   detached, as they were, when the injector is released; if one of them
//!   cannot be stopped the patch is refused ([`InjectError::PatchRefused`]);
//! - signals that arrive meanwhile are re-sent to the thread before it is
//!   released.
//!
//! The process is named by a [`QemuProcess`] handle: its identity is checked
//! before the first ptrace request and again once its main thread is
//! stopped, so a reused pid is never touched.
//!
//! Requires root or `CAP_SYS_PTRACE` over the target. An [`Injector`] must be
//! used from the thread that created it (ptrace binds the tracee to the
//! tracing thread), so it is neither `Send` nor `Sync`.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("thaw's system call injection supports x86-64 only");

use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace::{self, AddressType, Event, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::mem::{usize_from, HostAddr};
use crate::remote::process::{ProcessError, QemuProcess};

/// The `syscall` instruction (`0f 05`) as a little-endian 16-bit word.
const SYSCALL_INSN: u64 = 0x050f;
/// Length of the `syscall` instruction.
const SYSCALL_LEN: u64 = 2;
/// How long a thread may take to reach a ptrace stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an injected call may run before it is interrupted, by default.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on stops handled while waiting for one expected stop.
const MAX_STOPS: usize = 64;
/// Kernel-internal "restart me" return values (`-ERESTARTSYS` ... `-ERESTART_RESTARTBLOCK`).
const ERESTART_RANGE: std::ops::RangeInclusive<i64> = -516..=-512;
/// Argument registers of the x86-64 system call ABI, in order.
const MAX_ARGS: usize = 6;
/// Rounds of listing and stopping threads before a process whose thread
/// count keeps changing is given up on.
const MAX_THREAD_ROUNDS: usize = 64;

/// Errors injecting a system call.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("thread {pid} does not exist")]
    NoSuchThread { pid: Pid },
    #[error(
        "not permitted to ptrace {pid}: thaw must run as root or with CAP_SYS_PTRACE over the \
         target, and the Yama policy (kernel.yama.ptrace_scope) must allow attaching"
    )]
    PermissionDenied { pid: Pid },
    #[error("{pid} is already traced by process {tracer} (a debugger, strace or another thaw?)")]
    AlreadyTraced { pid: Pid, tracer: i32 },
    #[error("ptrace {op} on {pid} failed: {errno}")]
    Ptrace {
        op: &'static str,
        pid: Pid,
        errno: Errno,
    },
    #[error("waiting for {pid} to stop failed: {errno}")]
    Wait { pid: Pid, errno: Errno },
    #[error("{pid} did not stop within {waited:?} (stuck in an uninterruptible sleep?)")]
    StopTimeout { pid: Pid, waited: Duration },
    #[error("{pid} went away while a system call was being injected: {how}")]
    Gone { pid: Pid, how: String },
    #[error("unexpected stop of {pid} while injecting a system call: {detail}")]
    UnexpectedStop { pid: Pid, detail: String },
    #[error("the injected system call {nr} faulted in {pid} with {signal} at {addr:#x}")]
    SiteFault {
        pid: Pid,
        nr: i64,
        signal: Signal,
        addr: u64,
    },
    #[error("the injected system call {nr} did not return within {waited:?} in {pid}; it was interrupted")]
    CallTimeout { pid: Pid, nr: i64, waited: Duration },
    #[error("{call} failed inside process {pid}: {errno}")]
    CallFailed {
        pid: Pid,
        call: &'static str,
        errno: Errno,
    },
    #[error("a system call takes at most {MAX_ARGS} arguments, got {0}")]
    TooManyArgs(usize),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(
        "process {pid} offers no `syscall` instruction to reuse, and thaw patches code only \
         while every thread is stopped, which failed: {why}"
    )]
    PatchRefused { pid: Pid, why: String },
}

/// Which `syscall` instructions an [`Injector`] may use (tests force the fallbacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SitePolicy {
    /// `rip - 2`, then the vDSO, then a patch at `rip`.
    Auto,
    /// Skip `rip - 2`.
    #[cfg_attr(not(test), allow(dead_code))]
    NoRipMinus2,
    /// Always patch at `rip`.
    #[cfg_attr(not(test), allow(dead_code))]
    PatchOnly,
}

/// Where the injected `syscall` instruction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    /// The instruction the thread is stopped behind.
    RipMinus2(u64),
    /// A `0f 05` byte pair inside the vDSO.
    Vdso(u64),
    /// Written at `rip` over `word` for the duration of one call.
    Patch { addr: u64, word: i64 },
}

impl Site {
    fn addr(self) -> u64 {
        match self {
            Site::RipMinus2(a) | Site::Vdso(a) | Site::Patch { addr: a, .. } => a,
        }
    }
}

/// One seized and interrupted thread of another process.
///
/// While it exists, the thread is stopped; [`Injector::detach`] (or dropping
/// it) lets the thread continue as if nothing happened.
pub struct Injector {
    pid: Pid,
    /// Registers at the stop; restored after every call.
    saved: libc::user_regs_struct,
    /// The thread's signal mask at the stop (as `PTRACE_GETSIGMASK` reports it).
    sigmask: u64,
    /// A reusable `syscall` instruction, found at the first call.
    site: Option<Site>,
    policy: SitePolicy,
    /// How long one call may run before it is interrupted.
    call_timeout: Duration,
    /// Signals (bit `n - 1` for signal `n`) that arrived during a call and
    /// were held back; re-sent before the thread is released.
    deferred: u64,
    /// Whether the thread is known to sit in a ptrace stop.
    stopped: bool,
    detached: bool,
    /// The process's other threads, seized and stopped before a patch.
    others: Vec<Pid>,
    /// Whether every other thread is stopped (a patch is allowed).
    all_stopped: bool,
    /// ptrace requests must come from the tracing thread.
    _not_send: PhantomData<*const ()>,
}

impl Injector {
    /// Seizes the main thread of `process` (whose id is the process id)
    /// and stops it with `PTRACE_INTERRUPT`. The process must not have
    /// exited before or while it is seized: a pid is not reused before
    /// then, so the stopped thread is this process's.
    pub fn attach(process: &QemuProcess) -> Result<Injector, InjectError> {
        let pid = process.pid();
        if !process.alive() {
            return Err(ProcessError::Gone { pid: pid.as_raw() }.into());
        }
        ptrace::seize(pid, Options::empty()).map_err(|errno| seize_error(pid, errno))?;
        let mut inj = Injector {
            pid,
            // SAFETY: user_regs_struct is plain integers; all-zero is a valid value,
            // and it is overwritten below before any use.
            saved: unsafe { std::mem::zeroed() },
            sigmask: 0,
            site: None,
            policy: SitePolicy::Auto,
            call_timeout: CALL_TIMEOUT,
            deferred: 0,
            stopped: false,
            detached: false,
            others: Vec::new(),
            all_stopped: false,
            _not_send: PhantomData,
        };
        // From here on, dropping `inj` releases the thread.
        ptrace::interrupt(pid).map_err(|errno| inj.ptrace_err("INTERRUPT", errno))?;
        wait_interrupt_stop(pid)?;
        inj.stopped = true;
        if !process.alive() {
            return Err(ProcessError::Gone { pid: pid.as_raw() }.into());
        }
        inj.saved = ptrace::getregs(pid).map_err(|errno| inj.ptrace_err("GETREGS", errno))?;
        inj.sigmask = inj.get_sigmask()?;
        log::debug!(
            "seized thread {pid}: rip {:#x}, orig_rax {}",
            inj.saved.rip,
            reg_signed(inj.saved.orig_rax)
        );
        Ok(inj)
    }

    /// The stopped thread.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Runs system call `nr` with `args` (at most six) in the thread and
    /// returns its raw result: negative values are `-errno`. The thread is
    /// back in its saved state when this returns, also on errors.
    ///
    /// Inject only calls that return promptly; one still running after the
    /// call timeout (see [`Injector::set_call_timeout`]) is interrupted and
    /// reported as [`InjectError::CallTimeout`]. Calls that use the thread's
    /// restart block (`nanosleep`, `poll`...) must not be injected.
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64, InjectError> {
        if args.len() > MAX_ARGS {
            return Err(InjectError::TooManyArgs(args.len()));
        }
        let site = self.site()?;
        let mut regs = self.saved;
        regs.rax = reg_unsigned(nr);
        regs.orig_rax = u64::MAX; // -1: not in a system call, no restart logic
        regs.rip = site.addr();
        let mut a = [0u64; MAX_ARGS];
        a[..args.len()].copy_from_slice(args);
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
            (a[0], a[1], a[2], a[3], a[4], a[5]);

        let result = self.prepare(site).and_then(|()| self.run(&regs, site, nr));
        let restored = self.restore(site);
        let ret = result?;
        restored?;
        log::debug!(
            "injected system call {nr}{args:x?} into {} at {site:x?}: {ret}",
            self.pid
        );
        Ok(ret)
    }

    /// How long a call may run before it is interrupted (default 5 s);
    /// raise it for slow calls such as `madvise` over a large range.
    pub fn set_call_timeout(&mut self, timeout: Duration) {
        self.call_timeout = timeout;
    }

    /// Lets the thread continue where it was stopped.
    pub fn detach(mut self) -> Result<(), InjectError> {
        self.release()
    }

    /// Blocks every signal but `SIGTRAP` and writes the instruction if patching.
    fn prepare(&mut self, site: Site) -> Result<(), InjectError> {
        // SIGTRAP must stay deliverable: the single-step trap is forced, and a
        // forced blocked signal would reset its handler to the default.
        self.set_sigmask(!sig_bit(Signal::SIGTRAP))?;
        if let Site::Patch { addr, word } = site {
            let patched = (reg_unsigned(word) & !0xffff) | SYSCALL_INSN;
            ptrace::write(self.pid, addr as AddressType, reg_signed(patched))
                .map_err(|errno| self.ptrace_err("POKETEXT", errno))?;
        }
        Ok(())
    }

    /// Puts back the text word, the registers and the signal mask; reports
    /// the first failure but tries every step.
    fn restore(&mut self, site: Site) -> Result<(), InjectError> {
        let mut first: Option<InjectError> = None;
        if let Site::Patch { addr, word } = site {
            if let Err(errno) = ptrace::write(self.pid, addr as AddressType, word) {
                first.get_or_insert(self.ptrace_err("POKETEXT (restore)", errno));
            }
        }
        if let Err(errno) = ptrace::setregs(self.pid, self.saved) {
            first.get_or_insert(self.ptrace_err("SETREGS (restore)", errno));
        }
        if let Err(e) = self.set_sigmask(self.sigmask) {
            first.get_or_insert(e);
        }
        match first {
            None => Ok(()),
            Some(e) => {
                log::error!(
                    "could not restore the state of thread {} after an injected call: {e}",
                    self.pid
                );
                Err(e)
            }
        }
    }

    /// Single-steps over the `syscall` at `site` and returns `rax`.
    fn run(
        &mut self,
        regs: &libc::user_regs_struct,
        site: Site,
        nr: i64,
    ) -> Result<i64, InjectError> {
        let (at, after) = (site.addr(), site.addr() + SYSCALL_LEN);
        ptrace::setregs(self.pid, *regs).map_err(|errno| self.ptrace_err("SETREGS", errno))?;
        self.step()?;
        let mut deadline = Instant::now() + self.call_timeout;
        let mut interrupted = false;
        for _ in 0..MAX_STOPS {
            let status = match self.wait_status(deadline) {
                Err(InjectError::StopTimeout { .. }) if !interrupted => {
                    // The call blocks: interrupt it (it returns -ERESTART*)
                    // and clean up at the next stop.
                    log::warn!(
                        "system call {nr} injected into {} does not return; interrupting it",
                        self.pid
                    );
                    ptrace::interrupt(self.pid)
                        .map_err(|errno| self.ptrace_err("INTERRUPT", errno))?;
                    interrupted = true;
                    deadline = Instant::now() + STOP_TIMEOUT;
                    continue;
                }
                other => other?,
            };
            self.stopped = true;
            // A signal-delivery stop, or PTRACE_EVENT_STOP (group stop, interrupt).
            let sig = match status {
                WaitStatus::Stopped(_, sig) => Some(sig),
                WaitStatus::PtraceEvent(_, _, ev) if ev == Event::PTRACE_EVENT_STOP as i32 => None,
                WaitStatus::Exited(_, code) => {
                    return Err(self.gone(format!("exited with status {code}")))
                }
                WaitStatus::Signaled(_, s, _) => return Err(self.gone(format!("killed by {s}"))),
                other => {
                    return Err(InjectError::UnexpectedStop {
                        pid: self.pid,
                        detail: format!("{other:?}"),
                    })
                }
            };
            let now =
                ptrace::getregs(self.pid).map_err(|errno| self.ptrace_err("GETREGS", errno))?;
            match sig {
                Some(Signal::SIGTRAP) if now.rip == after => {
                    return self.finish(nr, now.rax, interrupted)
                }
                Some(s @ (Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL)) if now.rip == at => {
                    // Caused by our instruction; dropped when the thread is
                    // released (detach passes no signal).
                    return Err(InjectError::SiteFault {
                        pid: self.pid,
                        nr,
                        signal: s,
                        addr: at,
                    });
                }
                Some(Signal::SIGTRAP) if now.rip != at => {
                    return Err(InjectError::UnexpectedStop {
                        pid: self.pid,
                        detail: format!("SIGTRAP at {:#x}, expected {after:#x}", now.rip),
                    });
                }
                Some(other) => {
                    // Not ours (ours comes after the instruction ran): the
                    // thread's own signal, held back and re-sent at release.
                    log::debug!(
                        "holding back {other} for {} during an injected call",
                        self.pid
                    );
                    self.deferred |= sig_bit(other);
                }
                None => {}
            }
            // Not done yet: either the instruction has not run (rip == at), or
            // it ran and its single-step trap is still queued (rip == after).
            if now.rip == after && !self.sigtrap_pending() {
                return self.finish(nr, now.rax, interrupted);
            }
            if now.rip != at && now.rip != after {
                return Err(InjectError::UnexpectedStop {
                    pid: self.pid,
                    detail: format!(
                        "stopped at {:#x}, outside the injected instruction at {at:#x}",
                        now.rip
                    ),
                });
            }
            self.step()?;
        }
        Err(InjectError::UnexpectedStop {
            pid: self.pid,
            detail: format!("more than {MAX_STOPS} stops"),
        })
    }

    /// The result of a completed call: a call cut short by a signal (which
    /// only the timeout's interrupt can cause) is not restarted.
    fn finish(&self, nr: i64, rax: u64, interrupted: bool) -> Result<i64, InjectError> {
        let ret = reg_signed(rax);
        if !ERESTART_RANGE.contains(&ret) {
            Ok(ret)
        } else if interrupted {
            Err(InjectError::CallTimeout {
                pid: self.pid,
                nr,
                waited: self.call_timeout,
            })
        } else {
            Ok(-(Errno::EINTR as i64))
        }
    }

    /// Finds the `syscall` instruction to use for the next call.
    fn site(&mut self) -> Result<Site, InjectError> {
        if let Some(site) = self.site {
            if !matches!(site, Site::Patch { .. }) {
                return Ok(site);
            }
        }
        let rip = self.saved.rip;
        if self.policy == SitePolicy::Auto && rip >= SYSCALL_LEN {
            // Inside a system call the two bytes before rip are the `syscall`
            // that entered it; otherwise they are usable only if they happen to
            // be `0f 05` on the same (executable) page.
            let in_syscall = reg_signed(self.saved.orig_rax) >= 0;
            let same_page = (rip - SYSCALL_LEN) / 4096 == rip / 4096;
            if in_syscall || same_page {
                if let Ok(word) = ptrace::read(self.pid, (rip - SYSCALL_LEN) as AddressType) {
                    if reg_unsigned(word) & 0xffff == SYSCALL_INSN {
                        let site = Site::RipMinus2(rip - SYSCALL_LEN);
                        self.site = Some(site);
                        return Ok(site);
                    }
                }
            }
        }
        if self.policy != SitePolicy::PatchOnly {
            match find_vdso_syscall(self.pid) {
                Ok(Some(addr)) => {
                    let site = Site::Vdso(addr);
                    self.site = Some(site);
                    return Ok(site);
                }
                Ok(None) => log::debug!("no syscall instruction in the vDSO of {}", self.pid),
                Err(e) => log::debug!("cannot scan the vDSO of {}: {e}", self.pid),
            }
        }
        // Last resort: write `syscall` at rip for the duration of each call.
        // Another thread running the same code meanwhile would execute it:
        // all of them are stopped first, or the patch is refused.
        self.stop_other_threads()?;
        let word = ptrace::read(self.pid, rip as AddressType)
            .map_err(|errno| self.ptrace_err("PEEKTEXT", errno))?;
        let site = Site::Patch { addr: rip, word };
        self.site = Some(site);
        Ok(site)
    }

    /// Seizes and interrupts every other thread of the process, until a
    /// listing of `/proc/<pid>/task` shows no thread that is not stopped
    /// (stopped threads cannot start new ones). On failure the threads
    /// stopped so far are let go and the patch is refused.
    fn stop_other_threads(&mut self) -> Result<(), InjectError> {
        if self.all_stopped {
            return Ok(());
        }
        let result = self.stop_other_threads_inner();
        match result {
            Ok(()) => {
                self.all_stopped = true;
                if !self.others.is_empty() {
                    log::debug!(
                        "stopped the {} other threads of {} before patching its code",
                        self.others.len(),
                        self.pid
                    );
                }
                Ok(())
            }
            Err(why) => {
                self.release_others();
                Err(InjectError::PatchRefused { pid: self.pid, why })
            }
        }
    }

    fn stop_other_threads_inner(&mut self) -> Result<(), String> {
        for _ in 0..MAX_THREAD_ROUNDS {
            let tids = threads_of(self.pid)
                .map_err(|e| format!("cannot list /proc/{}/task: {e}", self.pid))?;
            let new: Vec<Pid> = tids
                .into_iter()
                .filter(|t| *t != self.pid && !self.others.contains(t))
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            for tid in new {
                match seize_and_stop(tid) {
                    Ok(()) => self.others.push(tid),
                    // It exited meanwhile: nothing to stop.
                    Err(InjectError::NoSuchThread { .. } | InjectError::Gone { .. }) => {}
                    Err(e) => return Err(format!("thread {tid}: {e}")),
                }
            }
        }
        Err(format!(
            "its threads kept changing over {MAX_THREAD_ROUNDS} rounds"
        ))
    }

    /// Detaches the other threads stopped for a patch; they continue
    /// where they were interrupted.
    fn release_others(&mut self) {
        for tid in self.others.drain(..) {
            match ptrace::detach(tid, None) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => log::warn!("releasing thread {tid} failed: {errno}"),
            }
        }
        self.all_stopped = false;
    }

    /// `waitpid` for this thread until `deadline`.
    fn wait_status(&self, deadline: Instant) -> Result<WaitStatus, InjectError> {
        wait_status(self.pid, deadline)
    }

    fn step(&mut self) -> Result<(), InjectError> {
        ptrace::step(self.pid, None).map_err(|errno| self.ptrace_err("SINGLESTEP", errno))?;
        self.stopped = false;
        Ok(())
    }

    fn get_sigmask(&self) -> Result<u64, InjectError> {
        let mut mask: u64 = 0;
        // SAFETY: PTRACE_GETSIGMASK writes exactly `size_of::<u64>()` bytes
        // (the size passed as `addr`) to `mask`, which is a live, aligned u64.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGMASK,
                self.pid.as_raw(),
                std::mem::size_of::<u64>(),
                &mut mask as *mut u64,
            )
        };
        if r < 0 {
            return Err(self.ptrace_err("GETSIGMASK", Errno::last()));
        }
        Ok(mask)
    }

    fn set_sigmask(&self, mask: u64) -> Result<(), InjectError> {
        // SAFETY: PTRACE_SETSIGMASK reads `size_of::<u64>()` bytes from `mask`,
        // a live u64; the kernel keeps SIGKILL and SIGSTOP unblocked itself.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETSIGMASK,
                self.pid.as_raw(),
                std::mem::size_of::<u64>(),
                &mask as *const u64,
            )
        };
        if r < 0 {
            return Err(self.ptrace_err("SETSIGMASK", Errno::last()));
        }
        Ok(())
    }

    /// Whether a `SIGTRAP` is queued for the thread (`SigPnd` in its status).
    fn sigtrap_pending(&self) -> bool {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigPnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|pending| pending & sig_bit(Signal::SIGTRAP) != 0)
    }

    /// Re-sends held-back signals and detaches; the thread then continues
    /// from its saved state.
    fn release(&mut self) -> Result<(), InjectError> {
        if self.detached {
            return Ok(());
        }
        if !self.stopped {
            // Never reached (or left) a stop: detaching needs one.
            let _ = ptrace::interrupt(self.pid);
            match self.wait_status(Instant::now() + STOP_TIMEOUT) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
                | Err(InjectError::Gone { .. }) => {
                    self.detached = true;
                    return Ok(());
                }
                Ok(_) => self.stopped = true,
                Err(e) => return Err(e),
            }
        }
        self.detached = true;
        // The text is back (restored after every call): the other threads
        // may run again.
        self.release_others();
        for n in 1..=64 {
            if self.deferred & (1 << (n - 1)) != 0 {
                // SAFETY: tkill takes plain integers; the thread is ours to
                // signal (we trace it), and the signal queues until it runs.
                let r = unsafe { libc::syscall(libc::SYS_tkill, self.pid.as_raw(), n) };
                if r < 0 {
                    log::warn!(
                        "could not re-send signal {n} to {}: {}",
                        self.pid,
                        Errno::last()
                    );
                }
            }
        }
        ptrace::detach(self.pid, None).map_err(|errno| self.ptrace_err("DETACH", errno))?;
        log::debug!("released thread {}", self.pid);
        Ok(())
    }

    fn ptrace_err(&self, op: &'static str, errno: Errno) -> InjectError {
        ptrace_err(self.pid, op, errno)
    }

    fn gone(&self, how: String) -> InjectError {
        gone(self.pid, how)
    }

    /// Restricts which `syscall` instructions are used (tests of the fallbacks).
    #[cfg(test)]
    fn set_policy(&mut self, policy: SitePolicy) {
        self.policy = policy;
        self.site = None;
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::warn!("releasing thread {} failed: {e}", self.pid);
        }
    }
}

/// Attaches to the main thread of `process`, runs one system call in it
/// and detaches. Returns the call's raw result (negative values are `-errno`).
pub fn inject_syscall(process: &QemuProcess, nr: i64, args: &[u64]) -> Result<i64, InjectError> {
    let mut inj = Injector::attach(process)?;
    let ret = inj.syscall(nr, args);
    let detached = inj.detach();
    let ret = ret?;
    detached?;
    Ok(ret)
}

/// Drops `process`'s page-table entries for `start..start+len` with an
/// injected `madvise(MADV_DONTNEED)`. For a shared file mapping the data
/// stays in the page cache: the next access maps it again (a minor fault,
/// reported when the range is registered for minor faults).
pub fn madvise_dontneed(
    process: &QemuProcess,
    start: HostAddr,
    len: u64,
) -> Result<(), InjectError> {
    let pid = process.pid();
    let ret = inject_syscall(
        process,
        libc::SYS_madvise,
        &[start.0, len, libc::MADV_DONTNEED as u64],
    )?;
    if ret < 0 {
        return Err(InjectError::CallFailed {
            pid,
            call: "madvise(MADV_DONTNEED)",
            errno: errno_of(ret),
        });
    }
    Ok(())
}

/// Waits for the stop caused by `PTRACE_INTERRUPT` of thread `pid`; signals
/// that stop the thread first are delivered as they would have been
/// without us.
fn wait_interrupt_stop(pid: Pid) -> Result<(), InjectError> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    for _ in 0..MAX_STOPS {
        match wait_status(pid, deadline)? {
            // PTRACE_EVENT_STOP: the interrupt stop, or a group stop
            // (SIGSTOP & co.), which __ptrace_unlink re-establishes on detach.
            WaitStatus::PtraceEvent(_, _, ev) if ev == Event::PTRACE_EVENT_STOP as i32 => {
                return Ok(());
            }
            WaitStatus::Stopped(_, sig) => {
                log::debug!("{pid} stopped for {sig} before the interrupt; delivering it");
                ptrace::cont(pid, sig).map_err(|errno| ptrace_err(pid, "CONT", errno))?;
            }
            WaitStatus::PtraceEvent(_, _, _) => {
                ptrace::cont(pid, None).map_err(|errno| ptrace_err(pid, "CONT", errno))?;
            }
            WaitStatus::Exited(_, code) => {
                return Err(gone(pid, format!("exited with status {code}")))
            }
            WaitStatus::Signaled(_, s, _) => return Err(gone(pid, format!("killed by {s}"))),
            other => {
                return Err(InjectError::UnexpectedStop {
                    pid,
                    detail: format!("{other:?}"),
                })
            }
        }
    }
    Err(InjectError::UnexpectedStop {
        pid,
        detail: format!("more than {MAX_STOPS} stops"),
    })
}

/// `waitpid` for thread `pid` until `deadline`, polling so a thread that
/// never stops cannot hang thaw.
fn wait_status(pid: Pid, deadline: Instant) -> Result<WaitStatus, InjectError> {
    let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
    let mut polls = 0u32;
    let mut pause = Duration::from_micros(20);
    loop {
        match waitpid(pid, Some(flags)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => return Ok(status),
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => return Err(gone(pid, "it is no longer traced by thaw".into())),
            Err(errno) => return Err(InjectError::Wait { pid, errno }),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(InjectError::StopTimeout {
                pid,
                waited: STOP_TIMEOUT,
            });
        }
        // A stop usually takes a context switch or two: yield first, then back off.
        polls += 1;
        if polls < 16 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
}

/// Seizes thread `tid` and waits until it is in its interrupt stop; a
/// thread that does not get there is let go again.
fn seize_and_stop(tid: Pid) -> Result<(), InjectError> {
    ptrace::seize(tid, Options::empty()).map_err(|errno| seize_error(tid, errno))?;
    let stopped = ptrace::interrupt(tid)
        .map_err(|errno| ptrace_err(tid, "INTERRUPT", errno))
        .and_then(|()| wait_interrupt_stop(tid));
    if stopped.is_err() {
        // Detaching needs a stop; a thread that never stopped is let go
        // when thaw exits at the latest.
        let _ = ptrace::detach(tid, None);
    }
    stopped
}

/// The thread ids of process `pid`.
fn threads_of(pid: Pid) -> std::io::Result<Vec<Pid>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            tids.push(Pid::from_raw(tid));
        }
    }
    Ok(tids)
}

fn ptrace_err(pid: Pid, op: &'static str, errno: Errno) -> InjectError {
    match errno {
        Errno::ESRCH
            if op != "DETACH" && !std::path::Path::new(&format!("/proc/{pid}")).exists() =>
        {
            gone(pid, "it exited".into())
        }
        _ => InjectError::Ptrace { op, pid, errno },
    }
}

fn gone(pid: Pid, how: String) -> InjectError {
    InjectError::Gone { pid, how }
}

/// A register's bits read as the signed value they hold (system call
/// results, `orig_rax`, `PEEKTEXT` words): a reinterpretation, not a
/// conversion.
pub(crate) fn reg_signed(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// A signed value's bits as a register holds them (the inverse of
/// [`reg_signed`]); an `int` argument such as an fd is sign-extended, as
/// the kernel reads it.
pub(crate) fn reg_unsigned(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// The errno of a failed raw system call result `-errno`.
pub(crate) fn errno_of(ret: i64) -> Errno {
    ret.checked_neg()
        .and_then(|e| i32::try_from(e).ok())
        .map_or(Errno::UnknownErrno, Errno::from_raw)
}

fn sig_bit(sig: Signal) -> u64 {
    1 << (sig as i32 - 1)
}

fn seize_error(pid: Pid, errno: Errno) -> InjectError {
    match errno {
        Errno::ESRCH => InjectError::NoSuchThread { pid },
        Errno::EPERM => match tracer_of(pid) {
            Some(tracer) if tracer != 0 => InjectError::AlreadyTraced { pid, tracer },
            _ => InjectError::PermissionDenied { pid },
        },
        errno => InjectError::Ptrace {
            op: "SEIZE",
            pid,
            errno,
        },
    }
}

/// `TracerPid` of a thread, if readable.
fn tracer_of(pid: Pid) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The address of a `0f 05` byte pair in the vDSO of `pid`, if any.
fn find_vdso_syscall(pid: Pid) -> std::io::Result<Option<u64>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let Some((start, end)) = maps
        .lines()
        .filter(|l| l.ends_with("[vdso]"))
        .find_map(|l| {
            let (s, e) = l.split(' ').next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
    else {
        return Ok(None);
    };
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut text = vec![0u8; usize_from(end.saturating_sub(start))];
    mem.read_exact_at(&mut text, start)?;
    Ok(text
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| start + i as u64))
}

#[cfg(test)]
// Test fixtures: casts of small constants and of the tests' own values
// (their children's pids and fds); a wrong one fails a test.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A forked child, killed and reaped on every path.
    pub(crate) struct Child {
        pub(crate) pid: Pid,
        reaped: bool,
    }

    impl Child {
        /// Forks; the child runs `body`, which must only make async-signal-safe
        /// calls (no allocation, no locks), and exits.
        pub(crate) fn spawn(body: impl FnOnce()) -> Child {
            // SAFETY: the child runs `body` only, which makes raw system calls,
            // then `_exit`s; nothing in it touches locks or the allocator.
            match unsafe { nix::unistd::fork() }.expect("fork") {
                nix::unistd::ForkResult::Child => {
                    body();
                    // SAFETY: plain _exit, skipping atexit handlers and unwinding.
                    unsafe { libc::_exit(127) }
                }
                nix::unistd::ForkResult::Parent { child } => Child {
                    pid: child,
                    reaped: false,
                },
            }
        }

        pub(crate) fn wait(&mut self) -> WaitStatus {
            let status = waitpid(self.pid, None).expect("waitpid");
            self.reaped = true;
            status
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            if !self.reaped {
                let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
                let _ = waitpid(self.pid, None);
            }
        }
    }

    /// A handle on a child of the test (its pid cannot be reused before
    /// the child is reaped).
    pub(crate) fn process(pid: Pid) -> QemuProcess {
        QemuProcess::open(pid.as_raw()).expect("pidfd_open")
    }

    pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
    }

    /// Waits until `pid` is blocked in system call `nr` (per /proc/pid/syscall).
    pub(crate) fn wait_in_syscall(pid: Pid, nr: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            if s.split(' ').next().and_then(|n| n.parse::<i64>().ok()) == Some(nr) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "child {pid} never blocked in syscall {nr}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub(crate) fn read_with_timeout(fd: RawFd, buf: &mut [u8]) -> usize {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        // SAFETY: fd stays open for the duration of this call (owned by the test).
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(bfd, PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(10_000u16)).expect("poll");
        assert_eq!(n, 1, "timed out waiting for the child");
        nix::unistd::read(bfd, buf).expect("read")
    }

    pub(crate) fn fd_target(pid: Pid, fd: i64) -> Option<std::path::PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()
    }

    /// The child echoes one read from `input` to `output`, then exits 0.
    fn echo_child(input: RawFd, output: RawFd) -> ! {
        let mut buf = [0u8; 64];
        // SAFETY: raw read/write/_exit on inherited fds, into a stack buffer.
        unsafe {
            let n = libc::read(input, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                libc::_exit(2);
            }
            if libc::write(output, buf.as_ptr().cast(), n as usize) != n {
                libc::_exit(3);
            }
            libc::_exit(0)
        }
    }

    #[test]
    fn injects_into_a_thread_blocked_in_read() {
        let (to_child_r, to_child_w) = pipe();
        let (from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let mut child = Child::spawn(move || echo_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_read);

        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        assert!(
            matches!(inj.site(), Ok(Site::RipMinus2(_))),
            "a thread in read() has its syscall at rip-2"
        );
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid.as_raw() as i64
        );

        // dup the pipe's read end inside the child and check the new fd.
        let dup = inj.syscall(libc::SYS_dup, &[in_fd as u64]).expect("dup");
        assert!(dup >= 0, "dup failed: {dup}");
        assert_eq!(
            fd_target(child.pid, dup),
            fd_target(child.pid, in_fd as i64)
        );
        let getfd =
            |inj: &mut Injector| inj.syscall(libc::SYS_fcntl, &[dup as u64, libc::F_GETFD as u64]);
        assert_eq!(getfd(&mut inj).expect("F_GETFD"), 0);
        let set = [dup as u64, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64];
        assert_eq!(inj.syscall(libc::SYS_fcntl, &set).expect("F_SETFD"), 0);
        assert_eq!(getfd(&mut inj).expect("F_GETFD"), libc::FD_CLOEXEC as i64);
        assert_eq!(
            inj.syscall(libc::SYS_close, &[dup as u64]).expect("close"),
            0
        );
        assert_eq!(fd_target(child.pid, dup), None);
        // Errors come back as -errno.
        assert_eq!(
            inj.syscall(libc::SYS_close, &[9999]).expect("close"),
            -(libc::EBADF as i64)
        );
        inj.detach().expect("detach");

        // The interrupted read() restarts and still gets the data.
        nix::unistd::write(&to_child_w, b"thaw-inject").expect("write");
        let mut buf = [0u8; 64];
        let n = read_with_timeout(from_child_r.as_raw_fd(), &mut buf);
        assert_eq!(&buf[..n], b"thaw-inject");
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 0));
    }

    /// A child spinning in user space (not in a system call): counts in
    /// `shared[0]` until `shared[1]` is set, then exits 7.
    fn spinning_child() -> (Child, &'static [AtomicU64; 2]) {
        // SAFETY: a fresh anonymous shared mapping of one page; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the page is zeroed, aligned and lives until the process
        // exits (never unmapped); AtomicU64 is valid for all-zero bytes.
        let shared: &'static [AtomicU64; 2] = unsafe { &*(p as *const [AtomicU64; 2]) };
        let child = Child::spawn(move || {
            while shared[1].load(Ordering::Relaxed) == 0 {
                shared[0].fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: plain _exit.
            unsafe { libc::_exit(7) }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared[0].load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "child never ran");
            std::thread::yield_now();
        }
        (child, shared)
    }

    fn check_still_spinning(mut child: Child, shared: &[AtomicU64; 2]) {
        let before = shared[0].load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared[0].load(Ordering::Relaxed) == before {
            assert!(
                Instant::now() < deadline,
                "child stopped counting after the injection"
            );
            std::thread::yield_now();
        }
        shared[1].store(1, Ordering::Relaxed);
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 7));
    }

    static GOT_USR2: AtomicU64 = AtomicU64::new(0);

    extern "C" fn on_usr2(_: libc::c_int) {
        GOT_USR2.store(1, Ordering::Relaxed);
    }

    /// Like QEMU's main loop: blocks SIGUSR1, then waits in ppoll() with a
    /// temporary empty mask. Reports [SIGUSR2 handled, SIGUSR1 blocked,
    /// SIGUSR2 blocked, EINTRs] and the data it read.
    fn ppoll_child(input: RawFd, output: RawFd) {
        // SAFETY: raw, async-signal-safe calls on stack data and inherited fds.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_usr2 as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigemptyset(&mut empty);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            if libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()) != 0
                || libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0
            {
                libc::_exit(20);
            }
            let mut eintr = 0u8;
            loop {
                let mut pfd = libc::pollfd {
                    fd: input,
                    events: libc::POLLIN,
                    revents: 0,
                };
                match libc::ppoll(&mut pfd, 1, std::ptr::null(), &empty) {
                    1 => break,
                    -1 if *libc::__errno_location() == libc::EINTR => eintr += 1,
                    _ => libc::_exit(21),
                }
            }
            let mut out = [0u8; 68];
            let n = libc::read(input, out[4..].as_mut_ptr().cast(), 64);
            if n <= 0 {
                libc::_exit(22);
            }
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            out[0] = GOT_USR2.load(Ordering::Relaxed) as u8;
            out[1] = libc::sigismember(&cur, libc::SIGUSR1) as u8;
            out[2] = libc::sigismember(&cur, libc::SIGUSR2) as u8;
            out[3] = eintr;
            if libc::write(output, out.as_ptr().cast(), 4 + n as usize) != 4 + n {
                libc::_exit(23);
            }
            libc::_exit(0)
        }
    }

    #[test]
    fn injection_into_ppoll_keeps_the_signal_mask_and_loses_no_signal() {
        let (to_child_r, to_child_w) = pipe();
        let (from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let mut child = Child::spawn(move || ppoll_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_ppoll);

        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid.as_raw() as i64
        );
        // A signal sent meanwhile stays pending (everything is blocked during
        // a call) and reaches the child's handler once it is released.
        nix::sys::signal::kill(child.pid, Signal::SIGUSR2).expect("kill");
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid.as_raw() as i64
        );
        inj.detach().expect("detach");

        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{}/syscall", child.pid))
            .is_ok_and(|s| s.starts_with(&format!("{} ", libc::SYS_ppoll)))
        {
            assert!(Instant::now() < deadline, "child did not return to ppoll");
            std::thread::sleep(Duration::from_millis(1));
        }
        nix::unistd::write(&to_child_w, b"after-ppoll").expect("write");
        let mut buf = [0u8; 68];
        let n = read_with_timeout(from_child_r.as_raw_fd(), &mut buf);
        assert_eq!(&buf[4..n], b"after-ppoll");
        assert_eq!(
            buf[..3],
            [1, 1, 0],
            "SIGUSR2 handled, SIGUSR1 still blocked, SIGUSR2 not"
        );
        assert!(buf[3] <= 1, "ppoll was interrupted {} times", buf[3]);
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 0));
    }

    #[test]
    fn injects_into_a_busy_thread_through_the_vdso() {
        let (child, shared) = spinning_child();
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        assert!(
            matches!(inj.site(), Ok(Site::Vdso(_))),
            "expected the vDSO site, got {:?}",
            inj.site()
        );
        for _ in 0..3 {
            assert_eq!(
                inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
                child.pid.as_raw() as i64
            );
        }
        inj.detach().expect("detach");
        check_still_spinning(child, shared);
    }

    #[test]
    fn injects_by_patching_rip_and_restores_the_text() {
        let (child, shared) = spinning_child();
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        inj.set_policy(SitePolicy::PatchOnly);
        let mem = std::fs::File::open(format!("/proc/{}/mem", child.pid)).expect("open mem");
        let text = |at: u64| {
            let mut w = [0u8; 16];
            mem.read_exact_at(&mut w, at).expect("read text");
            w
        };
        let rip = inj.saved.rip;
        let before = text(rip);
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid.as_raw() as i64
        );
        assert_eq!(
            inj.syscall(libc::SYS_gettid, &[]).expect("gettid"),
            child.pid.as_raw() as i64
        );
        assert_eq!(text(rip), before, "the patched text must be restored");
        inj.detach().expect("detach");
        check_still_spinning(child, shared);
    }

    #[test]
    fn vdso_site_works_for_a_thread_in_a_system_call() {
        let (to_child_r, to_child_w) = pipe();
        let (from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let mut child = Child::spawn(move || echo_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_read);
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        inj.set_policy(SitePolicy::NoRipMinus2);
        assert!(matches!(inj.site(), Ok(Site::Vdso(_))));
        assert_eq!(
            inj.syscall(libc::SYS_getppid, &[]).expect("getppid"),
            nix::unistd::getpid().as_raw() as i64
        );
        inj.detach().expect("detach");
        nix::unistd::write(&to_child_w, b"still-fine").expect("write");
        let mut buf = [0u8; 64];
        let n = read_with_timeout(from_child_r.as_raw_fd(), &mut buf);
        assert_eq!(&buf[..n], b"still-fine");
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 0));
    }

    #[test]
    fn inject_syscall_attaches_runs_and_detaches() {
        let (to_child_r, to_child_w) = pipe();
        let (from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let mut child = Child::spawn(move || echo_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_read);
        for _ in 0..5 {
            assert_eq!(
                inject_syscall(&process(child.pid), libc::SYS_getpid, &[]).expect("inject"),
                child.pid.as_raw() as i64
            );
        }
        assert_eq!(
            tracer_of(child.pid),
            Some(0),
            "the child must not stay traced"
        );
        nix::unistd::write(&to_child_w, b"x").expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(read_with_timeout(from_child_r.as_raw_fd(), &mut buf), 1);
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 0));
    }

    #[test]
    fn a_blocking_injected_call_is_interrupted_and_the_thread_recovers() {
        let (to_child_r, to_child_w) = pipe();
        let (from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let mut child = Child::spawn(move || echo_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_read);
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        inj.set_call_timeout(Duration::from_millis(200));
        // pause() with every signal blocked would never return.
        let err = inj
            .syscall(libc::SYS_pause, &[])
            .expect_err("pause must time out");
        assert!(
            matches!(err, InjectError::CallTimeout { nr, .. } if nr == libc::SYS_pause),
            "{err:?}"
        );
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid.as_raw() as i64
        );
        inj.detach().expect("detach");
        nix::unistd::write(&to_child_w, b"recovered").expect("write");
        let mut buf = [0u8; 64];
        let n = read_with_timeout(from_child_r.as_raw_fd(), &mut buf);
        assert_eq!(&buf[..n], b"recovered");
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 0));
    }

    fn state(pid: Pid) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?')
    }

    #[test]
    fn a_stopped_process_stays_stopped() {
        let (to_child_r, to_child_w) = pipe();
        let (from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let mut child = Child::spawn(move || echo_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_read);
        nix::sys::signal::kill(child.pid, Signal::SIGSTOP).expect("SIGSTOP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(child.pid) != 'T' {
            assert!(Instant::now() < deadline, "child did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            inject_syscall(&process(child.pid), libc::SYS_getpid, &[]).expect("inject"),
            child.pid.as_raw() as i64
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            state(child.pid),
            'T',
            "the group stop must survive the injection"
        );
        nix::sys::signal::kill(child.pid, Signal::SIGCONT).expect("SIGCONT");
        nix::unistd::write(&to_child_w, b"continued").expect("write");
        let mut buf = [0u8; 64];
        let n = read_with_timeout(from_child_r.as_raw_fd(), &mut buf);
        assert_eq!(&buf[..n], b"continued");
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 0));
    }

    #[test]
    fn attaching_to_a_process_that_exited_is_a_clear_error() {
        let mut child = Child::spawn(|| loop {
            // SAFETY: pause(2) only waits for a signal.
            unsafe { libc::pause() };
        });
        let handle = process(child.pid);
        nix::sys::signal::kill(child.pid, Signal::SIGKILL).expect("kill");
        let _ = child.wait();
        let err = Injector::attach(&handle).err().expect("attach must fail");
        assert!(
            matches!(err, InjectError::Process(ProcessError::Gone { .. })),
            "{err:?}"
        );
        // Above the kernel's PID_MAX_LIMIT (4194304): never a live process.
        let err = QemuProcess::open(4_194_305).expect_err("no such process");
        assert_eq!(err.to_string(), "process 4194305 does not exist (any more)");
    }

    /// Counts in `shared[1 + n]` on thread `n` (n = 0, 1) of one child
    /// until `shared[0]` is set, then exits 7; the second thread is a raw
    /// `clone(CLONE_THREAD)` (no allocation after fork).
    fn two_thread_child() -> (Child, &'static [AtomicU64; 3]) {
        const STACK: usize = 64 << 10;
        // SAFETY: a fresh anonymous shared mapping for the counters and a
        // private one for the thread's stack; both are checked below.
        let (p, stack) = unsafe {
            (
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                libc::mmap(
                    std::ptr::null_mut(),
                    STACK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                    -1,
                    0,
                ),
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        assert_ne!(stack, libc::MAP_FAILED);
        // SAFETY: the page is zeroed, aligned and never unmapped; AtomicU64
        // is valid for all-zero bytes.
        let shared: &'static [AtomicU64; 3] = unsafe { &*(p as *const [AtomicU64; 3]) };
        extern "C" fn second(arg: *mut libc::c_void) -> libc::c_int {
            // SAFETY: `arg` is the `shared` page passed below, which lives
            // as long as the process.
            let shared = unsafe { &*(arg as *const [AtomicU64; 3]) };
            while shared[0].load(Ordering::Relaxed) == 0 {
                shared[2].fetch_add(1, Ordering::Relaxed);
            }
            0
        }
        let child = Child::spawn(move || {
            let flags = libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM;
            // SAFETY: the new thread runs `second` on its own stack (the top
            // of the mapping above) and touches only the shared page.
            let r = unsafe { libc::clone(second, stack.cast::<u8>().add(STACK).cast(), flags, p) };
            if r < 0 {
                // SAFETY: plain _exit.
                unsafe { libc::_exit(30) }
            }
            while shared[0].load(Ordering::Relaxed) == 0 {
                shared[1].fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: plain exit_group.
            unsafe { libc::_exit(7) }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared[1].load(Ordering::Relaxed) == 0 || shared[2].load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "child threads never ran");
            std::thread::yield_now();
        }
        (child, shared)
    }

    fn thread_states(pid: Pid) -> Vec<(Pid, char, i32)> {
        threads_of(pid)
            .expect("tasks")
            .into_iter()
            .map(|t| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/stat"))
                    .unwrap_or_default();
                let state = stat
                    .rsplit_once(") ")
                    .and_then(|(_, r)| r.chars().next())
                    .unwrap_or('?');
                let status = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status"))
                    .unwrap_or_default();
                let tracer = status
                    .lines()
                    .find_map(|l| l.strip_prefix("TracerPid:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(-1);
                (t, state, tracer)
            })
            .collect()
    }

    #[test]
    fn patching_stops_every_thread_and_releases_them_all() {
        let (mut child, shared) = two_thread_child();
        // The tracer is the tracing thread (this test's).
        let me = nix::unistd::gettid().as_raw();
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        inj.set_policy(SitePolicy::PatchOnly);
        assert_eq!(
            inj.syscall(libc::SYS_getpid, &[]).expect("getpid"),
            child.pid.as_raw() as i64
        );
        // While the injector holds the process, no thread runs.
        let states = thread_states(child.pid);
        assert_eq!(states.len(), 2, "{states:?}");
        assert!(
            states
                .iter()
                .all(|&(_, s, tracer)| s == 't' && tracer == me),
            "{states:?}"
        );
        let second = shared[2].load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(shared[2].load(Ordering::Relaxed), second, "thread 2 ran");
        inj.detach().expect("detach");
        // Both threads run on, untraced.
        assert!(thread_states(child.pid).iter().all(|&(_, _, t)| t == 0));
        let deadline = Instant::now() + Duration::from_secs(10);
        let (a, b) = (
            shared[1].load(Ordering::Relaxed),
            shared[2].load(Ordering::Relaxed),
        );
        while shared[1].load(Ordering::Relaxed) == a || shared[2].load(Ordering::Relaxed) == b {
            assert!(Instant::now() < deadline, "a thread stayed stopped");
            std::thread::yield_now();
        }
        shared[0].store(1, Ordering::Relaxed);
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 7));
    }

    #[test]
    fn a_site_in_the_vdso_leaves_other_threads_running() {
        let (mut child, shared) = two_thread_child();
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        assert!(matches!(inj.site(), Ok(Site::Vdso(_))), "{:?}", inj.site());
        let second = shared[2].load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared[2].load(Ordering::Relaxed) == second {
            assert!(Instant::now() < deadline, "thread 2 was stopped");
            std::thread::yield_now();
        }
        inj.detach().expect("detach");
        shared[0].store(1, Ordering::Relaxed);
        assert_eq!(child.wait(), WaitStatus::Exited(child.pid, 7));
    }

    #[test]
    fn too_many_arguments_are_refused_before_touching_the_thread() {
        let (to_child_r, _to_child_w) = pipe();
        let (_from_child_r, from_child_w) = pipe();
        let (in_fd, out_fd) = (to_child_r.as_raw_fd(), from_child_w.as_raw_fd());
        let child = Child::spawn(move || echo_child(in_fd, out_fd));
        wait_in_syscall(child.pid, libc::SYS_read);
        let mut inj = Injector::attach(&process(child.pid)).expect("attach");
        let err = inj
            .syscall(libc::SYS_getpid, &[0; 7])
            .expect_err("must fail");
        assert!(matches!(err, InjectError::TooManyArgs(7)), "{err:?}");
        inj.detach().expect("detach");
    }
}
