//! An image's `pages.bin` left in the object store: the reads of a restore
//! straight from the store, served by ranged GETs.
//!
//! A restore from `s3://…` keeps a local copy of everything but the pages
//! ([`super::lazy`]) and, in place of `pages.bin`, the file
//! [`REMOTE_PAGES`] naming the object. [`crate::image::Image::open`] then
//! reads pages through [`RemotePages`]: each read is one or more ranged
//! GETs on thaw's own runtime, with short timeouts and a few retries so
//! that a fault is never held for minutes. A fault's read goes at once;
//! the fill's large reads are cut into ranges kept in flight at the pace
//! of [`super::pace`], which keeps the link's queue short for the next
//! fault. Reads block only the thread that asked (a fault worker, the
//! fill), never another's; the image verifies every page it gets against
//! its digests as for a local file.

use std::ops::Range;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::client::{Store, Timeouts};
use super::pace::{Pace, MAX_RANGE, MAX_WINDOW};
use super::settings::StoreSettings;
use super::{StoreError, StoreUrl};
use crate::image::source::{Fetched, PageSource};

/// The file that stands for a `pages.bin` left in the store.
pub const REMOTE_PAGES: &str = "pages.remote";
/// An urgent read is split at multiples of this into ranges fetched at
/// once (a background read at multiples of the pace's range size, a power
/// of two no larger). It divides the part size of an upload (which stores
/// such as SeaweedFS keep as one chunk), so no range spans two chunks.
const SPLIT_BYTES: u64 = MAX_RANGE;
/// Ranges of one urgent read in flight at once.
const PARALLEL_RANGES: usize = 4;
/// Ranges of one background read in flight at most (the pace's window
/// decides how many are).
const PARALLEL_BACKGROUND_RANGES: usize = 64;
/// How much the fill should read at once from the store (see
/// [`crate::image::Image::bulk_read_bytes`]): the pace's largest window.
const BULK_READ_BYTES: u64 = MAX_WINDOW;
const _: () = assert!(super::transfer::PART_BYTES % SPLIT_BYTES == 0);

/// [`REMOTE_PAGES`]: where the pages are.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemotePagesRef {
    /// The image's URL (`s3://BUCKET/PREFIX`).
    pub url: String,
    /// The length and xxh3-64 of `pages.bin`, from the manifest.
    pub len: u64,
    pub xxh3: String,
}

impl RemotePagesRef {
    /// Reads `dir`'s [`REMOTE_PAGES`], if it has one.
    pub fn read(dir: &Path) -> Result<Option<RemotePagesRef>, StoreError> {
        let path = dir.join(REMOTE_PAGES);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    context: "cannot read".into(),
                    source,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StoreError::Refused {
                path,
                why: format!("not a remote pages reference: {e}"),
            })
    }
}

/// `pages.bin` in the store; see the module documentation.
pub struct RemotePages {
    /// Faults' reads (`urgent`): always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    store: Store,
    /// The fill's reads, on their own client and threads: those threads
    /// run under `SCHED_IDLE`, so receiving the fill's data, like the
    /// filler itself, takes only CPU time the guest leaves. Always `Some`
    /// until dropped.
    background_runtime: Option<tokio::runtime::Runtime>,
    background_store: Store,
    object: object_store::path::Path,
    url: String,
    len: u64,
    /// When and how much of the fill's reads go, faults' reads first.
    pace: Arc<Pace>,
}

impl RemotePages {
    /// Connects to the store of `reference` (settings as S3 tools take
    /// them) and checks that the object is there with the expected length.
    pub fn open(reference: &RemotePagesRef) -> Result<RemotePages, StoreError> {
        let url = StoreUrl::parse(&reference.url)?;
        let settings = StoreSettings::from_environment()?;
        let store = Store::connect_with(&settings, &url.bucket, Timeouts::FAULT)?;
        // Its own connections: a client's connections are served by the
        // runtime that opened them.
        let background_store = Store::connect_with(&settings, &url.bucket, Timeouts::FAULT)?;
        let runtime = store_runtime("thaw-store", false)?;
        let background_runtime = store_runtime("thaw-store-fill", true)?;
        let object = url.object("pages.bin");
        let found = {
            let (store, object) = (store.clone(), object.clone());
            run_on(&runtime, async move { store.head(&object).await })??
        };
        match found {
            Some(m) if m.size == reference.len => {}
            Some(m) => {
                return Err(StoreError::Damaged {
                    url: reference.url.clone(),
                    why: format!(
                        "pages.bin: {} bytes, the manifest says {}",
                        m.size, reference.len
                    ),
                })
            }
            None => {
                return Err(StoreError::Damaged {
                    url: reference.url.clone(),
                    why: "pages.bin: missing from the store".into(),
                })
            }
        }
        Ok(RemotePages {
            runtime: Some(runtime),
            store,
            background_runtime: Some(background_runtime),
            background_store,
            object,
            url: reference.url.clone(),
            len: reference.len,
            pace: Arc::new(Pace::new()),
        })
    }

    /// Where the pages are, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl PageSource for RemotePages {
    fn len(&self) -> u64 {
        self.len
    }

