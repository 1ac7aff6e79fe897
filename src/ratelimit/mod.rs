//! The one gate every Genesys API request passes (lookups and retries included): the budget of
//! the process or of the whole fleet, an effective rate that adapts to 429s and to the
//! `inin-ratelimit-*` headers, and the pause a 429's `Retry-After` imposes.
//!
//! Two layers, on purpose. governor holds the configured budget as a fixed quota: it caps this
//! process at `rate`·t + `burst` whatever happens. governor cannot change a quota at runtime
//! (governor #273), and the effective rate must move (after a 429, with the share of a fleet),
//! so in front of it sits a *pacer*: a GCRA whose emission interval is read at every request.
//! The pacer reserves each request its own slot, either here (process scope, share mode) or in
//! Redis for the whole fleet ([`fleet`]). One request of the process holds a reservation at a
//! time (a FIFO lock held while it waits for its slot), so a lower rate applies from the next
//! request, not after a queue of reservations made at the old one, and nothing polls.

pub mod adaptive;
mod fleet;

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Rate, RateScope, RunSettings};
use crate::metrics as m;
use adaptive::{Adaptive, Limits, WindowEstimate};
pub use fleet::CONSUMER_POLL;

/// Where the pacer's slots come from now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateMode {
    /// Process scope: the budget is this process's.
    Process,
    /// Fleet scope, slots reserved in Redis for the whole fleet.
    Redis,
    /// Fleet scope without Redis: this process takes budget ÷ consumers on the jobs queue.
    Share,
}

impl RateMode {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Redis => "redis",
            Self::Share => "share",
        }
    }

    const ALL: [RateMode; 3] = [Self::Process, Self::Redis, Self::Share];
}

/// Paces Genesys API requests: at most `rate`·t + `burst` in any window of t seconds (for the
/// fleet in fleet scope), fewer after 429s, and none at all while a `Retry-After` is running.
pub struct RateGate {
    /// The process cap at the configured budget (fixed quota).
    limiter: DefaultDirectRateLimiter,
    limits: Limits,
    burst: u32,
    // A std Mutex: held for a comparison only, never across an await.
    paused_until: Mutex<Option<Instant>>,
    /// The local pacer's theoretical arrival time; the tokio Mutex is fair (FIFO), and holding
    /// it while waiting for a slot keeps one reservation per process outstanding.
    turn: tokio::sync::Mutex<Option<Instant>>,
    // std Mutex: arithmetic only, never held across an await.
    control: Mutex<Control>,
    /// Requests were held back since the last step up: the rate is in use, probing is useful.
    held_back: AtomicBool,
    /// Just switched to the share mode: the fleet may have handed out slots up to now, so the
    /// first share-mode request waits one share interval instead of leaving at once.
    share_fresh: AtomicBool,
    /// Fleet scope only.
    fleet: Option<fleet::Fleet>,
    /// Requests inside [`Self::acquire`] now: they wait on the rate's schedule, however slow,
    /// which the liveness watchdog must not take for a wedge.
    waiting: AtomicUsize,
}

/// This process's adaptive state (the fleet's lives in Redis while in Redis mode).
struct Control {
    adaptive: Adaptive,
    window: WindowEstimate,
}

impl RateGate {
    /// A process-scope gate allowing `rate` with `burst` requests back to back.
    pub fn new(rate: Rate, burst: NonZeroU32) -> Self {
        Self::build(rate, burst, None)
    }

    /// The gate `settings` ask for. In fleet scope this starts the consumer-count watcher and
    /// (with `DIALER_REDIS_URL`) the Redis budget; they stop with `shutdown`.
    pub fn for_settings(settings: &RunSettings, shutdown: &CancellationToken) -> Self {
        let fleet = match settings.rate_scope {
            RateScope::Process => None,
            RateScope::Fleet => Some(fleet::Fleet::start(settings, shutdown)),
        };
        Self::build(settings.rate_limit, settings.rate_burst, fleet)
    }

