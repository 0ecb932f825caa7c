//! Whole images between a directory and an object store: `thaw push`
//! and `thaw pull`.
//!
//! Push uploads every file of the image directory under the prefix
//! (large ones as multipart uploads with several parts in flight),
//! hashing each as it goes, then writes the manifest [`MANIFEST`] last:
//! only then is the image visible. Replacing an image removes its
//! manifest first. A failed push aborts its multipart uploads and removes
//! what it wrote; objects a killed push left behind are never listed in a
//! manifest and are removed by the next push to that prefix, as are
//! versions of working sets published to an image it replaces
//! ([`super::publish`]; not one younger than [`RECENT`], which may be a
//! publish's under way).
//!
//! [`RECENT`]: super::publish::RECENT
//!
//! Pull reads the manifest (none: no complete image), downloads each file
//! into `<dir>.partial-<pid>` with several ranged reads in flight, checks
//! each file's length and digest against the manifest, opens the result
//! as an image (which checks its structure) and renames it into place. A
//! working set that a publish replaced meanwhile makes it read the
//! manifest again.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::client::Store;
use super::{StoreError, StoreUrl};
use crate::image::Image;
use crate::progress::Progress;

/// The object that makes an image visible, written last.
pub const MANIFEST: &str = "thaw-image.json";
/// The manifest format of an image as pushed: every file in the object
/// of its name.
pub const MANIFEST_VERSION: u32 = 1;
/// The manifest format once a working set was published apart
/// ([`ManifestFile::object`]): a thaw that reads only version 1 refuses it
/// by its version, not as damaged.
pub const MANIFEST_VERSION_PUBLISHED: u32 = 2;
/// Files up to this size are written in one request.
pub(super) const SINGLE_PUT_MAX: u64 = 8 << 20;
/// Part size of a multipart upload, and of the ranged reads of a pull.
pub const PART_BYTES: u64 = 8 << 20;
/// Parts or ranges in flight at once.
pub(super) const IN_FLIGHT: usize = 4;
/// Largest manifest a pull accepts (a real one is well under 1 KiB per
/// file).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// One file of an image in a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub name: String,
    pub len: u64,
    /// xxh3-64 of the content, hex.
    pub xxh3: String,
    /// The object under the image's prefix that holds it, when not
    /// `name`: a working set published after the push
    /// ([`super::publish`]) goes up under a name of its own version, so
    /// that a restore that read the manifest before still finds its file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

impl ManifestFile {
    /// The name of the object under the image's prefix that holds it.
    pub fn object_name(&self) -> &str {
        self.object.as_deref().unwrap_or(&self.name)
    }
}

/// [`MANIFEST`]: what a complete image in a store holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub manifest_version: u32,
    /// The image's identity ([`Image::identity`]), hex.
    pub identity: String,
    pub files: Vec<ManifestFile>,
    /// An incremental image: its parent in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ManifestParent>,
}

/// Where an incremental image's parent is in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestParent {
    /// `s3://BUCKET/PREFIX` (a sibling of the image's prefix).
    pub url: String,
    /// The parent's identity, hex.
    pub identity: String,
}

/// Where the parent of the incremental image in `local` must be in the
/// store for it to go to `url`: next to it, under the name of the
/// parent's directory. `None` for a full image.
pub fn parent_url(image: &Image, url: &StoreUrl) -> Result<Option<ManifestParent>, StoreError> {
    let (Some((dir, _)), Some(parent)) = (image.parent(), image.meta().parent.as_ref()) else {
        return Ok(None);
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_plain_name(n))
        .ok_or_else(|| StoreError::Refused {
            path: dir.to_path_buf(),
            why: "the parent's directory name is not a plain name".into(),
        })?;
    Ok(Some(ManifestParent {
        url: url.sibling(name).to_string(),
        identity: parent.identity.clone(),
    }))
}

/// Checks that the parent an incremental image names is in the store.
pub async fn check_parent(
    store: &Store,
    parent: &ManifestParent,
    parent_dir: &Path,
) -> Result<(), StoreError> {
    let url = StoreUrl::parse(&parent.url)?;
    let push_first = || StoreError::Refused {
        path: parent_dir.to_path_buf(),
        why: format!(
            "is the parent of this incremental image and must be in the store first, next to it: \
             thaw push {} {}",
            parent_dir.display(),
            parent.url
        ),
    };
    match read_manifest(store, &url).await {
        Ok(m) if m.identity == parent.identity => Ok(()),
        Ok(_) => Err(StoreError::Refused {
            path: parent_dir.to_path_buf(),
            why: format!(
                "the image at {} is not this incremental image's parent (another identity)",
                parent.url
            ),
        }),
        Err(StoreError::NoImage { .. }) => Err(push_first()),
        Err(e) => Err(e),
    }
}

