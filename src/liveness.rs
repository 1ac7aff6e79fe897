//! Whether the worker is wedged, for `/healthz` (README "Operations", `docs/runbook.md`
//! "Liveness").
//!
//! Wedged means one of two things went on for `DIALER_LIVENESS_TIMEOUT`:
//! - the async runtime did not run its heartbeat task (every runtime thread is stuck in
//!   blocking code, or the task is starved behind one that is);
//! - jobs were in flight and none of them moved (no job started or ended), while nothing
//!   excused the stillness: a worker paused by the circuit breaker or a systemic failure waits
//!   on purpose, and a job waiting for its turn at the rate gate waits on a schedule however
//!   slow the configured rate is.
//!
//! An idle worker (nothing in flight) is never wedged by the second rule. The verdict is made
//! by a watchdog on its own OS thread ([`Liveness::spawn_watchdog`]), so a blocked runtime is
//! noticed (and logged) even when no runtime thread is left to notice it; `/healthz` only reads
//! the verdict. When the runtime is blocked completely, `/healthz` (served on that runtime)
//! cannot answer at all, which a liveness probe counts as a failure too. Nothing is judged
//! before the decision store is open, and connecting, declaring and migrating have no job in
//! flight: a slow start never fails `/healthz`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::metrics as m;

/// The longest period of the runtime's heartbeat and of the watchdog's looks: a verdict comes
/// at most this late. Shorter timeouts (tests) get a tenth of the timeout.
const LONGEST_PERIOD: Duration = Duration::from_secs(1);

/// What the worker reports as it goes, and the watchdog's verdict.
#[derive(Debug)]
pub struct Liveness {
    timeout: Duration,
    /// Ticks of the runtime's heartbeat task.
    runtime_beats: AtomicU64,
    /// Jobs started and jobs ended: any change is a job moving.
    job_moves: AtomicU64,
    /// Jobs started and not yet ended.
    in_flight: AtomicUsize,
    /// Set when the worker stops: the heartbeat stops with it, which is no wedge.
    stopped: AtomicBool,
    /// `Some(reason)` while wedged. std Mutex: held for a copy only.
    verdict: Mutex<Option<String>>,
}

impl Liveness {
    /// Judged against `timeout` (`DIALER_LIVENESS_TIMEOUT`).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            runtime_beats: AtomicU64::new(0),
            job_moves: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            verdict: Mutex::new(None),
        }
    }

    /// A job's step starts; the guard marks its end, however it ends (a panic, a cancelled task).
    pub fn job(self: &Arc<Self>) -> JobInFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.job_moves.fetch_add(1, Ordering::Relaxed);
        JobInFlight(self.clone())
    }

    /// Jobs started and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `None` while alive; otherwise why not, in one line.
    pub fn verdict(&self) -> Option<String> {
        self.verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The worker stopped: no more verdicts (the watchdog thread ends).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// How often the heartbeat ticks and the watchdog looks: well within the timeout.
    fn period(&self) -> Duration {
        (self.timeout / 10).clamp(Duration::from_millis(10), LONGEST_PERIOD)
    }

    /// Ticks the heartbeat on the current runtime until [`Self::stop`].
    pub fn spawn_runtime_heartbeat(self: &Arc<Self>) {
        let period = self.period();
        let liveness = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match liveness.upgrade() {
                    Some(liveness) if !liveness.stopped.load(Ordering::Relaxed) => {
                        liveness.runtime_beats.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
        });
    }

    /// Starts the watchdog thread, which judges what the worker reports and ends when it
    /// stops; `excuse` says what excuses still jobs right now.
    pub fn spawn_watchdog(
        self: &Arc<Self>,
        excuse: impl Fn() -> Excuse + Send + 'static,
    ) -> std::io::Result<()> {
        let weak: Weak<Liveness> = Arc::downgrade(self);
        let every = self.period();
        let mut judge = Judge::new(self.timeout, self.sample(excuse()), Instant::now());
        std::thread::Builder::new()
            .name("dialer-watchdog".into())
            .spawn(move || {
                loop {
                    // The look's period, on a thread of its own: nothing else waits on it.
                    std::thread::sleep(every);
                    let Some(liveness) = weak.upgrade() else {
                        return;
                    };
                    if liveness.stopped.load(Ordering::Relaxed) {
                        liveness.set_verdict(None);
                        return;
                    }
                    let verdict = judge.look(liveness.sample(excuse()), Instant::now());
                    liveness.set_verdict(verdict);
                }
            })
            .map(|_| ())
    }

    fn sample(&self, excuse: Excuse) -> Sample {
        Sample {
            runtime_beats: self.runtime_beats.load(Ordering::Relaxed),
            job_moves: self.job_moves.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            excuse,
        }
    }

    fn set_verdict(&self, verdict: Option<String>) {
        let mut current = self.verdict.lock().unwrap_or_else(|p| p.into_inner());
        match (&*current, &verdict) {
            (None, Some(reason)) => {
                tracing::error!(reason = %reason, "the worker looks wedged; /healthz fails until it moves again");
                metrics::gauge!(m::WEDGED).set(1.0);
            }
            (Some(_), None) => {
                tracing::info!("the worker moves again; /healthz is ok");
                metrics::gauge!(m::WEDGED).set(0.0);
            }
            _ => {}
        }
        *current = verdict;
    }
}

