//! The circuit breaker: after a run of failures that say "Genesys is down" (connect errors,
//! timeouts, 5xx) across jobs, or a rate-limit pause too long to hold jobs through, no request
//! that may place a call leaves until the worker's probe finds Genesys answering again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics as m;

/// Consecutive outage-like failures, whichever jobs they came from, that open the breaker.
/// Five in a row almost never happens by chance (at a 10 % error rate: one in 100 000), while
/// an outage reaches it within the first wave of jobs.
pub const OPEN_AFTER: u32 = 5;
/// A 429 whose `Retry-After` is longer than this opens the breaker too: holding jobs (or
/// cycling them through delay queues) for that long is worse than not taking them.
pub const LONG_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(30);

/// Why the breaker opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenReason {
    /// A run of connect errors, timeouts or 5xx answers.
    Outage,
    /// A 429 with a `Retry-After` longer than [`LONG_RATE_LIMIT_PAUSE`].
    RateLimited,
}

impl OpenReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Outage => "outage",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// Shared by every request of the process. Closed: requests flow. Open: requests that may
/// place a call are refused before they are sent, and the worker pauses consumption and probes.
pub struct CircuitBreaker {
    failures: AtomicU32,
    open: watch::Sender<Option<OpenReason>>,
    // std Mutex: a plain value, never held across an await.
    opened_by: Mutex<Option<String>>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        // The series exist from the start (at zero, or as they are: another breaker of this
        // process may have counted already), so the first opening is an increase Prometheus
        // can see and the dashboard shows 0 rather than no data.
        for reason in [OpenReason::Outage, OpenReason::RateLimited] {
            metrics::counter!(m::CIRCUIT_OPENED_TOTAL, "reason" => reason.label()).increment(0);
        }
        Self {
            failures: AtomicU32::new(0),
            open: watch::Sender::new(None),
            opened_by: Mutex::new(None),
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the breaker is open now.
    pub fn is_open(&self) -> bool {
        self.open.borrow().is_some()
    }

    /// Why it is open, and the failure that opened it (scrubbed text), when it is.
    pub fn state(&self) -> Option<(OpenReason, String)> {
        let reason = (*self.open.borrow())?;
        let message = self
            .opened_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        Some((reason, message))
    }

    /// A receiver that sees the breaker open and close (the worker's consume loop waits on it).
    pub fn subscribe(&self) -> watch::Receiver<Option<OpenReason>> {
        self.open.subscribe()
    }

    /// Genesys answered (anything but a 5xx): the run of failures is over.
    pub fn record_answer(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// An outage-like failure; opens the breaker at the [`OPEN_AFTER`]th in a row.
    pub fn record_failure(&self, what: &str) {
        let run = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if run >= OPEN_AFTER {
            self.trip(
                OpenReason::Outage,
                format!("{run} Genesys failures in a row, the last: {what}"),
            );
        }
    }

    /// Opens the breaker for a long rate-limit pause.
    pub fn record_long_pause(&self, retry_after: Duration) {
        self.trip(
            OpenReason::RateLimited,
            format!(
                "Genesys asked for a {} s pause (Retry-After)",
                retry_after.as_secs()
            ),
        );
    }

    fn trip(&self, reason: OpenReason, message: String) {
        let opened = self.open.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some(reason);
            true
        });
        if opened {
            *self.opened_by.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            metrics::gauge!(m::CIRCUIT_OPEN).set(1.0);
            metrics::counter!(m::CIRCUIT_OPENED_TOTAL, "reason" => reason.label()).increment(1);
            tracing::error!(reason = reason.label(), error = %message, "circuit breaker open: no calls are placed until Genesys answers again");
        }
    }

    /// Closes the breaker (the worker's probe found Genesys answering).
    pub fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
        let closed = self.open.send_if_modified(|state| state.take().is_some());
        if closed {
            *self.opened_by.lock().unwrap_or_else(|p| p.into_inner()) = None;
            metrics::gauge!(m::CIRCUIT_OPEN).set(0.0);
            tracing::info!("circuit breaker closed: Genesys answers again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_a_run_and_an_answer_resets_the_run() {
        let breaker = CircuitBreaker::new();
        for _ in 0..OPEN_AFTER - 1 {
            breaker.record_failure("503");
        }
        breaker.record_answer();
        for _ in 0..OPEN_AFTER - 1 {
            breaker.record_failure("503");
        }
        assert!(!breaker.is_open());
        breaker.record_failure("503");
        let (reason, message) = breaker.state().expect("open");
        assert_eq!(reason, OpenReason::Outage);
        assert!(message.contains("503"), "{message}");
        breaker.close();
        assert!(!breaker.is_open());
        breaker.record_failure("503");
        assert!(!breaker.is_open(), "closing starts a new run");
    }

    #[test]
    fn a_long_pause_opens_it_at_once() {
        let breaker = CircuitBreaker::new();
        let mut seen = breaker.subscribe();
        breaker.record_long_pause(Duration::from_secs(3600));
        assert_eq!(*seen.borrow_and_update(), Some(OpenReason::RateLimited));
    }
}
