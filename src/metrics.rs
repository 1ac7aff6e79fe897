//! Every metric the dialer exports: names in one place, each described once (README "Operations", `docs/runbook.md`).
//!
//! Labels have a handful of values each; never a job id, phone number or user id.

use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::Outcome;

pub mod process;

/// Jobs taken from the queue.
pub const JOBS_RECEIVED_TOTAL: &str = "dialer_jobs_received_total";
/// Jobs that ended, by terminal `outcome` (each job once, when its event is published).
pub const JOBS_COMPLETED_TOTAL: &str = "dialer_jobs_completed_total";
/// Deliveries that did not end their job, by `reason`: `delayed` (sent to a delay tier for a
/// retry or a `notBefore`) or `requeued` (given back to the jobs queue).
pub const JOBS_DEFERRED_TOTAL: &str = "dialer_jobs_deferred_total";
/// Jobs being processed now.
pub const JOBS_IN_FLIGHT: &str = "dialer_jobs_in_flight";
/// From the job's creation (header `timestamp_in_ms`, else the AMQP `timestamp`) to its first
/// delivery; redeliveries and returns from a delay tier are not counted.
pub const QUEUE_WAIT_SECONDS: &str = "dialer_queue_wait_seconds";
/// From the moment the worker sent a job to a delay tier to its delivery back.
pub const RETRY_WAIT_SECONDS: &str = "dialer_retry_wait_seconds";
/// From delivery to the job's ack, by `outcome` (a terminal outcome, `delayed` or `requeued`:
/// every delivery's work).
pub const JOB_DURATION_SECONDS: &str = "dialer_job_duration_seconds";
/// Genesys API requests, by `operation` and `status` (HTTP status or `timeout`, `connect`, …).
pub const GENESYS_REQUESTS_TOTAL: &str = "dialer_genesys_requests_total";
/// Genesys API latency, by `operation`.
pub const GENESYS_REQUEST_DURATION_SECONDS: &str = "dialer_genesys_request_duration_seconds";
/// 429 answers from Genesys.
pub const GENESYS_RATE_LIMITED_TOTAL: &str = "dialer_genesys_rate_limited_total";
/// Time spent waiting for a turn under the process rate limit.
pub const RATE_LIMITER_WAIT_SECONDS: &str = "dialer_rate_limiter_wait_seconds";
/// Retries scheduled, by `via` (`in_process`, `delay_queue`).
pub const RETRIES_SCHEDULED_TOTAL: &str = "dialer_retries_scheduled_total";
/// Token requests, by `result` (`ok`, `refused`, `error`).
pub const TOKEN_RENEWALS_TOTAL: &str = "dialer_token_renewals_total";
/// 1 while connected to the broker.
pub const BROKER_CONNECTED: &str = "dialer_broker_connected";
/// 1 while a consumer of this process is registered on the jobs queue: 0 while connected
/// means paused (systemic failure, open circuit) or between consumers.
pub const CONSUMING: &str = "dialer_consuming";
/// 1 while consumption is paused by a systemic failure (credentials, permissions).
pub const SYSTEMIC_PAUSE: &str = "dialer_systemic_pause";
/// Result events published, by `outcome`.
pub const EVENTS_PUBLISHED_TOTAL: &str = "dialer_events_published_total";
/// Always 1, labelled with `version`.
pub const BUILD_INFO: &str = "dialer_build_info";
/// Genesys's `inin-ratelimit-count` / `inin-ratelimit-allowed` from the last answer that carried them.
pub const GENESYS_RATELIMIT_USED: &str = "dialer_genesys_ratelimit_used";
/// See [`GENESYS_RATELIMIT_USED`].
pub const GENESYS_RATELIMIT_ALLOWED: &str = "dialer_genesys_ratelimit_allowed";
/// Requests per second of `DIALER_RATE_LIMIT`.
pub const RATE_LIMIT_CONFIGURED: &str = "dialer_rate_limit_configured";
/// Requests per second this process currently allows itself (after 429s, the headers, its share).
pub const RATE_LIMIT_EFFECTIVE: &str = "dialer_rate_limit_effective";
/// 1 for the rate mode in force, 0 for the others; label `mode` = process|redis|share.
pub const RATE_MODE: &str = "dialer_rate_mode";
/// Switches between the fleet's rate modes; label `to` = redis|share.
pub const RATE_MODE_SWITCHES_TOTAL: &str = "dialer_rate_mode_switches_total";
/// Consumers on the jobs queue, as last read (the divisor of the share mode).
pub const FLEET_CONSUMERS: &str = "dialer_fleet_consumers";