/// A job in flight; dropping it marks the job's end.
#[derive(Debug)]
pub struct JobInFlight(Arc<Liveness>);

impl Drop for JobInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.job_moves.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why jobs in flight may stand still without the worker being wedged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Excuse {
    /// Consumption is paused (circuit breaker, systemic failure): waiting is the point.
    pub paused: bool,
    /// Jobs waiting for their turn at the rate gate: they move when the rate says.
    pub waiting_at_gate: usize,
}

/// What the watchdog reads at one look.
#[derive(Clone, Copy, Debug)]
struct Sample {
    runtime_beats: u64,
    job_moves: u64,
    in_flight: usize,
    excuse: Excuse,
}

/// The watchdog's memory between looks: since when each thing stood still.
#[derive(Debug)]
struct Judge {
    timeout: Duration,
    runtime_beats: u64,
    runtime_still_since: Instant,
    job_moves: u64,
    /// Since when jobs that should move (in flight, not excused) did not; `None` while there
    /// are none, so the clock starts fresh when one appears.
    jobs_still_since: Option<Instant>,
}

impl Judge {
    fn new(timeout: Duration, first: Sample, now: Instant) -> Self {
        Self {
            timeout,
            runtime_beats: first.runtime_beats,
            runtime_still_since: now,
            job_moves: first.job_moves,
            jobs_still_since: None,
        }
    }

