//! The engine's races, against a real process: the test binary re-runs
//! itself as a multi-threaded "mapper" (a stand-in for QEMU) that maps a
//! shared memfd the way QEMU maps guest RAM, touches pages from as many
//! threads as asked and discards ranges the way QEMU does for a balloon
//! (punch a hole, then `MADV_DONTNEED`). The engine takes over a
//! userfaultfd inside it and serves it from this process.

// Sizes here are small test constants (a 1 MiB RAM file of 256 pages).
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, ChildStdin};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use userfaultfd_sys::{
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM,
};
use xxhash_rust::xxh3::xxh3_64;

use super::*;
use crate::image::{ImageInfo, ImageWriter};
use crate::mem::RamLayout;
use crate::remote::process::QemuProcess;
use crate::remote::uffd;
use crate::wss::{Estimator, WorkingSet, WsFile};

/// Pages of the test RAM (1 MiB): 16 chunks of 16 pages.
const PAGES: u64 = 256;
/// Generous: the machine is shared and slow.
const TIMEOUT: Duration = Duration::from_secs(120);
const MAPPER_ENV: &str = "THAW_ENGINE_TEST_MAPPER";
/// The fd number the mapper finds the memfd at.
const MAPPER_FD: i32 = 3;
const TAG: &str = "THAW-MAP ";

/// Saved content of page `p`: every fourth page is all zeros.
fn content(p: u64) -> Vec<u8> {
    if p % 4 == 3 {
        return vec![0; PAGE_SIZE as usize];
    }
    (0..PAGE_SIZE / 8)
        .flat_map(|w| ((p << 32) ^ w ^ 0x7ea5_0000_0000_7ea5).to_le_bytes())
        .collect()
}

fn zeros_hash() -> u64 {
    xxh3_64(&[0u8; PAGE_SIZE as usize])
}

fn saved_hash(p: u64) -> u64 {
    xxh3_64(&content(p))
}

/// An image of one RAM block `ram0` of [`PAGES`] pages holding [`content`].
fn write_image(dir: &Path) -> Arc<Image> {
    let layout = RamLayout::from_sizes([("ram0", PAGES * PAGE_SIZE)]);
    let mut w = ImageWriter::create(dir, layout, false).expect("create image");
    w.device_state_file()
        .expect("device state file")
        .write_all(b"device state")
        .expect("write device state");
    let data: Vec<u8> = (0..PAGES).flat_map(content).collect();
    w.write_run(PageIndex(0), &data).expect("write pages");
    let vm = crate::config::VmConfig::parse(
        "name: t\nmemory: 1M\n",
        Path::new("t.yaml"),
        Path::new("/"),
    )
    .expect("config");
    w.finish(ImageInfo {
        libvirt: None,
        qemu_version: "10.0.2".into(),
        accel: "tcg".into(),
        vm,
    })
    .expect("finish image");
    Arc::new(Image::open(dir).expect("open image"))
}

/// The mapper process's side: maps fd 3 shared and obeys commands on
/// stdin. Only does anything when run as the mapper.
#[test]
fn mapper_process() {
    if std::env::var_os(MAPPER_ENV).is_none() {
        return;
    }
    mapper_main();
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{TAG}{line}");
    let _ = out.flush();
}

