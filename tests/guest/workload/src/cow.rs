//! Copy-on-write mode (`thaw.cow_writers=N`): proves that a checkpoint
//! taken while the guest writes holds the state of one instant.
//!
//! Each of N writer threads owns a region of `cow_mem` bytes and a counter
//! `c` kept in its own memory. Step `c` overwrites the whole page
//! `c mod pages` with the pattern of `(writer, c)` and then increments `c`.
//! So at any instant, between steps, page `j` holds the pattern of the
//! latest `s < c` with `s ≡ j (mod pages)`. A checkpoint of one instant
//! restores a guest in which this holds for every page and every writer; a
//! page saved after the instant (a newer `s`), before it (a lost write) or
//! half-written (a torn page) breaks it, as long as the writer has not gone
//! a whole lap since the restore (the rate limit keeps a lap long).
//!
//! With `thaw.cow_disk=/dev/vdX`, a reader thread also keeps reading 4 KiB
//! blocks of that disk with `O_DIRECT` (the device writes them into guest
//! memory by DMA) into a 1 MiB buffer, recording which block each buffer
//! page holds after each read; the host fills the disk so that block `b`
//! holds [`disk_word`]`(b, k)` in word `k`.
//!
//! Every thread checks its own invariant at its next safe point when a
//! `VERIFY` line arrives on the console; the summary is
//! `THAW-COW-VERIFY <n> nonce=<nonce> ok=<1|0> pages=<checked> dma=<checked>`
//! (with a `THAW-COW-BAD ...` line per broken thread first). Every 500 ms
//! `THAW-COW-TICK <n> nonce=<nonce> writes=<total> dma=<reads>` shows
//! progress.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{emit, Config};

const PAGE_WORDS: usize = 512;
const PAGE_BYTES: usize = 4096;
/// Pages of the DMA buffer.
const DMA_PAGES: usize = 256;

/// One page-aligned guest page.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u64; PAGE_WORDS]);

/// Word `k` of writer `w`'s page written at step `s`: never zero, and
/// different for every writer, step and word.
pub fn page_word(w: u64, s: u64, k: u64) -> u64 {
    ((w + 1) << 56) | (s << 9) | k
}

/// Word `k` of disk block `b` as the host writes it.
pub fn disk_word(b: u64, k: u64) -> u64 {
    0xd15c_0000_0000_0000 ^ (b << 9) ^ k
}

/// The step whose pattern page `j` of `pages` holds once `c` steps ran
/// (`c >= pages`: every page was written once).
pub fn expected_step(c: u64, j: u64, pages: u64) -> u64 {
    c - 1 - (c - 1 + pages - j) % pages
}

/// What one thread found when asked to verify.
#[derive(Clone, Debug, Default)]
struct Finding {
    checked: u64,
    dma: bool,
    bad: Option<String>,
}

/// Verification requests and their answers.
struct Board {
    /// Raised by the console thread for each `VERIFY`.
    generation: AtomicU64,
    /// Per thread: the generation answered and what it found.
    answers: Mutex<Vec<(u64, Finding)>>,
    /// Per thread: steps (writers) or reads (DMA reader) so far.
    progress: Vec<AtomicU64>,
}

impl Board {
    fn answer(&self, thread: usize, generation: u64, finding: Finding) {
        let mut a = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        a[thread] = (generation, finding);
    }
}

