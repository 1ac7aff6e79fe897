//! The hard edges of the Genesys side, against a real RabbitMQ and the simulator: redirects
//! not followed, absurd numbers that panic nothing, answers that are not ids, outside text
//! scrubbed, no request after a job's `expiresAt`, and the circuit breaker through an outage.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dialer::event::Outcome;
use dialer::genesys::{CreateCallRequest, ErrorClass, GenesysError};
use dialer::sim::Faults;
use lapin::types::AMQPValue;
use time::OffsetDateTime;

use crate::helpers::{TestApp, agent_id, client, job, rfc3339, spawn_app, spawn_sim, wait_until};

const WAIT: Duration = Duration::from_secs(30);

fn call() -> CreateCallRequest {
    CreateCallRequest {
        phone_number: "+14155552671".into(),
        ..Default::default()
    }
}

/// `/metrics` of the app's worker.
async fn metrics(app: &TestApp) -> String {
    let addr = app.worker.as_ref().expect("running").metrics_addr;
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body")
}

/// The job ids (`dialerJobId` attribute) of the place-call requests the simulator received.
fn attempted_jobs(app: &TestApp) -> Vec<(String, OffsetDateTime)> {
    app.sim
        .attempts()
        .into_iter()
        .filter_map(|a| {
            let id = a.attributes?.get("dialerJobId")?.clone();
            let at = OffsetDateTime::parse(&a.at, &time::format_description::well_known::Rfc3339)
                .expect("RFC 3339");
            Some((id, at))
        })
        .collect()
}

fn expiring_job(id: &str, expires_at: OffsetDateTime) -> serde_json::Value {
    let mut job = job(id);
    job["expiresAt"] = rfc3339(expires_at).into();
    job
}

