//! `thaw bench --store s3://BUCKET/PREFIX`: every restore read from an
//! object store. The bench puts its image there (`PREFIX/thaw`, as `thaw
//! push` does) and stock QEMU's migration stream (`PREFIX/stock.mig`);
//! thaw's methods then restore straight from the store (metadata, device
//! state and working sets first, pages by ranged reads), and `stock`
//! downloads the stream (ranged reads in flight, as S3 tools do) before
//! `migrate-incoming`. Each restore starts from an empty local cache, so
//! everything it needs comes over the link.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thaw::image::source::Fetched;
use thaw::progress::Silent;
use thaw::store::client::Store;
use thaw::store::settings::StoreSettings;
use thaw::store::transfer::{self, ManifestFile};
use thaw::store::{StoreError, StoreUrl};

use super::BenchError;

/// The link to the store, as the harness shaped it (ci/store-link.sh):
/// only used to state the floors the results are compared with.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Link {
    /// Round-trip time (ms).
    pub rtt_ms: f64,
    /// Bytes per second each way.
    pub rate: u64,
}

/// `--store`, `--link-*` and `--learn-from-store`.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub url: StoreUrl,
    pub link: Option<Link>,
    /// The learning restore reads from the store and publishes there.
    pub learn_from_store: bool,
}

/// What the report says of the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreReport {
    pub url: String,
    pub link: Option<Link>,
    /// The image's bytes in the store, and the stock stream's.
    pub image_bytes: u64,
    pub stock_bytes: Option<u64>,
    /// The median time of a 4 KiB ranged GET of the pages with nothing
    /// else in flight (ms): the store's own round trip, the link's plus
    /// the time the proxy and the store take to answer.
    #[serde(default)]
    pub request_ms: Option<f64>,
    /// `--learn-from-store`: the learned set the measured restores
    /// prefetch was learned by a restore from the store and published.
    #[serde(default)]
    pub learned_from_store: Option<LearnedFromStore>,
}

/// The first host's restore that learned from the store and published.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LearnedFromStore {
    /// Pages in the learned set it published.
    pub pages: u64,
    /// Bytes it uploaded, and how long the publish took (ms).
    pub bytes: u64,
    pub publish_ms: f64,
}

/// Small reads that time one request to the store, one after another.
pub const REQUEST_PROBES: u64 = 16;

fn store_err(e: StoreError) -> BenchError {
    BenchError::Options(format!("object store: {e}"))
}

/// The image and the stock stream in the store, ready to restore from.
pub struct StoreSetup {
    store: Store,
    image_url: StoreUrl,
    stock: Option<(StoreUrl, ManifestFile)>,
    /// The local cache of restores straight from the store (emptied
    /// before each).
    cache: PathBuf,
    pub report: StoreReport,
}

impl StoreSetup {
    /// Puts `image` (and `stock_file`) under the options' URL.
    pub async fn upload(
        opts: &StoreOptions,
        image: &Path,
        stock_file: Option<&Path>,
        dir: &Path,
    ) -> Result<StoreSetup, BenchError> {
        let settings = StoreSettings::from_environment().map_err(store_err)?;
        let store = Store::connect(&settings, &opts.url.bucket).map_err(store_err)?;
        let child = |name: &str| StoreUrl::parse(&format!("{}/{name}", opts.url));
        let image_url = child("thaw").map_err(store_err)?;
        log::info!("pushing the image to {image_url}");
        let pushed = transfer::push(&store, image, &image_url, true, &Silent)
            .await
            .map_err(store_err)?;
        let request_ms = request_time(&store, &image_url).await?;
        log::info!("a small read from the store takes {request_ms:.1} ms");
        let stock = match stock_file {
            Some(file) => {
                let url = child("stock").map_err(store_err)?;
                log::info!("uploading the stock stream to {url}");
                let f = transfer::upload_file(&store, file, &url, "stock.mig", &Silent)
                    .await
                    .map_err(store_err)?;
                Some((url, f))
            }
            None => None,
        };
        Ok(StoreSetup {
            report: StoreReport {
                url: opts.url.to_string(),
                link: opts.link,
                image_bytes: pushed.bytes,
                request_ms: Some(request_ms),
                stock_bytes: stock.as_ref().map(|(_, f)| f.len),
                learned_from_store: None,
            },
            store,
            image_url,
            stock,
            cache: dir.join("store-cache"),
        })
    }

