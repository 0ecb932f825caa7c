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
    /// after every read granted before it (background reads).
    pub fn take(&self, bytes: u64) {
        self.wait(bytes, false)
    }

    /// Like [`Throttle::take`] for a read a guest is waiting on: it is served
    /// before the background reads already queued, which move back by its
    /// transfer time (the emulated link serves faults first).
    pub fn take_urgent(&self, bytes: u64) {
        self.wait(bytes, true)
    }

    fn wait(&self, bytes: u64, urgent: bool) {
        let Some(done) = self.grant(bytes, urgent, Instant::now()) else {
            return;
        };
        let now = Instant::now();
        if done > now {
            std::thread::sleep(done - now);
        }
    }

    /// Books a read of `bytes` asked for at `now`; returns when it is done
    /// (`None` if a reader panicked holding the lock: then nothing is
    /// limited rather than the restore stalled).
    fn grant(&self, bytes: u64, urgent: bool, now: Instant) -> Option<Instant> {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        let mut until = self.busy_until.lock().ok()?;
        let queued = (*until).max(now);
        *until = queued + cost;
        Some(if urgent { now + cost } else { *until })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn background_reads_queue_behind_each_other() {
        let t = Throttle::new(MIB);
        let now = Instant::now();
        let first = t.grant(MIB, false, now).expect("grant");
        let second = t.grant(MIB / 2, false, now).expect("grant");
        assert_eq!(first - now, Duration::from_secs(1));
        assert_eq!(second - now, Duration::from_millis(1500));
    }

    #[test]
    fn an_urgent_read_goes_ahead_and_pushes_background_reads_back() {
        let t = Throttle::new(MIB);
        let now = Instant::now();
        let background = t.grant(2 * MIB, false, now).expect("grant");
        let urgent = t.grant(MIB / 4, true, now).expect("grant");
        let after = t.grant(MIB / 4, false, now).expect("grant");
        assert_eq!(background - now, Duration::from_secs(2));
        assert_eq!(
            urgent - now,
            Duration::from_millis(250),
            "not behind the queue"
        );
        assert_eq!(
            after - now,
            Duration::from_millis(2500),
            "the queue moved back"
        );
    }
}
