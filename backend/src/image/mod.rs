//! The thaw image format: writer, verifying reader and `inspect`.
//!
//! # Format, version 2
//!
//! An image is a directory (mode 0700) of files (mode 0600):
//!
//! - `meta.json`: [`ImageMeta`]: `format_version`, `thaw_version`,
//!   `created_unix`, `qemu_version`, `accel`, `vm` (the VM config), `layout`
//!   (RAM blocks: id, size, first global page), `page_size` (4096),
//!   `chunk_pages`, `total_pages`, `nonzero_pages`, and a digest (length and
//!   xxh3-64 in hex) of each of the other three files.
//! - `device.state`: QEMU's migration stream without guest RAM
//!   (`x-ignore-shared`), written by QEMU through a file descriptor.
//! - `pages.bin`: the non-zero guest pages, in increasing page order; the
//!   page in slot `s` is at byte `s * 4096`. Slots form chunks of
//!   `chunk_pages` consecutive slots (the last may be short), each with an
//!   xxh3-64 checksum.
//! - `index.bin`, little endian: a 64-byte header (magic `THAWIDX1`, format
//!   version u32, page size u32, total pages u64, non-zero pages u64, chunk
//!   pages u32, chunk count u64, zero padding); the page table, one u32 per
//!   guest page (0 = all-zero page, else slot + 1), which answers "where is
//!   page N" in O(1); one u64 checksum per chunk; one u64 xxh3-64 per slot
//!   (the page digests, since version 2: a fault reads and verifies its own
//!   page without its chunk); and a trailing u64 xxh3-64 of everything
//!   before it.
//!
//! Version 1 is version 2 without the page digests; thaw still reads it
//! (faults and the fill then read whole chunks).
//!
//! Version 3 is an incremental image ([`chain`]): version 2 plus a
//! `parent` in `meta.json` (the parent's path and identity) and page-table
//! entries [`chain::INHERIT`] (`0xffffffff`) for pages as they are in the
//! parent. Full images are still written as version 2.
//!
//! A writer builds the image in `<image>.partial-<pid>` and renames it into
//! place once every file is synced, so an image either is complete or does
//! not exist.
//!
//! A reader checks every file's size before it reads one whole: `meta.json`
//! must be at most [`MAX_META_BYTES`], `index.bin` exactly what
//! `total_pages` and `nonzero_pages` imply, `device.state` what its digest
//! says.
//!
//! An image's identity ([`Image::identity`]) is an xxh3-64 of its digests
//! and creation time: working-set files carry it, so one image's working
//! set is never taken for another's.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::config::VmConfig;
use crate::mem::{usize_from, PageIndex, RamLayout, PAGE_BYTES, PAGE_SIZE, PAGE_SIZE_U32};

/// The newest format version this thaw reads (incremental images).
pub const FORMAT_VERSION: u32 = 3;
/// The format version of a full image.
pub const FULL_FORMAT_VERSION: u32 = 2;
/// The oldest format version this thaw reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The first format version with per-page digests.
const PAGE_SUMS_VERSION: u32 = 2;
/// Default pages per checksummed chunk (64 KiB).
pub const DEFAULT_CHUNK_PAGES: u32 = 16;
const INDEX_MAGIC: &[u8; 8] = b"THAWIDX1";
const HEADER_LEN: usize = 64;
/// Largest `meta.json` a reader accepts (a real one is a few KiB).
pub const MAX_META_BYTES: u64 = 1 << 20;

/// Errors reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: &'static str,
        source: std::io::Error,
    },
    #[error("{path} is not a thaw image: {why}")]
    NotAnImage { path: PathBuf, why: &'static str },
    #[error("image {0} already exists (use --force to replace it)")]
    Exists(PathBuf),
    #[error("{0} is a symbolic link; thaw writes images only to real paths: remove it or save elsewhere")]
    Symlink(PathBuf),
    #[error("{path}: invalid metadata: {message}")]
    Meta { path: PathBuf, message: String },
    #[error("{path}: made by a newer thaw (format version {found}, this thaw reads {FORMAT_VERSION}); upgrade thaw")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error("{path}: chunk {chunk} (pages.bin bytes {offset}..{end}) fails its checksum: expected {expected:016x}, got {got:016x}")]
    ChunkChecksum {
        path: PathBuf,
        chunk: u32,
        offset: u64,
        end: u64,
        expected: u64,
        got: u64,
    },
    #[error("{path}: the page in slot {slot} (guest page {page}) fails its checksum: expected {expected:016x}, got {got:016x}")]
    PageChecksum {
        path: PathBuf,
        slot: u32,
        page: u64,
        expected: u64,
        got: u64,
    },
    #[error("pages must be written in increasing order: page {got} after {last}")]
    OutOfOrder { last: u64, got: u64 },
    #[error("page {0} is outside the RAM layout")]
    OutOfRange(u64),
    #[error("{path}: its pages are in an object store: {message}")]
    RemotePages { path: PathBuf, message: String },
    #[error("{image} is an incremental image whose parent {parent} {why}")]
    Parent {
        image: PathBuf,
        parent: PathBuf,
        why: String,
    },
}

fn io_err<'a>(
    path: &'a Path,
    context: &'static str,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.to_owned(),
        context,
        source,
    }
}

/// Length and xxh3-64 of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub len: u64,
    pub xxh3: String,
}

/// `meta.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageMeta {
    pub format_version: u32,
    pub thaw_version: String,
    pub created_unix: u64,
    pub qemu_version: String,
    pub accel: String,
    pub vm: VmConfig,
    pub layout: RamLayout,
    pub page_size: u64,
    pub chunk_pages: u32,
    pub total_pages: u64,
    pub nonzero_pages: u64,
    pub device_state: Digest,
    pub pages: Digest,
    pub index: Digest,
    /// Set for an image of a libvirt domain: `thaw restore` brings the
    /// domain back under libvirt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::vmm::libvirt::LibvirtImage>,
    /// An incremental image's parent (format version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<chain::ParentRef>,
}

/// What the saver knows that the writer does not.
pub struct ImageInfo {
    pub qemu_version: String,
    pub accel: String,
    pub vm: VmConfig,
    pub libvirt: Option<crate::vmm::libvirt::LibvirtImage>,
}

