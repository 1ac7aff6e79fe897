//! The per-job step: one delivery in, one [`Verdict`] out.
//!
//! Parse → claim → `expiresAt` / `notBefore` → resolve the agent → place the call (paced by
//! the rate gate) → classify → record the decision. The consume loop applies the verdict
//! (publish, then ack / dead-letter / delay / requeue); nothing here touches the broker: a
//! delivery comes in as a plain [`Incoming`] value, and a delay goes out as a wait for the
//! broker layer to turn into a delay tier.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::Delay;
use crate::broker::headers::{Counters, Marks};
use crate::decisions::{ClaimResult, DecisionStore, JobState, StoreError};
use crate::event::{EventError, Outcome, ResultEvent};
use crate::genesys::{CreateCallRequest, ErrorClass, GenesysClient, GenesysError, UserId};
use crate::job::{Agent, DialJob, parse_job};
use crate::metrics as m;
use crate::telemetry::mask_phone;

/// Waits up to this long happen in process (the message stays unacked); longer ones go through
/// a delay queue, so no message is held near the broker's consumer timeout.
pub const IN_PROCESS_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// First backoff step; each failure doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Largest backoff step: a minute keeps a long Genesys outage from being hammered while a
/// job still gets several chances within `DIALER_MAX_ATTEMPTS`.
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// What to do with the delivery.
#[derive(Debug)]
pub enum Verdict {
    /// Publish `event` (exactly these bytes), then ack, or dead-letter when the outcome says so.
    Publish {
        /// The event, for routing and dead-letter headers.
        event: Box<ResultEvent>,
        /// The event as recorded in the decision store.
        bytes: Vec<u8>,
    },
    /// Send the job through a delay tier with its counters, then ack the original.
    Delay {
        /// How long it should stay away; the broker layer picks the tier.
        wait: Delay,
        /// Place-call requests sent and failures counted so far.
        counters: Counters,
    },
    /// Give the job back to the queue untouched (claim released): shutdown or a systemic failure.
    Requeue {
        /// Why, for logs.
        reason: &'static str,
    },
}

/// Why consumption should pause: credentials refused, a permission missing, the store failing.
#[derive(Clone, Debug)]
pub struct SystemicFailure {
    /// What failed, for logs and readiness.
    pub message: String,
    /// When, so failures of jobs that started before a pause ended can be told apart.
    pub at: tokio::time::Instant,
    /// Which part failed: what the paused worker probes before it resumes.
    pub cause: FailureCause,
}

/// The part whose failure paused the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// Genesys refused the credentials or a permission: probed by asking for a token.
    Credentials,
    /// The decision store failed: probed with its heartbeat (and by writing the decisions it
    /// could not record).
    Store,
}

impl SystemicFailure {
    fn now(message: String) -> Self {
        Self {
            message,
            at: tokio::time::Instant::now(),
            cause: FailureCause::Credentials,
        }
    }

    /// A failure of the decision store.
    pub fn store(message: String) -> Self {
        Self {
            message,
            at: tokio::time::Instant::now(),
            cause: FailureCause::Store,
        }
    }
}

/// How long a redelivered job waits for another live replica's decision, beyond the Genesys
/// request timeout: room for that replica's rate-gate wait and its write to the store.
pub const CLAIM_WAIT_MARGIN: Duration = Duration::from_secs(5);
/// How often a waiting job looks at the store for the decision.
const CLAIM_POLL: Duration = Duration::from_millis(250);

/// What the per-job step is built from.
pub struct PipelineSettings {
    /// Genesys Cloud.
    pub genesys: GenesysClient,
    /// Claims and decisions.
    pub store: DecisionStore,
    /// Attempts before `failed` (`DIALER_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Whether ambiguous answers are retried (`DIALER_RETRY_AMBIGUOUS`).
    pub retry_ambiguous: bool,
    /// Name in result events (`DIALER_WORKER_NAME`).
    pub worker: String,
    /// How long a redelivered job claimed by another live replica waits for its decision:
    /// the Genesys request timeout plus [`CLAIM_WAIT_MARGIN`].
    pub claim_wait: Duration,
}

