//! Fleet scope: three `dialer run` processes share one rate budget, through Redis (behind a TCP
//! proxy the test cuts) and by consumer count without it; and the adaptive limit settles just
//! under a simulator limit the fleet was not told about.

use std::net::SocketAddr;
use std::time::Duration;

use dialer::ratelimit::{RateGate, RateMode};
use dialer::sim::{RateScope, RequestRecord};

use crate::children::ChildWorker;
use crate::helpers::{TestApp, job, run_settings, spawn_sim, wait_until};
use crate::proxy::TcpProxy;

/// The local Redis (`.ci/run` starts it when it is not answering).
const REDIS: &str = "127.0.0.1:6379";

/// A free loopback port for a child's `/metrics` (the child binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Three children in fleet scope with `extra` settings; returns them and their metrics ports.
fn spawn_fleet(app: &TestApp, label: &str, extra: &[(&str, String)]) -> Vec<(ChildWorker, u16)> {
    (0..3)
        .map(|i| {
            let port = free_port();
            let mut env = vec![
                ("DIALER_RATE_SCOPE", "fleet".to_owned()),
                ("DIALER_METRICS_ADDR", format!("127.0.0.1:{port}")),
                // Jobs are unique and none is redelivered: the memory store keeps the three
                // processes off one state directory.
                ("DIALER_DECISIONS", "memory".to_owned()),
                ("DIALER_CONCURRENCY", "8".to_owned()),
            ];
            env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
            (
                ChildWorker::spawn_with(app, &format!("{label}-{i}"), &env),
                port,
            )
        })
        .collect()
}

