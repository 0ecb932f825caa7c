//! The working-set prefetch: the image's working set, read in one
//! sequential pass and installed before the guest runs, either mapped
//! (`UFFDIO_COPY`) or written into the RAM files' page cache so that the
//! guest's first touch of each page is still seen (in QEMU's page tables,
//! or as a minor fault).

use std::sync::atomic::Ordering;

use super::installer::Installed;
use super::{Engine, EngineError};
use crate::mem::{PageIndex, PAGE_BYTES};
use crate::wss::{WsError, WsFile};

impl Engine {
    /// Installs the working set in `ws`, in its order, before the guest
    /// runs. With `observe`, the pages go into the RAM files' page cache and
    /// nothing is mapped into QEMU, so the guest's first touch of each is
    /// still seen (skipped faults, learning); without, they are mapped
    /// and cost the guest nothing more. Only while the guest is paused.
    /// Returns the pages it installed.
    pub(crate) fn prefetch(&self, ws: &WsFile, observe: bool) -> Result<u64, EngineError> {
        let mut installed = 0u64;
        let mut failure = None;
        // A set after another reads only the chunks with pages still missing.
        let needed = |p: PageIndex| !self.pages.is_resident(p);
        let streamed = ws.stream_needed(self.image.throttle(), needed, |pages, data| {
            self.counters
                .bytes_read
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            match self.prefetch_batch(pages, data, observe) {
                Ok(n) => {
                    installed += n;
                    Ok(())
                }
                Err(e) => {
                    failure = Some(e);
                    Err(WsError::Io {
                        path: ws.set.estimator.path_in(self.image.dir()),
                        context: "installing the working set",
                        source: std::io::Error::other("stopped"),
                    })
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        streamed?;
        self.counters
            .prefetched_pages
            .fetch_add(installed, Ordering::Relaxed);
        Ok(installed)
    }

    /// One verified batch of the working set: runs of adjacent pages in one
    /// block, installed through the installer.
    fn prefetch_batch(
        &self,
        pages: &[PageIndex],
        data: &[u8],
        observe: bool,
    ) -> Result<u64, EngineError> {
        let mut installed = 0;
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].0 == first.0 + (j - i) as u64
                && self.same_block(first, pages[j])
            {
                j += 1;
            }
            let bytes = &data[i * PAGE_BYTES..j * PAGE_BYTES];
            let was: Vec<bool> = pages[i..j]
                .iter()
                .map(|&p| self.pages.is_resident(p))
                .collect();
            let outcome = if observe {
                self.install_cached(first, bytes)?
            } else {
                self.install_saved(first, bytes, true)?
            };
            for (&p, resident_before) in pages[i..j].iter().zip(was) {
                if !resident_before && !self.pages.discarded.test(p) && self.pages.is_resident(p) {
                    self.pages.prefetched.set(p);
                }
            }
            match outcome {
                Installed::All { fresh } => installed += fresh,
                Installed::Stopped => return Ok(installed),
            }
            i = j;
        }
        Ok(installed)
    }
}