/// Everything the per-job step needs, shared by all jobs of the process.
pub struct Pipeline {
    genesys: GenesysClient,
    store: DecisionStore,
    max_attempts: u32,
    retry_ambiguous: bool,
    worker: String,
    // Claim owner: this process (the worker name plus a per-start nonce).
    owner: String,
    // Cancelled when shutdown starts: jobs not yet dialled are requeued.
    shutdown: CancellationToken,
    // Tells the consume loop to pause on a systemic failure.
    systemic: mpsc::UnboundedSender<SystemicFailure>,
    // How long a redelivered job claimed by another live replica waits for its decision.
    claim_wait: Duration,
    // Jobs being decided by this process, so a redelivered copy (after a lost connection)
    // waits for the decision instead of calling it `unknown`. std Mutex: no await inside.
    in_flight: Mutex<HashMap<String, watch::Receiver<Option<Vec<u8>>>>>,
    // Decisions made (the call may have been placed) that the store refused to record: kept
    // until it takes them, so the event still carries the real outcome. std Mutex as above.
    unwritten: Mutex<HashMap<String, Vec<u8>>>,
    // Claims of jobs given back undialled whose release the store refused: released when it
    // recovers, so a replica waiting on one is not left to call it `unknown`.
    unreleased: Mutex<HashSet<String>>,
}

/// Deregisters an in-flight job when its step ends, whichever way.
struct InFlight<'a> {
    pipeline: &'a Pipeline,
    job_id: String,
    decided: watch::Sender<Option<Vec<u8>>>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self
            .pipeline
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&self.job_id);
    }
}

/// One delivery as the step sees it: plain values the worker read from the broker's message.
// No Debug: the body holds a phone number, which must not reach a log by accident.
#[derive(Clone, Copy)]
pub struct Incoming<'a> {
    /// The body.
    pub body: &'a [u8],
    /// The AMQP `message_id` (the job id when the body has none).
    pub message_id: Option<&'a str>,
    /// The AMQP `correlation_id`, for the job's log span (the worker copies it into the event's
    /// properties).
    pub correlation_id: Option<&'a str>,
    /// The counters the job carries (zero unless it came back from a delay tier).
    pub counters: Counters,
    /// How it relates to earlier copies of its job.
    pub arrival: Arrival,
    /// The broker's redelivered flag.
    pub redelivered: bool,
    /// The exchange it was published to, for the job's log span (the trust decision is already
    /// in `counters` and `arrival`).
    pub exchange: &'a str,
}

impl Pipeline {
    /// Builds the shared step; the receiver hears of systemic failures (the consume loop
    /// pauses on them). `shutdown` cancelled: jobs not yet dialled are given back.
    pub fn new(
        settings: PipelineSettings,
        shutdown: CancellationToken,
    ) -> (Self, mpsc::UnboundedReceiver<SystemicFailure>) {
        let PipelineSettings {
            genesys,
            store,
            max_attempts,
            retry_ambiguous,
            worker,
            claim_wait,
        } = settings;
        let (systemic, failures) = mpsc::unbounded_channel();
        let owner = format!("{worker}/{}", uuid::Uuid::new_v4().simple());
        let pipeline = Self {
            genesys,
            store,
            max_attempts,
            retry_ambiguous,
            worker,
            owner,
            shutdown,
            systemic,
            claim_wait,
            in_flight: Mutex::new(HashMap::new()),
            unwritten: Mutex::new(HashMap::new()),
            unreleased: Mutex::new(HashSet::new()),
        };
        (pipeline, failures)
    }

    /// The decision store, in words, for the start-up log line.
    pub fn describe_store(&self) -> String {
        self.store.describe()
    }

    /// Forgets decisions older than `older_than`; how many went.
    pub async fn prune_decisions(&self, older_than: Duration) -> Result<u64, StoreError> {
        self.store.prune(older_than).await
    }

    /// Whether Genesys accepts the credentials now (a fresh token is asked for): how a
    /// systemic pause ends.
    pub async fn credentials_accepted(&self) -> Result<(), GenesysError> {
        let tokens = self.genesys.tokens();
        tokens.forget();
        tokens.token().await.map(|_| ())
    }

    /// The Genesys client, for the worker's circuit-breaker probes: the breaker and the rate
    /// gate belong to the client, and the worker waits on them while consumption is paused.
    pub fn genesys(&self) -> &GenesysClient {
        &self.genesys
    }

    /// The worker's name, as it appears in result events.
    pub fn worker_name(&self) -> &str {
        &self.worker
    }

