//! The queues and exchanges (contract §2), named from one prefix and declared idempotently.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::BrokerError;
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

/// The names of every queue and exchange, derived from the prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Where CRMs publish jobs (default exchange, routing key = this name).
    pub jobs_queue: String,
    /// Direct exchange bound to the jobs queue with routing key `dial`.
    pub jobs_exchange: String,
    /// `(wait, queue name)` per delay tier, shortest first.
    pub delay_queues: Vec<(Duration, String)>,
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
        Self {
            jobs_exchange: jobs_queue.clone(),
            delay_queues: DELAY_TIERS
                .iter()
                .map(|tier| (*tier, format!("{jobs_queue}.delay.{}", tier_name(*tier))))
                .collect(),
            dead_letter_queue: format!("{jobs_queue}.dead"),
            reply_exchange: format!("{prefix}.replies"),
            jobs_queue,
            queue_type,
        }
    }

    /// The shortest tier that waits at least `wait` (the longest if none does): for backoff,
    /// where waiting a little longer is fine and shorter is not.
    pub fn delay_at_least(&self, wait: Duration) -> &(Duration, String) {
        self.delay_queues
            .iter()
            .find(|(tier, _)| *tier >= wait)
            .unwrap_or_else(|| self.longest_delay())
    }

    /// The longest tier that waits at most `wait`: for `notBefore`, where arriving early only
    /// means one more hop, and arriving late delays the call.
    pub fn delay_at_most(&self, wait: Duration) -> Option<&(Duration, String)> {
        self.delay_queues
            .iter()
            .rev()
            .find(|(tier, _)| *tier <= wait)
    }

    fn longest_delay(&self) -> &(Duration, String) {
        // DELAY_TIERS is a non-empty constant.
        &self.delay_queues[self.delay_queues.len() - 1]
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

        declare_exchange(channel, &self.jobs_exchange, ExchangeKind::Direct).await?;
        channel
            .queue_bind(
                ShortString::from(self.jobs_queue.as_str()),
                ShortString::from(self.jobs_exchange.as_str()),
                ShortString::from(JOBS_ROUTING_KEY),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!(
                "binding {} to {}",
                self.jobs_queue, self.jobs_exchange
            )))?;

        for (tier, name) in &self.delay_queues {
            let mut args = FieldTable::default();
            let ttl_ms = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
            args.insert("x-dead-letter-exchange".into(), long_string(""));
            args.insert(
                "x-dead-letter-routing-key".into(),
                long_string(&self.jobs_queue),
            );
            channel
                .queue_declare(ShortString::from(name.as_str()), durable, args)
                .await
                .map_err(BrokerError::amqp(format!("declaring queue {name}")))?;
        }

        declare_exchange(channel, &self.reply_exchange, ExchangeKind::Topic).await?;
        Ok(())
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
        for exchange in [&self.jobs_exchange, &self.reply_exchange] {
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
    fn names_follow_the_contract() {
        let t = Topology::new("dialer", QueueType::Quorum);
        assert_eq!(t.jobs_queue, "dialer.jobs");
        assert_eq!(t.jobs_exchange, "dialer.jobs");
        assert_eq!(t.dead_letter_queue, "dialer.jobs.dead");
        assert_eq!(t.reply_exchange, "dialer.replies");
        let names: Vec<_> = t.delay_queues.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
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
        assert_eq!(t.delay_at_least(secs(3)).0, secs(5));
        assert_eq!(t.delay_at_least(secs(5)).0, secs(5));
        assert_eq!(t.delay_at_least(secs(3600)).0, secs(600));
        assert_eq!(t.delay_at_most(secs(45)).map(|d| d.0), Some(secs(30)));
        assert_eq!(t.delay_at_most(Duration::from_millis(500)), None);
    }
}
