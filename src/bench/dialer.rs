//! (2)–(5): the real worker, in process (`worker::start`, memory decisions unless said
//! otherwise, its own prefix), against a simulator started for each measurement: throughput,
//! rate precision, overhead from delivery to Genesys, and throughput against a slow Genesys.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use super::cpu::{CpuSnapshot, CpuUse};
use super::lab::{Lab, job_properties};
use super::{Plan, job_body, stats};
use crate::config::{BrokerSettings, DecisionStoreKind, Rate, Secret};
use crate::sim::{self, Faults, SimAgent, SimHandle, SimSettings};
use crate::worker::RunningWorker;

/// The simulator's credentials in every measurement.
pub(crate) const CLIENT_ID: &str = "bench";
/// See [`CLIENT_ID`].
pub(crate) const CLIENT_SECRET: &str = "bench-secret";
/// A simulator limit nothing reaches: the measurements that are not about 429s must not see one.
const UNLIMITED: u32 = 1_000_000_000;
/// A worker rate limit that never binds: one request per microsecond, a large burst.
const NO_LIMIT_PER_SEC: u32 = 1_000_000;

/// Simulator settings for the bench: loopback, port 0, the demo agents.
pub(crate) fn sim_settings(rate_limit: u32, rate_window: Duration, latency_ms: u64) -> SimSettings {
    SimSettings {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        client_id: CLIENT_ID.to_owned(),
        client_secret: CLIENT_SECRET.to_owned(),
        agents: SimAgent::demo_set(),
        rate_limit,
        rate_window,
        rate_scope: sim::RateScope::Token,
        token_ttl: Duration::from_secs(86_400),
        faults: Faults {
            latency_ms,
            ..Faults::default()
        },
    }
}

/// A simulator without a rate limit that matters.
pub(crate) async fn unlimited_sim(latency_ms: u64) -> anyhow::Result<SimHandle> {
    sim::start(sim_settings(UNLIMITED, Duration::from_secs(60), latency_ms)).await
}

/// The in-process worker of one measurement.
struct InProcess {
    worker: RunningWorker,
    shutdown: CancellationToken,
}

impl InProcess {
    /// Starts a worker on `broker` against `sim` and waits until it consumes; with
    /// `file_store`, its decisions go to the embedded store in that directory, else to memory.
    async fn start(
        broker: &BrokerSettings,
        sim: &SimHandle,
        concurrency: u16,
        rate: Rate,
        burst: u32,
        file_store: Option<&Path>,
    ) -> anyhow::Result<InProcess> {
        let store = match file_store {
            Some(_) => StoreUnderTest::File,
            None => StoreUnderTest::Memory,
        };
        let dir = file_store.map_or_else(std::env::temp_dir, Path::to_path_buf);
        Self::start_with_store(broker, sim, concurrency, rate, burst, &store, &dir).await
    }

    /// [`InProcess::start`] with any decision store.
    async fn start_with_store(
        broker: &BrokerSettings,
        sim: &SimHandle,
        concurrency: u16,
        rate: Rate,
        burst: u32,
        store: &StoreUnderTest,
        state_dir: &Path,
    ) -> anyhow::Result<InProcess> {
        let mut settings = sim.worker_settings(broker.clone(), super::WORKER_NAME);
        settings.concurrency = NonZeroU16::new(concurrency).unwrap_or(NonZeroU16::MIN);
        settings.rate_limit = rate;
        settings.rate_burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        settings.state_dir = state_dir.to_path_buf();
        settings.shutdown_grace = Duration::from_secs(10);
        (settings.decisions, settings.database_url) = match store {
            StoreUnderTest::Memory => (DecisionStoreKind::Memory, None),
            StoreUnderTest::File => (DecisionStoreKind::File, None),
            StoreUnderTest::Postgres(url) => (DecisionStoreKind::Postgres, Some(url.clone())),
        };
        let shutdown = CancellationToken::new();
        let worker = crate::worker::start(settings, shutdown.clone()).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !worker.readiness.is_ready() {
            if Instant::now() > deadline {
                shutdown.cancel();
                bail!("the worker was not ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(InProcess { worker, shutdown })
    }

    /// Drains and stops it.
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.worker.wait())
            .await
            .context("the worker did not stop within 30 s")?
    }
}

/// Starts the worker, runs `body`, and stops the worker whatever `body` returned.
async fn with_worker<T>(
    worker: anyhow::Result<InProcess>,
    body: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let worker = worker?;
    let result = body.await;
    let stopped = worker.stop().await;
    let value = result?;
    stopped?;
    Ok(value)
}

fn rate(per_second: u32) -> anyhow::Result<Rate> {
    Rate::new(per_second, Duration::from_secs(1)).context("a rate of at least 1/s")
}

// ---------------------------------------------------------------------------------------------
// (2) Throughput.

/// What (2) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Throughput {
    /// Where the worker kept its decisions: `memory`, or `file` (the default embedded store).
    pub(crate) decisions: &'static str,
    /// Jobs pre-loaded before the worker started.
    pub(crate) jobs: usize,
    /// Worker concurrency (prefetch).
    pub(crate) concurrency: u16,
    /// Steady jobs per second, measured like (1).
    pub(crate) jobs_per_sec: f64,
    /// From the worker's start to the last event, including connecting and the token.
    pub(crate) wall_seconds: f64,
    /// Place-call requests the simulator answered.
    pub(crate) calls_placed: u64,
    /// CPU used while the jobs ran.
    pub(crate) cpu: CpuUse,
}

