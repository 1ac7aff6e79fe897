//! The adaptive limit's arithmetic: how the effective rate falls after a 429 or when the
//! `inin-ratelimit-*` headers say the allowance is nearly used, and how it climbs back. Pure
//! values and functions, so the same steps run on a process's own state and on the fleet's
//! state read from Redis, and can be tested without clocks.
//!
//! Why not a plain sawtooth (halve on a 429, add a constant back): against a fixed allowance it
//! spends most of its time well below the limit and hits it again every cycle. Instead the rate
//! that drew a 429 (or the allowance the headers report, the rate actually granted) becomes a
//! *ceiling*: the rate falls multiplicatively below it, climbs fast to 90 % of it, then probes
//! upward by 0.5 % of it per step, so it settles just under the limit and meets it again rarely.

/// Factor applied to the rate on a 429.
pub const DECREASE: f64 = 0.8;
/// At most one decrease per this many milliseconds: the 429s of requests already on the wire
/// when the first one came back describe the same overshoot.
pub const REACTION_MS: u64 = 2_000;
/// At most one step up per this many milliseconds (fleet-wide in fleet scope).
pub const STEP_MS: u64 = 1_000;
/// Growth per step while far below the ceiling (or with no ceiling known).
pub const FAST_STEP: f64 = 0.10;
/// Fraction of the ceiling up to which the rate climbs fast.
pub const APPROACH: f64 = 0.9;
/// Growth per step near and above the ceiling, as a fraction of the ceiling.
pub const PROBE_STEP: f64 = 0.005;
/// Fraction of a reported allowance the rate is set to: room for jitter in arrival times.
pub const HEADROOM: f64 = 0.95;
/// The allowance counts as nearly used from this fraction of it on.
pub const NEARLY_USED: f64 = 0.8;
/// Past this multiple of the ceiling without a 429 the ceiling is forgotten (the limit was
/// raised) and the rate climbs fast again, back toward the configured budget.
pub const FORGET: f64 = 1.1;

/// The bounds the rate moves within, requests per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// The configured budget: never exceeded.
    pub budget: f64,
    /// The lowest rate a decrease goes to, so that the limit is still probed.
    pub floor: f64,
}

impl Limits {
    /// Limits for `budget` requests per second; the floor is a twentieth of it (at most 1/s).
    pub fn for_budget(budget: f64) -> Self {
        Self {
            budget,
            floor: (budget / 20.0).min(1.0),
        }
    }
}

/// The adaptive state: in a process, or the fleet's in Redis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    /// Requests per second allowed now (fleet-wide in fleet scope).
    pub rate: f64,
    /// The rate found too high (a 429 came at it) or the allowance the headers reported.
    pub ceiling: Option<f64>,
    /// When the rate last changed, milliseconds of wall-clock time.
    pub changed_ms: u64,
    /// When the rate last fell after a 429.
    pub decreased_ms: u64,
}

impl Adaptive {
    /// The state at start: the whole budget, no ceiling known.
    pub fn new(limits: Limits) -> Self {
        Self {
            rate: limits.budget,
            ceiling: None,
            changed_ms: 0,
            decreased_ms: 0,
        }
    }

    /// A 429 came back: the current rate is too high. Returns whether the state changed.
    pub fn on_rate_limited(&mut self, limits: Limits, now_ms: u64) -> bool {
        if self.decreased_ms != 0 && now_ms < self.decreased_ms.saturating_add(REACTION_MS) {
            return false;
        }
        self.ceiling = Some(self.rate);
        self.rate = (self.rate * DECREASE).max(limits.floor).min(limits.budget);
        self.changed_ms = now_ms;
        self.decreased_ms = now_ms;
        true
    }

    /// An answer said `count` of `allowed` requests are used in a window of about
    /// `window_secs`: when that is nearly all of it, the rate is set just under the allowance
    /// before a 429 comes. Returns whether the state changed.
    pub fn on_allowance(
        &mut self,
        limits: Limits,
        count: f64,
        allowed: f64,
        window_secs: f64,
        now_ms: u64,
    ) -> bool {
        if !(allowed > 0.0 && window_secs > 0.0 && count >= NEARLY_USED * allowed) {
            return false;
        }
        let granted = allowed / window_secs;
        let target = (granted * HEADROOM).max(limits.floor).min(limits.budget);
        if self.rate <= target {
            return false;
        }
        self.ceiling = Some(granted);
        self.rate = target;
        self.changed_ms = now_ms;
        // 429s of requests sent before this decrease describe the overshoot it corrects.
        self.decreased_ms = now_ms;
        true
    }

