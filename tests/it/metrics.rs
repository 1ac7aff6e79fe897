//! The metrics a worker exports, read from a `dialer run` child of each test's own (metrics are
//! process-wide, so exact counts need a process per test): the queue wait of first deliveries
//! from the job's millisecond creation time, retry waits apart, terminal outcomes apart from
//! deferred deliveries, `dialer_consuming` through a pause, and a status label that tells the truth.

use std::time::Duration;

use dialer::broker::headers::{TIMESTAMP_IN_MS, now_ms};
use dialer::event::Outcome;
use dialer::sim::Faults;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::children::ChildWorker;
use crate::helpers::{TestApp, job, rfc3339, run_settings, spawn_sim};

const WAIT: Duration = Duration::from_secs(30);

/// A free loopback port for a child's `/metrics` (the child binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A test app without an in-process worker, and a child worker on it serving `/metrics` on
/// the returned port.
async fn app_with_child(label: &str) -> (TestApp, ChildWorker, u16) {
    let sim = spawn_sim(|_| {}).await;
    let settings = run_settings(&sim).await;
    let app = TestApp::connect(sim, settings).await;
    let port = free_port();
    let child = ChildWorker::spawn_with(
        &app,
        label,
        &[
            ("DIALER_METRICS_ADDR", format!("127.0.0.1:{port}")),
            ("DIALER_DECISIONS", "memory".to_owned()),
        ],
    );
    (app, child, port)
}

/// The child's exposition (empty while it does not answer yet).
async fn scrape(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the sample `name` whose labels include every one of `labels`; None if absent.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Waits until the child's sample `name{labels}` equals `value`; returns that scrape.
async fn wait_for_sample(port: u16, name: &str, labels: &[&str], value: f64) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = scrape(port).await;
        if sample(&text, name, labels) == Some(value) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} never became {value}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Properties of a job created `age` ago: `timestamp_in_ms` says so, and the AMQP `timestamp`
/// (whole seconds) is set `seconds_age` ago, so a test can tell which one was used.
fn created(age: Duration, seconds_age: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    let at = now_ms() - u64::try_from(age.as_millis()).expect("small");
    headers.insert(
        TIMESTAMP_IN_MS.into(),
        AMQPValue::LongLongInt(i64::try_from(at).expect("fits")),
    );
    let seconds = time::OffsetDateTime::now_utc().unix_timestamp() as u64 - seconds_age;
    BasicProperties::default()
        .with_timestamp(seconds)
        .with_headers(headers)
}

#[tokio::test]
async fn queue_wait_counts_first_deliveries_from_the_millisecond_header_and_retries_apart() {
    let (app, mut child, port) = app_with_child("queue-wait").await;
    wait_for_sample(port, "dialer_consuming", &[], 1.0).await;
    // Created 1.5 s ago by its millisecond header; the AMQP timestamp says 100 s: the header wins.
    let now_job = job("waited-1500ms");
    app.publish(
        &serde_json::to_vec(&now_job).expect("json"),
        created(Duration::from_millis(1500), 100),
    )
    .await;
    // Not before 6 s from now: sent to the 1 s delay tier, then waits the rest in process.
    let mut later = job("sent-to-a-delay-tier");
    later["notBefore"] = json!(rfc3339(
        time::OffsetDateTime::now_utc() + Duration::from_secs(6)
    ));
    app.publish(
        &serde_json::to_vec(&later).expect("json"),
        created(Duration::ZERO, 0),
    )
    .await;
    let events = app.result_events(2, WAIT).await;
    assert!(
        events.iter().all(|e| e.outcome == Outcome::Placed),
        "{events:?}"
    );

    let text = wait_for_sample(
        port,
        "dialer_jobs_completed_total",
        &["outcome=\"placed\""],
        2.0,
    )
    .await;
    let get = |name: &str, labels: &[&str]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    // Two first deliveries measured; the return from the delay tier is not one of them.
    assert_eq!(get("dialer_queue_wait_seconds_count", &[]), 2.0);
    let waited = get("dialer_queue_wait_seconds_sum", &[]);
    assert!(
        (1.5..20.0).contains(&waited),
        "from the millisecond header, not the 100 s of the AMQP timestamp: {waited}"
    );
    // The return from the delay tier is measured apart, from when the worker sent it there.
    assert_eq!(get("dialer_retry_wait_seconds_count", &[]), 1.0);
    let retry = get("dialer_retry_wait_seconds_sum", &[]);
    assert!(
        (0.9..20.0).contains(&retry),
        "at least the 1 s tier: {retry}"
    );
    // Buckets reach hours.
    assert_eq!(
        get("dialer_queue_wait_seconds_bucket", &["le=\"43200\""]),
        2.0
    );
    // The delay is a deferral, not an outcome: completed counts each job once.
    assert_eq!(
        get("dialer_jobs_deferred_total", &["reason=\"delayed\""]),
        1.0
    );
    assert_eq!(
        get("dialer_jobs_deferred_total", &["reason=\"requeued\""]),
        0.0
    );
    assert_eq!(get("dialer_jobs_received_total", &[]), 3.0);
    assert!(
        !text.contains("dialer_jobs_completed_total{outcome=\"delayed\"")
            && !text
                .lines()
                .any(|l| l.starts_with("dialer_jobs_completed_total")
                    && (l.contains("\"delayed\"") || l.contains("\"requeued\""))),
        "{text}"
    );
    // The process metrics are there, with the deployment's prefix.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(get(name, &["prefix=\""]) > 0.0, "{name}");
    }
    child.signal("TERM").await;
    assert!(child.wait_exit(WAIT).await.success());
    app.cleanup().await;
}

