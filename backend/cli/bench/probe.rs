//! The interactive probe: a closed-loop client on the guest's serial
//! console socket that sends `PROBE <id>` requests (the workload answers
//! each after verifying one hot block) and times every answer, like a user
//! waiting on a small service inside the guest.
//!
//! One request is outstanding at a time; the next goes out one period after
//! the previous one was sent, or at once if its answer came later. A request
//! sent while the restored guest is paused is answered when it runs: that
//! wait is what a user feels. A request unanswered for [`RESEND`] is
//! retried with a new id (QEMU drops what reaches the serial port while it
//! loads the device state); a late answer to it still counts. The client
//! reconnects when QEMU is replaced (each restore starts a new QEMU with a
//! new socket).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a read waits before the client checks whether to stop.
const READ_TICK: Duration = Duration::from_millis(10);
/// A request unanswered this long is sent again with a new id.
pub const RESEND: Duration = Duration::from_millis(100);
/// Unanswered requests remembered for a late answer.
const REMEMBERED: usize = 256;

/// One answered request, in ms since the probe's `t0`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    pub sent_ms: f64,
    pub latency_ms: f64,
}

/// Parses `THAW-PROBE <id> nonce=.. ok=..`: the id and whether the guest's
/// integrity checks still pass.
pub fn parse_answer(line: &str) -> Option<(u64, bool)> {
    let mut words = line.trim().strip_prefix("THAW-PROBE ")?.split_whitespace();
    let id = words.next()?.parse().ok()?;
    let ok = words.find_map(|w| w.strip_prefix("ok="))? == "1";
    Some((id, ok))
}

/// A running probe client.
pub struct Prober {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<ProbeSample>>>,
    failed: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// Starts probing the console socket at `socket` every `period`; times
    /// are relative to `t0`.
    pub fn start(socket: PathBuf, t0: Instant, period: Duration) -> std::io::Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicBool::new(false));
        let (halt, out, bad) = (stop.clone(), samples.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("thaw-probe".into())
            .spawn(move || {
                let mut next_id = 1u64;
                while !halt.load(Ordering::Acquire) {
                    let Ok(stream) = UnixStream::connect(&socket) else {
                        std::thread::sleep(READ_TICK);
                        continue;
                    };
                    log::debug!("probe connected to {}", socket.display());
                    probe_session(stream, t0, period, &halt, &mut next_id, &out, &bad);
                }
            })?;
        Ok(Prober {
            stop,
            samples,
            failed,
            thread: Some(thread),
        })
    }

    /// Stops the client; returns every answered request and whether any
    /// answer reported a failed integrity check.
    pub fn finish(mut self) -> (Vec<ProbeSample>, bool) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        samples.sort_by(|a, b| a.sent_ms.total_cmp(&b.sent_ms));
        (samples, self.failed.load(Ordering::Acquire))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Probes over one connection until it ends or `halt` is set.