    fn build(rate: Rate, burst: NonZeroU32, fleet: Option<fleet::Fleet>) -> Self {
        // The emission interval: one request every `per / count`. Rates above one per
        // nanosecond do not exist in practice; clamp instead of failing.
        let interval = (rate.per / rate.count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let limits = Limits::for_budget(1.0 / interval.as_secs_f64());
        let mode = match &fleet {
            None => RateMode::Process,
            Some(f) if f.has_redis() => RateMode::Redis,
            Some(_) => RateMode::Share,
        };
        let gate = Self {
            limiter: DefaultDirectRateLimiter::direct(quota),
            limits,
            burst: burst.get(),
            paused_until: Mutex::new(None),
            turn: tokio::sync::Mutex::new(None),
            control: Mutex::new(Control {
                adaptive: Adaptive::new(limits),
                window: WindowEstimate::default(),
            }),
            held_back: AtomicBool::new(false),
            share_fresh: AtomicBool::new(false),
            fleet,
            waiting: AtomicUsize::new(0),
        };
        metrics::gauge!(m::RATE_LIMIT_CONFIGURED).set(limits.budget);
        if gate.fleet.is_some() {
            // A fleet gate can switch: the series exist from the start, so the first switch is
            // an increase Prometheus can see and the dashboard shows 0 rather than no data.
            for to in RateMode::ALL
                .into_iter()
                .filter(|m| *m != RateMode::Process)
            {
                metrics::counter!(m::RATE_MODE_SWITCHES_TOTAL, "to" => to.as_str()).increment(0);
            }
        }
        for each in RateMode::ALL {
            metrics::gauge!(m::RATE_MODE, "mode" => each.as_str()).set(if each == mode {
                1.0
            } else {
                0.0
            });
        }
        gate.publish_effective();
        gate
    }

    /// The mode in force.
    pub fn mode(&self) -> RateMode {
        self.fleet
            .as_ref()
            .map_or(RateMode::Process, fleet::Fleet::mode)
    }

    /// The configured budget, requests per second.
    pub fn budget(&self) -> f64 {
        self.limits.budget
    }

    /// Requests per second this process allows itself now.
    pub fn effective_rate(&self) -> f64 {
        let local = self.control().adaptive.rate;
        match (self.mode(), &self.fleet) {
            (RateMode::Redis, Some(fleet)) => fleet.cached_state().map_or(local, |s| s.rate),
            (RateMode::Share, Some(fleet)) => local / f64::from(fleet.consumers()),
            _ => local,
        }
    }

    /// Requests waiting for their turn right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits for this request's turn; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        // Counted until this future ends, whether its turn came or it was dropped.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let mut tat = self.turn.lock().await;
        loop {
            if let Some(until) = self.pause_deadline() {
                tokio::time::sleep_until(until).await;
            }
            self.step_up().await;
            let wait = self.reserve(&mut tat).await;
            if !wait.is_zero() {
                self.held_back.store(true, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
            // A 429 may have arrived while this request waited for its slot: honour it too.
            // The slot is forfeited, which only makes the fleet slower, never faster.
            if self.pause_deadline().is_some() {
                continue;
            }
            if self.limiter.check().is_err() {
                self.held_back.store(true, Ordering::Relaxed);
                self.limiter.until_ready().await;
                if self.pause_deadline().is_some() {
                    continue;
                }
            }
            break;
        }
        drop(tat);
        let waited = started.elapsed();
        metrics::histogram!(m::RATE_LIMITER_WAIT_SECONDS).record(waited.as_secs_f64());
        waited
    }

    /// Genesys answered 429: pauses the process (and in Redis mode the fleet) for
    /// `retry_after`, and lowers the effective rate.
    pub async fn rate_limited(&self, retry_after: Duration) {
        self.pause_for(retry_after);
        let now = wall_ms();
        self.control().adaptive.on_rate_limited(self.limits, now);
        if let (RateMode::Redis, Some(fleet)) = (self.mode(), &self.fleet) {
            let limits = self.limits;
            let result = async {
                fleet.pause(retry_after).await?;
                fleet
                    .update(|s| s.on_rate_limited(limits, now))
                    .await
                    .map(|_| ())
            }
            .await;
            if let Err(error) = result {
                self.redis_failed(&error);
            }
        }
        self.publish_effective();
    }

    /// An answer carried `inin-ratelimit-count`, `-allowed` and `-reset`: slows down before a
    /// 429 when the allowance is nearly used. In fleet scope the headers are read as the
    /// allowance the fleet shares (the org-wide limits the fleet scope exists for).
    pub async fn observe_allowance(&self, count: f64, allowed: f64, reset_secs: f64) {
        let now = wall_ms();
        let window = {
            let mut control = self.control();
            let window = control.window.observe(reset_secs);
            control
                .adaptive
                .on_allowance(self.limits, count, allowed, window, now);
            window
        };
        if let (RateMode::Redis, Some(fleet)) = (self.mode(), &self.fleet) {
            // Most answers change nothing: ask Redis only when the last state seen would move.
            let would_change = fleet
                .cached_state()
                .is_none_or(|mut s| s.on_allowance(self.limits, count, allowed, window, now));
            if would_change {
                let limits = self.limits;
                if let Err(error) = fleet
                    .update(|s| s.on_allowance(limits, count, allowed, window, now))
                    .await
                {
                    self.redis_failed(&error);
                }
            }
        }
        self.publish_effective();
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

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits to be taken before this request may leave, per the mode in force.
    async fn reserve(&self, tat: &mut Option<Instant>) -> Duration {
        let Some(fleet) = &self.fleet else {
            let rate = self.control().adaptive.rate;
            if rate >= self.limits.budget {
                // Nothing adapted: governor alone paces, exactly as configured.
                return Duration::ZERO;
            }
            return reserve_local(tat, Instant::now(), interval(rate), self.burst);
        };
        if self.mode() == RateMode::Redis {
            match fleet.reserve(self.limits.budget, self.burst).await {
                Ok(slot) => {
                    if let Some(pause) = slot.fleet_pause {
                        self.pause_for(pause);
                    }
                    return slot.wait;
                }
                Err(error) => self.redis_failed(&error),
            }
        }
        let consumers = fleet.consumers();
        let rate = self.control().adaptive.rate / f64::from(consumers);
        if self.share_fresh.swap(false, Ordering::Relaxed) {
            *tat = Some(Instant::now() + interval(rate));
        }
        metrics::gauge!(m::RATE_LIMIT_EFFECTIVE).set(rate);
        // Each replica's own burst adds up across the fleet: split it too (at least 1 each).
        let burst = (self.burst / consumers).max(1);
        reserve_local(tat, Instant::now(), interval(rate), burst)
    }

    /// Takes one step of the adaptive climb when one is due and requests were held back.
    async fn step_up(&self) {
        if !self.held_back.load(Ordering::Relaxed) {
            return;
        }
        let now = wall_ms();
        if let (RateMode::Redis, Some(fleet)) = (self.mode(), &self.fleet) {
            // Checked against the last state seen, so Redis is asked about once a step.
            let due = fleet
                .cached_state()
                .is_none_or(|mut s| s.on_tick(self.limits, now));
            if due && fleet.claim_step(now) {
                self.held_back.store(false, Ordering::Relaxed);
                let limits = self.limits;
                if let Err(error) = fleet.update(|s| s.on_tick(limits, now)).await {
                    self.redis_failed(&error);
                }
                self.publish_effective();
            }
            return;
        }
        let stepped = self.control().adaptive.on_tick(self.limits, now);
        if stepped {
            self.held_back.store(false, Ordering::Relaxed);
            self.publish_effective();
        }
    }

    /// Redis failed: the share mode takes over (from the fleet's last known rate) until the
    /// probe finds Redis again.
    fn redis_failed(&self, error: &fleet::FleetError) {
        let Some(fleet) = &self.fleet else { return };
        if fleet.switch(RateMode::Share) {
            self.share_fresh.store(true, Ordering::Relaxed);
            if let Some(state) = fleet.cached_state() {
                self.control().adaptive = state;
            }
            tracing::warn!(
                error = %error,
                consumers = fleet.consumers(),
                "Redis unreachable: each replica now takes an equal share of the fleet's rate budget"
            );
            self.publish_effective();
            fleet.probe_until_back();
        }
    }

    fn publish_effective(&self) {
        metrics::gauge!(m::RATE_LIMIT_EFFECTIVE).set(self.effective_rate());
    }
}

/// The emission interval of `rate` requests per second.
fn interval(rate: f64) -> Duration {
    Duration::try_from_secs_f64(1.0 / rate.max(1e-3)).unwrap_or(Duration::from_secs(1000))
}

/// A GCRA reservation: the slot of the next request given the theoretical arrival time `tat`,
/// at most `burst` back to back. Returns how long to wait for it and moves `tat` past it.
fn reserve_local(
    tat: &mut Option<Instant>,
    now: Instant,
    interval: Duration,
    burst: u32,
) -> Duration {
    let tolerance = interval * burst.saturating_sub(1);
    let theoretical = tat.unwrap_or(now);
    let slot = now.max(theoretical.checked_sub(tolerance).unwrap_or(now));
    *tat = Some(theoretical.max(slot) + interval);
    slot - now
}

/// Wall-clock milliseconds: the adaptive steps of a fleet are compared across processes.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

    #[tokio::test]
    async fn a_429_pauses_and_lowers_the_effective_rate_and_headers_cap_it() {
        let gate = RateGate::new(
            Rate::new(20, Duration::from_secs(1)).unwrap(),
            NonZeroU32::MIN,
        );
        assert_eq!(gate.mode(), RateMode::Process);
        assert!((gate.effective_rate() - 20.0).abs() < 1e-9);
        gate.rate_limited(Duration::from_millis(50)).await;
        assert!(gate.pause_deadline().is_some());
        assert!((gate.effective_rate() - 16.0).abs() < 1e-9);
        // 9 of 10 per second used: just under 10/s.
        gate.observe_allowance(9.0, 10.0, 1.0).await;
        assert!((gate.effective_rate() - 9.5).abs() < 1e-9);
        assert!((gate.budget() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn local_reservations_follow_the_gcra() {
        let start = Instant::now();
        let mut tat = None;
        let t = Duration::from_millis(100);
        // Burst 2: two at once, then one per interval.
        assert_eq!(reserve_local(&mut tat, start, t, 2), Duration::ZERO);
        assert_eq!(reserve_local(&mut tat, start, t, 2), Duration::ZERO);
        assert_eq!(reserve_local(&mut tat, start, t, 2), t);
        assert_eq!(reserve_local(&mut tat, start, t, 2), t * 2);
        // Later, the slot is now again.
        let later = start + Duration::from_secs(5);
        assert_eq!(reserve_local(&mut tat, later, t, 1), Duration::ZERO);
        assert_eq!(reserve_local(&mut tat, later, t, 1), t);
    }
}
