//! A restore straight from an object store: a local image directory that
//! holds everything of the image but its pages (metadata, device state,
//! index, the working set the restore uses: downloaded and verified
//! first), and in
//! place of `pages.bin` a reference to the object
//! ([`super::pages::REMOTE_PAGES`]), so the restore reads pages with
//! ranged GETs as the guest needs them. The directory is named after the
//! image's identity under the cache directory and reused by the next
//! restore of the same image (and by `thaw recover`, which finds it in the
//! restore's record). An incremental image's parents are made ready the
//! same way, next to it, where the image reader finds them by identity.
//!
//! Working sets are the files of an image that change in the store
//! ([`super::publish`]): the directory records which version of each it
//! took (`.store-versions.json`), reads one again when the store has a
//! newer one, and reads the manifest again when a version it names was
//! removed before it was read.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;

use futures::{StreamExt, TryStreamExt};
use std::path::{Path, PathBuf};

use super::client::Store;
use super::pages::{RemotePagesRef, REMOTE_PAGES};
use super::publish::publishable;
use super::transfer::{self, read_manifest, ManifestFile, ManifestParent};
use super::{StoreError, StoreUrl};
use crate::image::source::Fetched;
use crate::ops::restore::{EstimatorChoice, Mode};
use crate::progress::Progress;
use crate::wss::Estimator;

/// Where the local parts of images restored from a store are kept:
/// `$THAW_CACHE_DIR`, else `/var/cache/thaw`, then `store/`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("THAW_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/thaw"))
        .join("store")
}

/// Files of an image downloaded at once.
const FILES_IN_FLIGHT: usize = 4;
/// In a prepared directory: the version (xxh3) of each publishable file
/// as last read from or published to the store. A file whose version in
/// the store is another has been published since (from another host) and
/// is read again; one that matches is kept, with what restores here
/// learned into it.
const STORE_VERSIONS: &str = ".store-versions.json";

/// The [`STORE_VERSIONS`] of `dir`: `None` when it has none (a
/// directory prepared before thaw recorded them), empty when it is
/// unreadable (every publishable file is then read again).
pub fn store_versions(dir: &Path) -> Option<BTreeMap<String, String>> {
    match std::fs::read(dir.join(STORE_VERSIONS)) {
        Ok(text) => Some(serde_json::from_slice(&text).unwrap_or_default()),
        Err(_) => None,
    }
}

fn write_store_versions(dir: &Path, versions: &BTreeMap<String, String>) -> Result<(), StoreError> {
    write_json(dir, STORE_VERSIONS, versions)
}

/// Replaces file `name` in `dir` with `value` as JSON, atomically.
fn write_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    let text = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Refused {
        path: path.clone(),
        why: e.to_string(),
    })?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| StoreError::Io {
            path,
            context: "cannot write".into(),
            source,
        })
}

/// Notes in the prepared directory `dir` (a no-op for any other) that its
/// `files` are now the store's versions: a publish from it.
pub fn note_published(dir: &Path, files: &[ManifestFile]) -> Result<(), StoreError> {
    if !dir.join(REMOTE_PAGES).is_file() {
        return Ok(());
    }
    let mut versions = store_versions(dir).unwrap_or_default();
    for f in files {
        versions.insert(f.name.clone(), f.xxh3.clone());
    }
    write_store_versions(dir, &versions)
}

/// Which working sets a restore straight from a store needs: each is as
/// large as the pages it holds, so the others stay in the store. (A later
/// restore of the same image fetches the ones it needs then.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkingSets {
    /// Every one the image has (a choice by the image's evidence).
    All,
    /// Only these (none for a restore without a prefetch).
    Only(Vec<Estimator>),
}

impl WorkingSets {
    /// What a restore in `mode` with `estimator` needs; one that `learns`
    /// also needs the learned set it refines.
    pub fn for_restore(mode: Mode, estimator: EstimatorChoice, learns: bool) -> WorkingSets {
        let mut sets = match (mode, estimator) {
            (Mode::Ws, EstimatorChoice::Auto) => return WorkingSets::All,
            (Mode::Ws, e) => e.candidates(),
            _ => Vec::new(),
        };
        if learns && !sets.contains(&Estimator::Learned) {
            sets.push(Estimator::Learned);
        }
        WorkingSets::Only(sets)
    }

    /// Whether file `name` of an image is needed.
    pub(crate) fn wants(&self, name: &str) -> bool {
        if name == "pages.bin" {
            return false;
        }
        match self {
            WorkingSets::All => true,
            WorkingSets::Only(sets) => Estimator::PREFERENCE
                .iter()
                .find(|e| name == format!("ws-{}.bin", e.name()))
                .is_none_or(|e| sets.contains(e)),
        }
    }
}

/// An image of a store made ready for a restore straight from it.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The local directory that stands for it.
    pub dir: PathBuf,
    /// What was read from the store to make it (the manifest, and the
    /// files unless an earlier restore left them).
    pub fetched: Fetched,
}

