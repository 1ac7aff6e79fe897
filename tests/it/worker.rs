//! The worker against the real RabbitMQ and the simulator: outcomes, dead-lettering, retries.

use std::collections::HashMap;
use std::time::Duration;

use dialer::event::Outcome;
use dialer::sim::Faults;
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::json;

use crate::helpers::{agent, job, spawn_app};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn every_valid_job_is_placed_once() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let n = 40;
    for i in 0..n {
        app.publish_job(&job(&format!("job-{i}"))).await;
    }
    let events = app.events(n, WAIT).await;
    for (event, properties, routing_key) in &events {
        assert_eq!(event.outcome, Outcome::Placed, "{event:?}");
        assert_eq!(routing_key, "dial.placed");
        assert!(event.conversation_id.is_some());
        assert_eq!(event.agent_user_id.as_deref(), Some(agent().id.as_str()));
        assert_eq!(event.phone_number.as_deref(), Some("+14155552671"));
        assert_eq!(event.attempts, 1);
        let job_id = event.job_id.clone().expect("job id");
        assert_eq!(
            event.attributes.as_ref().and_then(|a| a.get("crmRecord")),
            Some(&job_id)
        );
        // correlation_id defaults to the jobId; the event is persistent JSON.
        assert_eq!(
            properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some(job_id.as_str())
        );
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for call in app.sim.placed_calls() {
        *per_job
            .entry(call.attributes["dialerJobId"].clone())
            .or_default() += 1;
    }
    assert_eq!(per_job.len(), n, "every job reached the simulator");
    assert!(
        per_job.values().all(|c| *c == 1),
        "nobody rung twice: {per_job:?}"
    );
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn bad_jobs_are_rejected_dead_lettered_byte_for_byte_and_never_dialled() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let agent_id = agent().id;
    let oversized = format!(
        r#"{{"jobId":"big","agentUserId":"{agent_id}","phoneNumber":"+14155552671","label":"{}"}}"#,
        "x".repeat(70_000)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not-json", b"this is not json".to_vec(), "not_json"),
        ("not-object", b"[1,2,3]".to_vec(), "not_an_object"),
        ("missing", format!(r#"{{"jobId":"m1","agentUserId":"{agent_id}"}}"#).into_bytes(), "missing_field"),
        ("unknown", format!(r#"{{"jobId":"u1","agentUserId":"{agent_id}","phoneNumber":"+14155552671","phone":"x"}}"#).into_bytes(), "unknown_field"),
        ("bad-number", format!(r#"{{"jobId":"n1","agentUserId":"{agent_id}","phoneNumber":"12345"}}"#).into_bytes(), "invalid_field"),
        ("bad-uuid", br#"{"jobId":"g1","agentUserId":"not-a-uuid","phoneNumber":"+14155552671"}"#.to_vec(), "invalid_field"),
        ("oversized", oversized.into_bytes(), "too_large"),
        ("unknown-agent", br#"{"jobId":"e1","agentEmail":"nobody@example.com","phoneNumber":"+14155552671"}"#.to_vec(), "unknown_agent"),
    ];
    for (name, body, _) in &cases {
        let properties = BasicProperties::default()
            .with_message_id((*name).into())
            .with_headers({
                let mut headers = lapin::types::FieldTable::default();
                headers.insert("crm-trace".into(), AMQPValue::LongString("kept".into()));
                headers
            });
        app.publish(body, properties).await;
    }
    let events = app.result_events(cases.len(), WAIT).await;
    let dead = app
        .take(&app.topology.dead_letter_queue, cases.len(), WAIT)
        .await;
    for (name, body, kind) in &cases {
        let event = events
            .iter()
            .find(|e| {
                e.error.as_ref().is_some_and(|err| err.kind == *kind)
                    && dead_for(&dead, name).is_some()
            })
            .unwrap_or_else(|| panic!("{name}: no rejected event of kind {kind} in {events:#?}"));
        assert_eq!(event.outcome, Outcome::Rejected, "{name}");
        assert!(!event.error.as_ref().unwrap().message.is_empty());
        let message = dead_for(&dead, name).unwrap_or_else(|| panic!("{name} not dead-lettered"));
        assert_eq!(&message.delivery.data, body, "{name}: body byte for byte");
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .expect("headers");
        let header = |key: &str| headers.inner().get(key).cloned();
        assert_eq!(
            header("crm-trace"),
            Some(AMQPValue::LongString("kept".into())),
            "{name}: original headers kept"
        );
        assert_eq!(
            header("x-dialer-outcome"),
            Some(AMQPValue::LongString("rejected".into()))
        );
        assert_eq!(
            header("x-dialer-error-kind"),
            Some(AMQPValue::LongString((*kind).into())),
            "{name}"
        );
        for key in [
            "x-dialer-error",
            "x-dialer-attempts",
            "x-dialer-dead-lettered-at",
            "x-dialer-job-id",
        ] {
            assert!(header(key).is_some(), "{name}: {key}");
        }
    }
    let named = |kind: &str| {
        events
            .iter()
            .find(|e| e.error.as_ref().unwrap().kind == kind)
            .unwrap()
            .error
            .clone()
            .unwrap()
            .message
    };
    assert!(
        named("unknown_field").contains("phone"),
        "{}",
        named("unknown_field")
    );
    assert!(
        named("missing_field").contains("phoneNumber"),
        "{}",
        named("missing_field")
    );
    assert!(named("unknown_agent").contains("nobody@example.com"));
    assert!(
        app.sim.attempts().is_empty(),
        "no call attempted for a bad job"
    );

    // Still running: a good job after the bad ones is placed.
    app.publish_job(&job("good-after-bad")).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed);
    app.cleanup().await;
}

fn dead_for<'a>(
    dead: &'a [lapin::message::BasicGetMessage],
    message_id: &str,
) -> Option<&'a lapin::message::BasicGetMessage> {
    dead.iter().find(|m| {
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            == Some(message_id)
    })
}

#[tokio::test]
async fn the_same_job_twice_is_placed_then_duplicate() {
    let app = spawn_app(|_| {}, |_| {}).await;
    app.publish_job(&job("twice")).await;
    let first = app.result_events(1, WAIT).await;
    assert_eq!(first[0].outcome, Outcome::Placed);
    app.publish_job(&job("twice")).await;
    let second = app.result_events(1, WAIT).await;
    assert_eq!(second[0].outcome, Outcome::Duplicate);
    assert_eq!(second[0].job_id.as_deref(), Some("twice"));
    assert_eq!(app.sim.placed_calls().len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn transient_failures_are_retried_until_placed_or_failed() {
    let app = spawn_app(
        |s| {
            s.faults = Faults {
                fail_next: vec![503, 503],
                retry_after_secs: 0,
                ..Faults::default()
            }
        },
        |w| w.max_attempts = std::num::NonZeroU32::new(3).unwrap(),
    )
    .await;
    app.publish_job(&job("flaky")).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed, "{:?}", events[0]);
    assert_eq!(events[0].attempts, 3);
    assert_eq!(app.sim.attempts().len(), 3);

    app.sim.set_faults(Faults {
        error_rate: 1.0,
        error_statuses: vec![503],
        ..Faults::default()
    });
    app.publish_job(&job("down")).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Failed, "{:?}", events[0]);
    assert_eq!(events[0].attempts, 3, "DIALER_MAX_ATTEMPTS");
    let error = events[0].error.clone().expect("error");
    assert_eq!(error.http_status, Some(503));
    assert!(error.correlation_id.is_some());
    let dead = app.take(&app.topology.dead_letter_queue, 1, WAIT).await;
    assert_eq!(
        dead[0]
            .delivery
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-dialer-outcome"),
        Some(&AMQPValue::LongString("failed".into()))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn ambiguous_answers_end_unknown_after_exactly_one_attempt() {
    let app = spawn_app(
        |s| {
            s.faults = Faults {
                fail_next: vec![504],
                ..Faults::default()
            }
        },
        |w| w.genesys.timeout = Duration::from_millis(500),
    )
    .await;
    app.publish_job(&job("gateway-timeout")).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Unknown, "{:?}", events[0]);
    assert_eq!(app.sim.attempts().len(), 1);

    app.sim.set_faults(Faults {
        hang_next: 1,
        ..Faults::default()
    });
    app.publish_job(&job("hangs")).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Unknown, "{:?}", events[0]);
    assert_eq!(events[0].error.as_ref().unwrap().kind, "timeout");
    assert_eq!(app.sim.attempts().len(), 2, "one attempt for the hung job");
    assert_eq!(
        app.take(&app.topology.dead_letter_queue, 2, WAIT)
            .await
            .len(),
        2
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_429_stops_every_request_for_retry_after() {
    let app = spawn_app(
        |s| {
            s.faults = Faults {
                fail_next: vec![429],
                retry_after_secs: 2,
                ..Faults::default()
            }
        },
        // Requests 200 ms apart: none is on the wire when the 429 comes back.
        |w| {
            w.rate_limit = dialer::config::Rate::new(5, Duration::from_secs(1)).unwrap();
            w.rate_burst = std::num::NonZeroU32::new(1).unwrap();
        },
    )
    .await;
    for i in 0..5 {
        app.publish_job(&job(&format!("limited-{i}"))).await;
    }
    let events = app.result_events(5, WAIT).await;
    assert!(
        events.iter().all(|e| e.outcome == Outcome::Placed),
        "{events:#?}"
    );
    let attempts = app.sim.attempts();
    let limited = attempts.iter().find(|a| a.status == 429).expect("one 429");
    let after: Vec<_> = app
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.at_ms > limited.at_ms && r.path.starts_with("/api/v2"))
        .collect();
    let first_after = after.first().expect("requests after the 429");
    // Requests already on the wire when the 429 arrived cannot be recalled; the 429 is the
    // first answer here, so every later request must wait out Retry-After.
    assert!(
        first_after.at_ms - limited.at_ms >= 2000,
        "a request {} ms after the 429",
        first_after.at_ms - limited.at_ms
    );
    let limited_event = events
        .iter()
        .find(|e| e.attempts == 2)
        .expect("the limited job counts the 429 as an attempt");
    assert_eq!(limited_event.outcome, Outcome::Placed);
    app.cleanup().await;
}

#[tokio::test]
async fn expired_jobs_are_not_dialled_and_not_before_is_honoured() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let mut expired = job("expired");
    expired["expiresAt"] = json!("2020-01-01T00:00:00Z");
    app.publish_job(&expired).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Expired);
    assert!(app.sim.attempts().is_empty());
    assert_eq!(
        app.depth(&app.topology.dead_letter_queue).await,
        0,
        "expired jobs are acked"
    );

    let not_before = time::OffsetDateTime::now_utc() + Duration::from_secs(3);
    let mut later = job("later");
    later["notBefore"] = json!(crate::helpers::rfc3339(not_before));
    app.publish_job(&later).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed);
    crate::helpers::assert_placed_not_before(&app.sim.placed_calls()[0], not_before);
    app.cleanup().await;
}

#[tokio::test]
async fn refused_credentials_pause_the_worker_without_losing_a_job() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let readiness = app.worker.as_ref().unwrap().readiness.clone();
    app.sim.set_faults(Faults {
        reject_credentials: true,
        ..Faults::default()
    });
    for i in 0..5 {
        app.publish_job(&job(&format!("paused-{i}"))).await;
    }
    crate::helpers::wait_until(WAIT, "the worker reports not ready", || {
        let ready = readiness.is_ready();
        async move { !ready }
    })
    .await;
    // Every job is given back to the queue, none dead-lettered, no event published.
    crate::helpers::wait_until(WAIT, "all 5 jobs are back in the queue", || async {
        app.depth(&app.topology.jobs_queue).await == 5
    })
    .await;
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);
    assert_eq!(app.depth(&app.events_queue).await, 0);
    assert!(app.sim.placed_calls().is_empty());
    assert!(
        !readiness.is_ready(),
        "still paused while the credentials are refused"
    );

    app.sim.set_faults(Faults::default());
    let events = app.result_events(5, Duration::from_secs(60)).await;
    assert!(
        events.iter().all(|e| e.outcome == Outcome::Placed),
        "{events:#?}"
    );
    assert_eq!(app.sim.placed_calls().len(), 5);
    crate::helpers::wait_until(WAIT, "ready again", || {
        let ready = readiness.is_ready();
        async move { ready }
    })
    .await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_rate_limit_holds_in_every_window() {
    let sim = crate::helpers::spawn_sim(|_| {}).await;
    let mut settings = crate::helpers::run_settings(&sim).await;
    let (rate, burst) = (10u32, 2u32);
    settings.rate_limit = dialer::config::Rate::new(rate, Duration::from_secs(1)).unwrap();
    settings.rate_burst = std::num::NonZeroU32::new(burst).unwrap();
    let app = crate::helpers::TestApp::connect(sim, settings).await;
    // A backlog before the worker starts, so the limiter is what paces it.
    let n = 40;
    for i in 0..n {
        app.publish_job(&job(&format!("paced-{i}"))).await;
    }
    let app = app.start_worker().await;
    let events = app.result_events(n, Duration::from_secs(30)).await;
    assert!(events.iter().all(|e| e.outcome == Outcome::Placed));
    let arrivals: Vec<u64> = app
        .sim
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/v2"))
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(arrivals.len(), n);
    // Any window [t_i, t_j] holds at most rate·t + burst requests. One request of slack:
    // arrival times at the simulator carry a few ms of network and scheduling jitter that
    // can pull two paced requests closer together than they left.
    for i in 0..arrivals.len() {
        for j in i + 1..arrivals.len() {
            let window_s = (arrivals[j] - arrivals[i]) as f64 / 1000.0;
            let count = (j - i + 1) as f64;
            let allowed = f64::from(rate) * window_s + f64::from(burst) + 1.0;
            assert!(
                count <= allowed,
                "{count} requests in {window_s:.3} s (allowed {allowed:.1})"
            );
        }
    }
    let span_s = (arrivals[n - 1] - arrivals[0]) as f64 / 1000.0;
    let expected = (n as f64 - f64::from(burst)) / f64::from(rate);
    assert!(
        span_s >= expected * 0.9,
        "paced: {span_s:.2} s for {n} requests (expected ~{expected:.1} s)"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn real_events_of_every_outcome_match_the_documented_schema() {
    let app = spawn_app(|_| {}, |w| w.genesys.timeout = Duration::from_millis(500)).await;
    app.publish_job(&job("schema-placed")).await;
    app.publish_job(&job("schema-placed")).await; // duplicate
    app.publish(b"{not json", BasicProperties::default()).await; // rejected, jobId null
    let mut expired = job("schema-expired");
    expired["expiresAt"] = json!("2020-01-01T00:00:00Z");
    app.publish_job(&expired).await;
    let mut events = app.events(4, WAIT).await;
    app.sim.set_faults(Faults {
        fail_next: vec![404],
        ..Faults::default()
    });
    app.publish_job(&job("schema-failed")).await;
    events.extend(app.events(1, WAIT).await);
    app.sim.set_faults(Faults {
        fail_next: vec![502],
        ..Faults::default()
    });
    app.publish_job(&job("schema-unknown")).await;
    events.extend(app.events(1, WAIT).await);

    let schema = crate::schemas::event_schema();
    let mut seen = std::collections::HashSet::new();
    for (event, _, routing_key) in &events {
        let value = serde_json::to_value(event).unwrap();
        let errors = crate::schemas::schema_errors(&schema, &value);
        assert!(errors.is_empty(), "{value:#}: {errors:?}");
        assert_eq!(*routing_key, format!("dial.{}", event.outcome.as_str()));
        seen.insert(event.outcome);
    }
    for outcome in Outcome::ALL {
        assert!(
            seen.contains(&outcome),
            "no {outcome:?} event among {events:#?}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_long_not_before_waits_in_a_delay_queue_not_in_the_worker() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let not_before = time::OffsetDateTime::now_utc() + Duration::from_secs(8);
    let mut later = job("much-later");
    later["notBefore"] = json!(crate::helpers::rfc3339(not_before));
    app.publish_job(&later).await;
    // 8 s is past the in-process limit: the job waits in the 5 s tier, then in process.
    let (_, tier) = app.topology.delay_queues[1].clone();
    crate::helpers::wait_until(WAIT, "the job sits in the 5 s delay queue", || async {
        app.depth(&tier).await == 1
    })
    .await;
    assert_eq!(
        app.depth(&app.topology.jobs_queue).await,
        0,
        "acked, not held unacked"
    );
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed);
    crate::helpers::assert_placed_not_before(&app.sim.placed_calls()[0], not_before);
    app.cleanup().await;
}

#[tokio::test]
async fn metrics_and_probes_are_served() {
    let app = spawn_app(|_| {}, |_| {}).await;
    app.publish_job(&job("observed")).await;
    app.publish(b"nonsense", BasicProperties::default()).await;
    app.result_events(2, WAIT).await;
    let addr = app.worker.as_ref().unwrap().metrics_addr;
    let get = |path: &'static str| async move {
        let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await, (200, "ready\n".to_owned()));
    // The outcome counter is bumped after the ack, which may follow the event by a moment.
    crate::helpers::wait_until(WAIT, "both jobs are counted", || async {
        let body = without_prefix_label(&get("/metrics").await.1);
        body.contains(r#"dialer_jobs_completed_total{outcome="rejected"}"#)
            && body.contains(r#"dialer_jobs_completed_total{outcome="placed"}"#)
    })
    .await;
    let raw = get("/metrics").await.1;
    // Every series carries the constant `prefix` label (the prefix of the first worker this test
    // process started: the recorder is global), so alerts can tell deployments apart.
    for line in raw.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.contains("{prefix=\""), "no prefix label: {line}");
    }
    let body = without_prefix_label(&raw);
    for name in [
        "dialer_jobs_received_total",
        "dialer_jobs_in_flight",
        "dialer_job_duration_seconds_bucket",
        "dialer_genesys_requests_total{operation=\"place_call\",status=\"200\"}",
        "dialer_genesys_request_duration_seconds_bucket",
        "dialer_rate_limiter_wait_seconds_bucket",
        "dialer_token_renewals_total{result=\"ok\"}",
        "dialer_broker_connected 1",
        "dialer_events_published_total",
        "dialer_build_info{version=",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    // Every exported metric is described, and no label carries a job id or a phone number.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            body.contains(&format!("# HELP {family} ")),
            "{family} has no description"
        );
        assert!(
            !line.contains("observed") && !line.contains("+1415"),
            "{line}"
        );
    }
    app.cleanup().await;
}

/// The exposition without the constant `prefix` label, so samples compare by their own labels.
fn without_prefix_label(body: &str) -> String {
    body.lines()
        .map(|line| match line.find("prefix=\"") {
            Some(start) => {
                let value_end = start + "prefix=\"".len();
                let end = value_end + line[value_end..].find('"').map_or(0, |i| i + 1);
                match (&line[..start], &line[end..]) {
                    (head, tail) if head.ends_with('{') && tail.starts_with('}') => {
                        format!("{}{}", &head[..head.len() - 1], &tail[1..])
                    }
                    (head, tail) => format!("{head}{}", tail.trim_start_matches(',')),
                }
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_deleted_dead_letter_queue_is_redeclared_and_the_job_still_lands_there() {
    let app = spawn_app(|_| {}, |_| {}).await;
    app.channel
        .queue_delete(
            app.topology.dead_letter_queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    app.publish(
        b"not a job",
        BasicProperties::default().with_message_id("lost-1".into()),
    )
    .await;
    // The first try cannot dead-letter (no queue takes the message): the job is requeued, the
    // worker reconnects and redeclares its topology, and the second try lands it.
    crate::helpers::wait_until(
        WAIT,
        "the worker redeclares the dead-letter queue",
        || async {
            // A passive declare of a missing queue closes its channel: use a throwaway one.
            let channel = app.connection.create_channel().await.unwrap();
            let exists = dialer::broker::queue_depth(&channel, &app.topology.dead_letter_queue)
                .await
                .is_ok();
            let _ = channel.close(200, "checked".into()).await;
            exists
        },
    )
    .await;
    let dead = app.take(&app.topology.dead_letter_queue, 1, WAIT).await;
    assert_eq!(dead[0].delivery.data, b"not a job");
    // Each try published its `rejected` event before the dead-letter step failed: the event
    // repeats (consumers de-duplicate by jobId), it never contradicts itself.
    app.publish_job(&job("after-the-hiccup")).await;
    let mut rejected = 0;
    loop {
        let event = app.result_events(1, WAIT).await.remove(0);
        if event.outcome == Outcome::Placed {
            assert_eq!(event.job_id.as_deref(), Some("after-the-hiccup"));
            break;
        }
        assert_eq!(event.outcome, Outcome::Rejected, "{event:?}");
        assert_eq!(event.job_id.as_deref(), Some("lost-1"));
        rejected += 1;
        assert!(rejected <= 10, "the bad job keeps cycling");
    }
    assert!(rejected >= 1);
    app.cleanup().await;
}

#[tokio::test]
async fn the_event_also_goes_to_reply_to_with_the_jobs_correlation_id() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let reply_queue = format!("{}.crm-replies", app.settings.broker.prefix);
    app.channel
        .queue_declare(
            reply_queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let properties = BasicProperties::default()
        .with_reply_to(reply_queue.as_str().into())
        .with_correlation_id("crm-request-77".into());
    app.publish(
        &serde_json::to_vec(&job("with-reply-to")).unwrap(),
        properties,
    )
    .await;
    let (event, properties, _) = app.events(1, WAIT).await.remove(0);
    assert_eq!(event.outcome, Outcome::Placed);
    let correlation = |p: &BasicProperties| p.correlation_id().as_ref().map(|c| c.to_string());
    assert_eq!(correlation(&properties).as_deref(), Some("crm-request-77"));
    let replied = app.take(&reply_queue, 1, WAIT).await.remove(0);
    assert_eq!(
        dialer::event::ResultEvent::from_json(&replied.delivery.data).unwrap(),
        event,
        "the same event on the reply_to queue"
    );
    assert_eq!(
        correlation(&replied.delivery.properties).as_deref(),
        Some("crm-request-77")
    );
    app.channel
        .queue_delete(reply_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn jobs_published_to_the_jobs_exchange_are_consumed_too() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let confirm = app
        .channel
        .basic_publish(
            app.topology.jobs_exchange.as_str().into(),
            dialer::broker::JOBS_ROUTING_KEY.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &serde_json::to_vec(&job("via-exchange")).unwrap(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "routed to the jobs queue"
    );
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].job_id.as_deref(), Some("via-exchange"));
    assert_eq!(events[0].outcome, Outcome::Placed);
    app.cleanup().await;
}
