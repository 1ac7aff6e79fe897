//! RabbitMQ: the connection, the topology (docs/jobs-and-events.md §1), the dialer's headers
//! and publishing with confirms.
//!
//! Reconnection is owned by the worker's loop, not by lapin's auto-recovery (which does not
//! come back after a broker restart): every connection here is built fresh, declared, used,
//! and dropped whole when it fails.

pub mod headers;
mod topology;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub use topology::{DELAY_TIERS, Delay, JOBS_ROUTING_KEY, Topology};

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The AMQP client reported an error (connection or channel closed, refused, …).
    #[error("{context}: {source}")]
    Amqp {
        /// What was being done.
        context: String,
        /// The client error.
        source: lapin::Error,
    },
    /// The AMQP URL could not be used.
    #[error("bad AMQP URL {0}")]
    InvalidUrl(String),
    /// The broker refused a publish (nack).
    #[error("the broker refused to store a message for {0} (nack)")]
    Nacked(String),
    /// The broker ended the consumer (the queue was deleted, or the channel closed).
    #[error("the broker cancelled the consumer of {0} (queue deleted or channel closed)")]
    ConsumerCancelled(String),
    /// Jobs could not be finished on this connection (publish or ack failed): start over.
    #[error("jobs could not be finished on this connection; reconnecting")]
    CannotFinishJobs,
    /// A mandatory publish could not be routed (its queue does not exist).
    #[error("no queue took the message published to {0:?}: is the topology declared?")]
    Unroutable(String),
}

impl BrokerError {
    pub(crate) fn amqp(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let context = context.into();
        move |source| Self::Amqp { context, source }
    }
}

/// Frame size asked for unless the URL sets `frame_max`: lapin keeps buffers per connection
/// sized from it (8 MiB at the broker's default of 128 KiB), while jobs (at most 64 KiB) and
/// events are small; measured: the worker's peak RSS with 1,000 jobs in flight fell by 8 MiB.
const FRAME_MAX: u32 = 16 * 1024;
/// Heartbeat asked for unless the URL sets `heartbeat`: a dead connection is noticed within
/// about a minute rather than after the broker's default of 60 s times two.
const HEARTBEAT_SECS: u16 = 30;

/// Connects to the broker; `name` shows in the management UI's connection list.
pub async fn connect(amqp_url: &str, name: &str) -> Result<Connection, BrokerError> {
    let mut uri: AMQPUri = amqp_url.parse().map_err(|problem| {
        BrokerError::InvalidUrl(format!(
            "{}: {problem}",
            crate::config::redact_url(amqp_url)
        ))
    })?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|source| BrokerError::Amqp {
            context: format!("connecting to {}", crate::config::redact_url(amqp_url)),
            source,
        })
}

/// A channel in confirm mode: every publish is awaited until the broker has taken it.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `connection` and turns on publisher confirms.
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening the publishing channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::amqp("enabling publisher confirms"))?;
        Ok(Self { channel })
    }

    /// The underlying channel (for declarations).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the broker's confirm. With `mandatory`, a message no queue
    /// takes is an error instead of silently vanishing (dead-letter and delay queues must exist).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        let target = || {
            if exchange.is_empty() {
                format!("queue {routing_key}")
            } else {
                format!("exchange {exchange} ({routing_key})")
            }
        };
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                properties,
            )
            .await
            .map_err(|source| BrokerError::Amqp {
                context: format!("publishing to {}", target()),
                source,
            })?
            .await
            .map_err(|source| BrokerError::Amqp {
                context: format!("awaiting the confirm from {}", target()),
                source,
            })?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(BrokerError::Unroutable(target())),
            Confirmation::Nack(_) => Err(BrokerError::Nacked(target())),
            // Cannot happen: the channel is in confirm mode from `open`.
            Confirmation::NotRequested => Ok(()),
        }
    }
}

/// Messages ready in `queue` (a passive declare). A missing queue is an error, and the broker
/// closes the channel it was asked on: callers use a channel they can lose.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, BrokerError> {
    Ok(queue_counts(channel, queue).await?.messages)
}

/// What one passive declare of a queue tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Messages ready in `queue` and its consumers (one passive declare; see [`queue_depth`]).
pub async fn queue_counts(channel: &Channel, queue: &str) -> Result<QueueCounts, BrokerError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(ShortString::from(queue), options, FieldTable::default())
        .await
        .map_err(BrokerError::amqp(format!("looking up queue {queue}")))?;
    Ok(QueueCounts {
        messages: declared.message_count(),
        consumers: declared.consumer_count(),
    })
}