fn mapper_main() {
    let len = (PAGES * PAGE_SIZE) as usize;
    let base = crate::testing::map_shared(MAPPER_FD, len);
    say(&format!("ready {base:#x}"));
    let mut threads = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("mapper: stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["touch", id, pages] => {
                let id = id.to_string();
                let pages: Vec<u64> = pages.split(',').map(|p| p.parse().expect("page")).collect();
                // Said before the thread starts: its "done" may come at once.
                say(&format!("started {id}"));
                threads.push(std::thread::spawn(move || {
                    let sums: Vec<String> = pages
                        .iter()
                        .map(|&p| format!("{p}:{}", read_page(base, p)))
                        .collect();
                    say(&format!("done {id} {}", sums.join(",")));
                }));
            }
            ["discard", first, count] => {
                let (first, count): (u64, u64) =
                    (first.parse().expect("first"), count.parse().expect("count"));
                let (off, n) = (first * PAGE_SIZE, count * PAGE_SIZE);
                // What QEMU does for a balloon page: punch the file, then
                // drop the mapping (which raises the remove event).
                // SAFETY: fallocate on the inherited memfd and madvise over
                // a range inside this process's own mapping of it.
                unsafe {
                    let r = libc::fallocate(
                        MAPPER_FD,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as i64,
                        n as i64,
                    );
                    assert_eq!(r, 0, "mapper: punch");
                    let r = libc::madvise(
                        (base + off as usize) as *mut _,
                        n as usize,
                        libc::MADV_DONTNEED,
                    );
                    assert_eq!(r, 0, "mapper: madvise");
                }
                say("discarded");
            }
            ["write", id, pages] => {
                let id = id.to_string();
                let pages: Vec<u64> = pages.split(',').map(|p| p.parse().expect("page")).collect();
                say(&format!("started {id}"));
                threads.push(std::thread::spawn(move || {
                    for &p in &pages {
                        write_page(base, p);
                    }
                    say(&format!("done {id} {}:0", pages[0]));
                }));
            }
            ["exit"] => break,
            other => panic!("mapper: unknown command {other:?}"),
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Reads page `p` of the mapping at `base` word by word; its hash.
fn read_page(base: usize, p: u64) -> u64 {
    let words = (PAGE_SIZE / 8) as usize;
    let at = (base + (p * PAGE_SIZE) as usize) as *const u64;
    let mut bytes = Vec::with_capacity(PAGE_SIZE as usize);
    for i in 0..words {
        // SAFETY: `at` points at page `p` of the live mapping (p < PAGES),
        // `i` stays inside that page; volatile so every word is loaded.
        let w = unsafe { std::ptr::read_volatile(at.add(i)) };
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// What the mapper's `write` puts into page `p`.
fn written(p: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|w| ((p << 40) ^ w ^ 0x0bad_cafe_0000_0000).to_le_bytes())
        .collect()
}

fn write_page(base: usize, p: u64) {
    let at = (base + (p * PAGE_SIZE) as usize) as *mut u64;
    for (i, w) in written(p).chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        // SAFETY: `at` points at page `p` of the live shared mapping
        // (p < PAGES), `i` stays inside that page.
        unsafe { std::ptr::write_volatile(at.add(i), word) };
    }
}

/// The mapper seen from the engine's side.
struct Mapper {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// "done" lines that arrived while another reply was awaited: a thread
    /// started earlier may finish before the mapper reads the next command.
    finished: VecDeque<String>,
    memfd: OwnedFd,
    base: u64,
}

impl Mapper {
    fn spawn() -> Mapper {
        let memfd =
            nix::sys::memfd::memfd_create(c"thaw-engine-test", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create");
        nix::unistd::ftruncate(&memfd, (PAGES * PAGE_SIZE) as i64).expect("ftruncate");
        let crate::testing::Helper {
            child,
            stdin,
            lines,
        } = crate::testing::spawn(
            "engine::tests::mapper_process",
            MAPPER_ENV,
            &memfd,
            MAPPER_FD,
            TAG,
        );
        let mut m = Mapper {
            child,
            stdin,
            lines,
            finished: VecDeque::new(),
            memfd,
            base: 0,
        };
        let ready = m.expect_prefix("ready ");
        m.base = u64::from_str_radix(ready.trim_start_matches("0x"), 16).expect("address");
        m
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("to mapper");
        self.stdin.flush().expect("flush");
    }

    /// The next line from the mapper, which must start with `prefix`.
    /// "done" lines met on the way to another reply are kept for
    /// [`Mapper::next_done`].
    fn expect_prefix(&mut self, prefix: &str) -> String {
        const DONE: &str = "done ";
        if prefix == DONE {
            if let Some(l) = self.finished.pop_front() {
                return l;
            }
        }
        loop {
            let l = match self.lines.recv_timeout(TIMEOUT) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => panic!("mapper silent for {TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("mapper exited"),
            };
            if let Some(rest) = l.strip_prefix(prefix) {
                return rest.to_string();
            }
            match l.strip_prefix(DONE) {
                Some(rest) => self.finished.push_back(rest.to_string()),
                None => panic!("mapper said {l:?}, expected {prefix:?}"),
            }
        }
    }

    /// Starts a thread in the mapper that reads `pages` in order.
    fn touch(&mut self, id: &str, pages: &[u64]) {
        let list: Vec<String> = pages.iter().map(u64::to_string).collect();
        self.send(&format!("touch {id} {}", list.join(",")));
        assert_eq!(self.expect_prefix("started "), id);
    }

    /// Starts a thread in the mapper that overwrites `pages` in order
    /// with [`written`] content.
    fn write(&mut self, id: &str, pages: &[u64]) {
        let list: Vec<String> = pages.iter().map(u64::to_string).collect();
        self.send(&format!("write {id} {}", list.join(",")));
        assert_eq!(self.expect_prefix("started "), id);
    }

    /// Waits for the next finished touch: its id and (page, hash) pairs.
    fn next_done(&mut self) -> (String, Vec<(u64, u64)>) {
        let rest = self.expect_prefix("done ");
        let (id, sums) = rest.split_once(' ').expect("done line");
        let sums = sums
            .split(',')
            .map(|s| {
                let (p, h) = s.split_once(':').expect("page:hash");
                (p.parse().expect("page"), h.parse().expect("hash"))
            })
            .collect();
        (id.to_string(), sums)
    }

    /// Discards pages `first..first+count` as QEMU does for a balloon.
    fn discard(&mut self, first: u64, count: u64) {
        self.send(&format!("discard {first} {count}"));
        self.expect_prefix("discarded");
    }

    /// The engine over this mapper's RAM, with a userfaultfd taken over in
    /// it and the RAM registered for missing and minor faults.
    fn engine(&self, image: Arc<Image>) -> Engine {
        let uffd = uffd::take_over(
            &self.process(),
            UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_EVENT_REMOVE,
        )
        .expect("take over a userfaultfd in the mapper");
        uffd.register_missing_minor(HostAddr(self.base), PAGES * PAGE_SIZE)
            .expect("register");
        let file = File::from(self.memfd.try_clone().expect("dup memfd"));
        let block = BlockMap {
            id: "ram0".into(),
            start: HostAddr(self.base),
            first_page: 0,
            pages: PAGES,
            file,
        };
        Engine::new(image, Arc::new(uffd), vec![block])
    }

    /// The engine over this mapper's RAM registered for missing faults and
    /// write protection: pages in the page cache are mapped by the kernel
    /// on first touch, seen by a [`scanner::TouchScanner`] it returns too.
    fn scanning_engine(&self, image: Arc<Image>) -> (Arc<Engine>, scanner::TouchScanner) {
        let uffd = uffd::take_over(
            &self.process(),
            UFFD_FEATURE_MISSING_SHMEM
                | UFFD_FEATURE_EVENT_REMOVE
                | uffd::FEATURE_WP_HUGETLBFS_SHMEM,
        )
        .expect("take over a userfaultfd in the mapper");
        uffd.register_missing_wp(HostAddr(self.base), PAGES * PAGE_SIZE)
            .expect("register");
        let file = File::from(self.memfd.try_clone().expect("dup memfd"));
        let block = BlockMap {
            id: "ram0".into(),
            start: HostAddr(self.base),
            first_page: 0,
            pages: PAGES,
            file,
        };
        let engine =
            Arc::new(Engine::new(image, Arc::new(uffd), vec![block]).with_cached_installs(true));
        let ram = crate::vmm::RamMapping {
            id: "ram0".into(),
            start: HostAddr(self.base),
            len: PAGES * PAGE_SIZE,
            fd_path: std::path::PathBuf::new(),
        };
        let pagemap = crate::observe::pagemap::Pagemap::open(self.process().pid())
            .expect("the mapper's pagemap");
        let scanner = engine
            .start_touch_scanner(pagemap, vec![(ram, 0)])
            .expect("start the scanner");
        (engine, scanner)
    }

    /// The mapper held by pidfd.
    fn process(&self) -> QemuProcess {
        QemuProcess::open(i32::try_from(self.child.id()).expect("pid")).expect("pidfd_open")
    }

    fn exit(mut self) {
        self.send("exit");
        let status = self.child.wait().expect("wait mapper");
        assert!(status.success(), "mapper failed: {status}");
    }
}

/// Checks every (page, hash) against the saved content, or zeros for the
/// pages in `discarded`.
fn check(sums: &[(u64, u64)], discarded: &[u64]) {
    for &(p, h) in sums {
        let want = if discarded.contains(&p) {
            zeros_hash()
        } else {
            saved_hash(p)
        };
        assert_eq!(h, want, "page {p} has other content than expected");
    }
}

fn chunk_bytes(image: &Image) -> u64 {
    u64::from(image.meta().chunk_pages) * PAGE_SIZE
}

#[test]
fn faulting_threads_on_one_chunk_share_one_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut image = Arc::into_inner(write_image(&tmp.path().join("img"))).expect("image");
    // Slow reads (a quarter second per chunk): the faults pile up on one.
    image.set_read_limit(256 << 10);
    let image = Arc::new(image);
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()));
    let service = engine.start(1024).expect("start");
    // Chunk 2 is pages 32..48 in this image (zero pages are not stored,
    // so map slots through the image rather than guess).
    let PageLocation::Slot(slot) = image.locate(PageIndex(33)) else {
        panic!("page 33 is saved")
    };
    let chunk = image.chunk_of(slot);
    let pages: Vec<u64> = image
        .chunk_slots(chunk)
        .map(|s| image.slot_page(s).0)
        .collect();
    for (i, p) in pages.iter().enumerate() {
        m.touch(&format!("t{i}"), &[*p]);
    }
    // Two threads on the very same page, too.
    m.touch("again", &[pages[0]]);
    for _ in 0..=pages.len() {
        let (_, sums) = m.next_done();
        check(&sums, &[]);
    }
    assert_eq!(
        engine.counters.bytes_read.load(Ordering::Relaxed),
        chunk_bytes(&image),
        "every page of the chunk read once"
    );
    // The chunk's last job (its neighbours, none missing by now) may
    // still be queued behind the answers the faults got: it ends without
    // a read, and nothing stays pending.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while engine.fetches_pending() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(engine.fetches_pending(), 0);
    assert_eq!(
        engine.counters.bytes_read.load(Ordering::Relaxed),
        chunk_bytes(&image),
        "no page read twice"
    );
    service.stop(&engine).expect("no engine error");
    m.exit();
}

