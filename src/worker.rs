//! `dialer run`: the consume loop around [`Pipeline`]. Connects (and reconnects) to the broker,
//! declares the topology, consumes with prefetch = concurrency, applies each job's verdict,
//! pauses on systemic failures, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, BrokerError, Publisher, Topology, text, with_headers};
use crate::config::{DecisionStoreKind, RunSettings};
use crate::decisions::{DecisionStore, HEARTBEAT_EVERY};
use crate::event::Outcome;
use crate::genesys::GenesysClient;
use crate::health::{self, Readiness};
use crate::metrics as m;
use crate::pipeline::{
    ATTEMPTS_HEADER, CLAIM_WAIT_MARGIN, FailureCause, Incoming, Pipeline, SystemicFailure,
    TRIES_HEADER, Verdict,
};
use crate::ratelimit::RateGate;

/// Reconnect backoff cap: long enough not to hammer a broker that is restarting.
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// Systemic pause backoff cap (contract §5).
const PAUSE_CAP: Duration = Duration::from_secs(30);
/// Decisions older than this are pruned: a CRM that resends a job a week later gets a new call.
const DECISION_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A started worker.
pub struct RunningWorker {
    /// Where `/metrics`, `/healthz`, `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Readiness flags, for tests and the demo.
    pub readiness: Arc<Readiness>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Waits until the worker has stopped (after `shutdown` was cancelled and it drained).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the worker task panicked")?
    }
}

/// Starts the worker: binds the metrics endpoint, opens the decision store, and runs the consume
/// loop in the background until `shutdown` is cancelled.
pub async fn start(
    settings: RunSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningWorker> {
    crate::job::warm_up();
    let metrics = m::install();
    let readiness = Arc::new(Readiness::default());
    // The endpoint outlives the drain so probes see "not ready" while jobs finish.
    let server_stop = CancellationToken::new();
    let metrics_addr = health::serve(
        settings.metrics_addr,
        readiness.clone(),
        metrics,
        server_stop.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "cannot listen on DIALER_METRICS_ADDR {}",
            settings.metrics_addr
        )
    })?;
    if settings.decisions == DecisionStoreKind::Memory {
        tracing::warn!(
            "DIALER_DECISIONS=memory: decisions are forgotten on exit; for tests and benchmarks only"
        );
    }
    let store =
        open_store(&settings, &shutdown)
            .await
            .with_context(|| match settings.decisions {
                DecisionStoreKind::File => format!(
                    "cannot open the decision store in DIALER_STATE_DIR {}",
                    settings.state_dir.display()
                ),
                DecisionStoreKind::Postgres => {
                    "cannot open the decision store at DIALER_DATABASE_URL".to_owned()
                }
                DecisionStoreKind::Memory => "cannot open the in-memory decision store".to_owned(),
            })?;
    let gate = Arc::new(RateGate::new(settings.rate_limit, settings.rate_burst));
    let genesys =
        GenesysClient::new(&settings.genesys, gate).context("cannot set up the Genesys client")?;
    let topology = Topology::new(&settings.broker.prefix, settings.broker.queue_type);
    let (systemic_tx, systemic_rx) = mpsc::unbounded_channel();
    let mut pipeline = Pipeline::new(
        genesys,
        store,
        topology,
        settings.max_attempts.get(),
        settings.retry_ambiguous,
        settings.worker_name.clone(),
        shutdown.clone(),
        systemic_tx,
    );
    pipeline.claim_wait = settings.genesys.timeout + CLAIM_WAIT_MARGIN;
    let pipeline = Arc::new(pipeline);
    // The lease exists before the first claim, so no replica ever sees a claim of ours
    // without it.
    pipeline
        .store
        .heartbeat(&pipeline.owner)
        .await
        .context("the decision store does not answer its first heartbeat")?;
    tracing::info!(
        broker = %crate::config::redact_url(&settings.broker.amqp_url),
        queue = %pipeline.topology.jobs_queue,
        api = %settings.genesys.api_base,
        rate = %settings.rate_limit,
        burst = settings.rate_burst.get(),
        concurrency = settings.concurrency.get(),
        store = %pipeline.store.describe(),
        metrics = %metrics_addr,
        "dialer worker starting"
    );
    let supervisor = Supervisor {
        settings,
        pipeline,
        readiness: readiness.clone(),
        shutdown,
        systemic: systemic_rx,
        tracker: TaskTracker::new(),
        last_pause_end: None,
        pause_backoff: Duration::from_secs(1),
    };
    let task = tokio::spawn(async move {
        let result = supervisor.run().await;
        server_stop.cancel();
        result
    });
    Ok(RunningWorker {
        metrics_addr,
        readiness,
        task,
    })
}

