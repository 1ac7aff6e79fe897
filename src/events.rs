//! `dialer events`: prints result events as they arrive — a table on a terminal, NDJSON (one
//! event per line, exactly as published) when piped.
//!
//! By default it binds a temporary queue (exclusive, auto-deleted when it exits) to the
//! prefix's reply exchange, so it sees the events published from the moment it started and
//! takes nothing from anybody. `--queue` reads a named queue instead (a CRM's `reply_to`
//! queue, say) without acknowledging anything: the events stay in that queue and are handed
//! back to it when the command exits.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use serde_json::Value;

use crate::broker::{self, Topology};
use crate::config::BrokerSettings;
use crate::event::Outcome;
use crate::output;

/// How events are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns for a person.
    Table,
    /// One JSON object per line, for `jq` and scripts.
    Json,
}

/// What to print and when to stop.
#[derive(Clone, Debug)]
pub struct Options {
    /// Read this queue instead of binding a temporary one to the reply exchange.
    pub queue: Option<String>,
    /// Only these outcomes (all when empty).
    pub outcomes: Vec<Outcome>,
    /// Only these job ids (all when empty).
    pub job_ids: Vec<String>,
    /// Exit after this many printed events.
    pub count: Option<u64>,
    /// Exit after this long without a printed event.
    pub timeout: Option<Duration>,
    /// Table or NDJSON.
    pub format: Format,
}

/// Prints the events of `broker`'s prefix (or of `options.queue`) until one of the exits in
/// `options`, Ctrl-C, or the broker ends the consumer.
pub async fn run(broker: BrokerSettings, options: Options) -> anyhow::Result<()> {
    let topology = Topology::new(&broker.prefix, broker.queue_type);
    let connection = broker::connect(&broker.amqp_url, "dialer events").await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    let (queue, no_ack) = match &options.queue {
        Some(queue) => {
            // Passive: a mistyped name is an error, not a new empty queue to wait on forever.
            broker::queue_depth(&channel, queue)
                .await
                .with_context(|| format!("queue {queue} does not exist"))?;
            eprintln!("dialer events: reading {queue} (events stay in it); Ctrl-C to stop");
            (queue.clone(), false)
        }
        None => {
            let keys = routing_keys(&options.outcomes);
            let queue = bind_temporary_queue(&connection, &channel, &topology, &keys).await?;
            eprintln!(
                "dialer events: listening on exchange {} ({}); Ctrl-C to stop",
                topology.reply_exchange,
                keys.join(", ")
            );
            (queue, true)
        }
    };
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "dialer-events".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {queue}"))?;

    let colour = options.format == Format::Table && output::stdout_colour();
    let mut stdout = std::io::stdout();
    if options.format == Format::Table {
        print_line(&mut stdout, &table_header())?;
    }
    let mut printed = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    // Counted from the last event printed: events the filters pass over do not keep it alive.
    let mut idle_until = options.timeout.map(|t| tokio::time::Instant::now() + t);
    let result = loop {
        if options.count.is_some_and(|n| printed >= n) {
            break Ok(());
        }
        let idle = async {
            match idle_until {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let delivery = tokio::select! {
            next = consumer.next() => next,
            () = idle => break match options.count {
                Some(n) => Err(anyhow::anyhow!(
                    "only {} of {n} within {}",
                    output::count(printed, "event", "events"),
                    humantime(options.timeout.unwrap_or_default())
                )),
                None => Ok(()),
            },
            _ = &mut interrupted => break Ok(()),
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => break Err(anyhow::Error::new(error).context("reading events")),
            None => break Err(anyhow::anyhow!("the broker ended the consumer of {queue}")),
        };
        let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) else {
            tracing::warn!(queue = %queue, "a message that is not JSON was skipped");
            continue;
        };
        if !matches(&event, &options) {
            continue;
        }
        let line = match options.format {
            Format::Json => event.to_string(),
            Format::Table => table_row(&event, colour),
        };
        if let Err(error) = print_line(&mut stdout, &line) {
            break Err(error);
        }
        printed += 1;
        idle_until = options.timeout.map(|t| tokio::time::Instant::now() + t);
    };
    // Closing hands unacknowledged messages of a named queue back to it, and deletes the
    // temporary queue.
    let _ = connection.close(200, "dialer events done".into()).await;
    result
}

fn print_line(out: &mut impl Write, line: &str) -> anyhow::Result<()> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("printing an event")
}

/// `dial.#`, or one key per outcome asked for: the broker filters, so nothing else is sent.
fn routing_keys(outcomes: &[Outcome]) -> Vec<String> {
    if outcomes.is_empty() {
        vec!["dial.#".to_owned()]
    } else {
        outcomes.iter().map(|o| o.routing_key()).collect()
    }
}

