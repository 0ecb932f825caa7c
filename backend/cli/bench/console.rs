//! Reads a guest's serial console log as it grows and stamps each
//! `THAW-TPUT` throughput report with the host time it arrived at.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ttr::Sample;

/// How often the log is checked for new lines (the stamps' resolution).
const POLL: Duration = Duration::from_millis(5);

/// One report with what identifies the guest.
#[derive(Clone, Debug)]
pub struct Report {
    pub sample: Sample,
    pub nonce: String,
    pub ok: bool,
}

/// A background reader of one console log from a given offset on.
pub struct ConsoleTail {
    stop: Arc<AtomicBool>,
    reports: Arc<Mutex<Vec<Report>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Parses `THAW-TPUT <n> nonce=.. ok=.. uptime_ms=.. interval_ms=.. blocks=.. mib_per_s=..`.
pub fn parse_tput(line: &str) -> Option<(String, bool, f64, f64)> {
    let rest = line.trim().strip_prefix("THAW-TPUT ")?;
    let (mut nonce, mut ok, mut interval, mut rate) = (None, None, None, None);
    for kv in rest.split_whitespace().skip(1) {
        match kv.split_once('=') {
            Some(("nonce", v)) => nonce = Some(v.to_string()),
            Some(("ok", v)) => ok = Some(v == "1"),
            Some(("interval_ms", v)) => interval = v.parse().ok(),
            Some(("mib_per_s", v)) => rate = v.parse().ok(),
            _ => {}
        }
    }
    Some((nonce?, ok?, interval?, rate?))
}

impl ConsoleTail {
    /// Starts reading `path` from its current end; times are relative to `t0`.
    pub fn start(path: &Path, t0: Instant) -> std::io::Result<ConsoleTail> {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self::start_at(path.to_path_buf(), offset, t0)
    }

    /// Starts reading `path` from byte `offset`.
    pub fn start_at(path: PathBuf, offset: u64, t0: Instant) -> std::io::Result<ConsoleTail> {
        let stop = Arc::new(AtomicBool::new(false));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (halt, out) = (stop.clone(), reports.clone());
        let thread = std::thread::Builder::new()
            .name("thaw-console".into())
            .spawn(move || {
                let mut pos = offset;
                let mut pending = String::new();
                let mut buf = vec![0u8; 64 << 10];
                while !halt.load(Ordering::Acquire) {
                    let mut got = 0;
                    if let Ok(mut f) = File::open(&path) {
                        if f.seek(SeekFrom::Start(pos)).is_ok() {
                            while let Ok(n) = f.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                got += n;
                                pos += n as u64;
                                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                            }
                        }
                    }
                    if got > 0 {
                        let at_ms = t0.elapsed().as_secs_f64() * 1000.0;
                        while let Some(i) = pending.find('\n') {
                            let line: String = pending.drain(..=i).collect();
                            if let Some((nonce, ok, interval_ms, mib_per_s)) = parse_tput(&line) {
                                if let Ok(mut r) = out.lock() {
                                    r.push(Report {
                                        sample: Sample {
                                            at_ms,
                                            interval_ms,
                                            rate: mib_per_s,
                                        },
                                        nonce,
                                        ok,
                                    });
                                }
                            }
                        }
                    }
                    std::thread::sleep(POLL);
                }
            })?;
        Ok(ConsoleTail {
            stop,
            reports,
            thread: Some(thread),
        })
    }

    /// The reports so far.
    pub fn reports(&self) -> Vec<Report> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops reading; returns every report.
    pub fn finish(mut self) -> Vec<Report> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.reports()
    }
}

impl Drop for ConsoleTail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tput_lines_parse() {
        let line =
            "THAW-TPUT 7 nonce=00aa ok=1 uptime_ms=900 interval_ms=50.2 blocks=12 mib_per_s=239.0";
        assert_eq!(
            parse_tput(line),
            Some(("00aa".to_string(), true, 50.2, 239.0))
        );
        assert_eq!(parse_tput("THAW-TICK 1 nonce=00 ok=1"), None);
    }

    #[test]
    fn reports_arrive_in_order_with_their_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(
            &path,
            "old THAW-TPUT 1 nonce=a ok=1 interval_ms=50 mib_per_s=1\n",
        )
        .expect("write");
        let tail = ConsoleTail::start(&path, Instant::now()).expect("tail");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        use std::io::Write;
        writeln!(
            f,
            "THAW-TPUT 2 nonce=a ok=1 uptime_ms=1 interval_ms=50 blocks=1 mib_per_s=10"
        )
        .expect("w");
        writeln!(f, "noise").expect("w");
        write!(
            f,
            "THAW-TPUT 3 nonce=a ok=0 uptime_ms=2 interval_ms=50 blocks=1 mib_per_s=20"
        )
        .expect("w");
        // The reader sees the first whole line; wait for it (an event: the
        // report appearing), then finish the last line.
        while tail.reports().is_empty() {
            std::thread::sleep(POLL);
        }
        writeln!(f).expect("w");
        while tail.reports().len() < 2 {
            std::thread::sleep(POLL);
        }
        let r = tail.finish();
        assert_eq!(r.len(), 2, "the line before the start is not read");
        assert_eq!((r[0].sample.rate, r[0].ok), (10.0, true));
        assert_eq!((r[1].sample.rate, r[1].ok), (20.0, false));
        assert!(r[0].sample.at_ms <= r[1].sample.at_ms);
    }
}
