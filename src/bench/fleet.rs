//! (8) Fleet precision and (9) adaptive goodput: three `dialer run` child processes in fleet
//! scope (this very binary) against one in-process simulator, which records every arrival.
//!
//! (8) runs twice, with the budget shared in Redis and in share mode (no Redis: budget ÷ the
//! consumers on the jobs queue); (9) gives the fleet a budget twice the simulator's client-wide
//! limit and measures what the adaptive limit makes of it after it had time to find the limit.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::process::Child;

use super::dialer::sim_settings;
use super::lab::Lab;
use super::memory::{LastLines, drain, free_port, spawn_worker, stop, wait_ready};
use super::{Plan, job_body, stats};
use crate::config::BrokerSettings;
use crate::sim::{self, RateScope, SimHandle};

/// Replicas in the fleet.
const REPLICAS: usize = 3;
/// Jobs in flight per replica: plenty for tens of requests per second at a few ms each.
const CONCURRENCY: u16 = 8;
/// Simulator latency: a little, as a real API has.
const LATENCY_MS: u64 = 20;

/// What (8) measured in one mode.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetPrecision {
    /// `redis` or `share`.
    pub(crate) mode: &'static str,
    /// The fleet's budget R, requests per second.
    pub(crate) limit_per_sec: u32,
    /// The burst.
    pub(crate) burst: u32,
    /// Seconds measured (after every replica consumed and, in share mode, the consumer count
    /// had time to settle).
    pub(crate) seconds: f64,
    /// API requests in the span, all replicas together.
    pub(crate) requests: usize,
    /// Requests per second ÷ R.
    pub(crate) precision: f64,
    /// Largest count in any sliding 1-second window of the span.
    pub(crate) max_in_any_second: usize,
    /// R + burst + 1: the bound every window of 1 s must keep.
    pub(crate) bound_per_second: u32,
}

/// What (9) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AdaptiveGoodput {
    /// The fleet's configured budget, requests per second.
    pub(crate) budget_per_sec: u32,
    /// The simulator's client-wide limit, requests per 1-second window.
    pub(crate) simulator_limit_per_sec: u32,
    /// Seconds left out at the start (the limit is being found).
    pub(crate) warm_up_seconds: f64,
    /// Seconds measured after that.
    pub(crate) seconds: f64,
    /// API requests in the span.
    pub(crate) requests: usize,
    /// Answered 2xx, per second, ÷ the simulator's limit.
    pub(crate) goodput_ratio: f64,
    /// 429s ÷ requests in the span.
    pub(crate) share_429: f64,
}

/// Three children in fleet scope with `extra` settings, each ready.
struct Fleet {
    children: Vec<(Child, LastLines)>,
}

impl Fleet {
    async fn start(
        broker: &BrokerSettings,
        sim: &SimHandle,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet {
            children: Vec::new(),
        };
        let mut ports = Vec::new();
        for _ in 0..REPLICAS {
            let port = free_port()?;
            let mut env = vec![("DIALER_RATE_SCOPE", "fleet".to_owned())];
            env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
            let mut child = spawn_worker(broker, &sim.base_url(), CONCURRENCY, port, &env)?;
            let last = drain(child.stderr.take());
            fleet.children.push((child, last));
            ports.push(port);
        }
        for ((child, last), port) in fleet.children.iter_mut().zip(ports) {
            wait_ready(child, port, last).await?;
        }
        Ok(fleet)
    }

    async fn stop(mut self) {
        for (child, _) in &mut self.children {
            stop(child).await;
        }
    }
}