impl Manifest {
    /// Parses and checks a manifest: version, file names (plain names,
    /// each once), `meta.json` among them.
    pub fn parse(text: &[u8]) -> Result<Manifest, String> {
        // The version first: a newer manifest may have fields this thaw
        // does not know.
        #[derive(Deserialize)]
        struct Version {
            manifest_version: u32,
        }
        let v: Version = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if !(MANIFEST_VERSION..=MANIFEST_VERSION_PUBLISHED).contains(&v.manifest_version) {
            return Err(format!(
                "manifest version {} (this thaw reads {MANIFEST_VERSION} to \
                 {MANIFEST_VERSION_PUBLISHED})",
                v.manifest_version
            ));
        }
        let m: Manifest = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if m.manifest_version == MANIFEST_VERSION && m.files.iter().any(|f| f.object.is_some()) {
            return Err(format!(
                "a file in another object needs manifest version {MANIFEST_VERSION_PUBLISHED}"
            ));
        }
        let mut names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        if let Some(bad) = names.iter().find(|n| !is_plain_name(n)) {
            return Err(format!("file name {bad:?} is not a plain file name"));
        }
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("a file is listed twice".into());
        }
        if let Some(f) = m
            .files
            .iter()
            .find(|f| f.object.is_some() && !super::publish::publishable(&f.name))
        {
            return Err(format!(
                "{} is in another object, and only working sets are published apart",
                f.name
            ));
        }
        let mut objects: Vec<&str> = m.files.iter().map(ManifestFile::object_name).collect();
        if let Some(bad) = objects.iter().find(|n| !is_plain_name(n)) {
            return Err(format!("object name {bad:?} is not a plain name"));
        }
        objects.sort_unstable();
        if objects.windows(2).any(|w| w[0] == w[1]) {
            return Err("two files are in one object".into());
        }
        if !names.contains(&"meta.json") {
            return Err("it lists no meta.json".into());
        }
        if let Some(p) = &m.parent {
            StoreUrl::parse(&p.url).map_err(|e| format!("its parent: {e}"))?;
            if p.identity.is_empty() || !p.identity.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("its parent's identity {:?} is not hex", p.identity));
            }
        }
        Ok(m)
    }
}

/// A name that is one path component and not the manifest's.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != MANIFEST
        && name.len() <= 255
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

/// What a push or pull did, for humans and `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    pub url: String,
    pub local: PathBuf,
    pub identity: String,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_sec: f64,
    /// Bytes of it uploaded while the image was being written (a save
    /// into the store), before this push.
    pub while_writing: u64,
}

impl TransferReport {
    fn new(url: &StoreUrl, local: &Path, manifest: &Manifest, started: Instant) -> TransferReport {
        let bytes = manifest.files.iter().map(|f| f.len).sum::<u64>();
        let seconds = started.elapsed().as_secs_f64();
        TransferReport {
            url: url.to_string(),
            local: local.to_path_buf(),
            identity: manifest.identity.clone(),
            files: manifest.files.len(),
            bytes,
            seconds,
            mib_per_sec: if seconds > 0.0 {
                bytes as f64 / f64::from(1u32 << 20) / seconds
            } else {
                0.0
            },
            while_writing: 0,
        }
    }
}

/// An I/O error on `path` while doing `context`.
pub(super) fn io_err(path: &Path, context: &str) -> impl FnOnce(std::io::Error) -> StoreError {
    let (path, context) = (path.to_path_buf(), context.to_string());
    move |source| StoreError::Io {
        path,
        context,
        source,
    }
}

/// Reads the manifest of the image at `url`.
pub async fn read_manifest(store: &Store, url: &StoreUrl) -> Result<Manifest, StoreError> {
    read_manifest_versioned(store, url).await.map(|(m, _)| m)
}