/// Gauge: 1 while the circuit breaker is open (Genesys looks down, or asked for a long pause).
pub const CIRCUIT_OPEN: &str = "dialer_circuit_open";
/// Times the circuit breaker opened, by reason (`outage`, `rate_limited`).
pub const CIRCUIT_OPENED_TOTAL: &str = "dialer_circuit_opened_total";
/// 1 while `/healthz` fails: the worker looks wedged (`DIALER_LIVENESS_TIMEOUT`).
pub const WEDGED: &str = "dialer_wedged";
/// Job steps that panicked (each still ended with a requeue or an event).
pub const JOB_PANICS_TOTAL: &str = "dialer_job_panics_total";

/// 1 while the decision store answers; 0 from its first failed operation until a heartbeat
/// (or the paused worker's probe) succeeds again.
pub const DECISION_STORE_UP: &str = "dialer_decision_store_up";
/// Failed decision store operations, by `op` (`claim`, `decide`, `heartbeat`, …).
pub const DECISION_STORE_ERRORS_TOTAL: &str = "dialer_decision_store_errors_total";
/// Redelivered jobs that waited for another replica's decision, by `result` (`decided`,
/// `owner_gone`, `timed_out`).
pub const DECISION_CLAIM_WAITS_TOTAL: &str = "dialer_decision_claim_waits_total";

/// Buckets for latency-like histograms: 1 ms to 1 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for waits in the queues: 10 ms to 12 hours (a backlog, a paused fleet, a night).
const WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 14400.0, 43200.0,
];

/// The `reason` values of [`JOBS_DEFERRED_TOTAL`].
const DEFERRED_REASONS: [&str; 2] = ["delayed", "requeued"];

/// What became of one delivery, for [`JobMetrics::finished`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The job ended with this outcome (its event published).
    Ended(Outcome),
    /// Sent to a delay tier.
    Delayed,
    /// Given back to the jobs queue.
    Requeued,
}

/// How long a delivery waited before the worker took it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Waited {
    /// A first delivery, this long after the job's creation.
    InQueue(Duration),
    /// Back from a delay tier, this long after the worker sent it there.
    InDelay(Duration),
    /// A redelivery, a replay, or no creation time known: not measured.
    Unmeasured,
}

/// The per-job metrics, registered once so a job only touches atomics (no lookup by name and
/// labels on the hot path).
pub struct JobMetrics {
    received: Counter,
    in_flight: Gauge,
    queue_wait: Histogram,
    retry_wait: Histogram,
    /// Indexed like [`Outcome::ALL`].
    completed: [Counter; Outcome::ALL.len()],
    /// Indexed like [`Outcome::ALL`], then `delayed`, `requeued`.
    duration: [Histogram; Outcome::ALL.len() + 2],
    /// Indexed like [`DEFERRED_REASONS`].
    deferred: [Counter; 2],
}

impl JobMetrics {
    /// Registers the handles with the installed recorder ([`install`] first).
    pub fn register() -> Self {
        let labels = Outcome::ALL
            .map(Outcome::as_str)
            .into_iter()
            .chain(DEFERRED_REASONS);
        let mut duration =
            labels.map(|label| metrics::histogram!(JOB_DURATION_SECONDS, "outcome" => label));
        Self {
            received: metrics::counter!(JOBS_RECEIVED_TOTAL),
            in_flight: metrics::gauge!(JOBS_IN_FLIGHT),
            queue_wait: metrics::histogram!(QUEUE_WAIT_SECONDS),
            retry_wait: metrics::histogram!(RETRY_WAIT_SECONDS),
            completed: Outcome::ALL.map(
                |outcome| metrics::counter!(JOBS_COMPLETED_TOTAL, "outcome" => outcome.as_str()),
            ),
            duration: std::array::from_fn(|_| duration.next().unwrap_or_else(Histogram::noop)),
            deferred: DEFERRED_REASONS
                .map(|reason| metrics::counter!(JOBS_DEFERRED_TOTAL, "reason" => reason)),
        }
    }

