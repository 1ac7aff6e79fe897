//! `dialer bench`: measures, in one run against a real broker and an in-process simulator, the
//! broker's ceiling for the worker's traffic, the worker's throughput, rate precision, overhead,
//! behaviour against a slow Genesys, memory and the simulator's own capacity (issue 4); and for
//! a fleet of three worker processes, the shared budget's precision and the adaptive limit's
//! goodput (issue 7).
//!
//! Each measurement gets its own queue names (`<prefix>.bench-<run id>-<name>.*`) and deletes
//! them when done; every loop is bounded in count and time; traffic goes only to 127.0.0.1 and
//! the configured broker.

mod ceiling;
mod chart;
mod cpu;
mod dialer;
mod fleet;
mod font;
mod lab;
mod memory;
mod report;
mod simcap;
mod stats;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cli::BenchArgs;
use crate::config::{self, BrokerSettings, ConfigError, QueueType, Secret};
use report::Report;

/// The nine measurements, in the order they run and print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Measure {
    /// (1) The broker's ceiling for the worker's traffic.
    Ceiling,
    /// (2) The worker's throughput.
    Throughput,
    /// (3) Rate precision.
    Rate,
    /// (4) Overhead from delivery to Genesys.
    Overhead,
    /// (5) Throughput against a slow Genesys.
    Slow,
    /// (6) Memory with many jobs in flight.
    Memory,
    /// (7) The simulator's capacity.
    Simulator,
    /// (8) Fleet precision: three processes sharing one budget, with Redis and in share mode.
    Fleet,
    /// (9) Adaptive goodput against a limit half the budget.
    Adaptive,
    /// (10) Throughput with each decision store: memory, file, PostgreSQL.
    Stores,
}

impl Measure {
    const ALL: [Measure; 10] = [
        Self::Ceiling,
        Self::Throughput,
        Self::Rate,
        Self::Overhead,
        Self::Slow,
        Self::Memory,
        Self::Simulator,
        Self::Fleet,
        Self::Adaptive,
        Self::Stores,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling",
            Self::Throughput => "throughput",
            Self::Rate => "rate",
            Self::Overhead => "overhead",
            Self::Slow => "slow",
            Self::Memory => "memory",
            Self::Simulator => "simulator",
            Self::Fleet => "fleet",
            Self::Adaptive => "adaptive",
            Self::Stores => "stores",
        }
    }

    fn parse(raw: &str) -> Option<Measure> {
        let raw = raw.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .find(|m| raw == m.name() || raw == (**m as u8 + 1).to_string())
            .copied()
    }
}

/// What `dialer bench` was asked to do, parsed.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// The broker; the prefix is the base of the bench's own names.
    pub broker: BrokerSettings,
    /// The smoke run.
    pub quick: bool,
    /// Where to write the figures as JSON.
    pub json: Option<PathBuf>,
    /// Where to write the rate chart.
    pub chart: Option<PathBuf>,
    /// Worker concurrency (and prefetch of the bare loop).
    pub concurrency: u16,
    /// Jobs of (1) and (2).
    pub jobs: usize,
    /// R of (3).
    pub rate: u32,
    /// Burst of (3).
    pub rate_burst: u32,
    /// Backlog duration of (3).
    pub rate_duration: Duration,
    /// Rounds of (1) and (2), alternating; the medians are reported.
    pub rounds: usize,
    /// The measurements to run.
    pub only: BTreeSet<Measure>,
    /// Where the in-process worker's logs go (none: discarded).
    pub worker_log: Option<PathBuf>,
    /// The PostgreSQL server of (10), as an administrator URL: the run creates its own
    /// database there and drops it.
    pub database_url: Secret,
}

fn bad(variable: &'static str, flag: &'static str, problem: String) -> ConfigError {
    ConfigError {
        variable,
        flag,
        problem,
    }
}