/// Where a page's saved content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageLocation {
    /// All zero: not stored.
    Zero,
    /// In `pages.bin` at slot * 4096.
    Slot(u32),
}

fn create_file(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path, "cannot create"))
}

fn digest_file(path: &Path) -> Result<Digest, ImageError> {
    let mut f = File::open(path).map_err(io_err(path, "cannot open"))?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path, "cannot read"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok(Digest {
        len,
        xxh3: format!("{:016x}", h.digest()),
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds an image; dropped unfinished, it removes what it wrote.
pub struct ImageWriter {
    target: PathBuf,
    dir: PathBuf,
    force: bool,
    layout: RamLayout,
    table: Vec<u32>,
    pages: BufWriter<File>,
    chunk_sums: Vec<u64>,
    page_sums: Vec<u64>,
    chunk_hasher: Xxh3,
    in_chunk: u32,
    chunk_pages: u32,
    slots: u32,
    next_page: u64,
    finished: bool,
    /// An incremental image: its parent, and per guest page the digest of
    /// the parent's content there.
    parent: Option<(chain::ParentRef, Vec<u64>)>,
    inherited: u64,
}

/// What a finished image holds.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    pub nonzero_pages: u64,
    pub total_pages: u64,
    /// Pages an incremental image takes from its parent unchanged.
    pub inherited_pages: u64,
}

impl ImageWriter {
    /// Starts an image that will appear at `target` when finished.
    pub fn create(
        target: &Path,
        layout: RamLayout,
        force: bool,
    ) -> Result<ImageWriter, ImageError> {
        match fs::symlink_metadata(target) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ImageError::Symlink(target.to_owned()))
            }
            Ok(_) if !force => return Err(ImageError::Exists(target.to_owned())),
            _ => {}
        }
        let name = target.file_name().ok_or_else(|| ImageError::Meta {
            path: target.to_owned(),
            message: "the image path needs a final component".into(),
        })?;
        let dir = partial_dir(target, name);
        let _ = fs::remove_dir_all(&dir);
        remove_stale_partials(target, name);
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir, "cannot create image directory"))?;
        let pages = match create_file(&dir.join("pages.bin")) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let total = usize_from(layout.total_pages());
        Ok(ImageWriter {
            target: target.to_owned(),
            dir,
            force,
            layout,
            table: vec![0; total],
            pages: BufWriter::with_capacity(4 << 20, pages),
            chunk_sums: Vec::new(),
            page_sums: Vec::new(),
            chunk_hasher: Xxh3::new(),
            in_chunk: 0,
            chunk_pages: DEFAULT_CHUNK_PAGES,
            slots: 0,
            next_page: 0,
            finished: false,
            parent: None,
            inherited: 0,
        })
    }

    /// Makes this an incremental image of `parent` (which must have the
    /// same RAM layout): a page written with the same content as the
    /// parent's is stored as inherited, not again.
    pub fn set_parent(&mut self, parent: &Image) -> Result<(), ImageError> {
        let target = fs::canonicalize(&self.target).ok();
        if target.is_some()
            && parent
                .chain_dirs()
                .iter()
                .any(|d| fs::canonicalize(d).ok() == target)
        {
            return Err(ImageError::Parent {
                image: self.target.clone(),
                parent: parent.dir().to_owned(),
                why: "would be replaced by its own child: write the new image elsewhere".into(),
            });
        }
        if parent.meta().layout != self.layout {
            return Err(ImageError::Parent {
                image: self.target.clone(),
                parent: parent.dir().to_owned(),
                why: "has another RAM layout".into(),
            });
        }
        if !parent.has_page_sums() {
            return Err(ImageError::Parent {
                image: self.target.clone(),
                parent: parent.dir().to_owned(),
                why: "is a format version 1 image, without page digests: save a full image first"
                    .into(),
            });
        }
        let path =
            fs::canonicalize(parent.dir()).map_err(io_err(parent.dir(), "cannot resolve"))?;
        let zero = xxh3_64(&[0u8; PAGE_BYTES]);
        let sums = (0..self.layout.total_pages())
            .map(|p| match parent.locate(PageIndex(p)) {
                PageLocation::Zero => zero,
                PageLocation::Slot(s) => parent.page_sums[s as usize],
            })
            .collect();
        let identity = format!("{:016x}", parent.identity());
        self.parent = Some((chain::ParentRef { path, identity }, sums));
        Ok(())
    }

    /// The (empty) `device.state` file, for QEMU to write through an fd.
    pub fn device_state_file(&mut self) -> Result<File, ImageError> {
        create_file(&self.dir.join("device.state"))
    }

    /// An unnamed private file in the partial image's directory (same file
    /// system, so a full disk shows there too); it disappears when closed,
    /// also if thaw dies.
    pub fn scratch_file(&self) -> Result<File, ImageError> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(&self.dir)
            .map_err(io_err(&self.dir, "cannot create a scratch file in"))
    }

    /// Adds a run of whole pages starting at `first`; all-zero pages are dropped.
    pub fn write_run(&mut self, first: PageIndex, data: &[u8]) -> Result<(), ImageError> {
        if first.0 < self.next_page {
            return Err(ImageError::OutOfOrder {
                last: self.next_page,
                got: first.0,
            });
        }
        let pages = data.len() as u64 / PAGE_SIZE;
        if first.0 + pages > self.table.len() as u64 {
            return Err(ImageError::OutOfRange(first.0 + pages));
        }
        let path = self.dir.join("pages.bin");
        for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
            if is_zero(page) {
                continue;
            }
            let sum = xxh3_64(page);
            if let Some((_, parent)) = &self.parent {
                if parent[usize_from(first.0) + i] == sum {
                    self.table[usize_from(first.0) + i] = chain::INHERIT;
                    self.inherited += 1;
                    continue;
                }
            }
            self.pages
                .write_all(page)
                .map_err(io_err(&path, "cannot write"))?;
            self.chunk_hasher.update(page);
            self.page_sums.push(sum);
            self.table[usize_from(first.0) + i] = self.slots + 1;
            self.slots += 1;
            self.in_chunk += 1;
            if self.in_chunk == self.chunk_pages {
                self.close_chunk();
            }
        }
        self.next_page = first.0 + pages;
        Ok(())
    }

    fn close_chunk(&mut self) {
        self.chunk_sums.push(self.chunk_hasher.digest());
        self.chunk_hasher.reset();
        self.in_chunk = 0;
    }

    /// Writes the index and metadata, syncs everything and moves the image into place.
    pub fn finish(mut self, info: ImageInfo) -> Result<ImageSummary, ImageError> {
        if self.in_chunk > 0 {
            self.close_chunk();
        }
        let pages_path = self.dir.join("pages.bin");
        self.pages
            .flush()
            .map_err(io_err(&pages_path, "cannot write"))?;
        self.pages
            .get_ref()
            .sync_all()
            .map_err(io_err(&pages_path, "cannot sync"))?;
        crate::failpoint::check("image-finish").map_err(io_err(&pages_path, "finishing"))?;

        let index_path = self.dir.join("index.bin");
        let mut index = Vec::with_capacity(
            HEADER_LEN
                + self.table.len() * 4
                + (self.chunk_sums.len() + self.page_sums.len()) * 8
                + 8,
        );
        let (version, parent) = match self.parent.take() {
            Some((parent, _)) => (FORMAT_VERSION, Some(parent)),
            None => (FULL_FORMAT_VERSION, None),
        };
        index.extend_from_slice(INDEX_MAGIC);
        index.extend_from_slice(&version.to_le_bytes());
        index.extend_from_slice(&PAGE_SIZE_U32.to_le_bytes());
        index.extend_from_slice(&(self.table.len() as u64).to_le_bytes());
        index.extend_from_slice(&u64::from(self.slots).to_le_bytes());
        index.extend_from_slice(&self.chunk_pages.to_le_bytes());
        index.extend_from_slice(&(self.chunk_sums.len() as u64).to_le_bytes());
        index.resize(HEADER_LEN, 0);
        for e in &self.table {
            index.extend_from_slice(&e.to_le_bytes());
        }
        for s in self.chunk_sums.iter().chain(&self.page_sums) {
            index.extend_from_slice(&s.to_le_bytes());
        }
        let trailer = xxh3_64(&index);
        index.extend_from_slice(&trailer.to_le_bytes());
        let mut f = create_file(&index_path)?;
        f.write_all(&index)
            .map_err(io_err(&index_path, "cannot write"))?;
        f.sync_all().map_err(io_err(&index_path, "cannot sync"))?;

        let dev_path = self.dir.join("device.state");
        File::open(&dev_path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&dev_path, "cannot sync"))?;
        let meta = ImageMeta {
            format_version: version,
            thaw_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix: unix_now(),
            qemu_version: info.qemu_version,
            accel: info.accel,
            vm: info.vm,
            libvirt: info.libvirt,
            parent,
            layout: self.layout.clone(),
            page_size: PAGE_SIZE,
            chunk_pages: self.chunk_pages,
            total_pages: self.table.len() as u64,
            nonzero_pages: u64::from(self.slots),
            device_state: digest_file(&dev_path)?,
            pages: digest_file(&pages_path)?,
            index: Digest {
                len: index.len() as u64,
                xxh3: format!("{:016x}", xxh3_64(&index)),
            },
        };
        let meta_path = self.dir.join("meta.json");
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Meta {
            path: meta_path.clone(),
            message: e.to_string(),
        })?;
        let mut f = create_file(&meta_path)?;
        f.write_all(&text)
            .map_err(io_err(&meta_path, "cannot write"))?;
        f.sync_all().map_err(io_err(&meta_path, "cannot sync"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir, "cannot sync"))?;

        if self.force && fs::symlink_metadata(&self.target).is_ok() {
            let old = self
                .target
                .with_extension(format!("old-{}", std::process::id()));
            fs::rename(&self.target, &old).map_err(io_err(&self.target, "cannot replace"))?;
            fs::rename(&self.dir, &self.target)
                .map_err(io_err(&self.target, "cannot move into place"))?;
            let _ = fs::remove_dir_all(&old).or_else(|_| fs::remove_file(&old));
        } else {
            fs::rename(&self.dir, &self.target)
                .map_err(io_err(&self.target, "cannot move into place"))?;
        }
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        self.finished = true;
        Ok(ImageSummary {
            nonzero_pages: meta.nonzero_pages,
            total_pages: meta.total_pages,
            inherited_pages: self.inherited,
        })
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                log::warn!("cannot remove partial image {}: {e}", self.dir.display());
            }
        }
    }
}

