//! Access-bit style scanning (VEE 2011's `abit` estimator): after QEMU's
//! page-table entries for guest RAM were zapped, the pages mapped again in
//! `/proc/<qemu>/pagemap` are the pages the guest accessed since. Each page
//! keeps the number of the last interval it was seen in (its age); the
//! estimate is the pages seen in the last K intervals, most recent first.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::mem::{usize_from, PageIndex, PAGE_SIZE};
use crate::vmm::RamMapping;

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

/// Marks every page of `ram` (each mapping with its first global page)
/// that QEMU's `pagemap` shows as mapped.
pub(crate) fn scan(
    pagemap: &File,
    ram: &[(RamMapping, u64)],
    ages: &mut Ages,
) -> std::io::Result<()> {
    const BATCH: u64 = 1 << 16;
    let mut buf = vec![0u8; usize_from(BATCH * 8)];
    for (m, first_page) in ram {
        let pages = m.len / PAGE_SIZE;
        let mut done = 0;
        while done < pages {
            let n = BATCH.min(pages - done);
            let off = (m.start.0 / PAGE_SIZE + done) * 8;
            pagemap.read_exact_at(&mut buf[..usize_from(n * 8)], off)?;
            for (i, e) in buf[..usize_from(n * 8)].chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if v >> 63 != 0 {
                    ages.seen(PageIndex(first_page + done + i as u64));
                }
            }
            done += n;
        }
    }
    Ok(())
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
