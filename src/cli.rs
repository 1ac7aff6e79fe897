//! The command line: subcommands and their flags, each flag backed by an environment variable.
//!
//! Values stay strings here; [`crate::config`] parses them so that a bad value is reported
//! with the variable's name and what it accepts, whichever of flag or variable supplied it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Outbound dialer: dial jobs from RabbitMQ, calls placed through Genesys Cloud, result events back.
#[derive(Debug, Parser)]
#[command(name = "dialer", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format: text or json (the filter is RUST_LOG, default info).
    #[arg(long, global = true, env = "DIALER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands (contract §7).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The worker: consume dial jobs, place calls, publish result events.
    Run(RunArgs),
    /// A Genesys Cloud simulator for development, tests and benchmarks.
    Sim(SimArgs),
    /// Publish jobs from NDJSON (file or stdin) with confirms.
    Enqueue(EnqueueArgs),
    /// Count, show and replay dead-lettered jobs.
    Dlq(DlqArgs),
    /// Declare the queues and exchanges and exit.
    Topology(BrokerArgs),
    /// Prove the configuration: broker reachable, token obtained, permissions present.
    Check(RunArgs),
    /// The simulator, a worker and sample jobs in one process, with a summary.
    Demo(DemoArgs),
    /// Measure throughput, rate precision, overhead and memory against a broker.
    Bench(BenchArgs),
    /// Show a job's recorded decision; list `unknown` jobs for reconciliation.
    Decisions(DecisionsArgs),
}

/// Where the broker is and what the topology is called. Global, so `dialer dlq count --prefix p`
/// works as well as `dialer dlq --prefix p count`.
#[derive(Debug, Args, Clone)]
pub struct BrokerArgs {
    /// AMQP URL of the broker (amqp:// or amqps://).
    #[arg(
        long,
        global = true,
        env = "DIALER_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// Prefix of every queue and exchange name.
    #[arg(long, global = true, env = "DIALER_PREFIX", default_value = "dialer")]
    pub prefix: String,
    /// Type of the jobs queue: quorum or classic.
    #[arg(
        long,
        global = true,
        env = "DIALER_QUEUE_TYPE",
        default_value = "quorum"
    )]
    pub queue_type: String,
}

/// How to reach and authenticate against Genesys Cloud.
#[derive(Debug, Args, Clone)]
pub struct GenesysArgs {
    /// OAuth client id (client credentials grant).
    #[arg(long, env = "GENESYS_CLIENT_ID")]
    pub client_id: Option<String>,
    /// OAuth client secret (prefer GENESYS_CLIENT_SECRET_FILE).
    #[arg(long, env = "GENESYS_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// File holding the OAuth client secret (a mounted secret).
    #[arg(long, env = "GENESYS_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// Region name (us-east-1, eu-west-1, …) or domain (mypurecloud.com).
    #[arg(long, env = "GENESYS_ENVIRONMENT", default_value = "us-east-1")]
    pub environment: String,
    /// Override of the API base URL (scheme, host, port; no /api/v2).
    #[arg(long, env = "GENESYS_API_BASE_URL")]
    pub api_base_url: Option<String>,
    /// Override of the login base URL (scheme, host, port).
    #[arg(long, env = "GENESYS_LOGIN_BASE_URL")]
    pub login_base_url: Option<String>,
    /// Whole-request timeout of Genesys calls.
    #[arg(long, env = "GENESYS_TIMEOUT", default_value = "10s")]
    pub timeout: String,
    /// Connect timeout of Genesys calls.
    #[arg(long, env = "GENESYS_CONNECT_TIMEOUT", default_value = "5s")]
    pub connect_timeout: String,
}

