//! Takes over a userfaultfd for another process's memory and wraps its
//! ioctls in typed calls, with errors and partial progress decoded.
//!
//! `UFFDIO_REGISTER` only works for the mm of the process that created the
//! userfaultfd, and guest RAM lives in QEMU's mm. So [`take_over`] makes QEMU
//! create one (an injected `userfaultfd(2)`, see [`crate::remote::inject`]) and copies
//! it into thaw with `pidfd_getfd(2)` on the pidfd of a verified
//! [`QemuProcess`] handle; everything else then runs from thaw on
//! its copy. QEMU's own copy stays open until [`RemoteUffd::close_remote`]:
//! while it is open, a fault thaw does not serve blocks instead of reading a
//! hole as zeros, and a new thaw can [`reattach`] to finish a restore.
//!
//! The fault path ([`RemoteUffd::read_events`], [`RemoteUffd::copy`],
//! [`RemoteUffd::zeropage`], [`RemoteUffd::wake`]) makes one or two system
//! calls per call and never allocates or locks.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::unistd::Pid;
use userfaultfd::Uffd;
pub use userfaultfd::{IoctlFlags, RegisterMode};
use userfaultfd_sys::{
    uffd_msg, uffdio_api, uffdio_copy, uffdio_range, uffdio_zeropage, UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_ZEROPAGE_MODE_DONTWAKE, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP,
    UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WP,
};

use crate::mem::{usize_from, HostAddr};
use crate::remote::inject::{self, InjectError, Injector};
use crate::remote::process::{ProcessError, QemuProcess};

/// Raw ioctls whose results the `userfaultfd` crate does not decode the way
/// thaw needs (partial progress, feature negotiation).
mod sys {
    use userfaultfd_sys::{
        uffdio_api, uffdio_copy, uffdio_zeropage, _UFFDIO_API, _UFFDIO_COPY, _UFFDIO_ZEROPAGE,
        UFFDIO,
    };
    nix::ioctl_readwrite!(api, UFFDIO, _UFFDIO_API, uffdio_api);
    nix::ioctl_readwrite!(copy, UFFDIO, _UFFDIO_COPY, uffdio_copy);
    nix::ioctl_readwrite!(zeropage, UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage);
}

/// Size of one message read from a userfaultfd.
const MSG_SIZE: usize = std::mem::size_of::<uffd_msg>();
/// Internal flag some kernels show in fdinfo once `UFFDIO_API` ran.
const FEATURE_INITIALIZED: u64 = 1 << 31;
/// `UFFD_FEATURE_*` bits newer than the bindings.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// The ioctls a missing-mode range must offer to be served.
const MISSING_IOCTLS: IoctlFlags = IoctlFlags::COPY
    .union(IoctlFlags::ZEROPAGE)
    .union(IoctlFlags::WAKE);

/// Errors taking over or using a userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("userfaultfd() failed inside process {pid}: {errno}{}", create_hint(*errno))]
    Create { pid: Pid, errno: Errno },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("copying fd {fd} out of process {pid} with pidfd_getfd failed: {errno}{}", getfd_hint(*errno))]
    GetFd { pid: Pid, fd: i32, errno: Errno },
    #[error("fd {fd} of process {pid} is not a userfaultfd (it is {target})")]
    NotUserfaultfd { pid: Pid, fd: i32, target: String },
    #[error("the kernel lacks userfaultfd features {} (requested {}; it has {})",
        feature_names(*missing), feature_names(*requested), feature_names(*available))]
    MissingFeatures {
        requested: u64,
        missing: u64,
        available: u64,
    },
    #[error("UFFDIO_API with features {} failed: {errno}", feature_names(*requested))]
    Api { requested: u64, errno: Errno },
    #[error("registering {start:#x}+{len:#x} with the userfaultfd failed: {errno}{}", register_hint(*errno))]
    Register { start: u64, len: u64, errno: Errno },
    #[error("the range {start:#x}+{len:#x} was registered but lacks the ioctls {missing:?} (it has {have:?})")]
    MissingIoctls {
        start: u64,
        len: u64,
        missing: IoctlFlags,
        have: IoctlFlags,
    },
    #[error("write-protecting {start:#x}+{len:#x} failed: {errno}")]
    WriteProtect { start: u64, len: u64, errno: Errno },
    #[error("unregistering {start:#x}+{len:#x} failed: {errno}")]
    Unregister { start: u64, len: u64, errno: Errno },
    #[error("waking {start:#x}+{len:#x} failed: {errno}")]
    Wake { start: u64, len: u64, errno: Errno },
    #[error("reading userfaultfd events failed: {0}")]
    Read(Errno),
    #[error("making the userfaultfd non-blocking failed: {0}")]
    NonBlock(Errno),
    #[error("read {0} bytes from the userfaultfd, not a whole number of messages")]
    ShortRead(usize),
    #[error("polling the userfaultfd failed: {0}")]
    Poll(Errno),
    #[error("the userfaultfd reports an error condition (poll revents {0:#x})")]
    PollError(i16),
    #[error("process {pid}, the userfaultfd's owner, has exited")]
    OwnerExited { pid: Pid },
    #[error("closing fd {fd} inside process {pid} failed: {errno}")]
    CloseRemote { pid: Pid, fd: i32, errno: Errno },
    #[error("fd {fd} inside process {pid} is no longer thaw's userfaultfd; not closing it")]
    RemoteFdChanged { pid: Pid, fd: i32 },
    #[error("reading {path}: {source}")]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn create_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EPERM => {
            " (the process needs CAP_SYS_PTRACE, or sysctl vm.unprivileged_userfaultfd=1; \
             a seccomp sandbox may also forbid it)"
        }
        Errno::ENOSYS => {
            " (kernel built without CONFIG_USERFAULTFD, or a seccomp filter blocks it)"
        }
        _ => "",
    }
}

fn getfd_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EPERM => " (thaw needs root or CAP_SYS_PTRACE over the process)",
        Errno::ENOSYS => " (pidfd_getfd needs Linux 5.6 or later)",
        _ => "",
    }
}

fn register_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EINVAL => {
            " (the range must be page-aligned and fully mapped, and shared memory needs \
             UFFD_FEATURE_MISSING_SHMEM)"
        }
        Errno::EBUSY => " (part of the range is registered with another userfaultfd)",
        Errno::ENOMEM => " (part of the range is not mapped)",
        _ => "",
    }
}

/// Names of `UFFD_FEATURE_*` bits, for messages.
const FEATURE_NAMES: &[&str] = &[
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
];

