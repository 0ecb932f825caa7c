//! The one way pages get into guest RAM. Faults, fetch completions, the
//! working-set prefetch, the background fill and recovery all install
//! through here, with one policy per kernel answer:
//!
//! - **installed**: the page is resident;
//! - **already there** (`EEXIST`): another installer was first, or the page
//!   was never missing: it is resident all the same, and whoever may wait on
//!   it is woken. Never an error;
//! - **retry** (`EAGAIN`: a remove or unmap event is queued and not read
//!   yet, so the kernel refuses to change the mappings): an installer thread
//!   lets go of the discard lock, gives the fault thread a moment to read
//!   the event, checks the page again and retries, for as long as the
//!   engine is not asked to stop. The fault thread itself never waits for
//!   the event it has still to read: it keeps the fault (its thread stays
//!   blocked) and answers it again after its next read, which returns the
//!   event. (Waking the thread instead would let it fault again at once,
//!   and enough such faults would fill every read ahead of the event.);
//! - **range gone** (`ENOENT` once guest RAM is being unregistered): the
//!   install lost a harmless race with the end of the restore (unregistering
//!   wakes every waiter); the installer stops quietly;
//! - anything else is fatal for the restore.
//!
//! Residency is what the kernel answered: a page is marked resident only
//! after `installed` or `already there`. Checking residency and installing
//! is not atomic; the kernel's `EEXIST` is what prevents a double install.
//! Installs and the handling of a guest discard exclude each other through
//! the engine's discard lock (installs share it, a discard takes it
//! alone), so a page the guest discarded is never refilled from the image.
//!
//! While a restore learns, the pages no thread waits on (a fault's
//! neighbours, the fill) go into the RAM files' page cache instead of
//! being mapped, so that the guest's first touch of each is still seen
//! (the kernel maps the page and thaw reads QEMU's page tables,
//! [`super::scanner`]; or, on older kernels, a minor fault thaw answers).
//! A page-cache write is not refused by the kernel the way a second
//! `UFFDIO_COPY` is: every install then holds the lock of its 16-page
//! stripe from its residency check to marking the page resident, so a
//! page is written at most once. A page enters the page cache only
//! through thaw (a hole faults as missing), and the guest can map it only
//! once it is there, whole (the kernel holds the page locked while a
//! write fills it): so no page is written after the guest could map it.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::errno::Errno;

use super::{Engine, EngineError};
use crate::mem::{usize_from, PageIndex, PAGE_SIZE};
use crate::remote::uffd::CopyResult;

/// How long an installer thread backs off when the kernel asks it to retry.
pub(super) const RETRY_BACKOFF: Duration = Duration::from_micros(200);
/// Pages per install stripe (one lock each while installs are cached).
pub(super) const STRIPE_PAGES: u64 = 16;
/// Stripe locks (stripes share them round robin).
pub(super) const STRIPE_LOCKS: usize = 1024;

/// How an install ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    /// Every page of the request is resident now (`fresh` of them were
    /// installed by this call; the others were already there or discarded).
    All { fresh: u64 },
    /// The engine was asked to stop, or guest RAM is being unregistered.
    Stopped,
}

/// How a single-page answer from the fault thread ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The page was installed (the faulting thread is awake).
    Installed,
    /// The page was already there; the faulting thread was woken.
    AlreadyThere,
    /// The kernel asked for a retry once a queued event is read; the
    /// faulting thread is still blocked: answer it again.
    Retry,
    /// The page left the page cache after its minor fault; the faulting
    /// thread was woken and faults again (as a missing fault).
    Refault,
    /// Guest RAM is being unregistered.
    Gone,
}

