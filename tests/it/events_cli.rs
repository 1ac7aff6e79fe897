//! `dialer events` as a user runs it: a child process bound to a test prefix's reply
//! exchange prints the events of jobs published after it started, as NDJSON and as a table.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};

use crate::cli::dialer;
use crate::helpers::{TestApp, job, spawn_app};

/// Starts `dialer events ARGS` for `app`'s prefix and returns once it is listening (its first
/// line on stderr says so), so events published afterwards reach it. The rest of its stderr
/// is collected by a thread (a closed stderr would be a failure of its own).
async fn start_events(app: &TestApp, args: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let mut command = dialer();
    command
        .arg("events")
        .args(args)
        .env("DIALER_AMQP_URL", &app.settings.broker.amqp_url)
        .env("DIALER_PREFIX", &app.settings.broker.prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("dialer events starts");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        stderr.read_line(&mut first).expect("a line on stderr");
        assert!(first.contains("listening on exchange"), "{first:?}");
        let rest = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        (child, rest)
    })
    .await
    .unwrap()
}

/// Waits for the child to exit by itself and returns its status and stdout.
async fn finish(
    (mut child, stderr): (Child, std::thread::JoinHandle<String>),
) -> (std::process::ExitStatus, String) {
    tokio::task::spawn_blocking(move || {
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read stdout");
        let status = child.wait().expect("exit status");
        let stderr = stderr.join().expect("stderr reader");
        assert!(!stderr.contains("panicked"), "{stderr}");
        (status, stdout)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn events_of_enqueued_jobs_are_printed_as_ndjson_when_piped() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let child = start_events(&app, &["--count", "3", "--timeout", "30s"]).await;
    app.publish_job(&job("ev-1")).await;
    app.publish_job(&job("ev-2")).await;
    app.publish_job(&serde_json::json!({"jobId": "ev-bad", "phoneNumber": "+14155552671"}))
        .await;
    let (status, stdout) = finish(child).await;
    assert!(status.success(), "{status:?} {stdout}");
    assert!(
        !stdout.contains('\x1b'),
        "no ANSI escape into a pipe: {stdout:?}"
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is one JSON event"))
        .collect();
    let mut seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["jobId"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("ev-1".into(), "placed".into()),
            ("ev-2".into(), "placed".into()),
            ("ev-bad".into(), "rejected".into())
        ]
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_table_shows_only_the_asked_outcome_and_job() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let child = start_events(
        &app,
        &[
            "--format",
            "table",
            "--outcome",
            "placed",
            "--job-id",
            "tb-2",
            "--count",
            "1",
            "--timeout",
            "30s",
        ],
    )
    .await;
    for id in ["tb-1", "tb-2"] {
        app.publish_job(&job(id)).await;
    }
    app.publish_job(&serde_json::json!({"jobId": "tb-bad", "phoneNumber": "12"}))
        .await;
    let (status, stdout) = finish(child).await;
    assert!(status.success(), "{status:?} {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one row: {stdout}");
    assert!(
        lines[0].contains("job") && lines[0].contains("outcome") && lines[0].contains("attempts"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("tb-2")
            && lines[1].contains("placed")
            && lines[1].contains("conversation "),
        "{stdout}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_timeout_without_the_count_fails_and_says_how_many_came() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let child = start_events(&app, &["--count", "2", "--timeout", "1s"]).await;
    app.publish_job(&job("to-1")).await;
    let (status, stdout) = finish(child).await;
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_mistyped_prefix_is_named_instead_of_waiting_forever() {
    let url = crate::helpers::amqp_url().await;
    let output = tokio::task::spawn_blocking(move || {
        dialer()
            .args([
                "events",
                "--prefix",
                "no-such-prefix-7f3a",
                "--timeout",
                "1s",
            ])
            .env("DIALER_AMQP_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no-such-prefix-7f3a.replies does not exist")
            && stderr.contains("DIALER_PREFIX"),
        "{stderr}"
    );
}

#[tokio::test]
async fn events_into_a_closed_pipe_end_quietly() {
    let app = spawn_app(|_| {}, |_| {}).await;
    let (mut child, stderr) = start_events(&app, &["--timeout", "20s"]).await;
    // The reader goes away before anything is printed, as `| head -0` would.
    drop(child.stdout.take());
    app.publish_job(&job("pipe-1")).await;
    app.publish_job(&job("pipe-2")).await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        matches!(status.code(), Some(0 | 141)),
        "{status:?} {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_named_queue_is_read_without_taking_its_events() {
    let app = spawn_app(|_| {}, |_| {}).await;
    app.publish_job(&job("nq-1")).await;
    // The test's own events queue (bound to the reply exchange) holds the event.
    crate::helpers::wait_until(
        std::time::Duration::from_secs(20),
        "the event is in the test's queue",
        || async { app.depth(&app.events_queue).await == 1 },
    )
    .await;
    let queue = app.events_queue.clone();
    let mut command = dialer();
    command
        .args([
            "events",
            "--queue",
            &queue,
            "--count",
            "1",
            "--timeout",
            "20s",
        ])
        .env("DIALER_AMQP_URL", &app.settings.broker.amqp_url);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let event: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(event["jobId"], "nq-1");
    crate::helpers::wait_until(
        std::time::Duration::from_secs(10),
        "the event is handed back to its queue",
        || async { app.depth(&app.events_queue).await == 1 },
    )
    .await;
    app.cleanup().await;
}