/// How a broker session ended.
enum SessionEnd {
    /// Shutdown requested; jobs drained.
    Shutdown,
    /// The connection or channel failed.
    Lost(BrokerError),
}

struct Supervisor {
    settings: RunSettings,
    pipeline: Arc<Pipeline>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
    systemic: mpsc::UnboundedReceiver<SystemicFailure>,
    tracker: TaskTracker,
    last_pause_end: Option<Instant>,
    pause_backoff: Duration,
}

impl Supervisor {
    async fn run(mut self) -> anyhow::Result<()> {
        spawn_pruning(self.pipeline.clone(), self.shutdown.clone());
        // Not the shutdown token: the lease must outlive the drain, or other replicas would
        // take this process's jobs still finishing for jobs of a dead worker.
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = spawn_heartbeat(self.pipeline.clone(), stop_heartbeat.clone());
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            match self.session().await {
                // The session drained the jobs in flight before closing its connection.
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(error) => {
                    self.set_connected(false);
                    self.readiness.consuming.store(false, Ordering::Relaxed);
                    if self.shutdown.is_cancelled() {
                        // Lost while draining: the broker requeues what was unacked; jobs
                        // still running finish (or fail to ack) on their own.
                        self.drain().await;
                        break;
                    }
                    // A session that ran a while was healthy: start the backoff over.
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    // Half fixed, half random: replicas that lost the broker together do not
                    // all come back in the same instant.
                    let wait = backoff / 2 + backoff.mul_f64(rand::random::<f64>() / 2.0);
                    tracing::warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "broker connection lost; reconnecting");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {
                            self.drain().await;
                            break;
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_CAP);
                }
            }
        }
        // Drained: no claim of ours is left undecided, so the lease can go now and no
        // replica waits out its remaining seconds.
        stop_heartbeat.cancel();
        let _ = heartbeat.await;
        if let Err(error) = self.pipeline.store.end_lease(&self.pipeline.owner).await {
            tracing::warn!(%error, "cannot give up the decision store lease; it expires by itself");
        }
        tracing::info!("dialer worker stopped");
        Ok(())
    }

    /// Waits up to the shutdown grace for the jobs in flight; `false` when some are still
    /// running then (the broker redelivers them once the connection closes).
    async fn drain(&self) -> bool {
        self.tracker.close();
        let drained = tokio::time::timeout(self.settings.shutdown_grace, self.tracker.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                "shutdown grace exceeded; the broker requeues the jobs still unfinished"
            );
        }
        drained
    }

    fn set_connected(&self, connected: bool) {
        self.readiness.connected.store(connected, Ordering::Relaxed);
        metrics::gauge!(m::BROKER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }

    /// One connection's life: connect, declare, consume until shutdown or failure.
    async fn session(&mut self) -> SessionEnd {
        let (connection, publisher, channel) = match self.open().await {
            Ok(opened) => opened,
            Err(error) => return SessionEnd::Lost(error),
        };
        self.set_connected(true);
        tracing::info!("connected to the broker; consuming");
        let end = self.consume(&publisher, &channel).await;
        if matches!(end, SessionEnd::Shutdown) {
            // Drain while the connection is still up: jobs in flight publish and ack on it.
            self.drain().await;
            let _ = connection
                .close(200, ShortString::from("dialer shutting down"))
                .await;
            self.set_connected(false);
        }
        end
    }

    async fn open(&self) -> Result<(Connection, Publisher, Channel), BrokerError> {
        let broker = &self.settings.broker;
        let connection = broker::connect(
            &broker.amqp_url,
            &format!("dialer {}", self.settings.worker_name),
        )
        .await?;
        let publisher = Publisher::open(&connection).await?;
        self.pipeline.topology.declare(publisher.channel()).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening the consuming channel"))?;
        // Prefetch = concurrency: the broker never hands this process more jobs than it works on.
        channel
            .basic_qos(
                self.settings.concurrency.get(),
                BasicQosOptions { global: false },
            )
            .await
            .map_err(BrokerError::amqp("setting the prefetch"))?;
        Ok((connection, publisher, channel))
    }

    /// Consumes until shutdown (→ drained) or a broker failure; pauses on systemic failures.
    async fn consume(&mut self, publisher: &Publisher, channel: &Channel) -> SessionEnd {
        let queue = self.pipeline.topology.jobs_queue.clone();
        loop {
            let mut consumer = match channel
                .basic_consume(
                    ShortString::from(queue.as_str()),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
            {
                Ok(consumer) => consumer,
                Err(source) => {
                    return SessionEnd::Lost(BrokerError::Amqp {
                        context: format!("consuming from {queue}"),
                        source,
                    });
                }
            };
            self.readiness.consuming.store(true, Ordering::Relaxed);
            // Cancelled by a job that could not finish on the broker (a closed publishing
            // channel, a deleted queue): consuming on would only cycle jobs through requeues,
            // so the session ends and the reconnect redeclares everything.
            let broken = CancellationToken::new();
            let stop = loop {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break Stop::Shutdown,
                    _ = broken.cancelled() => break Stop::Broken,
                    Some(failure) = self.systemic.recv() => {
                        if self.last_pause_end.is_some_and(|end| failure.at < end) {
                            continue; // reported by a job that started before the last pause ended
                        }
                        break Stop::Pause(failure);
                    }
                    delivery = consumer.next() => match delivery {
                        Some(Ok(delivery)) => self.spawn_job(publisher.clone(), delivery, broken.clone()),
                        Some(Err(source)) => return SessionEnd::Lost(BrokerError::Amqp { context: "receiving deliveries".into(), source }),
                        None => return SessionEnd::Lost(BrokerError::ConsumerCancelled(queue)),
                    },
                }
            };
            // Stop taking jobs; what was already delivered still gets a task (it requeues
            // itself on shutdown or systemic failure), so nothing stays unacked forever.
            self.readiness.consuming.store(false, Ordering::Relaxed);
            let tag = consumer.tag();
            if let Err(source) = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                return SessionEnd::Lost(BrokerError::Amqp {
                    context: "cancelling the consumer".into(),
                    source,
                });
            }
            while let Some(Ok(delivery)) = consumer.next().await {
                self.spawn_job(publisher.clone(), delivery, broken.clone());
            }
            match stop {
                Stop::Shutdown => return SessionEnd::Shutdown,
                Stop::Broken => return SessionEnd::Lost(BrokerError::CannotFinishJobs),
                Stop::Pause(failure) => {
                    if !self.pause(failure).await {
                        return SessionEnd::Shutdown;
                    }
                }
            }
        }
    }

    /// Waits out a systemic failure: not ready, credentials retried with capped backoff.
    /// Returns `false` when shutdown started meanwhile.
    async fn pause(&mut self, failure: SystemicFailure) -> bool {
        self.readiness.paused.store(true, Ordering::Relaxed);
        metrics::gauge!(m::SYSTEMIC_PAUSE).set(1.0);
        // Pauses that follow each other closely (a permission still missing) back off further.
        let recent = self
            .last_pause_end
            .is_some_and(|end| end.elapsed() < Duration::from_secs(60));
        self.pause_backoff = if recent {
            (self.pause_backoff * 2).min(PAUSE_CAP)
        } else {
            Duration::from_secs(1)
        };
        let mut wait = self.pause_backoff;
        let what = match failure.cause {
            FailureCause::Credentials => "Genesys accepts the credentials",
            FailureCause::Store => "the decision store answers",
        };
        tracing::error!(error = %failure.message, "systemic failure: jobs requeued, consumption paused until {what}");
        let resumed = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break false,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.probe(failure.cause).await {
                Ok(()) => break true,
                Err(error) => {
                    wait = (wait * 2).min(PAUSE_CAP);
                    tracing::warn!(error = %error, retry_in_s = wait.as_secs(), "still failing: {}", failure.message);
                }
            }
        };
        self.last_pause_end = Some(Instant::now());
        self.readiness.paused.store(false, Ordering::Relaxed);
        metrics::gauge!(m::SYSTEMIC_PAUSE).set(0.0);
        if resumed {
            tracing::info!("{what} again; resuming");
        }
        resumed
    }

    /// Whether what failed works again: a token for credentials; for the store, a heartbeat
    /// and then every decision it refused earlier written.
    async fn probe(&self, cause: FailureCause) -> anyhow::Result<()> {
        match cause {
            FailureCause::Credentials => {
                let tokens = self.pipeline.genesys.tokens();
                tokens.forget();
                tokens.token().await?;
            }
            FailureCause::Store => {
                self.pipeline.store.heartbeat(&self.pipeline.owner).await?;
                if !self.pipeline.write_unwritten().await? {
                    anyhow::bail!("decisions are still waiting to be recorded");
                }
            }
        }
        Ok(())
    }

    fn spawn_job(&self, publisher: Publisher, delivery: Delivery, broken: CancellationToken) {
        let pipeline = self.pipeline.clone();
        self.tracker.spawn(async move {
            let started = Instant::now();
            metrics::counter!(m::JOBS_RECEIVED_TOTAL).increment(1);
            metrics::gauge!(m::JOBS_IN_FLIGHT).increment(1.0);
            if let Some(timestamp) = delivery.properties.timestamp() {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let waited = now.saturating_sub(i64::try_from(*timestamp).unwrap_or(now)).max(0);
                metrics::histogram!(m::QUEUE_WAIT_SECONDS).record(waited as f64);
            }
            let verdict = pipeline
                .process(Incoming {
                    body: &delivery.data,
                    properties: &delivery.properties,
                    redelivered: delivery.redelivered,
                })
                .await;
            let label = verdict_label(&verdict);
            match apply(&pipeline, &publisher, &delivery, verdict).await {
                Ok(()) => {
                    metrics::counter!(m::JOBS_COMPLETED_TOTAL, "outcome" => label).increment(1);
                    metrics::histogram!(m::JOB_DURATION_SECONDS, "outcome" => label)
                        .record(started.elapsed().as_secs_f64());
                }
                Err(error) => {
                    // The decision (if any) is recorded; the broker redelivers the job and
                    // the worker publishes the same decision again.
                    tracing::warn!(error = %error, "could not finish the job on the broker; it will be redelivered");
                    let _ = delivery
                        .acker
                        .nack(BasicNackOptions { multiple: false, requeue: true })
                        .await;
                    broken.cancel();
                }
            }
            metrics::gauge!(m::JOBS_IN_FLIGHT).decrement(1.0);
        });
    }
}

