//! (6) Memory: `dialer run` as a child process (this very binary) with 1,000 jobs in flight
//! against a slow simulator, its peak RSS read from `/proc/<pid>/status`.
//!
//! A child rather than the in-process worker: the bench process also holds the simulator
//! (which keeps every request it saw), the event consumer and the earlier measurements' heap,
//! so its own RSS would say little about the worker's. A child's `VmHWM` is the worker alone.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStderr, Command};

use super::dialer::{CLIENT_ID, CLIENT_SECRET, unlimited_sim};
use super::lab::Lab;
use super::{Plan, job_body};
use crate::config::{BrokerSettings, QueueType};

/// What (6) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Memory {
    /// The worker's concurrency (= jobs in flight it may hold).
    pub(crate) concurrency: u16,
    /// Simulator latency: how long each job stays in flight.
    pub(crate) latency_ms: u64,
    /// Jobs run.
    pub(crate) jobs: usize,
    /// Most place-call requests the simulator held open at once (proves the jobs were in flight).
    pub(crate) max_open_requests: u64,
    /// RSS of the ready, idle worker, MiB.
    pub(crate) idle_rss_mib: f64,
    /// Peak RSS (`VmHWM`) of the worker over the run, MiB.
    pub(crate) peak_rss_mib: f64,
}

/// Runs (6).
pub(crate) async fn run(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<Memory> {
    let lab = Lab::open(base, run_id, "memory").await?;
    let result = measure(&lab, plan, run_id).await;
    lab.cleanup().await;
    result
}

async fn measure(lab: &Lab, plan: &Plan, run_id: &str) -> anyhow::Result<Memory> {
    let sim = unlimited_sim(plan.memory_latency_ms).await?;
    let port = free_port()?;
    let mut child = spawn_worker(
        &lab.broker,
        &sim.base_url(),
        plan.memory_concurrency,
        port,
        &[],
    )?;
    let pid = child.id().context("the worker exited at once")?;
    let last_lines = drain(child.stderr.take());
    let outcome = async {
        wait_ready(&mut child, port, &last_lines).await?;
        // Let the start-up settle (the metrics endpoint's first answers, lazy statics).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = status_kib(pid, "VmRSS").context("reading the worker's VmRSS")?;
        let jobs = plan.memory_jobs;
        let collector = lab.collect_events(jobs, plan.run_timeout).await?;
        lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
            .await?;
        // Watch the simulator's open requests while the jobs run.
        let watching = async {
            let mut max_open = 0;
            let deadline = Instant::now() + plan.run_timeout;
            while Instant::now() < deadline {
                let stats = sim.stats();
                let answered: u64 = stats.by_status.values().sum();
                max_open = max_open.max(stats.api_requests.saturating_sub(answered));
                tokio::time::sleep(Duration::from_millis(20)).await;
                if stats.calls_placed >= jobs as u64 {
                    break;
                }
            }
            max_open
        };
        let (events, max_open) = tokio::join!(collector.finish(), watching);
        events?;
        let peak = status_kib(pid, "VmHWM").context("reading the worker's VmHWM")?;
        Ok(Memory {
            concurrency: plan.memory_concurrency,
            latency_ms: plan.memory_latency_ms,
            jobs,
            max_open_requests: max_open,
            idle_rss_mib: idle as f64 / 1024.0,
            peak_rss_mib: peak as f64 / 1024.0,
        })
    }
    .await;
    stop(&mut child).await;
    sim.shutdown().await;
    outcome
}

/// `dialer run` with the bench's settings and `extra` variables (set last, so they win), its
/// logs discarded (RUST_LOG still applies, so it pays for them as a deployed worker would).
pub(crate) fn spawn_worker(
    broker: &BrokerSettings,
    sim_url: &str,
    concurrency: u16,
    metrics_port: u16,
    extra: &[(&str, String)],
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the dialer binary")?;
    let queue_type = match broker.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    let mut command = Command::new(exe);
    command
        .arg("run")
        .env("DIALER_AMQP_URL", &broker.amqp_url)
        .env("DIALER_PREFIX", &broker.prefix)
        .env("DIALER_QUEUE_TYPE", queue_type)
        .env("DIALER_CONCURRENCY", concurrency.to_string())
        .env("DIALER_RATE_LIMIT", "1000000/s")
        .env("DIALER_RATE_BURST", "10000")
        .env("DIALER_DECISIONS", "memory")
        .env("DIALER_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("DIALER_WORKER_NAME", super::WORKER_NAME)
        .env("GENESYS_CLIENT_ID", CLIENT_ID)
        .env("GENESYS_CLIENT_SECRET", CLIENT_SECRET)
        .env_remove("GENESYS_CLIENT_SECRET_FILE")
        // Process scope unless `extra` says otherwise, whatever the bench's environment holds.
        .env_remove("DIALER_RATE_SCOPE")
        .env_remove("DIALER_REDIS_URL")
        .env("GENESYS_API_BASE_URL", sim_url)
        .env("GENESYS_LOGIN_BASE_URL", sim_url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Read continuously (a pipe nobody reads fills up and blocks the worker's logging,
        // and with it the worker); the last lines say why, should it stop early.
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    for (name, value) in extra {
        command.env(name, value);
    }
    command.spawn().context("starting `dialer run`")
}

/// The last lines a child wrote to stderr, kept while it runs.
pub(crate) type LastLines = Arc<Mutex<VecDeque<String>>>;

/// Reads the child's stderr to the end in the background, keeping the last few lines.
pub(crate) fn drain(stderr: Option<ChildStderr>) -> LastLines {
    let last: LastLines = Arc::default();
    if let Some(stderr) = stderr {
        let keep = last.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            // Ends when the child closes its stderr (it exited).
            while let Ok(Some(line)) = lines.next_line().await {
                let mut keep = keep.lock().unwrap_or_else(|p| p.into_inner());
                if keep.len() == 5 {
                    keep.pop_front();
                }
                keep.push_back(line);
            }
        });
    }
    last
}

/// Waits until the child's `/readyz` answers 200, or fails with what it printed if it exits.
pub(crate) async fn wait_ready(
    child: &mut Child,
    port: u16,
    last_lines: &LastLines,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .context("an HTTP client")?;
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().context("checking on the worker")? {
            // Give the reader a moment to take the last lines.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let tail: Vec<String> = last_lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            bail!(
                "`dialer run` exited ({status}) before it was ready: {}",
                tail.join(" / ")
            );
        }
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("`dialer run` was not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM (a clean drain), then SIGKILL if it has not stopped within a few seconds.
pub(crate) async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // std has no SIGTERM; `kill` is on every Linux this runs on. If it is missing, SIGKILL.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// A port free right now on loopback, for the child's metrics endpoint (it needs a fixed one
/// so the bench can poll `/readyz`; the tiny race with another process is acceptable here).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .context("finding a free port")?;
    Ok(listener.local_addr().context("reading the port")?.port())
}

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS` or `VmHWM`.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
