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
    /// Also show the log lines of the libraries underneath (the AMQP client's own); twice for
    /// debug detail. RUST_LOG, when set, decides instead.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands (README "Commands").
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The worker: consume dial jobs, place calls, publish result events.
    #[command(after_help = "\
Examples:
  # Against the simulator (`dialer sim` in another terminal):
  GENESYS_CLIENT_ID=demo GENESYS_CLIENT_SECRET=demo-secret \\
  GENESYS_API_BASE_URL=http://127.0.0.1:9900 GENESYS_LOGIN_BASE_URL=http://127.0.0.1:9900 \\
    dialer run --prefix crm-a --state-dir /tmp/dialer-state

  # Against a real org (check first):
  GENESYS_ENVIRONMENT=eu-west-1 GENESYS_CLIENT_ID=... GENESYS_CLIENT_SECRET_FILE=/run/secrets/genesys \\
    dialer check && dialer run

Every flag has the environment variable shown next to it; a bad value stops the start with one
line naming the variable (exit 2). SIGTERM or Ctrl-C drains the jobs in flight and exits 0.")]
    Run(RunArgs),
    /// A Genesys Cloud simulator for development, tests and benchmarks.
    #[command(after_help = "\
Examples:
  dialer sim                                  # http://127.0.0.1:9900, client demo / demo-secret
  dialer sim --addr 127.0.0.1:0               # any free port; the first line says which
  dialer sim --faults '{\"latencyMs\": 300, \"errorRate\": 0.1}'

The first line printed is `listening on http://HOST:PORT`. Faults can also be changed while it
runs with PUT /sim/faults.")]
    Sim(SimArgs),
    /// Publish jobs from NDJSON or CSV (file or stdin) with confirms.
    #[command(after_help = "\
Examples:
  echo '{\"jobId\": \"lead-1001\", \"agentEmail\": \"agent1@example.com\", \"phoneNumber\": \"+14155552671\"}' \\
    | dialer enqueue
  dialer enqueue leads.ndjson
  dialer enqueue export.csv --skip-invalid    # header row: jobId,agentEmail,phoneNumber,attributes.crmLead

Every line is checked first; one bad line publishes nothing (exit 1) and is named by its line
number. CSV columns are the job's field names (docs/jobs-and-events.md).")]
    Enqueue(EnqueueArgs),
    /// Count, show and replay dead-lettered jobs.
    #[command(after_help = "\
Examples:
  dialer dlq count
  dialer dlq show --limit 5 | less
  dialer dlq replay --all --outcome failed --dry-run
  dialer dlq replay --job-id lead-1001

A replay only considers the jobs in the dead-letter queue when it starts, each at most once.")]
    Dlq(DlqArgs),
    /// Declare the queues and exchanges and exit.
    #[command(after_help = "\
Examples:
  dialer topology --prefix crm-a
  DIALER_AMQP_URL=amqps://user:pass@broker:5671/%2f dialer topology

Idempotent: declaring an existing topology again changes nothing.")]
    Topology(BrokerArgs),
    /// Prove the configuration: broker reachable, token obtained, permissions present.
    #[command(after_help = "\
Examples:
  GENESYS_ENVIRONMENT=eu-west-1 GENESYS_CLIENT_ID=... GENESYS_CLIENT_SECRET_FILE=/run/secrets/genesys \\
    dialer check

Takes the same settings as `dialer run`. One line per check; exit 1 if any failed. Nothing is
dialled.")]
    Check(RunArgs),
    /// The simulator, a worker and sample jobs in one process, with a summary.
    #[command(after_help = "\
Examples:
  dialer demo
  dialer demo --jobs 100

Needs only RabbitMQ (DIALER_AMQP_URL); uses its own queue prefix and deletes its queues.")]
    Demo(DemoArgs),
    /// Measure throughput, rate precision, overhead and memory against a broker.
    #[command(after_help = "\
Examples:
  cargo build --release && ./target/release/dialer bench --json target/bench.json
  dialer bench --quick                        # a smoke run of about 12 s
  dialer bench --only 2,3 --rate 50")]
    Bench(BenchArgs),
    /// Show a job's recorded decision; list `unknown` jobs for reconciliation.
    #[command(after_help = "\
Examples:
  dialer decisions show lead-1001
  dialer decisions unknown --since 2026-11-30T00:00:00Z
  DIALER_DECISIONS=postgres DIALER_DATABASE_URL_FILE=/run/secrets/db dialer decisions unknown

Reads whichever store DIALER_DECISIONS names (the file store may be read while its worker runs).")]
    Decisions(DecisionsArgs),
    /// Print result events as they arrive: a table on a terminal, NDJSON when piped.
    #[command(after_help = "\
Examples:
  dialer events                               # every event from now on, until Ctrl-C
  dialer events --prefix crm-a --outcome failed --outcome unknown
  dialer events --job-id lead-1001 --count 1 --timeout 2m
  dialer events | jq -r 'select(.outcome == \"placed\") | .conversationId'
  dialer events --queue crm-replies           # a queue of your own; its events stay in it