/// The manifest as it goes into the store, with the oldest version that
/// holds it.
pub(super) fn encode_manifest(manifest: &Manifest, url: &StoreUrl) -> Result<Vec<u8>, StoreError> {
    let mut manifest = manifest.clone();
    manifest.manifest_version = if manifest.files.iter().any(|f| f.object.is_some()) {
        MANIFEST_VERSION_PUBLISHED
    } else {
        MANIFEST_VERSION
    };
    serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Damaged {
        url: url.to_string(),
        why: format!("writing the manifest: {e}"),
    })
}

/// Reads the manifest of the image at `url`, and what the store says of
/// its object: its version (to replace it only if nobody did meanwhile)
/// and when it was written, by the store's clock.
pub async fn read_manifest_versioned(
    store: &Store,
    url: &StoreUrl,
) -> Result<(Manifest, object_store::ObjectMeta), StoreError> {
    let path = url.object(MANIFEST);
    let Some(meta) = store.head(&path).await? else {
        return Err(StoreError::NoImage {
            url: url.to_string(),
            manifest: MANIFEST,
        });
    };
    if meta.size > MAX_MANIFEST_BYTES {
        return Err(StoreError::Damaged {
            url: url.to_string(),
            why: format!(
                "{MANIFEST} is {} bytes, more than a manifest may have",
                meta.size
            ),
        });
    }
    let (text, version) = store
        .get_with_meta(&path)
        .await?
        .ok_or_else(|| StoreError::NoImage {
            url: url.to_string(),
            manifest: MANIFEST,
        })?;
    let manifest = Manifest::parse(&text).map_err(|why| StoreError::Damaged {
        url: url.to_string(),
        why: format!("{MANIFEST}: {why}"),
    })?;
    Ok((manifest, version))
}

/// Uploads the image in directory `local` to `url`; with `force` an image
/// already there is replaced.
pub async fn push(
    store: &Store,
    local: &Path,
    url: &StoreUrl,
    force: bool,
    progress: &dyn Progress,
) -> Result<TransferReport, StoreError> {
    push_uploaded(store, local, url, force, progress, None).await
}

/// [`push`], with `pages.bin` already uploaded as `uploaded` (by a
/// [`super::stream::StreamedUpload`] while the image was written): it is
/// taken as it is if its length and digest are the image's, and uploaded
/// again otherwise.
pub async fn push_uploaded(
    store: &Store,
    local: &Path,
    url: &StoreUrl,
    force: bool,
    progress: &dyn Progress,
    uploaded: Option<ManifestFile>,
) -> Result<TransferReport, StoreError> {
    let streamed = uploaded.is_some();
    let result: Result<TransferReport, StoreError> = async {
        let started = Instant::now();
        let image = Image::open(local)?;
        let parent = parent_url(&image, url)?;
        if let (Some(p), Some((dir, _))) = (&parent, image.parent()) {
            check_parent(store, p, dir).await?;
        }
        let uploaded = uploaded.filter(|u| {
            let pages = &image.meta().pages;
            let same = u.name == "pages.bin" && u.len == pages.len && u.xxh3 == pages.xxh3;
            if !same {
                log::warn!(
                    "the pages uploaded while saving are not the image's ({} bytes, digest {}); uploading them again",
                    u.len,
                    u.xxh3
                );
            }
            same
        });
        let identity = format!("{:016x}", image.identity());
        drop(image);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(local).map_err(io_err(local, "cannot list"))? {
            let entry = entry.map_err(io_err(local, "cannot list"))?;
            let file_type = entry
                .file_type()
                .map_err(io_err(&entry.path(), "cannot stat"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if file_type.is_file() && is_plain_name(&name) {
                names.push(name);
            } else {
                log::warn!("not pushing {}: not a plain file", entry.path().display());
            }
        }
        names.sort();
        if store.head(&url.object(MANIFEST)).await?.is_some() {
            if !force {
                return Err(StoreError::Exists {
                    url: url.to_string(),
                });
            }
            // Invisible from now on: never half old, half new.
            store.delete(&url.object(MANIFEST)).await?;
        }
        let total = names
            .iter()
            .map(|n| std::fs::metadata(local.join(n)).map_or(0, |m| m.len()))
            .sum();
        progress.start("upload", total);
        let mut files = Vec::new();
        let mut written = Vec::new();
        let result = async {
            for name in &names {
                written.push(url.object(name));
                match &uploaded {
                    Some(u) if &u.name == name => {
                        progress.advance(u.len);
                        files.push(u.clone());
                    }
                    _ => files.push(upload_file(store, &local.join(name), url, name, progress).await?),
                }
            }
            crate::failpoint::check("push-before-manifest").map_err(io_err(local, "uploading"))?;
            let manifest = Manifest {
                manifest_version: MANIFEST_VERSION,
                identity,
                files: std::mem::take(&mut files),
                parent,
            };
            let text = encode_manifest(&manifest, url)?;
            store.put(&url.object(MANIFEST), Bytes::from(text)).await?;
            Ok::<_, StoreError>(manifest)
        }
        .await;
        progress.finish();
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                for path in &written {
                    if let Err(cleanup) = store.delete(path).await {
                        log::warn!("removing a partial upload: {cleanup}");
                    }
                }
                return Err(e);
            }
        };
        let while_writing = uploaded.as_ref().map_or(0, |u| u.len);
        // Leftovers of an earlier push to this prefix that was killed, or of
        // a replaced image with other files, or versions of working sets
        // published to the image replaced (but not one a publish may have
        // just uploaded for this one).
        let keep: Vec<_> = manifest
            .files
            .iter()
            .map(|f| url.object(f.object_name()))
            .chain([url.object(MANIFEST)])
            .collect();
        let now = store
            .head(&url.object(MANIFEST))
            .await?
            .map(|m| m.last_modified);
        for object in store.list_children(&url.prefix_path()).await? {
            let young = now.is_none_or(|now| {
                now.signed_duration_since(object.last_modified)
                    .to_std()
                    .map_or(true, |age| age < super::publish::RECENT)
            });
            let version = object
                .location
                .filename()
                .is_some_and(super::publish::is_version);
            // A young version may be a publish's under way.
            let kept = keep.contains(&object.location) || (version && young);
            if !kept {
                log::info!(
                    "removing s3://{}/{} (not part of the image)",
                    url.bucket,
                    object.location
                );
                store.delete(&object.location).await?;
            }
        }
        let mut report = TransferReport::new(url, local, &manifest, started);
        report.while_writing = while_writing;
        Ok(report)
    }
    .await;
    if let Err(e) = &result {
        // Pages uploaded while saving are not left behind without their
        // image (unless another image is there now: they are its).
        if streamed && !matches!(e, StoreError::Exists { .. }) {
            if let Err(cleanup) = store.delete(&url.object("pages.bin")).await {
                log::warn!("removing the pages uploaded while saving: {cleanup}");
            }
        }
    }
    result
}

