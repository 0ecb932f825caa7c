//! Working sets: the guest pages a restore should install before the guest
//! runs, in the order the guest first touched them, and their on-disk form
//! inside an image, one file per estimator.
//!
//! # `ws-<estimator>.bin`, version 2
//!
//! Little endian. Written next to the image's other files, 0600, by writing
//! `ws-<estimator>.bin.tmp-<pid>`, syncing it and renaming it into place, so
//! a reader sees the old file or the new one, never a torn one.
//!
//! - header, 64 bytes: magic `THAWWS01`, format version u32, page size u32,
//!   estimator code u32 (1 learned, 2 trace, 3 abit, 4 dirty), reserved u32,
//!   entry count u64, data page count u64, update count u64 (how many
//!   restores refined it), total guest pages u64 (must match the image),
//!   image identity u64 ([`crate::image::Image::identity`]: the file
//!   belongs to that image only; another image's working set, even one
//!   with the same page count, is refused with [`WsError::ForeignImage`]);
//! - entries, 16 bytes each, in prefetch order: page number u64, idle u32
//!   (restores since the guest last touched it), flags u32 (bit 0: an
//!   all-zero page, which has no data);
//! - one xxh3-64 per data chunk of [`WS_CHUNK_PAGES`] data pages;
//! - xxh3-64 of everything before it;
//! - zero padding to a 4096-byte boundary, then the data: the non-zero
//!   entries' pages in entry order, so a prefetch is one sequential read.
//!
//! The page contents are copied from the image's `pages.bin` (verified) when
//! the file is written, so a working set always matches the image it is in.
//!
//! Version 1 had no image identity (bytes 56..64 were padding): such a file
//! is treated as absent, with a warning, and replaced by the next write.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::image::{Image, PageLocation};
use crate::mem::{u64_from, usize_from, PageIndex, PAGE_BYTES, PAGE_SIZE, PAGE_SIZE_U32};

const MAGIC: &[u8; 8] = b"THAWWS01";
/// The working-set file version this thaw writes and reads.
pub const WS_FORMAT_VERSION: u32 = 2;
/// Versions older than this are ignored (treated as absent).
const WS_OLDEST_IGNORED: u32 = 1;
/// Data pages per checksummed chunk.
pub const WS_CHUNK_PAGES: u64 = 16;
const HEADER_LEN: u64 = 64;
const ENTRY_LEN: u64 = 16;
const FLAG_ZERO: u32 = 1;
/// A learned page the guest did not touch in this many restores in a row is
/// dropped from the learned working set.
pub const LEARNED_DROP_AFTER: u32 = 3;
/// Bytes read per request while streaming a working set's data.
const READ_BYTES: u64 = 4 << 20;

pub mod evidence;

/// Where a working set came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// Recorded by earlier restores (first touches), refined on each.
    Learned,
    /// Traced right after a checkpoint (`thaw checkpoint`).
    Trace,
    /// Access-bit scanning of the running VM (`thaw track`).
    Abit,
    /// Write tracking of the running VM (dirty pages).
    Dirty,
}

impl Estimator {
    /// Every estimator, best first (the order `auto` tries them in).
    pub const PREFERENCE: [Estimator; 4] = [
        Estimator::Learned,
        Estimator::Trace,
        Estimator::Abit,
        Estimator::Dirty,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Estimator::Learned => "learned",
            Estimator::Trace => "trace",
            Estimator::Abit => "abit",
            Estimator::Dirty => "dirty",
        }
    }

    fn code(self) -> u32 {
        match self {
            Estimator::Learned => 1,
            Estimator::Trace => 2,
            Estimator::Abit => 3,
            Estimator::Dirty => 4,
        }
    }

    /// The name of the file that holds this estimator's working set in
    /// an image directory.
    pub fn file_name(self) -> String {
        format!("ws-{}.bin", self.name())
    }

    /// The file holding this estimator's working set in image `dir`.
    pub fn path_in(self, dir: &Path) -> PathBuf {
        dir.join(self.file_name())
    }
}

/// Errors reading or writing a working set.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: damaged working set: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error("{path} belongs to another image (image identity {found:016x}, this image is {expected:016x}); remove it")]
    ForeignImage {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
}

/// One page of a working set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsPage {
    pub page: PageIndex,
    /// Restores in a row in which the guest did not touch it.
    pub idle: u32,
}

