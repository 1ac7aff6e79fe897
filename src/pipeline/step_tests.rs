//! Unit tests of the per-job step with no broker: the pipeline against the in-process
//! simulator (port 0) and the memory store, one case per way a job can end.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;

use super::*;
use crate::config::{GenesysSettings, Rate, Secret};
use crate::ratelimit::RateGate;
use crate::sim::{self, Faults, SimAgent, SimHandle, SimSettings};

/// A pipeline against its own simulator.
struct Harness {
    sim: SimHandle,
    pipeline: Pipeline,
    failures: mpsc::UnboundedReceiver<SystemicFailure>,
    shutdown: CancellationToken,
}

async fn harness(faults: Faults) -> Harness {
    let settings = SimSettings {
        addr: "127.0.0.1:0".parse().expect("address"),
        rate_limit: 100_000,
        faults,
        ..SimSettings::default()
    };
    let (client_id, client_secret) = (settings.client_id.clone(), settings.client_secret.clone());
    let sim = sim::start(settings).await.expect("the simulator starts");
    let base = url::Url::parse(&sim.base_url()).expect("the simulator's URL");
    let gate = Arc::new(RateGate::new(
        Rate::new(100_000, Duration::from_secs(1)).expect("rate"),
        NonZeroU32::new(1000).expect("burst"),
    ));
    let genesys = GenesysClient::new(
        &GenesysSettings {
            client_id,
            client_secret: Secret::new(client_secret),
            api_base: base.clone(),
            login_base: base,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        },
        gate,
    )
    .expect("client");
    let shutdown = CancellationToken::new();
    let (pipeline, failures) = Pipeline::new(
        PipelineSettings {
            genesys,
            store: DecisionStore::memory(),
            max_attempts: 3,
            retry_ambiguous: false,
            worker: "unit".into(),
            claim_wait: Duration::from_secs(2),
        },
        shutdown.clone(),
    );
    Harness {
        sim,
        pipeline,
        failures,
        shutdown,
    }
}

fn job(id: &str) -> serde_json::Value {
    serde_json::json!({
        "jobId": id,
        "agentUserId": SimAgent::demo_set()[0].id,
        "phoneNumber": "+14155552671",
    })
}

fn in_secs(secs: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::seconds(secs))
        .format(&Rfc3339)
        .expect("formattable")
}

impl Harness {
    async fn step(&self, job: &serde_json::Value, arrival: Arrival) -> Verdict {
        let body = serde_json::to_vec(job).expect("json");
        self.pipeline
            .process(Incoming {
                body: &body,
                message_id: None,
                correlation_id: None,
                counters: Counters::default(),
                arrival,
                redelivered: arrival == Arrival::Retry,
                exchange: "",
            })
            .await
    }

    /// Place-call requests that reached the simulator.
    fn dialled(&self) -> usize {
        self.sim.attempts().len()
    }

    async fn state(&self, id: &str) -> Option<JobState> {
        self.pipeline.store.get(id).await.expect("memory store")
    }
}

