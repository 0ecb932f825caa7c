//! Working-set files: round trip, learned refinement, damage detection.
// Test fixtures: casts of small constants and of the tests' own values
// (their children's pids, page numbers below 64); a wrong one fails a test.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::*;
use crate::image::tests::write_image;

fn pages(list: &[u64]) -> Vec<PageIndex> {
    list.iter().map(|&p| PageIndex(p)).collect()
}

#[test]
fn round_trip_streams_pages_in_prefetch_order_with_their_saved_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img_dir = dir.path().join("img");
    let saved = write_image(&img_dir);
    let image = Image::open(&img_dir).expect("open");
    // 7 is an all-zero page: listed, but without data.
    let order = pages(&[50, 3, 7, 1, 20, 3]);
    let ws = WorkingSet::from_touches(Estimator::Trace, &order);
    assert_eq!(ws.pages.len(), 5, "duplicates dropped");
    let path = write(&image, &ws).expect("write");
    let mode = std::fs::metadata(&path).expect("stat").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let f = WsFile::open(&image, Estimator::Trace)
        .expect("open")
        .expect("present");
    assert_eq!(f.set, ws);
    assert_eq!(f.data_pages(), 4);
    let mut got = Vec::new();
    f.stream(None, |ps, data| {
        for (p, d) in ps.iter().zip(data.chunks(PAGE_SIZE as usize)) {
            got.push((p.0, d.to_vec()));
        }
        Ok(())
    })
    .expect("stream");
    let want: Vec<(u64, Vec<u8>)> = [50u64, 3, 1, 20]
        .iter()
        .map(|p| {
            saved
                .iter()
                .find(|(q, _)| q == p)
                .cloned()
                .expect("saved page")
        })
        .collect();
    assert_eq!(got, want);
    assert!(WsFile::open(&image, Estimator::Abit)
        .expect("open")
        .is_none());
}

#[test]
fn learned_refinement_adds_misses_and_drops_idle_pages() {
    let first = WorkingSet::from_touches(Estimator::Learned, &pages(&[1, 2, 3]));
    let second = first.refine(&pages(&[3, 9]));
    let view = |ws: &WorkingSet| {
        ws.pages
            .iter()
            .map(|p| (p.page.0, p.idle))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&second), [(3, 0), (9, 0), (1, 1), (2, 1)]);
    assert_eq!(second.updates, 1);
    let mut ws = second;
    for _ in 1..LEARNED_DROP_AFTER {
        ws = ws.refine(&pages(&[3, 9]));
    }
    assert_eq!(
        view(&ws),
        [(3, 0), (9, 0)],
        "pages idle {LEARNED_DROP_AFTER} times are gone"
    );
}

#[test]
fn damage_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img_dir = dir.path().join("img");
    write_image(&img_dir);
    let image = Image::open(&img_dir).expect("open");
    let ws = WorkingSet::from_touches(Estimator::Learned, &pages(&[1, 3, 4, 5]));
    let path = write(&image, &ws).expect("write");
    let good = std::fs::read(&path).expect("read");

    // A flipped byte in the entry table: refused at open.
    let mut bad = good.clone();
    bad[HEADER_LEN as usize + 1] ^= 1;
    std::fs::write(&path, &bad).expect("write");
    assert!(matches!(
        WsFile::open(&image, Estimator::Learned),
        Err(WsError::Damaged { .. })
    ));

    // A flipped byte in the page data: found while streaming, before install.
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&path, &bad).expect("write");
    let f = WsFile::open(&image, Estimator::Learned)
        .expect("structure is intact")
        .expect("present");
    let mut installed = 0;
    let r = f.stream(None, |ps, _| {
        installed += ps.len();
        Ok(())
    });
    assert!(matches!(r, Err(WsError::Damaged { .. })), "{r:?}");
    assert_eq!(installed, 0, "nothing from a bad chunk was handed on");

    // Truncated: refused at open.
    std::fs::write(&path, &good[..good.len() - 10]).expect("write");
    assert!(WsFile::open(&image, Estimator::Learned).is_err());
}

#[test]
fn pages_outside_the_image_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img_dir = dir.path().join("img");
    write_image(&img_dir);
    let image = Image::open(&img_dir).expect("open");
    let ws = WorkingSet::from_touches(Estimator::Learned, &pages(&[1, 64]));
    assert!(write(&image, &ws).is_err());
    assert!(!Estimator::Learned.path_in(&img_dir).exists());
}

#[test]
fn estimates_round_trip_and_damage_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = estimate_path(dir.path(), Estimator::Abit);
    assert_eq!(read_estimate(&path, 64).expect("read"), None);
    write_estimate(&path, &pages(&[9, 2, 7])).expect("write");
    assert_eq!(
        read_estimate(&path, 64).expect("read"),
        Some(pages(&[9, 2, 7]))
    );
    // More entries than the VM has pages: refused before it is read.
    assert!(read_estimate(&path, 2).is_err());
    let mut data = std::fs::read(&path).expect("read");
    data[17] ^= 1;
    std::fs::write(&path, &data).expect("write");
    assert!(read_estimate(&path, 64).is_err());
}

