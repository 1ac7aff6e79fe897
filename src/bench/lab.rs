//! One measurement's corner of the broker: a topology under a unique prefix, a queue that
//! collects every result event, publishing jobs, and deleting all of it afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};

use crate::broker::{self, JOBS_ROUTING_KEY, Topology};
use crate::config::{BrokerSettings, QueueType};

/// Publishes in flight at once while pre-loading: enough to keep the broker busy, few enough
/// that a refused publish is noticed early.
const PRELOAD_WINDOW: usize = 512;

/// A topology of its own for one measurement, and the bench's connection to it.
pub(crate) struct Lab {
    /// The broker settings with this measurement's prefix.
    pub(crate) broker: BrokerSettings,
    /// The queue and exchange names.
    pub(crate) topology: Topology,
    /// A queue bound to the reply exchange with `#`: every result event lands here.
    pub(crate) events_queue: String,
    /// Extra queues the measurement declared, deleted with the rest.
    extra_queues: Vec<String>,
    connection: Connection,
    channel: Channel,
}

impl Lab {
    /// Declares the topology under `<prefix>.bench-<run>-<name>` and the events queue.
    pub(crate) async fn open(
        base: &BrokerSettings,
        run_id: &str,
        name: &str,
    ) -> anyhow::Result<Lab> {
        let broker = BrokerSettings {
            prefix: lab_prefix(base, run_id, name),
            ..base.clone()
        };
        let topology = Topology::new(&broker.prefix, broker.queue_type);
        let connection = broker::connect(&broker.amqp_url, &format!("dialer bench {name}")).await?;
        let channel = connection
            .create_channel()
            .await
            .context("opening the bench's channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        let lab = Lab {
            events_queue: events_queue(&broker.prefix),
            broker,
            topology,
            extra_queues: Vec::new(),
            connection,
            channel,
        };
        match lab.declare_all().await {
            Ok(()) => Ok(lab),
            Err(error) => {
                // Whatever got declared before the failure is deleted all the same.
                lab.cleanup().await;
                Err(error)
            }
        }
    }