/// `A|B|bit40`-style names of a feature set (`none` when empty).
pub fn feature_names(features: u64) -> String {
    if features == 0 {
        return "none".into();
    }
    (0..64)
        .filter(|b| features & (1 << b) != 0)
        .map(|b| {
            FEATURE_NAMES
                .get(b)
                .map_or_else(|| format!("bit{b}"), |n| (*n).to_string())
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// Outcome of [`RemoteUffd::copy`] / [`RemoteUffd::zeropage`]: how many
/// bytes from the start of the range were installed, and why it stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum CopyResult {
    /// The whole range was installed (the length in bytes).
    Done(usize),
    /// `copied` bytes were installed, then the page at `dst + copied` was
    /// already present (a race with another installer; wake it if a fault
    /// may wait on it).
    Exists { copied: usize },
    /// `copied` bytes were installed, then the kernel refused the rest.
    /// `EAGAIN`: the mappings are changing (a remove/unmap event is queued):
    /// drain events, then retry from `dst + copied`.
    Failed { copied: usize, errno: Errno },
}

impl CopyResult {
    /// Bytes installed from the start of the range.
    pub fn copied(self) -> usize {
        match self {
            CopyResult::Done(n)
            | CopyResult::Exists { copied: n }
            | CopyResult::Failed { copied: n, .. } => n,
        }
    }
}

/// One userfaultfd event, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEvent {
    /// A missing-page fault at page-aligned `addr` (in the owner's space).
    PageFault { addr: u64 },
    /// A minor fault (page in the page cache but not mapped; MINOR mode).
    MinorFault { addr: u64 },
    /// A write to a write-protected page (WP mode).
    WriteProtectFault { addr: u64 },
    /// `start..end` was discarded (`MADV_DONTNEED`/`MADV_REMOVE`, balloon...).
    Remove { start: u64, end: u64 },
    /// `start..end` was unmapped.
    Unmap { start: u64, end: u64 },
    /// `len` bytes at `from` were moved to `to` by `mremap`.
    Remap { from: u64, to: u64, len: u64 },
    /// An event thaw does not handle (e.g. fork), by its code.
    Other { event: u8 },
}

/// A preallocated buffer for [`RemoteUffd::read_events`]: one `read(2)`
/// fetches up to `capacity` events, decoded without allocating.
pub struct EventBuffer {
    msgs: Box<[uffd_msg]>,
    events: Box<[FaultEvent]>,
}

impl EventBuffer {
    /// A buffer for up to `capacity` events per read (at least one).
    pub fn new(capacity: usize) -> EventBuffer {
        let capacity = capacity.max(1);
        // SAFETY: uffd_msg is a plain C struct of integers and unions of
        // integers, for which all-zero bytes are a valid value.
        let zero: uffd_msg = unsafe { std::mem::zeroed() };
        EventBuffer {
            msgs: vec![zero; capacity].into_boxed_slice(),
            events: vec![FaultEvent::Other { event: 0 }; capacity].into_boxed_slice(),
        }
    }

    /// How many events one read can return.
    pub fn capacity(&self) -> usize {
        self.msgs.len()
    }
}

/// A userfaultfd created inside another process (its "owner"), of which
/// thaw holds a copy. Dropping it closes only thaw's copy.
#[derive(Debug)]
pub struct RemoteUffd {
    uffd: Uffd,
    /// The owner, held by pidfd.
    process: QemuProcess,
    owner: Pid,
    remote_fd: i32,
    features: u64,
    available: u64,
    remote_closed: AtomicBool,
}

/// Makes `process` create a userfaultfd (`O_CLOEXEC | O_NONBLOCK`),
/// copies it into thaw and enables `features` (`UFFD_FEATURE_*`, e.g.
/// `UFFD_FEATURE_MISSING_SHMEM` for QEMU's shared RAM file).
///
/// On failure nothing is left behind in the owner.
pub fn take_over(process: &QemuProcess, features: u64) -> Result<RemoteUffd, UffdError> {
    take_over_with(process, features, None)
}

/// `ioctl(2)` request of `/dev/userfaultfd` that creates a userfaultfd
/// for the calling process (`USERFAULTFD_IOC_NEW`, `_IO(0xAA, 0x00)`).
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// [`take_over`] for an owner that may not call `userfaultfd(2)` itself
/// (a QEMU that runs unprivileged, as libvirt starts it): with
/// `device_fd_in_owner`, an fd of `/dev/userfaultfd` that thaw opened and
/// passed to the owner, the owner creates its userfaultfd with
/// `USERFAULTFD_IOC_NEW` on that fd instead.
pub fn take_over_with(
    process: &QemuProcess,
    features: u64,
    device_fd_in_owner: Option<i32>,
) -> Result<RemoteUffd, UffdError> {
    let pid = process.pid();
    // Check the features on a local userfaultfd first, so a kernel that
    // lacks them is reported by name before QEMU is touched.
    let available = match kernel_features() {
        Ok(available) => {
            let missing = features & !available;
            if missing != 0 {
                return Err(UffdError::MissingFeatures {
                    requested: features,
                    missing,
                    available,
                });
            }
            Some(available)
        }
        Err(errno) => {
            log::debug!(
                "cannot probe userfaultfd features locally ({errno}); asking on the stolen fd"
            );
            None
        }
    };

    let started = std::time::Instant::now();
    let mut inj = Injector::attach(process)?;
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let ret = match device_fd_in_owner {
        None => inj.syscall(libc::SYS_userfaultfd, &[flags])?,
        Some(dev) => {
            let dev = u64::try_from(dev).map_err(|_| UffdError::Create {
                pid,
                errno: Errno::EBADF,
            })?;
            inj.syscall(libc::SYS_ioctl, &[dev, USERFAULTFD_IOC_NEW, flags])?
        }
    };
    if ret < 0 {
        return Err(UffdError::Create {
            pid,
            errno: inject::errno_of(ret),
        });
    }
    let remote_fd = i32::try_from(ret).map_err(|_| UffdError::Create {
        pid,
        errno: Errno::EBADF,
    })?;
    match adopt(process, remote_fd, features, available) {
        Ok(uffd) => {
            inj.detach()?;
            log::info!(
                "took over a userfaultfd in process {pid} in {:?} (fd {remote_fd} there, {} here), features {}",
                started.elapsed(),
                uffd.uffd.as_raw_fd(),
                feature_names(features)
            );
            Ok(uffd)
        }
        Err(e) => {
            // Leave nothing behind in the owner.
            match inj.syscall(libc::SYS_close, &[inject::reg_unsigned(remote_fd.into())]) {
                Ok(0) => {}
                Ok(r) => {
                    let errno = inject::errno_of(r);
                    log::warn!("closing fd {remote_fd} in {pid} after a failed takeover: {errno}")
                }
                Err(ce) => {
                    log::warn!("closing fd {remote_fd} in {pid} after a failed takeover: {ce}")
                }
            }
            if let Err(de) = inj.detach() {
                log::warn!("{de}");
            }
            Err(e)
        }
    }
}

/// Copies userfaultfd `remote_fd` out of `process` again (e.g. after a thaw
/// crashed mid-restore; the fd number was recorded). `UFFDIO_API` already
/// ran on it; its features are read back from fdinfo.
pub fn reattach(process: &QemuProcess, remote_fd: i32) -> Result<RemoteUffd, UffdError> {
    let pid = process.pid();
    let (process, fd) = get_fd(process, remote_fd)?;
    let link = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let target = std::fs::read_link(&link)
        .map_err(|source| UffdError::Proc { path: link, source })?
        .to_string_lossy()
        .into_owned();
    if target != "anon_inode:[userfaultfd]" {
        return Err(UffdError::NotUserfaultfd {
            pid,
            fd: remote_fd,
            target,
        });
    }
    let info_path = PathBuf::from(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()));
    let info = std::fs::read_to_string(&info_path).map_err(|source| UffdError::Proc {
        path: info_path,
        source,
    })?;
    // "API:\t<api>:<features>:<ioctls>"
    let features = info
        .lines()
        .find_map(|l| l.strip_prefix("API:"))
        .and_then(|v| v.trim().split(':').nth(1))
        .and_then(|f| u64::from_str_radix(f, 16).ok())
        .unwrap_or(0)
        & !FEATURE_INITIALIZED;
    // Ours must not block; the flag lives in the shared open file description.
    let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(UffdError::NonBlock)?;
    let fl = nix::fcntl::OFlag::from_bits_retain(fl) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(UffdError::NonBlock)?;
    log::info!(
        "reattached to userfaultfd {remote_fd} of process {pid}, features {}",
        feature_names(features)
    );
    Ok(RemoteUffd {
        // SAFETY: `fd` is an open userfaultfd we own; ownership moves into Uffd.
        uffd: unsafe { Uffd::from_raw_fd(into_raw(fd)) },
        process,
        owner: pid,
        remote_fd,
        features,
        available: kernel_features().unwrap_or(features),
        remote_closed: AtomicBool::new(false),
    })
}

