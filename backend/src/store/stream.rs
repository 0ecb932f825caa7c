//! A save into an object store uploads the image's pages while the save
//! writes them: a thread follows `pages.bin` of the image being written
//! (in `<image>.partial-<pid>`, see [`crate::image::ImageWriter`]), sends
//! each part of [`PART_BYTES`] as a part of one multipart upload as soon as
//! the file holds it (several in flight), hashing it on the way, and
//! completes the upload with the rest once the save is done. The push that
//! follows ([`super::transfer::push_uploaded`]) then uploads only the small
//! files and the manifest, so the image still becomes visible only once
//! complete. A save that fails aborts the upload: nothing is left.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};
use xxhash_rust::xxh3::Xxh3;

use super::client::Store;
use super::settings::StoreSettings;
use super::transfer::{ManifestFile, IN_FLIGHT, MANIFEST, PART_BYTES, SINGLE_PUT_MAX};
use super::{StoreError, StoreUrl};

/// How often the follower looks for more of the file.
const POLL: Duration = Duration::from_millis(20);

const RUNNING: u8 = 0;
const FINISH: u8 = 1;
const ABORT: u8 = 2;

/// The upload of a `pages.bin` being written; see the module documentation.
pub struct StreamedUpload {
    signal: Arc<Signal>,
    thread: std::thread::JoinHandle<Result<ManifestFile, StoreError>>,
}

struct Signal {
    state: AtomicU8,
    changed: tokio::sync::Notify,
}

impl Signal {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.changed.notify_one();
    }
}

impl StreamedUpload {
    /// Starts following the pages of the image an [`crate::image::ImageWriter`]
    /// of this process builds at `target`, uploading them to `url`.
    /// Its client is its own, made on its own thread (a client's
    /// connections belong to the runtime that opened them).
    pub fn start(
        settings: StoreSettings,
        url: StoreUrl,
        target: &Path,
    ) -> Result<StreamedUpload, StoreError> {
        let name = target.file_name().ok_or_else(|| StoreError::Refused {
            path: target.to_path_buf(),
            why: "not a directory name".into(),
        })?;
        let paths = [
            crate::image::partial_dir(target, name).join("pages.bin"),
            target.join("pages.bin"),
        ];
        let signal = Arc::new(Signal {
            state: AtomicU8::new(RUNNING),
            changed: tokio::sync::Notify::new(),
        });
        let theirs = signal.clone();
        let target = target.to_path_buf();
        let io = move |source| StoreError::Io {
            path: target.clone(),
            context: "starting the upload of its pages".into(),
            source,
        };
        let io_thread = io.clone();
        let thread = std::thread::Builder::new()
            .name("thaw-upload".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io_thread)?;
                runtime.block_on(async {
                    let store = Store::connect(&settings, &url.bucket)?;
                    follow(&store, &url, &paths, &theirs).await
                })
            })
            .map_err(io)?;
        Ok(StreamedUpload { signal, thread })
    }

    /// The save is done and the image in place: uploads the rest of its
    /// pages and completes the upload.
    pub fn finish(self) -> Result<ManifestFile, StoreError> {
        self.signal.set(FINISH);
        self.thread.join().unwrap_or_else(|_| {
            Err(StoreError::Io {
                path: PathBuf::from("pages.bin"),
                context: "uploading while saving".into(),
                source: std::io::Error::other("the upload thread panicked"),
            })
        })
    }

    /// The save failed: the upload is aborted, nothing of it is left.
    pub fn abort(self) {
        self.signal.set(ABORT);
        if let Ok(Err(e)) = self.thread.join() {
            log::debug!("the upload of the pages stopped: {e}");
        }
    }
}

/// An image completed at `url` since the save began.
async fn refuse_if_taken(store: &Store, url: &StoreUrl) -> Result<(), StoreError> {
    match store.head(&url.object(MANIFEST)).await? {
        Some(_) => Err(StoreError::Exists {
            url: url.to_string(),
        }),
        None => Ok(()),
    }
}

