//! A read-rate limit shared by every reader of one image, to emulate
//! networked storage (e.g. FREM's 32 MB/s and 7 MB/s) the same way for every
//! restore method.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes per second that all readers together may read.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: f64,
    /// When the transfers granted so far will have completed.
    busy_until: Mutex<Instant>,
}

impl Throttle {
    /// A limit of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            busy_until: Mutex::new(Instant::now()),
        }
    }

    /// Blocks until a read of `bytes` would have completed at this rate,
    /// after every read granted before it.
    pub fn take(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        let done = match self.busy_until.lock() {
            Ok(mut until) => {
                let start = (*until).max(Instant::now());
                *until = start + cost;
                *until
            }
            // A reader panicked holding the lock: stop limiting rather
            // than stall the restore.
            Err(_) => return,
        };
        let now = Instant::now();
        if done > now {
            std::thread::sleep(done - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_share_the_rate() {
        let t = std::sync::Arc::new(Throttle::new(1 << 20));
        let start = Instant::now();
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || t.take(64 << 10))
            })
            .collect();
        for r in readers {
            r.join().expect("reader");
        }
        // 256 KiB at 1 MiB/s cannot be done in less than 250 ms, however
        // the readers interleave (a lower bound only: the machine may be slow).
        assert!(start.elapsed() >= Duration::from_millis(250));
    }
}