/// Runs the copy-on-write mode; never returns unless setup fails.
pub fn run(cfg: &Config, nonce: &str) -> Result<i32, String> {
    let pages = (cfg.cow_mem / PAGE_BYTES as u64).max(2);
    let writers = usize::try_from(cfg.cow_writers).map_err(|e| e.to_string())?;
    let disk = if cfg.cow_disk.is_empty() {
        None
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_direct())
            .open(&cfg.cow_disk)
            .map_err(|e| format!("opening {} with O_DIRECT: {e}", cfg.cow_disk))?;
        let blocks = f
            .metadata()
            .map(|m| m.len())
            .ok()
            .filter(|&l| l > 0)
            .or_else(|| block_device_size(&cfg.cow_disk))
            .ok_or_else(|| format!("cannot size {}", cfg.cow_disk))?
            / PAGE_BYTES as u64;
        if blocks < 2 {
            return Err(format!("{} is too small", cfg.cow_disk));
        }
        Some((f, blocks))
    };
    let threads = writers + usize::from(disk.is_some());
    let board = Arc::new(Board {
        generation: AtomicU64::new(0),
        answers: Mutex::new(vec![(0, Finding::default()); threads]),
        progress: (0..threads).map(|_| AtomicU64::new(0)).collect(),
    });
    // The first lap of every writer runs before READY: from then on every
    // page has an expected content.
    let ready = Arc::new(AtomicU64::new(0));
    for w in 0..writers {
        let (board, ready, rate) = (board.clone(), ready.clone(), cfg.cow_rate);
        std::thread::Builder::new()
            .name(format!("cow-writer-{w}"))
            .spawn(move || writer(w, pages, rate, &board, &ready))
            .map_err(|e| format!("cannot start writer {w}: {e}"))?;
    }
    while ready.load(Ordering::Acquire) < writers as u64 {
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some((f, blocks)) = disk {
        let board = board.clone();
        std::thread::Builder::new()
            .name("cow-dma".into())
            .spawn(move || dma_reader(writers, f, blocks, &board))
            .map_err(|e| format!("cannot start the DMA reader: {e}"))?;
    }
    {
        let board = board.clone();
        std::thread::Builder::new()
            .name("verify-requests".into())
            .spawn(move || {
                use std::io::BufRead;
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { return };
                    if line.trim() == "VERIFY" {
                        board.generation.fetch_add(1, Ordering::AcqRel);
                    }
                }
            })
            .map_err(|e| format!("cannot start the console thread: {e}"))?;
    }
    emit(&format!(
        "THAW-COW-READY nonce={nonce} writers={writers} pages={pages} dma={}",
        u8::from(threads > writers)
    ));
    let (mut tick, mut answered) = (0u64, 0u64);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        tick += 1;
        let total = |r: std::ops::Range<usize>| -> u64 {
            board.progress[r]
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .sum()
        };
        emit(&format!(
            "THAW-COW-TICK {tick} nonce={nonce} writes={} dma={}",
            total(0..writers),
            total(writers..threads)
        ));
        let asked = board.generation.load(Ordering::Acquire);
        if asked == answered {
            continue;
        }
        // Wait for every thread's answer to this request.
        let findings = loop {
            let a = board.answers.lock().unwrap_or_else(|e| e.into_inner());
            if a.iter().all(|(g, _)| *g >= asked) {
                break a.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>();
            }
            drop(a);
            std::thread::sleep(Duration::from_millis(5));
        };
        answered = asked;
        for (i, f) in findings.iter().enumerate() {
            if let Some(bad) = &f.bad {
                emit(&format!("THAW-COW-BAD thread={i} {bad}"));
            }
        }
        let ok = findings.iter().all(|f| f.bad.is_none());
        let sum = |dma: bool| -> u64 {
            findings
                .iter()
                .filter(|f| f.dma == dma)
                .map(|f| f.checked)
                .sum()
        };
        emit(&format!(
            "THAW-COW-VERIFY {answered} nonce={nonce} ok={} pages={} dma={}",
            u8::from(ok),
            sum(false),
            sum(true)
        ));
    }
}

