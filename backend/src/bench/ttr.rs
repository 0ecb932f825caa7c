//! Time-to-responsiveness: when a restored guest is usable again, read off
//! its own throughput reports.
//!
//! Definition (after the VEE 2011 paper): the guest reports its throughput
//! for consecutive intervals of its own time (`THAW-TPUT`, every 50 ms).
//! Each report is stamped with the host time it arrived at, relative to the
//! start of the restore command; its interval is taken to have started
//! `interval_ms` before that. The reference rate is the restored guest's
//! steady state: the median of its reports once all RAM is resident (the
//! pre-save warm rate when there are too few). The rate is judged smoothed over the last `smooth`
//! reports (4 × 50 ms: one 50 ms hiccup of a shared host does not reset the
//! clock, a stall of 100 ms or more still does). TTR is the start of the
//! first interval from which on the smoothed rate stays at least `fraction`
//! (90 %) of the warm rate for `hold` (1 s). A restore whose rate never
//! holds that long while watched has no TTR.

use serde::{Deserialize, Serialize};

/// One throughput report as the host saw it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Arrival, ms since the restore command started.
    pub at_ms: f64,
    /// The guest-time length of the interval it reports on.
    pub interval_ms: f64,
    /// MiB/s the guest processed in it.
    pub mib_per_s: f64,
}

/// The rate of each report averaged (time-weighted) with the `smooth - 1`
/// reports before it.
pub fn smoothed(samples: &[Sample], smooth: usize) -> Vec<f64> {
    let smooth = smooth.max(1);
    (0..samples.len())
        .map(|i| {
            let w = &samples[i.saturating_sub(smooth - 1)..=i];
            let time: f64 = w.iter().map(|s| s.interval_ms).sum();
            let work: f64 = w.iter().map(|s| s.mib_per_s * s.interval_ms).sum();
            if time > 0.0 {
                work / time
            } else {
                0.0
            }
        })
        .collect()
}

/// The TTR in ms since the restore started, if the guest got there.
pub fn time_to_responsiveness(
    samples: &[Sample],
    warm: f64,
    fraction: f64,
    hold_ms: f64,
    smooth: usize,
) -> Option<f64> {
    let rates = smoothed(samples, smooth);
    let good = |i: usize| rates[i] >= fraction * warm;
    let last = samples.last()?;
    for (i, s) in samples.iter().enumerate() {
        if !good(i) {
            continue;
        }
        let start = (s.at_ms - s.interval_ms).max(0.0);
        if last.at_ms < start + hold_ms {
            // Not observed for long enough: later candidates are even later.
            return None;
        }
        let held = (i..samples.len())
            .take_while(|&j| samples[j].at_ms - samples[j].interval_ms < start + hold_ms)
            .all(good);
        if held {
            return Some(start);
        }
    }
    None
}

/// Median of `values` (None when empty).
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rates: &[f64]) -> Vec<Sample> {
        rates
            .iter()
            .enumerate()
            .map(|(i, &r)| Sample {
                at_ms: 100.0 + 50.0 * (i + 1) as f64,
                interval_ms: 50.0,
                mib_per_s: r,
            })
            .collect()
    }

    #[test]
    fn ttr_is_the_start_of_the_first_interval_that_holds() {
        // Slow, a good blip, slow again, then good for good.
        let mut rates = vec![10.0, 10.0, 95.0, 20.0, 50.0];
        rates.extend(std::iter::repeat(92.0).take(30));
        let s = series(&rates);
        // The sixth report (index 5) arrives at 400 ms and covers 350..400.
        assert_eq!(
            time_to_responsiveness(&s, 100.0, 0.9, 1000.0, 1),
            Some(350.0)
        );
    }

    #[test]
    fn one_short_dip_does_not_reset_the_clock_when_smoothed() {
        let mut rates = vec![10.0];
        rates.extend(std::iter::repeat(100.0).take(10));
        rates.push(70.0);
        rates.extend(std::iter::repeat(100.0).take(30));
        let s = series(&rates);
        // Unsmoothed, the dip restarts the clock after it (report 12 covers
        // 700..750 ms); smoothed over 4 reports it is absorbed, but the slow
        // first report keeps the average low until it leaves the window
        // (report 4 covers 300..350 ms).
        assert_eq!(
            time_to_responsiveness(&s, 100.0, 0.9, 1000.0, 1),
            Some(700.0)
        );
        assert_eq!(
            time_to_responsiveness(&s, 100.0, 0.9, 1000.0, 4),
            Some(300.0)
        );
    }

    #[test]
    fn no_ttr_without_a_full_second_observed_or_ever_reaching_the_rate() {
        let short = series(&[95.0; 10]);
        assert_eq!(time_to_responsiveness(&short, 100.0, 0.9, 1000.0, 4), None);
        let slow = series(&[50.0; 100]);
        assert_eq!(time_to_responsiveness(&slow, 100.0, 0.9, 1000.0, 4), None);
        assert_eq!(time_to_responsiveness(&[], 100.0, 0.9, 1000.0, 4), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::<f64>::new()), None);
    }
}