/// The follower: `paths` are where `pages.bin` is while it is written and
/// once the image is in place.
async fn follow(
    store: &Store,
    url: &StoreUrl,
    paths: &[PathBuf; 2],
    signal: &Signal,
) -> Result<ManifestFile, StoreError> {
    let object = url.object("pages.bin");
    let failed = |what: &str| {
        let what = format!("{what} s3://{}/{object}", url.bucket);
        move |source| StoreError::Store { what, source }
    };
    let mut file: Option<(std::fs::File, &Path)> = None;
    let mut upload: Option<WriteMultipart> = None;
    let mut hasher = Xxh3::new();
    let mut sent = 0u64;
    let result = async {
        loop {
            let state = signal.state.load(Ordering::Acquire);
            if state == ABORT {
                return Err(StoreError::Io {
                    path: paths[0].clone(),
                    context: "uploading while saving".into(),
                    source: std::io::Error::other("the save failed"),
                });
            }
            let finishing = state == FINISH;
            if file.is_none() {
                // Before the writer renames it (or after, if it was fast).
                let candidates: &[PathBuf] = if finishing { &paths[1..] } else { &paths[..1] };
                for path in candidates {
                    match std::fs::File::open(path) {
                        Ok(f) => file = Some((f, path)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !finishing => {}
                        Err(source) => {
                            return Err(StoreError::Io {
                                path: path.clone(),
                                context: "cannot open".into(),
                                source,
                            })
                        }
                    }
                }
            }
            if let Some((f, path)) = &file {
                let io = |context: &str| {
                    let (path, context) = (path.to_path_buf(), context.to_string());
                    move |source| StoreError::Io {
                        path,
                        context,
                        source,
                    }
                };
                let size = f.metadata().map_err(io("cannot stat"))?.len();
                if finishing && upload.is_none() && size <= SINGLE_PUT_MAX {
                    refuse_if_taken(store, url).await?;
                    let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
                    f.read_exact_at(&mut data, 0).map_err(io("cannot read"))?;
                    hasher.update(&data);
                    store.put(&object, Bytes::from(data)).await?;
                    return Ok(size);
                }
                while size - sent >= PART_BYTES || (finishing && size > sent) {
                    // A failed save stops the upload at the next part, not
                    // once the backlog is sent.
                    if signal.state.load(Ordering::Acquire) == ABORT {
                        break;
                    }
                    let n = (size - sent).min(PART_BYTES);
                    let mut data = vec![0u8; usize::try_from(n).unwrap_or(0)];
                    f.read_exact_at(&mut data, sent)
                        .map_err(io("cannot read"))?;
                    hasher.update(&data);
                    if upload.is_none() {
                        let started = store
                            .inner()
                            .put_multipart(&object)
                            .await
                            .map_err(failed("starting the upload of"))?;
                        upload = Some(WriteMultipart::new_with_chunk_size(
                            started,
                            usize::try_from(PART_BYTES).unwrap_or(usize::MAX),
                        ));
                    }
                    if let Some(w) = upload.as_mut() {
                        w.wait_for_capacity(IN_FLIGHT)
                            .await
                            .map_err(failed("uploading"))?;
                        w.put(Bytes::from(data));
                    }
                    sent += n;
                }
                if finishing {
                    // Another image may have appeared at the URL since the
                    // save began: never complete over its pages.
                    refuse_if_taken(store, url).await?;
                    if let Some(w) = upload.take() {
                        w.finish()
                            .await
                            .map_err(failed("completing the upload of"))?;
                    }
                    return Ok(sent);
                }
            } else if finishing {
                return Err(StoreError::Io {
                    path: paths[1].clone(),
                    context: "the saved image has no pages.bin".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            tokio::select! {
                _ = signal.changed.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    .await;
    match result {
        Ok(len) => Ok(ManifestFile {
            name: "pages.bin".into(),
            len,
            xxh3: format!("{:016x}", hasher.digest()),
            object: None,
        }),
        Err(e) => {
            if let Some(w) = upload {
                if let Err(abort) = w.abort().await {
                    log::warn!(
                        "aborting the upload of s3://{}/{object}: {abort}",
                        url.bucket
                    );
                }
            }
            Err(e)
        }
    }
}