#[tokio::test]
async fn a_redirect_is_never_followed_and_ends_unknown() {
    // The client alone: one request, classified ambiguous for the place-call POST.
    let sim = spawn_sim(|s| {
        s.faults = Faults {
            redirect_next: 1,
            ..Faults::default()
        }
    })
    .await;
    let answer = client(&sim)
        .place_call(agent_id(), &call(), None, None)
        .await;
    assert_eq!(answer.requests, 1);
    let error = answer.result.expect_err("a redirect is an error");
    assert!(
        matches!(
            &error,
            GenesysError::Redirect {
                status: 307,
                may_have_acted: true,
                location: Some(_)
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.class(), ErrorClass::Ambiguous);
    assert_eq!(sim.attempts().len(), 1, "one POST, not re-sent");
    sim.shutdown().await;

    // The worker: outcome unknown after exactly one POST.
    let app = spawn_app(
        |s| {
            s.faults = Faults {
                redirect_next: 1,
                ..Faults::default()
            }
        },
        |_| {},
    )
    .await;
    app.publish_job(&job("redirected")).await;
    let event = app.result_events(1, WAIT).await.remove(0);
    assert_eq!(event.outcome, Outcome::Unknown, "{event:?}");
    assert_eq!(event.attempts, 1);
    let error = event.error.expect("error");
    assert_eq!(
        (error.kind.as_str(), error.http_status),
        ("redirect", Some(307))
    );
    assert_eq!(app.sim.attempts().len(), 1, "one POST per attempt");
    assert!(app.sim.placed_calls().is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn huge_numbers_from_genesys_panic_nothing_and_every_job_ends() {
    // expires_in of u64::MAX seconds: the token is believed for 24 h, and calls are placed.
    let mut app = spawn_app(
        |s| {
            s.faults = Faults {
                token_ttl_secs: Some(u64::MAX),
                ..Faults::default()
            }
        },
        |_| {},
    )
    .await;
    app.publish_job(&job("long-token")).await;
    let event = app.result_events(1, WAIT).await.remove(0);
    assert_eq!(event.outcome, Outcome::Placed, "{event:?}");

    // Retry-After of u64::MAX seconds: capped at an hour, which opens the breaker (no more
    // consumption, not ready) and sends each job's retry past its expiresAt.
    app.sim.set_faults(Faults {
        fail_next: vec![429],
        retry_after_secs: u64::MAX,
        ..Faults::default()
    });
    let expires = OffsetDateTime::now_utc() + Duration::from_secs(60);
    let ids: Vec<String> = (0..4).map(|i| format!("huge-retry-after-{i}")).collect();
    // One job meets the 429 alone (a request already on the wire cannot be recalled, so
    // jobs sent together could still be placed); the others arrive during the pause.
    app.publish_job(&expiring_job(&ids[0], expires)).await;
    let readiness = app.worker.as_ref().unwrap().readiness.clone();
    wait_until(WAIT, "the long pause makes the worker not ready", || {
        let paused = readiness.paused.load(Ordering::Relaxed);
        async move { paused }
    })
    .await;
    for id in &ids[1..] {
        app.publish_job(&expiring_job(id, expires)).await;
    }
    // (Metrics are process-wide and tests run side by side: only counters' presence is read.)
    let body = metrics(&app).await;
    assert!(
        has_series(
            &body,
            "dialer_circuit_opened_total",
            r#"reason="rate_limited""#
        ),
        "{body}"
    );
    // The pause holds: after the 429 nothing more was sent.
    let attempts = app.sim.attempts();
    assert_eq!(
        attempts.len(),
        2,
        "the placed call and the 429: {attempts:?}"
    );
    assert!(!readiness.is_ready());
    // Nothing is held in the worker: the others wait, ready, in the queue.
    wait_until(WAIT, "the other jobs wait in the queue", || async {
        app.depth(&app.topology.jobs_queue).await == 3
    })
    .await;
    assert_eq!(app.sim.attempts().len(), 2, "still nothing sent");

    // The rate-limited job ended `expired` at once (its retry would come after expiresAt). A
    // new process (no pause inherited) takes the others: every job ends with exactly one event.
    app.stop_worker().await;
    app.sim.set_faults(Faults::default());
    let app = app.start_worker().await;
    let events = app.result_events(ids.len(), WAIT).await;
    let seen: BTreeSet<String> = events.iter().filter_map(|e| e.job_id.clone()).collect();
    assert_eq!(
        seen,
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "{events:?}"
    );
    for event in &events {
        let expected = if event.job_id.as_deref() == Some(ids[0].as_str()) {
            Outcome::Expired
        } else {
            Outcome::Placed
        };
        assert_eq!(event.outcome, expected, "{event:?}");
    }
    let body = metrics(&app).await;
    let panics = body
        .lines()
        .find(|line| line.starts_with("dialer_job_panics_total"))
        .unwrap_or_else(|| panic!("no dialer_job_panics_total in\n{body}"));
    assert!(panics.ends_with(" 0"), "{panics}");
    app.cleanup().await;
}

#[tokio::test]
async fn answers_that_are_not_ids_end_unknown_with_a_bounded_message() {
    let app = spawn_app(
        |s| {
            s.faults = Faults {
                answer_id: Some(String::new()),
                ..Faults::default()
            }
        },
        // A debug-build simulator takes seconds to write a 20 MB answer on a busy machine.
        |w| w.genesys.timeout = Duration::from_secs(30),
    )
    .await;
    app.publish_job(&job("empty-id")).await;
    let event = app.result_events(1, WAIT).await.remove(0);
    assert_eq!(event.outcome, Outcome::Unknown, "{event:?}");
    assert_eq!(event.conversation_id, None);
    assert_eq!(event.error.as_ref().unwrap().kind, "unreadable_answer");

    // A 20 MB id: the body is read up to the cap, the event stays small.
    app.sim.set_faults(Faults {
        answer_id_bytes: 20_000_000,
        ..Faults::default()
    });
    app.publish_job(&job("huge-id")).await;
    let event = app
        .result_events(1, Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(event.outcome, Outcome::Unknown, "{event:?}");
    let size = event.to_json().len();
    assert!(size < 4096, "event of {size} bytes");
    assert!(
        event
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("larger than"),
        "{event:?}"
    );

    // Error text that echoes a token: scrubbed before events and dead-letter headers.
    let secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLXZhbHVlLXRoYXQtbXVzdC1ub3QtbGVhaw";
    app.sim.set_faults(Faults {
        fail_next: vec![400],
        error_message: Some(format!(
            "Bad request; Authorization: Bearer {secret} {}",
            "padding ".repeat(10_000)
        )),
        ..Faults::default()
    });
    app.publish_job(&job("echoes-a-token")).await;
    let event = app.result_events(1, WAIT).await.remove(0);
    assert_eq!(event.outcome, Outcome::Failed, "{event:?}");
    let message = &event.error.as_ref().unwrap().message;
    assert!(!message.contains("eyJ"), "{message}");
    assert!(message.contains("[redacted]"), "{message}");
    assert!(message.len() < 1024, "{} bytes", message.len());
    let dead = app.take(&app.topology.dead_letter_queue, 3, WAIT).await;
    for message in dead {
        let headers = message.delivery.properties.headers().clone().unwrap();
        if let Some(AMQPValue::LongString(text)) = headers.inner().get("x-dialer-error") {
            let text = text.to_string();
            assert!(!text.contains("eyJ") && text.len() < 1024, "{text}");
        }
    }
    app.cleanup().await;
}

#[tokio::test]
async fn no_request_reaches_genesys_after_a_jobs_expires_at() {
    let app = spawn_app(|_| {}, |_| {}).await;
    // Case 1: a Retry-After (8 s) longer than both the in-process limit and the jobs' expiry.
    // Case 2: a Retry-After (3 s) short enough to wait in process, but past the expiry.
    for (case, retry_after, expires_in) in [(1, 8, 3_000), (2, 3, 1_500)] {
        app.sim.set_faults(Faults {
            fail_next: vec![429],
            retry_after_secs: retry_after,
            ..Faults::default()
        });
        let opener = format!("opener-{case}");
        app.publish_job(&job(&opener)).await;
        wait_until(WAIT, "the 429 was answered", || {
            let seen = app.sim.attempts().iter().any(|a| a.status == 429);
            async move { seen }
        })
        .await;
        let expires = OffsetDateTime::now_utc() + Duration::from_millis(expires_in);
        let ids: Vec<String> = (0..4).map(|i| format!("expiring-{case}-{i}")).collect();
        for id in &ids {
            app.publish_job(&expiring_job(id, expires)).await;
        }
        let events = app.result_events(4, WAIT).await;
        for event in &events {
            assert_eq!(event.outcome, Outcome::Expired, "{event:?}");
        }
        let attempted = attempted_jobs(&app);
        for (id, at) in &attempted {
            if ids.contains(id) {
                assert!(*at < expires, "{id} was sent at {at}, after {expires}");
            }
        }
        assert!(
            !attempted.iter().any(|(id, _)| ids.contains(id)),
            "none of the expiring jobs was sent: {attempted:?}"
        );
        app.sim.set_faults(Faults::default());
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_genesys_outage_pauses_dialling_and_the_queue_survives_it() {
    // A minute of outage: long enough for the probes to reach their longest backoff several
    // times over, so jobs that kept being tried would have burnt every attempt by the end.
    const OUTAGE: Duration = Duration::from_secs(60);
    const JOBS: usize = 40;
    let app = spawn_app(
        |_| {},
        |w| {
            w.max_attempts = std::num::NonZeroU32::new(3).unwrap();
            // Far shorter than the outage: a paused worker must not look wedged.
            w.liveness_timeout = Duration::from_secs(1);
        },
    )
    .await;
    app.sim.set_faults(Faults {
        outage_status: Some(503),
        retry_after_secs: 1,
        ..Faults::default()
    });
    let outage_started = tokio::time::Instant::now();
    for i in 0..JOBS {
        app.publish_job(&job(&format!("outage-{i}"))).await;
    }
    let readiness = app.worker.as_ref().unwrap().readiness.clone();
    wait_until(
        WAIT,
        "the breaker opens and the worker is not ready",
        || {
            let paused = readiness.paused.load(Ordering::Relaxed);
            async move { paused }
        },
    )
    .await;
    let body = metrics(&app).await;
    assert!(
        has_series(&body, "dialer_circuit_opened_total", r#"reason="outage""#),
        "{body}"
    );
    // Through the rest of the outage the worker is paused, not wedged: /healthz stays ok.
    let addr = app.worker.as_ref().unwrap().metrics_addr;
    while tokio::time::Instant::now() < outage_started + OUTAGE {
        let response = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert_eq!(status, 200, "{}", response.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts_during_outage = app.sim.attempts().len();
    app.sim.set_faults(Faults::default());

    let events = app.result_events(JOBS, Duration::from_secs(90)).await;
    let failed = events
        .iter()
        .filter(|e| e.outcome != Outcome::Placed)
        .count();
    let placed = events.len() - failed;
    eprintln!(
        "outage of {OUTAGE:?}: {attempts_during_outage} place-call requests during it, {placed} placed, {failed} not"
    );
    assert!(failed <= 5, "at most a handful fail: {failed}");
    assert_eq!(app.sim.placed_calls().len(), placed, "each placed once");
    assert!(
        attempts_during_outage < JOBS,
        "jobs did not burn their attempts during the outage: {attempts_during_outage}"
    );
    assert!(readiness.is_ready(), "resumed by itself");
    app.cleanup().await;
}

/// Whether the exposition has a series of `metric` carrying `label` (among the others, such as
/// the constant `prefix`, in whatever order the exporter writes them).
fn has_series(body: &str, metric: &str, label: &str) -> bool {
    body.lines()
        .any(|line| line.starts_with(&format!("{metric}{{")) && line.contains(label))
}
