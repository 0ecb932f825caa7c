//! The pace of the fill's reads from a store: when it may send a range,
//! how many bytes of ranged GETs it keeps in flight, and in what range
//! size.
//!
//! A link's bottleneck queue is first in, first out: whatever the fill has
//! queued there, a fault's reply waits behind. Sent at full speed, the
//! fill keeps that queue full (20 ms of data on the emulated 100 Mbit/s
//! link, two round trips by itself), so an isolated fault costs three or
//! four round trips. The fill therefore paces itself as a delay-based
//! scavenger in the LEDBAT manner (RFC 6817): the time to the first byte
//! of its last few reads (the least of them: jitter only ever adds),
//! less the fastest seen (the round trip with nothing queued), is the
//! delay the queue adds. The window of bytes in flight grows while that
//! delay stays under a target (half the round trip, at least
//! [`MIN_TARGET`]) and shrinks when it goes over, in proportion to the
//! difference, so the queue holds about the target: the link stays busy
//! and a fault waits little behind the fill.
//!
//! A delay is the fill's own queue only when the link is full, though.
//! The store's own time to answer and the host's CPU (a busy guest on a
//! small host, a store starved of CPU) add delay just the same, and
//! shrinking the window for them only starves the fill: the link then
//! idles while each small read waits out the delay. So the pace also
//! measures the fill's delivery rate over the time it has reads in
//! flight ([`Delivery`]). While that rate stays below
//! [`FULL_PERCENT`] of the most it has delivered, a delay over the target
//! is not taken for a queue: the window grows on, up to [`PROBE_GAIN`]
//! times what delivers that most at the delay now (a bandwidth-delay
//! product measured with the delay now, in the manner of BBR). The gain
//! lets the rate pass the most seen, so the most can grow past what a
//! window once shrunk delivered. The most is that of the last
//! [`PEAK_SPAN`] only, also as in BBR: a link that slows down (other
//! traffic on it) or a most measured too high is forgotten, and the fill
//! reads the delay as its queue again.
//!
//! Faults come first outright: no range is admitted while a fault's read
//! is in flight, nor for [`HOLD_OFF`] after the last one ended.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The window a restore starts with: about a bandwidth-delay product of
/// the links thaw expects (32 MB/s over 30 ms is 1 MB).
const INITIAL_WINDOW: u64 = 1 << 20;
/// The window never shrinks below two of the smallest ranges: the fill
/// always goes on.
const MIN_WINDOW: u64 = 2 * MIN_RANGE;
/// Nor grows past this: what the fill asks of a store at once (see
/// [`super::pages`]), so one read can keep all of it in flight.
pub const MAX_WINDOW: u64 = 32 << 20;
/// The range size follows the window (about two ranges in flight) within
/// these bounds; a power of two, so ranges never span a stored chunk.
const MIN_RANGE: u64 = 64 << 10;
pub const MAX_RANGE: u64 = 2 << 20;
/// The queueing delay aimed at: this fraction of the fastest round trip,
/// and at least [`MIN_TARGET`]. Under load a store's own time to answer
/// grows by milliseconds too (SeaweedFS on the host's other core takes
/// 2 ms unloaded, 5 to 16 ms while it serves the fill at 1 Gbit/s): a
/// smaller target would read that as the link's queue and starve the
/// fill of a fast link.
const TARGET_FRACTION: u32 = 2;
const MIN_TARGET: Duration = Duration::from_millis(5);
/// The delay now is the least of the last few reads' (jitter from the
/// store or the host's scheduler only ever adds delay).
const RECENT_SAMPLES: usize = 4;
/// How fast the window moves: by up to the bytes read divided by this,
/// so by up to half of itself per round trip.
const GAIN_DIVISOR: i128 = 2;

/// The link counts as full while the fill's delivery rate is at least
/// this percentage of the most it has delivered: a delay beyond the target
/// is then the fill's own queue and shrinks the window.
const FULL_PERCENT: f64 = 80.0;
/// The fill's delivery rate is measured over this much of the time it
/// has reads in flight: long against a round trip and against the delays
/// of a busy host's scheduler, since a read is counted when its thread
/// gets to it (measured over 250 ms, reads counted late passed for a
/// link 1.7 times as fast as the emulated one).
const RATE_SPAN: Duration = Duration::from_secs(1);
/// While the link is not full, the window grows up to this many times
/// what delivers the most rate seen at the delay now.
const PROBE_GAIN: f64 = 1.5;
/// The most delivered is the most over this much of the time the fill
/// has reads in flight.
const PEAK_SPAN: Duration = Duration::from_secs(10);

