//! Incremental images: an image whose page table says "as in my parent"
//! for the pages that did not change since the parent was taken, and the
//! one view of a whole chain that every reader gets from [`Image::open`].
//!
//! An incremental image (format version 3) names its parent in
//! `meta.json` (`parent`: the parent's path and identity) and marks each
//! inherited page with [`INHERIT`] in its page table; its own `pages.bin`
//! holds only the pages that changed. Opening it opens the parent (and so
//! the whole chain down to a full image), checks each parent's identity
//! and RAM layout, and resolves every guest page once to the layer and
//! slot that hold it: the view numbers the chain's live pages as slots in
//! page order, like a full image, so lookups stay O(1) and the restore
//! engine, working sets and recovery read a chain as they read one image.
//! A chain is verified page by page (every layer has page digests).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::source::PageSource;
use super::{direct, io_err, ImageError, PAGE_BYTES, PAGE_SIZE};
use crate::mem::usize_from;

/// Page-table entry of a page an incremental image inherits from its parent.
pub const INHERIT: u32 = u32::MAX;
/// Longest chain [`Image::open`](super::Image::open) follows (each image
/// below holds a few file descriptors while the chain opens).
pub const MAX_DEPTH: usize = 200;

/// An incremental image's parent, as `meta.json` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// The parent's directory when this image was written (absolute).
    pub path: PathBuf,
    /// The parent's identity ([`super::identity`]), in hex.
    pub identity: String,
}

/// One image file of a chain that the view reads from: a local file, or
/// an object in a store.
pub(crate) struct Layer {
    pub path: PathBuf,
    pub pages: Arc<dyn PageSource>,
    pub direct: Option<direct::DirectReader>,
}

impl Layer {
    /// The pages of one image, as its reader opened them.
    pub fn of(pages_path: &Path, pages: Arc<dyn PageSource>) -> Layer {
        Layer {
            direct: if pages.is_remote() {
                None
            } else {
                direct::DirectReader::open(pages_path)
            },
            pages,
            path: pages_path.to_owned(),
        }
    }
}

/// The resolved chain behind an incremental image's view.
pub(crate) struct Chain {
    /// The image's own `meta.json` (the view's counts are the chain's).
    pub own_meta: super::ImageMeta,
    /// The parent's directory, and how many images lie below this one.
    pub parent_dir: PathBuf,
    pub depth: usize,
    /// Base first, this image last.
    pub layers: Vec<Layer>,
    /// Per view slot: the layer and the slot in that layer's `pages.bin`.
    pub sources: Vec<(u16, u32)>,
}

impl Chain {
    /// Reads view slots `first..first + count` into `buf`, one `pread` per
    /// run of slots that lie next to each other in one layer, and verifies
    /// each page against `sums` (per view slot). `reverse` names the page
    /// of a view slot for errors.
    pub fn read_slots(
        &self,
        first: u32,
        count: u32,
        buf: &mut [u8],
        urgent: bool,
        sums: &[u64],
        reverse: &[u64],
    ) -> Result<usize, ImageError> {
        let (a, b) = (
            usize_from(u64::from(first)),
            usize_from(u64::from(first) + u64::from(count)),
        );
        let sources = self.sources.get(a..b).ok_or_else(|| ImageError::Damaged {
            path: self
                .layers
                .last()
                .map(|l| l.path.clone())
                .unwrap_or_default(),
            message: format!("view slots {a}..{b} outside the chain"),
        })?;
        let len = (b - a) * PAGE_BYTES;
        let mut i = 0;
        while i < sources.len() {
            let (layer, slot) = sources[i];
            let mut j = i + 1;
            while j < sources.len()
                && sources[j] == (layer, slot + u32::try_from(j - i).unwrap_or(u32::MAX))
            {
                j += 1;
            }
            let l = &self.layers[usize::from(layer)];
            let out = &mut buf[i * PAGE_BYTES..j * PAGE_BYTES];
            let at = u64::from(slot) * PAGE_SIZE;
            let done = !urgent
                && l.direct
                    .as_ref()
                    .is_some_and(|d| d.read(out, at).unwrap_or(false));
            if !done {
                l.pages
                    .read_exact_at(out, at, urgent)
                    .map_err(io_err(&l.path, "cannot read"))?;
            }
            i = j;
        }
        for (k, page) in buf[..len].chunks_exact(PAGE_BYTES).enumerate() {
            let expected = sums[a + k];
            let got = xxh3_64(page);
            if got != expected {
                let (layer, slot) = sources[k];
                return Err(ImageError::PageChecksum {
                    path: self.layers[usize::from(layer)].path.clone(),
                    slot,
                    page: reverse[a + k],
                    expected,
                    got,
                });
            }
        }
        Ok(len)
    }
}

/// Where an image's parent is: for an image restored from a store, the
/// image of the parent's identity next to it; else the path it recorded,
/// or, if nothing is there, a directory of the same name next to the
/// image (a chain moved or copied as a whole).
pub fn parent_dir(image_dir: &Path, parent: &ParentRef) -> PathBuf {
    // Images restored from a store are kept by identity, side by side:
    // there, the parent is the one that came from the store.
    if let Some(dir) = image_dir.parent() {
        let by_identity = dir.join(&parent.identity);
        if crate::store::pages::RemotePagesRef::read(image_dir).is_ok_and(|r| r.is_some())
            && by_identity.join("meta.json").exists()
        {
            return by_identity;
        }
    }
    if parent.path.join("meta.json").exists() {
        return parent.path.clone();
    }
    match (image_dir.parent(), parent.path.file_name()) {
        (Some(dir), Some(name)) if dir.join(name).join("meta.json").exists() => dir.join(name),
        _ => parent.path.clone(),
    }
}

/// Writes the view of `image` (a chain, or any image) into a new full
/// image at `out`: its device state and every page of the chain, so that
/// it no longer needs its parents. Working sets are not carried over (they
/// name the image they were made for).
pub fn merge(
    image: &super::Image,
    out: &Path,
    force: bool,
    progress: &dyn crate::progress::Progress,
) -> Result<super::ImageSummary, ImageError> {
    use std::io::Write;
    let meta = image.meta();
    let mut writer = super::ImageWriter::create(out, meta.layout.clone(), force)?;
    let state = image.read_device_state()?;
    let device = out.with_file_name("device.state");
    writer
        .device_state_file()?
        .write_all(&state)
        .map_err(io_err(&device, "cannot write"))?;
    let chunks =
        u32::try_from(meta.nonzero_pages.div_ceil(u64::from(meta.chunk_pages))).unwrap_or(u32::MAX);
    progress.start("merge", meta.nonzero_pages * PAGE_SIZE);
    let mut buf = vec![0u8; usize_from(u64::from(meta.chunk_pages) * PAGE_SIZE)];
    for c in 0..chunks {
        let n = image.read_chunks(c, 1, &mut buf)?;
        for (slot, page) in image.chunk_slots(c).zip(buf[..n].chunks_exact(PAGE_BYTES)) {
            writer.write_run(image.slot_page(slot), page)?;
        }
        progress.advance(n as u64);
    }
    progress.finish();
    let own = image.own_meta();
    writer.finish(super::ImageInfo {
        qemu_version: own.qemu_version.clone(),
        accel: own.accel.clone(),
        vm: own.vm.clone(),
        libvirt: own.libvirt.clone(),
    })
}
