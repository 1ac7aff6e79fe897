//! `dialer demo`: the simulator, a worker and sample jobs in one process, with a summary.
//!
//! It shows the product end to end against a real RabbitMQ without a Genesys org: valid jobs
//! placed (one after a 503 retry), a duplicate, two rejected jobs and an expired one, each
//! answered by exactly one result event. It uses its own queue prefix and deletes its queues.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Publisher, Topology};
use crate::config::{self, BrokerSettings, Rate};
use crate::event::{Outcome, ResultEvent};
use crate::sim::{self, Faults, SimAgent, SimSettings};

/// How long the demo waits for all events before giving up.
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo against the broker of `broker` with `valid_jobs` valid jobs.
pub async fn run(broker: BrokerSettings, valid_jobs: usize) -> anyhow::Result<()> {
    let agents = SimAgent::demo_set();
    let sim = sim::start(SimSettings {
        addr: "127.0.0.1:0".parse()?,
        client_id: "demo".into(),
        client_secret: "demo-secret".into(),
        agents: agents.clone(),
        rate_limit: 300,
        rate_window: Duration::from_secs(60),
        rate_scope: sim::RateScope::Token,
        token_ttl: Duration::from_secs(86_400),
        // Some realism: 50 ms per answer, and the first call attempt answers 503 (retried).
        faults: Faults {
            latency_ms: 50,
            fail_next: vec![503],
            retry_after_secs: 1,
            ..Faults::default()
        },
    })
    .await?;
    let prefix = format!(
        "{}-demo-{}",
        broker.prefix,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut settings = sim.worker_settings(BrokerSettings { prefix, ..broker }, "demo");
    // A pace a person can follow, with room for the one retry.
    settings.concurrency = std::num::NonZeroU16::new(8).context("concurrency")?;
    settings.rate_limit = Rate::new(20, Duration::from_secs(1)).context("rate")?;
    settings.rate_burst = std::num::NonZeroU32::MIN;
    let topology = Topology::new(&settings.broker.prefix, settings.broker.queue_type);
    let connection = broker::connect(&settings.broker.amqp_url, "dialer demo (CRM side)")
        .await
        .context("the demo needs RabbitMQ (DIALER_AMQP_URL)")?;
    let publisher = Publisher::open(&connection).await?;
    topology.declare(publisher.channel()).await?;
    let events_queue = format!("{}.demo-events", settings.broker.prefix);
    bind_events_queue(publisher.channel(), &topology, &events_queue).await?;

    println!("dialer demo");
    println!("  Genesys Cloud simulator  {}", sim.base_url());
    println!(
        "  broker                   {} (queues {}.*)",
        config::redact_url(&settings.broker.amqp_url),
        topology.jobs_queue
    );
    let shutdown = CancellationToken::new();
    let worker = crate::worker::start(settings.clone(), shutdown.clone()).await?;
    println!(
        "  worker metrics           http://{}/metrics",
        worker.metrics_addr
    );

    let jobs = sample_jobs(&agents, valid_jobs);
    for (body, _) in &jobs {
        publisher
            .publish(
                "",
                &topology.jobs_queue,
                body.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
                true,
            )
            .await?;
    }
    println!(
        "\npublished {} jobs: {} valid, 1 duplicate, 2 invalid, 1 expired\n",
        jobs.len(),
        valid_jobs
    );

    let events = collect_events(publisher.channel(), &events_queue, jobs.len()).await;
    shutdown.cancel();
    worker.wait().await?;
    let stats = sim.stats();
    cleanup(publisher.channel(), &topology, &events_queue).await;
    let _ = connection.close(200, "demo done".into()).await;
    sim.shutdown().await;
    let events = events?;

    println!("{:<22} {:<10} {:>8}  detail", "job", "outcome", "attempts");
    for event in &events {
        let detail = match (&event.conversation_id, &event.error) {
            (Some(conversation), _) => format!("conversation {conversation}"),
            (None, Some(error)) => format!("{}: {}", error.kind, error.message),
            (None, None) => String::new(),
        };
        let job_id = event.job_id.as_deref().unwrap_or("(unreadable)");
        println!(
            "{job_id:<22} {:<10} {:>8}  {}",
            event.outcome.as_str(),
            event.attempts,
            truncate(&detail, 90)
        );
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &events {
        *counts.entry(event.outcome.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = counts
        .iter()
        .map(|(outcome, n)| format!("{outcome} {n}"))
        .collect();
    println!(
        "\n{} events for {} jobs: {}",
        events.len(),
        jobs.len(),
        summary.join(", ")
    );
    println!(
        "the simulator saw {} call attempts and placed {} calls (one attempt answered 503 and was retried)",
        stats.call_attempts, stats.calls_placed
    );
    let placed = counts.get(Outcome::Placed.as_str()).copied().unwrap_or(0);
    if placed != valid_jobs || stats.calls_placed as usize != valid_jobs {
        bail!(
            "expected {valid_jobs} placed calls, got {placed} placed events and {} calls",
            stats.calls_placed
        );
    }
    println!("every job got exactly one event; nobody was rung twice.");
    Ok(())
}

/// Valid jobs (agents by id and by email), then a duplicate, two invalid jobs and an expired one.
fn sample_jobs(agents: &[SimAgent], valid: usize) -> Vec<(serde_json::Value, &'static str)> {
    let active: Vec<&SimAgent> = agents
        .iter()
        .filter(|a| a.state == sim::AgentState::Active)
        .collect();
    let mut jobs = Vec::new();
    for i in 0..valid {
        let agent = active[i % active.len().max(1)];
        let number = format!("+1415555{:04}", 2671 + i);
        let body = if i % 2 == 0 {
            json!({"jobId": format!("demo-{i:03}"), "agentUserId": agent.id, "phoneNumber": number, "attributes": {"crmLead": format!("L{i}")}})
        } else {
            json!({"jobId": format!("demo-{i:03}"), "agentEmail": agent.email, "phoneNumber": number})
        };
        jobs.push((body, "valid"));
    }
    if let Some((first, _)) = jobs.first().cloned() {
        jobs.push((first, "duplicate"));
    }
    let agent_id = active.first().map(|a| a.id.clone()).unwrap_or_default();
    jobs.push((
        json!({"jobId": "demo-bad-number", "agentUserId": agent_id, "phoneNumber": "12345"}),
        "invalid",
    ));
    jobs.push((json!({"jobId": "demo-unknown-agent", "agentEmail": "nobody@example.com", "phoneNumber": "+442071838750"}), "invalid"));
    jobs.push((json!({"jobId": "demo-expired", "agentUserId": agent_id, "phoneNumber": "+14155552671", "expiresAt": "2020-01-01T00:00:00Z"}), "expired"));
    jobs
}

async fn bind_events_queue(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
) -> anyhow::Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            topology.reply_exchange.as_str().into(),
            "dial.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

async fn collect_events(
    channel: &Channel,
    queue: &str,
    n: usize,
) -> anyhow::Result<Vec<ResultEvent>> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut events = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + DEMO_TIMEOUT;
    while events.len() < n {
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(_) => bail!(
                "the events consumer stopped after {} of {n} events",
                events.len()
            ),
            Err(_) => bail!(
                "only {} of {n} events within {DEMO_TIMEOUT:?}",
                events.len()
            ),
        };
        delivery.ack(BasicAckOptions { multiple: false }).await?;
        events.push(ResultEvent::from_json(&delivery.data)?);
    }
    Ok(events)
}

async fn cleanup(channel: &Channel, topology: &Topology, events_queue: &str) {
    if let Err(error) = topology.delete(channel, &[events_queue.to_owned()]).await {
        eprintln!(
            "dialer demo: could not delete its queues {}.*: {error}",
            topology.jobs_queue
        );
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max - 1).collect::<String>())
    }
}