/// Where the worker of a throughput run keeps its decisions.
#[derive(Clone, Debug)]
pub(crate) enum StoreUnderTest {
    /// SQLite in memory.
    Memory,
    /// The default embedded store, in a fresh directory removed afterwards.
    File,
    /// PostgreSQL at this URL.
    Postgres(Secret),
}

impl StoreUnderTest {
    fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::File => "file",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Runs (2) with `jobs` jobs, the worker keeping its decisions in `store`.
pub(crate) async fn throughput(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
    jobs: usize,
    store: &StoreUnderTest,
) -> anyhow::Result<Throughput> {
    let name = match store {
        StoreUnderTest::Memory => "throughput",
        StoreUnderTest::File => "throughput-file",
        StoreUnderTest::Postgres(_) => "throughput-postgres",
    };
    let lab = Lab::open(base, run_id, name).await?;
    let state_dir =
        std::env::temp_dir().join(format!("dialer-bench-{run_id}-{}", std::process::id()));
    let result = async {
        let sim = unlimited_sim(0).await?;
        lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
            .await?;
        let collector = lab.collect_events(jobs, plan.run_timeout).await?;
        let cpu = CpuSnapshot::now();
        let started = Instant::now();
        let worker = InProcess::start_with_store(
            &lab.broker,
            &sim,
            plan.concurrency,
            rate(NO_LIMIT_PER_SEC)?,
            10_000,
            store,
            &state_dir,
        )
        .await;
        let (events, cpu) = with_worker(worker, async {
            let events = collector.finish().await?;
            Ok((events, cpu.used_since(jobs)))
        })
        .await?;
        let wall = events
            .times
            .last()
            .map_or(Duration::ZERO, |last| last.duration_since(started));
        let jobs_per_sec = stats::steady_rate(&events.times, usize::from(plan.concurrency))
            .context("too few events to compute a rate")?;
        let calls_placed = sim.stats().calls_placed;
        sim.shutdown().await;
        Ok(Throughput {
            decisions: store.name(),
            jobs,
            concurrency: plan.concurrency,
            jobs_per_sec,
            wall_seconds: wall.as_secs_f64(),
            calls_placed,
            cpu,
        })
    }
    .await;
    lab.cleanup().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

/// What (10) measured: (2) with each decision store, the same number of jobs each.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoreThroughputs {
    /// SQLite in memory.
    pub(crate) memory: Throughput,
    /// The embedded file store.
    pub(crate) file: Throughput,
    /// PostgreSQL on this machine (its server, password removed).
    pub(crate) postgres: Throughput,
    /// Which PostgreSQL.
    pub(crate) database: String,
}

/// Runs (10): memory, file and PostgreSQL in turn. The database is created for the run on the
/// server of `admin_url` and dropped afterwards.
pub(crate) async fn store_throughputs(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
    admin_url: &Secret,
) -> anyhow::Result<StoreThroughputs> {
    let jobs = plan.file_store_jobs;
    let memory = throughput(base, plan, run_id, jobs, &StoreUnderTest::Memory).await?;
    let file = throughput(base, plan, run_id, jobs, &StoreUnderTest::File).await?;
    let database = BenchDatabase::create(admin_url, run_id).await?;
    let postgres = throughput(
        base,
        plan,
        run_id,
        jobs,
        &StoreUnderTest::Postgres(database.url.clone()),
    )
    .await;
    database.drop_it().await;
    Ok(StoreThroughputs {
        memory,
        file,
        postgres: postgres?,
        database: crate::config::redact_url(admin_url.expose()),
    })
}

/// A database of the run's own on the server of the admin URL.
struct BenchDatabase {
    admin: Secret,
    name: String,
    url: Secret,
}

impl BenchDatabase {
    async fn create(admin: &Secret, run_id: &str) -> anyhow::Result<Self> {
        let name = format!("dialer_bench_{run_id}");
        let client = admin_client(admin).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating the database {name}"))?;
        let mut url = url::Url::parse(admin.expose()).context("DIALER_BENCH_DATABASE_URL")?;
        url.set_path(&name);
        Ok(Self {
            admin: admin.clone(),
            name,
            url: Secret::new(url.to_string()),
        })
    }