Binds a temporary queue to <prefix>.replies, so it shows events published after it started and
takes none from anybody else.")]
    Events(EventsArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    #[command(after_help = "\
Examples:
  dialer completions bash > ~/.local/share/bash-completion/completions/dialer
  dialer completions zsh > \"${fpath[1]}/_dialer\"
  dialer completions fish > ~/.config/fish/completions/dialer.fish")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Flags of `dialer events`.
#[derive(Debug, Args, Clone)]
pub struct EventsArgs {
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Read this queue (e.g. a CRM's reply_to queue) instead of a temporary one bound to
    /// `<prefix>.replies`; nothing is acknowledged, so its events stay in it.
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Only events with this outcome (repeatable): placed, rejected, failed, unknown, expired,
    /// duplicate.
    #[arg(long, value_name = "OUTCOME")]
    pub outcome: Vec<String>,
    /// Only the events of this job id (repeatable).
    #[arg(long, value_name = "ID")]
    pub job_id: Vec<String>,
    /// Exit after printing this many events (exit 1 if --timeout passes first).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Exit after this long without an event (e.g. 30s, 2m).
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Output: table or json (NDJSON); default a table on a terminal, NDJSON otherwise.
    #[arg(long, value_name = "FORMAT", value_parser = ["table", "json"])]
    pub format: Option<String>,
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
    /// Whose budget DIALER_RATE_LIMIT is: process (this one's) or fleet (all replicas together).
    #[arg(long, env = "DIALER_RATE_SCOPE", default_value = "process")]
    pub rate_scope: String,
    /// Redis holding the fleet's shared rate budget (fleet scope; without it: equal shares).
    #[arg(long, env = "DIALER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
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
    /// How long jobs in flight (or the async runtime) may stand still before /healthz fails.
    #[arg(long, env = "DIALER_LIVENESS_TIMEOUT", default_value = "120s")]
    pub liveness_timeout: String,
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
    /// File of jobs: NDJSON (one JSON object per line) or CSV (a header row of field names);
    /// stdin when absent or `-`.
    pub file: Option<PathBuf>,
    /// Input format: ndjson or csv; default csv for a `.csv` file, else ndjson.
    #[arg(long, value_name = "FORMAT", value_parser = ["ndjson", "csv"])]
    pub format: Option<String>,
    /// Publish the valid lines even if some are invalid (listed on stderr); by default one
    /// invalid line publishes nothing.
    #[arg(long)]
    pub skip_invalid: bool,
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
#[derive(Debug, Subcommand, Clone)]
pub enum DlqAction {
    /// How many jobs are dead-lettered.
    Count,
    /// Print the oldest dead-lettered jobs with why they ended there (they stay in place).
    Show {
        /// How many.
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Print phone numbers in full (masked by default: `+14*******71`).
        #[arg(long)]
        show_numbers: bool,
    },
    /// Send dead-lettered jobs back to the jobs queue, oldest first, one at a time with
    /// confirms. Only the jobs that were in the queue when it started are considered, each
    /// at most once: a replayed job that fails again is not replayed again in the same run.
    Replay {
        /// At most this many.
        #[arg(long, default_value_t = 1, conflicts_with = "all")]
        limit: u32,
        /// Every job that was in the dead-letter queue when the replay started (that match
        /// the filters).
        #[arg(long)]
        all: bool,
        /// Only the jobs with this job id (repeatable).
        #[arg(long, value_name = "ID")]
        job_id: Vec<String>,
        /// Only the jobs that ended with this outcome (repeatable): rejected, failed, unknown.
        #[arg(long, value_name = "OUTCOME")]
        outcome: Vec<String>,
        /// Print what would be replayed and leave every job in place.
        #[arg(long)]
        dry_run: bool,
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
    /// The rate limit R of the precision run (3) and the fleet's budget in (8) and (9), requests per second.
    #[arg(long, env = "DIALER_BENCH_RATE", default_value = "20")]
    pub rate: String,
    /// The burst of the precision run (3).
    #[arg(long, env = "DIALER_BENCH_RATE_BURST", default_value = "1")]
    pub rate_burst: String,
    /// How long the precision run (3) keeps a backlog; default 30s, 3s with --quick.
    #[arg(long, env = "DIALER_BENCH_RATE_DURATION")]
    pub rate_duration: Option<String>,
    /// Run only these measurements (comma-separated numbers or names: 1 ceiling, 2 throughput,
    /// 3 rate, 4 overhead, 5 slow, 6 memory, 7 simulator, 8 fleet, 9 adaptive, 10 stores);
    /// default all. (8) and (9) use the Redis of DIALER_REDIS_URL, default
    /// redis://127.0.0.1:6379; (10) the PostgreSQL of DIALER_BENCH_DATABASE_URL.
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
    /// Whose allowance the rate limit is: token (each token its own) or client (all tokens share one).
    #[arg(long, env = "DIALER_SIM_RATE_SCOPE", default_value = "token")]
    pub rate_scope: String,
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

    #[test]
    fn every_command_shows_an_example_in_its_help() {
        for command in Cli::command().get_subcommands() {
            let help = command.get_after_help().map(|h| h.to_string());
            assert!(
                help.as_deref().is_some_and(|h| h.contains("Examples:\n  ")),
                "dialer {} --help has no example",
                command.get_name()
            );
        }
    }
}