/// Removes the partial images of `target` that writers which died without
/// cleaning up (SIGKILL, a crash) left: `<name>.partial-<pid>` of a pid
/// that no longer runs.
fn remove_stale_partials(target: &Path, name: &std::ffi::OsStr) {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let mut prefix = name.to_os_string();
    prefix.push(".partial-");
    let prefix = prefix.to_string_lossy().into_owned();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        match fs::remove_dir_all(&path) {
            Ok(()) => log::info!("removed {} (left by a writer that died)", path.display()),
            Err(e) => log::warn!("cannot remove stale partial image {}: {e}", path.display()),
        }
    }
}

/// Whether a page is all zero bytes (word by word).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to handles alignment.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// What `meta.json` promises that the rest of the image relies on: page
/// size, chunk size, a sound RAM layout that matches the page counts.
pub fn check_meta(meta: &ImageMeta) -> Result<(), String> {
    if meta.page_size != PAGE_SIZE {
        return Err(format!("page size {} is not {PAGE_SIZE}", meta.page_size));
    }
    if meta.chunk_pages == 0 {
        return Err("chunk_pages is 0".into());
    }
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&meta.format_version) {
        return Err(format!(
            "format version {} is not one this thaw reads ({OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
            meta.format_version
        ));
    }
    if (meta.format_version >= FORMAT_VERSION) != meta.parent.is_some() {
        return Err(format!(
            "format version {} {} a parent",
            meta.format_version,
            if meta.parent.is_some() {
                "cannot have"
            } else {
                "needs"
            }
        ));
    }
    meta.layout.check()?;
    if meta.total_pages != meta.layout.total_pages() {
        return Err(format!(
            "total_pages {} does not match the RAM layout's {}",
            meta.total_pages,
            meta.layout.total_pages()
        ));
    }
    if meta.nonzero_pages > meta.total_pages || meta.nonzero_pages > u64::from(u32::MAX - 1) {
        return Err(format!(
            "{} non-zero pages of {} is impossible",
            meta.nonzero_pages, meta.total_pages
        ));
    }
    Ok(())
}

