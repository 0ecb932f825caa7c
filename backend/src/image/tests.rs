//! Image round trip and damage detection.
// Test fixtures: casts of small constants and of the tests' own values
// (their children's pids, page numbers below 64); a wrong one fails a test.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::chain::merge;
use super::*;
use crate::config::{ByteSize, VmConfig};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::PermissionsExt;

fn vm() -> VmConfig {
    VmConfig::parse("name: t\nmemory: 1M\n", Path::new("t.yaml"), Path::new("/")).expect("config")
}

fn info() -> ImageInfo {
    ImageInfo {
        libvirt: None,
        qemu_version: "10.0.2".into(),
        accel: "tcg".into(),
        vm: vm(),
    }
}

pub(crate) fn page(fill: u8) -> Vec<u8> {
    (0..PAGE_SIZE as usize).map(|i| fill ^ (i as u8)).collect()
}

/// Two blocks (40 + 24 pages); pages 1, 3..=20 (except 7) and 50 non-zero.
pub(crate) fn write_image(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let layout = RamLayout::from_sizes([("ram0", 40 * PAGE_SIZE), ("ram1", 24 * PAGE_SIZE)]);
    let mut w = ImageWriter::create(dir, layout, false).expect("create");
    w.device_state_file()
        .expect("dev")
        .write_all(b"device state")
        .expect("write");
    let mut expect = Vec::new();
    w.write_run(PageIndex(1), &page(1)).expect("run");
    let mut run = Vec::new();
    for p in 3..=20u64 {
        let data = if p == 7 {
            vec![0; PAGE_SIZE as usize]
        } else {
            page(p as u8)
        };
        if p != 7 {
            expect.push((p, data.clone()));
        }
        run.extend_from_slice(&data);
    }
    w.write_run(PageIndex(3), &run).expect("run");
    w.write_run(PageIndex(50), &page(50)).expect("run");
    w.finish(info()).expect("finish");
    expect.insert(0, (1, page(1)));
    expect.push((50, page(50)));
    expect
}

fn read_page(img: &Image, p: u64) -> Vec<u8> {
    match img.locate(PageIndex(p)) {
        PageLocation::Zero => vec![0; PAGE_SIZE as usize],
        PageLocation::Slot(s) => {
            let c = img.chunk_of(s);
            let mut buf = vec![0; (img.meta().chunk_pages as u64 * PAGE_SIZE) as usize];
            img.read_chunks(c, 1, &mut buf).expect("chunk");
            let off = ((s - img.chunk_slots(c).start) as u64 * PAGE_SIZE) as usize;
            buf[off..off + PAGE_SIZE as usize].to_vec()
        }
    }
}

#[test]
fn round_trip_reads_every_page_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    let expect = write_image(&dir);
    let img = Image::open(&dir).expect("open");
    assert_eq!(img.meta().nonzero_pages, expect.len() as u64);
    assert_eq!(img.meta().vm.memory, ByteSize(1 << 20));
    for p in 0..64u64 {
        let want = expect
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, d)| d.clone())
            .unwrap_or(vec![0; 4096]);
        assert_eq!(read_page(&img, p), want, "page {p}");
    }
    assert_eq!(img.locate(PageIndex(0)), PageLocation::Zero);
    assert_eq!(img.locate(PageIndex(7)), PageLocation::Zero);
    assert_eq!(img.locate(PageIndex(1)), PageLocation::Slot(0));
    assert_eq!(
        img.slot_page(img.meta().nonzero_pages as u32 - 1),
        PageIndex(50)
    );
    assert_eq!(img.read_device_state().expect("dev"), b"device state");
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for f in ["meta.json", "pages.bin", "index.bin", "device.state"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x40], at).expect("write");
}

#[test]
fn flipped_page_byte_is_a_chunk_checksum_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    write_image(&dir);
    flip(&dir.join("pages.bin"), 17 * PAGE_SIZE + 5);
    let img = Image::open(&dir).expect("structure is intact");
    let mut buf = vec![0; 16 * PAGE_SIZE as usize];
    match img.read_chunks(1, 1, &mut buf) {
        Err(ImageError::ChunkChecksum { chunk: 1, .. }) => {}
        other => panic!("expected a checksum error on chunk 1, got {other:?}"),
    }
    assert!(img.read_chunks(0, 1, &mut buf).is_ok());
}

