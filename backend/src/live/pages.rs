//! Who owns each guest page during a live copy, and where the pages saved
//! ahead of the copier wait.
//!
//! [`PageStates`] is the single owner of every page's state: every page
//! starts [`NOT_SAVED`] (a hole at the instant is simply never read by the
//! copier; saving one ahead saves its zeros); exactly one actor
//! (the copier or the write-fault thread) wins [`PageStates::claim`] and
//! moves it to [`COPYING`], reads its instant bytes and only then marks it
//! [`SAVED`] and lifts its write protection. So each page is saved exactly
//! once, and never after the guest could write it again.
//!
//! [`SideStore`] holds the pages saved ahead of the copier until it
//! reaches them and writes them into the image in page order: those the
//! fault thread saved (a guest write was waiting on them) in an unnamed
//! scratch file next to the image, and those copied ahead of the walk
//! (speculative pre-copy, in the pause or first after the resume) in
//! memory taken before the pause.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::mem::{u64_from, usize_from, PageIndex, PAGE_BYTES, PAGE_SIZE};

/// Write-protected, not saved yet.
pub const NOT_SAVED: u8 = 0;
/// Claimed by the copier or the fault thread, being read.
pub const COPYING: u8 = 1;
/// Its instant bytes are in thaw's hands; its protection may be lifted.
pub const SAVED: u8 = 2;
/// Not a page of guest RAM.
pub const OUTSIDE: u8 = 3;
/// Saved, and its bytes were all zero: either a zero page at the instant
/// or one the guest discarded since (a discard reported later tells).
pub const SAVED_ZERO: u8 = 4;

/// The state of every guest page of one live copy.
pub struct PageStates {
    states: Vec<AtomicU8>,
}

impl PageStates {
    /// `total` pages, none saved.
    pub fn new(total: u64) -> PageStates {
        PageStates {
            states: (0..total).map(|_| AtomicU8::new(NOT_SAVED)).collect(),
        }
    }