/// Copies `remote_fd` out of `process` and runs `UFFDIO_API` on it.
fn adopt(
    process: &QemuProcess,
    remote_fd: i32,
    features: u64,
    available: Option<u64>,
) -> Result<RemoteUffd, UffdError> {
    let pid = process.pid();
    let (process, fd) = get_fd(process, remote_fd)?;
    let (available, _ioctls) =
        api(fd.as_raw_fd(), features).map_err(|errno| match (errno, available) {
            (Errno::EINVAL, Some(available)) if features & !available != 0 => {
                UffdError::MissingFeatures {
                    requested: features,
                    missing: features & !available,
                    available,
                }
            }
            _ => UffdError::Api {
                requested: features,
                errno,
            },
        })?;
    Ok(RemoteUffd {
        // SAFETY: `fd` is an open userfaultfd we own; ownership moves into Uffd.
        uffd: unsafe { Uffd::from_raw_fd(into_raw(fd)) },
        process,
        owner: pid,
        remote_fd,
        features,
        available,
        remote_closed: AtomicBool::new(false),
    })
}

fn into_raw(fd: OwnedFd) -> RawFd {
    std::os::fd::IntoRawFd::into_raw_fd(fd)
}

/// `pidfd_getfd(remote_fd)` on `process`'s pidfd; returns a handle of
/// thaw's own on the owner and the copied fd.
fn get_fd(process: &QemuProcess, remote_fd: i32) -> Result<(QemuProcess, OwnedFd), UffdError> {
    let pid = process.pid();
    if !process.alive() {
        return Err(UffdError::OwnerExited { pid });
    }
    let fd = process
        .get_fd(remote_fd)
        .map_err(|errno| UffdError::GetFd {
            pid,
            fd: remote_fd,
            errno,
        })?;
    Ok((process.try_clone()?, fd))
}

/// `UFFDIO_API` requesting `features`; returns the kernel's available
/// features and the fd's ioctls.
fn api(fd: RawFd, features: u64) -> Result<(u64, u64), Errno> {
    let mut arg = uffdio_api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `arg` is a valid uffdio_api the kernel reads and writes back;
    // `fd` is open for the duration of the call.
    unsafe { sys::api(fd, &mut arg) }?;
    Ok((arg.features, arg.ioctls))
}

/// Every `UFFD_FEATURE_*` this kernel offers, asked on a throw-away
/// userfaultfd of thaw's own.
pub fn kernel_features() -> Result<u64, Errno> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fd).map_err(|_| Errno::EBADF)?) };
    api(fd.as_raw_fd(), 0).map(|(features, _)| features)
}

impl RemoteUffd {
    /// The userfaultfd's number inside its owner (record it for [`reattach`]).
    pub fn remote_fd(&self) -> i32 {
        self.remote_fd
    }

    /// The process that created the userfaultfd and whose memory it serves.
    pub fn owner(&self) -> Pid {
        self.owner
    }

    /// The `UFFD_FEATURE_*` bits enabled on this userfaultfd.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Every `UFFD_FEATURE_*` bit the kernel offers.
    pub fn available_features(&self) -> u64 {
        self.available
    }

    /// thaw's copy, for ioctls not wrapped here (`r#continue`, write-protect).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Registers `start..start+len` (in the owner) for missing-page faults and
    /// checks that the range offers `COPY`, `ZEROPAGE` and `WAKE`.
    pub fn register_missing(&self, start: HostAddr, len: u64) -> Result<(), UffdError> {
        let have = self.register(start, len, RegisterMode::MISSING)?;
        if !have.contains(MISSING_IOCTLS) {
            let missing = MISSING_IOCTLS.difference(have);
            if let Err(e) = self.unregister(start, len) {
                log::warn!("{e}");
            }
            return Err(UffdError::MissingIoctls {
                start: start.0,
                len,
                missing,
                have,
            });
        }
        log::debug!(
            "registered {:#x}+{len:#x} of process {} for missing faults",
            start.0,
            self.owner
        );
        Ok(())
    }

    /// Registers `start..start+len` for missing *and* minor faults (shared
    /// memory with `UFFD_FEATURE_MINOR_SHMEM`): holes fault as missing, pages
    /// in the page cache but not mapped fault as minor, so a first touch of
    /// a page put into the file behind QEMU's back is still seen.
    pub fn register_missing_minor(&self, start: HostAddr, len: u64) -> Result<(), UffdError> {
        let need = MISSING_IOCTLS.union(IoctlFlags::from_bits_retain(
            1 << userfaultfd_sys::_UFFDIO_CONTINUE,
        ));
        self.register_needing(
            start,
            len,
            RegisterMode::MISSING | RegisterMode::MINOR,
            need,
        )
    }

