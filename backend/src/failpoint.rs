//! Failure injection for end-to-end tests: `THAW_FAILPOINT=<name>` makes
//! the named point fail with an error, `THAW_FAILPOINT=<name>:hang` makes
//! it block forever (the test then kills thaw there), and
//! `THAW_FAILPOINT=<name>:stop` stops the process there with `SIGSTOP`
//! the first time it gets there (the test sees it stopped, does what must
//! happen meanwhile, and lets it go on with `SIGCONT`). Unset, every
//! point passes at the cost of one environment lookup.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a `:stop` failpoint has stopped this process already.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Checks failpoint `name`.
pub fn check(name: &str) -> std::io::Result<()> {
    let Some(set) = std::env::var_os("THAW_FAILPOINT") else {
        return Ok(());
    };
    let set = set.to_string_lossy();
    if set == name {
        log::error!("failpoint {name}: failing here");
        return Err(std::io::Error::other(format!("failpoint {name}")));
    }
    if set.strip_suffix(":stop") == Some(name) && !STOPPED.swap(true, Ordering::Relaxed) {
        log::error!("failpoint {name}: stopping here until SIGCONT");
        return nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)
            .map_err(std::io::Error::from);
    }
    if set.strip_suffix(":hang") == Some(name) {
        log::error!("failpoint {name}: hanging here");
        loop {
            std::thread::park();
        }
    }
    Ok(())
}
