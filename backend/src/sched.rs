//! The scheduling policy of thaw's own threads: background work (the
//! restore's filler, a live save's pause copy) steps aside for the guest.

/// Sets thread `tid`'s scheduling policy (0: the calling thread) with
/// priority 0; whether it took. A refusal is logged, never fatal: the
/// thread then runs as it was.
pub(crate) fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on a thread of this process with a valid,
    // initialised sched_param; it changes only that thread's policy.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if r != 0 {
        log::debug!(
            "scheduling policy {policy} for thread {tid}: {}",
            std::io::Error::last_os_error()
        );
    }
    r == 0
}