async fn bind_temporary_queue(
    connection: &lapin::Connection,
    channel: &Channel,
    topology: &Topology,
    keys: &[String],
) -> anyhow::Result<String> {
    // Passive, on a channel of its own (a missing exchange closes it): a mistyped prefix is
    // reported instead of creating an exchange no worker publishes to.
    let probe = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    probe
        .exchange_declare(
            topology.reply_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| {
            format!(
                "exchange {} does not exist: is the prefix right (DIALER_PREFIX, --prefix)? \
                 A worker or `dialer topology` declares it",
                topology.reply_exchange
            )
        })?;
    let _ = probe.close(200, "probed".into()).await;
    let declared = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring a temporary queue")?;
    let queue = declared.name().to_string();
    for key in keys {
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.reply_exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding {queue} to {}", topology.reply_exchange))?;
    }
    Ok(queue)
}

fn matches(event: &Value, options: &Options) -> bool {
    let text = |name: &str| event.get(name).and_then(Value::as_str);
    let outcome_ok = options.outcomes.is_empty()
        || text("outcome").is_some_and(|o| options.outcomes.iter().any(|w| w.as_str() == o));
    let job_ok = options.job_ids.is_empty()
        || text("jobId").is_some_and(|id| options.job_ids.iter().any(|w| w == id));
    outcome_ok && job_ok
}

const JOB_WIDTH: usize = 24;

fn table_header() -> String {
    format!(
        "{:<8}  {:<JOB_WIDTH$}  {:<9}  {:>8}  detail",
        "time", "job", "outcome", "attempts"
    )
}

fn table_row(event: &Value, colour: bool) -> String {
    let text = |name: &str| event.get(name).and_then(Value::as_str);
    // The time of day of completedAt (RFC 3339: the part between `T` and the fraction or offset).
    let time = text("completedAt")
        .and_then(|at| at.split_once('T'))
        .map(|(_, clock)| clock.chars().take(8).collect::<String>())
        .unwrap_or_else(|| "-".into());
    let job = text("jobId").unwrap_or("(none)");
    let outcome = text("outcome").unwrap_or("?");
    let attempts = event.get("attempts").and_then(Value::as_u64).unwrap_or(0);
    let detail = match (text("conversationId"), event.get("error")) {
        (Some(conversation), _) => format!("conversation {conversation}"),
        (None, Some(error)) => format!(
            "{}: {}",
            error.get("kind").and_then(Value::as_str).unwrap_or("error"),
            error.get("message").and_then(Value::as_str).unwrap_or("")
        ),
        (None, None) => String::new(),
    };
    // Padding is applied before the colour codes, which have no width on screen.
    let padded = format!("{outcome:<9}");
    let outcome = match (colour, outcome) {
        (false, _) => padded,
        (true, "placed") => format!("\x1b[32m{padded}\x1b[0m"),
        (true, "expired" | "duplicate") => format!("\x1b[33m{padded}\x1b[0m"),
        (true, _) => format!("\x1b[31m{padded}\x1b[0m"),
    };
    format!(
        "{time:<8}  {:<JOB_WIDTH$}  {outcome}  {attempts:>8}  {}",
        truncate(job, JOB_WIDTH),
        truncate(&detail, 100)
    )
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    }
}

fn humantime(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

/// Parses `--outcome` values (`placed`, `failed`, …), naming the accepted ones on a typo.
pub fn parse_outcome(raw: &str) -> Result<Outcome, String> {
    Outcome::ALL
        .into_iter()
        .find(|o| o.as_str() == raw.trim().to_ascii_lowercase())
        .ok_or_else(|| {
            let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
            format!(
                "{raw:?} is not an outcome; expected one of {}",
                names.join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options() -> Options {
        Options {
            queue: None,
            outcomes: vec![],
            job_ids: vec![],
            count: None,
            timeout: None,
            format: Format::Json,
        }
    }

    #[test]
    fn filters_keep_only_the_asked_outcomes_and_jobs() {
        let event = json!({"jobId": "a", "outcome": "failed"});
        assert!(matches(&event, &options()));
        let mut o = options();
        o.outcomes = vec![Outcome::Placed];
        assert!(!matches(&event, &o));
        o.outcomes.push(Outcome::Failed);
        assert!(matches(&event, &o));
        o.job_ids = vec!["b".into()];
        assert!(!matches(&event, &o));
    }

    #[test]
    fn outcomes_become_routing_keys() {
        assert_eq!(routing_keys(&[]), ["dial.#"]);
        assert_eq!(
            routing_keys(&[Outcome::Placed, Outcome::Unknown]),
            ["dial.placed", "dial.unknown"]
        );
        assert!(parse_outcome("Placed").is_ok());
        assert!(
            parse_outcome("ok")
                .unwrap_err()
                .contains("placed, rejected")
        );
    }

    #[test]
    fn a_row_shows_time_job_outcome_and_why() {
        let row = table_row(
            &json!({"jobId": "lead-1", "outcome": "failed", "attempts": 2,
                    "completedAt": "2026-11-30T02:10:11.5Z",
                    "error": {"kind": "refused", "message": "404 no such user"}}),
            false,
        );
        assert!(row.starts_with("02:10:11  lead-1"), "{row}");
        assert!(row.contains("failed") && row.contains("refused: 404 no such user"));
        assert!(!row.contains('\x1b'));
    }
}