    /// Registers `start..start+len` for missing faults and for write
    /// protection (shared memory with `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`)
    /// without protecting anything: holes fault as missing; a page in the
    /// page cache is mapped by the kernel on first touch without a fault
    /// to thaw, and only that page (a range registered for write
    /// protection gets no fault-around), so the pages mapped in the
    /// owner's page tables are the pages it touched.
    pub fn register_missing_wp(&self, start: HostAddr, len: u64) -> Result<(), UffdError> {
        self.register_needing(
            start,
            len,
            RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            MISSING_IOCTLS,
        )
    }

    /// Registers in `mode` and checks that the range offers `need`
    /// (unregistering it again if not).
    fn register_needing(
        &self,
        start: HostAddr,
        len: u64,
        mode: RegisterMode,
        need: IoctlFlags,
    ) -> Result<(), UffdError> {
        let have = self.register(start, len, mode)?;
        if !have.contains(need) {
            if let Err(e) = self.unregister(start, len) {
                log::warn!("{e}");
            }
            return Err(UffdError::MissingIoctls {
                start: start.0,
                len,
                missing: need.difference(have),
                have,
            });
        }
        Ok(())
    }

    /// Maps pages already in the page cache at `dst..dst+len` into the owner
    /// (`UFFDIO_CONTINUE`, answering minor faults); results as for
    /// [`RemoteUffd::copy`] (`EEXIST`: already mapped).
    pub fn continue_range(&self, dst: HostAddr, len: u64, wake: bool) -> CopyResult {
        match self.uffd.r#continue(dst.as_ptr(), usize_from(len), wake) {
            Ok(n) if n >= len => CopyResult::Done(usize_from(len)),
            Ok(n) => CopyResult::Failed {
                copied: usize_from(n),
                errno: Errno::EAGAIN,
            },
            Err(e) => match crate_errno(e) {
                Errno::EEXIST => CopyResult::Exists { copied: 0 },
                errno => CopyResult::Failed { copied: 0, errno },
            },
        }
    }

    /// Write-protects `start..start+len` (registered in WP mode) with
    /// `UFFDIO_WRITEPROTECT`.
    pub fn write_protect(&self, start: HostAddr, len: u64) -> Result<(), UffdError> {
        self.uffd
            .write_protect(start.as_ptr(), usize_from(len))
            .map_err(|e| UffdError::WriteProtect {
                start: start.0,
                len,
                errno: crate_errno(e),
            })
    }

    /// Lifts write protection from `start..start+len`, waking a thread
    /// blocked on a (synchronous) write-protect fault there if `wake`.
    pub fn unprotect(&self, start: HostAddr, len: u64, wake: bool) -> Result<(), UffdError> {
        self.uffd
            .remove_write_protection(start.as_ptr(), usize_from(len), wake)
            .map_err(|e| UffdError::WriteProtect {
                start: start.0,
                len,
                errno: crate_errno(e),
            })
    }

    /// Registers a range in any mode; returns the ioctls it offers.
    pub fn register(
        &self,
        start: HostAddr,
        len: u64,
        mode: RegisterMode,
    ) -> Result<IoctlFlags, UffdError> {
        self.uffd
            .register_with_mode(start.as_ptr(), usize_from(len), mode)
            .map_err(|e| UffdError::Register {
                start: start.0,
                len,
                errno: crate_errno(e),
            })
    }

    /// Unregisters a range; faults there are no longer reported.
    pub fn unregister(&self, start: HostAddr, len: u64) -> Result<(), UffdError> {
        self.uffd
            .unregister(start.as_ptr(), usize_from(len))
            .map_err(|e| UffdError::Unregister {
                start: start.0,
                len,
                errno: crate_errno(e),
            })
    }

    /// Wakes threads waiting on faults in a range (after another installer won).
    pub fn wake(&self, start: HostAddr, len: u64) -> Result<(), UffdError> {
        self.uffd
            .wake(start.as_ptr(), usize_from(len))
            .map_err(|e| UffdError::Wake {
                start: start.0,
                len,
                errno: crate_errno(e),
            })
    }

    /// Installs `src` (page-multiple length) at `dst` in the owner with
    /// `UFFDIO_COPY`; `wake` wakes threads faulting in the range.
    ///
    /// When the kernel stops after some pages it reports only `EAGAIN`; the
    /// rest is retried once so the result says why it stopped (e.g.
    /// [`CopyResult::Exists`] for a present page in the middle).
    pub fn copy(&self, dst: HostAddr, src: &[u8], wake: bool) -> CopyResult {
        let mode = if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE };
        let len = src.len() as u64;
        let fd = self.uffd.as_raw_fd();
        let mut done = 0u64;
        while done < len {
            let mut arg = uffdio_copy {
                dst: dst.0 + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode,
                copy: 0,
            };
            // SAFETY: `arg` is a valid uffdio_copy; the kernel reads `len - done`
            // bytes at `src + done`, inside the live slice `src`, and writes
            // only into the owner's registered (missing) pages and `arg.copy`.
            match unsafe { sys::copy(fd, &mut arg) } {
                Ok(_) => return CopyResult::Done(usize_from(len)),
                Err(_) if arg.copy > 0 => done += arg.copy.unsigned_abs(),
                Err(Errno::EEXIST) => {
                    return CopyResult::Exists {
                        copied: usize_from(done),
                    }
                }
                Err(errno) => {
                    return CopyResult::Failed {
                        copied: usize_from(done),
                        errno,
                    }
                }
            }
        }
        CopyResult::Done(usize_from(len))
    }

    /// Installs zero pages over `dst..dst+len` with `UFFDIO_ZEROPAGE`;
    /// results as for [`RemoteUffd::copy`].
    pub fn zeropage(&self, dst: HostAddr, len: u64, wake: bool) -> CopyResult {
        let mode = if wake {
            0
        } else {
            UFFDIO_ZEROPAGE_MODE_DONTWAKE
        };
        let fd = self.uffd.as_raw_fd();
        let mut done = 0u64;
        while done < len {
            let mut arg = uffdio_zeropage {
                range: uffdio_range {
                    start: dst.0 + done,
                    len: len - done,
                },
                mode,
                zeropage: 0,
            };
            // SAFETY: `arg` is a valid uffdio_zeropage; the kernel writes only
            // into the owner's registered (missing) pages and `arg.zeropage`.
            match unsafe { sys::zeropage(fd, &mut arg) } {
                Ok(_) => return CopyResult::Done(usize_from(len)),
                Err(_) if arg.zeropage > 0 => done += arg.zeropage.unsigned_abs(),
                Err(Errno::EEXIST) => {
                    return CopyResult::Exists {
                        copied: usize_from(done),
                    }
                }
                Err(errno) => {
                    return CopyResult::Failed {
                        copied: usize_from(done),
                        errno,
                    }
                }
            }
        }
        CopyResult::Done(usize_from(len))
    }

    /// Reads the pending events into `buf`, waiting up to `timeout` (`None`:
    /// forever) for the first; an empty slice means none arrived in time.
    /// Fails with [`UffdError::OwnerExited`] once the owner has exited.
    /// Reading a fault does not resolve it: install the page (or wake).
    pub fn read_events<'b>(
        &self,
        buf: &'b mut EventBuffer,
        timeout: Option<Duration>,
    ) -> Result<&'b [FaultEvent], UffdError> {
        let mut n = self.read_msgs(&mut buf.msgs)?;
        if n == 0 && timeout != Some(Duration::ZERO) && self.wait_readable(timeout)? {
            n = self.read_msgs(&mut buf.msgs)?;
        }
        for (msg, ev) in buf.msgs[..n].iter().zip(buf.events.iter_mut()) {
            *ev = decode(msg);
        }
        Ok(&buf.events[..n])
    }

    /// One event, waiting up to `timeout`; see [`RemoteUffd::read_events`].
    pub fn read_fault(&self, timeout: Option<Duration>) -> Result<Option<FaultEvent>, UffdError> {
        // SAFETY: all-zero bytes are a valid uffd_msg (plain integers).
        let mut msg: [uffd_msg; 1] = [unsafe { std::mem::zeroed() }];
        let mut n = self.read_msgs(&mut msg)?;
        if n == 0 && timeout != Some(Duration::ZERO) && self.wait_readable(timeout)? {
            n = self.read_msgs(&mut msg)?;
        }
        Ok((n == 1).then(|| decode(&msg[0])))
    }

    /// Non-blocking `read(2)` of whole messages; 0 when none are queued.
    fn read_msgs(&self, msgs: &mut [uffd_msg]) -> Result<usize, UffdError> {
        let bytes = std::mem::size_of_val(msgs);
        // SAFETY: `msgs` is a live, writable buffer of `bytes` bytes, and any
        // bytes the kernel writes form valid uffd_msg values (plain data).
        let r = unsafe { libc::read(self.uffd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes) };
        if r < 0 {
            return match Errno::last() {
                Errno::EAGAIN | Errno::EINTR => Ok(0),
                errno => Err(UffdError::Read(errno)),
            };
        }
        let r = r.unsigned_abs();
        if r % MSG_SIZE != 0 {
            return Err(UffdError::ShortRead(r));
        }
        Ok(r / MSG_SIZE)
    }

    /// Polls the userfaultfd and the owner's pidfd; true when events wait.
    fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, UffdError> {
        let mut fds = [
            PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.process.pidfd(), PollFlags::POLLIN),
        ];
        let ts = timeout.map(nix::sys::time::TimeSpec::from_duration);
        match nix::poll::ppoll(&mut fds, ts, None) {
            Ok(0) | Err(Errno::EINTR) => return Ok(false),
            Ok(_) => {}
            Err(errno) => return Err(UffdError::Poll(errno)),
        }
        let ready = |fd: &PollFd| fd.revents().unwrap_or(PollFlags::empty());
        if !ready(&fds[1]).is_empty() {
            return Err(UffdError::OwnerExited { pid: self.owner });
        }
        let uffd = ready(&fds[0]);
        if uffd.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            return Err(UffdError::PollError(uffd.bits()));
        }
        Ok(uffd.contains(PollFlags::POLLIN))
    }

    /// Whether the owner is still running (its pidfd is not yet readable).
    pub fn owner_alive(&self) -> bool {
        self.process.alive()
    }

    /// The owner, held by pidfd.
    pub fn process(&self) -> &QemuProcess {
        &self.process
    }

    /// Closes the owner's copy of the userfaultfd (an injected `close`).
    ///
    /// Call it only once every page is resident and the ranges are
    /// unregistered: while the owner's copy is open, an unserved fault
    /// blocks rather than reading a hole as zeros. Closing twice is a no-op.
    pub fn close_remote(&self) -> Result<(), UffdError> {
        if self.remote_closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.close_remote_inner();
        if r.is_err() {
            self.remote_closed.store(false, Ordering::Release);
        }
        r
    }

    fn close_remote_inner(&self) -> Result<(), UffdError> {
        let (pid, fd) = (self.owner, self.remote_fd);
        // The pidfd pins the identity: never inject into a recycled pid.
        if !self.owner_alive() {
            return Err(UffdError::OwnerExited { pid });
        }
        if !self.same_file_in_owner() {
            return Err(UffdError::RemoteFdChanged { pid, fd });
        }
        let r = inject::inject_syscall(
            &self.process,
            libc::SYS_close,
            &[inject::reg_unsigned(fd.into())],
        )?;
        if r < 0 {
            return Err(UffdError::CloseRemote {
                pid,
                fd,
                errno: inject::errno_of(r),
            });
        }
        log::info!("closed the userfaultfd (fd {fd}) inside process {pid}");
        Ok(())
    }

    /// Whether the owner's `remote_fd` still is the file thaw holds
    /// (`kcmp(KCMP_FILE)`); assumed so where kcmp is unavailable.
    fn same_file_in_owner(&self) -> bool {
        const KCMP_FILE: libc::c_long = 0;
        // SAFETY: kcmp takes plain integers and touches no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                libc::getpid() as libc::c_long,
                self.owner.as_raw() as libc::c_long,
                KCMP_FILE,
                self.uffd.as_raw_fd() as libc::c_long,
                self.remote_fd as libc::c_long,
            )
        };
        match r {
            0 => true,
            r if r > 0 => false,
            _ => {
                let errno = Errno::last();
                log::debug!(
                    "kcmp unavailable ({errno}); trusting fd {} of {}",
                    self.remote_fd,
                    self.owner
                );
                errno != Errno::EBADF
            }
        }
    }
}