/// Checksummed chunks of `pages.bin` that `meta` implies.
fn chunk_count(meta: &ImageMeta) -> u64 {
    meta.nonzero_pages
        .div_ceil(u64::from(meta.chunk_pages.max(1)))
}

/// Whether an image of `meta`'s format version has per-page digests.
fn has_page_sums(meta: &ImageMeta) -> bool {
    meta.format_version >= PAGE_SUMS_VERSION
}

/// The exact length of `index.bin` that `meta` implies (header, one u32
/// per page, one u64 per chunk, one u64 per slot from version 2 on,
/// trailer); `None` if it overflows.
pub fn index_len(meta: &ImageMeta) -> Option<u64> {
    let page_sums = if has_page_sums(meta) {
        meta.nonzero_pages.checked_mul(8)?
    } else {
        0
    };
    meta.total_pages
        .checked_mul(4)?
        .checked_add(chunk_count(meta).checked_mul(8)?)?
        .checked_add(page_sums)?
        .checked_add(HEADER_LEN as u64 + 8)
}

/// Reads file `path` whole after checking that it holds `expect(len)`
/// bytes (its length from the open file, so the check and the read are
/// about the same file).
fn read_checked(
    path: &Path,
    expect: impl FnOnce(u64) -> Result<(), String>,
) -> Result<Vec<u8>, ImageError> {
    let file = File::open(path).map_err(io_err(path, "cannot open"))?;
    let len = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
    expect(len).map_err(|message| ImageError::Damaged {
        path: path.to_owned(),
        message,
    })?;
    let cap = usize::try_from(len).map_err(|_| ImageError::Damaged {
        path: path.to_owned(),
        message: format!("{len} bytes do not fit in memory"),
    })?;
    let mut data = Vec::with_capacity(cap);
    // One byte more than promised: a file that grew is caught below.
    file.take(len.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_err(path, "cannot read"))?;
    if data.len() != cap {
        return Err(ImageError::Damaged {
            path: path.to_owned(),
            message: format!("changed size while being read ({len} bytes at first)"),
        });
    }
    Ok(data)
}

/// The decoded `index.bin`.
pub struct ParsedIndex {
    /// Per guest page: 0 = zero page, [`chain::INHERIT`] = as in the
    /// parent (version 3), else slot + 1.
    pub table: Vec<u32>,
    pub chunk_sums: Vec<u64>,
    /// Per slot: the xxh3-64 of its page (empty before version 2).
    pub page_sums: Vec<u64>,
    /// Per slot: its guest page.
    pub reverse: Vec<u64>,
}