/// The value of `dialer_rate_mode{mode="<mode>"}` at a child, if it answers.
async fn rate_mode(port: u16, mode: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let label = format!("mode=\"{mode}\"");
    text.lines()
        .filter(|l| l.starts_with("dialer_rate_mode{") && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until every child reports `mode` as the rate mode in force.
async fn wait_for_mode(fleet: &[(ChildWorker, u16)], mode: &str, timeout: Duration) {
    wait_until(
        timeout,
        &format!("every worker is in {mode} mode"),
        || async {
            for (_, port) in fleet {
                if rate_mode(*port, mode).await != Some(1.0) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// Arrival times (ms of the simulator's clock) of API requests, tokens excluded.
fn api_arrivals(requests: &[RequestRecord]) -> Vec<u64> {
    requests
        .iter()
        .filter(|r| r.path.starts_with("/api/v2/"))
        .map(|r| r.at_ms)
        .collect()
}

/// The most arrivals in any window of `window_ms` that starts at an arrival in [from, to) and
/// ends by `to`.
fn busiest_window(arrivals: &[u64], from: u64, to: u64, window_ms: u64) -> usize {
    let inside: Vec<u64> = arrivals
        .iter()
        .copied()
        .filter(|t| (from..to).contains(t))
        .collect();
    (0..inside.len())
        .filter(|&i| inside[i] + window_ms <= to)
        .map(|i| inside[i..].partition_point(|&t| t < inside[i] + window_ms))
        .max()
        .unwrap_or(0)
}

/// Checks R·t + burst + 1 for windows of 1, 2 and 5 s within [from, to).
fn assert_bound(arrivals: &[u64], from: u64, to: u64, rate: f64, burst: u32, phase: &str) {
    for secs in [1u64, 2, 5] {
        let most = busiest_window(arrivals, from, to, secs * 1000);
        let bound = rate * secs as f64 + f64::from(burst) + 1.0;
        if most as f64 > bound {
            // Where: the arrivals of the busiest window, relative to the phase's start.
            let inside: Vec<u64> = arrivals
                .iter()
                .copied()
                .filter(|t| (from..to).contains(t))
                .collect();
            let start = (0..inside.len())
                .filter(|&i| inside[i] + secs * 1000 <= to)
                .max_by_key(|&i| inside[i..].partition_point(|&t| t < inside[i] + secs * 1000))
                .map_or(0, |i| inside[i]);
            let window: Vec<u64> = inside
                .iter()
                .filter(|t| (start..start + secs * 1000).contains(*t))
                .map(|t| t - from)
                .collect();
            panic!(
                "{phase}: {most} requests in {secs} s, above R·t + burst + 1 = {bound}; ms after the phase began: {window:?}"
            );
        }
    }
}

/// The mean rate of arrivals in [from, to).
fn mean_rate(arrivals: &[u64], from: u64, to: u64) -> f64 {
    let n = arrivals.iter().filter(|t| (from..to).contains(*t)).count();
    n as f64 * 1000.0 / (to - from) as f64
}

/// The simulator's clock now (the arrival time of its latest request).
fn sim_now(app: &TestApp) -> u64 {
    app.sim.requests().last().map_or(0, |r| r.at_ms)
}

/// Deletes the test's keys in Redis (their TTLs would remove them too, later).
async fn delete_redis_keys(prefix: &str) {
    let client = redis::Client::open(format!("redis://{REDIS}")).expect("redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("the local Redis answers");
    for key in ["tat", "pause", "adaptive"] {
        let _: i64 = redis::cmd("DEL")
            .arg(format!("{{{prefix}}}:rate:{key}"))
            .query_async(&mut connection)
            .await
            .expect("DEL");
    }
}

async fn publish_backlog(app: &TestApp, label: &str, n: usize) {
    for i in 0..n {
        app.publish_job(&job(&format!("{label}-{i}"))).await;
    }
}

async fn stop(fleet: Vec<(ChildWorker, u16)>) {
    for (child, _) in &fleet {
        child.signal("TERM").await;
    }
    for (mut child, _) in fleet {
        let status = child.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "{status}\n{}", child.log_tail());
    }
}

#[tokio::test]
async fn three_workers_keep_one_budget_with_redis_and_by_consumer_count_without_it() {
    const RATE: f64 = 10.0;
    const BURST: u32 = 3;
    let sim = spawn_sim(|s| s.faults.latency_ms = 20).await;
    let settings = run_settings(&sim).await;
    let prefix = settings.broker.prefix.clone();
    let app = TestApp::connect(sim, settings).await;
    publish_backlog(&app, "fleet", 600).await;
    let proxy = TcpProxy::start(REDIS.parse::<SocketAddr>().expect("addr")).await;
    let fleet = spawn_fleet(
        &app,
        "fleet",
        &[
            ("DIALER_REDIS_URL", format!("redis://{}", proxy.addr())),
            ("DIALER_RATE_LIMIT", format!("{RATE}/s")),
            ("DIALER_RATE_BURST", BURST.to_string()),
        ],
    );
    wait_for_mode(&fleet, "redis", Duration::from_secs(20)).await;
    // Every worker consumes before the measurement starts.
    wait_until(Duration::from_secs(20), "three consumers", || async {
        dialer::broker::queue_counts(&app.channel, &app.topology.jobs_queue)
            .await
            .is_ok_and(|c| c.consumers == 3)
    })
    .await;
    wait_until(Duration::from_secs(20), "calls arrive", || async {
        app.sim.stats().call_attempts > 5
    })
    .await;
    let redis_from = sim_now(&app) + 1000;
    tokio::time::sleep(Duration::from_secs(12)).await;

    // Redis goes away: each worker takes a third.
    proxy.cut();
    let cut_at = sim_now(&app);
    wait_for_mode(&fleet, "share", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let share_to = sim_now(&app);

    // Redis comes back: the workers find it by themselves.
    proxy.restore();
    wait_for_mode(&fleet, "redis", Duration::from_secs(15)).await;

    let arrivals = api_arrivals(&app.sim.requests());
    eprintln!(
        "fleet: with Redis {:.2}/s, busiest 1 s {}; share mode {:.2}/s, busiest 1 s {}",
        mean_rate(&arrivals, redis_from, cut_at),
        busiest_window(&arrivals, redis_from, cut_at, 1000),
        mean_rate(&arrivals, cut_at + 1000, share_to),
        busiest_window(&arrivals, cut_at, share_to, 1000),
    );
    assert_bound(&arrivals, redis_from, cut_at, RATE, BURST, "with Redis");
    let redis_mean = mean_rate(&arrivals, redis_from, cut_at);
    assert!(
        redis_mean >= 0.95 * RATE,
        "with Redis the fleet sent {redis_mean:.2}/s of a budget of {RATE}/s"
    );
    // The share mode, the switch to it included.
    eprintln!(
        "fleet: Redis cut {} ms after the measurement began",
        cut_at - redis_from
    );
    assert_bound(&arrivals, redis_from, share_to, RATE, BURST, "share mode");
    let share_mean = mean_rate(&arrivals, cut_at + 1000, share_to);
    assert!(
        share_mean >= 0.9 * RATE,
        "in share mode the fleet sent {share_mean:.2}/s of a budget of {RATE}/s"
    );

    stop(fleet).await;
    delete_redis_keys(&prefix).await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_adaptive_limit_settles_just_under_a_limit_half_the_budget() {
    const BUDGET: f64 = 20.0;
    const SIM_LIMIT: f64 = 10.0;
    let sim = spawn_sim(|s| {
        s.rate_limit = SIM_LIMIT as u32;
        s.rate_window = Duration::from_secs(1);
        s.rate_scope = RateScope::Client;
        s.faults.latency_ms = 20;
    })
    .await;
    let settings = run_settings(&sim).await;
    let prefix = settings.broker.prefix.clone();
    let app = TestApp::connect(sim, settings).await;
    publish_backlog(&app, "adaptive", 600).await;
    let fleet = spawn_fleet(
        &app,
        "adaptive",
        &[
            ("DIALER_REDIS_URL", format!("redis://{REDIS}")),
            ("DIALER_RATE_LIMIT", format!("{BUDGET}/s")),
            ("DIALER_RATE_BURST", "1".to_owned()),
        ],
    );
    wait_until(Duration::from_secs(30), "calls arrive", || async {
        app.sim.stats().call_attempts > 0
    })
    .await;
    let start = sim_now(&app);
    let settled = start + 10_000;
    let end = settled + 20_000;
    wait_until(Duration::from_secs(40), "30 s of traffic", || async {
        sim_now(&app) >= end
    })
    .await;
    stop(fleet).await;

    let requests: Vec<RequestRecord> = app
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/v2/") && (settled..end).contains(&r.at_ms))
        .collect();
    let limited = requests.iter().filter(|r| r.status == 429).count();
    let granted = requests.iter().filter(|r| r.status == 200).count();
    let share_429 = limited as f64 / requests.len().max(1) as f64;
    let goodput = granted as f64 / 20.0;
    eprintln!(
        "adaptive: {} requests, {limited} 429s, goodput {goodput:.2}/s",
        requests.len()
    );
    assert!(
        share_429 < 0.02,
        "{limited} of {} requests were 429s after the first 10 s",
        requests.len()
    );
    assert!(
        goodput >= 0.9 * SIM_LIMIT,
        "goodput {goodput:.2}/s is below 0.9 of the simulator's {SIM_LIMIT}/s"
    );
    delete_redis_keys(&prefix).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_429_at_one_replica_pauses_and_slows_the_whole_fleet_through_redis() {
    let sim = spawn_sim(|_| {}).await;
    let mut settings = run_settings(&sim).await;
    settings.rate_scope = dialer::config::RateScope::Fleet;
    settings.redis_url = Some(dialer::config::Secret::new(format!("redis://{REDIS}")));
    settings.rate_limit = dialer::config::Rate::new(100, Duration::from_secs(1)).expect("rate");
    settings.rate_burst = std::num::NonZeroU32::MIN;
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Two replicas' gates, as two processes would hold them.
    let first = RateGate::for_settings(&settings, &shutdown);
    let second = RateGate::for_settings(&settings, &shutdown);
    first.acquire().await;
    second.acquire().await;
    assert_eq!(first.mode(), RateMode::Redis);
    assert_eq!(second.mode(), RateMode::Redis);

    first.rate_limited(Duration::from_millis(1500)).await;
    assert!(second.pause_deadline().is_none(), "nothing told it locally");
    let waited = second.acquire().await;
    assert!(
        waited >= Duration::from_millis(1200),
        "the other replica's next request left after {waited:?}, inside the fleet's pause"
    );
    // The fleet's effective rate fell by a fifth, for both.
    assert!(
        (second.effective_rate() - 80.0).abs() < 1e-6,
        "{}",
        second.effective_rate()
    );
    assert!((first.effective_rate() - 80.0).abs() < 1e-6);
    shutdown.cancel();
    delete_redis_keys(&settings.broker.prefix).await;
    sim.shutdown().await;
}

#[test]
fn the_busiest_window_counts_arrivals_inside_the_phase() {
    let arrivals = [0, 100, 200, 1100, 1150, 5000];
    assert_eq!(busiest_window(&arrivals, 0, 2000, 1000), 3);
    assert_eq!(busiest_window(&arrivals, 150, 6000, 1000), 3);
    // A window that would end past the phase is not counted.
    assert_eq!(busiest_window(&arrivals, 0, 999, 1000), 0);
    assert!((mean_rate(&arrivals, 0, 2000) - 2.5).abs() < 1e-9);
}
