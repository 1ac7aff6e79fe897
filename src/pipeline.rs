//! The per-job step: one delivery in, one [`Verdict`] out.
//!
//! Parse → claim → `expiresAt` / `notBefore` → resolve the agent → place the call (paced by
//! the rate gate) → classify → record the decision. The consume loop applies the verdict
//! (publish, then ack / dead-letter / delay / requeue); nothing here touches the broker.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use lapin::BasicProperties;
use rand::Rng;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{Topology, header_str, header_u32};
use crate::decisions::{ClaimResult, DecisionStore, JobState};
use crate::event::{EventError, Outcome, ResultEvent};
use crate::genesys::{ErrorClass, GenesysClient, GenesysError, UserId};
use crate::job::{Agent, DialJob, parse_job};
use crate::metrics as m;
use crate::telemetry::mask_phone;

/// Header counting place-call requests sent for the job, across delays (contract §4).
pub const ATTEMPTS_HEADER: &str = "x-dialer-attempts";
/// Header counting the failures that count toward `DIALER_MAX_ATTEMPTS` (429s do not).
pub const TRIES_HEADER: &str = "x-dialer-tries";
/// Header `dialer dlq replay` sets: a person asked for this dead-lettered job to be tried again.
pub const REPLAY_HEADER: &str = "x-dialer-replayed-at";

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
    /// Republish the job to a delay queue with updated counters, then ack the original.
    Delay {
        /// The delay queue.
        queue: String,
        /// Place-call requests sent so far.
        attempts: u32,
        /// Failures counted toward the limit so far.
        tries: u32,
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

/// Everything the per-job step needs, shared by all jobs of the process.
pub struct Pipeline {
    /// Genesys Cloud.
    pub genesys: GenesysClient,
    /// Claims and decisions.
    pub store: DecisionStore,
    /// Queue names.
    pub topology: Topology,
    /// Attempts before `failed`.
    pub max_attempts: u32,
    /// Whether ambiguous answers are retried.
    pub retry_ambiguous: bool,
    /// Name in result events.
    pub worker: String,
    /// Claim owner: this process (the worker name plus a per-start nonce).
    pub owner: String,
    /// Cancelled when shutdown starts: jobs not yet dialled are requeued.
    pub shutdown: CancellationToken,
    /// Tells the consume loop to pause on a systemic failure.
    pub systemic: tokio::sync::mpsc::UnboundedSender<SystemicFailure>,
    /// How long a redelivered job claimed by another live replica waits for its decision:
    /// the Genesys request timeout plus [`CLAIM_WAIT_MARGIN`].
    pub claim_wait: Duration,
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

/// Facts about one delivery the step needs.
pub struct Incoming<'a> {
    /// The body.
    pub body: &'a [u8],
    /// Its AMQP properties.
    pub properties: &'a BasicProperties,
    /// The broker's redelivered flag.
    pub redelivered: bool,
}

impl Pipeline {
    /// Builds the shared step.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        genesys: GenesysClient,
        store: DecisionStore,
        topology: Topology,
        max_attempts: u32,
        retry_ambiguous: bool,
        worker: String,
        shutdown: CancellationToken,
        systemic: tokio::sync::mpsc::UnboundedSender<SystemicFailure>,
    ) -> Self {
        let owner = format!("{worker}/{}", uuid::Uuid::new_v4().simple());
        Self {
            genesys,
            store,
            topology,
            max_attempts,
            retry_ambiguous,
            worker,
            owner,
            shutdown,
            systemic,
            claim_wait: Duration::from_secs(10) + CLAIM_WAIT_MARGIN,
            in_flight: Mutex::new(HashMap::new()),
            unwritten: Mutex::new(HashMap::new()),
            unreleased: Mutex::new(HashSet::new()),
        }
    }

    /// Decides what happens to one delivery.
    pub async fn process(&self, incoming: Incoming<'_>) -> Verdict {
        let received_at = OffsetDateTime::now_utc();
        let message_id = incoming
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str());
        let attempts = header_u32(incoming.properties, ATTEMPTS_HEADER);
        let arrival = if incoming.redelivered || attempts.is_some() {
            // A redelivery, or a copy we sent through a delay queue (it carries our counter).
            Arrival::Retry
        } else if header_str(incoming.properties, REPLAY_HEADER).is_some() {
            Arrival::Replay
        } else {
            Arrival::New
        };
        let mut progress = Progress {
            received_at,
            attempts: attempts.unwrap_or(0),
            tries: header_u32(incoming.properties, TRIES_HEADER).unwrap_or(0),
        };

        let job = match parse_job(incoming.body, message_id) {
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
        let span = tracing::info_span!("job", job_id = %job.job_id, attempts = progress.attempts);
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
        // A claim can change hands while this copy waits for it (its owner gave the job back):
        // then this copy claims again, a bounded number of times.
        let mut rounds = 0;
        loop {
            rounds += 1;
            let existing = self.store.get(&id).await.map_err(store_failure)?;
            let holder = match (existing, arrival) {
                (None, _) | (Some(JobState::Waiting), Arrival::Retry | Arrival::Replay) => None,
                (Some(JobState::Decided { event }), Arrival::Replay) if reopenable(&event) => {
                    tracing::info!(
                        "replayed from the dead-letter queue: its earlier decision is set aside"
                    );
                    self.store
                        .forget_decision(&id)
                        .await
                        .map_err(store_failure)?;
                    None
                }
                (Some(JobState::Decided { event }), Arrival::Retry | Arrival::Replay) => {
                    return Ok(republish(event));
                }
                (Some(JobState::Claimed { owner }), Arrival::Retry | Arrival::Replay) => {
                    Some(owner)
                }
                (Some(_), Arrival::New) => return Ok(self.duplicate(&job, progress)),
            };
            let holder = match holder {
                Some(owner) => owner,
                None => match self
                    .store
                    .try_claim(&id, &self.owner)
                    .await
                    .map_err(store_failure)?
                {
                    ClaimResult::Claimed => break,
                    // Another copy of the job got there first (a redelivery racing its delayed copy).
                    ClaimResult::Existing(JobState::Decided { event }) => {
                        return Ok(republish(event));
                    }
                    ClaimResult::Existing(JobState::Claimed { owner }) => owner,
                    ClaimResult::Existing(JobState::Waiting) => {
                        return Ok(self.duplicate(&job, progress));
                    }
                },
            };
            match self.claimed_elsewhere(&job, &holder, progress).await? {
                Held::Done(verdict) => return Ok(verdict),
                Held::Ours => break,
                Held::Released if rounds < 3 => {}
                Held::Released => {
                    return Ok(Verdict::Requeue {
                        reason: "the job's claim kept changing hands",
                    });
                }
            }
        }
        let (decided, receiver) = watch::channel(None);
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), receiver);
        let guard = InFlight {
            pipeline: self,
            job_id: id,
            decided,
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
                Ok(republish(in_force))
            }
            Step::Delay { queue } => {
                // Not dialled again before the delay: if the mark cannot be written, the job
                // goes back to the queue instead and its claim is released later.
                if let Err(error) = self.store.set_waiting(&guard.job_id, &self.owner).await {
                    self.remember_unreleased(&guard.job_id);
                    return Err(store_failure(error));
                }
                Ok(Verdict::Delay {
                    queue,
                    attempts: progress.attempts,
                    tries: progress.tries,
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
                return Ok(Held::Ours);
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
        if job.expires_at.is_some_and(|expires| expires <= now) {
            return self.decided(
                job,
                Outcome::Expired,
                progress,
                None,
                Some(EventError::new(
                    "expired",
                    "expiresAt passed before the call could be placed",
                )),
            );
        }
        if let Some(not_before) = job.not_before
            && not_before > now
        {
            let wait = duration_until(not_before, now);
            if wait > IN_PROCESS_WAIT_LIMIT {
                // Wait in the broker; the job comes back early and waits the rest then.
                if let Some((_, queue)) = self
                    .topology
                    .delay_at_most(wait - IN_PROCESS_WAIT_LIMIT / 2)
                {
                    metrics::counter!(m::RETRIES_SCHEDULED_TOTAL, "via" => "delay_queue")
                        .increment(1);
                    return Step::Delay {
                        queue: queue.clone(),
                    };
                }
            }
            if !self.sleep_unless_shutdown(wait).await {
                return Step::GiveBack("shutdown during notBefore wait");
            }
        }

        let user = match self.resolve_agent(job, progress).await {
            Ok(user) => user,
            Err(step) => return step,
        };

        let request = job.create_call_request();
        loop {
            if self.shutdown.is_cancelled() {
                return Step::GiveBack("shutdown before dialling");
            }
            if job
                .expires_at
                .is_some_and(|expires| expires <= OffsetDateTime::now_utc())
            {
                return self.decided(
                    job,
                    Outcome::Expired,
                    progress,
                    Some(user),
                    Some(EventError::new(
                        "expired",
                        "expiresAt passed while retrying",
                    )),
                );
            }
            let answer = self
                .genesys
                .place_call(user, &request, Some(&self.shutdown))
                .await;
            progress.attempts += answer.requests;
            let error = match answer.result {
                Ok(created) => {
                    tracing::info!(conversation_id = %created.id, phone = %mask_phone(job.phone_number.e164()), "call placed");
                    let mut event =
                        self.job_event(job, Outcome::Placed, progress, Some(user), None);
                    event.conversation_id = Some(created.id);
                    return Step::Decided(Box::new(event));
                }
                Err(GenesysError::Cancelled) => return Step::GiveBack("shutdown before dialling"),
                Err(error) => error,
            };
            match self.after_failure(&error, progress, true) {
                Next::RetryAfter(wait) => {
                    if wait <= IN_PROCESS_WAIT_LIMIT {
                        metrics::counter!(m::RETRIES_SCHEDULED_TOTAL, "via" => "in_process")
                            .increment(1);
                        if !self.sleep_unless_shutdown(wait).await {
                            return Step::GiveBack("shutdown during backoff");
                        }
                        continue;
                    }
                    metrics::counter!(m::RETRIES_SCHEDULED_TOTAL, "via" => "delay_queue")
                        .increment(1);
                    let (_, queue) = self.topology.delay_at_least(wait);
                    return Step::Delay {
                        queue: queue.clone(),
                    };
                }
                Next::Fail(outcome) => {
                    return self.decided(
                        job,
                        outcome,
                        progress,
                        Some(user),
                        Some(EventError::from_genesys(&error)),
                    );
                }
                Next::Pause => {
                    let _ = self.systemic.send(SystemicFailure::now(error.to_string()));
                    return Step::GiveBack("systemic failure");
                }
            }
        }
    }

    /// The agent's user id: given, or looked up by email (cached by the client).
    async fn resolve_agent(&self, job: &DialJob, progress: &mut Progress) -> Result<UserId, Step> {
        let email = match &job.agent {
            Agent::UserId(id) => return Ok(*id),
            Agent::Email(email) => email,
        };
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Step::GiveBack("shutdown before the agent lookup"));
            }
            let answer = self
                .genesys
                .find_user_by_email(email, Some(&self.shutdown))
                .await;
            let error = match answer.result {
                Ok(Some(user)) => return Ok(user),
                Ok(None) => {
                    return Err(self.decided(
                        job,
                        Outcome::Rejected,
                        progress,
                        None,
                        Some(EventError::new(
                            "unknown_agent",
                            format!("agentEmail {email} matches no Genesys Cloud user"),
                        )),
                    ));
                }
                Err(GenesysError::Cancelled) => {
                    return Err(Step::GiveBack("shutdown before the agent lookup"));
                }
                Err(error) => error,
            };
            // A search has no side effect: an ambiguous answer is safe to retry.
            match self.after_failure(&error, progress, false) {
                Next::RetryAfter(wait) if wait <= IN_PROCESS_WAIT_LIMIT => {
                    if !self.sleep_unless_shutdown(wait).await {
                        return Err(Step::GiveBack("shutdown during backoff"));
                    }
                }
                Next::RetryAfter(wait) => {
                    let (_, queue) = self.topology.delay_at_least(wait);
                    return Err(Step::Delay {
                        queue: queue.clone(),
                    });
                }
                Next::Fail(outcome) => {
                    return Err(self.decided(
                        job,
                        outcome,
                        progress,
                        None,
                        Some(EventError::from_genesys(&error)),
                    ));
                }
                Next::Pause => {
                    let _ = self.systemic.send(SystemicFailure::now(error.to_string()));
                    return Err(Step::GiveBack("systemic failure"));
                }
            }
        }
    }

    /// The retry policy, in one place: capped exponential backoff with full jitter, at least
    /// `Retry-After`; 429s do not count toward the attempt limit (Genesys asked us to wait,
    /// nothing failed); ambiguous answers end `unknown` unless retrying them is enabled.
    fn after_failure(
        &self,
        error: &GenesysError,
        progress: &mut Progress,
        has_side_effect: bool,
    ) -> Next {
        let (retry_after, counts) = match error.class() {
            ErrorClass::Transient { retry_after } => {
                (retry_after, error.http_status() != Some(429))
            }
            ErrorClass::Ambiguous if has_side_effect && !self.retry_ambiguous => {
                return Next::Fail(Outcome::Unknown);
            }
            ErrorClass::Ambiguous => (None, true),
            ErrorClass::Permanent => return Next::Fail(Outcome::Failed),
            ErrorClass::Systemic | ErrorClass::RenewToken => return Next::Pause,
        };
        if counts {
            progress.tries += 1;
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
enum Arrival {
    /// A new message: an existing record makes it a duplicate.
    New,
    /// The broker redelivered it, or it came back from a delay queue: the same job again.
    Retry,
    /// `dialer dlq replay` sent it back: a person wants a failed job tried once more.
    Replay,
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
    Delay { queue: String },
    GiveBack(&'static str),
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

fn store_failure(error: crate::decisions::StoreError) -> SystemicFailure {
    // The error names the store already.
    SystemicFailure::store(error.to_string())
}

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