impl AsFd for RemoteUffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

impl AsRawFd for RemoteUffd {
    fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}

/// The `userfaultfd` crate wraps errnos (of its own `nix` version) in its
/// error type.
fn crate_errno(e: userfaultfd::Error) -> Errno {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => Errno::from_raw(errno as i32),
        _ => Errno::EIO,
    }
}

fn decode(msg: &uffd_msg) -> FaultEvent {
    let event = msg.event;
    // The kernel fills the union member selected by `event`; every member is
    // plain integers and is copied out by value (no references into the
    // packed struct).
    match event {
        UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above; `pagefault` is the member for PAGEFAULT.
            let pf = unsafe { msg.arg.pagefault };
            let (flags, addr) = (pf.flags, pf.address);
            if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                FaultEvent::WriteProtectFault { addr }
            } else if flags & UFFD_PAGEFAULT_FLAG_MINOR != 0 {
                FaultEvent::MinorFault { addr }
            } else {
                // Reads and writes are served alike; the WRITE flag is ignored.
                FaultEvent::PageFault { addr }
            }
        }
        UFFD_EVENT_REMOVE => {
            // SAFETY: see above; `remove` is the member for REMOVE.
            let r = unsafe { msg.arg.remove };
            FaultEvent::Remove {
                start: r.start,
                end: r.end,
            }
        }
        UFFD_EVENT_UNMAP => {
            // SAFETY: see above; UNMAP reuses the `remove` member.
            let r = unsafe { msg.arg.remove };
            FaultEvent::Unmap {
                start: r.start,
                end: r.end,
            }
        }
        UFFD_EVENT_REMAP => {
            // SAFETY: see above; `remap` is the member for REMAP.
            let r = unsafe { msg.arg.remap };
            FaultEvent::Remap {
                from: r.from,
                to: r.to,
                len: r.len,
            }
        }
        event => FaultEvent::Other { event },
    }
}