    /// A delivery taken: counted, in flight, and its wait recorded.
    pub fn received(&self, waited: Waited) {
        self.received.increment(1);
        self.in_flight.increment(1.0);
        match waited {
            Waited::InQueue(wait) => self.queue_wait.record(wait.as_secs_f64()),
            Waited::InDelay(wait) => self.retry_wait.record(wait.as_secs_f64()),
            Waited::Unmeasured => {}
        }
    }

    /// A delivery finished on the broker as `disposition`, `took` after it was taken.
    pub fn finished(&self, disposition: Disposition, took: Duration) {
        let index = match disposition {
            Disposition::Ended(outcome) => {
                let index = outcome.index();
                self.completed[index].increment(1);
                index
            }
            Disposition::Delayed => {
                self.deferred[0].increment(1);
                Outcome::ALL.len()
            }
            Disposition::Requeued => {
                self.deferred[1].increment(1);
                Outcome::ALL.len() + 1
            }
        };
        self.duration[index].record(took.as_secs_f64());
    }

    /// A delivery no longer in flight (finished or not).
    pub fn left(&self) {
        self.in_flight.decrement(1.0);
    }
}

/// The constant label every series carries: the queue prefix (`DIALER_PREFIX`), which tells
/// deployments side by side apart in alerts and dashboards (deploy/README.md, "Prometheus").
pub const PREFIX_LABEL: &str = "prefix";

/// Installs the Prometheus recorder (once per process) and describes every metric; every
/// series gets the label `prefix` = `prefix` (the queue prefix, `DIALER_PREFIX`).
/// Later calls return the handle of the first, with the first call's prefix.
pub fn install(prefix: &str) -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = with_buckets(PrometheusBuilder::new())
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .add_global_label(PREFIX_LABEL, prefix);
            let _ = process::PREFIX.set(prefix.to_owned());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed (a test harness); the handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// The histogram buckets: latency-like ones for every `_seconds`, long ones for the two waits
/// (a full name wins over a suffix).
fn with_buckets(
    builder: PrometheusBuilder,
) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT_SECONDS.into()), WAIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(RETRY_WAIT_SECONDS.into()), WAIT_BUCKETS)
}

