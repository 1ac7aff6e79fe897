//! The one process-wide gate every Genesys API request passes: a GCRA rate limiter (governor)
//! plus a pause that a 429 imposes on the whole process.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::time::Instant;

use crate::config::Rate;
use crate::metrics as m;

/// Paces Genesys API requests: at most `rate`·t + `burst` in any window of t seconds, and none
/// at all while a `Retry-After` from Genesys is running.
pub struct RateGate {
    limiter: DefaultDirectRateLimiter,
    // A std Mutex: held for a comparison only, never across an await.
    paused_until: Mutex<Option<Instant>>,
}

impl RateGate {
    /// A gate allowing `rate` with `burst` requests back to back.
    pub fn new(rate: Rate, burst: NonZeroU32) -> Self {
        // The emission interval: one request every `per / count`. Rates above one per
        // nanosecond do not exist in practice; clamp instead of failing.
        let interval = (rate.per / rate.count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            limiter: DefaultDirectRateLimiter::direct(quota),
            paused_until: Mutex::new(None),
        }
    }

    /// Waits for this request's turn; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(until) = self.pause_deadline() {
                tokio::time::sleep_until(until).await;
            }
            self.limiter.until_ready().await;
            // A 429 may have arrived while this request waited for its slot: honour it too.
            // The slot is forfeited, which only makes the process slower, never faster.
            if self.pause_deadline().is_none() {
                break;
            }
        }
        let waited = started.elapsed();
        metrics::histogram!(m::RATE_LIMITER_WAIT_SECONDS).record(waited.as_secs_f64());
        waited
    }

    /// Stops every request of the process for `duration` (Genesys's `Retry-After`).
    /// A pause only ever grows: a shorter `Retry-After` does not cut a longer one short.
    pub fn pause_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }

    /// The end of the current pause, if one is running.
    pub fn pause_deadline(&self) -> Option<Instant> {
        let paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        paused.filter(|until| *until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn after_the_burst_requests_are_spaced_by_the_rate() {
        let gate = RateGate::new(
            Rate::new(20, Duration::from_secs(1)).unwrap(),
            NonZeroU32::new(3).unwrap(),
        );
        let started = std::time::Instant::now();
        for _ in 0..3 {
            gate.acquire().await;
        }
        let burst_done = started.elapsed();
        for _ in 0..4 {
            gate.acquire().await;
        }
        let paced = started.elapsed() - burst_done;
        // Four more at 50 ms intervals: at least ~150 ms (governor's clock may round).
        assert!(paced >= Duration::from_millis(140), "paced took {paced:?}");
    }

    #[tokio::test]
    async fn a_pause_holds_every_request_and_only_grows() {
        let gate = RateGate::new(
            Rate::new(1000, Duration::from_secs(1)).unwrap(),
            NonZeroU32::MIN,
        );
        gate.pause_for(Duration::from_millis(300));
        gate.pause_for(Duration::from_millis(10));
        let deadline = gate.pause_deadline().expect("paused");
        let waited = gate.acquire().await;
        assert!(Instant::now() >= deadline);
        assert!(waited >= Duration::from_millis(280), "{waited:?}");
        assert!(gate.pause_deadline().is_none());
    }
}
