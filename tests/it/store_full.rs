//! The file store's disk filling up while a call is in flight.
//!
//! The store lives on a small tmpfs mounted for the test (so the test needs root, as CI has;
//! without it the test fails and says why). The disk is filled after the claim was written and
//! while the simulator holds the place-call answer, so the decision is the write that meets a
//! full disk. The call was placed: its answer must survive and end the job `placed`, with the
//! conversation id the simulator created, once space returns (docs/decisions.md).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dialer::config::DecisionStoreKind;
use dialer::decisions::{DecisionStore, JobState};
use dialer::event::Outcome;

use crate::helpers::{job, spawn_app, wait_until};
use crate::resilience::WAIT;

/// A tmpfs of `size`, unmounted (lazily, so an open store does not keep it) when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let path = std::env::temp_dir().join(format!("dialer-full-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("a mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("`mount` runs");
        assert!(
            mounted.status.success(),
            "this test mounts a {size} tmpfs to fill it and needs root (CI runs as root); \
             run it as root or leave it out with `--skip store_full`: {}",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
        Self { path }
    }

    /// Writes `filler` until the disk refuses another byte.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("room for the filler's name");
        let block = vec![0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
        // A partial last block may have left a few bytes: take them too.
        while let Ok(1..) = file.write(&[0u8]) {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn free_bytes(path: &Path) -> u64 {
    let output = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("`df` runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .expect("df prints the free bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_at_the_decision_ends_placed_with_its_conversation_id_once_space_returns() {
    let disk = SmallDisk::mount("4m");
    let state_dir = disk.path.clone();
    // The answer is held 2 s after the call is made: the disk fills in that window.
    let mut app = spawn_app(
        |s| s.faults.latency_ms = 2_000,
        |w| {
            w.decisions = DecisionStoreKind::File;
            w.state_dir = state_dir.clone();
            // Well past the held answer: the call must be answered, not time out.
            w.genesys.timeout = Duration::from_secs(10);
        },
    )
    .await;
    let readiness = app.worker.as_ref().expect("worker").readiness.clone();
    app.publish_job(&job("full-1")).await;
    wait_until(WAIT, "the simulator has placed the call", || {
        let placed = app.sim.placed_calls().len();
        async move { placed == 1 }
    })
    .await;
    let filler = disk.fill();
    assert_eq!(free_bytes(&disk.path), 0, "the store's disk is full");

    // The decision cannot be written: the worker keeps it, stops taking jobs and goes not
    // ready, and publishes nothing it could not record.
    wait_until(WAIT, "the worker reports not ready", || {
        let ready = readiness.is_ready();
        async move { !ready }
    })
    .await;
    assert_eq!(
        app.depth(&app.events_queue).await,
        0,
        "no event is published before its decision is recorded"
    );

    std::fs::remove_file(&filler).expect("the filler goes");
    let events = app.result_events(1, Duration::from_secs(30)).await;
    let calls = app.sim.placed_calls();
    assert_eq!(calls.len(), 1, "the person was rung once");
    assert_eq!(app.sim.attempts().len(), 1, "one place-call request in all");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].job_id.as_deref(), Some("full-1"));
    assert_eq!(
        events[0].outcome,
        Outcome::Placed,
        "the known answer survives the full disk: {:?}",
        events[0].error
    );
    assert_eq!(
        events[0].conversation_id.as_deref(),
        Some(calls[0].conversation_id.as_str()),
        "the event carries the conversation the simulator created"
    );
    wait_until(WAIT, "the worker is ready again", || {
        let ready = readiness.is_ready();
        async move { ready }
    })
    .await;
    app.stop_worker().await;

    // What the store holds is that same decision: a restart would publish it again.
    let store = DecisionStore::open(&state_dir).expect("the store opens");
    let Some(JobState::Decided { event }) = store.get("full-1").await.expect("the store answers")
    else {
        panic!("full-1 is decided in the store");
    };
    let recorded = String::from_utf8_lossy(&event).into_owned();
    assert!(
        recorded.contains(&calls[0].conversation_id),
        "the recorded decision names the conversation: {recorded}"
    );
    drop(store);
    app.cleanup().await;
}