/// One mapping of a process (a line of `/proc/<pid>/maps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: HostAddr,
    pub len: u64,
    /// Offset of the mapping in its file.
    pub offset: u64,
    /// The file's path, without the ` (deleted)` suffix.
    pub path: String,
    /// The file was unlinked (the path ended in ` (deleted)`).
    pub deleted: bool,
    /// `MAP_SHARED` (the `s` permission flag).
    pub shared: bool,
}

/// Mappings of `pid` whose path contains `path_substring`, in address order.
pub fn find_mapping(pid: Pid, path_substring: &str) -> Result<Vec<Mapping>, UffdError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&path).map_err(|source| UffdError::Proc { path, source })?;
    Ok(maps
        .lines()
        .filter_map(parse_maps_line)
        .filter(|m| m.path.contains(path_substring))
        .collect())
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    // start-end perms offset dev inode   path (which may contain spaces)
    let mut it = line.splitn(6, ' ');
    let (range, perms, offset) = (it.next()?, it.next()?, it.next()?);
    let (_dev, _inode) = (it.next()?, it.next()?);
    let path = it.next().unwrap_or("").trim_start();
    if path.is_empty() {
        return None;
    }
    let (s, e) = range.split_once('-')?;
    let (start, end) = (
        u64::from_str_radix(s, 16).ok()?,
        u64::from_str_radix(e, 16).ok()?,
    );
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    Some(Mapping {
        start: HostAddr(start),
        len: end.checked_sub(start)?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        path: path.to_string(),
        deleted,
        shared: perms.as_bytes().get(3) == Some(&b's'),
    })
}

#[cfg(test)]
// Test fixtures: casts of small constants and of the tests' own values
// (their children's pids and fds); a wrong one fails a test.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
mod tests {
    use super::*;
    use crate::mem::PAGE_SIZE;
    use crate::remote::inject::tests::{fd_target, pipe, process, read_with_timeout, Child};
    use nix::sys::wait::WaitStatus;
    use std::os::fd::AsRawFd;
    use userfaultfd_sys::UFFD_FEATURE_MISSING_SHMEM;

    const P: u64 = PAGE_SIZE;

    /// Order-dependent checksum over 64-bit words, as the child computes it.
    fn mix(sum: u64, word: u64) -> u64 {
        (sum.rotate_left(5) ^ word).wrapping_mul(0x100_0000_01b3)
    }

    /// Content of page `i` when it is not a zero page.
    fn pattern(i: u64) -> Vec<u8> {
        (0..P / 8)
            .flat_map(|w| ((i << 32) ^ w ^ 0x5eed_0000_0000_5eed).to_ne_bytes())
            .collect()
    }

    fn checksum(pages: &[Option<Vec<u8>>]) -> u64 {
        let zero = vec![0u8; P as usize];
        pages
            .iter()
            .flat_map(|p| {
                p.as_deref()
                    .unwrap_or(&zero)
                    .chunks_exact(8)
                    .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
                    .collect::<Vec<_>>()
            })
            .fold(0, mix)
    }

    /// Pipes and memfd shared with a mapper child.
    struct Mapper {
        child: Child,
        memfd: OwnedFd,
        go: OwnedFd,
        result: OwnedFd,
        exit: OwnedFd,
        pages: u64,
    }

