//! `dialer enqueue` as a user runs it: a file with a bad line publishes nothing unless asked,
//! and a CRM's CSV export becomes one job per row.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::dialer;
use crate::helpers::{TestApp, agent, job, run_settings, spawn_sim};

async fn app() -> TestApp {
    let sim = spawn_sim(|_| {}).await;
    let settings = run_settings(&sim).await;
    TestApp::connect(sim, settings).await
}

fn temp_file(app: &TestApp, extension: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.{extension}", app.settings.broker.prefix));
    std::fs::write(&path, contents).unwrap();
    path
}

async fn enqueue(app: &TestApp, file: &Path, extra: &[&str]) -> std::process::Output {
    let mut command = dialer();
    command
        .arg("enqueue")
        .arg(file)
        .args(extra)
        .env("DIALER_AMQP_URL", &app.settings.broker.amqp_url)
        .env("DIALER_PREFIX", &app.settings.broker.prefix);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_file_with_one_bad_line_publishes_nothing_and_names_the_line() {
    let app = app().await;
    let lines: Vec<String> = (0..3)
        .map(|i| job(&format!("enq-{i}")).to_string())
        .chain(["{\"jobId\": \"enq-bad\", \"phoneNumber\": \"+14155552671\"}".to_owned()])
        .chain([job("enq-3").to_string()])
        .collect();
    let file = temp_file(&app, "ndjson", &(lines.join("\n") + "\n"));

    let output = enqueue(&app, &file, &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 4: ") && stderr.contains("agentUserId"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 line is invalid, so nothing was published"),
        "{stderr}"
    );
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);

    let output = enqueue(&app, &file, &["--skip-invalid"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("published 4 jobs") && stdout.contains("1 invalid line skipped"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 4: "));
    let queued = app
        .take(&app.topology.jobs_queue, 4, Duration::from_secs(5))
        .await;
    let ids: Vec<String> = queued
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["enq-0", "enq-1", "enq-2", "enq-3"]);
    std::fs::remove_file(file).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_csv_of_a_thousand_rows_publishes_a_thousand_jobs() {
    let app = app().await;
    let agent = agent();
    let mut csv = String::from("jobId,agentUserId,phoneNumber,priority,attributes.crmLead\n");
    for i in 0..1000 {
        csv.push_str(&format!(
            "csv-{i:04},{},+1415555{:04},{},L{i}\n",
            agent.id,
            2671 + i % 7000,
            i % 5
        ));
    }
    let file = temp_file(&app, "csv", &csv);
    let output = enqueue(&app, &file, &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("published 1000 jobs"), "{stdout}");
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 1000);
    let first = app
        .take(&app.topology.jobs_queue, 1, Duration::from_secs(5))
        .await;
    let body: serde_json::Value = serde_json::from_slice(&first[0].delivery.data).unwrap();
    assert_eq!(body["jobId"], "csv-0000");
    assert_eq!(body["priority"], 0);
    assert_eq!(body["attributes"]["crmLead"], "L0");
    std::fs::remove_file(file).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_bad_csv_row_is_named_by_its_line_in_the_file() {
    let app = app().await;
    let agent = agent();
    let csv = format!(
        "jobId,agentUserId,phoneNumber\nc-1,{0},+14155552671\nc-2,{0},12345\n",
        agent.id
    );
    let file = temp_file(&app, "csv", &csv);
    let output = enqueue(&app, &file, &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 3: ") && stderr.contains("phoneNumber"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("jobs are") && !stderr.contains("1 jobs"),
        "{stderr}"
    );
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    std::fs::remove_file(file).unwrap();
    app.cleanup().await;
}