/// The event and its bytes, failing unless the verdict publishes.
fn published(verdict: Verdict) -> (ResultEvent, Vec<u8>) {
    match verdict {
        Verdict::Publish { event, bytes } => (*event, bytes),
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn new_job_is_placed_and_recorded() {
    let h = harness(Faults::default()).await;
    let (event, bytes) = published(h.step(&job("new"), Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Placed);
    assert_eq!(event.attempts, 1);
    assert!(event.conversation_id.is_some());
    assert_eq!(event.phone_number.as_deref(), Some("+14155552671"));
    assert_eq!(h.dialled(), 1);
    assert_eq!(
        h.state("new").await,
        Some(JobState::Decided { event: bytes })
    );
}

#[tokio::test]
async fn a_second_message_with_the_same_id_is_a_duplicate() {
    let h = harness(Faults::default()).await;
    published(h.step(&job("dup"), Arrival::New).await);
    let (event, _) = published(h.step(&job("dup"), Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Duplicate);
    assert_eq!(event.error.map(|e| e.kind).as_deref(), Some("duplicate"));
    assert_eq!(h.dialled(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_arriving_together_are_dialled_once() {
    // Both copies look the job up before either has claimed it: the one that loses the claim
    // must answer `duplicate` (a new message) or wait for the winner's decision (a redelivery),
    // never take the winner's fresh claim for a leftover one and dial again.
    let h = harness(Faults {
        latency_ms: 50,
        ..Faults::default()
    })
    .await;
    for round in 0..20 {
        let id = format!("race-{round}");
        let second = if round % 2 == 0 {
            Arrival::New
        } else {
            Arrival::Retry
        };
        let body = job(&id);
        let (a, b) = tokio::join!(h.step(&body, Arrival::New), h.step(&body, second));
        let (a, b) = (published(a).0, published(b).0);
        let mut outcomes = [a.outcome, b.outcome];
        outcomes.sort_by_key(|o| o.as_str());
        let expected = if second == Arrival::New {
            [Outcome::Duplicate, Outcome::Placed]
        } else {
            [Outcome::Placed, Outcome::Placed]
        };
        assert_eq!(outcomes, expected, "round {round}: {a:?} / {b:?}");
    }
    assert_eq!(h.dialled(), 20, "each job dialled exactly once");
}

#[tokio::test]
async fn a_redelivery_after_the_decision_gets_the_same_event() {
    let h = harness(Faults::default()).await;
    let (_, first) = published(h.step(&job("again"), Arrival::New).await);
    let (event, second) = published(h.step(&job("again"), Arrival::Retry).await);
    assert_eq!(second, first, "the recorded bytes, exactly");
    assert_eq!(event.outcome, Outcome::Placed);
    assert_eq!(h.dialled(), 1);
}

#[tokio::test]
async fn a_job_claimed_by_a_worker_that_stopped_ends_unknown_without_a_call() {
    let h = harness(Faults::default()).await;
    let claimed = h
        .pipeline
        .store
        .try_claim("orphan", "another-worker/1")
        .await
        .expect("claim");
    assert_eq!(claimed, ClaimResult::Claimed);
    let (event, _) = published(h.step(&job("orphan"), Arrival::Retry).await);
    assert_eq!(event.outcome, Outcome::Unknown);
    assert_eq!(event.error.map(|e| e.kind).as_deref(), Some("interrupted"));
    assert_eq!(h.dialled(), 0);
}

#[tokio::test]
async fn an_expired_job_is_not_dialled() {
    let h = harness(Faults::default()).await;
    let mut expired = job("expired");
    expired["expiresAt"] = in_secs(-1).into();
    let (event, _) = published(h.step(&expired, Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Expired);
    assert_eq!(h.dialled(), 0);
}

#[tokio::test]
async fn a_job_not_yet_due_waits_in_a_delay_tier_or_in_process() {
    let h = harness(Faults::default()).await;
    let mut later = job("later");
    later["notBefore"] = in_secs(60).into();
    match h.step(&later, Arrival::New).await {
        Verdict::Delay {
            wait: Delay::AtMost(wait),
            counters,
        } => {
            // Back a little early (it waits the rest then), never late.
            assert!(
                wait <= Duration::from_secs(60) - IN_PROCESS_WAIT_LIMIT / 2,
                "{wait:?}"
            );
            assert!(wait >= Duration::from_secs(50), "{wait:?}");
            assert_eq!(counters, Counters::default());
        }
        other => panic!("expected a delay, got {other:?}"),
    }
    assert_eq!(h.state("later").await, Some(JobState::Waiting));
    assert_eq!(h.dialled(), 0);
    // Back from the tier: still waiting is fine, and it is not a duplicate.
    assert!(matches!(
        h.step(&later, Arrival::Retry).await,
        Verdict::Delay { .. }
    ));

    let mut soon = job("soon");
    let not_before = OffsetDateTime::now_utc() + time::Duration::milliseconds(300);
    soon["notBefore"] = not_before.format(&Rfc3339).expect("formattable").into();
    let (event, _) = published(h.step(&soon, Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Placed);
    assert!(OffsetDateTime::now_utc() >= not_before);
}

#[tokio::test]
async fn a_not_before_beyond_the_horizon_is_rejected_and_recorded() {
    let h = harness(Faults::default()).await;
    let mut far = job("far");
    far["notBefore"] = "9999-12-31T23:59:59Z".into();
    let (event, bytes) = published(h.step(&far, Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Rejected);
    let error = event.error.expect("an error");
    assert_eq!(error.kind, "invalid_field");
    assert!(
        error
            .message
            .starts_with("notBefore 9999-12-31T23:59:59Z is more than 7 days ahead"),
        "{}",
        error.message
    );
    assert_eq!(
        h.state("far").await,
        Some(JobState::Decided { event: bytes })
    );
    assert_eq!(h.dialled(), 0);
}

#[tokio::test]
async fn a_503_is_retried_then_placed() {
    let h = harness(Faults {
        fail_next: vec![503],
        ..Faults::default()
    })
    .await;
    let (event, _) = published(h.step(&job("flaky"), Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Placed);
    assert_eq!(event.attempts, 2);
    assert_eq!(h.dialled(), 2);
}

#[tokio::test]
async fn a_long_retry_after_goes_to_a_delay_tier_with_the_counters() {
    let h = harness(Faults {
        fail_next: vec![503],
        retry_after_secs: 30,
        ..Faults::default()
    })
    .await;
    match h.step(&job("slow"), Arrival::New).await {
        Verdict::Delay {
            wait: Delay::AtLeast(wait),
            counters,
        } => {
            assert!(wait >= Duration::from_secs(30), "{wait:?}");
            assert_eq!(
                counters,
                Counters {
                    attempts: 1,
                    tries: 1
                }
            );
        }
        other => panic!("expected a delay, got {other:?}"),
    }
    assert_eq!(h.state("slow").await, Some(JobState::Waiting));
}

#[tokio::test]
async fn an_ambiguous_answer_ends_unknown_after_one_attempt() {
    let h = harness(Faults {
        fail_next: vec![500],
        ..Faults::default()
    })
    .await;
    let (event, _) = published(h.step(&job("ambiguous"), Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Unknown);
    assert_eq!(event.attempts, 1);
    assert_eq!(h.dialled(), 1);
}

#[tokio::test]
async fn a_permanent_refusal_fails_and_a_replay_tries_again() {
    let h = harness(Faults {
        fail_next: vec![400],
        ..Faults::default()
    })
    .await;
    let (event, _) = published(h.step(&job("refused"), Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Failed);
    assert_eq!(event.error.as_ref().and_then(|e| e.http_status), Some(400));
    assert_eq!(h.dialled(), 1);
    // A new message is a duplicate; a person's replay sets the decision aside.
    let (event, _) = published(h.step(&job("refused"), Arrival::New).await);
    assert_eq!(event.outcome, Outcome::Duplicate);
    let (event, _) = published(h.step(&job("refused"), Arrival::Replay).await);
    assert_eq!(event.outcome, Outcome::Placed);
    assert_eq!(h.dialled(), 2);
}

#[tokio::test]
async fn a_systemic_failure_gives_the_job_back_and_pauses() {
    let mut h = harness(Faults {
        reject_credentials: true,
        ..Faults::default()
    })
    .await;
    let verdict = h.step(&job("systemic"), Arrival::New).await;
    assert!(matches!(verdict, Verdict::Requeue { .. }), "{verdict:?}");
    let failure = h
        .failures
        .try_recv()
        .expect("the consume loop is told to pause");
    assert!(!failure.message.is_empty());
    assert_eq!(h.state("systemic").await, None, "the claim is released");
    assert_eq!(h.dialled(), 0);
}

#[tokio::test]
async fn after_shutdown_starts_a_job_is_given_back_undialled() {
    let h = harness(Faults::default()).await;
    h.shutdown.cancel();
    let verdict = h.step(&job("late"), Arrival::New).await;
    assert!(matches!(verdict, Verdict::Requeue { .. }), "{verdict:?}");
    assert_eq!(h.state("late").await, None);
    assert_eq!(h.dialled(), 0);
}

#[tokio::test]
async fn an_unreadable_body_is_rejected_without_a_claim() {
    let h = harness(Faults::default()).await;
    let verdict = h
        .pipeline
        .process(Incoming {
            body: b"not json",
            message_id: Some("m-1"),
            correlation_id: None,
            counters: Counters::default(),
            arrival: Arrival::New,
            redelivered: false,
            exchange: "",
        })
        .await;
    let (event, _) = published(verdict);
    assert_eq!(event.outcome, Outcome::Rejected);
    assert_eq!(event.job_id.as_deref(), Some("m-1"));
    assert_eq!(h.state("m-1").await, None);
}