/// A working set: pages in prefetch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSet {
    pub estimator: Estimator,
    pub pages: Vec<WsPage>,
    /// How many restores refined it (learned).
    pub updates: u64,
}

impl WorkingSet {
    /// A fresh working set from pages in first-touch order (duplicates
    /// after the first occurrence are dropped).
    pub fn from_touches(estimator: Estimator, touches: &[PageIndex]) -> WorkingSet {
        let mut seen = std::collections::HashSet::with_capacity(touches.len());
        let pages = touches
            .iter()
            .filter(|p| seen.insert(p.0))
            .map(|&page| WsPage { page, idle: 0 })
            .collect();
        WorkingSet {
            estimator,
            pages,
            updates: 0,
        }
    }

    /// The learned set after one more restore that touched `touches` (in
    /// first-touch order): those pages first, then the earlier pages the
    /// guest did not touch this time, one restore idler, dropped once idle
    /// [`LEARNED_DROP_AFTER`] times in a row.
    pub fn refine(&self, touches: &[PageIndex]) -> WorkingSet {
        let mut next = WorkingSet::from_touches(self.estimator, touches);
        let touched: std::collections::HashSet<u64> = next.pages.iter().map(|p| p.page.0).collect();
        next.pages.extend(
            self.pages
                .iter()
                .filter(|p| !touched.contains(&p.page.0))
                .map(|p| WsPage {
                    page: p.page,
                    idle: p.idle + 1,
                })
                .filter(|p| p.idle < LEARNED_DROP_AFTER),
        );
        next.updates = self.updates + 1;
        next
    }
}

fn io_err<'a>(
    path: &'a Path,
    context: &'static str,
) -> impl FnOnce(std::io::Error) -> WsError + 'a {
    move |source| WsError::Io {
        path: path.to_owned(),
        context,
        source,
    }
}

