//! `dialer dlq`: counts, shows and replays dead-lettered jobs.
//!
//! Replay moves one message at a time: publish to the jobs queue with a confirm, then ack the
//! dead letter, so a crash mid-replay loses nothing (at worst one job is replayed twice).

use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions};

use crate::broker::headers::{self, DeadLetter};
use crate::broker::{self, JOBS_ROUTING_KEY, Publisher, Topology};
use crate::config::BrokerSettings;

/// What to do with the dead-letter queue.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// Print how many jobs are dead-lettered.
    Count,
    /// Print up to this many, leaving them in place.
    Show(u32),
    /// Send up to this many back to the jobs queue.
    Replay(u32),
}

/// Runs `action` against the dead-letter queue of `broker`'s prefix.
pub async fn run(broker: BrokerSettings, action: Action) -> anyhow::Result<()> {
    let topology = Topology::new(&broker.prefix, broker.queue_type);
    let connection = broker::connect(&broker.amqp_url, "dialer dlq").await?;
    let publisher = Publisher::open(&connection).await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    let queue = topology.dead_letter_queue.as_str();
    let count = broker::queue_depth(&channel, queue)
        .await
        .with_context(|| {
            format!("{queue} does not exist: run `dialer topology` or a worker first")
        })?;
    match action {
        Action::Count => println!("{count} jobs in {queue}"),
        Action::Show(limit) => {
            for _ in 0..limit.min(count) {
                let Some(message) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                let dead = DeadLetter::read(&message.delivery.properties);
                println!(
                    "job {}  outcome {}  attempts {}  at {}\n  {}: {}\n  body: {}",
                    dead.job_id.as_deref().unwrap_or("-"),
                    dead.outcome,
                    dead.attempts,
                    dead.at,
                    dead.error_kind,
                    dead.error,
                    String::from_utf8_lossy(&message.delivery.data)
                        .chars()
                        .take(300)
                        .collect::<String>()
                );
            }
            // Unacked messages go back to the queue, in order, when the channel closes.
            let _ = channel.close(200, "shown".into()).await;
            println!("({count} jobs in {queue}; shown ones left in place)");
        }
        Action::Replay(limit) => {
            let mut replayed = 0;
            while replayed < limit {
                let Some(message) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                let delivery = &message.delivery;
                let properties =
                    headers::replayed(&delivery.properties, time::OffsetDateTime::now_utc());
                // Through the internal route: the only one on which the worker believes the
                // replay mark (a CRM cannot write to it).
                publisher
                    .publish(
                        &topology.internal_exchange,
                        JOBS_ROUTING_KEY,
                        &delivery.data,
                        properties,
                        true,
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "replaying to the jobs queue through {} (declared by `dialer topology` or a worker of this version; the user needs write permission on it)",
                            topology.internal_exchange
                        )
                    })?;
                delivery
                    .ack(BasicAckOptions { multiple: false })
                    .await
                    .context("removing the replayed job from the dead-letter queue")?;
                replayed += 1;
            }
            println!(
                "replayed {replayed} jobs from {queue} to {}",
                topology.jobs_queue
            );
        }
    }
    let _ = connection.close(200, "dlq done".into()).await;
    Ok(())
}