    async fn drop_it(self) {
        if let Ok(client) = admin_client(&self.admin).await {
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

async fn admin_client(admin: &Secret) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(admin.expose(), tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "(10) needs PostgreSQL: cannot connect to DIALER_BENCH_DATABASE_URL {}",
                crate::config::redact_url(admin.expose())
            )
        })?;
    tokio::spawn(connection);
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// (3) Rate precision.

/// What (3) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RatePrecision {
    /// The worker's limit R, requests per second.
    pub(crate) limit_per_sec: u32,
    /// The worker's burst.
    pub(crate) burst: u32,
    /// The simulator's own limit: requests per 1-second fixed window per token.
    pub(crate) simulator_limit_per_sec: u32,
    /// Seconds of backlog measured, from the first request on.
    pub(crate) seconds: f64,
    /// API requests in the measured span.
    pub(crate) requests: usize,
    /// Requests per second achieved in the span.
    pub(crate) achieved_per_sec: f64,
    /// Achieved / R.
    pub(crate) precision: f64,
    /// Largest count in any sliding 1-second window (arrival milliseconds), whole run.
    pub(crate) max_in_any_second: usize,
    /// The bound a precise limiter keeps: R + burst.
    pub(crate) bound_per_second: u32,
    /// 429 answers the simulator sent.
    pub(crate) too_many_requests: u64,
    /// Requests in each 1-second bucket from the first request on (the chart's data).
    pub(crate) per_second: Vec<usize>,
    /// Largest gap between consecutive requests, milliseconds (a stall shows here).
    pub(crate) max_gap_ms: u64,
}

/// Runs (3): a backlog of jobs, a worker limited to R with the given burst, and a simulator
/// whose own limit is 25 % above R per 1-second window (as Genesys's 300/min is above the
/// default 4/s), so any burst above R + burst shows as 429s.
pub(crate) async fn rate_precision(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<RatePrecision> {
    let limit = plan.rate;
    let simulator_limit = limit + limit.div_ceil(4).max(2);
    let seconds = plan.rate_duration.as_secs_f64();
    let lab = Lab::open(base, run_id, "rate").await?;
    let result = async {
        let sim = sim::start(sim_settings(simulator_limit, Duration::from_secs(1), 0)).await?;
        // Enough for the whole span and then some: the backlog must never run dry.
        let jobs = (f64::from(limit) * (seconds + 3.0)).ceil() as usize;
        lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
            .await?;
        let worker = InProcess::start(
            &lab.broker,
            &sim,
            plan.concurrency,
            rate(limit)?,
            plan.rate_burst,
            None,
        )
        .await;
        with_worker(worker, async {
            let first_deadline = Instant::now() + Duration::from_secs(20);
            while sim.stats().api_requests == 0 {
                if Instant::now() > first_deadline {
                    bail!("no request reached the simulator within 20 s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The span, plus a little so the last bucket is complete.
            tokio::time::sleep(plan.rate_duration + Duration::from_millis(300)).await;
            Ok(())
        })
        .await?;
        let arrivals: Vec<u64> = sim
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/api/v2/"))
            .map(|r| r.at_ms)
            .collect();
        let too_many_requests = sim.stats().rate_limited;
        sim.shutdown().await;
        let origin = *arrivals.first().context("no API request recorded")?;
        let span_ms = plan.rate_duration.as_millis() as u64;
        let requests = arrivals.iter().filter(|&&at| at < origin + span_ms).count();
        let achieved = requests as f64 / seconds;
        let buckets = plan.rate_duration.as_secs().max(1) as usize;
        let max_gap_ms = arrivals
            .windows(2)
            .filter(|w| w[1] < origin + span_ms)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        Ok(RatePrecision {
            limit_per_sec: limit,
            burst: plan.rate_burst,
            simulator_limit_per_sec: simulator_limit,
            seconds,
            requests,
            achieved_per_sec: achieved,
            precision: achieved / f64::from(limit),
            max_in_any_second: stats::max_in_window(&arrivals, 1000),
            bound_per_second: limit + plan.rate_burst,
            too_many_requests,
            per_second: stats::per_second(&arrivals, origin, buckets),
            max_gap_ms,
        })
    }
    .await;
    lab.cleanup().await;
    result
}

// ---------------------------------------------------------------------------------------------
// (4) Overhead.

/// Percentiles of one latency distribution, milliseconds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Latency {
    /// Samples.
    pub(crate) samples: usize,
    /// Median.
    pub(crate) p50_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// Largest.
    pub(crate) max_ms: f64,
}

impl Latency {
    fn of(values_ms: &[f64]) -> anyhow::Result<Latency> {
        let at = |p| stats::percentile(values_ms, p).context("no samples");
        Ok(Latency {
            samples: values_ms.len(),
            p50_ms: at(50.0)?,
            p99_ms: at(99.0)?,
            max_ms: at(100.0)?,
        })
    }
}

/// What (4) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Overhead {
    /// Jobs were published one at a time, this many milliseconds apart.
    pub(crate) interval_ms: f64,
    /// Delivery → the place-call request reaching the simulator: the worker's share.
    pub(crate) delivery_to_genesys: Latency,
    /// Publish → delivery (the broker's share), seen on the tap queue.
    pub(crate) publish_to_delivery: Latency,
    /// Publish → the request reaching the simulator (broker and worker together).
    pub(crate) publish_to_genesys: Latency,
}

/// Runs (4). The worker's delivery instant cannot be seen from outside, so every job is
/// published to the jobs exchange, which routes it both to the worker's queue and to a tap
/// queue of the same type that the bench consumes (same prefetch, manual acks): the tap's
/// delivery instant stands for the worker's. Publish and tap instants are wall-clock
/// microseconds; the simulator records arrivals on its wall-clock anchor with sub-millisecond
/// resolution. Jobs go one at a time, so the limiter and concurrency never bind.
pub(crate) async fn overhead(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<Overhead> {
    let mut lab = Lab::open(base, run_id, "overhead").await?;
    let result = async {
        let tap = super::lab::tap_queue(&lab.broker.prefix);
        lab.declare_queue_like_jobs(&tap).await?;
        lab.bind_to_jobs_exchange(&tap).await?;
        let samples = through_worker(&lab, &tap, plan, run_id).await?;
        let column = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
        Ok(Overhead {
            interval_ms: stats::ms(plan.overhead_interval),
            delivery_to_genesys: Latency::of(&column(|s| s.arrived_ms - s.delivered_ms))?,
            publish_to_delivery: Latency::of(&column(|s| s.delivered_ms))?,
            publish_to_genesys: Latency::of(&column(|s| s.arrived_ms))?,
        })
    }
    .await;
    lab.cleanup().await;
    result
}

/// One job's instants, milliseconds after its publish.
struct Sample {
    delivered_ms: f64,
    arrived_ms: f64,
}

/// Microseconds since the epoch, now.
fn wall_us() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i128)
}

/// Jobs through the worker one at a time, with the tap consumer watching their delivery.
async fn through_worker(
    lab: &Lab,
    tap: &str,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<Vec<Sample>> {
    // A fresh simulator: its records' wall-clock times are anchored at its start, so a short
    // life keeps clock drift out of the figures.
    let sim = unlimited_sim(0).await?;
    let warm_up = plan.overhead_warm_up;
    let total = warm_up + plan.overhead_samples;
    let tapping = tap_deliveries(lab, tap, total, plan).await?;
    let collector = lab.collect_events(total, plan.run_timeout).await?;
    let worker = InProcess::start(
        &lab.broker,
        &sim,
        plan.concurrency,
        rate(NO_LIMIT_PER_SEC)?,
        10_000,
        None,
    )
    .await;
    let mut sent = Vec::with_capacity(total);
    with_worker(worker, async {
        let mut ticks = tokio::time::interval(plan.overhead_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut confirms = Vec::new();
        for i in 0..total {
            ticks.tick().await;
            let body = job_body(run_id, i, &[]);
            let properties = job_properties().with_message_id(ShortString::from(i.to_string()));
            sent.push(wall_us());
            confirms.push(lab.send_to_jobs_exchange(&body, properties).await?);
        }
        super::lab::await_confirms(&mut confirms).await?;
        collector.finish().await
    })
    .await?;
    let delivered = tapping.await.context("the tap consumer panicked")??;
    let mut arrived = vec![None; total];
    for call in sim.placed_calls() {
        let index: usize = call
            .attributes
            .get("crmRecord")
            .and_then(|record| record.strip_prefix("crm-")?.parse().ok())
            .context("a placed call without the bench's crmRecord")?;
        let at =
            OffsetDateTime::parse(&call.at, &Rfc3339).context("the simulator's arrival time")?;
        if let Some(slot) = arrived.get_mut(index) {
            *slot = Some(at.unix_timestamp_nanos() / 1000);
        }
    }
    sim.shutdown().await;
    // The first jobs pay for the token, the connections and warming up: not overhead.
    let mut samples = Vec::with_capacity(plan.overhead_samples);
    for i in warm_up..total {
        let (Some(&sent), Some(&delivered), Some(&Some(arrived))) =
            (sent.get(i), delivered.get(i), arrived.get(i))
        else {
            bail!("job {i} is missing a publish, tap or arrival instant");
        };
        let Some(delivered) = delivered else {
            bail!("job {i} never reached the tap queue");
        };
        samples.push(Sample {
            delivered_ms: (delivered - sent) as f64 / 1000.0,
            arrived_ms: (arrived - sent) as f64 / 1000.0,
        });
    }
    Ok(samples)
}

/// Consumes the tap queue like the worker consumes its own (prefetch, manual acks) and
/// records each job's delivery instant (wall-clock µs), by job index.
async fn tap_deliveries(
    lab: &Lab,
    tap: &str,
    total: usize,
    plan: &Plan,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<Option<i128>>>>> {
    let channel = lab
        .connection()
        .create_channel()
        .await
        .context("opening the tap channel")?;
    channel
        .basic_qos(plan.concurrency, BasicQosOptions { global: false })
        .await
        .context("setting the tap's prefetch")?;
    let mut consumer = channel
        .basic_consume(
            ShortString::from(tap),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming the tap queue")?;
    let timeout = plan.run_timeout;
    Ok(tokio::spawn(async move {
        let mut delivered = vec![None; total];
        let deadline = tokio::time::Instant::now() + timeout;
        for _ in 0..total {
            let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(delivery)) => delivery.context("receiving from the tap")?,
                Ok(None) => bail!("the tap consumer was cancelled"),
                Err(_) => bail!("the tap saw too few jobs within {timeout:?}"),
            };
            let at = wall_us();
            let index: usize = delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| id.as_str().parse().ok())
                .context("a tapped job without its index")?;
            if let Some(slot) = delivered.get_mut(index) {
                *slot = Some(at);
            }
            delivery
                .acker
                .ack(BasicAckOptions { multiple: false })
                .await
                .context("acking on the tap")?;
        }
        let _ = channel.close(200, ShortString::from("done")).await;
        Ok(delivered)
    }))
}

// ---------------------------------------------------------------------------------------------
// (5) Slow Genesys.

/// What (5) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SlowGenesys {
    /// Simulator latency added to every API answer.
    pub(crate) latency_ms: u64,
    /// Worker concurrency C.
    pub(crate) concurrency: u16,
    /// Worker rate limit R.
    pub(crate) limit_per_sec: u32,
    /// min(R, C / latency).
    pub(crate) bound_per_sec: f64,
    /// Jobs run.
    pub(crate) jobs: usize,
    /// Steady jobs per second.
    pub(crate) jobs_per_sec: f64,
    /// Achieved / bound.
    pub(crate) ratio: f64,
}

/// Runs (5).
pub(crate) async fn slow_genesys(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<SlowGenesys> {
    let lab = Lab::open(base, run_id, "slow").await?;
    let result = async {
        let latency_ms = plan.slow_latency_ms;
        let concurrency = plan.slow_concurrency;
        let limit = plan.slow_rate;
        let sim = unlimited_sim(latency_ms).await?;
        let jobs = usize::from(concurrency) * plan.slow_batches;
        lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
            .await?;
        let collector = lab.collect_events(jobs, plan.run_timeout).await?;
        let worker = InProcess::start(
            &lab.broker,
            &sim,
            concurrency,
            rate(limit)?,
            u32::from(concurrency),
            None,
        )
        .await;
        let events = with_worker(worker, collector.finish()).await?;
        sim.shutdown().await;
        // Whole batches of C: the first (token, connections) and last (drain) are left out.
        let c = usize::from(concurrency);
        let jobs_per_sec = stats::rate_between(&events.times, c, jobs - c)
            .context("too few events to compute a rate")?;
        let bound = f64::from(limit).min(f64::from(concurrency) * 1000.0 / latency_ms as f64);
        Ok(SlowGenesys {
            latency_ms,
            concurrency,
            limit_per_sec: limit,
            bound_per_sec: bound,
            jobs,
            jobs_per_sec,
            ratio: jobs_per_sec / bound,
        })
    }
    .await;
    lab.cleanup().await;
    result
}