/// Writer `w`: steps through its pages at `rate` pages per second (0: as
/// fast as it can), checking its pages when asked.
fn writer(w: usize, pages: u64, rate: u64, board: &Board, ready: &AtomicU64) {
    let mut region: Vec<Page> = vec![Page([0; PAGE_WORDS]); pages as usize];
    let wid = w as u64;
    let mut c: u64 = 0;
    let mut seen = board.generation.load(Ordering::Acquire);
    let mut paced_from = (Instant::now(), 0u64);
    loop {
        if c >= pages {
            let asked = board.generation.load(Ordering::Acquire);
            if asked != seen {
                seen = asked;
                board.answer(w, asked, check_region(&region, wid, c));
            }
        }
        let j = (c % pages) as usize;
        for (k, word) in region[j].0.iter_mut().enumerate() {
            // Volatile: every word really goes to memory, in order.
            // SAFETY: `word` is a valid, aligned &mut u64.
            unsafe { std::ptr::write_volatile(word, page_word(wid, c, k as u64)) };
        }
        c += 1;
        board.progress[w].store(c, Ordering::Relaxed);
        if c == pages {
            ready.fetch_add(1, Ordering::AcqRel);
            paced_from = (Instant::now(), c);
        }
        if rate > 0 && c > pages && c.is_multiple_of(16) {
            let due = Duration::from_micros((c - paced_from.1) * 1_000_000 / rate);
            let spent = paced_from.0.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
    }
}

/// Checks every page of `region` against counter `c`.
fn check_region(region: &[Page], w: u64, c: u64) -> Finding {
    let pages = region.len() as u64;
    let mut f = Finding {
        checked: pages,
        dma: false,
        bad: None,
    };
    for (j, page) in region.iter().enumerate() {
        let s = expected_step(c, j as u64, pages);
        for (k, &word) in page.0.iter().enumerate() {
            let want = page_word(w, s, k as u64);
            if word != want {
                let got_step = (word >> 9) & ((1 << 47) - 1);
                let torn = page
                    .0
                    .iter()
                    .any(|&x| (x >> 9) & ((1 << 47) - 1) != got_step);
                f.bad = Some(format!(
                    "writer={w} counter={c} page={j} word={k} want_step={s} got={word:016x} got_step={got_step} torn={}",
                    u8::from(torn)
                ));
                return f;
            }
        }
    }
    f
}

/// The DMA reader: reads disk blocks into its buffer pages and records
/// which block each page holds, checking them when asked.
fn dma_reader(thread: usize, disk: std::fs::File, blocks: u64, board: &Board) {
    let mut buf: Vec<Page> = vec![Page([0; PAGE_WORDS]); DMA_PAGES];
    // u64::MAX: the page holds no block yet.
    let mut holds = vec![u64::MAX; DMA_PAGES];
    let mut seen = board.generation.load(Ordering::Acquire);
    let mut i: u64 = 0;
    loop {
        let asked = board.generation.load(Ordering::Acquire);
        if asked != seen {
            seen = asked;
            board.answer(thread, asked, check_dma(&buf, &holds));
        }
        let slot = (i % DMA_PAGES as u64) as usize;
        // A different block each time a slot comes round.
        let b = (i.wrapping_mul(7919) + i / DMA_PAGES as u64) % blocks;
        // SAFETY: a Page is 4096 plain bytes, aligned for O_DIRECT.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(buf[slot].0.as_mut_ptr().cast::<u8>(), PAGE_BYTES)
        };
        match disk.read_exact_at(bytes, b * PAGE_BYTES as u64) {
            Ok(()) => holds[slot] = b,
            Err(e) => {
                emit(&format!(
                    "THAW-COW-BAD thread={thread} dma read of block {b} failed: {e}"
                ));
                holds[slot] = u64::MAX;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        i += 1;
        board.progress[thread].store(i, Ordering::Relaxed);
    }
}

fn check_dma(buf: &[Page], holds: &[u64]) -> Finding {
    let mut f = Finding {
        checked: 0,
        dma: true,
        bad: None,
    };
    for (slot, (page, &b)) in buf.iter().zip(holds).enumerate() {
        if b == u64::MAX {
            continue;
        }
        f.checked += 1;
        for (k, &word) in page.0.iter().enumerate() {
            if word != disk_word(b, k as u64) {
                f.bad = Some(format!(
                    "dma slot={slot} block={b} word={k} got={word:016x} (block {})",
                    (word ^ 0xd15c_0000_0000_0000) >> 9
                ));
                return f;
            }
        }
    }
    f
}

/// `O_DIRECT` on x86-64 Linux.
fn libc_o_direct() -> i32 {
    0o40000
}

/// The size of a block device from sysfs (`/sys/class/block/<dev>/size`,
/// in 512-byte sectors).
fn block_device_size(path: &str) -> Option<u64> {
    let dev = path.rsplit('/').next()?;
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{dev}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(sectors * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_step_is_the_latest_write_of_each_page() {
        let pages = 5;
        // After 7 steps: pages 0,1 were last written at 5,6; 2,3,4 at 2,3,4.
        let got: Vec<u64> = (0..pages).map(|j| expected_step(7, j, pages)).collect();
        assert_eq!(got, vec![5, 6, 2, 3, 4]);
        assert_eq!(expected_step(5, 0, 5), 0);
        assert_eq!(expected_step(10, 4, 5), 9);
    }

    #[test]
    fn a_region_checks_out_and_a_newer_or_torn_page_does_not() {
        let pages = 4u64;
        let mut region = vec![Page([0; PAGE_WORDS]); pages as usize];
        let write = |region: &mut Vec<Page>, s: u64| {
            let j = (s % pages) as usize;
            for k in 0..PAGE_WORDS {
                region[j].0[k] = page_word(3, s, k as u64);
            }
        };
        for s in 0..10 {
            write(&mut region, s);
        }
        assert!(check_region(&region, 3, 10).bad.is_none());
        // The page of step 10 saved, the counter still at 10: newer.
        let mut newer = region.clone();
        write(&mut newer, 10);
        assert!(check_region(&newer, 3, 10).bad.is_some());
        // Half of step 10 written: torn.
        let mut torn = region.clone();
        for k in 0..PAGE_WORDS / 2 {
            torn[2].0[k] = page_word(3, 10, k as u64);
        }
        let bad = check_region(&torn, 3, 10).bad.expect("torn page found");
        assert!(bad.contains("torn=1"), "{bad}");
    }

    #[test]
    fn dma_pages_check_against_their_blocks() {
        let mut buf = vec![Page([0; PAGE_WORDS]); 2];
        for k in 0..PAGE_WORDS {
            buf[0].0[k] = disk_word(7, k as u64);
        }
        let holds = vec![7, u64::MAX];
        let f = check_dma(&buf, &holds);
        assert!(f.bad.is_none());
        assert_eq!(f.checked, 1);
        assert!(check_dma(&buf, &[8, u64::MAX]).bad.is_some());
    }
}
