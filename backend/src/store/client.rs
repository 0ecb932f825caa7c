//! The object store client: one bucket of an S3-compatible store through
//! the `object_store` crate (Apache Arrow's: one trait over S3 and other
//! stores, ranged and coalesced reads, parallel multipart uploads, retries
//! with backoff, all async on tokio), with thaw's timeouts and retries.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

use super::settings::StoreSettings;
use super::StoreError;
use crate::image::source::Fetched;

/// How long requests may take, and how often a failed one is retried.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// One request: a part of an upload, a ranged read.
    pub request: Duration,
    pub retries: usize,
    /// How long one request is retried at most.
    pub retry_for: Duration,
}

impl Timeouts {
    /// Uploads and downloads of whole images.
    pub const BULK: Timeouts = Timeouts {
        connect: Duration::from_secs(5),
        request: Duration::from_secs(120),
        // With the backoff below (0.1 s doubling, at most 5 s) a store
        // that answers 5xx for a while is retried for about half a minute.
        retries: 10,
        retry_for: Duration::from_secs(60),
    };
    /// Reads a running guest waits on (a restore from the store): short,
    /// so that a store gone away stops the VM with an error in seconds
    /// instead of holding a fault for minutes.
    pub const FAULT: Timeouts = Timeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_secs(10),
        retries: 3,
        retry_for: Duration::from_secs(15),
    };
}

/// One bucket of a store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    /// Reads sent through this client (and its clones) and the bytes
    /// they brought.
    reads: Arc<ReadCounts>,
}

#[derive(Default)]
struct ReadCounts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl ReadCounts {
    fn count(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Store {
    /// A client of `bucket` with `settings` for whole-image transfers.
    /// Nothing is sent yet.
    pub fn connect(settings: &StoreSettings, bucket: &str) -> Result<Store, StoreError> {
        Store::connect_with(settings, bucket, Timeouts::BULK)
    }

    /// A client of `bucket` with `settings` and `timeouts`.
    pub fn connect_with(
        settings: &StoreSettings,
        bucket: &str,
        timeouts: Timeouts,
    ) -> Result<Store, StoreError> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(settings.secret_access_key.expose())
            // Path-style requests: what S3-compatible servers all take.
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(timeouts.connect)
                    .with_timeout(timeouts.request)
                    .with_allow_http(
                        settings
                            .endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    ),
            )
            .with_retry(RetryConfig {
                max_retries: timeouts.retries,
                retry_timeout: timeouts.retry_for,
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
            });
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token.expose());
        }
        let inner = builder.build().map_err(|source| StoreError::Store {
            what: format!(
                "setting up the client of bucket {bucket} ({})",
                settings.source
            ),
            source,
        })?;
        Ok(Store {
            inner: Arc::new(inner),
            bucket: bucket.to_string(),
            reads: Arc::default(),
        })
    }

    /// The reads (lookups, whole and ranged GETs) sent so far through this
    /// client and its clones, and the bytes they brought; retries inside
    /// one read are not counted apart.
    pub fn fetched(&self) -> Fetched {
        Fetched {
            requests: self.reads.requests.load(Ordering::Relaxed),
            bytes: self.reads.bytes.load(Ordering::Relaxed),
        }
    }

    /// The `object_store` client itself.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn failed(
        &self,
        what: &str,
        path: &ObjectPath,
    ) -> impl FnOnce(object_store::Error) -> StoreError {
        let what = format!("{what} s3://{}/{path}", self.bucket);
        move |source| StoreError::Store { what, source }
    }

    /// The object's size and version, `None` if it does not exist.
    pub async fn head(&self, path: &ObjectPath) -> Result<Option<ObjectMeta>, StoreError> {
        self.reads.count(0);
        match self.inner.head(path).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed("looking up", path)(e)),
        }
    }

    /// The whole object, `None` if it does not exist.
    pub async fn get(&self, path: &ObjectPath) -> Result<Option<Bytes>, StoreError> {
        Ok(self.get_with_meta(path).await?.map(|(data, _)| data))
    }

    /// The whole object and what the store says of it (its version and
    /// when it was written), `None` if it does not exist.
    pub async fn get_with_meta(
        &self,
        path: &ObjectPath,
    ) -> Result<Option<(Bytes, ObjectMeta)>, StoreError> {
        let result = match self.inner.get(path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.failed("reading", path)(e)),
        };
        let meta = result.meta.clone();
        let data = result.bytes().await.map_err(self.failed("reading", path))?;
        self.reads.count(data.len() as u64);
        Ok(Some((data, meta)))
    }

    /// Bytes `range` of the object.
    pub async fn get_range(
        &self,
        path: &ObjectPath,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        self.get_range_timed(path, range)
            .await
            .map(|(data, _)| data)
    }

    /// Bytes `range` of the object, and how long its first byte took
    /// (the request's round trip with whatever queued ahead of its reply).
    pub async fn get_range_timed(
        &self,
        path: &ObjectPath,
        range: Range<u64>,
    ) -> Result<(Bytes, Duration), StoreError> {
        let started = Instant::now();
        let options = GetOptions::new().with_range(Some(range));
        let reply = self
            .inner
            .get_opts(path, options)
            .await
            .map_err(self.failed("reading", path))?;
        let first_byte = started.elapsed();
        let data = reply.bytes().await.map_err(self.failed("reading", path))?;
        self.reads.count(data.len() as u64);
        Ok((data, first_byte))
    }

    /// Writes the object whole, in one request.
    pub async fn put(&self, path: &ObjectPath, data: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(path, PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(self.failed("writing", path))
    }

    /// Writes the object whole if it is still the version `read` describes
    /// (`If-Match` on its ETag); `false` if another writer replaced or
    /// removed it first. A store that ignores the condition overwrites it
    /// (read it back to know).
    pub async fn put_if(
        &self,
        path: &ObjectPath,
        data: Bytes,
        read: &ObjectMeta,
    ) -> Result<bool, StoreError> {
        let version = UpdateVersion {
            e_tag: read.e_tag.clone(),
            version: read.version.clone(),
        };
        if version.e_tag.is_none() {
            // Nothing to match on: write, and let the read-back tell.
            log::debug!(
                "s3://{}/{path}: no ETag to write it conditionally",
                self.bucket
            );
            return self.put(path, data).await.map(|()| true);
        }
        let options = PutOptions::from(PutMode::Update(version));
        match self
            .inner
            .put_opts(path, PutPayload::from(data), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.failed("writing", path)(e)),
        }
    }

    /// Removes the object (gone already is fine).
    pub async fn delete(&self, path: &ObjectPath) -> Result<(), StoreError> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("removing", path)(e)),
        }
    }

    /// The objects right under `prefix` (not in deeper "directories").
    pub async fn list_children(&self, prefix: &ObjectPath) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner
            .list_with_delimiter(Some(prefix))
            .await
            .map(|l| l.objects)
            .map_err(self.failed("listing", prefix))
    }
}