/// After a fault's read, no range is admitted for this long: a guest that
/// faults faults again soon, and each of its reads should find the link
/// free rather than queued behind the fill's (the window keeps that queue
/// short otherwise).
const HOLD_OFF: Duration = Duration::from_millis(100);

/// The fill's pace; shared by every read of one image.
pub struct Pace {
    state: Mutex<State>,
    /// Woken when a range may have become admissible: bytes in flight
    /// released, the window grown, a fault's read ended.
    changed: tokio::sync::Notify,
    hold_off: Duration,
}

struct State {
    window: u64,
    in_flight: u64,
    /// Faults' reads in flight.
    urgent: usize,
    /// When the last fault's read ended.
    last_urgent_end: Option<Instant>,
    /// The fastest round trip seen: the least of a fault's time to its
    /// first byte and of the fill's delay now.
    base: Option<Duration>,
    /// The last background reads' times to their first byte.
    recent: VecDeque<Duration>,
    delivery: Delivery,
}

/// The fill's delivery rate, over the time it has reads in flight (time
/// the fill is held off for faults, or has nothing to read, does not
/// count).
#[derive(Default)]
struct Delivery {
    /// Bytes the fill's reads have received, in all.
    delivered: u64,
    /// Time with reads in flight, in all, until `busy_since`.
    busy: Duration,
    /// Since when reads are in flight, if they are.
    busy_since: Option<Instant>,
    /// (busy time, bytes delivered) when reads ended (and when the first
    /// started), back to one at least [`RATE_SPAN`] of busy time ago.
    marks: VecDeque<(Duration, u64)>,
    /// (busy time, bytes per second) of the rates measured over the last
    /// [`PEAK_SPAN`] that no later one reached: the first is the most.
    peaks: VecDeque<(Duration, f64)>,
}

impl Delivery {
    fn busy_at(&self, now: Instant) -> Duration {
        self.busy
            + self
                .busy_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    /// Reads are in flight from `now` (there were none).
    fn start(&mut self, now: Instant) {
        self.busy_since.get_or_insert(now);
        if self.marks.is_empty() {
            self.marks.push_back((self.busy, self.delivered));
        }
    }

    /// No read is in flight from `now`.
    fn stop(&mut self, now: Instant) {
        self.busy = self.busy_at(now);
        self.busy_since = None;
    }

    /// A read of `bytes` ended at `now`: the bytes per second delivered
    /// over the last [`RATE_SPAN`] of busy time, once there is one.
    fn delivered(&mut self, bytes: u64, now: Instant) -> Option<f64> {
        let busy = self.busy_at(now);
        self.delivered += bytes;
        while self
            .marks
            .get(1)
            .is_some_and(|&(at, _)| busy.saturating_sub(at) >= RATE_SPAN)
        {
            self.marks.pop_front();
        }
        let rate = self.marks.front().and_then(|&(at, delivered)| {
            let span = busy.saturating_sub(at);
            (span >= RATE_SPAN).then(|| (self.delivered - delivered) as f64 / span.as_secs_f64())
        });
        self.marks.push_back((busy, self.delivered));
        if let Some(rate) = rate {
            while self.peaks.back().is_some_and(|&(_, peak)| peak <= rate) {
                self.peaks.pop_back();
            }
            self.peaks.push_back((busy, rate));
            while self
                .peaks
                .front()
                .is_some_and(|&(at, _)| busy.saturating_sub(at) > PEAK_SPAN)
            {
                self.peaks.pop_front();
            }
        }
        rate
    }

    /// The most bytes per second delivered over a [`RATE_SPAN`] in the
    /// last [`PEAK_SPAN`] (0 before the first).
    fn max_rate(&self) -> f64 {
        self.peaks.front().map_or(0.0, |&(_, rate)| rate)
    }

    /// Whether `rate` fills the link: it is at least [`FULL_PERCENT`] % of
    /// the most delivered (a rate not measured yet counts as full).
    fn is_full(&self, rate: Option<f64>) -> bool {
        rate.is_none_or(|rate| rate * 100.0 >= self.max_rate() * FULL_PERCENT)
    }
}

impl Default for Pace {
    fn default() -> Pace {
        Pace::new()
    }
}

impl Pace {
    pub fn new() -> Pace {
        Pace::with_hold_off(HOLD_OFF)
    }