/// Flags of `dialer run` (and `dialer check`).
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Genesys Cloud.
    #[command(flatten)]
    pub genesys: GenesysArgs,
    /// Jobs in flight per process (also the prefetch).
    #[arg(long, env = "DIALER_CONCURRENCY", default_value = "32")]
    pub concurrency: String,
    /// Genesys API requests per second (N/s) or minute (N/min) for this process.
    #[arg(long, env = "DIALER_RATE_LIMIT", default_value = "4/s")]
    pub rate_limit: String,
    /// Requests allowed back to back above the steady rate.
    #[arg(long, env = "DIALER_RATE_BURST", default_value = "1")]
    pub rate_burst: String,
    /// Genesys attempts per job before `failed`.
    #[arg(long, env = "DIALER_MAX_ATTEMPTS", default_value = "5")]
    pub max_attempts: String,
    /// Retry ambiguous answers (500/502/504, timeouts after sending); off means outcome `unknown`.
    #[arg(long, env = "DIALER_RETRY_AMBIGUOUS", default_value = "false")]
    pub retry_ambiguous: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DIALER_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: String,
    /// The decision store.
    #[command(flatten)]
    pub store: StoreArgs,
    /// How long SIGTERM waits for jobs in flight before requeueing them.
    #[arg(long, env = "DIALER_SHUTDOWN_GRACE", default_value = "20s")]
    pub shutdown_grace: String,
    /// Name of this worker in result events (default: host name and process id).
    #[arg(long, env = "DIALER_WORKER_NAME")]
    pub worker_name: Option<String>,
}

/// Where claims and decisions are kept: shared by `dialer run` and `dialer decisions`. Global,
/// so `dialer decisions show JOB --decisions postgres` works too.
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Decision store: file (embedded), postgres (shared by a fleet) or memory (tests only).
    #[arg(long, global = true, env = "DIALER_DECISIONS", default_value = "file")]
    pub decisions: String,
    /// Directory of the embedded decision store.
    #[arg(
        long,
        global = true,
        env = "DIALER_STATE_DIR",
        default_value = "./dialer-state"
    )]
    pub state_dir: PathBuf,
    /// PostgreSQL URL of the shared decision store (postgres://…; sslmode=require or
    /// verify-full for TLS).
    #[arg(
        long,
        global = true,
        env = "DIALER_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// File holding DIALER_DATABASE_URL (a mounted secret).
    #[arg(long, global = true, env = "DIALER_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
}

/// Flags of `dialer decisions`.
#[derive(Debug, Args, Clone)]
pub struct DecisionsArgs {
    /// The decision store (the same settings as `dialer run`).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print phone numbers in full (masked by default, as in logs).
    #[arg(long, global = true)]
    pub show_phone_numbers: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: DecisionsAction,
}

/// `dialer decisions` actions.
#[derive(Debug, Subcommand, Clone)]
pub enum DecisionsAction {
    /// Print one job's record (state, owner, time, recorded event) as JSON.
    Show {
        /// The job id.
        job_id: String,
    },
    /// List jobs decided `unknown`, oldest first, one JSON object per line, for reconciliation.
    Unknown {
        /// Only those decided at or after this time (RFC 3339); default: the last 7 days.
        #[arg(long)]
        since: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

/// Flags of `dialer enqueue`.
#[derive(Debug, Args, Clone)]
pub struct EnqueueArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// NDJSON file of jobs, one JSON object per line (stdin when absent or `-`).
    pub file: Option<PathBuf>,
    /// Publish lines as they are, without checking them first (the worker rejects bad ones).
    #[arg(long)]
    pub no_validate: bool,
}

/// Flags of `dialer dlq`.
#[derive(Debug, Args, Clone)]
pub struct DlqArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: DlqAction,
}

/// `dialer dlq` actions.
#[derive(Debug, Subcommand, Clone, Copy)]
pub enum DlqAction {
    /// How many jobs are dead-lettered.
    Count,
    /// Print the oldest dead-lettered jobs with why they ended there (they stay in place).
    Show {
        /// How many.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Send the oldest dead-lettered jobs back to the jobs queue, one at a time with confirms.
    Replay {
        /// How many.
        #[arg(long, default_value_t = 1)]
        limit: u32,
    },
}

/// Flags of `dialer demo`.
#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// The broker (the demo uses its own queue prefix and deletes its queues afterwards).
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Valid jobs to publish (a duplicate, two invalid jobs and an expired one are added).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub jobs: u16,
}