#[test]
fn structural_damage_is_refused_at_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    write_image(&dir);
    flip(&dir.join("index.bin"), 70);
    assert!(matches!(Image::open(&dir), Err(ImageError::Damaged { .. })));

    let dir2 = tmp.path().join("img2");
    write_image(&dir2);
    let f = OpenOptions::new()
        .write(true)
        .open(dir2.join("pages.bin"))
        .expect("open");
    f.set_len(PAGE_SIZE).expect("truncate");
    assert!(matches!(
        Image::open(&dir2),
        Err(ImageError::Damaged { .. })
    ));

    let dir3 = tmp.path().join("img3");
    write_image(&dir3);
    let meta = fs::read_to_string(dir3.join("meta.json")).expect("meta");
    fs::write(
        dir3.join("meta.json"),
        meta.replace("\"format_version\": 2", "\"format_version\": 9"),
    )
    .expect("w");
    let err = Image::open(&dir3).err().expect("refused");
    assert!(err.to_string().contains("newer thaw"), "{err}");
}

#[test]
fn existing_target_needs_force_and_partial_is_removed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    write_image(&dir);
    let layout = RamLayout::from_sizes([("ram0", 4 * PAGE_SIZE)]);
    assert!(matches!(
        ImageWriter::create(&dir, layout.clone(), false),
        Err(ImageError::Exists(_))
    ));
    let w = ImageWriter::create(&dir, layout, true).expect("force");
    drop(w);
    let left: Vec<_> = fs::read_dir(tmp.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("img")],
        "partial image left behind"
    );
    Image::open(&dir).expect("the old image is untouched");
}

#[test]
fn pages_out_of_order_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = RamLayout::from_sizes([("ram0", 8 * PAGE_SIZE)]);
    let mut w = ImageWriter::create(&tmp.path().join("i"), layout, false).expect("create");
    w.write_run(PageIndex(4), &page(4)).expect("run");
    assert!(matches!(
        w.write_run(PageIndex(2), &page(2)),
        Err(ImageError::OutOfOrder { .. })
    ));
    assert!(matches!(
        w.write_run(PageIndex(8), &page(8)),
        Err(ImageError::OutOfRange(_))
    ));
}

/// Opens the image and reads its device state, as a restore does before
/// it starts the guest: the error text, or None if all of it is accepted.
fn structural_check(dir: &Path) -> Option<String> {
    match Image::open(dir).and_then(|i| i.read_device_state().map(|_| i)) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[test]
fn every_kind_of_structural_damage_is_refused_before_a_restore_starts() {
    type Damage = (&'static str, &'static str, fn(&Path));
    let cases: Vec<Damage> = vec![
        ("truncated pages.bin", "pages.bin", |d| {
            truncate_to(&d.join("pages.bin"), 3 * PAGE_SIZE)
        }),
        ("truncated index.bin", "index.bin", |d| {
            truncate_to(&d.join("index.bin"), 100)
        }),
        ("truncated device.state", "device.state", |d| {
            truncate_to(&d.join("device.state"), 3)
        }),
        ("empty meta.json", "meta.json", |d| {
            truncate_to(&d.join("meta.json"), 0)
        }),
        ("index header byte", "index.bin", |d| {
            flip(&d.join("index.bin"), 20)
        }),
        ("index page table byte", "index.bin", |d| {
            flip(&d.join("index.bin"), 64 + 4 * 3)
        }),
        ("index chunk checksum byte", "index.bin", |d| {
            flip(&d.join("index.bin"), 64 + 4 * 64 + 2)
        }),
        ("index trailer byte", "index.bin", |d| {
            let len = fs::metadata(d.join("index.bin")).expect("stat").len();
            flip(&d.join("index.bin"), len - 1)
        }),
        ("device state byte", "device.state", |d| {
            flip(&d.join("device.state"), 4)
        }),
        ("meta.json syntax", "meta.json", |d| {
            flip(&d.join("meta.json"), 0)
        }),
        ("meta.json page count", "meta.json", |d| {
            edit_meta(d, "\"nonzero_pages\": 19", "\"nonzero_pages\": 20")
        }),
        ("meta.json layout", "meta.json", |d| {
            edit_meta(d, "\"first_page\": 40", "\"first_page\": 41")
        }),
        ("newer format version", "meta.json", |d| {
            edit_meta(d, "\"format_version\": 2", "\"format_version\": 3")
        }),
        ("missing pages.bin", "pages.bin", |d| {
            fs::remove_file(d.join("pages.bin")).expect("rm")
        }),
        ("missing index.bin", "index.bin", |d| {
            fs::remove_file(d.join("index.bin")).expect("rm")
        }),
        ("missing device.state", "device.state", |d| {
            fs::remove_file(d.join("device.state")).expect("rm")
        }),
        ("missing meta.json", "meta.json", |d| {
            fs::remove_file(d.join("meta.json")).expect("rm")
        }),
    ];
    let tmp = tempfile::tempdir().expect("tmp");
    for (i, (what, file, damage)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("img{i}"));
        write_image(&dir);
        assert_eq!(structural_check(&dir), None, "intact image refused");
        damage(&dir);
        let err = structural_check(&dir).unwrap_or_else(|| panic!("{what}: accepted"));
        // One sentence that names the image (or the file) at fault.
        assert!(
            err.contains(file) || err.contains(dir.to_str().expect("utf-8")),
            "{what}: {err}"
        );
        assert!(!err.contains('\n'), "{what}: {err}");
    }
}

