//! What each subcommand does, from parsed flags to an exit code.

use std::process::ExitCode;

use crate::cli::{Cli, Command, DecisionsAction, DlqAction};
use crate::config::{self, ConfigError};
use crate::sim;
use crate::telemetry;

/// Runs the command and turns its result into an exit code: 0 done, 1 failed, 2 bad configuration.
pub fn main(cli: Cli) -> ExitCode {
    let format = match telemetry::parse_log_format(&cli.log_format) {
        Ok(format) => format,
        Err(error) => return config_error(&error),
    };
    // Commands that print a report keep the log quiet unless RUST_LOG asks otherwise.
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Bench(_) | Command::Check(_) => "warn",
        _ => "info",
    };
    telemetry::init(format, default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dialer: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(error)) => config_error(&error),
        Err(Failure::Other(error)) => {
            eprintln!("dialer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why a command stopped.
enum Failure {
    /// A setting was wrong: exit 2 with one line.
    Config(ConfigError),
    /// Anything else: exit 1.
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Self::Config(error)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Other(error)
    }
}

fn config_error(error: &ConfigError) -> ExitCode {
    eprintln!("dialer: invalid configuration: {error}");
    ExitCode::from(2)
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Sim(args) => {
            let settings = sim_settings(&config::sim_config(&args)?, args.faults.as_deref())?;
            sim::serve_until_ctrl_c(settings).await?;
            Ok(())
        }
        Command::Run(args) => {
            let settings = config::run_settings(&args)?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let worker = crate::worker::start(settings, shutdown.clone()).await?;
            tokio::spawn(crate::shutdown::cancel_on_signal(shutdown));
            worker.wait().await?;
            Ok(())
        }
        Command::Check(args) => {
            let settings = config::run_settings(&args)?;
            crate::check::run(&settings).await?;
            Ok(())
        }
        Command::Enqueue(args) => {
            let broker = config::broker_settings(&args.broker)?;
            crate::enqueue::run(broker, args.file, !args.no_validate).await?;
            Ok(())
        }
        Command::Dlq(args) => {
            let broker = config::broker_settings(&args.broker)?;
            let action = match args.action {
                DlqAction::Count => crate::dlq::Action::Count,
                DlqAction::Show { limit } => crate::dlq::Action::Show(limit),
                DlqAction::Replay { limit } => crate::dlq::Action::Replay(limit),
            };
            crate::dlq::run(broker, action).await?;
            Ok(())
        }
        Command::Topology(args) => {
            let broker = config::broker_settings(&args)?;
            let topology = crate::broker::Topology::new(&broker.prefix, broker.queue_type);
            let connection = crate::broker::connect(&broker.amqp_url, "dialer topology")
                .await
                .map_err(anyhow::Error::from)?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| anyhow::anyhow!("opening a channel: {e}"))?;
            topology
                .declare(&channel)
                .await
                .map_err(anyhow::Error::from)?;
            let _ = connection.close(200, "done".into()).await;
            println!(
                "declared: queue {} (and {} delay queues), exchange {}, dead-letter queue {}, reply exchange {}",
                topology.jobs_queue,
                topology.delay_queues.len(),
                topology.jobs_exchange,
                topology.dead_letter_queue,
                topology.reply_exchange
            );
            Ok(())
        }
        Command::Demo(args) => {
            let broker = config::broker_settings(&args.broker)?;
            crate::demo::run(broker, usize::from(args.jobs)).await?;
            Ok(())
        }
        Command::Decisions(args) => {
            let (kind, database_url) = config::store_settings(&args.store)?;
            let store = crate::reconcile::StoreLocation {
                kind,
                state_dir: args.store.state_dir.clone(),
                database_url,
            };
            let action = match args.action {
                DecisionsAction::Show { job_id } => crate::reconcile::Action::Show(job_id),
                DecisionsAction::Unknown { since, limit } => crate::reconcile::Action::Unknown {
                    since: crate::reconcile::parse_since(since.as_deref()).map_err(|problem| {
                        ConfigError {
                            variable: "--since",
                            flag: "since",
                            problem,
                        }
                    })?,
                    limit,
                },
            };
            crate::reconcile::run(store, action, args.show_phone_numbers).await?;
            Ok(())
        }
        Command::Bench(args) => {
            let settings = crate::bench::settings(&args)?;
            crate::bench::run(settings).await?;
            Ok(())
        }
    }
}

/// Turns the simulator's parsed flags into its settings (agents and faults are JSON).
pub fn sim_settings(
    cfg: &config::SimConfig,
    faults_json: Option<&str>,
) -> Result<sim::SimSettings, ConfigError> {
    let agents = match &cfg.agents_json {
        Some(json) => sim::parse_agents(json).map_err(|problem| ConfigError {
            variable: "DIALER_SIM_AGENTS",
            flag: "agents",
            problem,
        })?,
        None => sim::SimAgent::demo_set(),
    };
    let faults = match faults_json.map(str::trim).filter(|f| !f.is_empty()) {
        Some(json) => serde_json::from_str(json).map_err(|e| ConfigError {
            variable: "DIALER_SIM_FAULTS",
            flag: "faults",
            problem: format!("not a faults object ({e}); expected e.g. {{\"latencyMs\": 300, \"errorRate\": 0.1}}"),
        })?,
        None => sim::Faults::default(),
    };
    Ok(sim::SimSettings {
        addr: cfg.addr,
        client_id: cfg.client_id.clone(),
        client_secret: cfg.client_secret.expose().to_owned(),
        agents,
        rate_limit: cfg.rate_limit.count.get(),
        rate_window: cfg.rate_limit.per,
        token_ttl: cfg.token_ttl,
        faults,
    })
}
