//! `dialer dlq replay` as an operator runs it: it replays at most what was in the dead-letter
//! queue when it started, each job once, even when the replayed jobs fail again at once.

use std::time::Duration;

use crate::cli::dialer;
use crate::helpers::{TestApp, spawn_app, wait_until};

async fn dlq(app: &TestApp, args: &[&str]) -> std::process::Output {
    let mut command = dialer();
    command
        .arg("dlq")
        .args(args)
        .env("DIALER_AMQP_URL", &app.settings.broker.amqp_url)
        .env("DIALER_PREFIX", &app.settings.broker.prefix);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// Three jobs the worker rejects at once (a number that is no number): dead-lettered again
/// as soon as they are replayed, which is what made a replay loop over them.
async fn three_dead_letters() -> TestApp {
    let app = spawn_app(|_| {}, |_| {}).await;
    for i in 0..3 {
        app.publish_job(&serde_json::json!({
            "jobId": format!("dead-{i}"),
            "agentUserId": crate::helpers::agent().id,
            "phoneNumber": "12345",
        }))
        .await;
    }
    app.result_events(3, Duration::from_secs(20)).await;
    wait_until(
        Duration::from_secs(10),
        "3 jobs are dead-lettered",
        || async { app.depth(&app.topology.dead_letter_queue).await == 3 },
    )
    .await;
    app
}

#[tokio::test]
async fn replay_with_a_limit_above_the_count_replays_each_dead_letter_once() {
    let app = three_dead_letters().await;
    let output = dlq(&app, &["replay", "--limit", "10"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("replayed 3 jobs"), "{stdout}");
    // Each was tried again once: three more rejections, and the three back in the queue.
    let again = app.result_events(3, Duration::from_secs(20)).await;
    let mut ids: Vec<_> = again.iter().map(|e| e.job_id.clone().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["dead-0", "dead-1", "dead-2"]);
    wait_until(
        Duration::from_secs(10),
        "the 3 are dead-lettered again",
        || async { app.depth(&app.topology.dead_letter_queue).await == 3 },
    )
    .await;
    app.cleanup().await;
}

#[tokio::test]
async fn replay_filters_by_job_id_and_a_dry_run_changes_nothing() {
    let app = three_dead_letters().await;
    let dry = dlq(
        &app,
        &["replay", "--all", "--outcome", "rejected", "--dry-run"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{stdout}");
    assert!(stdout.contains("would replay 3 jobs"), "{stdout}");
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 3);

    let none = dlq(&app, &["replay", "--all", "--outcome", "unknown"]).await;
    assert!(String::from_utf8_lossy(&none.stdout).contains("replayed 0 jobs"));

    let one = dlq(&app, &["replay", "--all", "--job-id", "dead-1"]).await;
    let stdout = String::from_utf8_lossy(&one.stdout);
    assert!(stdout.contains("replayed 1 job "), "{stdout}");
    let again = app.result_events(1, Duration::from_secs(20)).await;
    assert_eq!(again[0].job_id.as_deref(), Some("dead-1"));
    // The two passed over stay, in order, ahead of the replayed one dead-lettered again.
    wait_until(Duration::from_secs(10), "dead-1 is back", || async {
        app.depth(&app.topology.dead_letter_queue).await == 3
    })
    .await;
    let queued = app
        .take(&app.topology.dead_letter_queue, 3, Duration::from_secs(5))
        .await;
    let order: Vec<String> = queued
        .iter()
        .map(|m| {
            dialer::broker::headers::DeadLetter::read(&m.delivery.properties)
                .job_id
                .expect("a dead letter names its job")
        })
        .collect();
    assert_eq!(order, ["dead-0", "dead-2", "dead-1"]);
    app.cleanup().await;
}