fn probe_session(
    mut stream: UnixStream,
    t0: Instant,
    period: Duration,
    halt: &AtomicBool,
    next_id: &mut u64,
    out: &Mutex<Vec<ProbeSample>>,
    bad: &AtomicBool,
) {
    if stream.set_read_timeout(Some(READ_TICK)).is_err() {
        return;
    }
    let ms = |at: Instant| at.duration_since(t0).as_secs_f64() * 1000.0;
    let mut pending = String::new();
    let mut buf = [0u8; 4096];
    // Requests not answered yet (id, sent), oldest first; the last one is
    // in flight, the others were given up on but may still be answered.
    let mut unanswered: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut in_flight = false;
    let mut next_send = Instant::now();
    while !halt.load(Ordering::Acquire) {
        let now = Instant::now();
        let retry = unanswered
            .back()
            .is_some_and(|&(_, sent)| now >= sent + RESEND);
        if (!in_flight && now >= next_send) || (in_flight && retry) {
            let id = *next_id;
            *next_id += 1;
            if stream
                .write_all(format!("PROBE {id}\n").as_bytes())
                .is_err()
            {
                return;
            }
            if unanswered.len() == REMEMBERED {
                unanswered.pop_front();
            }
            unanswered.push_back((id, now));
            in_flight = true;
            next_send = now + period;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let now = Instant::now();
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(i) = pending.find('\n') {
                    let line: String = pending.drain(..=i).collect();
                    let Some((id, ok)) = parse_answer(&line) else {
                        continue;
                    };
                    if !ok {
                        bad.store(true, Ordering::Release);
                    }
                    let Some(i) = unanswered.iter().position(|&(want, _)| want == id) else {
                        continue;
                    };
                    let (_, sent) = unanswered.remove(i).unwrap_or((id, now));
                    if i == unanswered.len() {
                        in_flight = false;
                    }
                    if let Ok(mut s) = out.lock() {
                        s.push(ProbeSample {
                            sent_ms: ms(sent),
                            latency_ms: now.duration_since(sent).as_secs_f64() * 1000.0,
                        });
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Latency summary of the requests sent at or after `from_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub answered: usize,
    pub p50_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

pub fn summarize(samples: &[ProbeSample], from_ms: f64) -> ProbeSummary {
    let mut lat: Vec<f64> = samples
        .iter()
        .filter(|s| s.sent_ms >= from_ms)
        .map(|s| s.latency_ms)
        .collect();
    lat.sort_by(f64::total_cmp);
    ProbeSummary {
        answered: lat.len(),
        p50_ms: lat.get(lat.len() / 2).copied(),
        max_ms: lat.last().copied(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse_answer("THAW-PROBE 4 nonce=ab ok=1 block=3\r\n"),
            Some((4, true))
        );
        assert_eq!(parse_answer("THAW-PROBE 5 nonce=ab ok=0"), Some((5, false)));
        assert_eq!(parse_answer("PROBE 4"), None);
        assert_eq!(parse_answer("THAW-PROBE x ok=1"), None);
    }

    #[test]
    fn summary_counts_requests_from_the_cut() {
        let s = |sent_ms, latency_ms| ProbeSample {
            sent_ms,
            latency_ms,
        };
        let v = [
            s(0.0, 900.0),
            s(1000.0, 3.0),
            s(1100.0, 5.0),
            s(1200.0, 4.0),
        ];
        let all = summarize(&v, 0.0);
        assert_eq!((all.answered, all.max_ms), (4, Some(900.0)));
        let late = summarize(&v, 1000.0);
        assert_eq!(
            (late.answered, late.p50_ms, late.max_ms),
            (3, Some(4.0), Some(5.0))
        );
        assert_eq!(summarize(&v, 5000.0).p50_ms, None);
    }

    /// A stand-in guest on a unix socket: echoes the request (as a terminal
    /// does) and answers it; the prober reconnects after the first guest
    /// goes away.
    #[test]
    fn requests_are_timed_across_a_reconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let prober =
            Prober::start(path.clone(), Instant::now(), Duration::from_millis(1)).expect("start");
        let mut answered = 0;
        for _connection in 0..2 {
            let (stream, _) = listener.accept().expect("accept");
            let mut writer = stream.try_clone().expect("clone");
            let mut lines = std::io::BufReader::new(stream).lines();
            for _ in 0..3 {
                let line = lines.next().expect("a request").expect("read");
                let id: u64 = line
                    .strip_prefix("PROBE ")
                    .expect("request")
                    .parse()
                    .unwrap();
                write!(
                    writer,
                    "{line}\r\nTHAW-PROBE {id} nonce=00 ok=1 block=0\r\n"
                )
                .expect("answer");
                answered += 1;
            }
        }
        // Wait for the prober to record the last answer (an event), then stop.
        while prober.samples.lock().map(|s| s.len()).unwrap_or(0) < answered {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (samples, failed) = prober.finish();
        assert!(!failed);
        assert_eq!(samples.len(), 6);
        assert!(samples.windows(2).all(|w| w[0].sent_ms <= w[1].sent_ms));
        assert!(samples.iter().all(|s| s.latency_ms >= 0.0));
    }
}