fn truncate_to(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

fn edit_meta(dir: &Path, from: &str, to: &str) {
    let path = dir.join("meta.json");
    let text = fs::read_to_string(&path).expect("meta");
    assert!(text.contains(from), "meta.json lacks {from:?}:\n{text}");
    fs::write(&path, text.replace(from, to)).expect("write");
}

/// The parsers the fuzz target drives accept a real image, and reject
/// nonsense without panicking. With `THAW_FUZZ_SEED=<file>` this also
/// writes the real image in the fuzz target's input format (the CI seeds
/// its corpus with it).
#[test]
fn meta_and_index_parsers_accept_a_real_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    write_image(&dir);
    let meta_text = fs::read(dir.join("meta.json")).expect("meta");
    let index = fs::read(dir.join("index.bin")).expect("index");
    let meta = parse_meta(&meta_text).expect("meta parses");
    let parsed = parse_index(&meta, &index, true).expect("index parses");
    assert_eq!(parsed.reverse.len() as u64, meta.nonzero_pages);
    // Overflowing counts are an error, not a panic or a huge allocation.
    let mut huge = meta.clone();
    huge.total_pages = u64::MAX / 2;
    huge.nonzero_pages = u64::MAX / 3;
    assert!(parse_index(&huge, &index, false).is_err());
    assert!(parse_meta(b"{\"format_version\": 18446744073709551615}").is_err());
    assert!(parse_meta(b"\xff").is_err());
    if let Some(seed) = std::env::var_os("THAW_FUZZ_SEED") {
        let mut input = (meta_text.len() as u32).to_le_bytes().to_vec();
        input.extend_from_slice(&meta_text);
        input.extend_from_slice(&index);
        fs::write(seed, input).expect("write the fuzz seed");
    }
}

#[test]
fn an_oversized_meta_json_is_refused_before_it_is_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    write_image(&dir);
    // A sparse file of zeros: were it read and parsed, JSON would fail first.
    let meta = File::options()
        .write(true)
        .open(dir.join("meta.json"))
        .expect("open");
    meta.set_len(MAX_META_BYTES + 1).expect("grow");
    let err = Image::open(&dir).err().expect("refused");
    assert!(
        matches!(&err, ImageError::Damaged { message, .. } if message.contains("more than")),
        "{err:?}"
    );
}

#[test]
fn an_index_of_the_wrong_size_is_refused_before_it_is_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    write_image(&dir);
    let index = File::options()
        .write(true)
        .open(dir.join("index.bin"))
        .expect("open");
    let len = index.metadata().expect("stat").len();
    index.set_len(len + (1 << 30)).expect("grow");
    let err = Image::open(&dir).err().expect("refused");
    assert!(
        matches!(&err, ImageError::Damaged { message, .. } if message.contains(&format!("expected {len}"))),
        "{err:?}"
    );
}

/// Rewrites a version-2 image at `dir` as version 1 wrote it: no page
/// digests in `index.bin`, `format_version` 1, the index digest updated.
pub(crate) fn downgrade_to_v1(dir: &Path) {
    let meta_path = dir.join("meta.json");
    let mut meta: ImageMeta =
        serde_json::from_slice(&fs::read(&meta_path).expect("meta")).expect("parse meta");
    assert_eq!(meta.format_version, 2);
    let index = fs::read(dir.join("index.bin")).expect("index");
    let body_end = index.len() - 8 - meta.nonzero_pages as usize * 8;
    let mut v1 = index[..body_end].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let trailer = xxh3_64(&v1);
    v1.extend_from_slice(&trailer.to_le_bytes());
    fs::write(dir.join("index.bin"), &v1).expect("write index");
    meta.format_version = 1;
    meta.index = Digest {
        len: v1.len() as u64,
        xxh3: format!("{:016x}", xxh3_64(&v1)),
    };
    fs::write(&meta_path, serde_json::to_vec(&meta).expect("json")).expect("write meta");
}