/// Uploads one file as object `name` under `url`, hashing it.
pub async fn upload_file(
    store: &Store,
    path: &Path,
    url: &StoreUrl,
    name: &str,
    progress: &dyn Progress,
) -> Result<ManifestFile, StoreError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(io_err(path, "cannot open"))?;
    upload_from(store, file, path, url, name, progress).await
}

/// Uploads the rest of `file` (opened from `path`, at its start) as
/// object `name` under `url`, hashing it.
pub async fn upload_from(
    store: &Store,
    mut file: tokio::fs::File,
    path: &Path,
    url: &StoreUrl,
    name: &str,
    progress: &dyn Progress,
) -> Result<ManifestFile, StoreError> {
    let object = url.object(name);
    let len = file
        .metadata()
        .await
        .map_err(io_err(path, "cannot stat"))?
        .len();
    let mut hasher = Xxh3::new();
    let failed = |source| StoreError::Store {
        what: format!(
            "uploading {} to s3://{}/{object}",
            path.display(),
            url.bucket
        ),
        source,
    };
    if len <= SINGLE_PUT_MAX {
        let data = read_block(&mut file, path, len).await?;
        hasher.update(&data);
        store.put(&object, Bytes::from(data)).await?;
        progress.advance(len);
    } else {
        let upload = store.inner().put_multipart(&object).await.map_err(failed)?;
        let mut writer = WriteMultipart::new_with_chunk_size(
            upload,
            usize::try_from(PART_BYTES).unwrap_or(usize::MAX),
        );
        let mut left = len;
        let result = async {
            while left > 0 {
                let n = left.min(PART_BYTES);
                let data = read_block(&mut file, path, n).await?;
                hasher.update(&data);
                writer.wait_for_capacity(IN_FLIGHT).await.map_err(failed)?;
                writer.put(Bytes::from(data));
                progress.advance(n);
                left -= n;
            }
            Ok::<_, StoreError>(())
        }
        .await;
        match result {
            Ok(()) => {
                writer.finish().await.map_err(failed)?;
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    log::warn!("aborting the upload of {}: {abort}", path.display());
                }
                return Err(e);
            }
        }
    }
    Ok(ManifestFile {
        name: name.to_string(),
        len,
        xxh3: format!("{:016x}", hasher.digest()),
        object: None,
    })
}