    /// Renews this process's lease in the store: other replicas know its claims are alive.
    /// Written once before the first claim and then by the heartbeat task.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        self.store.heartbeat(&self.owner).await
    }

    /// Tells the consume loop the store failed outside any job (the heartbeat): it pauses
    /// consumption as for a failure met by a job.
    pub fn report_store_failure(&self, error: &StoreError) {
        let _ = self
            .systemic
            .send(SystemicFailure::store(error.to_string()));
    }

    /// Ends this process's lease on a clean stop: its claims are known gone at once.
    pub async fn end_lease(&self) -> Result<(), StoreError> {
        self.store.end_lease(&self.owner).await
    }

    /// Decides what happens to one delivery.
    pub async fn process(&self, incoming: Incoming<'_>) -> Verdict {
        let received_at = OffsetDateTime::now_utc();
        let arrival = incoming.arrival;
        let mut progress = Progress {
            received_at,
            attempts: incoming.counters.attempts,
            tries: incoming.counters.tries,
        };

        let job = match parse_job(incoming.body, incoming.message_id) {
            Ok(job) => job,
            Err(rejection) => {
                tracing::warn!(job_id = rejection.job_id.as_deref(), kind = rejection.kind.as_str(), error = %rejection.message, "job rejected");
                let event = self.event(
                    rejection.job_id.clone(),
                    Outcome::Rejected,
                    &progress,
                    Some(EventError::from_rejection(&rejection)),
                );
                // Not recorded: parsing is deterministic, a redelivery is rejected the same way.
                return publish(event);
            }
        };
        // Every line the job logs repeats its span's fields, so the ones that are usually
        // unremarkable are recorded only when they say something.
        let span = tracing::info_span!(
            "job",
            job_id = %job.job_id,
            attempts = progress.attempts,
            arrival = arrival.as_str(),
            exchange = incoming.exchange,
            redelivered = tracing::field::Empty,
            correlation_id = tracing::field::Empty,
        );
        if incoming.redelivered {
            span.record("redelivered", true);
        }
        if let Some(correlation_id) = incoming.correlation_id {
            // The publisher's text: Debug-quoted so it cannot forge a log line.
            span.record("correlation_id", tracing::field::debug(correlation_id));
        }
        self.claim_and_decide(job, arrival, &mut progress)
            .instrument(span)
            .await
            .unwrap_or_else(|failure| {
                tracing::error!(error = %failure.message, "decision store failed; requeueing the job");
                let _ = self.systemic.send(failure);
                Verdict::Requeue { reason: "decision store failed" }
            })
    }

    async fn claim_and_decide(
        &self,
        job: DialJob,
        arrival: Arrival,
        progress: &mut Progress,
    ) -> Result<Verdict, SystemicFailure> {
        let id = job.job_id.as_str().to_owned();
        // A decision this process made but could not record: record it now and publish it.
        if let Some(verdict) = self.write_unwritten_one(&id).await? {
            return Ok(verdict);
        }
        let guard = if arrival == Arrival::New {
            // Any record of a new message's job makes it a duplicate: one claim that succeeds
            // only on an unknown job decides, where a read and then a claim took two.
            match self.claim_new(&id).await? {
                Some(guard) => guard,
                None => return Ok(self.duplicate(&job, progress)),
            }
        } else {
            // The same job again (redelivered, back from a delay tier, or replayed): what is
            // recorded decides. A claim can change hands while this copy waits for it (its
            // owner gave the job back): then this copy claims again, a bounded number of times.
            let mut rounds = 0;
            loop {
                rounds += 1;
                let existing = self.store.get(&id).await.map_err(store_failure)?;
                let holder = match existing {
                    None | Some(JobState::Waiting) => None,
                    Some(JobState::Decided { event })
                        if arrival == Arrival::Replay && reopenable(&event) =>
                    {
                        tracing::info!(
                            "replayed from the dead-letter queue: its earlier decision is set aside"
                        );
                        self.store
                            .forget_decision(&id)
                            .await
                            .map_err(store_failure)?;
                        None
                    }
                    Some(JobState::Decided { event }) => return Ok(republish(event)),
                    Some(JobState::Claimed { owner }) => Some(owner),
                };
                let holder = match holder {
                    Some(owner) => owner,
                    // Registered as in flight *before* the claim, so a copy of the job arriving in
                    // this process while the claim is written finds it and waits for its decision
                    // instead of taking the fresh claim for a leftover one.
                    None => match self.start_in_flight(&id) {
                        // Another copy is being decided by this process right now: wait for it.
                        None => self.owner.clone(),
                        Some(guard) => match self
                            .store
                            .try_claim(&id, &self.owner)
                            .await
                            .map_err(store_failure)?
                        {
                            ClaimResult::Claimed => break guard,
                            // Another copy of the job got there first (a redelivery racing its
                            // delayed copy).
                            ClaimResult::Existing(JobState::Decided { event }) => {
                                return Ok(republish(event));
                            }
                            ClaimResult::Existing(JobState::Claimed { owner }) => owner,
                            ClaimResult::Existing(JobState::Waiting) => {
                                return Ok(self.duplicate(&job, progress));
                            }
                        },
                    },
                };
                match self.claimed_elsewhere(&job, &holder, progress).await? {
                    Held::Done(verdict) => return Ok(verdict),
                    Held::Ours => {
                        if let Some(guard) = self.start_in_flight(&id) {
                            break guard;
                        }
                    }
                    Held::Released => {}
                }
                if rounds >= 3 {
                    return Ok(Verdict::Requeue {
                        reason: "the job's claim kept changing hands",
                    });
                }
            }
        };
        let verdict = self.dial(&job, progress).await;
        match verdict {
            Step::Decided(event) => {
                let bytes = event.to_json();
                let in_force = match self.store.decide(&guard.job_id, &bytes).await {
                    Ok(in_force) => in_force,
                    Err(error) => {
                        // The call may have been placed: the answer must not be lost. Kept
                        // until the store takes it; the job goes back to the queue, and its
                        // next delivery (here, or a replica waiting on this claim) publishes it.
                        tracing::error!(%error, outcome = event.outcome.as_str(), "cannot record the decision; kept in memory until the decision store recovers");
                        self.unwritten
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(guard.job_id.clone(), bytes);
                        return Err(store_failure(error));
                    }
                };
                guard.decided.send_replace(Some(in_force.clone()));
                if in_force == bytes {
                    // The usual case: this decision is the one in force, so the event built
                    // above is published as it is, not read back from its bytes.
                    Ok(Verdict::Publish { event, bytes })
                } else {
                    Ok(republish(in_force))
                }
            }
            Step::Delay { wait } => {
                // Not dialled again before the delay: if the mark cannot be written, the job
                // goes back to the queue instead and its claim is released later.
                if let Err(error) = self.store.set_waiting(&guard.job_id, &self.owner).await {
                    self.remember_unreleased(&guard.job_id);
                    return Err(store_failure(error));
                }
                Ok(Verdict::Delay {
                    wait,
                    counters: Counters {
                        attempts: progress.attempts,
                        tries: progress.tries,
                    },
                })
            }
            Step::GiveBack(reason) => {
                if let Err(error) = self.store.release(&guard.job_id, &self.owner).await {
                    self.remember_unreleased(&guard.job_id);
                    return Err(store_failure(error));
                }
                Ok(Verdict::Requeue { reason })
            }
        }
    }

    /// Claims a new message's job, only when the store has no record of it; `None` when it
    /// has one, or when a copy of the job is being decided in this process.
    async fn claim_new(&self, id: &str) -> Result<Option<InFlight<'_>>, SystemicFailure> {
        // Registered as in flight *before* the claim, as for the same job again below.
        let Some(guard) = self.start_in_flight(id) else {
            return Ok(None);
        };
        let claimed = self
            .store
            .claim_new(id, &self.owner)
            .await
            .map_err(store_failure)?;
        Ok(claimed.then_some(guard))
    }

    /// Marks the job as being decided by this process, unless a copy of it already is
    /// (`None`). The entry goes when the returned guard is dropped.
    fn start_in_flight(&self, job_id: &str) -> Option<InFlight<'_>> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(job_id) {
            return None;
        }
        let (decided, receiver) = watch::channel(None);
        map.insert(job_id.to_owned(), receiver);
        Some(InFlight {
            pipeline: self,
            job_id: job_id.to_owned(),
            decided,
        })
    }

    fn remember_unreleased(&self, job_id: &str) {
        self.unreleased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job_id.to_owned());
    }

    /// Records the decisions the store refused earlier and releases the claims it would not
    /// release; `true` when none is left. Called by the paused worker before it resumes.
    pub async fn write_unwritten(&self) -> Result<bool, crate::decisions::StoreError> {
        let unreleased: Vec<String> = self
            .unreleased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for id in unreleased {
            // Only our own claim goes: if the job was decided or claimed again meanwhile,
            // this does nothing.
            self.store.release(&id, &self.owner).await?;
            self.unreleased
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        let pending: Vec<(String, Vec<u8>)> = self
            .unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, bytes)| (id.clone(), bytes.clone()))
            .collect();
        for (id, bytes) in pending {
            self.store.decide(&id, &bytes).await?;
            self.unwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            tracing::info!(job_id = %id, "decision recorded after the decision store recovered");
        }
        Ok(self
            .unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty())
    }

    /// The unrecorded decision of `id`, recorded now and published; `None` when there is none.
    async fn write_unwritten_one(&self, id: &str) -> Result<Option<Verdict>, SystemicFailure> {
        let pending = self
            .unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let Some(bytes) = pending else {
            return Ok(None);
        };
        let in_force = self.store.decide(id, &bytes).await.map_err(store_failure)?;
        self.unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(Some(republish(in_force)))
    }

    /// The job is claimed by `owner` but undecided.
    ///
    /// - This process is deciding it (the connection was lost and the broker redelivered it
    ///   here): wait for that decision.
    /// - This process claimed it and its step ended without a decision (a give-back whose
    ///   release failed): no call is pending, the claim is still ours, dial.
    /// - Another replica that is still alive holds it (its broker connection dropped mid-call):
    ///   wait, up to [`Pipeline::claim_wait`], for its decision and publish it.
    /// - Its owner is gone (its lease ran out), or the wait ran out: nobody knows whether the
    ///   call was placed: `unknown`, never dialled again.
    async fn claimed_elsewhere(
        &self,
        job: &DialJob,
        owner: &str,
        progress: &Progress,
    ) -> Result<Held, SystemicFailure> {
        let id = job.job_id.as_str();
        if owner == self.owner {
            let waiting_on = self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned();
            let Some(mut decided) = waiting_on else {
                let pending_release = self
                    .unreleased
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(id);
                if pending_release {
                    // The paused worker is about to release this claim: dialling on it now
                    // could race that release. Back to the queue; claimed afresh after.
                    return Ok(Held::Done(Verdict::Requeue {
                        reason: "its claim is released once the decision store recovers",
                    }));
                }
                // Read again: a copy that was in flight a moment ago has recorded its decision
                // (or given the job back) by the time its entry is gone.
                return match self.store.get(id).await.map_err(store_failure)? {
                    Some(JobState::Decided { event }) => Ok(Held::Done(republish(event))),
                    Some(JobState::Claimed { owner }) if owner == self.owner => Ok(Held::Ours),
                    _ => Ok(Held::Released),
                };
            };
            // Ends when the deciding step records its decision or gives up (sender dropped).
            let outcome = decided
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|d| d.clone());
            return match outcome {
                Some(bytes) => Ok(Held::Done(republish(bytes))),
                None => match self.store.get(id).await.map_err(store_failure)? {
                    Some(JobState::Decided { event }) => Ok(Held::Done(republish(event))),
                    // Released or sent to a delay queue: this copy is redundant but its
                    // original is already acked or requeued, so this one must not be dropped.
                    _ => Ok(Held::Done(Verdict::Requeue {
                        reason: "another copy of this job was given back",
                    })),
                },
            };
        }
        let deadline = tokio::time::Instant::now() + self.claim_wait;
        let ended = loop {
            if !self
                .store
                .owner_alive(owner, &self.owner)
                .await
                .map_err(store_failure)?
            {
                break "owner_gone";
            }
            if tokio::time::Instant::now() >= deadline {
                break "timed_out";
            }
            if !self.sleep_unless_shutdown(CLAIM_POLL).await {
                return Ok(Held::Done(Verdict::Requeue {
                    reason: "shutdown while waiting for another replica's decision",
                }));
            }
            match self.store.get(id).await.map_err(store_failure)? {
                Some(JobState::Decided { event }) => {
                    metrics::counter!(m::DECISION_CLAIM_WAITS_TOTAL, "result" => "decided")
                        .increment(1);
                    tracing::info!(
                        owner,
                        "the replica holding this job's claim decided it; publishing its decision"
                    );
                    return Ok(Held::Done(republish(event)));
                }
                Some(JobState::Claimed { owner: now }) if now == owner => {}
                // Given back or sent to a delay queue by its owner: claim it afresh.
                _ => return Ok(Held::Released),
            }
        };
        metrics::counter!(m::DECISION_CLAIM_WAITS_TOTAL, "result" => ended).increment(1);
        tracing::warn!(
            previous_owner = owner,
            reason = ended,
            "job was claimed by a worker that stopped (or did not decide in time) before deciding; not dialling again"
        );
        let event = self.job_event(
            job,
            Outcome::Unknown,
            progress,
            None,
            Some(EventError::new("interrupted", "a worker claimed this job and stopped before recording an answer from Genesys; the call may have been placed, so it is not dialled again")),
        );
        // `decide` keeps a decision the owner recorded in the meantime, and returns it.
        let bytes = self
            .store
            .decide(id, &event.to_json())
            .await
            .map_err(store_failure)?;
        Ok(Held::Done(republish(bytes)))
    }

    fn duplicate(&self, job: &DialJob, progress: &Progress) -> Verdict {
        tracing::info!("job id already claimed or decided: answering this message as a duplicate");
        let event = self.job_event(
            job,
            Outcome::Duplicate,
            progress,
            None,
            Some(EventError::new(
                "duplicate",
                format!(
                    "a message with jobId {} was already received; this one is not dialled",
                    job.job_id
                ),
            )),
        );
        publish(event)
    }

    /// From a claimed job to a decision, a delay or a give-back.
    async fn dial(&self, job: &DialJob, progress: &mut Progress) -> Step {
        let now = OffsetDateTime::now_utc();
        // Checked here, after the claim, so the rejection is recorded: whether a time is too
        // far ahead depends on when it is asked, and a redelivery must get the same answer.
        if let Some(message) = job.beyond_horizon(now) {
            let error = EventError::new("invalid_field", message);
            return self.decided(job, Outcome::Rejected, progress, None, Some(error));
        }
        if job.expires_at.is_some_and(|expires| expires <= now) {
            return self.expired(job, progress, None);
        }
        if let Some(not_before) = job.not_before
            && not_before > now
        {
            let wait = duration_until(not_before, now);
            if wait > IN_PROCESS_WAIT_LIMIT {
                // Wait in the broker; the job comes back early and waits the rest then.
                metrics::counter!(m::RETRIES_SCHEDULED_TOTAL, "via" => "delay_queue").increment(1);
                return Step::Delay {
                    wait: Delay::AtMost(wait - IN_PROCESS_WAIT_LIMIT / 2),
                };
            }
            if !self.sleep_unless_shutdown(wait).await {
                return Step::GiveBack("shutdown during notBefore wait");
            }
        }

        let user = match self.resolve_agent(job, progress).await {
            Ok(user) => user,
            Err(step) => return step,
        };

        let request = CreateCallRequest::for_job(job);
        let deadline = job.expires_at;
        let call = GenesysCall {
            what: "dialling",
            places_calls: true,
            user: Some(user),
        };
        let created = match self
            .with_retries(job, progress, call, || {
                self.genesys
                    .place_call(user, &request, Some(&self.shutdown), deadline)
            })
            .await
        {
            Ok(created) => created,
            Err(step) => return step,
        };
        tracing::info!(conversation_id = %created.id, phone = %mask_phone(job.phone_number.e164()), "call placed");
        let mut event = self.job_event(job, Outcome::Placed, progress, Some(user), None);
        event.conversation_id = Some(created.id);
        Step::Decided(Box::new(event))
    }

    /// The agent's user id: given, or looked up by email (cached by the client).
    async fn resolve_agent(&self, job: &DialJob, progress: &mut Progress) -> Result<UserId, Step> {
        let email = match &job.agent {
            Agent::UserId(id) => return Ok(*id),
            Agent::Email(email) => email,
        };
        let lookup = GenesysCall {
            what: "the agent lookup",
            places_calls: false,
            user: None,
        };
        let found = self
            .with_retries(job, progress, lookup, || {
                self.genesys.find_user_by_email(email, Some(&self.shutdown))
            })
            .await?;
        found.ok_or_else(|| {
            self.decided(
                job,
                Outcome::Rejected,
                progress,
                None,
                Some(EventError::new(
                    "unknown_agent",
                    format!("agentEmail {email} matches no Genesys Cloud user"),
                )),
            )
        })
    }

    /// The one retry loop every Genesys operation of a job goes through, with one set of
    /// checks and metrics: before each attempt, shutdown and `expiresAt`; after a failure, the
    /// policy of [`Self::after_failure`]; a wait up to [`IN_PROCESS_WAIT_LIMIT`] happens here,
    /// a longer one (a long `Retry-After` included) goes through a delay queue, and one that
    /// would end after `expiresAt` ends the job `expired` at once. A request the client did
    /// not send (deadline passed, circuit open, shutdown) never counts as a try.
    async fn with_retries<T, F>(
        &self,
        job: &DialJob,
        progress: &mut Progress,
        call: GenesysCall,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, Step>
    where
        F: Future<Output = crate::genesys::Answer<T>>,
    {
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Step::GiveBack("shutdown before a Genesys request"));
            }
            if job
                .expires_at
                .is_some_and(|expires| expires <= OffsetDateTime::now_utc())
            {
                return Err(self.expired(job, progress, call.user));
            }
            let answer = attempt().await;
            if call.places_calls {
                progress.attempts = progress.attempts.saturating_add(answer.requests);
            }
            let error = match answer.result {
                Ok(value) => return Ok(value),
                Err(GenesysError::Cancelled) => {
                    return Err(Step::GiveBack("shutdown before a Genesys request"));
                }
                Err(GenesysError::DeadlinePassed) => {
                    return Err(self.expired(job, progress, call.user));
                }
                Err(GenesysError::CircuitOpen(_)) => {
                    // The worker pauses consumption; the job waits in the queue, its tries intact.
                    return Err(Step::GiveBack("circuit breaker open"));
                }
                Err(error) => error,
            };
            tracing::debug!(error = %error, during = call.what, "Genesys request failed");
            match self.after_failure(&error, progress, call.places_calls) {
                Next::RetryAfter(wait) => {
                    let resumes = OffsetDateTime::now_utc() + wait;
                    if job.expires_at.is_some_and(|expires| expires <= resumes) {
                        return Err(self.expired(job, progress, call.user));
                    }
                    if wait <= IN_PROCESS_WAIT_LIMIT {
                        metrics::counter!(m::RETRIES_SCHEDULED_TOTAL, "via" => "in_process")
                            .increment(1);
                        if !self.sleep_unless_shutdown(wait).await {
                            return Err(Step::GiveBack("shutdown during backoff"));
                        }
                        continue;
                    }
                    metrics::counter!(m::RETRIES_SCHEDULED_TOTAL, "via" => "delay_queue")
                        .increment(1);
                    return Err(Step::Delay {
                        wait: Delay::AtLeast(wait),
                    });
                }
                Next::Fail(outcome) => {
                    return Err(self.decided(
                        job,
                        outcome,
                        progress,
                        call.user,
                        Some(EventError::from(&error)),
                    ));
                }
                Next::Pause => {
                    let _ = self.systemic.send(SystemicFailure::now(error.to_string()));
                    return Err(Step::GiveBack("systemic failure"));
                }
            }
        }
    }

    /// `expired`: `expiresAt` passed (or would pass during a required wait) before the call
    /// could be placed.
    fn expired(&self, job: &DialJob, progress: &Progress, user: Option<UserId>) -> Step {
        self.decided(
            job,
            Outcome::Expired,
            progress,
            user,
            Some(EventError::new(
                "expired",
                "expiresAt passed before the call could be placed",
            )),
        )
    }

    /// The retry policy, in one place: capped exponential backoff with full jitter, at least
    /// `Retry-After`; 429s (and requests never sent) do not count toward the attempt limit
    /// (Genesys asked us to wait, nothing failed); ambiguous answers end `unknown` unless
    /// retrying them is enabled, and only for requests that may place a call (a lookup has
    /// no side effect, so an ambiguous answer to it is safe to retry).
    fn after_failure(
        &self,
        error: &GenesysError,
        progress: &mut Progress,
        has_side_effect: bool,
    ) -> Next {
        let retry_after = match error.class() {
            ErrorClass::Transient { retry_after } => retry_after,
            ErrorClass::Ambiguous if has_side_effect && !self.retry_ambiguous => {
                return Next::Fail(Outcome::Unknown);
            }
            ErrorClass::Ambiguous => None,
            ErrorClass::Permanent => return Next::Fail(Outcome::Failed),
            ErrorClass::Systemic | ErrorClass::RenewToken => return Next::Pause,
        };
        if error.counts_as_try() {
            progress.tries = progress.tries.saturating_add(1);
            if progress.tries >= self.max_attempts {
                return Next::Fail(Outcome::Failed);
            }
        }
        let backoff = full_jitter_backoff(progress.tries.max(1));
        Next::RetryAfter(backoff.max(retry_after.unwrap_or_default()))
    }

    /// Sleeps unless shutdown starts first; `false` when it did.
    async fn sleep_unless_shutdown(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// A decision for a claimed job.
    fn decided(
        &self,
        job: &DialJob,
        outcome: Outcome,
        progress: &Progress,
        user: Option<UserId>,
        error: Option<EventError>,
    ) -> Step {
        Step::Decided(Box::new(
            self.job_event(job, outcome, progress, user, error),
        ))
    }

    fn job_event(
        &self,
        job: &DialJob,
        outcome: Outcome,
        progress: &Progress,
        user: Option<UserId>,
        error: Option<EventError>,
    ) -> ResultEvent {
        let mut event = self.event(
            Some(job.job_id.as_str().to_owned()),
            outcome,
            progress,
            error,
        );
        event.agent_user_id = user
            .or(match &job.agent {
                Agent::UserId(id) => Some(*id),
                Agent::Email(_) => None,
            })
            .map(|id| id.to_string());
        event.phone_number = Some(job.phone_number.e164().to_owned());
        event.attributes = (!job.attributes.is_empty()).then(|| job.attributes.clone());
        event
    }

    fn event(
        &self,
        job_id: Option<String>,
        outcome: Outcome,
        progress: &Progress,
        error: Option<EventError>,
    ) -> ResultEvent {
        ResultEvent {
            job_id,
            outcome,
            conversation_id: None,
            agent_user_id: None,
            phone_number: None,
            attempts: progress.attempts,
            error,
            attributes: None,
            received_at: progress.received_at,
            completed_at: OffsetDateTime::now_utc(),
            worker: self.worker.clone(),
        }
    }
}