/// Parses the flags of `dialer bench`.
pub fn settings(args: &BenchArgs) -> Result<BenchSettings, ConfigError> {
    let broker = config::broker_settings(&args.broker)?;
    let whole = |raw: &str, variable, flag, min: u64, max: u64| {
        raw.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                bad(
                    variable,
                    flag,
                    format!("{raw:?} is not a whole number from {min} to {max}"),
                )
            })
    };
    let concurrency = whole(
        &args.concurrency,
        "DIALER_BENCH_CONCURRENCY",
        "concurrency",
        1,
        10_000,
    )? as u16;
    let jobs = match &args.jobs {
        Some(raw) => whole(raw, "DIALER_BENCH_JOBS", "jobs", 10, 10_000_000)? as usize,
        None if args.quick => 400,
        None => 20_000,
    };
    let rounds = match &args.rounds {
        Some(raw) => whole(raw, "DIALER_BENCH_ROUNDS", "rounds", 1, 20)? as usize,
        None if args.quick => 1,
        None => 3,
    };
    let rate = whole(&args.rate, "DIALER_BENCH_RATE", "rate", 1, 10_000)? as u32;
    let rate_burst = whole(
        &args.rate_burst,
        "DIALER_BENCH_RATE_BURST",
        "rate-burst",
        1,
        10_000,
    )? as u32;
    let rate_duration = match &args.rate_duration {
        Some(raw) => config::parse_duration(raw)
            .map_err(|problem| bad("DIALER_BENCH_RATE_DURATION", "rate-duration", problem))?,
        None if args.quick => Duration::from_secs(3),
        None => Duration::from_secs(30),
    };
    if rate_duration < Duration::from_secs(1) || rate_duration > Duration::from_secs(600) {
        return Err(bad(
            "DIALER_BENCH_RATE_DURATION",
            "rate-duration",
            "must be from 1s to 10m".into(),
        ));
    }
    let only = match args.only.as_deref().map(str::trim).filter(|o| !o.is_empty()) {
        None => Measure::ALL.into_iter().collect(),
        Some(list) => list
            .split(',')
            .map(|item| {
                Measure::parse(item).ok_or_else(|| {
                    bad(
                        "DIALER_BENCH_ONLY",
                        "only",
                        format!("{item:?} is not a measurement; expected 1-9 or ceiling, throughput, rate, overhead, slow, memory, simulator, fleet, adaptive"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let chart = args
        .chart
        .clone()
        .or_else(|| args.json.as_deref().map(chart_next_to));
    Ok(BenchSettings {
        broker,
        quick: args.quick,
        json: args.json.clone(),
        chart,
        concurrency,
        jobs,
        rate,
        rate_burst,
        rate_duration,
        rounds,
        only,
        worker_log: args.worker_log.clone(),
        database_url: Secret::new(args.database_url.trim()),
    })
}

/// `dir/name.json` → `dir/name-rate.png`.
fn chart_next_to(json: &Path) -> PathBuf {
    let stem = json
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bench".into());
    json.with_file_name(format!("{stem}-rate.png"))
}

/// The sizes of every measurement, from the settings and `--quick`.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    concurrency: u16,
    jobs: usize,
    file_store_jobs: usize,
    rate: u32,
    rate_burst: u32,
    rate_duration: Duration,
    overhead_samples: usize,
    overhead_warm_up: usize,
    overhead_interval: Duration,
    slow_latency_ms: u64,
    slow_concurrency: u16,
    slow_rate: u32,
    slow_batches: usize,
    memory_concurrency: u16,
    memory_latency_ms: u64,
    memory_jobs: usize,
    sim_clients: usize,
    sim_duration: Duration,
    /// The fleet's budget R of (8) and (9) (the simulator's limit in (9) is half of it).
    fleet_rate: u32,
    /// The burst of (8).
    fleet_burst: u32,
    /// How long (8) and (9) measure.
    fleet_duration: Duration,
    /// What (9) leaves out at the start, while the limit is being found.
    adaptive_warm_up: Duration,
    /// The longest any single wait of a measurement may take before it fails.
    run_timeout: Duration,
}

impl Plan {
    fn new(settings: &BenchSettings) -> Plan {
        let quick = settings.quick;
        Plan {
            concurrency: settings.concurrency,
            jobs: settings.jobs,
            // Fewer: every decision is two fsynced transactions.
            file_store_jobs: (settings.jobs / 4).max(10),
            rate: settings.rate,
            rate_burst: settings.rate_burst,
            rate_duration: settings.rate_duration,
            overhead_samples: if quick { 50 } else { 1000 },
            overhead_warm_up: 20,
            // Far apart enough that no two jobs overlap, close enough to keep the run short.
            overhead_interval: Duration::from_millis(10),
            slow_latency_ms: 300,
            slow_concurrency: if quick { 8 } else { settings.concurrency },
            // Well above C / latency, so that the bound is C / latency.
            slow_rate: 1000,
            slow_batches: if quick { 6 } else { 40 },
            memory_concurrency: if quick { 100 } else { 1000 },
            memory_latency_ms: if quick { 500 } else { 1000 },
            memory_jobs: if quick { 200 } else { 3000 },
            sim_clients: if quick { 16 } else { 64 },
            sim_duration: if quick {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(3)
            },
            fleet_rate: settings.rate,
            // As many as replicas: in share mode each replica gets at least 1 (see the docs).
            fleet_burst: 3,
            fleet_duration: if quick {
                Duration::from_secs(4)
            } else {
                Duration::from_secs(30)
            },
            adaptive_warm_up: Duration::from_secs(10),
            run_timeout: if quick {
                Duration::from_secs(60)
            } else {
                Duration::from_secs(120)
            },
        }
    }
}

/// Runs the benchmark: prints the table, writes the JSON and the chart. Fails when a
/// measurement failed (after printing what the others measured).
pub async fn run(settings: BenchSettings) -> anyhow::Result<()> {
    // Its own runtime on its own thread, so that the worker's logs (and the simulator's) can
    // be routed away from the table: a thread-local default subscriber on every thread of that
    // runtime. The runtime is built like `dialer run`'s (multi-threaded, one thread per core).
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dialer-bench".into())
        .spawn(move || {
            let _ = done.send(run_on_own_runtime(settings));
        })
        .context("starting the bench thread")?;
    result
        .await
        .context("the bench thread stopped unexpectedly")?
}

fn run_on_own_runtime(settings: BenchSettings) -> anyhow::Result<()> {
    let dispatch = worker_log(settings.worker_log.as_deref())?;
    let for_threads = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            // The guard would restore the global subscriber when dropped; these threads
            // should use the bench's for their whole life, so it is never dropped.
            std::mem::forget(tracing::dispatcher::set_default(&for_threads));
        })
        .build()
        .context("starting the bench's runtime")?;
    tracing::dispatcher::with_default(&dispatch, || runtime.block_on(bench(settings)))
}

/// The subscriber of the bench's runtime: `RUST_LOG` (default `info`, like `dialer run`) into
/// the `--worker-log` file, or into /dev/null: the worker still formats and writes every line
/// it would in production, but the terminal shows only the table.
fn worker_log(path: Option<&Path>) -> anyhow::Result<tracing::Dispatch> {
    let file = match path {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the worker log {}", path.display()))?,
        None => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .finish();
    Ok(tracing::Dispatch::new(subscriber))
}

async fn bench(settings: BenchSettings) -> anyhow::Result<()> {
    let plan = Plan::new(&settings);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..RUN_ID_LEN].to_owned();
    let started = Instant::now();
    let mut report = Report {
        version: env!("CARGO_PKG_VERSION"),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        quick: settings.quick,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        broker: config::redact_url(&settings.broker.amqp_url),
        queue_type: match settings.broker.queue_type {
            QueueType::Quorum => "quorum".into(),
            QueueType::Classic => "classic".into(),
        },
        started_at: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default(),
        ..Report::default()
    };
    println!(
        "dialer bench {} ({} build{}): broker {}, {} jobs queues, {} cores, run {run_id}",
        report.version,
        report.build,
        if settings.quick { ", quick" } else { "" },
        report.broker,
        report.queue_type,
        report.cores,
    );
    // Another build or test on the machine skews every figure: say so up front.
    report.busy_before_percent = cpu::machine_busy_percent(Duration::from_millis(500)).await;
    if let Some(busy) = report.busy_before_percent.filter(|busy| *busy > 15.0) {
        println!(
            "warning: the machine was {busy:.0} % busy before the run started; the figures will be lower and noisier"
        );
    }
    if report.build == "debug" && !settings.quick {
        println!("note: a debug build; build with --release for figures worth comparing");
    }
    let broker = &settings.broker;
    // (1) and (2) alternate for a few rounds: the ratio of each pair is taken back to back,
    // so a change in the machine's background load between them weighs less.
    let mut steps = Vec::new();
    for round in 0..settings.rounds {
        for measure in [Measure::Ceiling, Measure::Throughput] {
            if settings.only.contains(&measure) {
                steps.push((measure, round));
            }
        }
    }
    // Then once with the default (embedded, crash-safe) decision store, for sizing.
    if settings.only.contains(&Measure::Throughput) {
        steps.push((Measure::Throughput, FILE_STORE_ROUND));
    }
    steps.extend(
        settings
            .only
            .iter()
            .filter(|m| !matches!(m, Measure::Ceiling | Measure::Throughput))
            .map(|m| (*m, 0)),
    );
    let mut ceilings = Vec::new();
    let mut throughputs = Vec::new();
    for (measure, round) in steps {
        let clock = Instant::now();
        let round_note = if round == FILE_STORE_ROUND {
            " (file decision store)".to_owned()
        } else if settings.rounds > 1 && round_based(measure) {
            format!(" (round {} of {})", round + 1, settings.rounds)
        } else {
            String::new()
        };
        print!("  {} {}{round_note} ...", measure as u8 + 1, measure.name());
        flush();
        let measuring = async {
            match measure {
                Measure::Ceiling => {
                    ceilings.push((round, ceiling::run(broker, &plan, &run_id).await?))
                }
                Measure::Throughput if round == FILE_STORE_ROUND => {
                    report.throughput_file_store = Some(
                        dialer::throughput(
                            broker,
                            &plan,
                            &run_id,
                            plan.file_store_jobs,
                            &dialer::StoreUnderTest::File,
                        )
                        .await?,
                    );
                }
                Measure::Throughput => throughputs.push((
                    round,
                    dialer::throughput(
                        broker,
                        &plan,
                        &run_id,
                        plan.jobs,
                        &dialer::StoreUnderTest::Memory,
                    )
                    .await?,
                )),
                Measure::Rate => {
                    report.rate = Some(dialer::rate_precision(broker, &plan, &run_id).await?)
                }
                Measure::Overhead => {
                    report.overhead = Some(dialer::overhead(broker, &plan, &run_id).await?)
                }
                Measure::Slow => {
                    report.slow_genesys = Some(dialer::slow_genesys(broker, &plan, &run_id).await?)
                }
                Measure::Memory => report.memory = Some(memory::run(broker, &plan, &run_id).await?),
                Measure::Simulator => report.simulator = Some(simcap::run(&plan).await?),
                Measure::Fleet => {
                    // Both modes even if one fails: they answer different questions.
                    let redis = fleet::precision(broker, &plan, &run_id, true).await;
                    let share = fleet::precision(broker, &plan, &run_id, false).await;
                    report.fleet_redis = Some(redis?);
                    report.fleet_share = Some(share?);
                }
                Measure::Adaptive => {
                    report.adaptive = Some(fleet::adaptive(broker, &plan, &run_id).await?)
                }
                Measure::Stores => {
                    report.stores = Some(
                        dialer::store_throughputs(broker, &plan, &run_id, &settings.database_url)
                            .await?,
                    )
                }
            }
            Ok(())
        };
        // Ctrl-C drops the measurement half-way, before it cleans up: delete what it may have
        // declared (the names are known from the run id), then stop.
        let outcome: anyhow::Result<()> = tokio::select! {
            outcome = measuring => outcome,
            _ = tokio::signal::ctrl_c() => {
                println!(" interrupted; deleting the bench's queues");
                lab::delete_run(broker, &run_id, &LAB_NAMES).await;
                anyhow::bail!("interrupted");
            }
        };
        match outcome {
            Ok(()) => println!(" {:.1} s", clock.elapsed().as_secs_f64()),
            Err(error) => {
                println!(" failed after {:.1} s", clock.elapsed().as_secs_f64());
                report.failures.push(format!(
                    "({}) {}{round_note}: {error:#}",
                    measure as u8 + 1,
                    measure.name()
                ));
            }
        }
    }
    let ratios: Vec<f64> = ceilings
        .iter()
        .filter_map(|(round, c)| {
            let (_, t) = throughputs.iter().find(|(r, _)| r == round)?;
            Some(t.jobs_per_sec / c.jobs_per_sec)
        })
        .collect();
    report.throughput_ratio = stats::percentile(&ratios, 50.0);
    report.throughput_ratio_rounds = ratios;
    report.ceiling_rounds = ceilings.iter().map(|(_, c)| c.jobs_per_sec).collect();
    report.throughput_rounds = throughputs.iter().map(|(_, t)| t.jobs_per_sec).collect();
    report.ceiling = median_by(ceilings.into_iter().map(|(_, c)| c).collect(), |c| {
        c.jobs_per_sec
    });
    report.throughput = median_by(throughputs.into_iter().map(|(_, t)| t).collect(), |t| {
        t.jobs_per_sec
    });
    if let (Some(rate), Some(path)) = (&report.rate, &settings.chart) {
        match chart::write(rate, path) {
            Ok(()) => report.chart = Some(path.display().to_string()),
            Err(error) => report.failures.push(format!("chart: {error:#}")),
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    println!();
    print!("{}", report.table());
    if let Some(chart) = &report.chart {
        println!("rate chart: {chart}");
    }
    if let Some(path) = &settings.json {
        let json = serde_json::to_vec_pretty(&report).context("serialising the figures")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("figures: {}", path.display());
    }
    println!("total {:.1} s", report.seconds);
    if !report.failures.is_empty() {
        anyhow::bail!(
            "{} of the measurements failed (see above)",
            report.failures.len()
        );
    }
    Ok(())
}

/// The names of every measurement's queues (`<prefix>.bench-<run id>-<name>.*`).
const LAB_NAMES: [&str; 11] = [
    "ceiling",
    "throughput",
    "throughput-file",
    "throughput-postgres",
    "rate",
    "overhead",
    "slow",
    "memory",
    "fleet-redis",
    "fleet-share",
    "adaptive",
];

/// The step of (2) that runs with the file decision store.
const FILE_STORE_ROUND: usize = usize::MAX;

/// Whether a measurement runs once per round.
fn round_based(measure: Measure) -> bool {
    matches!(measure, Measure::Ceiling | Measure::Throughput)
}

/// The element with the median `key` (the lower of the two middle ones).
fn median_by<T>(mut items: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    if items.is_empty() {
        return None;
    }
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = (items.len() - 1) / 2;
    Some(items.swap_remove(middle))
}

fn flush() {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------------------------
// The jobs every measurement publishes: one shape, fixed sizes.

/// Length of a run id (hex).
const RUN_ID_LEN: usize = 8;
/// Length of a job id: the run id, a dash, seven digits.
const JOB_ID_LEN: usize = RUN_ID_LEN + 8;
/// The number every bench job dials (valid, E.164).
const PHONE: &str = "+14155552671";
/// The worker name in bench events.
const WORKER_NAME: &str = "dialer-bench";

/// The id of job `i` of run `run_id`.
fn job_id(run_id: &str, i: usize) -> String {
    format!("{run_id}-{i:07}")
}

/// The CRM record attribute of job `i`.
fn crm_record(i: usize) -> String {
    format!("crm-{i:07}")
}

/// The demo set's first agent: active in every simulator the bench starts.
fn agent_id() -> String {
    crate::sim::SimAgent::demo_set()
        .into_iter()
        .next()
        .map(|agent| agent.id)
        .unwrap_or_default()
}

/// A job body like a CRM's: id, agent, number, one CRM attribute, plus `extra` attributes.
fn job_body(run_id: &str, i: usize, extra: &[(&str, String)]) -> Vec<u8> {
    let mut attributes = serde_json::Map::new();
    attributes.insert("crmRecord".into(), crm_record(i).into());
    for (name, value) in extra {
        attributes.insert((*name).into(), value.clone().into());
    }
    let job = serde_json::json!({
        "jobId": job_id(run_id, i),
        "agentUserId": agent_id(),
        "phoneNumber": PHONE,
        "attributes": attributes,
    });
    serde_json::to_vec(&job).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_have_fixed_sizes_and_parse() {
        let a = job_body("0123abcd", 0, &[]);
        let b = job_body("0123abcd", 9_999_999, &[]);
        assert_eq!(a.len(), b.len());
        assert_eq!(job_id("0123abcd", 5).len(), JOB_ID_LEN);
        let job = crate::job::parse_job(&a, None).expect("a valid job");
        assert_eq!(job.job_id.as_str(), "0123abcd-0000000");
    }

    #[test]
    fn measures_parse_by_number_or_name() {
        assert_eq!(Measure::parse("1"), Some(Measure::Ceiling));
        assert_eq!(Measure::parse(" memory "), Some(Measure::Memory));
        assert_eq!(Measure::parse("7"), Some(Measure::Simulator));
        assert_eq!(Measure::parse("8"), Some(Measure::Fleet));
        assert_eq!(Measure::parse("adaptive"), Some(Measure::Adaptive));
        assert_eq!(Measure::parse("10"), Some(Measure::Stores));
        assert_eq!(Measure::parse("11"), None);
        assert_eq!(
            chart_next_to(Path::new("target/b.json")),
            PathBuf::from("target/b-rate.png")
        );
    }
}