#[tokio::test]
async fn a_systemic_pause_shows_connected_but_not_consuming_and_requeues_are_deferred() {
    let (app, mut child, port) = app_with_child("consuming").await;
    wait_for_sample(port, "dialer_consuming", &[], 1.0).await;
    // Every token is refused from now on: the job is given back and consumption pauses.
    app.sim.set_faults(Faults {
        reject_credentials: true,
        ..Faults::default()
    });
    app.publish(
        &serde_json::to_vec(&job("paused")).expect("json"),
        created(Duration::from_millis(200), 0),
    )
    .await;
    let text = wait_for_sample(port, "dialer_consuming", &[], 0.0).await;
    assert_eq!(sample(&text, "dialer_broker_connected", &[]), Some(1.0));
    wait_for_sample(
        port,
        "dialer_jobs_deferred_total",
        &["reason=\"requeued\""],
        1.0,
    )
    .await;
    let text = scrape(port).await;
    let ended: f64 = text
        .lines()
        .filter(|l| l.starts_with("dialer_jobs_completed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ended, 0.0, "a requeue ends nothing:\n{text}");

    // Credentials accepted again: consuming again, and the redelivered job is placed. Its
    // queue wait was recorded on the first delivery only.
    app.sim.set_faults(Faults::default());
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed);
    let text = wait_for_sample(
        port,
        "dialer_jobs_completed_total",
        &["outcome=\"placed\""],
        1.0,
    )
    .await;
    assert_eq!(sample(&text, "dialer_consuming", &[]), Some(1.0));
    assert_eq!(
        sample(&text, "dialer_queue_wait_seconds_count", &[]),
        Some(1.0),
        "the redelivery is not a second wait:\n{text}"
    );
    assert!(sample(&text, "dialer_jobs_received_total", &[]).is_some_and(|n| n >= 2.0));
    child.signal("TERM").await;
    assert!(child.wait_exit(WAIT).await.success());
    app.cleanup().await;
}

#[tokio::test]
async fn a_status_outside_every_class_is_labelled_other_not_5xx() {
    // Tokens from the simulator; the API answers `799` to anything.
    let sim = spawn_sim(|_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0; 64 * 1024];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 799 Odd\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    )
                    .await;
            });
        }
    });
    let handle = dialer::metrics::install("dialer");
    let mut settings = crate::helpers::genesys_settings(&sim);
    settings.api_base = format!("http://{api}").parse().expect("url");
    let client = dialer::genesys::GenesysClient::new(&settings, crate::helpers::open_gate())
        .expect("client");
    let answer = client.find_user_by_email("agent1@example.com", None).await;
    assert!(
        answer.result.is_err(),
        "a 799 is no answer: {:?}",
        answer.result
    );
    let text = handle.render();
    let odd = text
        .lines()
        .find(|l| l.starts_with("dialer_genesys_requests_total") && l.contains("status=\"other\""))
        .unwrap_or_else(|| panic!("no status=\"other\" in\n{text}"));
    assert!(odd.contains("operation=\""), "{odd}");
}