/// How a message relates to earlier copies of its job; decides what an existing record means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// A new message: an existing record makes it a duplicate.
    New,
    /// The broker redelivered it, or it came back from a delay queue: the same job again.
    Retry,
    /// `dialer dlq replay` sent it back: a person wants a failed job tried once more.
    Replay,
}

impl Arrival {
    /// `new`, `retry` or `replay`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Retry => "retry",
            Self::Replay => "replay",
        }
    }

    /// From the broker's redelivered flag and the marks believed on the delivery (none unless
    /// it came through the internal route).
    pub fn of(redelivered: bool, marks: &Marks) -> Self {
        if redelivered || marks.counters.is_some() {
            // A redelivery, or a copy we sent through a delay tier (it carries our counters).
            Self::Retry
        } else if marks.replayed_at.is_some() {
            Self::Replay
        } else {
            Self::New
        }
    }
}

/// Whether a replay may set a recorded decision aside: only outcomes that went to the
/// dead-letter queue. A replayed `unknown` may ring somebody a second time; replaying it is
/// the reconciling person's explicit choice.
fn reopenable(recorded: &[u8]) -> bool {
    ResultEvent::from_json(recorded).is_ok_and(|event| event.outcome.goes_to_dead_letter())
}

/// Counters of the job across deliveries.
struct Progress {
    received_at: OffsetDateTime,
    attempts: u32,
    tries: u32,
}

