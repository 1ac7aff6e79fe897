//! The queues and exchanges (docs/jobs-and-events.md §1), named from one prefix and declared
//! idempotently, and the migration from the delay tiers of earlier versions.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::{BrokerError, Publisher};
use crate::config::QueueType;

/// Delay tiers: each is a queue whose messages all wait the same time (a queue TTL, not a
/// per-message one, so no message waits behind a longer one) and then dead-letter back to the
/// jobs queue.
pub const DELAY_TIERS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// How long a job should stay in a delay tier; the topology picks the tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delay {
    /// Back no sooner than this (a backoff, a `Retry-After`): the shortest tier at least this
    /// long, else the longest tier.
    AtLeast(Duration),
    /// Back no later than this (one hop towards `notBefore`; the job waits the rest when it is
    /// back): the longest tier at most this long, else the shortest tier.
    AtMost(Duration),
}

/// The names of every queue and exchange, derived from the prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Where CRMs publish jobs (default exchange, routing key = this name).
    pub jobs_queue: String,
    /// Direct exchange bound to the jobs queue with routing key `dial`: where CRMs publish.
    pub jobs_exchange: String,
    /// Direct exchange bound to the jobs queue with routing key `dial`, which only the dialer
    /// may write to: the delay tiers dead-letter through it and `dialer dlq replay` publishes
    /// to it. The `x-dialer-*` marks are believed only on deliveries from it.
    pub internal_exchange: String,
    /// `(wait, queue name)` per delay tier, shortest first.
    pub delay_queues: Vec<(Duration, String)>,
    /// The delay tiers of versions before the internal route (`<jobs>.delay.<tier>`, which
    /// dead-letter through the default exchange): emptied into the new tiers and deleted by
    /// [`Topology::migrate`].
    pub legacy_delay_queues: Vec<(Duration, String)>,
    /// Where jobs that cannot succeed go, with headers saying why.
    pub dead_letter_queue: String,
    /// Topic exchange of result events, routing key `dial.<outcome>`.
    pub reply_exchange: String,
    /// Type of the jobs queue.
    pub queue_type: QueueType,
}

/// The routing key of the jobs exchange's binding.
pub const JOBS_ROUTING_KEY: &str = "dial";

impl Topology {
    /// Names for `prefix` (e.g. `dialer` → `dialer.jobs`, `dialer.replies`, …).
    pub fn new(prefix: &str, queue_type: QueueType) -> Self {
        let jobs_queue = format!("{prefix}.jobs");
        let tiers = |infix: &str| {
            DELAY_TIERS
                .iter()
                .map(|tier| {
                    (
                        *tier,
                        format!("{jobs_queue}.delay.{infix}{}", tier_name(*tier)),
                    )
                })
                .collect()
        };
        Self {
            jobs_exchange: jobs_queue.clone(),
            internal_exchange: format!("{prefix}.internal"),
            // A new name, not the old one: a broker refuses to redeclare a queue with another
            // dead-letter exchange (PRECONDITION_FAILED).
            delay_queues: tiers("v2."),
            legacy_delay_queues: tiers(""),
            dead_letter_queue: format!("{jobs_queue}.dead"),
            reply_exchange: format!("{prefix}.replies"),
            jobs_queue,
            queue_type,
        }
    }

    /// The delay tier for `delay`: `(its wait, its queue)`.
    pub fn delay_queue(&self, delay: Delay) -> &(Duration, String) {
        // DELAY_TIERS is a non-empty constant.
        let (shortest, longest) = (
            &self.delay_queues[0],
            &self.delay_queues[DELAY_TIERS.len() - 1],
        );
        match delay {
            // For a backoff, waiting a little longer is fine and shorter is not.
            Delay::AtLeast(wait) => self
                .delay_queues
                .iter()
                .find(|(tier, _)| *tier >= wait)
                .unwrap_or(longest),
            // For `notBefore`, arriving early only means one more hop; arriving late delays
            // the call.
            Delay::AtMost(wait) => self
                .delay_queues
                .iter()
                .rev()
                .find(|(tier, _)| *tier <= wait)
                .unwrap_or(shortest),
        }
    }

