//! `dialer dlq`: counts, shows and replays dead-lettered jobs.
//!
//! Replay moves one message at a time: publish to the jobs queue with a confirm, then ack the
//! dead letter, so a crash mid-replay loses nothing (at worst one job is replayed twice).

use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{FieldTable, ShortString};

use crate::broker::{self, Publisher, Topology, header_str, header_u32, text};
use crate::config::BrokerSettings;
use crate::pipeline::REPLAY_HEADER;

/// What to do with the dead-letter queue.
#[derive(Clone, Debug)]
pub enum Action {
    /// Print how many jobs are dead-lettered.
    Count,
    /// Print up to this many, leaving them in place.
    Show(u32),
    /// Send some back to the jobs queue.
    Replay(Replay),
}

/// Which dead letters a replay sends back.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// At most this many; `None`: every one that was there when the replay started.
    pub limit: Option<u32>,
    /// Only these job ids (`x-dialer-job-id`; all when empty).
    pub job_ids: Vec<String>,
    /// Only these outcomes (`x-dialer-outcome`; all when empty).
    pub outcomes: Vec<crate::event::Outcome>,
    /// Print what would be replayed, replay nothing.
    pub dry_run: bool,
}

impl Replay {
    fn wants(&self, job_id: Option<&str>, outcome: Option<&str>) -> bool {
        (self.job_ids.is_empty() || job_id.is_some_and(|id| self.job_ids.iter().any(|w| w == id)))
            && (self.outcomes.is_empty()
                || outcome.is_some_and(|o| self.outcomes.iter().any(|w| w.as_str() == o)))
    }
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
                let props = &message.delivery.properties;
                let field = |name: &str| header_str(props, name).unwrap_or_else(|| "-".to_owned());
                println!(
                    "job {}  outcome {}  attempts {}  at {}\n  {}: {}\n  body: {}",
                    field("x-dialer-job-id"),
                    field("x-dialer-outcome"),
                    header_u32(props, "x-dialer-attempts").unwrap_or(0),
                    field("x-dialer-dead-lettered-at"),
                    field("x-dialer-error-kind"),
                    field("x-dialer-error"),
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
        Action::Replay(replay) => {
            // Only the `count` messages that were there at the start are looked at: a replayed
            // job that is dead-lettered again joins the tail and is not met again in this run.
            // Messages passed over stay unacknowledged, so `basic_get` does not return them
            // twice; closing the channel puts them back in place, in order.
            let limit = replay.limit.unwrap_or(u32::MAX);
            let mut replayed = 0u32;
            let mut examined = 0u32;
            let mut seen = std::collections::HashSet::new();
            while replayed < limit && examined < count {
                let Some(message) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                examined += 1;
                let delivery = &message.delivery;
                let job_id = header_str(&delivery.properties, "x-dialer-job-id");
                let outcome = header_str(&delivery.properties, "x-dialer-outcome");
                // Belt and braces for a queue another client requeues into meanwhile: the same
                // job and body are never sent twice by one run.
                let identity = (job_id.clone(), delivery.data.clone());
                if !replay.wants(job_id.as_deref(), outcome.as_deref()) || !seen.insert(identity) {
                    continue;
                }
                if replay.dry_run {
                    println!(
                        "would replay job {} (outcome {})",
                        job_id.as_deref().unwrap_or("-"),
                        outcome.as_deref().unwrap_or("-")
                    );
                    replayed += 1;
                    continue;
                }
                // The worker's own headers go: a replayed job starts counting afresh, and the
                // replay header tells the worker a person asked for another try.
                let mut headers = FieldTable::default();
                if let Some(original) = delivery.properties.headers() {
                    for (name, value) in original.inner() {
                        if !name.as_str().starts_with("x-dialer-") {
                            headers.insert(name.clone(), value.clone());
                        }
                    }
                }
                let now = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                headers.insert(ShortString::from(REPLAY_HEADER), text(now));
                let properties = delivery.properties.clone().with_headers(headers);
                publisher
                    .publish("", &topology.jobs_queue, &delivery.data, properties, true)
                    .await
                    .context("replaying to the jobs queue")?;
                delivery
                    .ack(BasicAckOptions { multiple: false })
                    .await
                    .context("removing the replayed job from the dead-letter queue")?;
                replayed += 1;
            }
            let _ = channel.close(200, "replayed".into()).await;
            let jobs = crate::output::count(replayed, "job", "jobs");
            if replay.dry_run {
                println!("dry run: would replay {jobs} from {queue}; nothing was changed");
            } else {
                println!(
                    "replayed {jobs} from {queue} to {}; {} of the {count} there at the start left in place",
                    topology.jobs_queue,
                    count.saturating_sub(replayed)
                );
            }
        }
    }
    let _ = connection.close(200, "dlq done".into()).await;
    Ok(())
}