/// The same with a version-1 image (no page digests): faults read whole
/// chunks, one read for all of them.
#[test]
fn a_version_1_image_serves_faults_by_chunk() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    drop(write_image(&dir));
    crate::image::tests::downgrade_to_v1(&dir);
    let mut image = Image::open(&dir).expect("open a version-1 image");
    assert!(!image.has_page_sums());
    image.set_read_limit(256 << 10);
    let image = Arc::new(image);
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()));
    let service = engine.start(1024).expect("start");
    m.touch("a", &[33, 34]);
    m.touch("b", &[100]);
    for _ in 0..2 {
        let (_, sums) = m.next_done();
        check(&sums, &[]);
    }
    assert_eq!(
        engine.counters.bytes_read.load(Ordering::Relaxed),
        2 * chunk_bytes(&image),
        "one read per chunk"
    );
    let fill = engine.start_fill(Default::default()).expect("fill");
    fill.join(&engine)
        .expect("the fill completes a version-1 restore");
    service.stop(&engine).expect("no engine error");
    m.exit();
}

/// A fault reads, verifies and installs its own page and wakes its thread
/// before the rest of its chunk is read: with a damaged neighbour, the
/// faulting thread still gets its page, and only then does the neighbour's
/// digest stop the restore.
#[test]
fn a_fault_gets_its_page_before_the_neighbours_are_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    let image = write_image(&dir);
    let PageLocation::Slot(slot) = image.locate(PageIndex(100)) else {
        panic!("page 100 is saved")
    };
    let neighbour = if image
        .chunk_slots(image.chunk_of(slot))
        .contains(&(slot + 1))
    {
        slot + 1
    } else {
        slot - 1
    };
    drop(image);
    let pages = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("pages.bin"))
        .expect("open pages.bin");
    let at = u64::from(neighbour) * PAGE_SIZE + 5;
    let mut b = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&pages, &mut b, at).expect("read");
    std::os::unix::fs::FileExt::write_all_at(&pages, &[b[0] ^ 1], at).expect("write");
    let image = Arc::new(Image::open(&dir).expect("open"));
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()));
    let service = engine.start(1024).expect("start");
    m.touch("own", &[100]);
    let (_, sums) = m.next_done();
    check(&sums, &[]);
    // The worker goes on to the neighbours and fails on the damaged one.
    let began = Instant::now();
    while !engine.has_failed() {
        assert!(
            began.elapsed() < TIMEOUT,
            "the damaged neighbour was never read"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    match service.stop(&engine) {
        Err(EngineError::Image(crate::image::ImageError::PageChecksum { slot, .. })) => {
            assert_eq!(slot, neighbour)
        }
        other => panic!("expected the neighbour's checksum error, got {other:?}"),
    }
    m.exit();
}

/// The neighbours of one fault's chunk are read after its page, by at most
/// half of the workers: a fault on another chunk meanwhile gets its page
/// without waiting for them.
#[test]
fn a_fault_does_not_wait_for_another_faults_neighbours() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut image = Arc::into_inner(write_image(&tmp.path().join("img"))).expect("image");
    // A quarter second per page, four seconds for a chunk's neighbours.
    image.set_read_limit(16 << 10);
    let image = Arc::new(image);
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()).with_fetch_workers(2));
    let service = engine.start(1024).expect("start");
    let chunk_of = |p: u64| match image.locate(PageIndex(p)) {
        PageLocation::Slot(s) => image.chunk_of(s),
        PageLocation::Zero => panic!("page {p} is saved"),
    };
    assert!(chunk_of(100) != chunk_of(150) && chunk_of(150) != chunk_of(200));
    // Two faults whose neighbours both workers could be reading, then a
    // third: it must not wait for the first one's neighbours.
    for (id, page) in [("first", 100), ("second", 150), ("third", 200)] {
        m.touch(id, &[page]);
        check(&m.next_done().1, &[]);
    }
    let missing = image
        .chunk_slots(chunk_of(100))
        .filter(|&s| !engine.pages.is_resident(image.slot_page(s)))
        .count();
    assert!(
        missing > 0,
        "the third fault waited until the first one's neighbours were in"
    );
    service.stop(&engine).expect("no engine error");
    m.exit();
}

