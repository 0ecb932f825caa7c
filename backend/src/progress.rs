//! How long operations (saves, fills) report how far they got: a small
//! trait the caller implements (the command line draws a bar); the library
//! itself never draws anything.

use std::sync::Arc;

/// Receives byte counts from a long operation.
pub trait Progress: Send + Sync {
    /// The operation `what` starts and will move `total` bytes.
    fn start(&self, what: &str, total: u64);
    /// `bytes` more were moved.
    fn advance(&self, bytes: u64);
    /// The operation ended (done or failed).
    fn finish(&self);
}

/// Reports nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// A shared progress receiver; the default reports nowhere.
#[derive(Clone)]
pub struct SharedProgress(pub Arc<dyn Progress>);

impl SharedProgress {
    /// Shares `p`.
    pub fn new(p: impl Progress + 'static) -> SharedProgress {
        SharedProgress(Arc::new(p))
    }
}

impl Default for SharedProgress {
    fn default() -> Self {
        SharedProgress(Arc::new(Silent))
    }
}

impl std::fmt::Debug for SharedProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedProgress")
    }
}

impl std::ops::Deref for SharedProgress {
    type Target = dyn Progress;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}
