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
    crate::output::exit_quietly_on_closed_stdout();
    // Commands that print a report keep the log quiet unless RUST_LOG asks otherwise.
    // The demo's and check's own results already say what their warnings would (a rejected
    // sample job, a refused token), so those lines stay out of the report; so does the
    // in-process worker's warning about the memory decision store, which the demo chose, not
    // the user. Errors still show.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn,dialer::pipeline=error,dialer::worker=error",
        Command::Check(_) => "warn,dialer::genesys=error",
        Command::Bench(_) => "warn",
        _ => "info",
    };
    telemetry::init(
        format,
        &telemetry::default_filter(default_filter, cli.verbose),
    );
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
        // The reader of our output went away (`| head`): it has what it wanted.
        Err(Failure::Other(error)) if crate::output::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(Failure::Other(error)) => {
            eprintln!("dialer: {}", crate::output::error_chain(&error));
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
            let options = crate::enqueue::Options {
                input: args.file,
                format: args.format.as_deref().map(|format| match format {
                    "csv" => crate::enqueue::Format::Csv,
                    _ => crate::enqueue::Format::Ndjson,
                }),
                validate: !args.no_validate,
                skip_invalid: args.skip_invalid,
            };
            crate::enqueue::run(broker, options).await?;
            Ok(())
        }
        Command::Dlq(args) => {
            let broker = config::broker_settings(&args.broker)?;
            let action = match args.action {
                DlqAction::Count => crate::dlq::Action::Count,
                DlqAction::Show {
                    limit,
                    show_numbers,
                } => crate::dlq::Action::Show {
                    limit,
                    show_numbers,
                },
                DlqAction::Replay {
                    limit,
                    all,
                    job_id,
                    outcome,
                    dry_run,
                } => crate::dlq::Action::Replay(crate::dlq::Replay {
                    limit: if all { None } else { Some(limit) },
                    job_ids: job_id,
                    outcomes: outcomes(&outcome)?,
                    dry_run,
                }),
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
            let publisher = crate::broker::Publisher::open(&connection)
                .await
                .map_err(anyhow::Error::from)?;
            topology
                .declare(publisher.channel())
                .await
                .map_err(anyhow::Error::from)?;
            let moved = topology
                .migrate(&connection, &publisher)
                .await
                .map_err(anyhow::Error::from)?;
            let _ = connection.close(200, "done".into()).await;
            println!(
                "declared: queue {} (and {} delay queues), exchange {}, internal exchange {}, dead-letter queue {}, reply exchange {}",
                topology.jobs_queue,
                topology.delay_queues.len(),
                topology.jobs_exchange,
                topology.internal_exchange,
                topology.dead_letter_queue,
                topology.reply_exchange
            );
            if moved > 0 {
                println!("moved {moved} delayed jobs from the delay queues of an earlier version");
            }
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
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            use std::io::Write as _;
            // Generated into memory first: the generator panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "dialer", &mut script);
            std::io::stdout()
                .write_all(&script)
                .map_err(|e| anyhow::Error::new(e).context("printing the completions"))?;
            Ok(())
        }
        Command::Events(args) => {
            let broker = config::broker_settings(&args.broker)?;
            let format = match args.format.as_deref() {
                Some("table") => crate::events::Format::Table,
                Some(_) => crate::events::Format::Json,
                None if crate::output::stdout_is_terminal() => crate::events::Format::Table,
                None => crate::events::Format::Json,
            };
            let options = crate::events::Options {
                queue: args.queue,
                outcomes: outcomes(&args.outcome)?,
                job_ids: args.job_id,
                count: args.count,
                timeout: args
                    .timeout
                    .as_deref()
                    .map(config::parse_duration)
                    .transpose()
                    .map_err(|problem| ConfigError {
                        variable: "--timeout",
                        flag: "timeout",
                        problem,
                    })?,
                format,
            };
            crate::events::run(broker, options).await?;
            Ok(())
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => {
            let settings = crate::bench::settings(&args)?;
            crate::bench::run(settings).await?;
            Ok(())
        }
        #[cfg(not(feature = "bench"))]
        Command::Bench(_) => Err(Failure::Other(anyhow::anyhow!(
            "this build leaves the benchmark out (built with --no-default-features); rebuild with `--features bench`"
        ))),
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
        rate_scope: cfg.rate_scope,
        token_ttl: cfg.token_ttl,
        faults,
    })
}

/// The `--outcome` flags of `events` and `dlq replay`, parsed here like every other value the
/// command line holds as a string.
fn outcomes(raw: &[String]) -> Result<Vec<crate::event::Outcome>, ConfigError> {
    raw.iter()
        .map(|outcome| crate::events::parse_outcome(outcome))
        .collect::<Result<_, _>>()
        .map_err(|problem| ConfigError {
            variable: "--outcome",
            flag: "outcome",
            problem,
        })
}
