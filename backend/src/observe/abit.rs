//! Access-bit style scanning (VEE 2011's `abit` estimator): after QEMU's
//! page-table entries for guest RAM were zapped, the pages mapped again in
//! `/proc/<qemu>/pagemap` ([`super::pagemap`]) are the pages the guest accessed since. Each page
//! keeps the number of the last interval it was seen in (its age); the
//! estimate is the pages seen in the last K intervals, most recent first.

use crate::mem::{usize_from, PageIndex};

/// Per-page ages and the estimate they give.
#[derive(Debug)]
pub(crate) struct Ages {
    /// Interval number in which each page was last seen (0: never).
    last_seen: Vec<u32>,
    interval: u32,
}

impl Ages {
    pub(crate) fn new(pages: u64) -> Ages {
        Ages {
            last_seen: vec![0; usize_from(pages)],
            interval: 0,
        }
    }

    /// Starts the next interval; pages seen now get its number.
    pub(crate) fn next_interval(&mut self) {
        self.interval += 1;
    }

    pub(crate) fn seen(&mut self, page: PageIndex) {
        if let Some(s) = self.last_seen.get_mut(usize_from(page.0)) {
            *s = self.interval;
        }
    }

    /// Pages seen in the last `keep` intervals, most recently seen first,
    /// in address order within an interval.
    pub(crate) fn estimate(&self, keep: u32) -> Vec<PageIndex> {
        let oldest = self.interval.saturating_sub(keep.saturating_sub(1)).max(1);
        let mut pages: Vec<(u32, u64)> = self
            .last_seen
            .iter()
            .enumerate()
            .filter(|(_, &s)| s >= oldest)
            .map(|(p, &s)| (s, p as u64))
            .collect();
        pages.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        pages.into_iter().map(|(_, p)| PageIndex(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_keeps_the_last_k_intervals_most_recent_first() {
        let mut a = Ages::new(10);
        a.next_interval();
        a.seen(PageIndex(5));
        a.seen(PageIndex(1));
        a.next_interval();
        a.seen(PageIndex(8));
        a.seen(PageIndex(3));
        a.next_interval();
        a.seen(PageIndex(1));
        let e = |a: &Ages, k| a.estimate(k).iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(e(&a, 1), [1]);
        assert_eq!(e(&a, 2), [1, 3, 8]);
        assert_eq!(e(&a, 3), [1, 3, 8, 5]);
        assert_eq!(e(&a, 30), [1, 3, 8, 5]);
    }
}