/// Decodes and checks `index.bin` against `meta` (which must have passed
/// [`check_meta`]): length, trailing checksum (when `verify_trailer`),
/// header fields, and a page table that numbers exactly `nonzero_pages`
/// slots in page order. Never panics on any input (fuzzed:
/// `fuzz/fuzz_targets/image_index.rs`).
pub fn parse_index(
    meta: &ImageMeta,
    index: &[u8],
    verify_trailer: bool,
) -> Result<ParsedIndex, String> {
    let chunks = chunk_count(meta);
    let expected_len = index_len(meta).ok_or("page counts overflow")?;
    if index.len() as u64 != expected_len {
        return Err(format!("{} bytes, expected {expected_len}", index.len()));
    }
    let (body, trailer) = index.split_at(index.len() - 8);
    let trailer = u64::from_le_bytes(trailer.try_into().map_err(|_| "short trailer")?);
    if verify_trailer && xxh3_64(body) != trailer {
        return Err("checksum mismatch".into());
    }
    let u32_at = |o: usize| {
        index
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        index
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    if &index[..8] != INDEX_MAGIC
        || u32_at(8) != meta.format_version
        || u64::from(u32_at(12)) != PAGE_SIZE
        || u64_at(16) != meta.total_pages
        || u64_at(24) != meta.nonzero_pages
        || u32_at(32) != meta.chunk_pages
        || u64_at(36) != chunks
    {
        return Err("header does not match meta.json".into());
    }
    // The length check above bounds every offset below by index.len().
    let total = usize_from(meta.total_pages);
    let table: Vec<u32> = (0..total).map(|i| u32_at(HEADER_LEN + i * 4)).collect();
    let sums_at = HEADER_LEN + total * 4;
    let chunk_sums: Vec<u64> = (0..usize_from(chunks))
        .map(|i| u64_at(sums_at + i * 8))
        .collect();
    let page_sums_at = sums_at + usize_from(chunks) * 8;
    let page_sums: Vec<u64> = if has_page_sums(meta) {
        (0..usize_from(meta.nonzero_pages))
            .map(|i| u64_at(page_sums_at + i * 8))
            .collect()
    } else {
        Vec::new()
    };
    let mut reverse = Vec::with_capacity(usize_from(meta.nonzero_pages));
    let inherits = meta.parent.is_some();
    for (page, &e) in table.iter().enumerate() {
        if e == chain::INHERIT && inherits {
            continue;
        }
        if e != 0 {
            if u64::from(e) != reverse.len() as u64 + 1 {
                return Err(format!("page table entry of page {page} out of order"));
            }
            reverse.push(page as u64);
        }
    }
    if reverse.len() as u64 != meta.nonzero_pages {
        return Err("page table and non-zero page count disagree".into());
    }
    Ok(ParsedIndex {
        table,
        chunk_sums,
        page_sums,
        reverse,
    })
}

/// Parses `meta.json` text as [`Image::open`] does (newer format versions
/// refused first, then the fields, then [`check_meta`]). Never panics.
pub fn parse_meta(text: &[u8]) -> Result<ImageMeta, String> {
    let version: serde_json::Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let found = version["format_version"].as_u64().unwrap_or(0);
    if found > u64::from(FORMAT_VERSION) {
        return Err(format!("format version {found} is newer than this thaw's"));
    }
    let meta: ImageMeta = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    check_meta(&meta)?;
    Ok(meta)
}

/// An opened, structurally verified image; `&Image` is safe to share
/// between a fault thread and a filler (all reads are `pread`, or ranged
/// reads of an object store).
pub struct Image {
    dir: PathBuf,
    meta: ImageMeta,
    table: Vec<u32>,
    chunk_sums: Vec<u64>,
    page_sums: Vec<u64>,
    reverse: Vec<u64>,
    pages: std::sync::Arc<dyn source::PageSource>,
    /// The same file for bulk reads that bypass the page cache.
    pages_direct: Option<direct::DirectReader>,
    pages_path: PathBuf,
    throttle: Option<std::sync::Arc<crate::image::throttle::Throttle>>,
    /// An incremental image: its chain (the fields above are then the
    /// chain's view).
    chain: Option<chain::Chain>,
    /// Whether any of the pages come from an object store (asked on the
    /// fault path: kept, not recomputed).
    remote: bool,
}

impl Image {
    /// Opens and checks an image: metadata, version, file sizes, digests
    /// of the index, page-table consistency; an incremental image with its
    /// whole chain (each parent's identity and layout checked), as one view.
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        Image::open_at_depth(dir, 0)
    }

    fn open_at_depth(dir: &Path, depth: usize) -> Result<Image, ImageError> {
        let image = Image::open_one(dir)?;
        match image.meta.parent.clone() {
            None => Ok(image),
            Some(parent) => image.with_parent(&parent, depth),
        }
    }

    /// Opens one image file set without its parents.
    fn open_one(dir: &Path) -> Result<Image, ImageError> {
        let meta_path = dir.join("meta.json");
        if !dir.is_dir() {
            return Err(ImageError::NotAnImage {
                path: dir.to_owned(),
                why: "no such directory",
            });
        }
        if !meta_path.exists() {
            return Err(ImageError::NotAnImage {
                path: dir.to_owned(),
                why: "it has no meta.json",
            });
        }
        let text = read_checked(&meta_path, |len| {
            if len > MAX_META_BYTES {
                Err(format!(
                    "{len} bytes, more than the {MAX_META_BYTES} a meta.json may have"
                ))
            } else {
                Ok(())
            }
        })?;
        let version: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| ImageError::Meta {
                path: meta_path.clone(),
                message: e.to_string(),
            })?;
        let found = version["format_version"]
            .as_u64()
            .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
        if found > FORMAT_VERSION {
            return Err(ImageError::NewerFormat {
                path: meta_path,
                found,
            });
        }
        let meta: ImageMeta = serde_json::from_slice(&text).map_err(|e| ImageError::Meta {
            path: meta_path.clone(),
            message: e.to_string(),
        })?;
        let damaged = |path: &Path, message: String| ImageError::Damaged {
            path: path.to_owned(),
            message,
        };
        check_meta(&meta).map_err(|m| damaged(&meta_path, m))?;
        let pages_path = dir.join("pages.bin");
        let pages: std::sync::Arc<dyn source::PageSource> =
            match open_remote_pages(dir, &meta, &pages_path)? {
                Some(remote) => std::sync::Arc::new(remote),
                None => {
                    let pages =
                        File::open(&pages_path).map_err(io_err(&pages_path, "cannot open"))?;
                    let len = pages
                        .metadata()
                        .map_err(io_err(&pages_path, "cannot stat"))?
                        .len();
                    std::sync::Arc::new(source::LocalPages::new(pages, len))
                }
            };
        let plen = pages.len();
        let remote = pages.is_remote();
        if plen != meta.nonzero_pages * PAGE_SIZE || plen != meta.pages.len {
            return Err(damaged(
                &pages_path,
                format!("{plen} bytes, expected {}", meta.nonzero_pages * PAGE_SIZE),
            ));
        }
        let dev_path = dir.join("device.state");
        let dlen = fs::metadata(&dev_path)
            .map_err(io_err(&dev_path, "cannot stat"))?
            .len();
        if dlen != meta.device_state.len {
            return Err(damaged(
                &dev_path,
                format!("{dlen} bytes, expected {}", meta.device_state.len),
            ));
        }
        let index_path = dir.join("index.bin");
        let expected = index_len(&meta)
            .filter(|&n| n == meta.index.len)
            .ok_or_else(|| {
                damaged(
                    &meta_path,
                    format!(
                        "index length {} does not match its page counts",
                        meta.index.len
                    ),
                )
            })?;
        let index = read_checked(&index_path, |len| {
            if len == expected {
                Ok(())
            } else {
                Err(format!("{len} bytes, expected {expected}"))
            }
        })?;
        if format!("{:016x}", xxh3_64(&index)) != meta.index.xxh3 {
            return Err(damaged(&index_path, "checksum mismatch".into()));
        }
        let ParsedIndex {
            table,
            chunk_sums,
            page_sums,
            reverse,
        } = parse_index(&meta, &index, true).map_err(|m| damaged(&index_path, m))?;
        Ok(Image {
            dir: dir.to_owned(),
            meta,
            table,
            chunk_sums,
            page_sums,
            reverse,
            pages_direct: if pages.is_remote() {
                None
            } else {
                direct::DirectReader::open(&pages_path)
            },
            pages,
            pages_path,
            throttle: None,
            chain: None,
            remote,
        })
    }

    /// This incremental image (opened alone) on top of its parent chain:
    /// every page resolved to the layer and slot that hold it.
    fn with_parent(self, parent_ref: &chain::ParentRef, depth: usize) -> Result<Image, ImageError> {
        let parent_dir = chain::parent_dir(&self.dir, parent_ref);
        let refuse = |why: String| ImageError::Parent {
            image: self.dir.clone(),
            parent: parent_dir.clone(),
            why,
        };
        if depth >= chain::MAX_DEPTH {
            return Err(refuse(format!(
                "lies deeper than {} images",
                chain::MAX_DEPTH
            )));
        }
        if !parent_dir.join("meta.json").exists() {
            return Err(refuse(format!(
                "(identity {}) is missing: put it back, or restore a merged image (`thaw merge`)",
                parent_ref.identity
            )));
        }
        let parent = Image::open_at_depth(&parent_dir, depth + 1)
            .map_err(|e| refuse(format!("cannot be read: {e}")))?;
        let found = format!("{:016x}", parent.identity());
        if found != parent_ref.identity {
            return Err(refuse(format!(
                "has identity {found}, not {}: it was replaced or rewritten since",
                parent_ref.identity
            )));
        }
        if parent.meta.layout != self.meta.layout {
            return Err(refuse("has another RAM layout".into()));
        }
        if !parent.has_page_sums() {
            return Err(refuse(
                "is a format version 1 image (no page digests)".into(),
            ));
        }
        let parent_depth = parent.chain.as_ref().map_or(0, |c| c.depth);
        let (mut layers, parent_sources) = match parent.chain {
            Some(c) => (c.layers, c.sources),
            None => (
                vec![chain::Layer::of(&parent.pages_path, parent.pages.clone())],
                (0..u32::try_from(parent.meta.nonzero_pages).unwrap_or(u32::MAX))
                    .map(|s| (0u16, s))
                    .collect(),
            ),
        };
        let top =
            u16::try_from(layers.len()).map_err(|_| refuse("makes the chain too long".into()))?;
        layers.push(chain::Layer::of(&self.pages_path, self.pages.clone()));
        let total = self.table.len();
        let mut table = vec![0u32; total];
        let (mut sources, mut sums, mut reverse) = (Vec::new(), Vec::new(), Vec::new());
        for (p, (&own, &inherited)) in self.table.iter().zip(&parent.table).enumerate() {
            let at = match own {
                chain::INHERIT if inherited != 0 => {
                    let s = usize_from(u64::from(inherited - 1));
                    Some((parent_sources[s], parent.page_sums[s]))
                }
                chain::INHERIT | 0 => None,
                e => {
                    let s = usize_from(u64::from(e - 1));
                    Some(((top, e - 1), self.page_sums[s]))
                }
            };
            if let Some((source, sum)) = at {
                sources.push(source);
                sums.push(sum);
                reverse.push(p as u64);
                table[p] = u32::try_from(sources.len())
                    .map_err(|_| refuse("holds too many pages".into()))?;
            }
        }
        let mut view = self.meta.clone();
        view.nonzero_pages = sources.len() as u64;
        Ok(Image {
            dir: self.dir,
            table,
            chunk_sums: Vec::new(),
            page_sums: sums,
            reverse,
            pages: self.pages,
            pages_direct: None,
            pages_path: self.pages_path,
            throttle: None,
            remote: layers.iter().any(|l| l.pages.is_remote()),
            chain: Some(chain::Chain {
                own_meta: self.meta,
                parent_dir,
                depth: parent_depth + 1,
                layers,
                sources,
            }),
            meta: view,
        })
    }

    /// Limits all reads of this image's pages (and of working sets streamed
    /// with [`Image::throttle`]) to `bytes_per_sec`.
    pub fn set_read_limit(&mut self, bytes_per_sec: u64) {
        self.throttle = Some(std::sync::Arc::new(crate::image::throttle::Throttle::new(
            bytes_per_sec,
        )));
    }

    /// The read limit, if one is set.
    pub fn throttle(&self) -> Option<&crate::image::throttle::Throttle> {
        self.throttle.as_deref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &ImageMeta {
        &self.meta
    }

    /// Where page `page` is: O(1).
    pub fn locate(&self, page: PageIndex) -> PageLocation {
        match self.table.get(usize_from(page.0)).copied().unwrap_or(0) {
            0 => PageLocation::Zero,
            e => PageLocation::Slot(e - 1),
        }
    }

    /// The guest page stored in `slot`.
    pub fn slot_page(&self, slot: u32) -> PageIndex {
        PageIndex(self.reverse[slot as usize])
    }

    pub fn chunk_of(&self, slot: u32) -> u32 {
        slot / self.meta.chunk_pages
    }

    /// The slots of chunk `chunk`.
    pub fn chunk_slots(&self, chunk: u32) -> Range<u32> {
        let start = chunk * self.meta.chunk_pages;
        // check_meta keeps nonzero_pages below u32::MAX.
        let slots = u32::try_from(self.meta.nonzero_pages).unwrap_or(u32::MAX);
        start..(start + self.meta.chunk_pages).min(slots)
    }

    /// Reads `count` consecutive chunks from `first` into `buf` with one
    /// pread and verifies each; returns the bytes read.
    pub fn read_chunks(&self, first: u32, count: u32, buf: &mut [u8]) -> Result<usize, ImageError> {
        self.read_chunks_as(first, count, buf, false)
    }

    /// [`Image::read_chunks`] for a page fault: under a read limit it goes
    /// ahead of background reads.
    pub fn read_chunks_urgent(
        &self,
        first: u32,
        count: u32,
        buf: &mut [u8],
    ) -> Result<usize, ImageError> {
        self.read_chunks_as(first, count, buf, true)
    }

    fn read_chunks_as(
        &self,
        first: u32,
        count: u32,
        buf: &mut [u8],
        urgent: bool,
    ) -> Result<usize, ImageError> {
        if self.chain.is_some() {
            let slots = self.chunk_slots(first).start..self.chunk_slots(first + count - 1).end;
            return self.read_slots(slots.start, slots.end - slots.start, buf, urgent);
        }
        let start = u64::from(self.chunk_slots(first).start) * PAGE_SIZE;
        let end = u64::from(self.chunk_slots(first + count - 1).end) * PAGE_SIZE;
        let len = usize_from(end - start);
        self.read_at(start, &mut buf[..len], urgent)?;
        for c in first..first + count {
            let r = self.chunk_slots(c);
            let (a, b) = (u64::from(r.start) * PAGE_SIZE, u64::from(r.end) * PAGE_SIZE);
            let got = xxh3_64(&buf[usize_from(a - start)..usize_from(b - start)]);
            let expected = self.chunk_sums[c as usize];
            if got != expected {
                return Err(ImageError::ChunkChecksum {
                    path: self.pages_path.clone(),
                    chunk: c,
                    offset: a,
                    end: b,
                    expected,
                    got,
                });
            }
        }
        Ok(len)
    }

    /// Waits for `bytes` under the read limit, if one is set (`urgent`:
    /// ahead of background reads).
    fn take_read_limit(&self, bytes: u64, urgent: bool) {
        if let Some(t) = &self.throttle {
            if urgent {
                t.take_urgent(bytes);
            } else {
                t.take(bytes);
            }
        }
    }

    /// Reads `buf.len()` bytes of `pages.bin` at `start`, under the read
    /// limit (`urgent`: ahead of background reads), unverified.
    fn read_at(&self, start: u64, buf: &mut [u8], urgent: bool) -> Result<(), ImageError> {
        self.take_read_limit(buf.len() as u64, urgent);
        if !urgent {
            if let Some(direct) = &self.pages_direct {
                if direct
                    .read(buf, start)
                    .map_err(io_err(&self.pages_path, "cannot read"))?
                {
                    return Ok(());
                }
            }
        }
        self.pages
            .read_exact_at(buf, start, urgent)
            .map_err(io_err(&self.pages_path, "cannot read"))
    }

    /// How many bytes a bulk reader (the fill) should ask for at once
    /// when not the local default: an image whose pages are in an object
    /// store is read in larger requests, several ranges in flight.
    pub fn bulk_read_bytes(&self) -> Option<u64> {
        self.page_sources()
            .filter_map(|p| p.bulk_read_bytes())
            .max()
    }

    /// What was fetched from object stores for this image's pages so far
    /// (every layer of a chain; `None` when all are local files).
    pub fn fetched(&self) -> Option<source::Fetched> {
        self.page_sources()
            .filter_map(|p| p.fetched())
            .reduce(|a, b| a + b)
    }

    /// Whether any of the pages are read from an object store.
    pub fn reads_remote(&self) -> bool {
        self.remote
    }

    /// Where the pages come from: this image's, or each layer's of a chain.
    fn page_sources(&self) -> Box<dyn Iterator<Item = &dyn source::PageSource> + '_> {
        match &self.chain {
            None => Box::new(std::iter::once(&*self.pages)),
            Some(c) => Box::new(c.layers.iter().map(|l| &*l.pages)),
        }
    }

    /// Whether each page can be read and verified alone ([`Image::read_slots`];
    /// format version 2 on).
    pub fn has_page_sums(&self) -> bool {
        !self.page_sums.is_empty() || self.meta.nonzero_pages == 0
    }

    /// Reads the pages of slots `first..first + count` into `buf` with one
    /// pread and verifies each against its own digest; `urgent` for a read
    /// a fault waits on (ahead of background reads under a read limit).
    /// Returns the bytes read. An image without page digests (version 1)
    /// is refused: read whole chunks instead.
    pub fn read_slots(
        &self,
        first: u32,
        count: u32,
        buf: &mut [u8],
        urgent: bool,
    ) -> Result<usize, ImageError> {
        if let Some(chain) = &self.chain {
            self.take_read_limit(u64::from(count) * PAGE_SIZE, urgent);
            return chain.read_slots(first, count, buf, urgent, &self.page_sums, &self.reverse);
        }
        let end = first.saturating_add(count);
        let sums = self
            .page_sums
            .get(first as usize..end as usize)
            .ok_or_else(|| ImageError::Damaged {
                path: self.pages_path.clone(),
                message: format!(
                    "slots {first}..{end}: {}",
                    if self.page_sums.is_empty() {
                        "this image (format version 1) has no page digests"
                    } else {
                        "outside the image"
                    }
                ),
            })?;
        let start = u64::from(first) * PAGE_SIZE;
        let len = usize_from(u64::from(count) * PAGE_SIZE);
        self.read_at(start, &mut buf[..len], urgent)?;
        for (i, (page, &expected)) in buf[..len].chunks_exact(PAGE_BYTES).zip(sums).enumerate() {
            let got = xxh3_64(page);
            if got != expected {
                let slot = first + u32::try_from(i).unwrap_or(u32::MAX);
                return Err(ImageError::PageChecksum {
                    path: self.pages_path.clone(),
                    slot,
                    page: self.slot_page(slot).0,
                    expected,
                    got,
                });
            }
        }
        Ok(len)
    }

    /// This image's identity: an xxh3-64 of the digests of its three data
    /// files and its creation time. Two images share it only if they hold
    /// the same data.
    pub fn identity(&self) -> u64 {
        identity(self.own_meta())
    }

    /// The image's own `meta.json` ([`Image::meta`] gives an incremental
    /// image's chain view: its page counts are the whole chain's).
    pub fn own_meta(&self) -> &ImageMeta {
        self.chain.as_ref().map_or(&self.meta, |c| &c.own_meta)
    }

    /// An incremental image's parent directory and chain length (images
    /// below it).
    pub fn parent(&self) -> Option<(&Path, usize)> {
        self.chain
            .as_ref()
            .map(|c| (c.parent_dir.as_path(), c.depth))
    }

    /// The directories of every image this one reads: itself, and for an
    /// incremental image each image of its chain.
    pub fn chain_dirs(&self) -> Vec<PathBuf> {
        match &self.chain {
            None => vec![self.dir.clone()],
            Some(c) => c
                .layers
                .iter()
                .filter_map(|l| l.path.parent().map(Path::to_path_buf))
                .collect(),
        }
    }

    /// The xxh3-64 of page `page`'s saved content (`None`: a zero page).
    pub fn page_digest(&self, page: PageIndex) -> Option<u64> {
        match self.locate(page) {
            PageLocation::Zero => None,
            PageLocation::Slot(s) => self.page_sums.get(s as usize).copied(),
        }
    }

    /// The device state, verified against its digest.
    pub fn read_device_state(&self) -> Result<Vec<u8>, ImageError> {
        let path = self.dir.join("device.state");
        let want = self.meta.device_state.len;
        let data = read_checked(&path, |len| {
            if len == want {
                Ok(())
            } else {
                Err(format!("{len} bytes, expected {want}"))
            }
        })?;
        if format!("{:016x}", xxh3_64(&data)) != self.meta.device_state.xxh3 {
            return Err(ImageError::Damaged {
                path,
                message: "checksum mismatch".into(),
            });
        }
        Ok(data)
    }
}