    /// Declares everything; declaring what exists with the same settings changes nothing.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(
                ShortString::from(self.dead_letter_queue.as_str()),
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!(
                "declaring queue {}",
                self.dead_letter_queue
            )))?;

        let mut jobs_args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            jobs_args.insert("x-queue-type".into(), long_string("quorum"));
        }
        // Messages the broker itself gives up on (a quorum queue's delivery limit) land in
        // the dead-letter queue instead of being dropped.
        jobs_args.insert("x-dead-letter-exchange".into(), long_string(""));
        jobs_args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(&self.dead_letter_queue),
        );
        channel
            .queue_declare(ShortString::from(self.jobs_queue.as_str()), durable, jobs_args)
            .await
            .map_err(BrokerError::amqp(format!(
                "declaring queue {} (if it exists with other settings, delete it or choose another DIALER_PREFIX)",
                self.jobs_queue
            )))?;

        for exchange in [&self.jobs_exchange, &self.internal_exchange] {
            declare_exchange(channel, exchange, ExchangeKind::Direct).await?;
            channel
                .queue_bind(
                    ShortString::from(self.jobs_queue.as_str()),
                    ShortString::from(exchange.as_str()),
                    ShortString::from(JOBS_ROUTING_KEY),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::amqp(format!(
                    "binding {} to {exchange}",
                    self.jobs_queue
                )))?;
        }

        for (tier, name) in &self.delay_queues {
            let mut args = FieldTable::default();
            let ttl_ms = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
            // Back through the internal route, so the counters the job carries are believed.
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(&self.internal_exchange),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                long_string(JOBS_ROUTING_KEY),
            );
            channel
                .queue_declare(ShortString::from(name.as_str()), durable, args)
                .await
                .map_err(BrokerError::amqp(format!("declaring queue {name}")))?;
        }

        declare_exchange(channel, &self.reply_exchange, ExchangeKind::Topic).await?;
        Ok(())
    }

    /// Moves the jobs waiting in the delay tiers of earlier versions into the new tiers of the
    /// same length (so none comes back sooner than it was meant to; at worst it waits one tier
    /// longer) and deletes the old tiers once empty. Without this, a job delayed by the
    /// previous version would come back through the default exchange, its counters would not
    /// be believed and it would be answered `duplicate`. Returns how many jobs were moved.
    ///
    /// Run after [`Topology::declare`] at every start; an old tier that an old worker still
    /// running recreates is emptied at the next start (docs/jobs-and-events.md, "Upgrading").
    pub async fn migrate(
        &self,
        connection: &Connection,
        publisher: &Publisher,
    ) -> Result<u64, BrokerError> {
        let mut moved = 0;
        let if_empty = QueueDeleteOptions {
            if_empty: true,
            ..QueueDeleteOptions::default()
        };
        for ((_, old), (_, new)) in self.legacy_delay_queues.iter().zip(&self.delay_queues) {
            let open = || async {
                connection
                    .create_channel()
                    .await
                    .map_err(BrokerError::amqp("opening a channel for the migration"))
            };
            // Deleting a queue that does not exist succeeds, so the usual case (nothing to
            // migrate) stays quiet; an old tier still holding jobs refuses and closes the
            // channel, and its jobs are moved on a fresh one.
            let channel = open().await?;
            if channel
                .queue_delete(ShortString::from(old.as_str()), if_empty)
                .await
                .is_ok()
            {
                let _ = channel.close(200, ShortString::from("migrated")).await;
                continue;
            }
            let channel = open().await?;
            while let Some(message) = channel
                .basic_get(
                    ShortString::from(old.as_str()),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(BrokerError::amqp(format!("reading {old}")))?
            {
                let delivery = &message.delivery;
                // Published, confirmed, then acked: a crash in between duplicates a delayed
                // job (answered from its recorded decision), never loses it.
                publisher
                    .publish("", new, &delivery.data, delivery.properties.clone(), true)
                    .await?;
                delivery
                    .ack(BasicAckOptions { multiple: false })
                    .await
                    .map_err(BrokerError::amqp(format!("acking a job moved from {old}")))?;
                moved += 1;
            }
            match channel
                .queue_delete(ShortString::from(old.as_str()), if_empty)
                .await
            {
                Ok(_) => tracing::info!(queue = %old, "deleted a delay tier of an earlier version"),
                // A job arrived meanwhile (an old worker is still running): the next start
                // moves it.
                Err(error) => {
                    tracing::warn!(queue = %old, %error, "an old delay tier is not empty yet; it is emptied at the next start")
                }
            }
            let _ = channel.close(200, ShortString::from("migrated")).await;
        }
        if moved > 0 {
            tracing::info!(
                moved,
                "moved delayed jobs from the delay tiers of an earlier version"
            );
        }
        Ok(moved)
    }
}