/// Waits until the simulator has seen an API request, for at most 30 s.
async fn first_request(sim: &SimHandle) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim.stats().api_requests == 0 {
        if Instant::now() > deadline {
            bail!("no request reached the simulator within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The simulator's clock now: the arrival of its latest request.
fn sim_now(sim: &SimHandle) -> u64 {
    sim.requests().last().map_or(0, |r| r.at_ms)
}

/// The Redis URL of the bench: `DIALER_REDIS_URL`, else the local one.
fn redis_url() -> String {
    std::env::var("DIALER_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// Runs (8) in one mode.
pub(crate) async fn precision(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
    with_redis: bool,
) -> anyhow::Result<FleetPrecision> {
    let (mode, name) = if with_redis {
        ("redis", "fleet-redis")
    } else {
        ("share", "fleet-share")
    };
    let limit = plan.fleet_rate;
    let burst = plan.fleet_burst;
    let lab = Lab::open(base, run_id, name).await?;
    let prefix = lab.broker.prefix.clone();
    let result = async {
        let sim = sim::start(sim_settings(1_000_000, Duration::from_secs(1), LATENCY_MS)).await?;
        // Settling: the replicas start one after the other; in share mode each needs a fresh
        // consumer count (read every CONSUMER_POLL) before its share is right.
        let settle = crate::ratelimit::CONSUMER_POLL + Duration::from_secs(1);
        let total = settle + plan.fleet_duration + Duration::from_secs(5);
        let jobs = (f64::from(limit) * total.as_secs_f64()).ceil() as usize;
        lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
            .await?;
        let mut env = vec![
            ("DIALER_RATE_LIMIT", format!("{limit}/s")),
            ("DIALER_RATE_BURST", burst.to_string()),
        ];
        if with_redis {
            env.push(("DIALER_REDIS_URL", redis_url()));
        }
        let fleet = Fleet::start(&lab.broker, &sim, &env).await?;
        let measured = async {
            first_request(&sim).await?;
            tokio::time::sleep(settle).await;
            let from = sim_now(&sim);
            tokio::time::sleep(plan.fleet_duration).await;
            let to = from + plan.fleet_duration.as_millis() as u64;
            Ok::<_, anyhow::Error>((from, to))
        }
        .await;
        fleet.stop().await;
        let (from, to) = measured?;
        let arrivals: Vec<u64> = sim
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/api/v2/") && (from..to).contains(&r.at_ms))
            .map(|r| r.at_ms)
            .collect();
        sim.shutdown().await;
        let seconds = plan.fleet_duration.as_secs_f64();
        Ok(FleetPrecision {
            mode,
            limit_per_sec: limit,
            burst,
            seconds,
            requests: arrivals.len(),
            precision: arrivals.len() as f64 / seconds / f64::from(limit),
            max_in_any_second: stats::max_in_window(&arrivals, 1000),
            bound_per_second: limit + burst + 1,
        })
    }
    .await;
    lab.cleanup().await;
    if with_redis {
        delete_keys(&prefix).await;
    }
    result
}

/// Runs (9).
pub(crate) async fn adaptive(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<AdaptiveGoodput> {
    let budget = plan.fleet_rate;
    let sim_limit = (budget / 2).max(1);
    let lab = Lab::open(base, run_id, "adaptive").await?;
    let prefix = lab.broker.prefix.clone();
    let result = async {
        let mut settings = sim_settings(sim_limit, Duration::from_secs(1), LATENCY_MS);
        settings.rate_scope = RateScope::Client;
        let sim = sim::start(settings).await?;
        let total = plan.adaptive_warm_up + plan.fleet_duration + Duration::from_secs(5);
        // At the budget's pace, so the backlog cannot run dry whatever the limit allows.
        let jobs = (f64::from(budget) * total.as_secs_f64()).ceil() as usize;
        lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
            .await?;
        let env = [
            ("DIALER_RATE_LIMIT", format!("{budget}/s")),
            ("DIALER_RATE_BURST", "1".to_owned()),
            ("DIALER_REDIS_URL", redis_url()),
        ];
        let fleet = Fleet::start(&lab.broker, &sim, &env).await?;
        let measured = async {
            first_request(&sim).await?;
            let start = sim_now(&sim);
            let from = start + plan.adaptive_warm_up.as_millis() as u64;
            let to = from + plan.fleet_duration.as_millis() as u64;
            let deadline = Instant::now() + plan.adaptive_warm_up + plan.fleet_duration * 2;
            while sim_now(&sim) < to {
                if Instant::now() > deadline {
                    bail!("the fleet stopped sending before the run was over");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>((from, to))
        }
        .await;
        fleet.stop().await;
        let (from, to) = measured?;
        let statuses: Vec<u16> = sim
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/api/v2/") && (from..to).contains(&r.at_ms))
            .map(|r| r.status)
            .collect();
        sim.shutdown().await;
        let seconds = plan.fleet_duration.as_secs_f64();
        let ok = statuses.iter().filter(|s| (200..300).contains(*s)).count();
        let limited = statuses.iter().filter(|s| **s == 429).count();
        Ok(AdaptiveGoodput {
            budget_per_sec: budget,
            simulator_limit_per_sec: sim_limit,
            warm_up_seconds: plan.adaptive_warm_up.as_secs_f64(),
            seconds,
            requests: statuses.len(),
            goodput_ratio: ok as f64 / seconds / f64::from(sim_limit),
            share_429: limited as f64 / statuses.len().max(1) as f64,
        })
    }
    .await;
    lab.cleanup().await;
    delete_keys(&prefix).await;
    result
}

/// Deletes a measurement's keys in Redis (they expire by themselves too); best effort.
async fn delete_keys(prefix: &str) {
    let cleanup = async {
        let client = redis::Client::open(redis_url()).context("Redis URL")?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        for key in ["tat", "pause", "adaptive"] {
            let _: i64 = redis::cmd("DEL")
                .arg(format!("{{{prefix}}}:rate:{key}"))
                .query_async(&mut connection)
                .await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(2), cleanup).await {
        tracing::debug!(%error, "cannot delete the bench's Redis keys");
    }
}