#[test]
fn a_slow_read_holds_up_only_its_own_fault() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut image = Arc::into_inner(write_image(&tmp.path().join("img"))).expect("image");
    // Four seconds per 64 KiB chunk.
    image.set_read_limit(16 << 10);
    let image = Arc::new(image);
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()));
    let service = engine.start(1024).expect("start");
    m.touch("slow", &[100]);
    // Zero pages, answered by the fault thread itself while the read of
    // page 100's chunk is still going on.
    m.touch("zeros", &[3, 7, 11, 203]);
    let (first, sums) = m.next_done();
    assert_eq!(first, "zeros", "a zero-page fault waited behind a read");
    check(&sums, &[]);
    let (second, sums) = m.next_done();
    assert_eq!(second, "slow");
    check(&sums, &[]);
    service.stop(&engine).expect("no engine error");
    m.exit();
}

#[test]
fn faults_race_the_prefetch_and_the_fill() {
    let tmp = tempfile::tempdir().expect("tmp");
    let image = write_image(&tmp.path().join("img"));
    let every_third: Vec<PageIndex> = (0..PAGES).step_by(3).map(PageIndex).collect();
    crate::wss::write(
        &image,
        &WorkingSet::from_touches(Estimator::Learned, &every_third),
    )
    .expect("write working set");
    let ws = WsFile::open(&image, Estimator::Learned)
        .expect("open working set")
        .expect("a working set");
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()));
    let service = engine.start(1024).expect("start");
    engine.set_resumed();
    // Four threads sweep all of RAM in different orders while the prefetch
    // and the fill install the same pages.
    let forward: Vec<u64> = (0..PAGES).collect();
    let backward: Vec<u64> = (0..PAGES).rev().collect();
    let odd_first: Vec<u64> = (0..PAGES)
        .filter(|p| p % 2 == 1)
        .chain((0..PAGES).filter(|p| p % 2 == 0))
        .collect();
    let strided: Vec<u64> = (0..PAGES).map(|i| (i * 37) % PAGES).collect();
    m.touch("forward", &forward);
    m.touch("backward", &backward);
    let prefetcher = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.prefetch(&ws, false))
    };
    let fill = engine.start_fill(Default::default()).expect("fill");
    m.touch("odd", &odd_first);
    m.touch("strided", &strided);
    for _ in 0..4 {
        let (_, sums) = m.next_done();
        check(&sums, &[]);
    }
    prefetcher
        .join()
        .expect("prefetch thread")
        .expect("prefetch: already-there pages are no error");
    fill.join(&engine).expect("fill");
    assert_eq!(engine.remaining(), 0);
    service.stop(&engine).expect("no engine error");
    m.exit();
}

