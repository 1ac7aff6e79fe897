//! Small statistics over what the benchmarks record: percentiles, steady rates and windows.

use std::time::{Duration, Instant};

/// The `p`-th percentile (0–100) of `values` by nearest rank; `None` when empty.
pub(crate) fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest rank: the smallest value with at least p % of the samples at or below it.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Events per second between the `from`-th and the `to`-th of `times` (sorted), leaving out
/// the ramp-up before `from` and the tail after `to`; `None` when the span is empty.
pub(crate) fn rate_between(times: &[Instant], from: usize, to: usize) -> Option<f64> {
    let (start, end) = (times.get(from)?, times.get(to)?);
    let span = end.checked_duration_since(*start)?;
    (to > from && !span.is_zero()).then(|| (to - from) as f64 / span.as_secs_f64())
}

/// The steady rate of a run of `times`: from the `skip`-th event to the `skip`-th from the
/// end, so neither the first batch (token fetch, connections) nor the drain counts. Falls back
/// to the whole run when it is too short to skip.
pub(crate) fn steady_rate(times: &[Instant], skip: usize) -> Option<f64> {
    let last = times.len().checked_sub(1)?;
    if last > 4 * skip {
        rate_between(times, skip, last - skip)
    } else {
        rate_between(times, 0, last)
    }
}

/// The largest number of `arrivals_ms` (sorted, milliseconds) in any window `[t, t + width)`.
pub(crate) fn max_in_window(arrivals_ms: &[u64], width_ms: u64) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, &at) in arrivals_ms.iter().enumerate() {
        while arrivals_ms[start] + width_ms <= at {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// Counts of `arrivals_ms` in consecutive 1-second buckets starting at `origin_ms`, for
/// `seconds` buckets (arrivals outside are ignored).
pub(crate) fn per_second(arrivals_ms: &[u64], origin_ms: u64, seconds: usize) -> Vec<usize> {
    let mut buckets = vec![0; seconds];
    for &at in arrivals_ms {
        let Some(offset) = at.checked_sub(origin_ms) else {
            continue;
        };
        if let Some(bucket) = buckets.get_mut((offset / 1000) as usize) {
            *bucket += 1;
        }
    }
    buckets
}

/// Milliseconds as a float, for reports.
pub(crate) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn windows_and_buckets() {
        // 20 per second, evenly spaced, plus one back-to-back at the start (burst 1).
        let mut arrivals = vec![0];
        arrivals.extend((0..60).map(|i| i * 50));
        assert_eq!(max_in_window(&arrivals, 1000), 21);
        assert_eq!(per_second(&arrivals, 0, 3), vec![21, 20, 20]);
        assert_eq!(max_in_window(&[], 1000), 0);
    }

    #[test]
    fn steady_rate_skips_the_edges() {
        let start = Instant::now();
        // 100 events 10 ms apart, then a straggler a second later.
        let mut times: Vec<_> = (0..100)
            .map(|i| start + Duration::from_millis(i * 10))
            .collect();
        times.push(start + Duration::from_secs(2));
        let rate = steady_rate(&times, 5).expect("rate");
        assert!((rate - 100.0).abs() < 1.0, "{rate}");
        assert_eq!(steady_rate(&times[..1], 5), None);
    }
}
