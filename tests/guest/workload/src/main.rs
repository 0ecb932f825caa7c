//! `thaw-workload`: the main program of thaw's test guest.
//!
//! It fills a configurable amount of RAM with seeded pseudo-random data, keeps
//! a checksum of every 1 MiB block, and then loops forever: each tick rewrites
//! one block of the "hot" set, verifies the hot set, and periodically verifies
//! every block. A random nonce that lives only in this process's memory is
//! printed on every line, so a restored guest can be told apart from a freshly
//! booted one. Everything is reported as single lines on stdout (the serial
//! console in the guest); the formats are documented in `tests/guest/README.md`
//! and are parsed by the test harness, so keep them stable.
//!
//! Parameters come from the kernel command line (`thaw.mem=` and friends in
//! `/proc/cmdline`) and can be overridden by command-line options (`--mem`,
//! ...), which is how it is exercised on the host (`--once`).
//!
//! The crate deliberately has no dependencies; it is linked fully static for
//! the initramfs (`-C target-feature=+crt-static`).

// A test program inside the guest: its casts are of its own sizes, indices
// and timings (x86-64, usize is 64 bits), never of input from a file or
// another program. The unsafe-block rule applies here as everywhere.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod cow;

use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

/// Size of one checksummed block.
pub const BLOCK_BYTES: u64 = 1 << 20;
const BLOCK_WORDS: usize = (BLOCK_BYTES / 8) as usize;

const USAGE: &str = "\
usage: thaw-workload [options]

Fills memory with seeded pseudo-random data and verifies it in a loop.
Defaults come from thaw.* parameters on the kernel command line
(/proc/cmdline); options given here override them.

  --mem <size>        bytes of memory to fill (K/M/G suffix; default 128M)
  --hot <size>        size of the hot subset rewritten each tick (default 16M)
  --seed <u64>        data seed (decimal or 0x-hex; default 1)
  --tick-ms <ms>      pause between ticks (default 200)
  --full-every <n>    verify all blocks every n ticks; 0 = never (default 10)
  --cow-writers <n>   copy-on-write mode: n threads write sequence-numbered
                      whole pages; VERIFY checks them (see src/cow.rs)
  --cow-mem <size>    pages per writer (default 32M)
  --cow-rate <n>      pages per second per writer (default 2000; 0 = no limit)
  --cow-disk <dev>    also read this disk with O_DIRECT into checked pages
  --once              host test mode: fill, run 3 ticks (the last one with a
                      full verification) without pausing, exit 0 if all good
  --no-cmdline        ignore /proc/cmdline
  -h, --help          this text
";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mem: u64,
    pub hot: u64,
    pub seed: u64,
    pub tick_ms: u64,
    pub full_every: u64,
    pub once: bool,
    /// Print the guest-physical pages of the hot set after the fill.
    pub report_hot: bool,
    /// Throughput mode: work without pause and report the rate every this
    /// many ms of guest time (`THAW-TPUT` lines); 0 = tick mode.
    pub tput_ms: u64,
    /// Which hot blocks throughput mode reads.
    pub pattern: Pattern,
    /// `phase`: the hot set moves to the next region every this many ms.
    pub phase_ms: u64,
    /// Copy-on-write mode ([`cow`]) with this many writer threads; 0: off.
    pub cow_writers: u64,
    /// Copy-on-write mode: bytes of pages per writer.
    pub cow_mem: u64,
    /// Copy-on-write mode: pages per second each writer writes (0: no limit).
    pub cow_rate: u64,
    /// Copy-on-write mode: a disk the DMA reader reads (empty: none).
    pub cow_disk: String,
}

/// How throughput mode picks the block it verifies next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Every hot block equally often.
    Uniform,
    /// Low-numbered hot blocks far more often (u^3 of a uniform u).
    Skewed,
    /// Uniform over the hot set, which moves to the next `hot`-sized region
    /// of memory every `phase_ms` (cycling through all of memory).
    Phase,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mem: 128 << 20,
            hot: 16 << 20,
            seed: 1,
            tick_ms: 200,
            full_every: 10,
            once: false,
            report_hot: false,
            tput_ms: 0,
            pattern: Pattern::Uniform,
            phase_ms: 5000,
            cow_writers: 0,
            cow_mem: 32 << 20,
            cow_rate: 2000,
            cow_disk: String::new(),
        }
    }
}

