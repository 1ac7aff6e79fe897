//! (1) The broker's ceiling for the worker's traffic: a bare lapin loop that does per job what
//! the worker does on the broker and nothing else — take a delivery (same prefetch), publish an
//! event of the same size with confirms (every job's confirm awaited concurrently, as the worker
//! does), then ack.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cpu::{CpuSnapshot, CpuUse};
use super::lab::Lab;
use super::{Plan, job_body, stats};
use crate::broker::{self, Publisher};
use crate::config::BrokerSettings;
use crate::event::{Outcome, ResultEvent};

/// What (1) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Ceiling {
    /// Jobs pre-loaded and run through.
    pub(crate) jobs: usize,
    /// Prefetch (the worker's concurrency).
    pub(crate) prefetch: u16,
    /// Size of each job body.
    pub(crate) job_bytes: usize,
    /// Size of each event body.
    pub(crate) event_bytes: usize,
    /// Steady jobs per second (see [`stats::steady_rate`]).
    pub(crate) jobs_per_sec: f64,
    /// CPU used while the jobs ran.
    pub(crate) cpu: CpuUse,
}

/// Runs (1).
pub(crate) async fn run(
    base: &BrokerSettings,
    plan: &Plan,
    run_id: &str,
) -> anyhow::Result<Ceiling> {
    let lab = Lab::open(base, run_id, "ceiling").await?;
    let result = measure(&lab, plan, run_id).await;
    lab.cleanup().await;
    result
}

async fn measure(lab: &Lab, plan: &Plan, run_id: &str) -> anyhow::Result<Ceiling> {
    let jobs = plan.jobs;
    let job_bytes = job_body(run_id, 0, &[]).len();
    lab.preload((0..jobs).map(|i| job_body(run_id, i, &[])))
        .await?;
    let event = placed_event(run_id);
    let event_bytes = event.len();
    let collector = lab.collect_events(jobs, plan.run_timeout).await?;
    let stop = CancellationToken::new();
    let cpu = CpuSnapshot::now();
    let looping = tokio::spawn(bare_loop(
        lab.broker.clone(),
        lab.topology.jobs_queue.clone(),
        lab.topology.reply_exchange.clone(),
        plan.concurrency,
        event,
        jobs,
        stop.clone(),
    ));
    let events = collector.finish().await;
    let cpu = cpu.used_since(jobs);
    stop.cancel();
    looping.await.context("the bare loop panicked")??;
    let events = events?;
    let jobs_per_sec = stats::steady_rate(&events.times, usize::from(plan.concurrency))
        .context("too few events to compute a rate")?;
    Ok(Ceiling {
        jobs,
        prefetch: plan.concurrency,
        job_bytes,
        event_bytes,
        jobs_per_sec,
        cpu,
    })
}

/// The loop: one connection, a confirm-mode publishing channel and a consuming channel with
/// prefetch, one task per delivery — the worker's shape without the worker.
async fn bare_loop(
    broker: BrokerSettings,
    jobs_queue: String,
    reply_exchange: String,
    prefetch: u16,
    event: Vec<u8>,
    jobs: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let connection = broker::connect(&broker.amqp_url, "dialer bench bare loop").await?;
    let publisher = Publisher::open(&connection).await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening the consuming channel")?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .context("setting the prefetch")?;
    let mut consumer = channel
        .basic_consume(
            ShortString::from(jobs_queue.as_str()),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming jobs")?;
    let event = std::sync::Arc::new(event);
    let tracker = TaskTracker::new();
    let mut taken = 0;
    while taken < jobs {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            delivery = consumer.next() => match delivery {
                Some(delivery) => delivery.context("receiving a job")?,
                None => break,
            },
        };
        taken += 1;
        let (publisher, event, exchange) =
            (publisher.clone(), event.clone(), reply_exchange.clone());
        tracker.spawn(async move {
            // The worker's event properties: JSON, persistent, a fresh message id, a timestamp,
            // the job's id as correlation id (here a stand-in of the same length).
            let properties = BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(uuid::Uuid::new_v4().to_string()))
                .with_timestamp(super::lab::unix_seconds())
                .with_correlation_id(ShortString::from(format!(
                    "{:>width$}",
                    delivery.delivery_tag,
                    width = JOB_ID_LEN
                )));
            let published = publisher
                .publish(&exchange, "dial.placed", &event, properties, false)
                .await;
            if published.is_ok() {
                let _ = delivery
                    .acker
                    .ack(BasicAckOptions { multiple: false })
                    .await;
            }
        });
    }
    tracker.close();
    // Bounded: every task waits for one confirm and one ack.
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Length of the bench's job ids (see [`super::job_id`]).
const JOB_ID_LEN: usize = super::JOB_ID_LEN;

/// An event as the worker writes it for a placed job of the bench: same fields, same size.
fn placed_event(run_id: &str) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    let attributes = BTreeMap::from([("crmRecord".to_owned(), super::crm_record(0))]);
    ResultEvent {
        job_id: Some(super::job_id(run_id, 0)),
        outcome: Outcome::Placed,
        conversation_id: Some(uuid::Uuid::new_v4().to_string()),
        agent_user_id: Some(super::agent_id()),
        phone_number: Some(super::PHONE.to_owned()),
        attempts: 1,
        error: None,
        attributes: Some(attributes),
        received_at: now,
        completed_at: now,
        worker: super::WORKER_NAME.to_owned(),
    }
    .to_json()
}