impl Engine {
    /// Whether `errno` only says that guest RAM is being unregistered.
    fn range_gone(&self, errno: Errno) -> bool {
        errno == Errno::ENOENT && self.released.load(Ordering::Acquire)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Installs saved data for the host-contiguous pages `first..` (all in
    /// one RAM block; `data` a whole number of pages) with `UFFDIO_COPY`,
    /// skipping pages that are resident (or discarded) already. `wake`
    /// wakes threads faulting in the range.
    pub(crate) fn install_saved(
        &self,
        first: PageIndex,
        data: &[u8],
        wake: bool,
    ) -> Result<Installed, EngineError> {
        self.by_stripe(first, data, |f, d| self.copy_pages(f, d, wake))
    }

    /// Installs pages no thread waits on (a fault's neighbours, the fill):
    /// mapped, or, while this restore learns, into the page cache so that
    /// the guest's first touch of each is still seen.
    pub(crate) fn install_unwaited(
        &self,
        first: PageIndex,
        data: &[u8],
    ) -> Result<Installed, EngineError> {
        if self.cached_installs {
            self.install_cached(first, data)
        } else {
            self.install_saved(first, data, true)
        }
    }

    /// Runs `install` over `first..` stripe by stripe, each under its
    /// stripe lock, while installs may go to the page cache; in one call
    /// otherwise.
    fn by_stripe(
        &self,
        first: PageIndex,
        data: &[u8],
        mut install: impl FnMut(PageIndex, &[u8]) -> Result<Installed, EngineError>,
    ) -> Result<Installed, EngineError> {
        if !self.cached_installs {
            return install(first, data);
        }
        let pages = data.len() as u64 / PAGE_SIZE;
        let mut fresh = 0;
        let mut i = 0u64;
        while i < pages {
            let page = first.0 + i;
            let j = ((page / STRIPE_PAGES + 1) * STRIPE_PAGES - first.0).min(pages);
            let stripe = usize_from(page / STRIPE_PAGES) % self.stripes.len().max(1);
            let _held = self
                .stripes
                .get(stripe)
                .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
            let bytes = &data[usize_from(i * PAGE_SIZE)..usize_from(j * PAGE_SIZE)];
            match install(PageIndex(page), bytes)? {
                Installed::All { fresh: f } => fresh += f,
                Installed::Stopped => return Ok(Installed::Stopped),
            }
            i = j;
        }
        Ok(Installed::All { fresh })
    }

    /// [`Engine::install_saved`] within one stripe (or without stripes).
    fn copy_pages(
        &self,
        first: PageIndex,
        data: &[u8],
        wake: bool,
    ) -> Result<Installed, EngineError> {
        let pages = data.len() as u64 / PAGE_SIZE;
        let mut fresh = 0u64;
        let mut i = 0u64;
        while i < pages {
            if self.stopping() {
                return Ok(Installed::Stopped);
            }
            let guard = self.discard_lock.read().unwrap_or_else(|p| p.into_inner());
            // The next run of pages still missing.
            while i < pages && self.pages.is_resident(PageIndex(first.0 + i)) {
                i += 1;
            }
            let mut j = i;
            while j < pages && !self.pages.is_resident(PageIndex(first.0 + j)) {
                j += 1;
            }
            if i == j {
                break;
            }
            let dst = self.host_addr(PageIndex(first.0 + i));
            let bytes = &data[usize_from(i * PAGE_SIZE)..usize_from(j * PAGE_SIZE)];
            let result = self.uffd.copy(dst, bytes, wake);
            let copied = result.copied() as u64 / PAGE_SIZE;
            for k in i..i + copied {
                self.pages.mark_resident(PageIndex(first.0 + k), true);
            }
            fresh += copied;
            i += copied;
            match result {
                CopyResult::Done(_) => {}
                CopyResult::Exists { .. } => {
                    let page = PageIndex(first.0 + i);
                    self.pages.mark_resident(page, true);
                    if wake {
                        self.uffd.wake(self.host_addr(page), PAGE_SIZE)?;
                    }
                    i += 1;
                }
                CopyResult::Failed {
                    errno: Errno::EAGAIN,
                    ..
                } => {
                    drop(guard);
                    std::thread::sleep(RETRY_BACKOFF);
                }
                CopyResult::Failed { errno, .. } if self.range_gone(errno) => {
                    return Ok(Installed::Stopped)
                }
                CopyResult::Failed { errno, .. } => {
                    return Err(EngineError::Install {
                        what: "saved pages (UFFDIO_COPY)",
                        addr: dst.0 + copied * PAGE_SIZE,
                        errno,
                    })
                }
            }
        }
        Ok(Installed::All { fresh })
    }

    /// Writes saved data for `first..` into the RAM file's page cache
    /// instead of mapping it, so that the guest's first touch of each page
    /// is still seen (QEMU's page tables, or a minor fault). Pages resident already are
    /// skipped. Only while the guest is paused, or with stripe locks (the
    /// engine built [`Engine::with_cached_installs`]): a page-cache write
    /// is not refused for a page that is there the way `UFFDIO_COPY` is.
    pub(crate) fn install_cached(
        &self,
        first: PageIndex,
        data: &[u8],
    ) -> Result<Installed, EngineError> {
        self.by_stripe(first, data, |f, d| self.write_cached(f, d))
    }

    /// [`Engine::install_cached`] within one stripe (or without stripes).
    fn write_cached(&self, first: PageIndex, data: &[u8]) -> Result<Installed, EngineError> {
        let pages = data.len() as u64 / PAGE_SIZE;
        let _guard = self.discard_lock.read().unwrap_or_else(|p| p.into_inner());
        let block = self.block_of(first);
        let mut fresh = 0;
        let mut i = 0u64;
        while i < pages {
            let page = PageIndex(first.0 + i);
            let mut j = i;
            while j < pages && !self.pages.is_resident(PageIndex(first.0 + j)) {
                j += 1;
            }
            if i == j {
                i += 1;
                continue;
            }
            let off = (page.0 - block.first_page) * PAGE_SIZE;
            block
                .file
                .write_all_at(
                    &data[usize_from(i * PAGE_SIZE)..usize_from(j * PAGE_SIZE)],
                    off,
                )
                .map_err(|source| EngineError::CacheWrite {
                    block: block.id.clone(),
                    offset: off,
                    source,
                })?;
            for k in i..j {
                self.pages.mark_resident(PageIndex(first.0 + k), true);
            }
            fresh += j - i;
            i = j;
        }
        Ok(Installed::All { fresh })
    }

    /// The fault thread's answer to a missing fault on a page that needs no
    /// saved data (a zero page of the image, a page the guest discarded, a
    /// page installed after the fault was queued, or a hole of a running
    /// VM): `UFFDIO_ZEROPAGE`, waking the faulting thread. Whatever is
    /// there already stays. `saved` tells whether the image holds data for
    /// the page (for the count of missing pages).
    pub(crate) fn answer_with_zeros(
        &self,
        page: PageIndex,
        saved: bool,
    ) -> Result<Answer, EngineError> {
        let dst = self.host_addr(page);
        let _guard = self.discard_lock.read().unwrap_or_else(|p| p.into_inner());
        let result = self.uffd.zeropage(dst, PAGE_SIZE, true);
        let answer = self.settle_answer(result, page, &[], "a zero page (UFFDIO_ZEROPAGE)")?;
        if matches!(answer, Answer::Installed | Answer::AlreadyThere) {
            self.pages.mark_resident(page, saved);
        }
        Ok(answer)
    }

    /// The fault thread's answer to a minor fault (the page is in the page
    /// cache, not mapped): `UFFDIO_CONTINUE`, which maps it and wakes the
    /// faulting thread. `EFAULT` means the page left the page cache (the
    /// guest discarded it) after the fault was raised: the access faults
    /// again, as a missing fault.
    pub(crate) fn answer_minor(&self, page: PageIndex) -> Result<Answer, EngineError> {
        let result = self
            .uffd
            .continue_range(self.host_addr(page), PAGE_SIZE, true);
        self.settle_answer(
            result,
            page,
            &[Errno::EFAULT],
            "a page-cache page (UFFDIO_CONTINUE)",
        )
    }

    /// The policy for a single-page answer of the fault thread: the kernel
    /// woke the faulting thread (installed), or thaw wakes it (already
    /// there; one of `refault` errnos, after which its access faults
    /// again); `EAGAIN` leaves it blocked for a retry; a range being
    /// unregistered is gone; anything else is fatal.
    fn settle_answer(
        &self,
        result: CopyResult,
        page: PageIndex,
        refault: &[Errno],
        what: &'static str,
    ) -> Result<Answer, EngineError> {
        let dst = self.host_addr(page);
        match result {
            CopyResult::Done(_) => Ok(Answer::Installed),
            CopyResult::Exists { .. } => {
                self.uffd.wake(dst, PAGE_SIZE)?;
                Ok(Answer::AlreadyThere)
            }
            CopyResult::Failed {
                errno: Errno::EAGAIN,
                ..
            } => Ok(Answer::Retry),
            CopyResult::Failed { errno, .. } if refault.contains(&errno) => {
                self.uffd.wake(dst, PAGE_SIZE)?;
                Ok(Answer::Refault)
            }
            CopyResult::Failed { errno, .. } if self.range_gone(errno) => Ok(Answer::Gone),
            CopyResult::Failed { errno, .. } => Err(EngineError::Install {
                what,
                addr: dst.0,
                errno,
            }),
        }
    }
}