    /// Forks a child that maps `pages` pages of a fresh memfd called `name`
    /// (MAP_SHARED), says ready, waits for "go", reads every page, writes a
    /// checksum back, waits for "exit" and exits 0. Async-signal-safe only.
    fn mapper(name: &str, pages: u64) -> Mapper {
        let cname = std::ffi::CString::new(name).expect("name");
        let memfd =
            nix::sys::memfd::memfd_create(cname.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .expect("memfd_create");
        nix::unistd::ftruncate(&memfd, (pages * P) as i64).expect("ftruncate");
        let (ready_r, ready_w) = pipe();
        let (go_r, go_w) = pipe();
        let (result_r, result_w) = pipe();
        let (exit_r, exit_w) = pipe();
        let fds = [
            memfd.as_raw_fd(),
            ready_w.as_raw_fd(),
            go_r.as_raw_fd(),
            result_w.as_raw_fd(),
            exit_r.as_raw_fd(),
        ];
        let len = (pages * P) as usize;
        let child = Child::spawn(move || {
            let [memfd, ready, go, result, exit] = fds;
            let mut byte = [0u8; 1];
            // SAFETY: raw system calls on inherited fds and a fresh mapping,
            // read with volatile loads inside its bounds; no allocation.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    memfd,
                    0,
                );
                if p == libc::MAP_FAILED {
                    libc::_exit(10);
                }
                if libc::write(ready, byte.as_ptr().cast(), 1) != 1
                    || libc::read(go, byte.as_mut_ptr().cast(), 1) != 1
                {
                    libc::_exit(11);
                }
                let words = p as *const u64;
                let mut sum = 0u64;
                for i in 0..len / 8 {
                    sum = mix(sum, std::ptr::read_volatile(words.add(i)));
                }
                let out = sum.to_ne_bytes();
                if libc::write(result, out.as_ptr().cast(), 8) != 8 {
                    libc::_exit(12);
                }
                libc::read(exit, byte.as_mut_ptr().cast(), 1);
                libc::_exit(0);
            }
        });
        let mut b = [0u8; 1];
        assert_eq!(
            read_with_timeout(ready_r.as_raw_fd(), &mut b),
            1,
            "child not ready"
        );
        Mapper {
            child,
            memfd,
            go: go_w,
            result: result_r,
            exit: exit_w,
            pages,
        }
    }

    impl Mapper {
        fn mapping(&self, name: &str) -> Mapping {
            let maps = find_mapping(self.child.pid, name).expect("maps");
            assert_eq!(maps.len(), 1, "{maps:?}");
            let m = maps[0].clone();
            assert!(
                m.shared && m.deleted && m.len == self.pages * P && m.offset == 0,
                "{m:?}"
            );
            m
        }

        fn go(&self) {
            nix::unistd::write(&self.go, b"g").expect("go");
        }

        fn checksum(&self) -> u64 {
            let mut b = [0u8; 8];
            assert_eq!(read_with_timeout(self.result.as_raw_fd(), &mut b), 8);
            u64::from_ne_bytes(b)
        }

        fn finish(mut self) {
            nix::unistd::write(&self.exit, b"x").expect("exit");
            assert_eq!(self.child.wait(), WaitStatus::Exited(self.child.pid, 0));
        }

        /// thaw's own read-only view of the memfd (never touched, only mincore'd).
        fn view(&self) -> View {
            let len = (self.pages * P) as usize;
            // SAFETY: a fresh read-only shared mapping of our memfd; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    self.memfd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            View { p, len }
        }
    }

    struct View {
        p: *mut libc::c_void,
        len: usize,
    }

    impl View {
        /// Whether page `i` of the memfd is in the page cache (no access made).
        fn resident(&self, i: u64) -> bool {
            let mut vec = [0u8; 1];
            // SAFETY: the page lies inside our live mapping; mincore writes one byte.
            let r = unsafe {
                libc::mincore(self.p.add((i * P) as usize), P as usize, vec.as_mut_ptr())
            };
            assert_eq!(r, 0, "mincore: {}", Errno::last());
            vec[0] & 1 == 1
        }

        fn page(&self, i: u64) -> &[u8] {
            // SAFETY: inside our live read-only mapping; only called on resident pages.
            unsafe {
                std::slice::from_raw_parts(self.p.add((i * P) as usize) as *const u8, P as usize)
            }
        }
    }

    impl Drop for View {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `Mapper::view`.
            unsafe { libc::munmap(self.p, self.len) };
        }
    }

    /// Numbers of the userfaultfds in `pid`'s fd table. (A forked child may
    /// inherit some from the test process, so tests compare before/after.)
    fn uffd_fds(pid: Pid) -> Vec<i32> {
        let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.as_os_str() == "anon_inode:[userfaultfd]")
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        fds
    }

    #[test]
    fn serves_every_fault_of_a_child() {
        const PAGES: u64 = 64;
        let m = mapper("thaw-uffd-serve", PAGES);
        let uffd = take_over(&process(m.child.pid), UFFD_FEATURE_MISSING_SHMEM).expect("take over");
        assert_eq!(uffd.owner(), m.child.pid);
        assert_eq!(uffd.features(), UFFD_FEATURE_MISSING_SHMEM);
        assert_eq!(
            fd_target(m.child.pid, uffd.remote_fd() as i64)
                .map(|t| t.to_string_lossy().into_owned()),
            Some("anon_inode:[userfaultfd]".into())
        );
        let map = m.mapping("thaw-uffd-serve");
        uffd.register_missing(map.start, map.len).expect("register");
        m.go();

        let zero_page = |i: u64| i % 5 == 0;
        let mut served = [false; PAGES as usize];
        let (mut faults, mut batches) = (0u64, 0u64);
        let mut buf = EventBuffer::new(16);
        while served.iter().any(|s| !s) {
            let batch = uffd
                .read_events(&mut buf, Some(Duration::from_secs(10)))
                .expect("read events");
            assert!(!batch.is_empty(), "timed out with {faults} faults served");
            batches += 1;
            for ev in batch {
                let FaultEvent::PageFault { addr } = *ev else {
                    panic!("unexpected event {ev:?}")
                };
                let i = (addr - map.start.0) / P;
                assert!(
                    i < PAGES && !served[i as usize],
                    "fault on {addr:#x} (page {i})"
                );
                served[i as usize] = true;
                faults += 1;
                let r = if zero_page(i) {
                    uffd.zeropage(HostAddr(addr), P, true)
                } else {
                    uffd.copy(HostAddr(addr), &pattern(i), true)
                };
                assert_eq!(r, CopyResult::Done(P as usize), "page {i}");
            }
        }
        let expected: Vec<_> = (0..PAGES)
            .map(|i| (!zero_page(i)).then(|| pattern(i)))
            .collect();
        assert_eq!(
            m.checksum(),
            checksum(&expected),
            "the child saw other data than was installed"
        );
        assert_eq!(faults, PAGES, "one fault per page touched");
        assert!(batches <= faults);
        assert_eq!(
            uffd.read_fault(Some(Duration::from_millis(20)))
                .expect("read"),
            None
        );

        uffd.unregister(map.start, map.len).expect("unregister");
        uffd.close_remote().expect("close remote");
        uffd.close_remote().expect("closing twice is a no-op");
        assert_eq!(fd_target(m.child.pid, uffd.remote_fd() as i64), None);
        m.finish();
    }

    #[test]
    fn copy_and_zeropage_decode_exists_and_partial_progress() {
        let m = mapper("thaw-uffd-copy", 12);
        let uffd = take_over(&process(m.child.pid), UFFD_FEATURE_MISSING_SHMEM).expect("take over");
        let map = m.mapping("thaw-uffd-copy");
        uffd.register_missing(map.start, map.len).expect("register");
        let view = m.view();
        let at = |i: u64| map.start.offset(i * P);
        let data = |from: u64, n: u64| (from..from + n).flat_map(pattern).collect::<Vec<u8>>();

        assert_eq!(
            uffd.copy(at(1), &data(1, 1), true),
            CopyResult::Done(P as usize)
        );
        assert_eq!(
            uffd.copy(at(1), &data(1, 1), true),
            CopyResult::Exists { copied: 0 }
        );
        // Pages 0..3 with page 1 present: page 0 lands, then the copy stops.
        assert_eq!(
            uffd.copy(at(0), &data(0, 3), true),
            CopyResult::Exists { copied: P as usize }
        );
        assert!(view.resident(0) && view.resident(1) && !view.resident(2));

        assert_eq!(
            uffd.zeropage(at(2), 2 * P, true),
            CopyResult::Done(2 * P as usize)
        );
        assert_eq!(
            uffd.zeropage(at(3), 3 * P, true),
            CopyResult::Exists { copied: 0 }
        );
        assert!(!view.resident(4));
        assert_eq!(uffd.zeropage(at(6), P, true), CopyResult::Done(P as usize));
        assert_eq!(
            uffd.copy(at(4), &data(4, 4), true),
            CopyResult::Exists {
                copied: 2 * P as usize
            }
        );
        assert_eq!(
            uffd.copy(at(7), &data(7, 1), true),
            CopyResult::Done(P as usize)
        );

        // What the kernel itself reports for a copy stopped by a present page:
        // the bytes done in `copy` and EAGAIN, not EEXIST.
        assert_eq!(uffd.zeropage(at(10), P, true), CopyResult::Done(P as usize));
        let src = data(8, 4);
        let mut arg = uffdio_copy {
            dst: at(8).0,
            src: src.as_ptr() as u64,
            len: 4 * P,
            mode: 0,
            copy: 0,
        };
        // SAFETY: valid uffdio_copy reading `src` (4 pages, alive) into the child's registered range.
        let raw = unsafe { sys::copy(uffd.as_raw_fd(), &mut arg) };
        assert_eq!((raw, arg.copy), (Err(Errno::EAGAIN), 2 * P as i64));
        assert_eq!(
            uffd.copy(at(11), &data(11, 1), true),
            CopyResult::Done(P as usize)
        );

        // Refusals are decoded too.
        assert_eq!(
            uffd.copy(at(0), &[0u8; 100], true),
            CopyResult::Failed {
                copied: 0,
                errno: Errno::EINVAL
            }
        );
        let outside = uffd.copy(map.start.offset(map.len + 64 * P), &data(0, 1), true);
        assert!(
            matches!(
                outside,
                CopyResult::Failed {
                    copied: 0,
                    errno: Errno::ENOENT | Errno::EINVAL
                }
            ),
            "{outside:?}"
        );
        assert_eq!(uffd.copy(at(5), &[], true), CopyResult::Done(0));

        let zeros = [2, 3, 6, 10];
        let expected: Vec<_> = (0..12)
            .map(|i| (!zeros.contains(&i)).then(|| pattern(i)))
            .collect();
        for (i, page) in expected.iter().enumerate() {
            assert!(view.resident(i as u64), "page {i} not installed");
            assert_eq!(
                view.page(i as u64),
                page.as_deref().unwrap_or(&[0u8; P as usize]),
                "page {i}"
            );
        }
        // Everything is resident: the child reads it all without faulting.
        m.go();
        assert_eq!(m.checksum(), checksum(&expected));
        let mut buf = EventBuffer::new(4);
        assert!(uffd
            .read_events(&mut buf, Some(Duration::from_millis(20)))
            .expect("read")
            .is_empty());
        assert!(uffd
            .read_events(&mut buf, Some(Duration::ZERO))
            .expect("read")
            .is_empty());
        m.finish();
    }

    #[test]
    fn missing_features_are_named_and_nothing_is_left_behind() {
        let m = mapper("thaw-uffd-features", 1);
        let bogus = 1u64 << 63;
        let before = uffd_fds(m.child.pid);
        let err = take_over(&process(m.child.pid), UFFD_FEATURE_MISSING_SHMEM | bogus)
            .expect_err("must fail");
        assert!(
            matches!(err, UffdError::MissingFeatures { missing, .. } if missing == bogus),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "the kernel lacks userfaultfd features bit63 (requested MISSING_SHMEM|bit63"
            ),
            "{msg}"
        );
        assert_eq!(uffd_fds(m.child.pid), before);
        m.go();
        m.checksum();
        m.finish();
    }

    #[test]
    fn reattach_and_owner_exit() {
        let m = mapper("thaw-uffd-reattach", 2);
        let mut before = uffd_fds(m.child.pid);
        let uffd = take_over(&process(m.child.pid), UFFD_FEATURE_MISSING_SHMEM).expect("take over");
        let again = reattach(&process(m.child.pid), uffd.remote_fd()).expect("reattach");
        assert_eq!(
            (again.remote_fd(), again.features()),
            (uffd.remote_fd(), UFFD_FEATURE_MISSING_SHMEM)
        );
        assert!(again.owner_alive());
        let not_uffd = reattach(&process(m.child.pid), m.go.as_raw_fd())
            .expect_err("a pipe is no userfaultfd");
        assert!(
            matches!(not_uffd, UffdError::NotUserfaultfd { .. }),
            "{not_uffd:?}"
        );
        before.push(uffd.remote_fd());
        before.sort_unstable();
        assert_eq!(uffd_fds(m.child.pid), before);

        // Unregistered: the child reads zeros and exits; the fault reader notices.
        m.go();
        assert_eq!(m.checksum(), checksum(&[None, None]));
        let pid = m.child.pid;
        nix::unistd::write(&m.exit, b"x").expect("exit");
        let mut buf = EventBuffer::new(4);
        let err = uffd
            .read_events(&mut buf, Some(Duration::from_secs(10)))
            .expect_err("owner exited");
        assert!(
            matches!(err, UffdError::OwnerExited { pid: p } if p == pid),
            "{err:?}"
        );
        assert!(matches!(
            again.close_remote(),
            Err(UffdError::OwnerExited { .. })
        ));
        let mut child = m.child;
        assert_eq!(child.wait(), WaitStatus::Exited(pid, 0));
    }

    #[test]
    fn maps_lines_parse() {
        let line =
            "7f12a0000000-7f12a2000000 rw-s 00001000 00:01 1234                       /dev/shm/thaw vm/ram0 (deleted)";
        let m = parse_maps_line(line).expect("parse");
        assert_eq!(m.start, HostAddr(0x7f12a0000000));
        assert_eq!((m.len, m.offset), (0x2000000, 0x1000));
        assert_eq!(m.path, "/dev/shm/thaw vm/ram0");
        assert!(m.deleted && m.shared);
        let anon = "7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ";
        assert_eq!(parse_maps_line(anon), None);
        let vdso =
            parse_maps_line("7ffd3000-7ffd5000 r-xp 00000000 00:00 0                  [vdso]")
                .expect("vdso");
        assert!(!vdso.shared && !vdso.deleted && vdso.path == "[vdso]");
    }

    #[test]
    fn feature_names_are_readable() {
        assert_eq!(feature_names(0), "none");
        assert_eq!(
            feature_names(UFFD_FEATURE_MISSING_SHMEM | 1 << 3),
            "EVENT_REMOVE|MISSING_SHMEM"
        );
        assert_eq!(feature_names(1 << 40), "bit40");
    }
}