    /// One step back up toward the budget, if a step is due. Called only while requests are
    /// being held back (a rate nobody uses says nothing about the limit). Returns whether the
    /// state changed.
    pub fn on_tick(&mut self, limits: Limits, now_ms: u64) -> bool {
        if self.rate >= limits.budget || now_ms < self.changed_ms.saturating_add(STEP_MS) {
            return false;
        }
        let next = match self.ceiling {
            None => self.rate * (1.0 + FAST_STEP),
            Some(c) if self.rate < APPROACH * c => {
                (self.rate * (1.0 + FAST_STEP)).min(APPROACH * c)
            }
            Some(c) => self.rate + PROBE_STEP * c,
        };
        if self.ceiling.is_some_and(|c| next > FORGET * c) {
            self.ceiling = None;
        }
        self.rate = next.min(limits.budget);
        self.changed_ms = now_ms;
        true
    }
}

/// Estimates the length of the allowance's window from `inin-ratelimit-reset`: the largest
/// reset seen, since the first request of a window sees (about) all of it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WindowEstimate {
    longest_reset: f64,
}

impl WindowEstimate {
    /// Takes one `inin-ratelimit-reset` (seconds) into account; returns the estimate.
    pub fn observe(&mut self, reset_secs: f64) -> f64 {
        if reset_secs.is_finite() && reset_secs > self.longest_reset {
            // Capped: a bogus header must not make the allowance look negligible.
            self.longest_reset = reset_secs.min(3_600.0);
        }
        self.longest_reset.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        budget: 20.0,
        floor: 1.0,
    };

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_429_lowers_the_rate_multiplicatively_once_per_reaction_interval() {
        let mut state = Adaptive::new(LIMITS);
        assert!(state.on_rate_limited(LIMITS, 10_000));
        assert!(close(state.rate, 16.0));
        assert_eq!(state.ceiling, Some(20.0));
        // The 429s of the same overshoot change nothing more.
        assert!(!state.on_rate_limited(LIMITS, 11_999));
        assert!(close(state.rate, 16.0));
        assert!(state.on_rate_limited(LIMITS, 12_000));
        assert!(close(state.rate, 12.8));
        assert_eq!(state.ceiling, Some(16.0));
    }

    #[test]
    fn decreases_stop_at_the_floor() {
        let mut state = Adaptive::new(LIMITS);
        for n in 0..40 {
            state.on_rate_limited(LIMITS, 10_000 + n * REACTION_MS);
        }
        assert!(close(state.rate, LIMITS.floor));
        assert!(close(Limits::for_budget(10.0).floor, 0.5));
        assert!(close(Limits::for_budget(1000.0).floor, 1.0));
    }

    #[test]
    fn the_climb_is_fast_to_ninety_percent_of_the_ceiling_then_slow() {
        let mut state = Adaptive::new(LIMITS);
        state.rate = 10.0;
        state.on_rate_limited(LIMITS, 1_000);
        // Ceiling 10, rate 8: 8 → 8.8 → 9.0 (capped at 90 %) → 9.05 → 9.10 …
        let mut now = 1_000;
        let mut rates = Vec::new();
        for _ in 0..4 {
            now += STEP_MS;
            assert!(state.on_tick(LIMITS, now));
            rates.push(state.rate);
        }
        let expected = [8.8, 9.0, 9.05, 9.1];
        for (got, want) in rates.iter().zip(expected) {
            assert!(close(*got, want), "{rates:?}");
        }
        // Not more than one step per STEP_MS.
        assert!(!state.on_tick(LIMITS, now + STEP_MS - 1));
    }