    /// `None` while alive; otherwise the reason.
    fn look(&mut self, sample: Sample, now: Instant) -> Option<String> {
        if sample.runtime_beats != self.runtime_beats {
            self.runtime_beats = sample.runtime_beats;
            self.runtime_still_since = now;
        }
        let expected_to_move =
            !sample.excuse.paused && sample.in_flight > sample.excuse.waiting_at_gate;
        if sample.job_moves != self.job_moves || !expected_to_move {
            self.job_moves = sample.job_moves;
            self.jobs_still_since = None;
        }
        if expected_to_move && self.jobs_still_since.is_none() {
            self.jobs_still_since = Some(now);
        }
        let runtime_still = now.saturating_duration_since(self.runtime_still_since);
        if runtime_still >= self.timeout {
            return Some(format!(
                "the async runtime has not run its heartbeat for {} s (DIALER_LIVENESS_TIMEOUT {} s)",
                runtime_still.as_secs(),
                self.timeout.as_secs_f64()
            ));
        }
        let jobs_still = self
            .jobs_still_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        (jobs_still >= self.timeout).then(|| {
            format!(
                "jobs in flight: {}, and none started or ended for {} s (DIALER_LIVENESS_TIMEOUT {} s)",
                sample.in_flight,
                jobs_still.as_secs(),
                self.timeout.as_secs_f64()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn sample(runtime_beats: u64, job_moves: u64, in_flight: usize, excuse: Excuse) -> Sample {
        Sample {
            runtime_beats,
            job_moves,
            in_flight,
            excuse,
        }
    }

    fn secs(start: Instant, s: u64) -> Instant {
        start + Duration::from_secs(s)
    }

    #[test]
    fn an_idle_worker_is_alive_however_long_it_idles() {
        let start = Instant::now();
        let idle = |beat| sample(beat, 0, 0, Excuse::default());
        let mut judge = Judge::new(TIMEOUT, idle(0), start);
        for s in 1..1000 {
            assert_eq!(judge.look(idle(s), secs(start, s)), None, "at {s} s");
        }
    }

    #[test]
    fn jobs_that_stand_still_for_the_timeout_are_a_wedge() {
        let start = Instant::now();
        let mut judge = Judge::new(TIMEOUT, sample(0, 0, 0, Excuse::default()), start);
        // Two jobs start at 10 s and then nothing moves; the runtime keeps ticking.
        assert_eq!(
            judge.look(sample(10, 2, 2, Excuse::default()), secs(start, 10)),
            None
        );
        assert_eq!(
            judge.look(sample(69, 2, 2, Excuse::default()), secs(start, 69)),
            None
        );
        let verdict = judge.look(sample(70, 2, 2, Excuse::default()), secs(start, 71));
        let reason = verdict.expect("wedged after the timeout");
        assert!(reason.starts_with("jobs in flight: 2,"), "{reason}");
        // One ends: alive again.
        assert_eq!(
            judge.look(sample(72, 3, 1, Excuse::default()), secs(start, 72)),
            None
        );
    }

    #[test]
    fn a_pause_and_the_rate_gate_excuse_still_jobs() {
        let start = Instant::now();
        let paused = Excuse {
            paused: true,
            waiting_at_gate: 0,
        };
        let at_gate = Excuse {
            paused: false,
            waiting_at_gate: 3,
        };
        let mut judge = Judge::new(TIMEOUT, sample(0, 3, 3, paused), start);
        for s in 1..300 {
            assert_eq!(judge.look(sample(s, 3, 3, paused), secs(start, s)), None);
        }
        for s in 300..600 {
            assert_eq!(judge.look(sample(s, 3, 3, at_gate), secs(start, s)), None);
        }
        // One job leaves the gate: its clock starts now, not when the jobs last moved.
        let leaving = Excuse {
            waiting_at_gate: 2,
            ..at_gate
        };
        assert_eq!(
            judge.look(sample(600, 3, 3, leaving), secs(start, 600)),
            None
        );
        assert_eq!(
            judge.look(sample(659, 3, 3, leaving), secs(start, 659)),
            None
        );
        assert!(
            judge
                .look(sample(660, 3, 3, leaving), secs(start, 660))
                .is_some()
        );
    }

    #[test]
    fn a_runtime_that_stops_beating_is_a_wedge_even_when_idle() {
        let start = Instant::now();
        let idle = |beat| sample(beat, 0, 0, Excuse::default());
        let mut judge = Judge::new(TIMEOUT, idle(0), start);
        assert_eq!(judge.look(idle(5), secs(start, 5)), None);
        assert_eq!(judge.look(idle(5), secs(start, 64)), None);
        let reason = judge.look(idle(5), secs(start, 65)).expect("wedged");
        assert!(reason.starts_with("the async runtime"), "{reason}");
        assert_eq!(judge.look(idle(6), secs(start, 66)), None);
    }

    /// The real thing: a runtime whose only thread blocks is found out by the watchdog thread.
    #[test]
    fn the_watchdog_thread_notices_a_blocked_runtime() {
        let liveness = Arc::new(Liveness::new(Duration::from_millis(300)));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (block, blocked) = std::sync::mpsc::channel::<()>();
        let runtime_thread = {
            let liveness = liveness.clone();
            std::thread::spawn(move || {
                runtime.block_on(async move {
                    liveness.spawn_runtime_heartbeat();
                    // Beating for longer than the timeout first, then the only runtime
                    // thread blocks.
                    while liveness.runtime_beats.load(Ordering::Relaxed) < 20 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    assert_eq!(liveness.verdict(), None, "alive while beating");
                    let _ = blocked.recv();
                });
            })
        };
        liveness
            .spawn_watchdog(Excuse::default)
            .expect("watchdog thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        let reason = loop {
            if let Some(reason) = liveness.verdict() {
                break reason;
            }
            assert!(Instant::now() < deadline, "no verdict within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(reason.contains("async runtime"), "{reason}");
        drop(block);
        runtime_thread.join().expect("runtime thread");
        liveness.stop();
    }
}
