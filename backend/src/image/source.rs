//! Where an image's `pages.bin` is read from, behind one trait: a local
//! file ([`LocalPages`]) or an object left in an object store
//! ([`crate::store::pages::RemotePages`], a restore straight from a
//! store). The image reader above it verifies every page it gets, from
//! either.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

/// Requests sent to a store and bytes received from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    pub requests: u64,
    pub bytes: u64,
}

impl std::ops::Add for Fetched {
    type Output = Fetched;

    fn add(self, other: Fetched) -> Fetched {
        Fetched {
            requests: self.requests + other.requests,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// The bytes of `pages.bin`, read at offsets from any thread.
pub trait PageSource: Send + Sync {
    /// Its length in bytes.
    fn len(&self) -> u64;

    /// Whether it is empty (an image of an all-zero guest).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes from `offset` on, blocking the calling
    /// thread only. `urgent`: a fault waits on it (a remote source serves
    /// it ahead of background reads).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, urgent: bool) -> std::io::Result<()>;

    /// How many bytes a bulk reader (the fill) should ask for at once, if
    /// not the local default.
    fn bulk_read_bytes(&self) -> Option<u64> {
        None
    }

    /// Whether the bytes are fetched from a store (not a file on this
    /// host that may also be read around the page cache).
    fn is_remote(&self) -> bool {
        false
    }

    /// What was fetched from a store so far (`None` for a local file).
    fn fetched(&self) -> Option<Fetched> {
        None
    }
}

/// `pages.bin` as a local file.
pub struct LocalPages {
    file: File,
    len: u64,
}

impl LocalPages {
    pub fn new(file: File, len: u64) -> LocalPages {
        LocalPages { file, len }
    }
}

impl PageSource for LocalPages {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64, _urgent: bool) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}