/// The local directory that stands for the image at `url` under `root`,
/// with every file but the pages downloaded and verified (reused when
/// already there for this image).
pub async fn prepare(
    store: &Store,
    url: &StoreUrl,
    root: &Path,
    sets: &WorkingSets,
    progress: &dyn Progress,
) -> Result<Prepared, StoreError> {
    let before = store.fetched();
    let mut dir = None;
    let mut at = url.clone();
    let mut expected: Option<String> = None;
    // An incremental image, then its parent, and so on to the base: all
    // side by side under `root`, where the image reader finds a parent by
    // its identity.
    for depth in 0..=crate::image::chain::MAX_DEPTH {
        // A parent's working sets are never used: only the image's own.
        let own = if depth == 0 {
            sets.clone()
        } else {
            WorkingSets::Only(Vec::new())
        };
        let mut tries = 0;
        let (prepared, parent) = loop {
            match prepare_dir(store, &at, root, &own, expected.as_deref(), progress).await {
                // A version of a working set that a publish replaced
                // between the manifest's read and the file's: read the
                // manifest again.
                Err(StoreError::Missing { name, .. })
                    if publishable(&name) && tries < transfer::MISSING_VERSION_RETRIES =>
                {
                    tries += 1;
                    log::info!("{at}: {name} was replaced meanwhile; reading the manifest again");
                }
                result => break result?,
            }
        };
        dir.get_or_insert(prepared);
        match parent {
            None => break,
            Some(p) if depth < crate::image::chain::MAX_DEPTH => {
                let next = StoreUrl::parse(&p.url)?;
                if next.bucket != url.bucket {
                    return Err(StoreError::Damaged {
                        url: at.to_string(),
                        why: format!("its parent {} is in another bucket", p.url),
                    });
                }
                expected = Some(p.identity);
                at = next;
            }
            Some(_) => {
                return Err(StoreError::Damaged {
                    url: url.to_string(),
                    why: format!(
                        "its chain of parents is deeper than {} images",
                        crate::image::chain::MAX_DEPTH
                    ),
                })
            }
        }
    }
    let after = store.fetched();
    Ok(Prepared {
        dir: dir.ok_or_else(|| StoreError::Damaged {
            url: url.to_string(),
            why: "nothing prepared".into(),
        })?,
        fetched: Fetched {
            requests: after.requests - before.requests,
            bytes: after.bytes - before.bytes,
        },
    })
}

/// One image of a chain: its directory, and its parent in the store.
async fn prepare_dir(
    store: &Store,
    url: &StoreUrl,
    root: &Path,
    sets: &WorkingSets,
    identity: Option<&str>,
    progress: &dyn Progress,
) -> Result<(PathBuf, Option<ManifestParent>), StoreError> {
    let manifest = read_manifest(store, url).await?;
    if let Some(identity) = identity.filter(|i| *i != manifest.identity) {
        return Err(StoreError::Damaged {
            url: url.to_string(),
            why: format!(
                "it is the parent of the image restored, but has identity {}, not {identity}: \
                 it was replaced since",
                manifest.identity
            ),
        });
    }
    let parent = manifest.parent.clone();
    let pages = manifest
        .files
        .iter()
        .find(|f| f.name == "pages.bin")
        .ok_or_else(|| StoreError::Damaged {
            url: url.to_string(),
            why: "the manifest lists no pages.bin".into(),
        })?
        .clone();
    let io = |path: &Path, context: &str| {
        let (path, context) = (path.to_path_buf(), context.to_string());
        move |source| StoreError::Io {
            path,
            context,
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(io(root, "cannot create"))?;
    let dir = root.join(&manifest.identity);
    let reference = RemotePagesRef {
        url: url.to_string(),
        len: pages.len,
        xxh3: pages.xxh3.clone(),
    };
    if let Ok(Some(r)) = RemotePagesRef::read(&dir) {
        if r.len == reference.len && r.xxh3 == reference.xxh3 {
            if r.url != reference.url {
                // The same image under another name: read it from there.
                write_reference(&dir, &reference)?;
            }
            // What an earlier restore did not need, and working sets
            // published since it read them.
            // (Prepared before versions were recorded: what it has is
            // taken for the store's, as it was then.)
            let recorded = store_versions(&dir);
            let mut versions = recorded.clone().unwrap_or_default();
            let before = recorded.clone();
            for f in manifest.files.iter().filter(|f| sets.wants(&f.name)) {
                let path = dir.join(&f.name);
                let current = match &recorded {
                    _ if !publishable(&f.name) => true,
                    Some(v) => v.get(&f.name) == Some(&f.xxh3),
                    None => {
                        versions.insert(f.name.clone(), f.xxh3.clone());
                        true
                    }
                };
                if path.exists() && current {
                    continue;
                }
                let part = dir.join(format!(".{}.part-{}", f.name, std::process::id()));
                let _ = std::fs::remove_file(&part);
                let fetched = transfer::download_file(store, url, f, &part, progress).await;
                if let Err(e) = fetched.and_then(|()| {
                    std::fs::rename(&part, &path).map_err(io(&path, "cannot rename into place"))
                }) {
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
                if publishable(&f.name) {
                    versions.insert(f.name.clone(), f.xxh3.clone());
                }
            }
            if before.as_ref() != Some(&versions) {
                write_store_versions(&dir, &versions)?;
            }
            return Ok((dir, parent));
        }
    }
    let partial = root.join(format!(
        "{}.partial-{}",
        manifest.identity,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .map_err(io(&partial, "cannot create"))?;
    let small: Vec<_> = manifest
        .files
        .iter()
        .filter(|f| sets.wants(&f.name))
        .collect();
    progress.start("metadata", small.iter().map(|f| f.len).sum());
    let result = async {
        // Side by side: each file costs round trips of its own.
        futures::stream::iter(&small)
            .map(|f| {
                let path = partial.join(&f.name);
                async move { transfer::download_file(store, url, f, &path, progress).await }
            })
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        let versions = small
            .iter()
            .filter(|f| publishable(&f.name))
            .map(|f| (f.name.clone(), f.xxh3.clone()))
            .collect();
        write_store_versions(&partial, &versions)?;
        write_reference(&partial, &reference)
    }
    .await;
    progress.finish();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(io(&dir, "cannot rename into place"))?;
    Ok((dir, parent))
}

fn write_reference(dir: &Path, reference: &RemotePagesRef) -> Result<(), StoreError> {
    write_json(dir, REMOTE_PAGES, reference)
}
