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
//! manifest being the one this publish read (`If-Match` on its ETag; a
//! store that ignores the condition is caught by reading the manifest back).
//! A restore that read the manifest before still finds its files: the
//! versions one publish replaces are removed by the next one, and a restore
//! that meets a removed version reads the manifest again
//! ([`super::lazy::prepare`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use super::client::Store;
use super::transfer::{self, encode_manifest, Manifest, ManifestFile, MANIFEST};
use super::{StoreError, StoreUrl};
use crate::image::Image;
use crate::progress::Progress;
use crate::wss::{evidence, Estimator, WsFile};

/// How an object name marks the version of a published file.
const VERSION_MARK: &str = ".v-";
/// Times a publish reads the manifest again after another writer changed
/// it first.
const ATTEMPTS: u32 = 4;
/// Objects younger than this are never removed as older versions: they
/// may belong to a publish still under way (uploaded, its manifest not
/// yet written).
pub const RECENT: Duration = Duration::from_secs(15 * 60);

/// The files of an image that may be published after a push: its working
/// sets and their evidence.
pub fn publishable(name: &str) -> bool {
    name == evidence::FILE
        || Estimator::PREFERENCE
            .iter()
            .any(|e| name == format!("ws-{}.bin", e.name()))
}

/// The object that holds version `xxh3` of the image's file `name`.
pub fn versioned(name: &str, xxh3: &str) -> String {
    format!("{name}{VERSION_MARK}{xxh3}")
}

