//! Failure injection for end-to-end tests: `THAW_FAILPOINT=<name>` makes
//! the named point fail with an error, `THAW_FAILPOINT=<name>:hang` makes
//! it block forever (the test then kills thaw there). Unset, every point
//! passes at the cost of one environment lookup.

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
    if set.strip_suffix(":hang") == Some(name) {
        log::error!("failpoint {name}: hanging here");
        loop {
            std::thread::park();
        }
    }
    Ok(())
}
