//! Publishing what restores learned back to an image in a store: its
//! working sets (`ws-<estimator>.bin`) and their evidence
//! (`ws-evidence.json`), so that the next restore on any host starts from
//! what the last one saw the guest touch.
//!
//! The image itself never changes; only these files do, and a restore may
//! be reading the manifest and its files at the same moment. So a new
//! version goes up under an object name of its own
//! (`ws-learned.bin.v-<xxh3>`, [`versioned`]), and the manifest is
//! replaced in one request that names it
//! ([`super::transfer::ManifestFile::object`]), conditional on the
//! manifest being the one this publish read (`If-Match` on its ETag), then
//! read back. Per file the last publish wins.
//!
//! A version no manifest names any more is removed by a later publish,
//! and only once both it and the manifest before that publish's are
//! [`RECENT`] old by the store's clock: a restore that read a manifest a
//! moment ago still finds its files, and a publish still under way keeps
//! the version it just uploaded. A restore or pull that meets a removed
//! version reads the manifest again ([`super::lazy::prepare`],
//! [`super::transfer::pull`]).

use std::collections::HashSet;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::ObjectMeta;
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use super::client::Store;
use super::transfer::{self, encode_manifest, io_err, Manifest, ManifestFile, MANIFEST};
use super::{StoreError, StoreUrl};
use crate::image::Image;
use crate::progress::Progress;
use crate::wss::{evidence, Estimator, WsFile};

/// How an object name marks the version of a published file.
const VERSION_MARK: &str = ".v-";
/// Tries of a publish: reading the manifest, uploading what differs,
/// writing the manifest. Another is made when another writer replaced the
/// manifest first, or a version this publish named was removed.
const ATTEMPTS: u32 = 4;
/// A version younger than this is never removed (it may belong to a
/// publish still under way: uploaded, its manifest not yet written), nor
/// one that a manifest younger than this named (a restore may have read
/// that manifest a moment ago).
pub const RECENT: Duration = Duration::from_secs(15 * 60);

/// The files of an image that may be published after a push: its working
/// sets and their evidence.
pub fn publishable(name: &str) -> bool {
    name == evidence::FILE || Estimator::PREFERENCE.iter().any(|e| name == e.file_name())
}

/// The object that holds version `xxh3` of the image's file `name`.
pub fn versioned(name: &str, xxh3: &str) -> String {
    format!("{name}{VERSION_MARK}{xxh3}")
}

/// Whether `object` is a version of a publishable file.
pub fn is_version(object: &str) -> bool {
    object.rsplit_once(VERSION_MARK).is_some_and(|(name, v)| {
        publishable(name) && v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// The objects under the image's prefix (`present`: name and age) that a
/// publish from manifest `old` (written `old_age` ago) to `new` leaves
/// unused for good: versions of publishable files and the plain objects of
/// files now published under versions, named by neither manifest, older
/// than [`RECENT`], and only when `old` is too.
pub fn superseded(
    present: &[(String, Duration)],
    old: &Manifest,
    old_age: Duration,
    new: &Manifest,
) -> Vec<String> {
    if old_age < RECENT {
        return Vec::new();
    }
    let named = |o: &str| {
        old.files
            .iter()
            .chain(&new.files)
            .any(|f| f.object_name() == o)
    };
    let published_plain = |o: &str| {
        new.files
            .iter()
            .any(|f| f.name == o && f.object.is_some() && publishable(o))
    };
    present
        .iter()
        .filter(|(o, age)| {
            *age >= RECENT
                && o.as_str() != MANIFEST
                && !named(o)
                && (is_version(o) || published_plain(o))
        })
        .map(|(o, _)| o.clone())
        .collect()
}

/// What a publish did, for humans and `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PublishReport {
    pub url: String,
    pub identity: String,
    /// Files whose version from here the manifest now names.
    pub published: Vec<ManifestFile>,
    /// Files the store already had as they are here.
    pub unchanged: Vec<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Versions no manifest names any more, removed.
    pub removed: Vec<String>,
    /// Tries (see [`ATTEMPTS`]): more than one when another writer
    /// replaced the manifest between this publish's read and its write.
    pub attempts: u32,
    pub seconds: f64,
}

impl std::fmt::Display for PublishReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.published.is_empty() {
            return write!(
                f,
                "{}: already has these working sets ({})",
                self.url,
                self.unchanged.join(", ")
            );
        }
        let names: Vec<String> = self
            .published
            .iter()
            .map(|p| format!("{} ({} KiB)", p.name, p.len >> 10))
            .collect();
        write!(
            f,
            "published to {}: {} in {:.1} s",
            self.url,
            names.join(", "),
            self.seconds
        )?;
        if !self.removed.is_empty() {
            write!(f, "; removed {} older versions", self.removed.len())?;
        }
        Ok(())
    }
}

