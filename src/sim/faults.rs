//! Fault injection: the failures the simulator can be told to produce, and which one a
//! place-call request gets.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The statuses `error_rate` draws from when `error_statuses` is empty: the transient and
/// ambiguous server errors a dialer has to survive.
const DEFAULT_ERROR_STATUSES: [u16; 4] = [500, 502, 503, 504];

/// Failures the simulator injects. All default to "none"; change them at run time with
/// [`super::SimHandle::set_faults`] or `PUT /sim/faults`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Faults {
    /// Delay added before every `/api/v2` answer (not `/oauth/token`, not `/sim`).
    pub latency_ms: u64,
    /// Share (0.0..=1.0) of place-call requests answered with a random one of `error_statuses`.
    pub error_rate: f64,
    /// Statuses for `error_rate`; `[500, 502, 503, 504]` when empty.
    pub error_statuses: Vec<u16>,
    /// The next place-call requests get exactly these statuses, in order (for deterministic tests).
    pub fail_next: Vec<u16>,
    /// `Retry-After` seconds on injected 429 and 503 answers; 1 when 0.
    pub retry_after_secs: u64,
    /// Share (0.0..=1.0) of place-call requests that never get an answer.
    pub hang_rate: f64,
    /// The next N place-call requests never get an answer (deterministic).
    pub hang_next: u32,
    /// `/oauth/token` refuses everybody (401) and every issued token is refused on the API (401).
    pub reject_credentials: bool,
    /// Lifetime of tokens issued from now on, overriding the configured one (any u64: the
    /// simulator's own clock saturates).
    pub token_ttl_secs: Option<u64>,
    /// The next N place-call requests are answered `307 Temporary Redirect` with a `Location`
    /// pointing back at the same path: a client that follows redirects re-sends the POST.
    pub redirect_next: u32,
    /// While set, every `/api/v2` request (not `/oauth/token`, not `/sim`) is answered with this
    /// status before anything else, as during an outage of the API; a 503 carries `Retry-After`.
    pub outage_status: Option<u16>,
    /// Successful place-call answers carry this `id` instead of a fresh conversation id
    /// (the call is still recorded as placed: the answer is wrong, not the call).
    pub answer_id: Option<String>,
    /// The `message` of injected error answers, instead of the simulator's own (to test what
    /// a client does with outside text, such as an echoed token).
    pub error_message: Option<String>,
    /// When above 0, successful place-call answers carry an `id` of this many `x` characters
    /// (tens of megabytes work), overriding `answer_id`.
    pub answer_id_bytes: u64,
}

/// What a place-call request gets instead of (or before) normal handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Injection {
    /// Handle it normally.
    None,
    /// Answer with this error status.
    Fail(u16),
    /// Never answer.
    Hang,
    /// Answer 307 with a `Location` back to the same path.
    Redirect,
}

impl Faults {
    /// Checks the values a typo could make meaningless: rates outside 0..=1 and statuses that
    /// are not errors.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [("errorRate", self.error_rate), ("hangRate", self.hang_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0.0 and 1.0, got {rate}"));
            }
        }
        let outage: Vec<u16> = self.outage_status.into_iter().collect();
        for (name, statuses) in [
            ("errorStatuses", &self.error_statuses),
            ("failNext", &self.fail_next),
            ("outageStatus", &outage),
        ] {
            if let Some(bad) = statuses.iter().find(|s| !(400..=599).contains(*s)) {
                return Err(format!(
                    "{name} may hold only error statuses (400..=599), got {bad}"
                ));
            }
        }
        Ok(())
    }

    /// The `id` a successful place-call answer carries instead of `conversation_id`, if any.
    pub(super) fn answer_id(&self) -> Option<String> {
        if self.answer_id_bytes > 0 {
            let bytes = usize::try_from(self.answer_id_bytes).unwrap_or(usize::MAX);
            return Some("x".repeat(bytes));
        }
        self.answer_id.clone()
    }

    /// `Retry-After` for injected 429 and 503 answers: a 0 would make clients spin.
    pub(super) fn retry_after(&self) -> u64 {
        self.retry_after_secs.max(1)
    }

    /// Picks (and consumes, for the `*_next` lists) the fault for one place-call request:
    /// `fail_next` first, then `hang_next`, then the random rates.
    pub(super) fn next_injection(&mut self) -> Injection {
        if !self.fail_next.is_empty() {
            return Injection::Fail(self.fail_next.remove(0));
        }
        if self.redirect_next > 0 {
            self.redirect_next -= 1;
            return Injection::Redirect;
        }
        if self.hang_next > 0 {
            self.hang_next -= 1;
            return Injection::Hang;
        }
        if self.error_rate <= 0.0 && self.hang_rate <= 0.0 {
            // The common case in benchmarks: skip the random number generator.
            return Injection::None;
        }
        let mut rng = rand::rng();
        if self.error_rate > 0.0 && rng.random::<f64>() < self.error_rate {
            let statuses: &[u16] = if self.error_statuses.is_empty() {
                &DEFAULT_ERROR_STATUSES
            } else {
                &self.error_statuses
            };
            return Injection::Fail(statuses[rng.random_range(0..statuses.len())]);
        }
        if self.hang_rate > 0.0 && rng.random::<f64>() < self.hang_rate {
            return Injection::Hang;
        }
        Injection::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_lists_come_first_and_in_order() {
        let mut f = Faults {
            fail_next: vec![503, 429],
            redirect_next: 1,
            hang_next: 1,
            error_rate: 0.0,
            ..Faults::default()
        };
        assert_eq!(f.next_injection(), Injection::Fail(503));
        assert_eq!(f.next_injection(), Injection::Fail(429));
        assert_eq!(f.next_injection(), Injection::Redirect);
        assert_eq!(f.next_injection(), Injection::Hang);
        assert_eq!(f.next_injection(), Injection::None);
    }

    #[test]
    fn full_error_rate_uses_the_given_statuses() {
        let mut f = Faults {
            error_rate: 1.0,
            error_statuses: vec![502],
            ..Faults::default()
        };
        for _ in 0..20 {
            assert_eq!(f.next_injection(), Injection::Fail(502));
        }
        let mut f = Faults {
            error_rate: 1.0,
            ..Faults::default()
        };
        for _ in 0..20 {
            match f.next_injection() {
                Injection::Fail(s) => assert!(DEFAULT_ERROR_STATUSES.contains(&s)),
                other => panic!("expected a failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn validate_rejects_bad_rates_and_statuses() {
        assert!(
            Faults {
                error_rate: 1.5,
                ..Faults::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Faults {
                hang_rate: -0.1,
                ..Faults::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Faults {
                fail_next: vec![200],
                ..Faults::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Faults {
                fail_next: vec![429, 503],
                ..Faults::default()
            }
            .validate()
            .is_ok()
        );
    }
}