    #[test]
    fn a_ceiling_passed_without_a_429_is_forgotten_and_the_budget_is_reached() {
        let mut state = Adaptive {
            rate: 10.9,
            ceiling: Some(10.0),
            changed_ms: 0,
            decreased_ms: 0,
        };
        let mut now = 0;
        while state.ceiling.is_some() {
            now += STEP_MS;
            state.on_tick(LIMITS, now);
        }
        assert!(state.rate > 11.0);
        for _ in 0..20 {
            now += STEP_MS;
            state.on_tick(LIMITS, now);
        }
        assert!(close(state.rate, LIMITS.budget));
        assert!(!state.on_tick(LIMITS, now + STEP_MS));
    }

    #[test]
    fn a_nearly_used_allowance_sets_the_rate_just_under_it() {
        let mut state = Adaptive::new(LIMITS);
        // 5 of 10 used: not yet.
        assert!(!state.on_allowance(LIMITS, 5.0, 10.0, 1.0, 100));
        // 8 of 10 per second: 9.5/s, with the allowance as the ceiling.
        assert!(state.on_allowance(LIMITS, 8.0, 10.0, 1.0, 200));
        assert!(close(state.rate, 9.5));
        assert_eq!(state.ceiling, Some(10.0));
        // Already under it: nothing to do.
        assert!(!state.on_allowance(LIMITS, 10.0, 10.0, 1.0, 300));
        // 300 per minute: 4.75/s.
        assert!(state.on_allowance(LIMITS, 290.0, 300.0, 60.0, 400));
        assert!(close(state.rate, 4.75));
        // A 429 of a request sent before the decrease does not lower it again; a later one does.
        assert!(!state.on_rate_limited(LIMITS, 400 + REACTION_MS - 1));
        assert!(close(state.rate, 4.75));
        assert!(state.on_rate_limited(LIMITS, 400 + REACTION_MS));
        assert!(close(state.rate, 3.8));
        // Nonsense is ignored.
        assert!(!state.on_allowance(LIMITS, 9.0, 0.0, 1.0, 500));
        assert!(!state.on_allowance(LIMITS, 9.0, 10.0, 0.0, 500));
    }

    #[test]
    fn probing_above_an_allowance_is_pulled_back_by_the_headers() {
        let mut state = Adaptive::new(LIMITS);
        state.on_allowance(LIMITS, 9.0, 10.0, 1.0, 0);
        let mut now = 0;
        let mut highest: f64 = 0.0;
        for _ in 0..100 {
            now += STEP_MS;
            state.on_tick(LIMITS, now);
            highest = highest.max(state.rate);
            state.on_allowance(LIMITS, 9.0, 10.0, 1.0, now);
            // Settles between 95 % and 95.5 % of the allowance: at least 0.9 of it.
            assert!(
                state.rate >= 9.5 - 1e-9 && state.rate <= 9.55 + 1e-9,
                "{state:?}"
            );
        }
        assert!(highest > 9.5);
    }

    #[test]
    fn the_rate_settles_just_under_a_fixed_limit_found_by_429s_alone() {
        // A fixed limit of 10/s and no headers: every step above it draws a 429.
        let limit = 10.0;
        let mut state = Adaptive::new(LIMITS);
        let mut now = 0;
        let (mut sum, mut n, mut limited) = (0.0, 0, 0);
        for second in 0..600 {
            now += STEP_MS;
            if state.rate > limit {
                limited += 1;
                state.on_rate_limited(LIMITS, now);
            } else {
                state.on_tick(LIMITS, now);
            }
            if second >= 60 {
                sum += state.rate.min(limit);
                n += 1;
            }
        }
        let mean = sum / f64::from(n);
        assert!(mean >= 0.9 * limit, "mean {mean}");
        // A 429 at most every ~20 s once settled.
        assert!(limited <= 40, "{limited} seconds above the limit");
    }

    #[test]
    fn the_window_is_the_longest_reset_seen() {
        let mut window = WindowEstimate::default();
        assert!(close(window.observe(0.0), 1.0));
        assert!(close(window.observe(58.0), 58.0));
        assert!(close(window.observe(60.0), 60.0));
        assert!(close(window.observe(3.0), 60.0));
        assert!(close(window.observe(f64::NAN), 60.0));
        assert!(close(window.observe(1e12), 3_600.0));
    }
}