/// Flags of `dialer bench`. The bench uses its own queue names (`<prefix>.bench-<run id>-…`)
/// and deletes them at the end, so it never touches a deployment's queues.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// The broker to measure against.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// A smoke run of a few seconds with small numbers (for CI), instead of the full run.
    #[arg(long, env = "DIALER_BENCH_QUICK")]
    pub quick: bool,
    /// Also write the figures as JSON to this file (and the rate chart next to it, as PNG).
    #[arg(long, env = "DIALER_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Where to write the rate chart (PNG); default: next to the JSON file, `<name>-rate.png`.
    #[arg(long, env = "DIALER_BENCH_CHART")]
    pub chart: Option<PathBuf>,
    /// Jobs in flight (and prefetch) of the worker and of the bare broker loop.
    #[arg(long, env = "DIALER_BENCH_CONCURRENCY", default_value = "32")]
    pub concurrency: String,
    /// Jobs of the throughput runs (1 and 2); default 20000, 400 with --quick.
    #[arg(long, env = "DIALER_BENCH_JOBS")]
    pub jobs: Option<String>,
    /// Rounds of (1) and (2), run alternately; the medians are reported. Default 3, 1 with --quick.
    #[arg(long, env = "DIALER_BENCH_ROUNDS")]
    pub rounds: Option<String>,
    /// The rate limit R of the precision run (3), requests per second.
    #[arg(long, env = "DIALER_BENCH_RATE", default_value = "20")]
    pub rate: String,
    /// The burst of the precision run (3).
    #[arg(long, env = "DIALER_BENCH_RATE_BURST", default_value = "1")]
    pub rate_burst: String,
    /// How long the precision run (3) keeps a backlog; default 30s, 3s with --quick.
    #[arg(long, env = "DIALER_BENCH_RATE_DURATION")]
    pub rate_duration: Option<String>,
    /// Run only these measurements (comma-separated numbers or names: 1 ceiling, 2 throughput,
    /// 3 rate, 4 overhead, 5 slow, 6 memory, 7 simulator, 10 stores); default all.
    #[arg(long, env = "DIALER_BENCH_ONLY")]
    pub only: Option<String>,
    /// PostgreSQL server of (10), as an administrator URL: the run creates a database of its
    /// own there and drops it afterwards.
    #[arg(
        long,
        env = "DIALER_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Where the in-process worker's logs go (RUST_LOG filters them, default info); default
    /// nowhere, so the table stays readable while the worker still pays for its logging.
    #[arg(long, env = "DIALER_BENCH_WORKER_LOG")]
    pub worker_log: Option<PathBuf>,
}

/// Flags of `dialer sim`.
#[derive(Debug, Args, Clone)]
pub struct SimArgs {
    /// Listen address (port 0 picks a free port).
    #[arg(long, env = "DIALER_SIM_ADDR", default_value = "127.0.0.1:9900")]
    pub addr: String,
    /// The only client id the simulator accepts.
    #[arg(long, env = "GENESYS_CLIENT_ID", default_value = "demo")]
    pub client_id: String,
    /// The only client secret the simulator accepts.
    #[arg(
        long,
        env = "GENESYS_CLIENT_SECRET",
        default_value = "demo-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Agents: a JSON array of {"id","email","name","state"}, or the path of a file holding one.
    #[arg(long, env = "DIALER_SIM_AGENTS")]
    pub agents: Option<String>,
    /// API requests allowed per token (N/s or N/min).
    #[arg(long, env = "DIALER_SIM_RATE_LIMIT", default_value = "300/min")]
    pub rate_limit: String,
    /// `expires_in` of the tokens it issues.
    #[arg(long, env = "DIALER_SIM_TOKEN_TTL", default_value = "86400s")]
    pub token_ttl: String,
    /// Faults active from the start, as the JSON accepted by PUT /sim/faults.
    #[arg(long, env = "DIALER_SIM_FAULTS")]
    pub faults: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