/// The pages of the image in `dir` when they were left in an object store
/// ([`crate::store::pages::REMOTE_PAGES`] in place of `pages.bin`):
/// connected, and checked against `meta`.
fn open_remote_pages(
    dir: &Path,
    meta: &ImageMeta,
    pages_path: &Path,
) -> Result<Option<crate::store::pages::RemotePages>, ImageError> {
    use crate::store::pages::{RemotePages, RemotePagesRef};
    if pages_path.exists() {
        return Ok(None);
    }
    let remote_err = |message: String| ImageError::RemotePages {
        path: dir.to_owned(),
        message,
    };
    let Some(reference) = RemotePagesRef::read(dir).map_err(|e| remote_err(e.to_string()))? else {
        return Ok(None);
    };
    if reference.len != meta.pages.len || reference.xxh3 != meta.pages.xxh3 {
        return Err(remote_err(format!(
            "{} names pages of another image",
            reference.url
        )));
    }
    RemotePages::open(&reference)
        .map(Some)
        .map_err(|e| remote_err(e.to_string()))
}

/// Where this process's writer builds the image `target` (named `name`)
/// until it is finished: `<name>.partial-<pid>` next to it.
pub fn partial_dir(target: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let mut partial = name.to_os_string();
    partial.push(format!(".partial-{}", std::process::id()));
    target.with_file_name(partial)
}