    /// A cold start: the local part of the image fetched again from the
    /// store. Returns its directory and what was fetched.
    pub async fn prepare_image(
        &self,
        sets: &thaw::store::lazy::WorkingSets,
    ) -> Result<(PathBuf, Fetched), BenchError> {
        remove_dir(&self.cache)?;
        let prepared =
            thaw::store::lazy::prepare(&self.store, &self.image_url, &self.cache, sets, &Silent)
                .await
                .map_err(store_err)?;
        Ok((prepared.dir, prepared.fetched))
    }

    /// Publishes the learned set (of `pages` pages) and evidence of the
    /// image prepared in `dir` to the image in the store.
    pub async fn publish_learned(&mut self, dir: &Path, pages: u64) -> Result<(), BenchError> {
        if pages == 0 {
            return Err(BenchError::Options(
                "the restore from the store learned no working set".into(),
            ));
        }
        let published = thaw::store::publish::publish(
            &self.store,
            &self.image_url,
            dir,
            &|name| {
                name == thaw::wss::Estimator::Learned.file_name()
                    || name == thaw::wss::evidence::FILE
            },
            &Silent,
        )
        .await
        .map_err(store_err)?;
        log::info!("{published}");
        self.report.learned_from_store = Some(LearnedFromStore {
            pages,
            bytes: published.bytes,
            publish_ms: published.seconds * 1000.0,
        });
        Ok(())
    }

    /// Downloads the stock stream to `dest` (verified against its
    /// digest), as a stock restore from a store must before QEMU loads it.
    pub async fn download_stock(&self, dest: &Path) -> Result<Fetched, BenchError> {
        let (url, file) = self
            .stock
            .as_ref()
            .ok_or_else(|| BenchError::Options("no stock stream in the store".into()))?;
        match std::fs::remove_file(dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(super::io(format!("removing {}", dest.display()))(e)),
        }
        let before = self.store.fetched();
        transfer::download_file(&self.store, url, file, dest, &Silent)
            .await
            .map_err(store_err)?;
        let after = self.store.fetched();
        Ok(Fetched {
            requests: after.requests - before.requests,
            bytes: after.bytes - before.bytes,
        })
    }
}

fn remove_dir(dir: &Path) -> Result<(), BenchError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(super::io(format!("removing {}", dir.display()))(e)),
    }
}

/// The median time (ms) of [`REQUEST_PROBES`] 4 KiB ranged GETs of the
/// image's pages, spread over them, one at a time.
async fn request_time(store: &Store, image: &StoreUrl) -> Result<f64, BenchError> {
    const READ: u64 = 4096;
    let object = image.object("pages.bin");
    let len = store
        .head(&object)
        .await
        .map_err(store_err)?
        .ok_or_else(|| BenchError::Options(format!("{image}: no pages.bin after the push")))?
        .size;
    if len < READ {
        return Err(BenchError::Options(format!(
            "{image}: pages.bin holds no page"
        )));
    }
    let span = len - READ + 1;
    let mut times = Vec::new();
    for i in 0..REQUEST_PROBES {
        let at = (span / REQUEST_PROBES * i) / READ * READ;
        let t = std::time::Instant::now();
        store
            .get_range(&object, at..at + READ)
            .await
            .map_err(store_err)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    super::ttr::median(times).ok_or_else(|| BenchError::Options("no request timed".into()))
}