/// Whether `object` is a version of a publishable file.
fn is_version(object: &str) -> bool {
    object.rsplit_once(VERSION_MARK).is_some_and(|(name, v)| {
        publishable(name) && v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// The objects under the image's prefix (`present`: name and age) that a
/// publish from manifest `old` to `new` leaves unused for good: versions
/// of publishable files and the plain objects of files now published
/// under versions, named by neither manifest and older than [`RECENT`].
/// Those `old` names stay for restores that read it a moment ago; a later
/// publish removes them.
pub fn superseded(present: &[(String, Duration)], old: &Manifest, new: &Manifest) -> Vec<String> {
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
    /// Files whose new version the manifest now names.
    pub published: Vec<ManifestFile>,
    /// Files the store already had as they are here.
    pub unchanged: Vec<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Versions no manifest names any more, removed.
    pub removed: Vec<String>,
    /// Manifests read: more than one when another writer replaced it
    /// between this publish's read and its write.
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
    let files = local_files(local, wanted)?;
    let mut report = PublishReport {
        url: url.to_string(),
        ..PublishReport::default()
    };
    let local_identity = {
        let image = Image::open(local)?;
        format!("{:016x}", image.identity())
    };
    while report.attempts < ATTEMPTS {
        report.attempts += 1;
        let (manifest, version) = transfer::read_manifest_versioned(store, url).await?;
        if manifest.identity != local_identity {
            return Err(StoreError::Refused {
                path: local.to_path_buf(),
                why: format!(
                    "is image {local_identity}, and the one at {url} is {}: its working sets \
                     are not this image's",
                    manifest.identity
                ),
            });
        }
        let mut next = manifest.clone();
        let (mut published, mut unchanged) = (Vec::new(), Vec::new());
        let mut changed_here = false;
        for (name, path) in &files {
            let (len, xxh3) = digest_of(path)?;
            let current = manifest.files.iter().find(|f| &f.name == name);
            if current.is_some_and(|c| c.len == len && c.xxh3 == xxh3) {
                unchanged.push(name.clone());
                continue;
            }
            let object = versioned(name, &xxh3);
            let there = store
                .head(&url.object(&object))
                .await?
                .is_some_and(|m| m.size == len);
            if !there {
                progress.start(&format!("publish {name}"), len);
                let sent = transfer::upload_file(store, path, url, &object, progress).await;
                progress.finish();
                let sent = sent?;
                report.bytes += sent.len;
                if sent.len != len || sent.xxh3 != xxh3 {
                    // Replaced here while it went up (a restore learning):
                    // what went up is not the version it is named after.
                    store.delete(&url.object(&object)).await?;
                    changed_here = true;
                    break;
                }
            }
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
        if changed_here {
            continue;
        }
        report.identity = manifest.identity.clone();
        report.unchanged = unchanged;
        if published.is_empty() {
            note_in_sync(local, &manifest, &files)?;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        crate::failpoint::check("publish-before-manifest").map_err(|source| StoreError::Io {
            path: local.to_path_buf(),
            context: "publishing".into(),
            source,
        })?;
        let written = store
            .put_if(
                &url.object(MANIFEST),
                Bytes::from(encode_manifest(&next, url)?),
                version,
            )
            .await?;
        if !written {
            log::info!("{url}: its manifest changed while publishing; reading it again");
            continue;
        }
        // A store that ignores If-Match overwrites whatever is there:
        // read back what it holds now.
        let now = transfer::read_manifest(store, url).await?;
        let ours = published.iter().all(|p| now.files.contains(p));
        if ours {
            // Removed meanwhile by another publish that took them for
            // leftovers (possible only where If-Match is ignored): put
            // them up again.
            let mut lost = false;
            for o in published.iter().filter_map(|p| p.object.as_deref()) {
                lost |= store.head(&url.object(o)).await?.is_none();
            }
            if lost {
                log::warn!("{url}: a version this publish named was removed; publishing again");
                continue;
            }
        }
        if !ours {
            let unused: Vec<String> = published
                .iter()
                .filter_map(|p| p.object.clone())
                .filter(|o| !now.files.iter().any(|f| f.object_name() == o))
                .collect();
            for o in &unused {
                store.delete(&url.object(o)).await?;
            }
            return Err(StoreError::Conflict {
                url: url.to_string(),
                why: "another writer replaced its manifest at the same moment, and the store \
                      does not honour If-Match: that writer's version was kept"
                    .into(),
            });
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let present: Vec<(String, Duration)> = store
            .list_children(&url.prefix_path())
            .await?
            .into_iter()
            .filter_map(|o| {
                // Ahead of this host's clock reads as new.
                let age = (now - o.last_modified.timestamp() as f64).max(0.0);
                let name = o.location.filename()?.to_string();
                Some((name, Duration::from_secs_f64(age)))
            })
            .collect();
        for o in superseded(&present, &manifest, &next) {
            log::info!(
                "removing s3://{}/{}/{o} (an older version)",
                url.bucket,
                url.prefix
            );
            store.delete(&url.object(&o)).await?;
            report.removed.push(o);
        }
        note_in_sync(local, &next, &files)?;
        report.published = published;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    Err(StoreError::Conflict {
        url: url.to_string(),
        why: format!(
            "its manifest changed under each of {ATTEMPTS} attempts to publish (other writers)"
        ),
    })
}

/// Notes in `local` (a directory prepared for restores from the store)
/// that its `files` are the versions `manifest` names.
fn note_in_sync(
    local: &Path,
    manifest: &Manifest,
    files: &[(String, PathBuf)],
) -> Result<(), StoreError> {
    let in_sync: Vec<ManifestFile> = manifest
        .files
        .iter()
        .filter(|f| files.iter().any(|(name, _)| name == &f.name))
        .cloned()
        .collect();
    super::lazy::note_published(local, &in_sync)
}

/// The publishable files in `local` that `wanted` selects, each checked
/// to be whole and this image's.
fn local_files(
    local: &Path,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let image = Image::open(local)?;
    let refused = |name: &str, why: String| StoreError::Refused {
        path: local.join(name),
        why,
    };
    let mut files = Vec::new();
    for e in Estimator::PREFERENCE {
        let name = format!("ws-{}.bin", e.name());
        if !wanted(&name) || !local.join(&name).is_file() {
            continue;
        }
        match WsFile::open(&image, e) {
            Ok(Some(_)) => files.push((name.clone(), local.join(&name))),
            Ok(None) => log::warn!("not publishing {name}: an older format"),
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
    Ok(files)
}

/// The length and xxh3 (hex) of the file at `path`.
fn digest_of(path: &Path) -> Result<(u64, String), StoreError> {
    let io = |context: &str| {
        let (path, context) = (path.to_path_buf(), context.to_string());
        move |source| StoreError::Io {
            path,
            context,
            source,
        }
    };
    let mut file = std::fs::File::open(path).map_err(io("cannot open"))?;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("cannot read"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, format!("{:016x}", hasher.digest())))
}