fn describe() {
    describe_counter!(JOBS_RECEIVED_TOTAL, "Dial jobs taken from the jobs queue.");
    describe_counter!(
        JOBS_COMPLETED_TOTAL,
        "Dial jobs that ended, by terminal outcome (once per job)."
    );
    describe_counter!(
        JOBS_DEFERRED_TOTAL,
        "Deliveries that did not end their job: delayed (to a delay tier) or requeued."
    );
    describe_gauge!(JOBS_IN_FLIGHT, "Dial jobs being processed now.");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time from the job's creation (header timestamp_in_ms, else the AMQP timestamp) to its first delivery."
    );
    describe_histogram!(
        RETRY_WAIT_SECONDS,
        Unit::Seconds,
        "Time from sending a job to a delay tier to its delivery back."
    );
    describe_histogram!(
        JOB_DURATION_SECONDS,
        Unit::Seconds,
        "Time from a delivery to its ack, by outcome (terminal, delayed or requeued)."
    );
    describe_counter!(
        GENESYS_REQUESTS_TOTAL,
        "Genesys Cloud API requests, by operation and status."
    );
    describe_histogram!(
        GENESYS_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Genesys Cloud API latency, by operation."
    );
    describe_counter!(
        GENESYS_RATE_LIMITED_TOTAL,
        "429 answers from Genesys Cloud."
    );
    describe_histogram!(
        RATE_LIMITER_WAIT_SECONDS,
        Unit::Seconds,
        "Time spent waiting for a turn under the process rate limit."
    );
    describe_counter!(
        RETRIES_SCHEDULED_TOTAL,
        "Retries scheduled, by where the wait happens."
    );
    describe_counter!(TOKEN_RENEWALS_TOTAL, "OAuth token requests, by result.");
    describe_gauge!(BROKER_CONNECTED, "1 while connected to the broker.");
    describe_gauge!(
        CONSUMING,
        "1 while a consumer of this process is registered on the jobs queue."
    );
    describe_gauge!(
        SYSTEMIC_PAUSE,
        "1 while consumption is paused by a systemic failure."
    );
    describe_counter!(
        EVENTS_PUBLISHED_TOTAL,
        "Result events confirmed by the broker, by outcome."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the labels say which build runs.");
    describe_gauge!(
        GENESYS_RATELIMIT_USED,
        "inin-ratelimit-count of the last Genesys answer that had it."
    );
    describe_gauge!(
        GENESYS_RATELIMIT_ALLOWED,
        "inin-ratelimit-allowed of the last Genesys answer that had it."
    );
    describe_gauge!(
        CIRCUIT_OPEN,
        "1 while the circuit breaker is open: no calls placed, consumption paused."
    );
    describe_counter!(
        CIRCUIT_OPENED_TOTAL,
        "Times the circuit breaker opened, by reason (outage, rate_limited)."
    );
    describe_counter!(
        JOB_PANICS_TOTAL,
        "Job steps that panicked; each job still ended with a requeue or an event."
    );
    describe_gauge!(
        WEDGED,
        "1 while /healthz fails: jobs or the runtime stood still for DIALER_LIVENESS_TIMEOUT."
    );
    describe_gauge!(
        RATE_LIMIT_CONFIGURED,
        "Genesys API requests per second of DIALER_RATE_LIMIT (the fleet's budget in fleet scope)."
    );
    describe_gauge!(
        RATE_LIMIT_EFFECTIVE,
        "Genesys API requests per second this process currently allows itself."
    );
    describe_gauge!(
        RATE_MODE,
        "1 for the rate mode in force (process, redis or share), 0 for the others."
    );
    describe_counter!(
        RATE_MODE_SWITCHES_TOTAL,
        "Switches of the fleet rate mode, by the mode switched to."
    );
    describe_gauge!(
        FLEET_CONSUMERS,
        "Consumers on the jobs queue as last read: the share mode's divisor."
    );
    describe_gauge!(
        DECISION_STORE_UP,
        "1 while the decision store answers, 0 after a failed operation until it answers again."
    );
    describe_counter!(
        DECISION_STORE_ERRORS_TOTAL,
        "Failed decision store operations, by operation."
    );
    describe_counter!(
        DECISION_CLAIM_WAITS_TOTAL,
        "Redelivered jobs that waited for the replica holding their claim, by how the wait ended."
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Series exist from the start at zero, so the first `unknown` or the first pause is an
    // increase Prometheus can see, and dashboards show 0 rather than "no data".
    for outcome in crate::event::Outcome::ALL {
        metrics::counter!(JOBS_COMPLETED_TOTAL, "outcome" => outcome.as_str()).absolute(0);
        metrics::counter!(EVENTS_PUBLISHED_TOTAL, "outcome" => outcome.as_str()).absolute(0);
    }
    metrics::counter!(GENESYS_RATE_LIMITED_TOTAL).absolute(0);
    metrics::gauge!(SYSTEMIC_PAUSE).set(0.0);
    metrics::gauge!(CIRCUIT_OPEN).set(0.0);
    metrics::gauge!(WEDGED).set(0.0);
    metrics::counter!(JOB_PANICS_TOTAL).absolute(0);
    metrics::gauge!(BROKER_CONNECTED).set(0.0);
    metrics::gauge!(CONSUMING).set(0.0);
    for reason in DEFERRED_REASONS {
        metrics::counter!(JOBS_DEFERRED_TOTAL, "reason" => reason).absolute(0);
    }
    metrics::gauge!(JOBS_IN_FLIGHT).set(0.0);
    for result in ["decided", "owner_gone", "timed_out"] {
        metrics::counter!(DECISION_CLAIM_WAITS_TOTAL, "result" => result).absolute(0);
    }
}
