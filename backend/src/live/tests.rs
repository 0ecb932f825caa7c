//! The live copy against a real process: the test binary re-runs itself
//! as a "scribbler" (a stand-in for QEMU) that maps a shared memfd the way
//! QEMU maps guest RAM and overwrites whole pages from several threads
//! without pause. The copy's instant is a moment the scribbler is stopped
//! (SIGSTOP), when the test reads the whole memfd as the truth; the image
//! must equal it page for page, whatever was written during the copy.

// Sizes here are small test constants.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, ChildStdin};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::pages::{PageStates, SideStore, COPYING, NOT_SAVED, SAVED};
use super::*;
use crate::remote::process::QemuProcess;

/// Pages of the test RAM (2 MiB).
const PAGES: u64 = 512;
const TIMEOUT: Duration = Duration::from_secs(120);
const SCRIBBLER_ENV: &str = "THAW_LIVE_TEST_SCRIBBLER";
const SCRIBBLER_FD: i32 = 3;
const TAG: &str = "THAW-SCRIBBLE ";
const WRITERS: u64 = 3;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{TAG}{line}");
    let _ = out.flush();
}

/// The scribbler's side: maps fd 3 and lets writer threads overwrite
/// pages; obeys `discard <first> <count>` on stdin; exits at its end.
#[test]
fn scribbler_process() {
    if std::env::var_os(SCRIBBLER_ENV).is_none() {
        return;
    }
    let len = (PAGES * PAGE_SIZE) as usize;
    let base = crate::testing::map_shared(SCRIBBLER_FD, len);
    for t in 0..WRITERS {
        std::thread::spawn(move || {
            let mut step = 0u64;
            loop {
                // Each writer owns the pages p ≡ t (mod WRITERS).
                let p = (step * WRITERS + t) % PAGES;
                let at = (base + (p * PAGE_SIZE) as usize) as *mut u64;
                for k in 0..(PAGE_SIZE / 8) as usize {
                    // SAFETY: page p < PAGES of the live mapping, word k
                    // inside it.
                    unsafe {
                        std::ptr::write_volatile(at.add(k), (t << 60) | (step << 12) | k as u64)
                    };
                }
                step += 1;
                if step % 64 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
    }
    say(&format!("ready {base:#x}"));
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("scribbler: stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        // As QEMU discards a balloon page: punch, then madvise (whose
        // remove event thaw sees); `dontneed` only the madvise.
        if let [what @ ("discard" | "dontneed"), first, count] = words.as_slice() {
            let (first, count): (u64, u64) = (first.parse().expect("n"), count.parse().expect("n"));
            if *what != "dontneed" {
                // SAFETY: fallocate on the inherited memfd.
                let r = unsafe {
                    libc::fallocate(
                        SCRIBBLER_FD,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (first * PAGE_SIZE) as i64,
                        (count * PAGE_SIZE) as i64,
                    )
                };
                assert_eq!(r, 0, "scribbler: punch");
            }
            {
                // SAFETY: madvise inside this process's own mapping.
                let r = unsafe {
                    libc::madvise(
                        (base + (first * PAGE_SIZE) as usize) as *mut _,
                        (count * PAGE_SIZE) as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                assert_eq!(r, 0, "scribbler: madvise");
            }
            say("discarded");
        }
    }
    std::process::exit(0);
}

/// The scribbler seen from thaw's side.
struct Scribbler {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    memfd: OwnedFd,
    base: u64,
}

impl Scribbler {
    /// Starts it on a memfd whose first `filled` pages hold data, the
    /// rest holes (until the writers get there).
    fn spawn(filled: u64) -> Scribbler {
        let memfd =
            nix::sys::memfd::memfd_create(c"thaw-live-test", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create");
        nix::unistd::ftruncate(&memfd, (PAGES * PAGE_SIZE) as i64).expect("ftruncate");
        let file = File::from(memfd.try_clone().expect("dup"));
        file.write_all_at(&vec![0x5a; (filled * PAGE_SIZE) as usize], 0)
            .expect("fill");
        let crate::testing::Helper {
            child,
            stdin,
            lines,
        } = crate::testing::spawn(
            "live::tests::scribbler_process",
            SCRIBBLER_ENV,
            &memfd,
            SCRIBBLER_FD,
            TAG,
        );
        let mut s = Scribbler {
            child,
            stdin,
            lines,
            memfd,
            base: 0,
        };
        let ready = s.expect("ready ");
        s.base = u64::from_str_radix(ready.trim_start_matches("0x"), 16).expect("address");
        s
    }

    fn expect(&mut self, prefix: &str) -> String {
        let line = self.lines.recv_timeout(TIMEOUT).expect("scribbler silent");
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("scribbler said {line:?}, expected {prefix:?}"))
            .to_string()
    }

    fn discard(&mut self, first: u64, count: u64) {
        self.discard_as("discard", first, count);
    }

    /// `discard`, or `dontneed` (the mapping only).
    fn discard_as(&mut self, what: &str, first: u64, count: u64) {
        writeln!(self.stdin, "{what} {first} {count}").expect("to scribbler");
        self.stdin.flush().expect("flush");
        self.expect("discarded");
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Stops every thread of the scribbler and waits until it is stopped.
    fn freeze(&self) {
        kill(self.pid(), Signal::SIGSTOP).expect("SIGSTOP");
        match waitpid(self.pid(), Some(WaitPidFlag::WUNTRACED)).expect("waitpid") {
            WaitStatus::Stopped(_, _) => {}
            other => panic!("scribbler not stopped: {other:?}"),
        }
    }

    fn thaw(&self) {
        kill(self.pid(), Signal::SIGCONT).expect("SIGCONT");
    }

    /// The whole memfd now.
    fn contents(&self) -> Vec<u8> {
        let mut all = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        File::from(self.memfd.try_clone().expect("dup"))
            .read_exact_at(&mut all, 0)
            .expect("read memfd");
        all
    }

    /// A live copy of its memory, armed (all of it protected), with no
    /// speculative pre-copy.
    fn live_copy(&self) -> LiveCopy {
        self.live_copy_with(&Speculation::default())
    }

    /// A live copy of its memory, armed with `speculation`.
    fn live_copy_with(&self, speculation: &Speculation) -> LiveCopy {
        let process = QemuProcess::open(self.child.id() as i32).expect("open scribbler");
        let uffd = uffd::take_over(&process, FEATURES).expect("take over a userfaultfd");
        uffd.close_remote().expect("close the scribbler's copy");
        let range = LiveRange {
            id: "ram0".into(),
            start: HostAddr(self.base),
            len: PAGES * PAGE_SIZE,
            first_page: 0,
            file: File::from(self.memfd.try_clone().expect("dup")),
        };
        let scratch = tempfile_in_tmp();
        LiveCopy::start(Arc::new(uffd), vec![range], scratch, PAGES, speculation)
            .expect("start the live copy")
    }
}

impl Drop for Scribbler {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Punches pages `first..first+count` out of `memfd`.
fn punch(memfd: &OwnedFd, first: u64, count: u64) {
    nix::fcntl::fallocate(
        memfd,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        (first * PAGE_SIZE) as i64,
        (count * PAGE_SIZE) as i64,
    )
    .expect("punch");
}

/// An unnamed scratch file.
fn tempfile_in_tmp() -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(std::env::temp_dir())
        .expect("O_TMPFILE")
}

/// Copies into a map of page → bytes (the image writer's stand-in).
fn copy_all(
    live: &mut LiveCopy,
    throttle: Option<&Throttle>,
) -> Result<HashMap<u64, Vec<u8>>, LiveError> {
    let mut image = HashMap::new();
    let mut last = None;
    live.copy(
        |first, data| {
            assert!(last < Some(first.0), "runs out of order");
            last = Some(first.0);
            for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
                assert!(
                    image.insert(first.0 + i as u64, page.to_vec()).is_none(),
                    "page {} handed over twice",
                    first.0 + i as u64
                );
            }
            Ok(())
        },
        throttle,
        &crate::progress::Silent,
    )?;
    Ok(image)
}

fn skip_without_wp() -> bool {
    if check_kernel().is_err() {
        eprintln!("skipped: no userfaultfd write protection of shared memory");
        return true;
    }
    false
}

#[test]
fn the_image_holds_the_instant_while_the_process_writes_on() {
    if skip_without_wp() {
        return;
    }
    let mut s = Scribbler::spawn(PAGES / 2);
    let live = s.live_copy();
    // A discard before the instant; the writers fill the page again.
    s.discard(PAGES / 4, 4);
    let (stats, _, truth) = copy_while_writing(&s, live);
    assert!(stats.wp_faults > 0, "no write met the copy: {stats:?}");
    assert!(stats.saved_ahead > 0, "{stats:?}");
    // The writers were never stopped for good: the memory moved on.
    assert_ne!(s.contents(), truth);
}

/// Lets `s` write on `live`'s armed memory for a while, takes the
/// instant, copies (paced: 2 MiB take about 2 s of writes) and checks
/// that the image is the instant. Returns the copy's outcome and the
/// memory at the instant.
fn copy_while_writing(s: &Scribbler, mut live: LiveCopy) -> (LiveStats, Vec<PageIndex>, Vec<u8>) {
    std::thread::sleep(Duration::from_millis(50));
    s.freeze();
    let truth = s.contents();
    live.protect().expect("protect at the instant");
    s.thaw();
    let throttle = Throttle::new(1 << 20);
    let image = copy_all(&mut live, Some(&throttle)).expect("copy");
    let (stats, written) = live.finish().expect("finish");
    assert_is_instant(&image, &truth);
    (stats, written, truth)
}

/// `image` holds every page of `truth` (absent pages are zero there).
fn assert_is_instant(image: &HashMap<u64, Vec<u8>>, truth: &[u8]) {
    for p in 0..PAGES {
        let want = &truth[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
        match image.get(&p) {
            Some(got) => assert!(got == want, "page {p} differs from the instant"),
            None => assert!(
                want.iter().all(|&b| b == 0),
                "page {p} with data was not copied"
            ),
        }
    }
}

/// [`copy_while_writing`] of a copy armed with `speculation`.
fn speculative_copy(speculation: &Speculation) -> (LiveStats, Vec<PageIndex>) {
    let s = Scribbler::spawn(PAGES / 2);
    let live = s.live_copy_with(speculation);
    let (stats, written, _) = copy_while_writing(&s, live);
    (stats, written)
}

#[test]
fn predicted_pages_are_copied_in_the_pause_and_never_fault() {
    if skip_without_wp() {
        return;
    }
    // Every page predicted: nothing is protected, the pause copies all.
    let (stats, written) = speculative_copy(&Speculation {
        predicted: (0..PAGES).rev().map(PageIndex).collect(),
        budget_pages: PAGES,
        source: "test",
        in_pause: true,
    });
    assert_eq!(stats.predicted_pages, PAGES, "{stats:?}");
    assert_eq!(stats.speculated_pages, PAGES, "{stats:?}");
    assert_eq!(stats.wp_faults, 0, "{stats:?}");
    assert_eq!(stats.reprotected_pages, 0, "{stats:?}");
    // The prediction is carried on for the next checkpoint.
    assert_eq!(written.len() as u64, PAGES);
}

#[test]
fn predicted_pages_are_copied_first_after_the_resume() {
    if skip_without_wp() {
        return;
    }
    // Every page predicted, copied after the resume: all are protected
    // in the pause, and each is saved once, by that first pass or, if
    // the scribbler wrote it sooner, by the fault thread.
    let (stats, _) = speculative_copy(&Speculation {
        predicted: (0..PAGES).rev().map(PageIndex).collect(),
        budget_pages: PAGES,
        source: "test",
        in_pause: false,
    });
    assert_eq!(stats.speculated_at, "resume", "{stats:?}");
    assert_eq!(stats.reprotected_pages, PAGES, "{stats:?}");
    assert!(stats.speculated_pages > 0, "{stats:?}");
    assert_eq!(
        stats.speculated_pages + stats.saved_ahead,
        PAGES,
        "{stats:?}"
    );
}

#[test]
fn writes_while_arming_beyond_the_budget_are_protected_again() {
    if skip_without_wp() {
        return;
    }
    // Nothing predicted: the scribbler's writes while arming are noted;
    // 16 of them are copied in the pause, the rest protected again and
    // copied on write after the instant.
    let (stats, written) = speculative_copy(&Speculation {
        predicted: Vec::new(),
        budget_pages: 16,
        source: "test",
        in_pause: true,
    });
    assert_eq!(stats.speculated_pages, 16, "{stats:?}");
    assert!(stats.reprotected_pages > 0, "{stats:?}");
    assert!(stats.arm_faults > 16, "{stats:?}");
    assert!(stats.wp_faults > stats.arm_faults, "{stats:?}");
    assert!(
        written.len() as u64 > stats.arm_faults.min(PAGES) / 2,
        "{stats:?}"
    );
}

#[test]
fn a_discard_of_unsaved_pages_after_the_instant_fails_the_copy() {
    if skip_without_wp() {
        return;
    }
    let (mut s, live) = at_the_instant(PAGES);
    // The last pages are copied last: discarded before the copier gets there.
    discard_the_last_pages_after_the_instant(&mut s, live);
}

/// Lets the scribbler (stopped at `live`'s instant) run on, discards its
/// last 8 pages and checks that the copy fails for it.
fn discard_the_last_pages_after_the_instant(s: &mut Scribbler, mut live: LiveCopy) {
    s.thaw();
    s.discard(PAGES - 8, 8);
    assert_discarded(
        copy_all(&mut live, None)
            .err()
            .or_else(|| live.finish().err()),
    );
}

#[test]
fn a_discard_while_arming_is_protected_again_not_copied() {
    if skip_without_wp() {
        return;
    }
    // The discarded pages are predicted, yet they are protected again
    // in the pause, and their discard after it fails the copy as before.
    let mut s = Scribbler::spawn(PAGES);
    let mut live = s.live_copy_with(&Speculation {
        predicted: (PAGES - 8..PAGES).map(PageIndex).collect(),
        budget_pages: PAGES,
        source: "test",
        in_pause: true,
    });
    s.discard(PAGES - 8, 8);
    s.freeze();
    live.protect().expect("protect");
    assert!(live.stats().reprotected_pages >= 8, "{:?}", live.stats());
    discard_the_last_pages_after_the_instant(&mut s, live);
}

/// A scribbler whose first `filled` pages hold data and a live copy of
/// it, stopped at the instant (it runs again on `thaw`).
fn at_the_instant(filled: u64) -> (Scribbler, LiveCopy) {
    let s = Scribbler::spawn(filled);
    let mut live = s.live_copy();
    s.freeze();
    live.protect().expect("protect");
    (s, live)
}

/// The copy failed because unsaved pages were discarded.
fn assert_discarded(err: Option<LiveError>) {
    let err = err.expect("the copy must fail");
    assert!(
        matches!(err, LiveError::Discarded { pages } if pages > 0),
        "{err}"
    );
}

#[test]
fn a_page_copied_after_its_punch_but_before_the_remove_event_fails_the_copy() {
    if skip_without_wp() {
        return;
    }
    let (mut s, mut live) = at_the_instant(PAGES);
    // The file is punched (here, while the process is still stopped) and
    // the mapping's remove event comes only after the copier read the
    // hole as zeros: what QEMU's discard looks like when it races a copy.
    punch(&s.memfd, PAGES - 8, 8);
    copy_all(&mut live, None).expect("the copy itself completes");
    s.thaw();
    s.discard_as("dontneed", PAGES - 8, 8);
    assert_discarded(live.finish().err());
}

#[test]
fn a_dropped_copy_releases_every_held_write() {
    if skip_without_wp() {
        return;
    }
    let (s, live) = at_the_instant(PAGES / 2);
    s.thaw();
    // No copier: writes pile up on protected pages until the drop.
    std::thread::sleep(Duration::from_millis(100));
    drop(live);
    let before = s.contents();
    std::thread::sleep(Duration::from_millis(100));
    assert_ne!(s.contents(), before, "writes still held after the drop");
}

#[test]
fn each_page_has_one_owner() {
    let states = Arc::new(PageStates::new(1000));
    let wins: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let states = states.clone();
                scope.spawn(move || {
                    (0..1000)
                        .filter(|&p| states.claim(PageIndex(p)))
                        .inspect(|&p| states.saved(PageIndex(p), false))
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut all: Vec<u64> = wins.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..1000).collect::<Vec<_>>(),
        "a page claimed twice or never"
    );
    assert_eq!(states.count(SAVED), 1000);
    assert_eq!(states.count(NOT_SAVED) + states.count(COPYING), 0);
    assert!(!states.claim(PageIndex(5)));
    assert!(!states.claim(PageIndex(1000)), "a page outside RAM");
}

#[test]
fn the_side_store_gives_back_what_it_kept() {
    let store = SideStore::new(tempfile_in_tmp(), 10);
    let page = vec![7u8; PAGE_BYTES];
    store.put(PageIndex(3), &page).expect("put");
    let mut back = vec![0u8; PAGE_BYTES];
    assert!(store.get(PageIndex(3), &mut back).expect("get"));
    assert_eq!(back, page);
    assert!(!store.get(PageIndex(4), &mut back).expect("get"));
    assert!(
        store.put(PageIndex(10), &page).is_err(),
        "a page outside RAM"
    );
    assert_eq!(store.len(), 1);
    let run: Vec<u8> = (0..3 * PAGE_BYTES)
        .map(|i| (i / PAGE_BYTES) as u8 + 1)
        .collect();
    store.put_run(PageIndex(5), &run).expect("put a run");
    for p in 0..3u8 {
        assert!(store
            .get(PageIndex(5 + u64::from(p)), &mut back)
            .expect("get"));
        assert!(
            back.iter().all(|&b| b == p + 1),
            "page {} of the run",
            5 + p
        );
    }
    assert!(store.put_run(PageIndex(8), &run).is_err(), "a run past RAM");
    assert_eq!(store.len(), 4);
    // The pause's copies, in memory: page 1 is the memory's second page.
    let memory: Vec<u8> = (0..2 * PAGE_BYTES)
        .map(|i| (i / PAGE_BYTES) as u8 + 10)
        .collect();
    store
        .put_in_memory(memory, &[(PageIndex(1), 1), (PageIndex(0), 0)])
        .expect("keep in memory");
    for p in 0..2u8 {
        assert!(store.get(PageIndex(u64::from(p)), &mut back).expect("get"));
        assert!(back.iter().all(|&b| b == p + 10), "page {p} from memory");
    }
    assert!(
        store.get(PageIndex(5), &mut back).expect("get"),
        "the file's pages stay"
    );
    assert!(back.iter().all(|&b| b == 1));
    assert!(store.put_in_memory(Vec::new(), &[]).is_err(), "only once");
    assert_eq!(store.len(), 4, "the file holds only its own pages");
}

#[test]
fn union_merges_overlapping_and_touching_ranges() {
    let got = union(
        [(0, 4), (10, 12)].into_iter(),
        [(3, 6), (6, 8), (20, 24)].into_iter(),
    );
    assert_eq!(got, vec![(0, 8), (10, 12), (20, 24)]);
}