/// Publishes the files of the image in `local` that `wanted` selects
/// among the [`publishable`] ones to the same image at `url`: those that
/// differ from the store's go up as new versions, and the manifest names
/// them. The image at `url` must be the one in `local` (same identity).
pub async fn publish(
    store: &Store,
    url: &StoreUrl,
    local: &Path,
    wanted: &dyn Fn(&str) -> bool,
    progress: &dyn Progress,
) -> Result<PublishReport, StoreError> {
    let started = Instant::now();
    let (identity, files) = local_files(local, wanted)?;
    // The versions this directory took from the store, if it was
    // prepared from there: to tell when a publish replaces a newer one.
    let base = super::lazy::store_versions(local);
    let mut report = PublishReport {
        url: url.to_string(),
        identity: identity.clone(),
        ..PublishReport::default()
    };
    // Objects this publish uploaded: young, so no other publish removes
    // them before a manifest names them.
    let mut sent: HashSet<String> = HashSet::new();
    while report.attempts < ATTEMPTS {
        report.attempts += 1;
        let (manifest, manifest_meta) = transfer::read_manifest_versioned(store, url).await?;
        if manifest.identity != identity {
            return Err(StoreError::Refused {
                path: local.to_path_buf(),
                why: format!(
                    "is image {identity}, and the one at {url} is {}: its working sets \
                     are not this image's",
                    manifest.identity
                ),
            });
        }
        let mut next = manifest.clone();
        let (mut published, mut unchanged) = (Vec::new(), Vec::new());
        for (name, path) in &files {
            // One open file for its digest and its upload: the sets are
            // replaced by renames, so both see one version.
            let io = |context: &str| io_err(path, context);
            let mut file = std::fs::File::open(path).map_err(io("cannot open"))?;
            let (len, xxh3) = digest(&mut file, path)?;
            let current = manifest.files.iter().find(|f| &f.name == name);
            if let Some(c) = current.filter(|c| c.len == len && c.xxh3 == xxh3) {
                // The store has it as it is here, if its object is there.
                if store.head(&url.object(c.object_name())).await?.is_some() {
                    if sent.contains(c.object_name()) {
                        published.push(c.clone());
                    } else {
                        unchanged.push(name.clone());
                    }
                    continue;
                }
                log::warn!("{url}: {name} is missing from the store; publishing it again");
            } else if let (Some(c), Some(base)) = (current, &base) {
                if base.get(name) != Some(&c.xxh3) {
                    log::warn!(
                        "{url}: {name} was published since this directory took its own; \
                         replacing it with this one (the last publish wins)"
                    );
                }
            }
            let object = versioned(name, &xxh3);
            file.rewind().map_err(io("cannot read"))?;
            progress.start(&format!("publish {name}"), len);
            let up = transfer::upload_from(
                store,
                tokio::fs::File::from_std(file),
                path,
                url,
                &object,
                progress,
            )
            .await;
            progress.finish();
            let up = up?;
            report.bytes += up.len;
            if up.len != len || up.xxh3 != xxh3 {
                if let Err(e) = store.delete(&url.object(&object)).await {
                    log::warn!("{url}: removing {object}: {e}");
                }
                return Err(StoreError::Refused {
                    path: path.clone(),
                    why: "changed while it was uploaded (written in place?)".into(),
                });
            }
            sent.insert(object.clone());
            let entry = ManifestFile {
                name: name.clone(),
                len,
                xxh3,
                object: Some(object),
            };
            match next.files.iter_mut().find(|f| &f.name == name) {
                Some(f) => *f = entry.clone(),
                None => next.files.push(entry.clone()),
            }
            published.push(entry);
        }
        report.unchanged = unchanged;
        if next.files == manifest.files {
            // Nothing for the manifest to name anew (at most an object
            // put back where it names it).
            note_in_sync(local, &manifest, &files);
            report.published = published;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        crate::failpoint::check("publish-before-manifest")
            .map_err(|source| io_err(local, "publishing")(source))?;
        let text = Bytes::from(encode_manifest(&next, url)?);
        if !store
            .put_if(&url.object(MANIFEST), text, &manifest_meta)
            .await?
        {
            log::info!("{url}: its manifest changed while publishing; reading it again");
            continue;
        }
        // What the store holds now: a store that ignores If-Match
        // overwrites whatever another writer put there.
        let (now, now_meta) = transfer::read_manifest_versioned(store, url).await?;
        if !published.iter().all(|p| now.files.contains(p)) {
            return Err(StoreError::Conflict {
                url: url.to_string(),
                why: "read back, its manifest names another publish's versions: that one \
                      wrote right after this one (or at the same moment, on a store that \
                      ignores If-Match)"
                    .into(),
            });
        }
        let mut lost = false;
        for p in &published {
            lost |= store.head(&url.object(p.object_name())).await?.is_none();
        }
        if lost {
            log::warn!("{url}: a version this publish named was removed; publishing it again");
            continue;
        }
        note_in_sync(local, &now, &files);
        match remove_superseded(store, url, &manifest, &manifest_meta, &now, &now_meta).await {
            Ok(removed) => report.removed = removed,
            Err(e) => log::warn!("{url}: older versions were not removed: {e}"),
        }
        report.published = published;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    Err(StoreError::Conflict {
        url: url.to_string(),
        why: format!(
            "its manifest was replaced, or a version it named removed, under each of \
             {ATTEMPTS} tries to publish"
        ),
    })
}

/// Removes what [`superseded`] selects after a publish from `old` to
/// `new`, its ages by the store's clock (`new_meta`: the manifest just
/// written).
async fn remove_superseded(
    store: &Store,
    url: &StoreUrl,
    old: &Manifest,
    old_meta: &ObjectMeta,
    new: &Manifest,
    new_meta: &ObjectMeta,
) -> Result<Vec<String>, StoreError> {
    let age = |meta: &ObjectMeta| {
        new_meta
            .last_modified
            .signed_duration_since(meta.last_modified)
            .to_std()
            .unwrap_or_default()
    };
    let present: Vec<(String, Duration)> = store
        .list_children(&url.prefix_path())
        .await?
        .iter()
        .filter_map(|o| Some((o.location.filename()?.to_string(), age(o))))
        .collect();
    let mut removed = Vec::new();
    for o in superseded(&present, old, age(old_meta), new) {
        log::info!(
            "removing s3://{}/{}/{o} (an older version)",
            url.bucket,
            url.prefix
        );
        store.delete(&url.object(&o)).await?;
        removed.push(o);
    }
    Ok(removed)
}

/// Notes in `local` (a directory prepared for restores from the store)
/// that its `files` are the versions `manifest` names. A failure only
/// costs the next restore here a download.
fn note_in_sync(local: &Path, manifest: &Manifest, files: &[(String, PathBuf)]) {
    let in_sync: Vec<ManifestFile> = manifest
        .files
        .iter()
        .filter(|f| files.iter().any(|(name, _)| name == &f.name))
        .cloned()
        .collect();
    if let Err(e) = super::lazy::note_published(local, &in_sync) {
        log::warn!("{}: {e}", local.display());
    }
}

/// The identity of the image in `local`, and its publishable files that
/// `wanted` selects, each checked to be whole and this image's.
fn local_files(
    local: &Path,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<(String, Vec<(String, PathBuf)>), StoreError> {
    let image = Image::open(local)?;
    let refused = |name: &str, why: String| StoreError::Refused {
        path: local.join(name),
        why,
    };
    let mut files = Vec::new();
    for e in Estimator::PREFERENCE {
        let name = e.file_name();
        if !wanted(&name) || !local.join(&name).is_file() {
            continue;
        }
        match WsFile::open(&image, e) {
            Ok(Some(_)) => files.push((name.clone(), local.join(&name))),
            Ok(None) => log::warn!("not publishing {name}: an older format, or gone"),
            Err(err) => return Err(refused(&name, format!("not published: {err}"))),
        }
    }
    if wanted(evidence::FILE) && local.join(evidence::FILE).is_file() {
        evidence::Evidence::load(&image)
            .map_err(|err| refused(evidence::FILE, format!("not published: {err}")))?;
        files.push((evidence::FILE.to_string(), local.join(evidence::FILE)));
    }
    if files.is_empty() {
        return Err(StoreError::Refused {
            path: local.to_path_buf(),
            why: "has no working set to publish".into(),
        });
    }
    Ok((format!("{:016x}", image.identity()), files))
}

/// The length and xxh3 (hex) of the rest of `file` (opened from `path`).
fn digest(file: &mut std::fs::File, path: &Path) -> Result<(u64, String), StoreError> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path, "cannot read"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, format!("{:016x}", hasher.digest())))
}