/// What became of a claim held by someone else.
enum Held {
    /// Waited for or decided: this verdict.
    Done(Verdict),
    /// This process holds it and nothing is in flight for it: dial.
    Ours,
    /// Its owner gave it back meanwhile: claim again.
    Released,
}

/// Where the claimed job's step ended.
enum Step {
    Decided(Box<ResultEvent>),
    Delay { wait: Delay },
    GiveBack(&'static str),
}

/// What a Genesys operation of a job is, for the shared retry loop.
struct GenesysCall {
    /// For logs.
    what: &'static str,
    /// Whether the request may place a call: its requests count as the job's `attempts`, and
    /// an ambiguous answer ends the job `unknown` (unless retrying those is enabled).
    places_calls: bool,
    /// The agent, once known, for the event.
    user: Option<UserId>,
}

/// What the retry policy says after a failure.
enum Next {
    RetryAfter(Duration),
    Fail(Outcome),
    Pause,
}

/// A uniformly random wait between zero and `min(cap, base · 2^(tries-1))` ("full jitter"):
/// spreads retries of many jobs so they do not return in lockstep.
pub fn full_jitter_backoff(tries: u32) -> Duration {
    let exponent = tries.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << exponent).min(BACKOFF_CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

fn duration_until(later: OffsetDateTime, now: OffsetDateTime) -> Duration {
    Duration::try_from(later - now).unwrap_or_default()
}

fn publish(event: ResultEvent) -> Verdict {
    let bytes = event.to_json();
    Verdict::Publish {
        event: Box::new(event),
        bytes,
    }
}

/// A recorded decision, published again exactly as recorded.
fn republish(bytes: Vec<u8>) -> Verdict {
    match ResultEvent::from_json(&bytes) {
        Ok(event) => Verdict::Publish {
            event: Box::new(event),
            bytes,
        },
        // Only a corrupted store could get here; requeueing would loop, so stop and say so.
        Err(error) => {
            tracing::error!(%error, "a recorded decision cannot be read back; requeueing");
            Verdict::Requeue {
                reason: "unreadable recorded decision",
            }
        }
    }
}

fn store_failure(error: StoreError) -> SystemicFailure {
    // The error names the store already.
    SystemicFailure::store(error.to_string())
}

#[cfg(test)]
mod step_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        for tries in 1..40 {
            let wait = full_jitter_backoff(tries);
            assert!(wait <= BACKOFF_CAP, "{tries}: {wait:?}");
        }
        let ceiling_first = BACKOFF_BASE;
        assert!((0..200).all(|_| full_jitter_backoff(1) <= ceiling_first));
        // Full jitter: with 200 draws under a 60 s ceiling, not all land in one narrow band.
        let draws: Vec<_> = (0..200).map(|_| full_jitter_backoff(20)).collect();
        let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert!(*max - *min > Duration::from_secs(10), "{min:?}..{max:?}");
    }
}