    /// Takes page `p` for copying if nobody has: `NOT_SAVED` → `COPYING`.
    /// Whoever gets `true` must read it and then call [`PageStates::saved`].
    pub fn claim(&self, p: PageIndex) -> bool {
        self.slot(p).is_some_and(|s| {
            s.compare_exchange(NOT_SAVED, COPYING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// The claimer has page `p`'s instant bytes: `COPYING` → `SAVED`
    /// (or [`SAVED_ZERO`] if they are all zero).
    pub fn saved(&self, p: PageIndex, zero: bool) {
        if let Some(s) = self.slot(p) {
            s.store(if zero { SAVED_ZERO } else { SAVED }, Ordering::Release);
        }
    }

    /// Whether page `p` is saved (with data or as zeros).
    pub fn is_saved(&self, p: PageIndex) -> bool {
        matches!(self.get(p), SAVED | SAVED_ZERO)
    }

    /// Page `p`'s state ([`OUTSIDE`] for a page outside guest RAM).
    pub fn get(&self, p: PageIndex) -> u8 {
        self.slot(p).map_or(OUTSIDE, |s| s.load(Ordering::Acquire))
    }

    /// Pages in `state` (for checks and reports).
    pub fn count(&self, state: u8) -> u64 {
        u64_from(
            self.states
                .iter()
                .filter(|s| s.load(Ordering::Relaxed) == state)
                .count(),
        )
    }

    fn slot(&self, p: PageIndex) -> Option<&AtomicU8> {
        self.states.get(usize_from(p.0))
    }
}

/// A slot number with this bit is a page of the in-memory part.
const IN_MEMORY: u32 = 1 << 31;

/// Pages saved ahead of the copier: one writer (the fault thread, or the
/// pause), one reader (the copier) per page, handed over through the
/// page's slot number.
pub struct SideStore {
    file: File,
    /// Per guest page: 0 = not here, else slot + 1 (with [`IN_MEMORY`]:
    /// of `memory`).
    slots: Vec<AtomicU32>,
    next: AtomicU32,
    /// The pages copied ahead of the walk, set once.
    memory: OnceLock<Vec<u8>>,
}

impl SideStore {
    /// A store for `total` guest pages in `file` (empty, private to thaw).
    pub fn new(file: File, total: u64) -> SideStore {
        SideStore {
            file,
            slots: (0..total).map(|_| AtomicU32::new(0)).collect(),
            next: AtomicU32::new(0),
            memory: OnceLock::new(),
        }
    }

    /// Keeps `memory` as the saved bytes of `pages`: each guest page with
    /// the number of its page in `memory`. Once per store.
    pub fn put_in_memory(
        &self,
        memory: Vec<u8>,
        pages: &[(PageIndex, usize)],
    ) -> std::io::Result<()> {
        let held = memory.len() / PAGE_BYTES;
        if held >= IN_MEMORY as usize || pages.iter().any(|&(_, at)| at >= held) {
            return Err(std::io::Error::other("a page beyond the memory kept"));
        }
        if self.memory.set(memory).is_err() {
            return Err(std::io::Error::other("pages kept in memory twice"));
        }
        for &(p, at) in pages {
            let entry = self
                .slots
                .get(usize_from(p.0))
                .ok_or_else(|| std::io::Error::other(format!("page {} outside guest RAM", p.0)))?;
            // Below IN_MEMORY (checked above): no overflow into the bit.
            let slot = u32::try_from(at + 1).map_err(|_| std::io::Error::other("slot"))?;
            entry.store(IN_MEMORY | slot, Ordering::Release);
        }
        Ok(())
    }

    /// Keeps `data` (one page) as page `p`'s saved bytes.
    pub fn put(&self, p: PageIndex, data: &[u8]) -> std::io::Result<()> {
        self.put_run(p, &data[..PAGE_BYTES])
    }

    /// Keeps `data` (whole pages) as the saved bytes of the pages from
    /// `first` on, with one write.
    pub fn put_run(&self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        let count = data.len() / PAGE_BYTES;
        let entries = self
            .slots
            .get(usize_from(first.0)..usize_from(first.0) + count)
            .ok_or_else(|| {
                std::io::Error::other(format!("pages {}+{count} outside guest RAM", first.0))
            })?;
        let n = u32::try_from(count).map_err(|_| std::io::Error::other("run too long"))?;
        let slot = self.next.fetch_add(n, Ordering::Relaxed);
        // Slots stay below IN_MEMORY, the bit that marks the memory's.
        if slot.checked_add(n).is_none_or(|end| end >= IN_MEMORY) {
            return Err(std::io::Error::other("too many pages saved ahead"));
        }
        self.file
            .write_all_at(&data[..count * PAGE_BYTES], u64::from(slot) * PAGE_SIZE)?;
        for (entry, held) in entries.iter().zip(slot + 1..) {
            entry.store(held, Ordering::Release);
        }
        Ok(())
    }

    /// Reads page `p`'s saved bytes into `buf` (one page); `false` if the
    /// store does not hold it.
    pub fn get(&self, p: PageIndex, buf: &mut [u8]) -> std::io::Result<bool> {
        let Some(entry) = self.slots.get(usize_from(p.0)) else {
            return Ok(false);
        };
        let slot = entry.load(Ordering::Acquire);
        if slot == 0 {
            return Ok(false);
        }
        if slot & IN_MEMORY != 0 {
            let at = usize_from(u64::from((slot & !IN_MEMORY) - 1)) * PAGE_BYTES;
            let page = self
                .memory
                .get()
                .and_then(|m| m.get(at..at + PAGE_BYTES))
                .ok_or_else(|| std::io::Error::other("a page kept in memory is missing"))?;
            buf[..PAGE_BYTES].copy_from_slice(page);
            return Ok(true);
        }
        self.file
            .read_exact_at(&mut buf[..PAGE_BYTES], u64::from(slot - 1) * PAGE_SIZE)?;
        Ok(true)
    }

    /// Pages held in the scratch file.
    pub fn len(&self) -> u64 {
        u64::from(self.next.load(Ordering::Relaxed))
    }

    /// Whether no page was saved ahead.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
