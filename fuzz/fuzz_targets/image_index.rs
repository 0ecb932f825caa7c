//! Fuzzes the image metadata and index parsers (`thaw::image::parse_meta`,
//! `thaw::image::parse_index`): whatever the bytes, they must return an
//! error or a consistent result, never panic or allocate without bound.
//!
//! Input: a little-endian u32 length `n`, then `n` bytes of `meta.json`
//! text, then the bytes of `index.bin`. The index trailer's checksum is not
//! verified here, so that mutations reach the structural checks behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (meta, index) = rest.split_at(n);
    if let Ok(meta) = thaw::image::parse_meta(meta) {
        if let Ok(parsed) = thaw::image::parse_index(&meta, index, false) {
            assert_eq!(parsed.table.len() as u64, meta.total_pages);
            assert_eq!(parsed.reverse.len() as u64, meta.nonzero_pages);
        }
    }
});