/// The identity of the image `meta` describes (see [`Image::identity`]).
pub fn identity(meta: &ImageMeta) -> u64 {
    let d = |d: &Digest| format!("{}:{}", d.len, d.xxh3);
    xxh3_64(
        format!(
            "thaw-image {} {} {} {}",
            d(&meta.index),
            d(&meta.device_state),
            d(&meta.pages),
            meta.created_unix
        )
        .as_bytes(),
    )
}

/// What `thaw inspect` shows.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub path: PathBuf,
    pub format_version: u32,
    pub thaw_version: String,
    pub created_unix: u64,
    pub vm: String,
    pub memory_bytes: u64,
    pub accel: String,
    pub qemu_version: String,
    pub layout: RamLayout,
    pub total_pages: u64,
    pub nonzero_pages: u64,
    pub zero_pages: u64,
    pub chunk_pages: u32,
    pub chunks: u64,
    pub device_state_bytes: u64,
    pub pages_bytes: u64,
    pub index_bytes: u64,
    /// The libvirt domain of the image (without its XML).
    pub libvirt: Option<InspectLibvirt>,
    /// An incremental image: its parent, the images below it, and the
    /// pages it stores itself (`nonzero_pages` counts the whole chain's).
    pub parent: Option<PathBuf>,
    pub chain_depth: usize,
    pub own_pages: u64,
}