/// Parses a byte size: decimal digits with an optional binary suffix
/// `K`, `M`, `G` or `T` (case-insensitive, optionally followed by `B` or `iB`).
/// A bare trailing `B` means bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: expected digits"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number out of range"))?;
    let suffix = suffix.to_ascii_uppercase();
    let shift = match suffix.as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("invalid size {s:?}: unknown suffix {suffix:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses an unsigned integer, decimal or `0x`-prefixed hexadecimal.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("invalid number {s:?}"))
}

impl Config {
    /// Applies one `key=value` setting; `key` is the name without the
    /// `thaw.`/`--` prefix. Dashes and underscores are interchangeable.
    /// Returns `Ok(false)` for an unknown key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let key = key.replace('-', "_");
        let what = |e: String| format!("{key}: {e}");
        match key.as_str() {
            "mem" => {
                let v = parse_size(value).map_err(what)?;
                if v == 0 {
                    return Err("mem: must be greater than 0".into());
                }
                self.mem = v;
            }
            "hot" => self.hot = parse_size(value).map_err(what)?,
            "seed" => self.seed = parse_u64(value).map_err(what)?,
            "tick_ms" => self.tick_ms = parse_u64(value).map_err(what)?,
            "full_every" => self.full_every = parse_u64(value).map_err(what)?,
            "report_hot" => self.report_hot = parse_u64(value).map_err(what)? != 0,
            "tput_ms" => self.tput_ms = parse_u64(value).map_err(what)?,
            "phase_ms" => self.phase_ms = parse_u64(value).map_err(what)?,
            "cow_writers" => self.cow_writers = parse_u64(value).map_err(what)?,
            "cow_mem" => self.cow_mem = parse_size(value).map_err(what)?,
            "cow_rate" => self.cow_rate = parse_u64(value).map_err(what)?,
            "cow_disk" => self.cow_disk = value.to_string(),
            "pattern" => {
                self.pattern = match value {
                    "uniform" => Pattern::Uniform,
                    "skewed" => Pattern::Skewed,
                    "phase" => Pattern::Phase,
                    _ => {
                        return Err(format!(
                            "pattern: {value:?} is not uniform, skewed or phase"
                        ))
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Applies the `thaw.<key>=<value>` words of a kernel command line.
    /// Unknown `thaw.*` keys are ignored (other parts of the test suite may
    /// use the prefix); everything after a bare `--` belongs to init and is
    /// ignored as well.
    pub fn apply_kernel_cmdline(&mut self, cmdline: &str) -> Result<(), String> {
        for word in cmdline.split_whitespace() {
            if word == "--" {
                break;
            }
            let Some(rest) = word.strip_prefix("thaw.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            self.set(key, value)
                .map_err(|e| format!("kernel command line: thaw.{e}"))?;
        }
        Ok(())
    }

    /// Applies program arguments (`--mem 128M` or `--mem=128M`, `--once`).
    /// Returns whether /proc/cmdline should be consulted.
    pub fn apply_args(&mut self, args: &[String]) -> Result<ArgsOutcome, String> {
        let mut outcome = ArgsOutcome::Run { use_cmdline: true };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(ArgsOutcome::Help),
                "--once" => self.once = true,
                "--no-cmdline" => outcome = ArgsOutcome::Run { use_cmdline: false },
                a if a.starts_with("--") => {
                    let body = &a[2..];
                    let (key, value) = match body.split_once('=') {
                        Some((k, v)) => (k, v.to_string()),
                        None => {
                            let v = it
                                .next()
                                .ok_or_else(|| format!("option {a} needs a value"))?;
                            (body, v.clone())
                        }
                    };
                    if !self.set(key, &value)? {
                        return Err(format!("unknown option {a}"));
                    }
                }
                a => return Err(format!("unexpected argument {a:?}")),
            }
        }
        Ok(outcome)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArgsOutcome {
    Help,
    Run { use_cmdline: bool },
}

/// Builds the configuration: defaults, then /proc/cmdline, then arguments
/// (arguments win).
fn configure(args: &[String]) -> Result<Option<Config>, String> {
    // Parse the arguments once up front to learn about --help/--no-cmdline,
    // then again on top of the kernel command line so that they take priority.
    let mut probe = Config::default();
    let use_cmdline = match probe.apply_args(args)? {
        ArgsOutcome::Help => return Ok(None),
        ArgsOutcome::Run { use_cmdline } => use_cmdline,
    };
    let mut cfg = Config::default();
    if use_cmdline {
        if let Ok(text) = std::fs::read_to_string("/proc/cmdline") {
            cfg.apply_kernel_cmdline(&text)?;
        }
    }
    cfg.apply_args(args)?;
    Ok(Some(cfg))
}

// ---------------------------------------------------------------------------
// Data generator and checksum
// ---------------------------------------------------------------------------

/// SplitMix64 mixing function (bijective on u64).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator state for the content of `block` in generation `gen`
/// (generation 0 is the initial fill, generation `t` is written by tick `t`).
/// Never zero.
pub fn block_key(seed: u64, block: u64, gen: u64) -> u64 {
    let k = splitmix64(seed ^ splitmix64(block ^ splitmix64(gen).rotate_left(32)));
    if k == 0 {
        0x9E37_79B9_7F4A_7C15
    } else {
        k
    }
}

/// Fills `words` with the xorshift64 sequence starting from `key` (which
/// must be non-zero). xorshift64 never leaves a non-zero state, so every
/// word written is non-zero.
pub fn fill_words(words: &mut [u64], key: u64) {
    debug_assert_ne!(key, 0);
    let mut x = key;
    for w in words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// Block checksum: FNV-1a applied to 64-bit words instead of bytes, followed
/// by the SplitMix64 finaliser. Every step is a bijection of the running
/// state, so any change confined to a single word always changes the result.
pub fn checksum(words: &[u64]) -> u64 {
    let mut h = FNV_OFFSET;
    for &w in words {
        h = (h ^ w).wrapping_mul(FNV_PRIME);
    }
    splitmix64(h)
}

// ---------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------

/// A detected mismatch.
#[derive(Debug, PartialEq, Eq)]
pub struct Corrupt {
    pub block: usize,
    pub expected: u64,
    pub got: u64,
}

pub struct Workload {
    words: Vec<u64>,
    expected: Vec<u64>,
    seed: u64,
    hot_blocks: usize,
    /// Number of mismatches detected so far.
    pub bad: u64,
}

/// A zeroed `Vec<u64>` of `n` words, or `None` if the allocation fails.
/// An allocation of this size comes straight from mmap, so its pages are
/// first touched by the fill (a single pass over the memory).
fn zeroed_words(n: usize) -> Option<Vec<u64>> {
    let layout = std::alloc::Layout::array::<u64>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout has a non-zero size. A non-null result is a zeroed
    // allocation from the global allocator with exactly the layout of a
    // `Vec<u64>` of capacity `n`, and all-zero bytes are valid `u64`s.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<u64>();
        if p.is_null() {
            None
        } else {
            Some(Vec::from_raw_parts(p, n, n))
        }
    }
}

impl Workload {
    /// Allocates `ceil(mem / 1 MiB)` blocks (at least one) and fills them.
    /// The hot set is the first `hot / 1 MiB` blocks, at least one and at
    /// most all of them.
    pub fn new(mem: u64, hot: u64, seed: u64) -> Result<Workload, String> {
        let blocks = mem.div_ceil(BLOCK_BYTES).max(1);
        let blocks = usize::try_from(blocks).map_err(|_| "mem: too large".to_string())?;
        let nwords = blocks
            .checked_mul(BLOCK_WORDS)
            .ok_or_else(|| "mem: too large".to_string())?;
        let hot_blocks = usize::try_from(hot / BLOCK_BYTES)
            .unwrap_or(usize::MAX)
            .clamp(1, blocks);
        let mut words =
            zeroed_words(nwords).ok_or_else(|| format!("mem: cannot allocate {blocks} MiB"))?;
        let mut expected = Vec::with_capacity(blocks);
        for (b, chunk) in words.chunks_exact_mut(BLOCK_WORDS).enumerate() {
            fill_words(chunk, block_key(seed, b as u64, 0));
            expected.push(checksum(chunk));
        }
        Ok(Workload {
            words,
            expected,
            seed,
            hot_blocks,
            bad: 0,
        })
    }

    pub fn blocks(&self) -> usize {
        self.expected.len()
    }

    pub fn hot_blocks(&self) -> usize {
        self.hot_blocks
    }

    pub fn mem_bytes(&self) -> u64 {
        self.blocks() as u64 * BLOCK_BYTES
    }

    pub fn hot_bytes(&self) -> u64 {
        self.hot_blocks as u64 * BLOCK_BYTES
    }

    fn block(&self, i: usize) -> &[u64] {
        &self.words[i * BLOCK_WORDS..(i + 1) * BLOCK_WORDS]
    }

    /// Direct access to the data, for tests that simulate corruption.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Rewrites block `i` with generation `gen` and records its checksum.
    pub fn rewrite(&mut self, i: usize, gen: u64) {
        let key = block_key(self.seed, i as u64, gen);
        let chunk = &mut self.words[i * BLOCK_WORDS..(i + 1) * BLOCK_WORDS];
        fill_words(chunk, key);
        self.expected[i] = checksum(chunk);
    }

    /// Verifies block `i`. A mismatch is counted once: the observed checksum
    /// becomes the expected one, so the same damage is not reported again,
    /// while any further change is.
    pub fn verify(&mut self, i: usize) -> Option<Corrupt> {
        let got = checksum(std::hint::black_box(self.block(i)));
        let expected = self.expected[i];
        if got == expected {
            return None;
        }
        self.expected[i] = got;
        self.bad += 1;
        Some(Corrupt {
            block: i,
            expected,
            got,
        })
    }

    /// One tick: rewrite hot block `t % hot_blocks` with generation `t`, then
    /// verify the hot set, or every block if `full`.
    pub fn tick(&mut self, t: u64, full: bool) -> Vec<Corrupt> {
        let target = (t % self.hot_blocks as u64) as usize;
        self.rewrite(target, t);
        let n = if full { self.blocks() } else { self.hot_blocks };
        (0..n).filter_map(|i| self.verify(i)).collect()
    }
}

// ---------------------------------------------------------------------------
// Output and system helpers
// ---------------------------------------------------------------------------

/// Writes one line to stdout with a single write(2), bypassing any buffering,
/// so the serial console always receives whole lines.
fn emit(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop keeps
    // the File from closing it.
    let mut out = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    let _ = out.write_all(&buf);
}

extern "C" {
    // glibc wrapper around the getrandom(2) system call.
    fn getrandom(buf: *mut std::ffi::c_void, buflen: usize, flags: u32) -> isize;
}

/// Eight random bytes: /dev/urandom, falling back to getrandom(2).
fn random_nonce() -> Result<[u8; 8], String> {
    let mut b = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        if f.read_exact(&mut b).is_ok() {
            return Ok(b);
        }
    }
    let mut got = 0usize;
    while got < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let r = unsafe { getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("no randomness for the nonce: {e}"));
        }
        got += r as usize;
    }
    Ok(b)
}

/// Throughput mode: verifies hot blocks picked by `cfg.pattern` without
/// pause (rewriting one in 64 with a new generation) and every `tput_ms` of
/// guest time prints
/// `THAW-TPUT <n> nonce=<nonce> ok=<1|0> uptime_ms=<ms> interval_ms=<ms> blocks=<k> mib_per_s=<rate>`.
fn throughput(start: Instant, cfg: &Config, nonce: &str, w: Workload) -> Result<i32, String> {
    let shared = std::sync::Arc::new(std::sync::Mutex::new(w));
    {
        let (shared, nonce, seed) = (shared.clone(), nonce.to_string(), cfg.seed);
        std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || answer_probes(std::io::stdin().lock(), &shared, &nonce, seed))
            .map_err(|e| format!("cannot start the probe thread: {e}"))?;
    }
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = splitmix64(cfg.seed ^ 0x7470_7574);
    let (hot, blocks) = {
        let w = lock();
        (w.hot_blocks(), w.blocks())
    };
    let regions = (blocks / hot).max(1);
    let (mut n, mut ops, mut gen) = (0u64, 0u64, 1u64 << 32);
    let mut since = Instant::now();
    loop {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
        let block = match cfg.pattern {
            Pattern::Uniform => (u * hot as f64) as usize,
            Pattern::Skewed => (u * u * u * hot as f64) as usize,
            Pattern::Phase => {
                let phase = (start.elapsed().as_millis() as u64 / cfg.phase_ms.max(1)) as usize;
                (phase % regions) * hot + (u * hot as f64) as usize
            }
        }
        .min(blocks - 1);
        let bad = {
            let mut w = lock();
            if let Some(c) = w.verify(block) {
                emit(&format!(
                    "THAW-CORRUPT block={} expected={:016x} got={:016x}",
                    c.block, c.expected, c.got
                ));
            }
            ops += 1;
            if ops % 64 == 0 {
                gen += 1;
                w.rewrite(block, gen);
            }
            w.bad
        };
        let elapsed = since.elapsed();
        if elapsed.as_millis() as u64 >= cfg.tput_ms {
            n += 1;
            let secs = elapsed.as_secs_f64();
            emit(&format!(
                "THAW-TPUT {n} nonce={nonce} ok={} uptime_ms={} interval_ms={:.1} blocks={ops} mib_per_s={:.1}",
                u8::from(bad == 0),
                start.elapsed().as_millis(),
                secs * 1000.0,
                ops as f64 * (BLOCK_BYTES as f64 / (1 << 20) as f64) / secs
            ));
            ops = 0;
            since = Instant::now();
        }
    }
}

/// Interactive probe (throughput mode): for every `PROBE <id>` line on
/// `input` (the console), verifies one hot block picked at random and
/// answers `THAW-PROBE <id> nonce=<nonce> ok=<1|0> block=<i>`, so the host can
/// time a request that needs the guest's memory, like a small service.
/// Other lines (the terminal's echo, typing) are ignored. Returns at the end
/// of the input.
pub fn answer_probes(
    input: impl std::io::BufRead,
    shared: &std::sync::Mutex<Workload>,
    nonce: &str,
    seed: u64,
) {
    let mut rng = splitmix64(seed ^ 0x7072_6f62);
    for line in input.lines() {
        let Ok(line) = line else { return };
        let Some(id) = parse_probe_request(&line) else {
            continue;
        };
        rng = splitmix64(rng);
        let mut w = shared.lock().unwrap_or_else(|e| e.into_inner());
        let block = (rng % w.hot_blocks() as u64) as usize;
        if let Some(c) = w.verify(block) {
            emit(&format!(
                "THAW-CORRUPT block={} expected={:016x} got={:016x}",
                c.block, c.expected, c.got
            ));
        }
        let ok = u8::from(w.bad == 0);
        drop(w);
        emit(&format!(
            "THAW-PROBE {id} nonce={nonce} ok={ok} block={block}"
        ));
    }
}

/// Tick mode: sets `flag` for every `VERIFY` line on `input` (the
/// console), so the next tick verifies all memory; other lines are
/// ignored. Returns at the end of the input.
pub fn watch_verify_requests(input: impl std::io::BufRead, flag: &std::sync::atomic::AtomicBool) {
    for line in input.lines() {
        let Ok(line) = line else { return };
        if line.trim() == "VERIFY" {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// The id of a `PROBE <id>` request line (surrounding blanks and a
/// carriage return allowed).
pub fn parse_probe_request(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("PROBE"), Some(id), None) => id.parse().ok(),
        _ => None,
    }
}

/// Prints the guest-physical page frames behind the hot set, read from
/// `/proc/self/pagemap` (needs root), as runs `<first pfn>+<count>`, 64 per
/// `THAW-HOT` line, then `THAW-HOT-END pages=<n>`. Lets a host test check a
/// working set against the pages the guest really keeps hot.
fn report_hot_pages(w: &mut Workload) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let hot = w.hot_bytes() as usize;
    let start = w.words_mut().as_ptr() as usize;
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("report_hot: /proc/self/pagemap: {e}"))?;
    let mut entries = vec![0u8; hot / PAGE * 8];
    pagemap
        .read_exact_at(&mut entries, (start / PAGE * 8) as u64)
        .map_err(|e| format!("report_hot: reading pagemap: {e}"))?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in entries.chunks_exact(8) {
        let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        if v >> 63 == 0 {
            return Err("report_hot: a hot page is not present".into());
        }
        let pfn = v & ((1 << 55) - 1);
        if pfn == 0 {
            return Err("report_hot: pagemap hides page frames (not root?)".into());
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == pfn => *n += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    for line in runs.chunks(64) {
        let text: Vec<String> = line.iter().map(|(f, n)| format!("{f}+{n}")).collect();
        emit(&format!("THAW-HOT {}", text.join(" ")));
    }
    emit(&format!("THAW-HOT-END pages={}", hot / PAGE));
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Main loop
// ---------------------------------------------------------------------------

fn run(start: Instant, cfg: &Config) -> Result<i32, String> {
    let nonce = hex(&random_nonce()?);
    if cfg.cow_writers > 0 {
        return cow::run(cfg, &nonce);
    }
    let mut w = Workload::new(cfg.mem, cfg.hot, cfg.seed)?;
    emit(&format!(
        "THAW-READY nonce={nonce} mem={} hot={} blocks={} seed={}",
        w.mem_bytes(),
        w.hot_bytes(),
        w.blocks(),
        cfg.seed
    ));

    if cfg.report_hot {
        report_hot_pages(&mut w)?;
    }
    if cfg.tput_ms > 0 && !cfg.once {
        return throughput(start, cfg, &nonce, w);
    }

    const ONCE_TICKS: u64 = 3;
    // A `VERIFY` line on the console asks for a full pass at the next tick.
    let verify = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !cfg.once {
        let verify = verify.clone();
        let _ = std::thread::Builder::new()
            .name("verify-requests".into())
            .spawn(move || watch_verify_requests(std::io::stdin().lock(), &verify));
    }
    let mut t: u64 = 0;
    loop {
        t += 1;
        let asked = verify.swap(false, std::sync::atomic::Ordering::AcqRel);
        let full =
            asked || t.checked_rem(cfg.full_every) == Some(0) || (cfg.once && t == ONCE_TICKS);
        let work = Instant::now();
        let corrupt = w.tick(t, full);
        let work_us = work.elapsed().as_micros();
        for c in corrupt {
            emit(&format!(
                "THAW-CORRUPT block={} expected={:016x} got={:016x}",
                c.block, c.expected, c.got
            ));
        }
        emit(&format!(
            "THAW-TICK {t} nonce={nonce} ok={} full={} bad={} uptime_ms={} work_us={work_us}",
            u8::from(w.bad == 0),
            u8::from(full),
            w.bad,
            start.elapsed().as_millis()
        ));
        if cfg.once {
            if t == ONCE_TICKS {
                return Ok(if w.bad == 0 { 0 } else { 1 });
            }
            continue;
        }
        if cfg.tick_ms > 0 {
            // std's sleep is nanosleep(2), restarted on EINTR.
            std::thread::sleep(Duration::from_millis(cfg.tick_ms));
        }
    }
}

fn main() {
    // std's Instant is CLOCK_MONOTONIC on Linux.
    let start = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match configure(&args) {
        Ok(None) => {
            emit(USAGE.trim_end());
            0
        }
        Ok(Some(cfg)) => match run(start, &cfg) {
            Ok(code) => code,
            Err(e) => {
                emit(&format!("THAW-ERROR {e}"));
                2
            }
        },
        Err(e) => {
            emit(&format!("THAW-ERROR {e}"));
            2
        }
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("128m"), Ok(128 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184G").is_err()); // 2^34 GiB overflows
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("42"), Ok(42));
        assert_eq!(parse_u64("0x2a"), Ok(42));
        assert!(parse_u64("x").is_err());
    }

    #[test]
    fn kernel_cmdline() {
        let mut c = Config::default();
        c.apply_kernel_cmdline(
            "console=ttyS0 quiet thaw.mem=64M thaw.hot=8M thaw.seed=7 thaw.tick_ms=0 \
             thaw.full_every=3 thaw.report_hot=1 thaw.other=x -- thaw.mem=1G",
        )
        .unwrap();
        assert_eq!(
            c,
            Config {
                mem: 64 << 20,
                hot: 8 << 20,
                seed: 7,
                tick_ms: 0,
                full_every: 3,
                once: false,
                report_hot: true,
                tput_ms: 0,
                pattern: Pattern::Uniform,
                phase_ms: 5000,
                ..Config::default()
            }
        );
        assert!(Config::default()
            .apply_kernel_cmdline("thaw.mem=lots")
            .is_err());
        assert!(Config::default()
            .apply_kernel_cmdline("thaw.mem=0")
            .is_err());
    }

    #[test]
    fn args_override_and_forms() {
        let mut c = Config::default();
        c.apply_kernel_cmdline("thaw.mem=64M thaw.seed=9").unwrap();
        let args: Vec<String> = ["--mem", "8M", "--hot=2M", "--tick-ms", "5", "--once"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            c.apply_args(&args),
            Ok(ArgsOutcome::Run { use_cmdline: true })
        );
        assert_eq!(
            (c.mem, c.hot, c.seed, c.tick_ms, c.once),
            (8 << 20, 2 << 20, 9, 5, true)
        );
        let bad: Vec<String> = vec!["--bogus".into(), "1".into()];
        assert!(Config::default().apply_args(&bad).is_err());
        let missing: Vec<String> = vec!["--mem".into()];
        assert!(Config::default().apply_args(&missing).is_err());
    }

    #[test]
    fn generator_is_deterministic_and_nonzero_in_every_page() {
        let mut a = vec![0u64; BLOCK_WORDS];
        let mut b = vec![0u64; BLOCK_WORDS];
        fill_words(&mut a, block_key(1, 0, 0));
        fill_words(&mut b, block_key(1, 0, 0));
        assert_eq!(a, b);
        assert!(a.iter().all(|&w| w != 0));
        for page in a.chunks(4096 / 8) {
            // Pseudo-random, not a constant pattern.
            assert!(page.windows(2).any(|p| p[0] != p[1]));
        }
        // Different seed, block or generation gives different content.
        for key in [block_key(2, 0, 0), block_key(1, 1, 0), block_key(1, 0, 1)] {
            fill_words(&mut b, key);
            assert_ne!(a, b);
        }
        // Roughly balanced bits.
        let ones: u64 = a.iter().map(|w| u64::from(w.count_ones())).sum();
        let total = 64 * a.len() as u64;
        assert!(
            ones > total * 49 / 100 && ones < total * 51 / 100,
            "{ones}/{total}"
        );
    }

    #[test]
    fn checksum_sees_any_single_word_change() {
        let mut a = vec![0u64; 4096];
        fill_words(&mut a, block_key(3, 4, 5));
        let h = checksum(&a);
        assert_eq!(h, checksum(&a));
        for (i, bit) in [(0usize, 0u32), (1, 63), (2047, 7), (4095, 31)] {
            let mut b = a.clone();
            b[i] ^= 1 << bit;
            assert_ne!(checksum(&b), h, "word {i} bit {bit}");
        }
        // Swapping two words is noticed too.
        let mut b = a.clone();
        b.swap(10, 11);
        assert_ne!(checksum(&b), h);
        // Known value of the empty input pins the definition down.
        assert_eq!(checksum(&[]), splitmix64(FNV_OFFSET));
    }

    #[test]
    fn a_verify_line_asks_for_a_full_pass() {
        let flag = std::sync::atomic::AtomicBool::new(false);
        watch_verify_requests("noise\nVERIFY x\n".as_bytes(), &flag);
        assert!(!flag.load(std::sync::atomic::Ordering::Acquire));
        watch_verify_requests("noise\n VERIFY\r\n".as_bytes(), &flag);
        assert!(flag.load(std::sync::atomic::Ordering::Acquire));
    }

    #[test]
    fn probe_requests_are_answered_and_other_lines_ignored() {
        assert_eq!(parse_probe_request("PROBE 7"), Some(7));
        assert_eq!(parse_probe_request(" PROBE 12\r"), Some(12));
        assert_eq!(parse_probe_request("PROBE"), None);
        assert_eq!(parse_probe_request("PROBE x"), None);
        assert_eq!(parse_probe_request("PROBE 1 2"), None);
        assert_eq!(parse_probe_request("THAW-PROBE 1 nonce=00"), None);
        let w = std::sync::Mutex::new(Workload::new(4 * BLOCK_BYTES, BLOCK_BYTES, 3).unwrap());
        // The probe verifies a hot block: damage there is found (and only
        // there, since the hot set is block 0).
        w.lock().unwrap().words_mut()[5] ^= 1;
        answer_probes("noise\nPROBE 1\nPROBE 2\n".as_bytes(), &w, "00", 1);
        assert_eq!(w.lock().unwrap().bad, 1);
    }

    #[test]
    fn workload_geometry() {
        let w = Workload::new(3 * BLOCK_BYTES + 1, 100 * BLOCK_BYTES, 1).unwrap();
        assert_eq!((w.blocks(), w.hot_blocks()), (4, 4));
        let w = Workload::new(1, 0, 1).unwrap();
        assert_eq!(
            (w.blocks(), w.hot_blocks(), w.mem_bytes()),
            (1, 1, BLOCK_BYTES)
        );
        let w = Workload::new(8 * BLOCK_BYTES, 2 * BLOCK_BYTES + 5, 1).unwrap();
        assert_eq!(
            (w.blocks(), w.hot_blocks(), w.hot_bytes()),
            (8, 2, 2 * BLOCK_BYTES)
        );
    }

    #[test]
    fn impossible_allocation_is_an_error() {
        // 1 PiB exceeds the x86-64 user address space.
        assert!(Workload::new(1 << 50, 0, 1).is_err());
        assert!(Workload::new(u64::MAX, 0, 1).is_err());
    }

    #[test]
    fn workload_ticks_and_detects_corruption() {
        let mut w = Workload::new(8 * BLOCK_BYTES, 2 * BLOCK_BYTES, 11).unwrap();
        for t in 1..=4 {
            assert!(w.tick(t, t == 4).is_empty());
        }
        // Damage a cold block: only a full verification finds it, once.
        let cold = 5 * BLOCK_WORDS + 123;
        w.words_mut()[cold] ^= 0x10;
        assert!(w.tick(5, false).is_empty());
        let found = w.tick(6, true);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].block, 5);
        assert_ne!(found[0].expected, found[0].got);
        assert_eq!(w.bad, 1);
        assert!(w.tick(7, true).is_empty());
        // Damage a hot block that the next tick does not rewrite.
        // Tick 8 rewrites block 8 % 2 = 0, so block 1 keeps the damage.
        w.words_mut()[BLOCK_WORDS + 7] = 0;
        let found = w.tick(8, false);
        assert_eq!(found.iter().map(|c| c.block).collect::<Vec<_>>(), vec![1]);
        assert_eq!(w.bad, 2);
    }
}