/// Reads exactly `len` bytes from `file`.
async fn read_block(
    file: &mut tokio::fs::File,
    path: &Path,
    len: u64,
) -> Result<Vec<u8>, StoreError> {
    use tokio::io::AsyncReadExt;
    let mut data = vec![
        0u8;
        usize::try_from(len).map_err(|_| StoreError::Io {
            path: path.to_path_buf(),
            context: "a block too large".into(),
            source: std::io::Error::other("length"),
        })?
    ];
    file.read_exact(&mut data).await.map_err(io_err(
        path,
        "cannot read (did it change during the upload?)",
    ))?;
    Ok(data)
}

/// Downloads the image at `url` into directory `local`; with `force` an
/// image already there is replaced.
pub async fn pull(
    store: &Store,
    url: &StoreUrl,
    local: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<TransferReport, StoreError> {
    let started = Instant::now();
    if local.exists() {
        if !force {
            return Err(StoreError::Refused {
                path: local.to_path_buf(),
                why: "already exists (use --force to replace the image there)".into(),
            });
        }
        if !local.join("meta.json").exists() {
            return Err(StoreError::Refused {
                path: local.to_path_buf(),
                why: "exists and is not an image: not replacing it".into(),
            });
        }
    }
    let file_name = local
        .file_name()
        .ok_or_else(|| StoreError::Refused {
            path: local.to_path_buf(),
            why: "not a directory name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let partial = local.with_file_name(format!("{file_name}.partial-{}", std::process::id()));
    let mut tries = 0;
    let manifest = loop {
        match pull_into(store, url, &partial, progress).await {
            // A working set a publish replaced after the manifest was
            // read: read it again.
            Err(StoreError::Missing { name, .. })
                if super::publish::publishable(&name) && tries < MISSING_VERSION_RETRIES =>
            {
                tries += 1;
                log::info!("{url}: {name} was replaced meanwhile; reading the manifest again");
            }
            result => break result?,
        }
    };
    if local.exists() {
        std::fs::remove_dir_all(local).map_err(io_err(local, "cannot remove the old image"))?;
    }
    std::fs::rename(&partial, local)
        .map_err(io_err(local, "cannot rename the download into place"))?;
    Ok(TransferReport::new(url, local, &manifest, started))
}

/// Times a pull or a restore reads the manifest again when a working set
/// it names was replaced by a publish meanwhile.
pub(super) const MISSING_VERSION_RETRIES: u32 = 3;

/// Downloads the image at `url` as its manifest says now into the new
/// directory `partial` and checks it; on failure nothing is left there.
async fn pull_into(
    store: &Store,
    url: &StoreUrl,
    partial: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, StoreError> {
    let manifest = read_manifest(store, url).await?;
    let _ = std::fs::remove_dir_all(partial);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(partial)
        .map_err(io_err(partial, "cannot create"))?;
    progress.start("download", manifest.files.iter().map(|f| f.len).sum());
    let result = async {
        for f in &manifest.files {
            download_file(store, url, f, &partial.join(&f.name), progress).await?;
        }
        // The structure (sizes, index digest, page table) as a restore
        // would check it.
        let image = Image::open(partial)?;
        let identity = format!("{:016x}", image.identity());
        if identity != manifest.identity {
            return Err(StoreError::Damaged {
                url: url.to_string(),
                why: format!(
                    "the image's identity is {identity}, the manifest says {}",
                    manifest.identity
                ),
            });
        }
        // An incremental image opened: its parent was found here (pulled
        // next to it under its name, or where it was saved).
        Ok(())
    }
    .await;
    progress.finish();
    match result {
        Ok(()) => Ok(manifest),
        Err(e) => {
            let _ = std::fs::remove_dir_all(partial);
            Err(e)
        }
    }
}

/// Downloads one file of the manifest to `path` with ranged reads in
/// flight, and checks its length and digest.
pub async fn download_file(
    store: &Store,
    url: &StoreUrl,
    f: &ManifestFile,
    path: &Path,
    progress: &dyn Progress,
) -> Result<(), StoreError> {
    let object = url.object(f.object_name());
    let damaged = |why: String| StoreError::Damaged {
        url: url.to_string(),
        why: format!("{}: {why}", f.name),
    };
    let found = store
        .head(&object)
        .await?
        .ok_or_else(|| StoreError::Missing {
            url: url.to_string(),
            name: f.name.clone(),
        })?;
    if found.size != f.len {
        return Err(damaged(format!(
            "{} bytes, the manifest says {}",
            found.size, f.len
        )));
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path, "cannot create"))?;
    let mut hasher = Xxh3::new();
    let ranges: Vec<_> = (0..f.len.div_ceil(PART_BYTES))
        .map(|i| i * PART_BYTES..((i + 1) * PART_BYTES).min(f.len))
        .collect();
    let mut parts = futures::stream::iter(ranges)
        .map(|r| store.get_range(&object, r))
        .buffered(IN_FLIGHT);
    let gone = |e: StoreError| match e {
        StoreError::Store {
            source: object_store::Error::NotFound { .. },
            ..
        } => StoreError::Missing {
            url: url.to_string(),
            name: f.name.clone(),
        },
        e => e,
    };
    while let Some(data) = parts.try_next().await.map_err(gone)? {
        hasher.update(&data);
        out.write_all(&data).map_err(io_err(path, "cannot write"))?;
        progress.advance(data.len() as u64);
    }
    let got = format!("{:016x}", hasher.digest());
    if got != f.xxh3 {
        return Err(damaged(format!(
            "content digest {got}, the manifest says {}: the object was changed or damaged",
            f.xxh3
        )));
    }
    out.sync_all().map_err(io_err(path, "cannot sync"))?;
    Ok(())
}

/// What `thaw inspect s3://…` shows: the manifest and the image's
/// `meta.json`, read without its pages.
#[derive(Clone, Debug, Serialize)]
pub struct StoredImage {
    pub url: String,
    pub identity: String,
    pub files: Vec<ManifestFile>,
    pub bytes: u64,
    pub meta: crate::image::ImageMeta,
}

impl std::fmt::Display for StoredImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.meta;
        write!(
            f,
            "{}: image of VM {} (format {}, thaw {}, QEMU {}), identity {}\n  \
             RAM {} MiB, {} non-zero pages; {} files, {} MiB in the store",
            self.url,
            m.vm.name,
            m.format_version,
            m.thaw_version,
            m.qemu_version,
            self.identity,
            (m.total_pages * m.page_size) >> 20,
            m.nonzero_pages,
            self.files.len(),
            self.bytes >> 20
        )?;
        for file in &self.files {
            write!(
                f,
                "\n  {:<24} {:>14} bytes  xxh3 {}",
                file.name, file.len, file.xxh3
            )?;
            if let Some(object) = &file.object {
                write!(f, "  (published as {object})")?;
            }
        }
        Ok(())
    }
}

/// Reads the manifest and `meta.json` of the image at `url` (checked
/// against the manifest).
pub async fn describe(store: &Store, url: &StoreUrl) -> Result<StoredImage, StoreError> {
    let manifest = read_manifest(store, url).await?;
    let damaged = |why: String| StoreError::Damaged {
        url: url.to_string(),
        why,
    };
    let entry = manifest
        .files
        .iter()
        .find(|f| f.name == "meta.json")
        .ok_or_else(|| damaged("the manifest lists no meta.json".into()))?;
    if entry.len > crate::image::MAX_META_BYTES {
        return Err(damaged(format!(
            "meta.json: {} bytes, more than a meta.json may have",
            entry.len
        )));
    }
    let text = store
        .get(&url.object(entry.object_name()))
        .await?
        .ok_or_else(|| damaged("meta.json: missing from the store".into()))?;
    let got = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&text));
    if text.len() as u64 != entry.len || got != entry.xxh3 {
        return Err(damaged(format!(
            "meta.json: {} bytes with digest {got}, the manifest says {} bytes, {}",
            text.len(),
            entry.len,
            entry.xxh3
        )));
    }
    let meta =
        crate::image::parse_meta(&text).map_err(|why| damaged(format!("meta.json: {why}")))?;
    Ok(StoredImage {
        url: url.to_string(),
        identity: manifest.identity.clone(),
        bytes: manifest.files.iter().map(|f| f.len).sum(),
        files: manifest.files,
        meta,
    })
}
