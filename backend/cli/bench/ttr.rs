//! Time-to-responsiveness: when a restored guest is usable again, read off
//! its own throughput reports.
//!
//! Definition (after the VEE 2011 paper): the guest reports its throughput
//! for consecutive intervals of its own time (`THAW-TPUT`, every 50 ms).
//! Each report is stamped with the host time it arrived at, relative to the
//! start of the restore command; its interval is taken to have started
//! `interval_ms` before that. The reference rate is the restored guest's
//! steady state: the median of its reports once all RAM is resident (the
//! pre-save warm rate when there are too few). TTR is the start of the
//! first interval from which the guest's throughput over the next `hold`
//! (1 s) of reports, i.e. the work it did in that second, is at least
//! `fraction` (90 %) of the reference: a guest that stalls for more than
//! 100 ms of that second, or runs 10 % slow throughout, is not there yet,
//! while the ±7 % jitter of single 50 ms reports on a shared host does not
//! move TTR around. It is never before the guest runs. A restore that is
//! not observed for a full second after that point has no TTR.

use serde::{Deserialize, Serialize};

/// One throughput report as the host saw it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Arrival, ms since the restore command started.
    pub at_ms: f64,
    /// The guest-time length of the interval it reports on.
    pub interval_ms: f64,
    /// The rate of work in it: MiB/s the guest processed (its own
    /// reports) or requests/s an application's client got answered.
    #[serde(alias = "mib_per_s")]
    pub rate: f64,
}

/// The TTR in ms since the restore started, if the guest got there;
/// `running_ms` is when the guest was resumed.
pub fn time_to_responsiveness(
    samples: &[Sample],
    reference: f64,
    fraction: f64,
    hold_ms: f64,
    running_ms: f64,
) -> Option<f64> {
    let last = samples.last()?;
    for (i, s) in samples.iter().enumerate() {
        let start = (s.at_ms - s.interval_ms).max(running_ms).max(0.0);
        if last.at_ms < start + hold_ms {
            // Not observed for long enough: later candidates are even later.
            return None;
        }
        // Work over the next `hold_ms` of reports.
        let (mut work, mut time) = (0.0, 0.0);
        for r in &samples[i..] {
            if time >= hold_ms {
                break;
            }
            let d = r.interval_ms.min(hold_ms - time);
            work += r.rate * d;
            time += d;
        }
        if time > 0.0 && work / time >= fraction * reference {
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
                rate: r,
            })
            .collect()
    }

    #[test]
    fn ttr_is_where_the_next_second_holds_the_rate() {
        // Slow, a good blip, slow again, then good for good.
        let mut rates = vec![10.0, 10.0, 95.0, 20.0, 50.0];
        rates.extend(std::iter::repeat_n(92.0, 30));
        let s = series(&rates);
        // From report 4 (300..350 ms) on, the next second averages
        // (50 + 19 * 92) / 20 = 89.9: short. From report 5 (350..400): 92.
        assert_eq!(
            time_to_responsiveness(&s, 100.0, 0.9, 1000.0, 0.0),
            Some(350.0)
        );
        // Never before the guest runs.
        assert_eq!(
            time_to_responsiveness(&s, 100.0, 0.9, 1000.0, 500.0),
            Some(500.0)
        );
    }

    #[test]
    fn jitter_is_absorbed_but_a_stall_is_not() {
        // ±7 % jitter around 100: responsive from the first report.
        let jitter: Vec<f64> = (0..40)
            .map(|i| if i % 2 == 0 { 93.0 } else { 107.0 })
            .collect();
        assert_eq!(
            time_to_responsiveness(&series(&jitter), 100.0, 0.9, 1000.0, 0.0),
            Some(100.0)
        );
        // A 150 ms stall (three reports at 0, covering 300..450 ms): every
        // second that holds all of it is at 85 %; the one from 350 ms on
        // holds 100 ms of it and makes 90 %.
        let mut stall = vec![100.0; 4];
        stall.extend([0.0, 0.0, 0.0]);
        stall.extend(vec![100.0; 30]);
        assert_eq!(
            time_to_responsiveness(&series(&stall), 100.0, 0.9, 1000.0, 0.0),
            Some(350.0)
        );
    }

    #[test]
    fn no_ttr_without_a_full_second_observed_or_ever_reaching_the_rate() {
        let short = series(&[95.0; 10]);
        assert_eq!(
            time_to_responsiveness(&short, 100.0, 0.9, 1000.0, 0.0),
            None
        );
        let slow = series(&[50.0; 100]);
        assert_eq!(time_to_responsiveness(&slow, 100.0, 0.9, 1000.0, 0.0), None);
        assert_eq!(time_to_responsiveness(&[], 100.0, 0.9, 1000.0, 0.0), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::<f64>::new()), None);
    }
}