    fn with_hold_off(hold_off: Duration) -> Pace {
        Pace {
            state: Mutex::new(State {
                window: INITIAL_WINDOW,
                in_flight: 0,
                urgent: 0,
                last_urgent_end: None,
                base: None,
                recent: VecDeque::with_capacity(RECENT_SAMPLES),
                delivery: Delivery::default(),
            }),
            changed: tokio::sync::Notify::new(),
            hold_off,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The window now, in bytes.
    pub fn window(&self) -> u64 {
        self.state().window
    }

    /// The size to cut the next background read into: half the
    /// window, as a power of two between [`MIN_RANGE`] and [`MAX_RANGE`].
    pub fn range_bytes(&self) -> u64 {
        let half = (self.window() / 2).clamp(MIN_RANGE, MAX_RANGE);
        1 << half.ilog2()
    }

    /// Waits until no fault's read is in flight or just ended (see
    /// [`HOLD_OFF`]) and `bytes` more fit in the window (or nothing is in
    /// flight), and counts them in flight until the returned guard drops.
    pub async fn admit(self: &Arc<Pace>, bytes: u64) -> InFlight {
        loop {
            // Registered before the check: a change between the two is
            // not lost.
            let changed = self.changed.notified();
            let hold_off_left = {
                let mut s = self.state();
                let hold_off_left = s
                    .last_urgent_end
                    .and_then(|end| self.hold_off.checked_sub(end.elapsed()))
                    .filter(|left| !left.is_zero());
                let fits = s.in_flight == 0 || s.in_flight + bytes <= s.window;
                if s.urgent == 0 && hold_off_left.is_none() && fits {
                    if s.in_flight == 0 {
                        s.delivery.start(Instant::now());
                    }
                    s.in_flight += bytes;
                    return InFlight {
                        pace: self.clone(),
                        bytes,
                    };
                }
                // A fault's read in flight: until it ends.
                hold_off_left.filter(|_| s.urgent == 0)
            };
            match hold_off_left {
                // Until the hold-off ends, or sooner if a fault reads again.
                Some(left) => {
                    let _ = tokio::time::timeout(left, changed).await;
                }
                None => changed.await,
            }
        }
    }

    /// A fault's read starts: no range is admitted until the returned
    /// guard drops, nor for [`HOLD_OFF`] after.
    pub fn urgent_read(&self) -> UrgentRead<'_> {
        self.state().urgent += 1;
        UrgentRead { pace: self }
    }

    /// A fault's read got its first byte after `first_byte`: a sample of
    /// the round trip, not of the fill's queue.
    pub fn observe_urgent(&self, first_byte: Duration) {
        let mut s = self.state();
        s.base = Some(s.base.map_or(first_byte, |b| b.min(first_byte)));
    }

    /// A background read of `bytes` got its first byte after
    /// `first_byte` and has ended: moves the window towards the target
    /// delay (see [`InFlight::ended`]).
    fn observe(&self, first_byte: Duration, bytes: u64) {
        let mut s = self.state();
        let rate = s.delivery.delivered(bytes, Instant::now());
        s.adjust(first_byte, bytes, rate);
        // The read's guard wakes waiting reads as it drops.
    }
}

impl State {
    /// Moves the window after a background read of `bytes` whose first
    /// byte came after `first_byte`, with the fill's delivery rate now
    /// (bytes per second), if measured.
    fn adjust(&mut self, first_byte: Duration, bytes: u64, rate: Option<f64>) {
        if self.recent.len() == RECENT_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(first_byte);
        let now = self.recent.iter().min().copied().unwrap_or(first_byte);
        let base = self.base.map_or(now, |b| b.min(now));
        self.base = Some(base);
        // In nanoseconds: how far the queue is under (+) or over (-) the
        // target, at most the target itself either way.
        let nanos = |d: Duration| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX);
        let target = nanos((base / TARGET_FRACTION).max(MIN_TARGET));
        let queued = nanos(now.saturating_sub(base)).min(target * 2);
        let off_target = (target - queued).clamp(-target, target);
        let mut change = i128::from(bytes) * off_target / (GAIN_DIVISOR * target);
        let full = self.delivery.is_full(rate);
        if change < 0 && !full {
            // The delay is not the fill's queue on the link, which is not
            // full: the window grows on, past what delivered the most at
            // the delay now.
            let enough = PROBE_GAIN * self.delivery.max_rate() * now.as_secs_f64();
            change = if (self.window as f64) < enough {
                i128::from(bytes) / GAIN_DIVISOR
            } else {
                0
            };
        }
        let window = (i128::from(self.window) + change)
            .clamp(i128::from(MIN_WINDOW), i128::from(MAX_WINDOW));
        self.window = u64::try_from(window).unwrap_or(MIN_WINDOW);
        log::trace!(
            "fill read of {bytes} B: first byte after {} µs, fastest {} µs, \
             {} KiB/s (most {:.0} KiB/s), window {} KiB",
            first_byte.as_micros(),
            base.as_micros(),
            rate.map_or_else(|| "-".to_owned(), |r| format!("{:.0}", r / 1024.0)),
            self.delivery.max_rate() / 1024.0,
            self.window >> 10
        );
    }
}

/// Bytes of one read counted in flight while this lives.
pub struct InFlight {
    pace: Arc<Pace>,
    bytes: u64,
}

impl InFlight {
    /// The read has ended, its first byte having come after `first_byte`:
    /// moves the window (see [`Pace`]), and no longer counts the bytes in
    /// flight.
    pub fn ended(self, first_byte: Duration) {
        self.pace.observe(first_byte, self.bytes);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut s = self.pace.state();
            s.in_flight = s.in_flight.saturating_sub(self.bytes);
            if s.in_flight == 0 {
                s.delivery.stop(Instant::now());
            }
        }
        self.pace.changed.notify_waiters();
    }
}

