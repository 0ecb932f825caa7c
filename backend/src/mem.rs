//! Guest memory vocabulary shared by every module: page size, typed page
//! numbers and host addresses, and the layout of a VM's RAM blocks.

use serde::{Deserialize, Serialize};

/// Size of the pages thaw saves, indexes and installs (x86-64 base page).
pub const PAGE_SIZE: u64 = 4096;

// thaw builds for x86-64 only (`remote::inject` refuses other targets), so
// usize is as wide as u64 and every u64 fits.
const _: () = assert!(usize::BITS == u64::BITS);

/// `v` as a `usize`: lossless on the 64-bit targets thaw builds for (see
/// the assertion above). For lengths and indices; whether a value from a
/// file is a *sane* size is for the caller to check.
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits wide, asserted above
pub const fn usize_from(v: u64) -> usize {
    v as usize
}

/// `v` as a `u64`: lossless, usize is never wider than 64 bits.
pub const fn u64_from(v: usize) -> u64 {
    v as u64
}

/// [`PAGE_SIZE`] as a `usize`.
pub const PAGE_BYTES: usize = usize_from(PAGE_SIZE);

/// [`PAGE_SIZE`] as a `u32`.
#[allow(clippy::cast_possible_truncation)] // 4096 fits
pub const PAGE_SIZE_U32: u32 = PAGE_SIZE as u32;

/// A guest RAM page, numbered across all RAM blocks in layout order
/// (block 0's pages first, then block 1's, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageIndex(pub u64);

/// A virtual address in some process (QEMU's or thaw's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddr(pub u64);

impl HostAddr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: u64) -> HostAddr {
        HostAddr(self.0 + bytes)
    }
    /// The address as a raw pointer, for ioctls that take one.
    pub fn as_ptr(self) -> *mut libc::c_void {
        self.0 as *mut libc::c_void
    }
}

/// One guest RAM block: a QEMU memory backend (`memory-backend-file`) with its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamBlock {
    /// QEMU object id of the memory backend (e.g. `ram0`).
    pub id: String,
    /// Size in bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
    /// Global number of this block's first page.
    pub first_page: u64,
}

impl RamBlock {
    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
    /// Whether a global page number falls inside this block.
    pub fn contains(&self, page: PageIndex) -> bool {
        page.0 >= self.first_page && page.0 < self.first_page + self.pages()
    }
}

/// The RAM blocks of a VM, in order; page numbers are contiguous across them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamLayout {
    pub blocks: Vec<RamBlock>,
}

impl RamLayout {
    /// Builds a layout from `(id, size)` pairs, numbering pages contiguously.
    pub fn from_sizes<I, S>(blocks: I) -> RamLayout
    where
        I: IntoIterator<Item = (S, u64)>,
        S: Into<String>,
    {
        let mut first_page = 0;
        let blocks = blocks
            .into_iter()
            .map(|(id, size)| {
                let block = RamBlock {
                    id: id.into(),
                    size,
                    first_page,
                };
                first_page += block.pages();
                block
            })
            .collect();
        RamLayout { blocks }
    }

    /// Total number of guest pages.
    /// Checks what a layout read from a file promises: whole pages, blocks
    /// numbered consecutively from page 0, no arithmetic overflow.
    pub fn check(&self) -> Result<(), String> {
        let mut next = 0u64;
        for b in &self.blocks {
            if b.size == 0 || b.size % PAGE_SIZE != 0 {
                return Err(format!(
                    "RAM block {:?} has size {}, not whole pages",
                    b.id, b.size
                ));
            }
            if b.first_page != next {
                return Err(format!(
                    "RAM block {:?} starts at page {}, expected {next}",
                    b.id, b.first_page
                ));
            }
            next = next
                .checked_add(b.pages())
                .ok_or_else(|| format!("RAM block {:?} is too large", b.id))?;
        }
        Ok(())
    }

    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(RamBlock::pages).sum()
    }

    /// Total guest RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.size).sum()
    }

    /// The block holding `page` and the page's byte offset inside it.
    pub fn locate(&self, page: PageIndex) -> Option<(usize, u64)> {
        self.blocks
            .iter()
            .position(|b| b.contains(page))
            .map(|i| (i, (page.0 - self.blocks[i].first_page) * PAGE_SIZE))
    }
}

/// Page-aligned `[start, end)` byte ranges of `file` that hold data
/// (`SEEK_DATA`/`SEEK_HOLE`), clipped to `size`.
pub fn data_extents(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let start = match nix::unistd::lseek(file, offset(pos)?, nix::unistd::Whence::SeekData) {
            Ok(s) => position(s)?,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match nix::unistd::lseek(file, offset(start)?, nix::unistd::Whence::SeekHole) {
            Ok(e) => position(e)?.min(size),
            Err(e) => return Err(e.into()),
        };
        let (start, end) = (
            start / PAGE_SIZE * PAGE_SIZE,
            end.div_ceil(PAGE_SIZE) * PAGE_SIZE,
        );
        out.push((start, end.min(size)));
        pos = end;
    }
    Ok(out)
}

/// A file position as `lseek` takes it.
fn offset(pos: u64) -> std::io::Result<i64> {
    i64::try_from(pos).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// A position `lseek` returned (never negative on success).
fn position(off: i64) -> std::io::Result<u64> {
    u64::try_from(off).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_numbers_pages_across_blocks() {
        let layout = RamLayout::from_sizes([("ram0", 8 * PAGE_SIZE), ("ram1", 4 * PAGE_SIZE)]);
        assert_eq!(layout.total_pages(), 12);
        assert_eq!(layout.blocks[1].first_page, 8);
        assert_eq!(layout.locate(PageIndex(9)), Some((1, PAGE_SIZE)));
        assert_eq!(layout.locate(PageIndex(12)), None);
    }
}
