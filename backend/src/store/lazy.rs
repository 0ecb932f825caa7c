//! A restore straight from an object store: a local image directory that
//! holds everything of the image but its pages (metadata, device state,
//! index, working sets: small, downloaded and verified first), and in
//! place of `pages.bin` a reference to the object
//! ([`super::pages::REMOTE_PAGES`]), so the restore reads pages with
//! ranged GETs as the guest needs them. The directory is named after the
//! image's identity under the cache directory and reused by the next
//! restore of the same image (and by `thaw recover`, which finds it in the
//! restore's record).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::client::Store;
use super::pages::{RemotePagesRef, REMOTE_PAGES};
use super::transfer::{self, read_manifest};
use super::{StoreError, StoreUrl};
use crate::image::source::Fetched;
use crate::progress::Progress;

/// Where the local parts of images restored from a store are kept:
/// `$THAW_CACHE_DIR`, else `/var/cache/thaw`, then `store/`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("THAW_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/thaw"))
        .join("store")
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
    progress: &dyn Progress,
) -> Result<Prepared, StoreError> {
    let before = store.fetched();
    let dir = prepare_dir(store, url, root, progress).await?;
    let after = store.fetched();
    Ok(Prepared {
        dir,
        fetched: Fetched {
            requests: after.requests - before.requests,
            bytes: after.bytes - before.bytes,
        },
    })
}

async fn prepare_dir(
    store: &Store,
    url: &StoreUrl,
    root: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, StoreError> {
    let manifest = read_manifest(store, url).await?;
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
            return Ok(dir);
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
        .filter(|f| f.name != "pages.bin")
        .collect();
    progress.start("metadata", small.iter().map(|f| f.len).sum());
    let result = async {
        for f in &small {
            transfer::download_file(store, url, f, &partial.join(&f.name), progress).await?;
        }
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
    Ok(dir)
}

fn write_reference(dir: &Path, reference: &RemotePagesRef) -> Result<(), StoreError> {
    let path = dir.join(REMOTE_PAGES);
    let tmp = dir.join(format!("{REMOTE_PAGES}.tmp"));
    let text = serde_json::to_vec_pretty(reference).map_err(|e| StoreError::Refused {
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
