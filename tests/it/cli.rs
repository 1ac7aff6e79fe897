//! The `dialer` binary as a user runs it: the demo, the simulator's first line, `check`, and
//! configuration errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::helpers::{amqp_url, spawn_sim};

pub fn dialer() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dialer"));
    // The tests' own environment must not leak settings into the child.
    for (key, _) in std::env::vars() {
        if key.starts_with("DIALER_") || key.starts_with("GENESYS_") {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

#[tokio::test]
async fn the_demo_places_every_valid_job_once() {
    let url = amqp_url().await;
    let output = tokio::task::spawn_blocking(move || {
        dialer()
            .args(["demo", "--jobs", "4"])
            .env("DIALER_AMQP_URL", url)
            .output()
            .expect("dialer demo runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("8 events for 8 jobs: duplicate 1, expired 1, placed 4, rejected 2"),
        "{stdout}"
    );
    assert!(stdout.contains("nobody was rung twice"), "{stdout}");
}

#[test]
fn the_simulator_says_where_it_listens_first() {
    let mut child = dialer()
        .args(["sim", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("dialer sim starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let address = first
        .trim()
        .strip_prefix("listening on http://127.0.0.1:")
        .unwrap_or_else(|| panic!("{first:?}"));
    assert!(address.parse::<u16>().unwrap() > 0, "{first:?}");
}

#[test]
fn a_bad_setting_stops_the_start_with_one_line_naming_it() {
    for (variable, value, hint) in [
        ("DIALER_RATE_LIMIT", "lots", "N/s"),
        ("DIALER_LIVENESS_TIMEOUT", "0s", "at least 1s"),
    ] {
        let output = dialer()
            .args(["run"])
            .env("GENESYS_CLIENT_ID", "id")
            .env("GENESYS_CLIENT_SECRET", "very-secret-value")
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(variable) && stderr.contains(hint),
            "{stderr}"
        );
        assert!(!stderr.contains("very-secret-value"));
    }
}

#[tokio::test]
async fn check_proves_the_credentials_and_permissions() {
    let sim = spawn_sim(|_| {}).await;
    let base = sim.base_url();
    let url = amqp_url().await;
    let run = move |secret: &'static str| {
        let (base, url) = (base.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            dialer()
                .arg("check")
                // check's own filter: its report says what the library's warnings would.
                .env_remove("RUST_LOG")
                .env("DIALER_AMQP_URL", url)
                .env("GENESYS_CLIENT_ID", "test-client")
                .env("GENESYS_CLIENT_SECRET", secret)
                .env("GENESYS_API_BASE_URL", &base)
                .env("GENESYS_LOGIN_BASE_URL", &base)
                .output()
                .unwrap()
        })
    };
    let good = run("test-secret").await.unwrap();
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{stdout}");
    assert!(
        stdout.contains("ok   token") && stdout.contains("ok   user search"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("conversation:call:add"),
        "the simulator has no roles: no permissions note: {stdout}"
    );
    let bad = run("wrong-secret").await.unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL token"), "{stdout}");
    assert!(
        stdout.contains("fix GENESYS_CLIENT_ID and GENESYS_CLIENT_SECRET"),
        "{stdout}"
    );
    assert_eq!(stderr.trim(), "dialer: 1 check failed", "{stderr}");
    assert!(!stderr.contains("wrong-secret"));
}

/// A pipe whose reader is already gone: every write into it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    writer
}

#[tokio::test]
async fn output_into_a_closed_pipe_ends_without_a_panic() {
    let url = amqp_url().await;
    let prefix = format!("test-pipe-{}", uuid::Uuid::new_v4().simple());
    let prefix2 = prefix.clone();
    let output = tokio::task::spawn_blocking(move || {
        dialer()
            .args(["topology", "--prefix", &prefix, "--queue-type", "classic"])
            .env("DIALER_AMQP_URL", url)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(0 | 141)),
        "{:?} {stderr}",
        output.status
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    // It did its work before the closed pipe: the topology exists (and goes again).
    let connection = lapin::Connection::connect(&amqp_url().await, Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = dialer::broker::Topology::new(&prefix2, dialer::config::QueueType::Classic);
    assert_eq!(
        dialer::broker::queue_depth(&channel, &topology.jobs_queue)
            .await
            .unwrap(),
        0
    );
    topology.delete(&channel, &[]).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
}

#[test]
fn help_into_a_closed_pipe_ends_without_a_panic() {
    let output = dialer()
        .args(["run", "--help"])
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(0 | 141)),
        "{:?} {stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn no_ansi_escape_reaches_output_that_is_not_a_terminal() {
    let sim = spawn_sim(|_| {}).await;
    let base = sim.base_url();
    let url = amqp_url().await;
    let output = tokio::task::spawn_blocking(move || {
        dialer()
            .arg("check")
            .env("RUST_LOG", "debug")
            .env("DIALER_AMQP_URL", url)
            .env("GENESYS_CLIENT_ID", "test-client")
            .env("GENESYS_CLIENT_SECRET", "wrong")
            .env("GENESYS_API_BASE_URL", &base)
            .env("GENESYS_LOGIN_BASE_URL", &base)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DEBUG"), "log lines were written: {stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains('\x1b'));
}

#[tokio::test]
async fn a_failed_job_replayed_from_the_dead_letter_queue_is_tried_again() {
    let app = crate::helpers::spawn_app(
        |s| {
            s.faults = dialer::sim::Faults {
                fail_next: vec![404],
                ..Default::default()
            }
        },
        |_| {},
    )
    .await;
    app.publish_job(&crate::helpers::job("replay-me")).await;
    let first = app
        .result_events(1, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(first[0].outcome, dialer::event::Outcome::Failed);
    crate::helpers::wait_until(
        std::time::Duration::from_secs(10),
        "the job is dead-lettered",
        || async { app.depth(&app.topology.dead_letter_queue).await == 1 },
    )
    .await;
    let (url, prefix) = (
        app.settings.broker.amqp_url.clone(),
        app.settings.broker.prefix.clone(),
    );
    let dlq = move |args: &'static [&'static str]| {
        let (url, prefix) = (url.clone(), prefix.clone());
        tokio::task::spawn_blocking(move || {
            dialer()
                .arg("dlq")
                .args(args)
                .env("DIALER_AMQP_URL", url)
                .env("DIALER_PREFIX", prefix)
                .output()
                .unwrap()
        })
    };
    let count = dlq(&["count"]).await.unwrap();
    assert!(
        String::from_utf8_lossy(&count.stdout).starts_with("1 jobs"),
        "{count:?}"
    );
    let show = dlq(&["show"]).await.unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains("job replay-me") && shown.contains("outcome failed"),
        "{shown}"
    );
    assert!(
        shown.contains("+14*******71") && !shown.contains("+14155552671"),
        "numbers are masked unless asked: {shown}"
    );
    let unmasked = dlq(&["show", "--show-numbers"]).await.unwrap();
    let unmasked = String::from_utf8_lossy(&unmasked.stdout);
    assert!(unmasked.contains("+14155552671"), "{unmasked}");
    assert_eq!(
        app.depth(&app.topology.dead_letter_queue).await,
        1,
        "show leaves it in place"
    );
    let replay = dlq(&["replay", "--limit", "5"]).await.unwrap();
    assert!(
        String::from_utf8_lossy(&replay.stdout).contains("replayed 1 job "),
        "{replay:?}"
    );
    let second = app
        .result_events(1, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(
        second[0].outcome,
        dialer::event::Outcome::Placed,
        "{second:?}"
    );
    assert_eq!(second[0].job_id.as_deref(), Some("replay-me"));
    assert_eq!(app.sim.placed_calls().len(), 1);
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);
    app.cleanup().await;
}

#[test]
fn bash_completions_are_valid_bash_and_know_the_commands() {
    let output = dialer().args(["completions", "bash"]).output().unwrap();
    assert!(output.status.success());
    let script = String::from_utf8(output.stdout).unwrap();
    for word in ["events", "enqueue", "--skip-invalid", "replay", "--dry-run"] {
        assert!(script.contains(word), "{word} missing");
    }
    let path = std::env::temp_dir().join(format!("dialer-completions-{}.bash", std::process::id()));
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Runs `dialer ARGS` on a pseudo-terminal (util-linux `script`), returning what it showed.
fn on_a_terminal(args: &str, env: &[(&str, &str)]) -> String {
    let mut command = Command::new("script");
    command
        .args([
            "-qec",
            &format!("{} {args}", env!("CARGO_BIN_EXE_dialer"),),
            "/dev/null",
        ])
        .stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("DIALER_") || key == "NO_COLOR" {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("script(1) from util-linux runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let url = amqp_url().await;
    let args = "events --prefix no-such-prefix-c0l0r --timeout 1s";
    let env = [("RUST_LOG", "debug"), ("DIALER_AMQP_URL", url.as_str())];
    let coloured = on_a_terminal(args, &env);
    assert!(coloured.contains("DEBUG"), "{coloured}");
    assert!(
        coloured.contains('\x1b'),
        "a terminal gets colour: {coloured:?}"
    );
    let plain = on_a_terminal(args, &[env[0], env[1], ("NO_COLOR", "1")]);
    assert!(plain.contains("DEBUG"), "{plain}");
    assert!(!plain.contains('\x1b'), "NO_COLOR: {plain:?}");
}