/// An image with the same layout as [`write_image`]'s but other data.
fn write_other_image(dir: &Path) {
    use crate::mem::RamLayout;
    use std::io::Write;
    let layout = RamLayout::from_sizes([("ram0", 40 * PAGE_SIZE), ("ram1", 24 * PAGE_SIZE)]);
    let mut w = crate::image::ImageWriter::create(dir, layout, false).expect("create");
    w.device_state_file()
        .expect("dev")
        .write_all(b"other device state")
        .expect("write");
    for p in [1u64, 3, 4, 5] {
        w.write_run(PageIndex(p), &crate::image::tests::page(0x5a))
            .expect("run");
    }
    w.finish(crate::image::ImageInfo {
        libvirt: None,
        qemu_version: "10.0.2".into(),
        accel: "tcg".into(),
        vm: crate::config::VmConfig::parse(
            "name: t\nmemory: 1M\n",
            Path::new("t.yaml"),
            Path::new("/"),
        )
        .expect("config"),
    })
    .expect("finish");
}

#[test]
fn another_images_working_set_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    write_image(&a_dir);
    write_other_image(&b_dir);
    let (a, b) = (
        Image::open(&a_dir).expect("open a"),
        Image::open(&b_dir).expect("open b"),
    );
    assert_eq!(a.meta().total_pages, b.meta().total_pages);
    assert_ne!(a.identity(), b.identity());
    let ws = WorkingSet::from_touches(Estimator::Learned, &pages(&[1, 3, 4, 5]));
    let path = write(&a, &ws).expect("write");
    std::fs::copy(&path, Estimator::Learned.path_in(&b_dir)).expect("copy");
    let err = WsFile::open(&b, Estimator::Learned)
        .err()
        .expect("foreign file refused");
    assert!(
        matches!(err, WsError::ForeignImage { expected, found, .. }
            if expected == b.identity() && found == a.identity()),
        "{err:?}"
    );
    assert!(WsFile::open(&a, Estimator::Learned)
        .expect("own file")
        .is_some());
}

#[test]
fn a_version_1_file_is_treated_as_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img_dir = dir.path().join("img");
    write_image(&img_dir);
    let image = Image::open(&img_dir).expect("open");
    let ws = WorkingSet::from_touches(Estimator::Abit, &pages(&[1, 3]));
    let path = write(&image, &ws).expect("write");
    let mut data = std::fs::read(&path).expect("read");
    data[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&path, &data).expect("write");
    assert!(WsFile::open(&image, Estimator::Abit)
        .expect("not an error")
        .is_none());
    // A newer version than this thaw knows stays an error.
    data[8..12].copy_from_slice(&(WS_FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&path, &data).expect("write");
    assert!(WsFile::open(&image, Estimator::Abit).is_err());
}

/// A second set streams only the chunks holding pages the first lacked.
#[test]
fn a_stream_skips_chunks_without_needed_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img_dir = dir.path().join("img");
    write_image(&img_dir);
    let image = Image::open(&img_dir).expect("open");
    // 19 data pages: two checksummed chunks (16 + 3).
    let order = pages(&[
        1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 50,
    ]);
    write(&image, &WorkingSet::from_touches(Estimator::Trace, &order)).expect("write");
    let f = WsFile::open(&image, Estimator::Trace)
        .expect("open")
        .expect("present");
    let mut got = Vec::new();
    let read = f
        .stream_needed(
            None,
            |p| p.0 == 50,
            |ps, _| {
                got.extend(ps.iter().map(|p| p.0));
                Ok(())
            },
        )
        .expect("stream");
    assert_eq!(read, 3 * PAGE_SIZE, "only the second chunk was read");
    assert_eq!(got, [19, 20, 50]);
    let read = f
        .stream_needed(None, |_| false, |_, _| Ok(()))
        .expect("stream");
    assert_eq!(read, 0);
}

/// Verdicts count hits, misses and unused pages of each set and of the
/// union of learned and trace, over saved pages only.
#[test]
fn verdicts_score_each_set_against_the_touches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img_dir = dir.path().join("img");
    write_image(&img_dir);
    let image = Image::open(&img_dir).expect("open");
    write(
        &image,
        &WorkingSet::from_touches(Estimator::Learned, &pages(&[1, 3, 4])),
    )
    .expect("w");
    write(
        &image,
        &WorkingSet::from_touches(Estimator::Trace, &pages(&[4, 5, 6, 50])),
    )
    .expect("w");
    let sets: Vec<WsFile> = [Estimator::Learned, Estimator::Trace]
        .iter()
        .filter_map(|&e| WsFile::open(&image, e).expect("open"))
        .collect();
    // Page 7 is a zero page of the image: not counted.
    let v = evidence::verdicts(&image, &sets, &pages(&[3, 4, 5, 7, 8]));
    let got: Vec<(String, u64, u64, u64)> = v
        .iter()
        .map(|v| (v.candidate.name(), v.hits, v.missed, v.unused))
        .collect();
    assert_eq!(
        got,
        [
            ("learned".to_string(), 2, 2, 1),
            ("trace".to_string(), 2, 2, 2),
            ("learned+trace".to_string(), 3, 1, 3),
        ]
    );
}