impl Topology {
    /// Deletes every queue and exchange of this topology and `extra_queues`: for the demo, the
    /// benchmark and tests, which build a throwaway topology. Deleting what does not exist
    /// succeeds, so this also cleans up after a run that stopped half way.
    pub async fn delete(
        &self,
        channel: &Channel,
        extra_queues: &[String],
    ) -> Result<(), BrokerError> {
        let queues = [&self.jobs_queue, &self.dead_letter_queue]
            .into_iter()
            .chain(self.delay_queues.iter().map(|(_, name)| name))
            .chain(self.legacy_delay_queues.iter().map(|(_, name)| name))
            .chain(extra_queues);
        for queue in queues {
            channel
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(BrokerError::amqp(format!("deleting queue {queue}")))?;
        }
        for exchange in [
            &self.jobs_exchange,
            &self.internal_exchange,
            &self.reply_exchange,
        ] {
            channel
                .exchange_delete(
                    ShortString::from(exchange.as_str()),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .map_err(BrokerError::amqp(format!("deleting exchange {exchange}")))?;
        }
        Ok(())
    }
}

/// Declares a durable exchange.
async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), BrokerError> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            ShortString::from(name),
            kind,
            options,
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!("declaring exchange {name}")))
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// `1s`, `5s`, `30s`, `2m`, `10m`.
fn tier_name(tier: Duration) -> String {
    let secs = tier.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_topology() {
        let t = Topology::new("dialer", QueueType::Quorum);
        assert_eq!(t.jobs_queue, "dialer.jobs");
        assert_eq!(t.jobs_exchange, "dialer.jobs");
        assert_eq!(t.dead_letter_queue, "dialer.jobs.dead");
        assert_eq!(t.reply_exchange, "dialer.replies");
        assert_eq!(t.internal_exchange, "dialer.internal");
        let names: Vec<_> = t.delay_queues.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "dialer.jobs.delay.v2.1s",
                "dialer.jobs.delay.v2.5s",
                "dialer.jobs.delay.v2.30s",
                "dialer.jobs.delay.v2.2m",
                "dialer.jobs.delay.v2.10m"
            ]
        );
        let legacy: Vec<_> = t
            .legacy_delay_queues
            .iter()
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(
            legacy,
            [
                "dialer.jobs.delay.1s",
                "dialer.jobs.delay.5s",
                "dialer.jobs.delay.30s",
                "dialer.jobs.delay.2m",
                "dialer.jobs.delay.10m"
            ]
        );
    }

    #[test]
    fn delay_tier_choice() {
        let t = Topology::new("p", QueueType::Classic);
        let secs = |s| Duration::from_secs(s);
        let tier = |delay| t.delay_queue(delay).0;
        assert_eq!(tier(Delay::AtLeast(secs(3))), secs(5));
        assert_eq!(tier(Delay::AtLeast(secs(5))), secs(5));
        assert_eq!(tier(Delay::AtLeast(secs(3600))), secs(600));
        assert_eq!(tier(Delay::AtMost(secs(45))), secs(30));
        assert_eq!(tier(Delay::AtMost(secs(3600))), secs(600));
        assert_eq!(tier(Delay::AtMost(Duration::from_millis(500))), secs(1));
        assert_eq!(
            t.delay_queue(Delay::AtMost(secs(45))).1,
            "p.jobs.delay.v2.30s"
        );
    }
}