    fn bulk_read_bytes(&self) -> Option<u64> {
        Some(BULK_READ_BYTES)
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn fetched(&self) -> Option<Fetched> {
        Some(self.store.fetched() + self.background_store.fetched())
    }

    /// One ranged GET, or for a large read several at once. Blocks the
    /// calling thread only. A read that is not `urgent` (the fill's)
    /// starts no new range while an urgent one (a fault's) is in flight,
    /// and keeps as much in flight as its [`Pace`] allows.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, urgent: bool) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("bytes {offset}..{end} of a {}-byte object", self.len),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let runtime = if urgent {
            &self.runtime
        } else {
            &self.background_runtime
        };
        let runtime = runtime
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the object store runtime stopped"))?;
        let started = Instant::now();
        let parts = if urgent {
            let _urgent = self.pace.urgent_read();
            let ranges = split(offset..end, SPLIT_BYTES);
            let (store, object, pace) =
                (self.store.clone(), self.object.clone(), self.pace.clone());
            run_on(runtime, async move {
                use futures::{StreamExt, TryStreamExt};
                futures::stream::iter(ranges)
                    .map(|r| {
                        let (store, object, pace) = (&store, &object, &pace);
                        async move {
                            let (data, first_byte) = store.get_range_timed(object, r).await?;
                            pace.observe_urgent(first_byte);
                            Ok::<_, StoreError>(data)
                        }
                    })
                    .buffered(PARALLEL_RANGES)
                    .try_collect::<Vec<_>>()
                    .await
            })
        } else {
            let ranges = split(offset..end, self.pace.range_bytes());
            let (store, object) = (self.background_store.clone(), self.object.clone());
            let pace = self.pace.clone();
            run_on(runtime, async move {
                use futures::{StreamExt, TryStreamExt};
                // Ranges start in order, each once the fill is calm (no
                // fault in flight or just served) and it fits the window.
                futures::stream::iter(ranges)
                    .then(|r| {
                        let pace = pace.clone();
                        async move {
                            let slot = pace.admit(r.end - r.start).await;
                            (r, slot)
                        }
                    })
                    .map(|(r, slot)| {
                        let (store, object) = (&store, &object);
                        async move {
                            let (data, first_byte) = store.get_range_timed(object, r).await?;
                            slot.ended(first_byte);
                            Ok::<_, StoreError>(data)
                        }
                    })
                    .buffered(PARALLEL_BACKGROUND_RANGES)
                    .try_collect::<Vec<_>>()
                    .await
            })
        }
        .map_err(unavailable)?
        .map_err(unavailable)?;
        let mut at = 0;
        for part in parts {
            let n = part.len();
            let dst = buf.get_mut(at..at + n).ok_or_else(|| {
                std::io::Error::other("the store sent more bytes than were asked for")
            })?;
            dst.copy_from_slice(&part);
            at += n;
        }
        if at != buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the store sent {at} of {} bytes", buf.len()),
            ));
        }
        log::debug!(
            "{} read of {} KiB at {offset:#x} took {} µs (fill window {} KiB)",
            if urgent { "urgent" } else { "background" },
            buf.len() >> 10,
            started.elapsed().as_micros(),
            self.pace.window() >> 10
        );
        Ok(())
    }
}

/// A read the store did not answer (after its retries): the kind
/// [`is_unavailable`] recognises.
fn unavailable(e: StoreError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, e.to_string())
}

/// Whether `e` is a read of remote pages that the store did not answer
/// (rather than damage): a restore keeps the VM for a recovery then.
pub fn is_unavailable(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotConnected
}

impl Drop for RemotePages {
    fn drop(&mut self) {
        // Without waiting: the image may be dropped on another runtime's
        // thread, where blocking is not allowed.
        for runtime in [self.runtime.take(), self.background_runtime.take()]
            .into_iter()
            .flatten()
        {
            runtime.shutdown_background();
        }
    }
}

/// The runtime that sends one kind of read: 2 threads named `name`,
/// under `SCHED_IDLE` when `idle`.
fn store_runtime(name: &str, idle: bool) -> Result<tokio::runtime::Runtime, StoreError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).thread_name(name).enable_all();
    if idle {
        builder.on_thread_start(|| {
            crate::sched::set_policy(0, libc::SCHED_IDLE);
        });
    }
    builder.build().map_err(|source| StoreError::Io {
        path: REMOTE_PAGES.into(),
        context: format!("starting the object store runtime {name}"),
        source,
    })
}

/// Runs `task` on `runtime` and waits for it on this thread, which may be
/// a thread of another runtime or of none (a fault worker, the fill).
fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    task: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(task.await);
    });
    rx.recv().map_err(|_| StoreError::Io {
        path: REMOTE_PAGES.into(),
        context: "the object store runtime".into(),
        source: std::io::Error::other("it stopped"),
    })
}

/// `range` cut at the multiples of `unit` inside it.
fn split(range: Range<u64>, unit: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let next = ((at / unit + 1) * unit).min(range.end);
        out.push(at..next);
        at = next;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_reads_split_at_part_boundaries() {
        const P: u64 = super::SPLIT_BYTES;
        assert_eq!(super::split(0..10, P), vec![0..10]);
        assert_eq!(
            super::split(P - 4096..P + 4096, P),
            vec![P - 4096..P, P..P + 4096]
        );
        let parts = super::split(4096..3 * P, P);
        assert_eq!(parts, vec![4096..P, P..2 * P, 2 * P..3 * P]);
        let parts = super::split(P - 4096..P + 4096, P / 2);
        assert_eq!(parts, vec![P - 4096..P, P..P + 4096]);
    }
}