enum Stop {
    Shutdown,
    Pause(SystemicFailure),
    Broken,
}

/// Metric label of a verdict: the outcome, or what happened instead.
fn verdict_label(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Publish { event, .. } => event.outcome.as_str(),
        Verdict::Delay { .. } => "delayed",
        Verdict::Requeue { .. } => "requeued",
    }
}

/// The ack decision, in one place: publish the event with confirms, then ack, dead-letter,
/// delay or requeue (`requeue` always written out).
async fn apply(
    pipeline: &Pipeline,
    publisher: &Publisher,
    delivery: &Delivery,
    verdict: Verdict,
) -> Result<(), BrokerError> {
    let topology = &pipeline.topology;
    let ack = || delivery.acker.ack(BasicAckOptions { multiple: false });
    match verdict {
        Verdict::Publish { event, bytes } => {
            let properties = event_properties(delivery, event.job_id.as_deref());
            publisher
                .publish(
                    &topology.reply_exchange,
                    &event.outcome.routing_key(),
                    &bytes,
                    properties.clone(),
                    false,
                )
                .await?;
            metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "outcome" => event.outcome.as_str())
                .increment(1);
            if let Some(reply_to) = delivery
                .properties
                .reply_to()
                .as_ref()
                .filter(|r| !r.as_str().is_empty())
            {
                publisher
                    .publish("", reply_to.as_str(), &bytes, properties, false)
                    .await?;
            }
            if event.outcome.goes_to_dead_letter() {
                let (kind, message) = event
                    .error
                    .as_ref()
                    .map(|e| (e.kind.clone(), e.message.clone()))
                    .unwrap_or_default();
                let now = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                let headers = with_headers(
                    &delivery.properties,
                    vec![
                        (
                            "x-dialer-job-id",
                            event.job_id.clone().map(text).unwrap_or(AMQPValue::Void),
                        ),
                        ("x-dialer-outcome", text(event.outcome.as_str())),
                        ("x-dialer-error-kind", text(kind)),
                        ("x-dialer-error", text(message)),
                        (
                            "x-dialer-attempts",
                            AMQPValue::LongLongInt(event.attempts.into()),
                        ),
                        ("x-dialer-dead-lettered-at", text(now)),
                    ],
                );
                publisher
                    .publish(
                        "",
                        &topology.dead_letter_queue,
                        &delivery.data,
                        headers,
                        true,
                    )
                    .await?;
            }
            ack().await.map_err(BrokerError::amqp("acking the job"))?;
            if event.outcome == Outcome::Placed {
                tracing::debug!("job done");
            }
        }
        Verdict::Delay {
            queue,
            attempts,
            tries,
        } => {
            let headers = with_headers(
                &delivery.properties,
                vec![
                    (ATTEMPTS_HEADER, AMQPValue::LongLongInt(attempts.into())),
                    (TRIES_HEADER, AMQPValue::LongLongInt(tries.into())),
                ],
            );
            publisher
                .publish("", &queue, &delivery.data, headers, true)
                .await?;
            ack()
                .await
                .map_err(BrokerError::amqp("acking the delayed job"))?;
        }
        Verdict::Requeue { reason } => {
            tracing::info!(reason, "job given back to the queue");
            delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map_err(BrokerError::amqp("requeueing the job"))?;
        }
    }
    Ok(())
}

