//! Where every guest page stands during a restore, as lock-free bitmaps
//! (one bit per page): resident (the kernel holds it, or it needs nothing
//! from the image any more), discarded by the guest, prefetched, touched;
//! and how many saved pages are still missing.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::mem::PageIndex;

/// One bit per guest page.
pub(crate) struct Bitmap(Box<[AtomicU64]>);

impl Bitmap {
    /// All clear, for `pages` pages.
    pub(crate) fn new(pages: u64) -> Bitmap {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        Bitmap((0..words).map(|_| AtomicU64::new(0)).collect())
    }

    fn slot(page: PageIndex) -> (usize, u64) {
        // Pages come from the image's layout, whose size `new` was given.
        ((page.0 / 64) as usize, 1 << (page.0 % 64))
    }

    /// Whether `page`'s bit is set (false outside the map).
    pub(crate) fn test(&self, page: PageIndex) -> bool {
        let (w, bit) = Self::slot(page);
        self.0
            .get(w)
            .is_some_and(|x| x.load(Ordering::Acquire) & bit != 0)
    }

    /// Sets `page`'s bit; true if it was clear.
    pub(crate) fn set(&self, page: PageIndex) -> bool {
        let (w, bit) = Self::slot(page);
        self.0
            .get(w)
            .is_some_and(|x| x.fetch_or(bit, Ordering::AcqRel) & bit == 0)
    }

    /// Pages set here and clear in `other`.
    pub(crate) fn count_without(&self, other: &Bitmap) -> u64 {
        self.0
            .iter()
            .zip(other.0.iter())
            .map(|(a, b)| {
                u64::from((a.load(Ordering::Acquire) & !b.load(Ordering::Acquire)).count_ones())
            })
            .sum()
    }

    /// Pages set.
    pub(crate) fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|a| u64::from(a.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// The state of every page of one restore.
pub(crate) struct Residency {
    /// The kernel answered that the page is in guest RAM (installed, or
    /// already there), or the page needs nothing from the image any more
    /// (the guest discarded it).
    pub(crate) resident: Bitmap,
    /// The guest discarded the page (its content is now zeros).
    pub(crate) discarded: Bitmap,
    /// Installed by the working-set prefetch.
    pub(crate) prefetched: Bitmap,
    /// The guest touched the page (first touch recorded).
    pub(crate) touched: Bitmap,
    /// Saved (non-zero) pages not resident yet.
    remaining: AtomicU64,
}

impl Residency {
    /// Nothing resident; `missing` saved pages to bring in.
    pub(crate) fn new(pages: u64, missing: u64) -> Residency {
        Residency {
            resident: Bitmap::new(pages),
            discarded: Bitmap::new(pages),
            prefetched: Bitmap::new(pages),
            touched: Bitmap::new(pages),
            remaining: AtomicU64::new(missing),
        }
    }

    /// Saved pages still missing.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    pub(crate) fn is_resident(&self, page: PageIndex) -> bool {
        self.resident.test(page)
    }

    /// Records `page` as resident; counts it off the missing pages once if
    /// it holds saved data. True if it was not resident before.
    pub(crate) fn mark_resident(&self, page: PageIndex, saved: bool) -> bool {
        let first = self.resident.set(page);
        if first && saved {
            // Never below zero: each saved page is counted off once.
            let _ = self
                .remaining
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_page_is_counted_off_once() {
        let r = Residency::new(130, 2);
        assert!(r.mark_resident(PageIndex(129), true));
        assert!(!r.mark_resident(PageIndex(129), true));
        assert_eq!(r.remaining(), 1);
        assert!(r.mark_resident(PageIndex(3), false));
        assert_eq!(r.remaining(), 1);
        assert!(r.is_resident(PageIndex(129)) && !r.is_resident(PageIndex(128)));
        assert!(!r.resident.test(PageIndex(1 << 20)), "outside the map");
    }

    #[test]
    fn counts_pages_set_in_one_map_and_not_the_other() {
        let (a, b) = (Bitmap::new(200), Bitmap::new(200));
        for p in [1, 64, 199] {
            a.set(PageIndex(p));
        }
        b.set(PageIndex(64));
        assert_eq!(a.count_without(&b), 2);
        assert_eq!(a.count(), 3);
    }
}