/// A fault's read in flight, counted while this lives.
pub struct UrgentRead<'a> {
    pace: &'a Pace,
}

impl Drop for UrgentRead<'_> {
    fn drop(&mut self) {
        {
            let mut s = self.pace.state();
            s.urgent = s.urgent.saturating_sub(1);
            s.last_urgent_end = Some(Instant::now());
        }
        // Waiting ranges now wait out the hold-off.
        self.pace.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(20);

    #[test]
    fn the_window_grows_while_nothing_queues_and_shrinks_when_the_queue_grows() {
        let pace = Pace::new();
        pace.observe_urgent(RTT);
        let start = pace.window();
        for _ in 0..8 {
            pace.observe(RTT, 256 << 10);
        }
        let grown = pace.window();
        assert!(grown > start, "{grown} after {start}");
        // Twice the target (half the round trip) queued: shrinks.
        for _ in 0..8 {
            pace.observe(RTT * 2, 256 << 10);
        }
        let shrunk = pace.window();
        assert!(shrunk < grown, "{shrunk} after {grown}");
        // At the target it holds still.
        for _ in 0..8 {
            pace.observe(RTT + RTT / 2, 256 << 10);
        }
        assert_eq!(pace.window(), shrunk);
    }

    #[test]
    fn one_slow_reply_among_fast_ones_does_not_shrink_the_window() {
        let pace = Pace::new();
        for _ in 0..RECENT_SAMPLES {
            pace.observe(RTT, 64 << 10);
        }
        let before = pace.window();
        pace.observe(RTT * 10, 64 << 10);
        assert!(pace.window() >= before);
    }

    #[test]
    fn the_window_and_ranges_stay_within_bounds() {
        let pace = Pace::new();
        for _ in 0..10_000 {
            pace.observe(RTT, MAX_RANGE);
        }
        assert_eq!(pace.window(), MAX_WINDOW);
        assert_eq!(pace.range_bytes(), MAX_RANGE);
        for _ in 0..10_000 {
            pace.observe(RTT * 10, MAX_RANGE);
        }
        assert_eq!(pace.window(), MIN_WINDOW);
        assert_eq!(pace.range_bytes(), MIN_RANGE);
        for _ in 0..3 {
            pace.observe(RTT, 100 << 10);
        }
        let r = pace.range_bytes();
        assert!(r.is_power_of_two() && (MIN_RANGE..=MAX_RANGE).contains(&r));
        assert_eq!(MAX_RANGE % MIN_RANGE, 0);
    }

    #[test]
    fn the_delivery_rate_counts_only_time_with_reads_in_flight() {
        let mut d = Delivery::default();
        let t0 = Instant::now();
        d.start(t0);
        assert_eq!(d.delivered(1 << 20, t0 + RATE_SPAN / 2), None);
        // 4 MiB in a second of reads in flight: 4 MiB/s.
        let rate = d.delivered(3 << 20, t0 + RATE_SPAN);
        assert_eq!(rate, Some(f64::from(4 << 20)));
        // A second idle (held off for faults) does not slow it.
        d.stop(t0 + RATE_SPAN);
        let t1 = t0 + RATE_SPAN + Duration::from_secs(1);
        d.start(t1);
        let rate = d.delivered(2 << 20, t1 + RATE_SPAN / 2).unwrap_or(0.0);
        assert!(rate >= f64::from(4 << 20), "{rate}");
        assert!(d.is_full(Some(rate)));
        // A tenth of the rate with reads in flight is not a full link.
        let rate = d.delivered(1 << 20, t1 + RATE_SPAN * 3);
        assert!(!d.is_full(rate), "{rate:?} against {}", d.max_rate());
        assert!(d.is_full(None));
    }

    #[test]
    fn the_link_is_full_from_the_threshold_on() {
        let mut d = Delivery::default();
        d.peaks.push_back((Duration::ZERO, 1000.0));
        let at = |percent: f64| Some(1000.0 * percent / 100.0);
        assert!(d.is_full(at(FULL_PERCENT + 1.0)));
        assert!(!d.is_full(at(FULL_PERCENT - 1.0)));
    }

    #[test]
    fn the_most_delivered_is_forgotten_after_the_peak_span() {
        let mut d = Delivery::default();
        let t0 = Instant::now();
        d.start(t0);
        let mut t = t0;
        // 8 MiB/s for two seconds, then 2 MiB/s.
        for _ in 0..20 {
            t += RATE_SPAN / 10;
            d.delivered(800 << 10, t);
        }
        let fast = d.max_rate();
        assert!(fast > f64::from(7 << 20), "{fast}");
        for _ in 0..10 {
            t += RATE_SPAN / 10;
            d.delivered(200 << 10, t);
        }
        assert_eq!(d.max_rate(), fast, "still within the span");
        let end = t + PEAK_SPAN;
        while t < end {
            t += RATE_SPAN / 10;
            d.delivered(200 << 10, t);
        }
        let slow = d.max_rate();
        assert!(slow < f64::from(3 << 20), "{slow} after {fast}");
        assert!(d.peaks.len() < 200, "{} peaks kept", d.peaks.len());
    }

    /// A pace's window after `rounds` reads of 256 KiB whose first bytes
    /// came after `first_byte`, at a delivery rate of `rate` against a
    /// most of `max_rate`.
    fn adjusted(first_byte: Duration, rate: f64, max_rate: f64, rounds: usize) -> u64 {
        let pace = Pace::new();
        let mut s = pace.state();
        s.base = Some(RTT);
        s.delivery.peaks.push_back((Duration::ZERO, max_rate));
        for _ in 0..rounds {
            s.adjust(first_byte, 256 << 10, Some(rate));
        }
        s.window
    }

    #[test]
    fn a_delay_shrinks_the_window_only_while_the_link_is_full() {
        let link = f64::from(32 << 20);
        // Full link, delay over the target: the fill's own queue.
        assert!(adjusted(RTT * 3, link, link, 8) < INITIAL_WINDOW);
        // The same delay at a third of the link: the store's or the host's,
        // not a queue. The window grows, to what delivers the link's rate
        // at that delay and the probe's gain over it, and no further.
        let grown = adjusted(RTT * 3, link / 3.0, link, 1_000);
        let enough = (32 << 20) * u64::try_from((RTT * 3).as_millis()).unwrap_or(0) * 3 / 2000;
        assert!(grown > INITIAL_WINDOW, "{grown}");
        assert!(
            (enough..enough + (256 << 10)).contains(&grown),
            "{grown} against {enough}"
        );
        // Nothing queued: it grows whatever the rate, as before.
        assert!(adjusted(RTT, link / 3.0, link, 8) > INITIAL_WINDOW);
    }

    #[tokio::test]
    async fn a_faults_read_holds_the_fill_while_it_lasts_and_the_hold_off_after() {
        // A hold-off no test outlasts: admission waits on it.
        let pace = Arc::new(Pace::with_hold_off(Duration::from_secs(3600)));
        let fault = pace.urgent_read();
        let waiting = pace.admit(MIN_RANGE);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(fault);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // With no hold-off the fill goes on as the fault's read ends.
        let pace = Arc::new(Pace::with_hold_off(Duration::ZERO));
        let fault = pace.urgent_read();
        let waiting = pace.admit(MIN_RANGE);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(fault);
        let _reading = waiting.await;
    }

    #[tokio::test]
    async fn reads_past_the_window_wait_for_bytes_in_flight_to_end() {
        let pace = Arc::new(Pace::new());
        let window = pace.window();
        let first = pace.admit(window).await;
        // Nothing more fits; a read waits until the first one ends.
        let waiting = pace.admit(MIN_RANGE);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(first);
        let _second = waiting.await;
        // With nothing else in flight, one read larger than the window
        // still goes.
        drop(_second);
        let _big = pace.admit(window * 4).await;
    }
}