#[test]
fn each_page_reads_and_verifies_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    let expect = write_image(&dir);
    let img = Image::open(&dir).expect("open");
    assert_eq!(img.meta().format_version, FULL_FORMAT_VERSION);
    assert!(img.has_page_sums());
    let mut buf = vec![0; 4 * PAGE_SIZE as usize];
    for (p, want) in &expect {
        let PageLocation::Slot(s) = img.locate(PageIndex(*p)) else {
            panic!("page {p} is saved")
        };
        assert_eq!(img.read_slots(s, 1, &mut buf, true).expect("read"), 4096);
        assert_eq!(&buf[..4096], &want[..], "page {p}");
    }
    // A run of slots in one read.
    img.read_slots(2, 3, &mut buf, false).expect("run");
    assert_eq!(&buf[4096..8192], &expect[3].1[..]);
    assert!(img
        .read_slots(expect.len() as u32, 1, &mut buf, false)
        .is_err());
    // A flipped byte fails that page's digest, and no other page's.
    flip(&dir.join("pages.bin"), 5 * PAGE_SIZE + 9);
    let img = Image::open(&dir).expect("structure is intact");
    match img.read_slots(4, 2, &mut buf, true) {
        Err(ImageError::PageChecksum { slot: 5, page, .. }) => {
            assert_eq!(PageIndex(page), img.slot_page(5))
        }
        other => panic!("expected a page checksum error on slot 5, got {other:?}"),
    }
    assert!(img.read_slots(4, 1, &mut buf, true).is_ok());
    assert!(img.read_slots(6, 1, &mut buf, true).is_ok());
}

#[test]
fn a_version_1_image_still_opens_and_reads_by_chunk() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    let expect = write_image(&dir);
    downgrade_to_v1(&dir);
    let img = Image::open(&dir).expect("a version-1 image opens");
    assert_eq!(img.meta().format_version, 1);
    assert!(!img.has_page_sums());
    for (p, want) in &expect {
        assert_eq!(&read_page(&img, *p), want, "page {p}");
    }
    let mut buf = vec![0; PAGE_SIZE as usize];
    assert!(matches!(
        img.read_slots(0, 1, &mut buf, true),
        Err(ImageError::Damaged { .. })
    ));
    // A version this thaw does not know is refused.
    edit_meta(&dir, "\"format_version\":1", "\"format_version\":0");
    assert!(Image::open(&dir).is_err());
}

/// RAM of 64 pages as a map page → content (absent: zero).
type Ram = std::collections::BTreeMap<u64, Vec<u8>>;

/// Writes `ram` as an image at `dir`, incremental on `parent` if given.
fn write_ram(dir: &Path, ram: &Ram, parent: Option<&Path>) -> ImageSummary {
    let layout = RamLayout::from_sizes([("ram0", 40 * PAGE_SIZE), ("ram1", 24 * PAGE_SIZE)]);
    let mut w = ImageWriter::create(dir, layout, false).expect("create");
    if let Some(parent) = parent {
        w.set_parent(&Image::open(parent).expect("parent"))
            .expect("set parent");
    }
    w.device_state_file()
        .expect("dev")
        .write_all(dir.to_string_lossy().as_bytes())
        .expect("write");
    // Every page, as a save passes the RAM files' data: zeros included.
    let mut all = Vec::new();
    for p in 0..64 {
        all.extend_from_slice(ram.get(&p).map_or(&[0u8; PAGE_SIZE as usize][..], |v| v));
    }
    w.write_run(PageIndex(0), &all).expect("run");
    w.finish(info()).expect("finish")
}

/// Every page of `img` (through `read_slots` and `read_chunks`) is `ram`'s.
fn assert_holds(img: &Image, ram: &Ram) {
    for p in 0..64 {
        let want = ram
            .get(&p)
            .cloned()
            .unwrap_or_else(|| vec![0; PAGE_SIZE as usize]);
        assert_eq!(read_page(img, p), want, "page {p} by chunk");
        if let PageLocation::Slot(s) = img.locate(PageIndex(p)) {
            let mut buf = vec![0; PAGE_SIZE as usize];
            img.read_slots(s, 1, &mut buf, true).expect("slot");
            assert_eq!(buf, want, "page {p} by slot");
            assert_eq!(img.slot_page(s), PageIndex(p));
        }
    }
    assert_eq!(img.meta().nonzero_pages, ram.len() as u64);
}