/// A learning restore: a fault's neighbours and the fill go into the page
/// cache, so the guest's first touch of each is seen (a minor fault); and
/// while the fill writes the page cache, guest writes racing it are never
/// overwritten with saved data.
#[test]
fn cached_installs_see_every_first_touch_and_never_overwrite_the_guest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let image = write_image(&tmp.path().join("img"));
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()).with_cached_installs(true));
    let service = engine.start(1024).expect("start");
    engine.set_resumed();
    m.touch("fault", &[100]);
    check(&m.next_done().1, &[]);
    let PageLocation::Slot(slot) = image.locate(PageIndex(100)) else {
        panic!("page 100 is saved")
    };
    let neighbour = image
        .slot_page(image.chunk_slots(image.chunk_of(slot)).start)
        .0;
    assert_ne!(neighbour, 100);
    // Wait until the fetch put the neighbour into the page cache.
    let began = Instant::now();
    while !engine.pages.is_resident(PageIndex(neighbour)) {
        assert!(began.elapsed() < TIMEOUT, "the neighbours never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let minor_before = engine.counters.minor_faults.load(Ordering::Relaxed);
    m.touch("neighbour", &[neighbour]);
    check(&m.next_done().1, &[]);
    assert!(
        engine.counters.minor_faults.load(Ordering::Relaxed) > minor_before,
        "the neighbour was mapped before the guest touched it"
    );
    // Writers in two orders race the fill.
    let evens: Vec<u64> = (0..PAGES).filter(|p| p % 2 == 0).collect();
    let odds_down: Vec<u64> = (0..PAGES).filter(|p| p % 2 == 1).rev().collect();
    m.write("evens", &evens);
    let fill = engine.start_fill(Default::default()).expect("fill");
    m.write("odds", &odds_down);
    for _ in 0..2 {
        m.next_done();
    }
    fill.join(&engine).expect("fill");
    let all: Vec<u64> = (0..PAGES).collect();
    m.touch("readback", &all);
    for (p, h) in m.next_done().1 {
        assert_eq!(
            h,
            xxh3_64(&written(p)),
            "the guest's write to page {p} was lost"
        );
    }
    let log = service.stop(&engine).expect("no engine error");
    for p in [100, neighbour] {
        assert!(log.touches.contains(&PageIndex(p)), "touch of {p} not seen");
    }
    assert_eq!(
        log.touches.len() as u64,
        PAGES,
        "every page's first touch is seen"
    );
    m.exit();
}

/// Learning from the page tables: cached pages are mapped by the kernel
/// on first touch without a fault to thaw, the scanner records exactly the
/// pages touched (no pages mapped around them), and guest writes racing
/// the cached fill are never overwritten.
#[test]
fn page_tables_show_exactly_the_touched_pages() {
    if !crate::observe::pagemap::Pagemap::scan_supported()
        || uffd::kernel_features().unwrap_or(0) & uffd::FEATURE_WP_HUGETLBFS_SHMEM == 0
    {
        eprintln!("skipped: this kernel lacks PAGEMAP_SCAN or write protection of shared memory");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let image = write_image(&tmp.path().join("img"));
    let mut m = Mapper::spawn();
    let (engine, scanner) = m.scanning_engine(image.clone());
    let service = engine.start(1024).expect("start");
    engine.set_resumed();
    m.touch("fault", &[100]);
    check(&m.next_done().1, &[]);
    let PageLocation::Slot(slot) = image.locate(PageIndex(100)) else {
        panic!("page 100 is saved")
    };
    let neighbour = image
        .slot_page(image.chunk_slots(image.chunk_of(slot)).start)
        .0;
    assert_ne!(neighbour, 100);
    let began = Instant::now();
    while !engine.pages.is_resident(PageIndex(neighbour)) {
        assert!(began.elapsed() < TIMEOUT, "the neighbours never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    scanner.wait_next_scan();
    assert!(
        !engine.pages.touched.test(PageIndex(neighbour)),
        "a neighbour in the page cache looks touched before the guest touched it"
    );
    // Writers in two orders race the fill over pages 0..128.
    let evens: Vec<u64> = (0..128).filter(|p| p % 2 == 0).collect();
    let odds_down: Vec<u64> = (0..128).filter(|p| p % 2 == 1).rev().collect();
    m.write("evens", &evens);
    let fill = engine.start_fill(Default::default()).expect("fill");
    m.write("odds", &odds_down);
    for _ in 0..2 {
        m.next_done();
    }
    fill.join(&engine).expect("fill");
    // One read of a cached page far from every other touch: only it is
    // mapped (no fault-around), and thaw saw no fault for it.
    scanner.wait_next_scan();
    let faults_before = engine.counters.faults_after_resume.load(Ordering::Relaxed);
    m.touch("lone", &[200]);
    check(&m.next_done().1, &[]);
    scanner.wait_next_scan();
    assert!(
        engine.pages.touched.test(PageIndex(200)),
        "the read of page 200 was not seen"
    );
    for p in (184..216).filter(|&p| p != 200) {
        assert!(
            !engine.pages.touched.test(PageIndex(p)),
            "page {p} looks touched: mapped around page 200"
        );
    }
    assert_eq!(
        engine.counters.faults_after_resume.load(Ordering::Relaxed),
        faults_before,
        "a cached page's first touch went through thaw"
    );
    assert_eq!(engine.counters.minor_faults.load(Ordering::Relaxed), 0);
    let all: Vec<u64> = (0..PAGES).collect();
    m.touch("readback", &all);
    for (p, h) in m.next_done().1 {
        let want = if p < 128 {
            xxh3_64(&written(p))
        } else if p % 4 == 3 {
            zeros_hash()
        } else {
            saved_hash(p)
        };
        assert_eq!(h, want, "page {p} holds other content than expected");
    }
    let scanned = scanner.finish().expect("scanner");
    let log = service.stop(&engine).expect("no engine error");
    let mut seen: Vec<u64> = log
        .touches
        .iter()
        .chain(&scanned.touches)
        .map(|p| p.0)
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, all, "every page's first touch is seen, once");
    m.exit();
}

#[test]
fn discards_during_a_fill_read_as_zeros_and_are_not_refilled() {
    let tmp = tempfile::tempdir().expect("tmp");
    let image = write_image(&tmp.path().join("img"));
    let mut m = Mapper::spawn();
    // The fill runs at 128 KiB/s once the guest runs: eight seconds for
    // all of RAM, so the discards below land while most is missing.
    let log_path = tmp.path().join("discards.bin");
    let log = File::create(&log_path).expect("discard log");
    let engine = Arc::new(
        m.engine(image.clone())
            .with_fill_limit(Some(128 << 10))
            .with_discard_log(log),
    );
    let service = engine.start(1024).expect("start");
    engine.set_resumed();
    // Some pages are in before the discards: faulted, with their chunk.
    m.touch("before", &[0, 1, 2]);
    let (_, sums) = m.next_done();
    check(&sums, &[]);
    let fill = engine.start_fill(Default::default()).expect("fill");
    // A resident range and a missing one, each as QEMU discards a page.
    m.discard(0, 4);
    m.discard(200, 10);
    let discarded: Vec<u64> = (0..4).chain(200..210).collect();
    fill.join(&engine).expect("fill");
    assert_eq!(engine.remaining(), 0, "discarded pages count as done");
    assert_eq!(engine.discarded_pages(), 14);
    // The guest reads its discarded pages as zeros (no spinning on a
    // page thaw had installed), everything else as saved.
    let all: Vec<u64> = (0..PAGES).collect();
    m.touch("after", &all);
    let (_, sums) = m.next_done();
    check(&sums, &discarded);
    assert!(engine.counters.discarded_faults.load(Ordering::Relaxed) >= 1);
    // No stale saved copy in the RAM file either.
    let file = File::from(m.memfd.try_clone().expect("dup"));
    for p in &discarded {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut page, p * PAGE_SIZE).expect("read");
        assert!(page.iter().all(|&b| b == 0), "page {p} was refilled");
    }
    // The log a recovery would read: both discards, as (first, count).
    let logged = std::fs::read(&log_path).expect("read discard log");
    let records: Vec<(u64, u64)> = logged
        .chunks_exact(16)
        .map(|r| {
            let w = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
            (w(&r[..8]), w(&r[8..]))
        })
        .collect();
    assert_eq!(records, [(0, 4), (200, 10)]);
    service.stop(&engine).expect("no engine error");
    m.exit();
}

#[test]
fn a_zap_is_no_discard() {
    let tmp = tempfile::tempdir().expect("tmp");
    let image = write_image(&tmp.path().join("img"));
    let mut m = Mapper::spawn();
    let engine = Arc::new(m.engine(image.clone()));
    let service = engine.start(1024).expect("start");
    let fill = engine.start_fill(Default::default()).expect("fill");
    fill.join(&engine).expect("fill");
    let process = m.process();
    let started = Instant::now();
    engine
        .zapping(|| {
            crate::remote::inject::madvise_dontneed(&process, HostAddr(m.base), PAGES * PAGE_SIZE)
        })
        .expect("zap");
    assert!(started.elapsed() < TIMEOUT);
    assert_eq!(engine.discarded_pages(), 0);
    let all: Vec<u64> = (0..PAGES).collect();
    m.touch("after", &all);
    let (_, sums) = m.next_done();
    check(&sums, &[]);
    service.stop(&engine).expect("no engine error");
    m.exit();
}
