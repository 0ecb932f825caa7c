//! Images in an S3-compatible object store: where an image lives
//! ([`Location`], [`StoreUrl`]), how thaw reaches the store
//! ([`settings`]), the client ([`client::Store`]), copying whole images
//! between a directory and the store ([`transfer`]), restoring straight
//! from it ([`lazy`], [`pages`], [`pace`]), saving into it while the image
//! is written ([`stream`]) and publishing what restores learned back to
//! it ([`publish`]).
//!
//! An image in a store is the files of its directory as objects under one
//! prefix (`s3://BUCKET/PREFIX/meta.json`, `…/pages.bin`, …) and a
//! manifest, [`transfer::MANIFEST`], uploaded last: it names every file
//! with its length and digest, so an image is visible only once it is
//! complete, and every byte read back is checked against it.

pub mod client;
pub mod lazy;
pub mod pace;
pub mod pages;
pub mod publish;
pub mod settings;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod transfer;

use std::fmt;
use std::path::{Path, PathBuf};

/// How a store URL starts.
pub const SCHEME: &str = "s3://";

/// Errors reaching or using an object store. They never hold credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{url}: not an image location in an object store: {why} (expected s3://BUCKET/PREFIX)"
    )]
    BadUrl { url: String, why: String },
    #[error("object store settings: {0}")]
    Settings(String),
    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{url}: no complete image there (no {manifest}: never pushed, or the upload did not finish)")]
    NoImage { url: String, manifest: &'static str },
    #[error("{url}: an image is already there (use --force to replace it)")]
    Exists { url: String },
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {why}")]
    Damaged { url: String, why: String },
    #[error("{url}: {name}: missing from the store")]
    Missing { url: String, name: String },
    #[error("{url}: {why}")]
    Conflict { url: String, why: String },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
}

/// An image's place in an object store: `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    pub bucket: String,
    /// Without leading or trailing `/`; never empty.
    pub prefix: String,
}

impl StoreUrl {
    /// Parses `s3://BUCKET/PREFIX` (a trailing `/` is dropped). The bucket
    /// follows S3's naming rules; the prefix has no empty, `.` or `..`
    /// segment.
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        let bad = |why: &str| StoreError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest
            .split_once('/')
            .ok_or_else(|| bad("no prefix after the bucket"))?;
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && bucket
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3 to 63 lowercase letters, digits, '.' or '-'",
            ));
        }
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        if prefix.is_empty() {
            return Err(bad("no prefix after the bucket"));
        }
        if prefix
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad("the prefix has an empty, '.' or '..' segment"));
        }
        if prefix.chars().any(char::is_control) {
            return Err(bad("the prefix has a control character"));
        }
        Ok(StoreUrl {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The object of the image's file `name`.
    pub fn object(&self, name: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{}/{name}", self.prefix))
    }

    /// The place named `name` next to this one (the same "directory" of
    /// the bucket): where an incremental image's parent is pushed.
    pub fn sibling(&self, name: &str) -> StoreUrl {
        let prefix = match self.prefix.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{name}"),
            None => name.to_string(),
        };
        StoreUrl {
            bucket: self.bucket.clone(),
            prefix,
        }
    }

    /// The image's prefix, for listing its objects.
    pub fn prefix_path(&self) -> object_store::path::Path {
        object_store::path::Path::from(self.prefix.as_str())
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.prefix)
    }
}

/// Where an image is: a directory, or a place in an object store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    Store(StoreUrl),
}

impl Location {
    /// `s3://…` is a store (and must parse); anything else a directory.
    pub fn parse(arg: &Path) -> Result<Location, StoreError> {
        match arg.to_str() {
            Some(s) if s.starts_with(SCHEME) => Ok(Location::Store(StoreUrl::parse(s)?)),
            _ => Ok(Location::Local(arg.to_path_buf())),
        }
    }
}