fn damaged(path: &Path, message: impl Into<String>) -> WsError {
    WsError::Damaged {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn meta_len(entries: u64, data_pages: u64) -> u64 {
    HEADER_LEN + entries * ENTRY_LEN + data_pages.div_ceil(WS_CHUNK_PAGES) * 8 + 8
}

fn data_offset(entries: u64, data_pages: u64) -> u64 {
    meta_len(entries, data_pages).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Writes `ws` into `image`'s directory, replacing the estimator's earlier
/// file atomically; page contents come from the image, verified. Pages
/// outside the image's layout are refused.
pub fn write(image: &Image, ws: &WorkingSet) -> Result<PathBuf, WsError> {
    let path = ws.estimator.path_in(image.dir());
    let tmp = path.with_extension(format!("bin.tmp-{}", std::process::id()));
    let result = write_to(image, ws, &tmp).and_then(|()| {
        std::fs::rename(&tmp, &path).map_err(io_err(&path, "cannot rename into place"))?;
        File::open(image.dir())
            .and_then(|d| d.sync_all())
            .map_err(io_err(image.dir(), "cannot sync"))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

fn write_to(image: &Image, ws: &WorkingSet, tmp: &Path) -> Result<(), WsError> {
    let total = image.meta().total_pages;
    let mut entries = Vec::with_capacity(ws.pages.len() * usize_from(ENTRY_LEN));
    let mut data_pages = 0u64;
    for p in &ws.pages {
        if p.page.0 >= total {
            return Err(damaged(
                tmp,
                format!("page {} is outside the image", p.page.0),
            ));
        }
        let zero = image.locate(p.page) == PageLocation::Zero;
        data_pages += u64::from(!zero);
        entries.extend_from_slice(&p.page.0.to_le_bytes());
        entries.extend_from_slice(&p.idle.to_le_bytes());
        entries.extend_from_slice(&(if zero { FLAG_ZERO } else { 0 }).to_le_bytes());
    }
    // Page data, in entry order, read chunk by chunk from the image.
    let mut data = Vec::with_capacity(usize_from(data_pages * PAGE_SIZE));
    let chunk_bytes = usize_from(u64::from(image.meta().chunk_pages) * PAGE_SIZE);
    let mut chunk = vec![0u8; chunk_bytes];
    let mut loaded: Option<u32> = None;
    for p in &ws.pages {
        if let PageLocation::Slot(slot) = image.locate(p.page) {
            let c = image.chunk_of(slot);
            if loaded != Some(c) {
                image.read_chunks(c, 1, &mut chunk)?;
                loaded = Some(c);
            }
            let off = usize_from(u64::from(slot - image.chunk_slots(c).start) * PAGE_SIZE);
            data.extend_from_slice(&chunk[off..off + PAGE_BYTES]);
        }
    }
    let mut head = Vec::with_capacity(usize_from(meta_len(u64_from(ws.pages.len()), data_pages)));
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&WS_FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&PAGE_SIZE_U32.to_le_bytes());
    head.extend_from_slice(&ws.estimator.code().to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&(ws.pages.len() as u64).to_le_bytes());
    head.extend_from_slice(&data_pages.to_le_bytes());
    head.extend_from_slice(&ws.updates.to_le_bytes());
    head.extend_from_slice(&total.to_le_bytes());
    head.extend_from_slice(&image.identity().to_le_bytes());
    head.resize(usize_from(HEADER_LEN), 0);
    head.extend_from_slice(&entries);
    for c in data.chunks(usize_from(WS_CHUNK_PAGES * PAGE_SIZE)) {
        head.extend_from_slice(&xxh3_64(c).to_le_bytes());
    }
    let sum = xxh3_64(&head);
    head.extend_from_slice(&sum.to_le_bytes());
    head.resize(
        usize_from(data_offset(u64_from(ws.pages.len()), data_pages)),
        0,
    );

    let _ = std::fs::remove_file(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)
        .map_err(io_err(tmp, "cannot create"))?;
    f.write_all(&head)
        .and_then(|()| f.write_all(&data))
        .and_then(|()| f.sync_all())
        .map_err(io_err(tmp, "cannot write"))
}

/// An opened, structurally verified working-set file; its page data is
/// verified chunk by chunk as it streams.
pub struct WsFile {
    path: PathBuf,
    file: File,
    pub set: WorkingSet,
    zero: Vec<bool>,
    data_pages: u64,
    sums: Vec<u64>,
    data_at: u64,
}

impl WsFile {
    /// Opens `estimator`'s working set in image `image`; `Ok(None)` when the
    /// image has none.
    pub fn open(image: &Image, estimator: Estimator) -> Result<Option<WsFile>, WsError> {
        let path = estimator.path_in(image.dir());
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, "cannot open")(e)),
        };
        let mut head = [0u8; usize_from(HEADER_LEN)];
        file.read_exact(&mut head)
            .map_err(io_err(&path, "cannot read the header"))?;
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or_default());
        if &head[..8] != MAGIC {
            return Err(damaged(&path, "bad magic"));
        }
        if (WS_OLDEST_IGNORED..WS_FORMAT_VERSION).contains(&u32_at(8)) {
            log::warn!(
                "{}: working-set format version {} (before image identities); ignoring it",
                path.display(),
                u32_at(8)
            );
            return Ok(None);
        }
        if u32_at(8) != WS_FORMAT_VERSION {
            return Err(damaged(
                &path,
                format!("format version {} is not {WS_FORMAT_VERSION}", u32_at(8)),
            ));
        }
        if u64::from(u32_at(12)) != PAGE_SIZE || u32_at(16) != estimator.code() {
            return Err(damaged(&path, "page size or estimator does not match"));
        }
        let (expected, found) = (image.identity(), u64_at(56));
        if found != expected {
            return Err(WsError::ForeignImage {
                path,
                expected,
                found,
            });
        }
        let (entries, data_pages, updates, total) =
            (u64_at(24), u64_at(32), u64_at(40), u64_at(48));
        if total != image.meta().total_pages || data_pages > entries || entries > total {
            return Err(damaged(&path, "counts do not fit the image"));
        }
        let len = file.metadata().map_err(io_err(&path, "cannot stat"))?.len();
        if len != data_offset(entries, data_pages) + data_pages * PAGE_SIZE {
            return Err(damaged(
                &path,
                format!("{len} bytes, not what its header says"),
            ));
        }
        let mut rest = vec![0u8; usize_from(meta_len(entries, data_pages) - HEADER_LEN)];
        file.read_exact(&mut rest)
            .map_err(io_err(&path, "cannot read the entries"))?;
        let (body, trailer) = rest.split_at(rest.len() - 8);
        let mut all = head.to_vec();
        all.extend_from_slice(body);
        if xxh3_64(&all).to_le_bytes() != trailer {
            return Err(damaged(&path, "entry table checksum mismatch"));
        }
        let (table, sums) = body.split_at(usize_from(entries * ENTRY_LEN));
        let mut pages = Vec::with_capacity(usize_from(entries));
        let mut zero = Vec::with_capacity(usize_from(entries));
        for e in table.chunks_exact(usize_from(ENTRY_LEN)) {
            let page = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
            let idle = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(e[12..16].try_into().unwrap_or_default());
            let is_zero = flags & FLAG_ZERO != 0;
            if page >= total || (image.locate(PageIndex(page)) == PageLocation::Zero) != is_zero {
                return Err(damaged(
                    &path,
                    format!("entry for page {page} does not match the image"),
                ));
            }
            pages.push(WsPage {
                page: PageIndex(page),
                idle,
            });
            zero.push(is_zero);
        }
        if zero.iter().filter(|z| !**z).count() as u64 != data_pages {
            return Err(damaged(&path, "data page count does not match the entries"));
        }
        let sums = sums
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Ok(Some(WsFile {
            path,
            file,
            set: WorkingSet {
                estimator,
                pages,
                updates,
            },
            zero,
            data_pages,
            sums,
            data_at: data_offset(entries, data_pages),
        }))
    }

    /// Number of pages with data (non-zero pages).
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Streams the data in large sequential reads, verifying every chunk
    /// before handing it on: `install(pages, data)` receives consecutive
    /// non-zero entries and their contents. Zero entries are skipped.
    pub fn stream(
        &self,
        limit: Option<&crate::image::throttle::Throttle>,
        install: impl FnMut(&[PageIndex], &[u8]) -> Result<(), WsError>,
    ) -> Result<u64, WsError> {
        self.stream_needed(limit, |_| true, install)
    }

    /// [`WsFile::stream`] that reads only the checksummed chunks holding
    /// at least one page `needed` accepts (e.g. pages an earlier set did
    /// not install). Returns the bytes read.
    pub fn stream_needed(
        &self,
        limit: Option<&crate::image::throttle::Throttle>,
        needed: impl Fn(PageIndex) -> bool,
        mut install: impl FnMut(&[PageIndex], &[u8]) -> Result<(), WsError>,
    ) -> Result<u64, WsError> {
        let chunk_pages = usize_from(WS_CHUNK_PAGES);
        let chunk_bytes = WS_CHUNK_PAGES * PAGE_SIZE;
        let per_read = usize_from((READ_BYTES / chunk_bytes).max(1));
        let data_pages: Vec<PageIndex> = self
            .set
            .pages
            .iter()
            .zip(&self.zero)
            .filter(|(_, z)| !**z)
            .map(|(p, _)| p.page)
            .collect();
        let chunks = data_pages.len().div_ceil(chunk_pages);
        let wanted = |c: usize| {
            data_pages[c * chunk_pages..((c + 1) * chunk_pages).min(data_pages.len())]
                .iter()
                .any(|&p| needed(p))
        };
        let mut buf =
            vec![0u8; usize_from(per_read as u64 * chunk_bytes).min(data_pages.len() * PAGE_BYTES)];
        let mut read = 0u64;
        let mut c = 0;
        while c < chunks {
            if !wanted(c) {
                c += 1;
                continue;
            }
            let mut end = c + 1;
            while end < chunks && end - c < per_read && wanted(end) {
                end += 1;
            }
            let (first, last) = (c * chunk_pages, (end * chunk_pages).min(data_pages.len()));
            let len = (last - first) * PAGE_BYTES;
            if let Some(t) = limit {
                t.take(len as u64);
            }
            self.file
                .read_exact_at(&mut buf[..len], self.data_at + u64_from(first) * PAGE_SIZE)
                .map_err(io_err(&self.path, "cannot read page data"))?;
            for (i, data) in buf[..len].chunks(usize_from(chunk_bytes)).enumerate() {
                let n = c + i;
                if self.sums.get(n) != Some(&xxh3_64(data)) {
                    return Err(damaged(
                        &self.path,
                        format!("data chunk {n} fails its checksum"),
                    ));
                }
            }
            install(&data_pages[first..last], &buf[..len])?;
            read += len as u64;
            c = end;
        }
        Ok(read)
    }
}

const ESTIMATE_MAGIC: &[u8; 8] = b"THAWEST1";

/// Where a running VM's tracker keeps its current estimate for `estimator`
/// (in the VM's runtime directory), for `thaw save` to pick up.
pub fn estimate_path(runtime_dir: &Path, estimator: Estimator) -> PathBuf {
    runtime_dir.join(format!("estimate-{}.bin", estimator.name()))
}

/// Replaces a tracker's estimate atomically: magic `THAWEST1`, page count
/// u64, the pages (u64 each, prefetch order), xxh3-64 of all before it.
pub fn write_estimate(path: &Path, pages: &[PageIndex]) -> Result<(), WsError> {
    let mut buf = Vec::with_capacity(24 + pages.len() * 8);
    buf.extend_from_slice(ESTIMATE_MAGIC);
    buf.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        buf.extend_from_slice(&p.0.to_le_bytes());
    }
    let sum = xxh3_64(&buf);
    buf.extend_from_slice(&sum.to_le_bytes());
    let tmp = path.with_extension("bin.tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&buf))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io_err(path, "cannot write the estimate"))
}

/// Reads a tracker's estimate; `Ok(None)` when there is none.
pub fn read_estimate(path: &Path, max_pages: u64) -> Result<Option<Vec<PageIndex>>, WsError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "cannot open")(e)),
    };
    // Checked before anything is read whole: no more entries than pages.
    let len = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
    if len > 24 + max_pages.saturating_mul(8) {
        return Err(damaged(path, "larger than an estimate of this VM can be"));
    }
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    std::io::Read::read_to_end(&mut file, &mut data).map_err(io_err(path, "cannot read"))?;
    if data.len() < 24 || &data[..8] != ESTIMATE_MAGIC {
        return Err(damaged(path, "not a thaw estimate"));
    }
    let n = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    if data.len() as u64 != 24 + n.saturating_mul(8) {
        return Err(damaged(path, "length does not match its count"));
    }
    let (body, sum) = data.split_at(data.len() - 8);
    if xxh3_64(body).to_le_bytes() != sum {
        return Err(damaged(path, "checksum mismatch"));
    }
    Ok(Some(
        body[16..]
            .chunks_exact(8)
            .map(|c| PageIndex(u64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
    ))
}

/// The best working set `image` has among `candidates` (in order).
pub fn open_best(image: &Image, candidates: &[Estimator]) -> Result<Option<WsFile>, WsError> {
    for &e in candidates {
        if let Some(f) = WsFile::open(image, e)? {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests;

/// One working set as `thaw inspect` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WsSummary {
    pub estimator: Estimator,
    pub pages: u64,
    pub data_pages: u64,
    pub bytes: u64,
    pub updates: u64,
    /// Pages shared with each other working set of the image.
    pub overlap: Vec<(Estimator, u64)>,
}

/// The working sets of an image, best first; damaged ones are reported as
/// errors in the list's place.
pub fn summarize(image: &Image) -> Vec<Result<WsSummary, WsError>> {
    let mut sets = Vec::new();
    for e in Estimator::PREFERENCE {
        match WsFile::open(image, e) {
            Ok(Some(f)) => sets.push(Ok(f)),
            Ok(None) => {}
            Err(err) => sets.push(Err(err)),
        }
    }
    let pages: Vec<(Estimator, std::collections::HashSet<u64>)> = sets
        .iter()
        .flatten()
        .map(|f| {
            (
                f.set.estimator,
                f.set.pages.iter().map(|p| p.page.0).collect(),
            )
        })
        .collect();
    sets.into_iter()
        .map(|f| {
            let f = f?;
            let mine = &pages
                .iter()
                .find(|(e, _)| *e == f.set.estimator)
                .map(|(_, p)| p.clone())
                .unwrap_or_default();
            Ok(WsSummary {
                estimator: f.set.estimator,
                pages: f.set.pages.len() as u64,
                data_pages: f.data_pages,
                bytes: f.data_pages * PAGE_SIZE,
                updates: f.set.updates,
                overlap: pages
                    .iter()
                    .filter(|(e, _)| *e != f.set.estimator)
                    .map(|(e, p)| (*e, mine.intersection(p).count() as u64))
                    .collect(),
            })
        })
        .collect()
}

impl std::fmt::Display for WsSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  working set {:<8} {:>8} pages ({} MiB of data), {} updates",
            self.estimator.name(),
            self.pages,
            self.bytes >> 20,
            self.updates
        )?;
        for (e, n) in &self.overlap {
            write!(f, "; {n} shared with {}", e.name())?;
        }
        Ok(())
    }
}