    async fn declare_all(&self) -> anyhow::Result<()> {
        self.topology
            .declare(&self.channel)
            .await
            .context("declaring the bench topology")?;
        self.declare(&self.events_queue, FieldTable::default())
            .await?;
        self.channel
            .queue_bind(
                ShortString::from(self.events_queue.as_str()),
                ShortString::from(self.topology.reply_exchange.as_str()),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the events queue")?;
        Ok(())
    }

    /// Declares a durable queue of the jobs queue's type, deleted at cleanup.
    pub(crate) async fn declare_queue_like_jobs(&mut self, name: &str) -> anyhow::Result<()> {
        let mut args = FieldTable::default();
        if self.broker.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        self.extra_queues.push(name.to_owned());
        self.declare(name, args).await
    }

    async fn declare(&self, name: &str, args: FieldTable) -> anyhow::Result<()> {
        self.channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .with_context(|| format!("declaring queue {name}"))?;
        Ok(())
    }

    /// Binds `queue` to the jobs exchange with the jobs routing key: it then gets a copy of
    /// every job published there, as the jobs queue does.
    pub(crate) async fn bind_to_jobs_exchange(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_bind(
                ShortString::from(queue),
                ShortString::from(self.topology.jobs_exchange.as_str()),
                ShortString::from(JOBS_ROUTING_KEY),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding {queue} to the jobs exchange"))?;
        Ok(())
    }

    /// Publishes a job to the jobs exchange (persistent) and returns the confirm to await.
    pub(crate) async fn send_to_jobs_exchange(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                ShortString::from(self.topology.jobs_exchange.as_str()),
                ShortString::from(JOBS_ROUTING_KEY),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .context("publishing to the jobs exchange")
    }

    /// The bench's connection (for more channels).
    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Publishes `body` to `queue` through the default exchange, persistent, and returns the
    /// confirm to await (so callers can pipeline).
    pub(crate) async fn send(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .with_context(|| format!("publishing to {queue}"))
    }

    /// Publishes every body to the jobs queue, a window of them in flight at a time, and waits
    /// for all their confirms.
    pub(crate) async fn preload(
        &self,
        bodies: impl IntoIterator<Item = Vec<u8>>,
    ) -> anyhow::Result<usize> {
        let mut pending = Vec::with_capacity(PRELOAD_WINDOW);
        let mut count = 0;
        for body in bodies {
            pending.push(
                self.send(&self.topology.jobs_queue, &body, job_properties())
                    .await?,
            );
            count += 1;
            if pending.len() == PRELOAD_WINDOW {
                await_confirms(&mut pending).await?;
            }
        }
        await_confirms(&mut pending).await?;
        Ok(count)
    }

    /// Starts a consumer on the events queue (no acks: the cheapest consumer, the same in every
    /// measurement) that records when each of `n` events arrives, giving up at `deadline`.
    pub(crate) async fn collect_events(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Collector> {
        let channel = self
            .connection
            .create_channel()
            .await
            .context("opening the events channel")?;
        let mut consumer = channel
            .basic_consume(
                ShortString::from(self.events_queue.as_str()),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consuming result events")?;
        let task = tokio::spawn(async move {
            let mut events = Events {
                times: Vec::with_capacity(n),
                not_placed: 0,
            };
            let deadline = tokio::time::Instant::now() + timeout;
            while events.times.len() < n {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        events.times.push(Instant::now());
                        // The routing key says the outcome; parsing bodies would steal CPU
                        // from the worker being measured.
                        if delivery.routing_key.as_str() != "dial.placed" {
                            events.not_placed += 1;
                        }
                    }
                    Ok(Some(Err(error))) => {
                        return Err(anyhow::Error::from(error).context("receiving events"));
                    }
                    Ok(None) => bail!("the events consumer was cancelled"),
                    Err(_) => bail!(
                        "only {} of {n} result events within {timeout:?}",
                        events.times.len()
                    ),
                }
            }
            let _ = channel.close(200, ShortString::from("done")).await;
            Ok(events)
        });
        Ok(Collector { task })
    }

    /// Deletes every queue and exchange of the measurement and closes the connection. Errors
    /// are reported, not returned: cleanup runs after failures too.
    pub(crate) async fn cleanup(self) {
        let mut extra = vec![self.events_queue.clone()];
        extra.extend(self.extra_queues.iter().cloned());
        // A fresh channel: the measurement's may have been closed by an error.
        match self.connection.create_channel().await {
            Ok(channel) => {
                if let Err(error) = self.topology.delete(&channel, &extra).await {
                    eprintln!(
                        "dialer bench: cannot clean up {}.*: {error}",
                        self.broker.prefix
                    );
                }
            }
            Err(error) => {
                eprintln!(
                    "dialer bench: cannot clean up {}.*: {error}",
                    self.broker.prefix
                );
            }
        }
        let _ = self
            .connection
            .close(200, ShortString::from("bench done"))
            .await;
    }
}

/// Deletes every queue and exchange the measurements `names` of run `run_id` may have
/// declared (after an interruption, when their own cleanup could not run).
pub(crate) async fn delete_run(base: &BrokerSettings, run_id: &str, names: &[&str]) {
    let connection = match broker::connect(&base.amqp_url, "dialer bench cleanup").await {
        Ok(connection) => connection,
        Err(error) => {
            eprintln!("dialer bench: cannot clean up: {error}");
            return;
        }
    };
    let channel = match connection.create_channel().await {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("dialer bench: cannot clean up: {error}");
            return;
        }
    };
    for name in names {
        let prefix = lab_prefix(base, run_id, name);
        let topology = Topology::new(&prefix, base.queue_type);
        // Nothing here can make things worse; what cannot be deleted is reported.
        if let Err(error) = topology
            .delete(&channel, &[events_queue(&prefix), tap_queue(&prefix)])
            .await
        {
            eprintln!("dialer bench: cannot clean up {prefix}.*: {error}");
        }
    }
    let _ = connection
        .close(200, ShortString::from("bench interrupted"))
        .await;
}

/// The prefix of measurement `name` of run `run_id`.
fn lab_prefix(base: &BrokerSettings, run_id: &str, name: &str) -> String {
    format!("{}.bench-{run_id}-{name}", base.prefix)
}

/// The queue collecting a measurement's result events.
fn events_queue(prefix: &str) -> String {
    format!("{prefix}.bench-events")
}

/// The tap queue of the overhead measurement.
pub(crate) fn tap_queue(prefix: &str) -> String {
    format!("{prefix}.bench-tap")
}

/// When each result event arrived.
pub(crate) struct Events {
    /// Arrival instants, in order.
    pub(crate) times: Vec<Instant>,
    /// Events whose outcome was not `placed` (each one is a failed measurement).
    pub(crate) not_placed: usize,
}

/// A running event consumer.
pub(crate) struct Collector {
    task: tokio::task::JoinHandle<anyhow::Result<Events>>,
}

impl Collector {
    /// Waits for the events (or the consumer's failure or timeout).
    pub(crate) async fn finish(self) -> anyhow::Result<Events> {
        let events = self.task.await.context("the events consumer panicked")??;
        if events.not_placed > 0 {
            bail!(
                "{} of {} jobs did not end `placed`: the measurement is not valid",
                events.not_placed,
                events.times.len()
            );
        }
        Ok(events)
    }
}

/// Properties a CRM would set on a job: persistent, with a timestamp.
pub(crate) fn job_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_timestamp(unix_seconds())
}

/// Seconds since the epoch, for AMQP timestamps.
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Awaits every pending confirm; a nack is an error.
pub(crate) async fn await_confirms(pending: &mut Vec<PublisherConfirm>) -> anyhow::Result<()> {
    for confirm in pending.drain(..) {
        let confirmation = confirm.await.context("awaiting a publisher confirm")?;
        if !confirmation.is_ack() {
            bail!("the broker refused (nacked) a bench message");
        }
    }
    Ok(())
}