/// Properties of a result event (contract §4).
fn event_properties(delivery: &Delivery, job_id: Option<&str>) -> BasicProperties {
    let correlation = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned())
        .or_else(|| job_id.map(str::to_owned));
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(uuid::Uuid::new_v4().to_string()))
        .with_timestamp(
            u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or_default(),
        );
    if let Some(correlation) = correlation {
        properties = properties.with_correlation_id(ShortString::from(correlation));
    }
    properties
}

/// Opens the configured decision store. A PostgreSQL that does not answer yet (a database
/// starting beside the worker, a network blip) is retried with capped backoff while `/readyz`
/// says not ready; anything else (a bad URL, a newer schema, a state directory in use) stops
/// the start at once.
async fn open_store(
    settings: &RunSettings,
    shutdown: &CancellationToken,
) -> Result<DecisionStore, crate::decisions::StoreError> {
    let mut wait = Duration::from_secs(1);
    loop {
        let opened = DecisionStore::open_configured(
            settings.decisions,
            &settings.state_dir,
            settings.database_url.as_ref(),
            false,
        )
        .await;
        match opened {
            Err(error) if error.is_unreachable() => {
                tracing::warn!(%error, retry_in_s = wait.as_secs(), "the decision store does not answer yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(error),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(PAUSE_CAP);
            }
            other => return other,
        }
    }
}

/// Renews this process's lease (PostgreSQL) or checks its store file (file) every
/// [`HEARTBEAT_EVERY`]; a failure pauses consumption like any store failure.
fn spawn_heartbeat(
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(HEARTBEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            if let Err(error) = pipeline.store.heartbeat(&pipeline.owner).await {
                tracing::warn!(%error, "decision store heartbeat failed");
                let _ = pipeline
                    .systemic
                    .send(SystemicFailure::store(error.to_string()));
            }
        }
    })
}

fn spawn_pruning(pipeline: Arc<Pipeline>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            match pipeline.store.prune(DECISION_RETENTION).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned old decisions"),
                Err(error) => tracing::warn!(%error, "pruning decisions failed"),
            }
        }
    });
}