#[test]
fn an_incremental_chain_reads_as_one_image_and_stores_only_changes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let mut ram: Ram = (0..30).map(|p| (p, page(p as u8))).collect();
    write_ram(&a, &ram, None);
    // b: two pages changed, one zeroed, one new; the rest as in a.
    ram.insert(3, page(200));
    ram.insert(35, page(201));
    ram.remove(&10);
    ram.insert(50, page(202));
    let sb = write_ram(&b, &ram, Some(&a));
    assert_eq!(sb.nonzero_pages, 3, "only the changed pages are written");
    assert_eq!(sb.inherited_pages, 28);
    let ram_b = ram.clone();
    // c on b: one more change.
    ram.insert(4, page(203));
    let sc = write_ram(&c, &ram, Some(&b));
    assert_eq!(sc.nonzero_pages, 1);

    let img = Image::open(&c).expect("open the chain");
    assert_holds(&img, &ram);
    assert_eq!(
        img.parent().map(|(p, d)| (p.to_owned(), d)),
        Some((b.clone(), 2))
    );
    assert_eq!(img.own_meta().nonzero_pages, 1);
    assert_eq!(img.meta().format_version, FORMAT_VERSION);
    assert_eq!(
        img.read_device_state().expect("device"),
        c.to_string_lossy().as_bytes()
    );
    assert_holds(&Image::open(&b).expect("open b"), &ram_b);
    let report = inspect(&img);
    assert_eq!((report.chain_depth, report.own_pages), (2, 1));

    // Merged: a full image of the same RAM that needs no parent.
    let merged = tmp.path().join("merged");
    merge(&img, &merged, false, &crate::progress::Silent).expect("merge");
    std::fs::remove_dir_all(&a).expect("remove a");
    let m = Image::open(&merged).expect("open merged");
    assert!(m.parent().is_none());
    assert_eq!(m.meta().format_version, FULL_FORMAT_VERSION);
    assert_holds(&m, &ram);
    assert_eq!(
        m.read_device_state().expect("device"),
        c.to_string_lossy().as_bytes()
    );

    // Without its base the chain is refused, naming the missing image.
    let err = Image::open(&c).err().expect("a chain without its base");
    let text = err.to_string();
    assert!(
        text.contains(&a.display().to_string()) && text.contains("missing"),
        "{text}"
    );
}

#[test]
fn a_replaced_parent_is_refused_and_a_moved_chain_still_opens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut ram: Ram = (0..8).map(|p| (p, page(p as u8))).collect();
    write_ram(&a, &ram, None);
    ram.insert(2, page(99));
    write_ram(&b, &ram, Some(&a));

    // Moved together: the parent is found next to the child.
    let moved = tmp.path().join("moved");
    std::fs::create_dir(&moved).expect("mkdir");
    std::fs::rename(&a, moved.join("a")).expect("move a");
    std::fs::rename(&b, moved.join("b")).expect("move b");
    assert_holds(&Image::open(&moved.join("b")).expect("moved chain"), &ram);

    // The parent rewritten (another image at its path): refused by identity.
    std::fs::remove_dir_all(moved.join("a")).expect("rm");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write_ram(&moved.join("a"), &ram, None);
    let err = Image::open(&moved.join("b"))
        .err()
        .expect("a replaced parent");
    assert!(err.to_string().contains("replaced"), "{err}");
}

#[test]
fn an_image_cannot_replace_its_own_parent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let ram: Ram = (0..8).map(|p| (p, page(p as u8))).collect();
    write_ram(&a, &ram, None);
    write_ram(&b, &ram, Some(&a));
    let layout = RamLayout::from_sizes([("ram0", 40 * PAGE_SIZE), ("ram1", 24 * PAGE_SIZE)]);
    for target in [&a, &b] {
        let mut w = ImageWriter::create(target, layout.clone(), true).expect("create");
        let err = w
            .set_parent(&Image::open(&b).expect("b"))
            .expect_err("refused");
        assert!(err.to_string().contains("own child"), "{err}");
    }
    assert_holds(&Image::open(&b).expect("the chain is intact"), &ram);
}

#[test]
fn an_incremental_needs_a_parent_of_the_same_layout() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tmp.path().join("a");
    write_ram(&a, &Ram::new(), None);
    let other = RamLayout::from_sizes([("ram0", 64 * PAGE_SIZE)]);
    let mut w = ImageWriter::create(&tmp.path().join("b"), other, false).expect("create");
    let err = w
        .set_parent(&Image::open(&a).expect("a"))
        .expect_err("refused");
    assert!(err.to_string().contains("layout"), "{err}");
}