/// A libvirt domain's identity in [`InspectReport`].
#[derive(Clone, Debug, Serialize)]
pub struct InspectLibvirt {
    pub uri: String,
    pub name: String,
    pub uuid: String,
}

/// Describes an opened image.
pub fn inspect(image: &Image) -> InspectReport {
    let m = image.meta();
    let own = image.own_meta();
    InspectReport {
        path: image.dir.clone(),
        format_version: m.format_version,
        thaw_version: m.thaw_version.clone(),
        created_unix: m.created_unix,
        vm: m.vm.name.clone(),
        memory_bytes: m.layout.total_bytes(),
        accel: m.accel.clone(),
        qemu_version: m.qemu_version.clone(),
        layout: m.layout.clone(),
        total_pages: m.total_pages,
        nonzero_pages: m.nonzero_pages,
        zero_pages: m.total_pages - m.nonzero_pages,
        chunk_pages: m.chunk_pages,
        chunks: image.chunk_sums.len() as u64,
        device_state_bytes: m.device_state.len,
        pages_bytes: m.pages.len,
        index_bytes: m.index.len,
        parent: image.parent().map(|(p, _)| p.to_owned()),
        chain_depth: image.parent().map_or(0, |(_, d)| d),
        own_pages: own.nonzero_pages,
        libvirt: m.libvirt.as_ref().map(|l| InspectLibvirt {
            uri: l.uri.clone(),
            name: l.name.clone(),
            uuid: l.uuid.clone(),
        }),
    }
}

impl std::fmt::Display for InspectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "image {} (format {}, thaw {})",
            self.path.display(),
            self.format_version,
            self.thaw_version
        )?;
        writeln!(
            f,
            "  VM {}: {} MiB RAM, {}, QEMU {}",
            self.vm,
            self.memory_bytes >> 20,
            self.accel,
            self.qemu_version
        )?;
        if let Some(l) = &self.libvirt {
            writeln!(
                f,
                "  libvirt domain {} ({}) at {}: `thaw restore` brings it back under libvirt",
                l.name, l.uuid, l.uri
            )?;
        }
        for b in &self.layout.blocks {
            writeln!(
                f,
                "  block {}: {} MiB from page {}",
                b.id,
                b.size >> 20,
                b.first_page
            )?;
        }
        writeln!(
            f,
            "  pages: {} total, {} non-zero, {} zero; {} chunks of {} pages",
            self.total_pages, self.nonzero_pages, self.zero_pages, self.chunks, self.chunk_pages
        )?;
        if let Some(parent) = &self.parent {
            writeln!(
                f,
                "  incremental: {} pages of its own, the rest from {} ({} image(s) below)",
                self.own_pages,
                parent.display(),
                self.chain_depth
            )?;
        }
        write!(
            f,
            "  files: device.state {} KiB, pages.bin {} MiB, index.bin {} KiB",
            self.device_state_bytes >> 10,
            self.pages_bytes >> 20,
            self.index_bytes >> 10
        )
    }
}

pub mod chain;
pub mod direct;
pub mod source;
#[cfg(test)]
pub(crate) mod tests;
pub mod throttle;
