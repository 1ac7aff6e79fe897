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
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::headers::{self, DeadLetter, Marks};
use crate::broker::{self, BrokerError, Publisher, Topology};
use crate::config::{DecisionStoreKind, RunSettings};
use crate::decisions::{DecisionStore, HEARTBEAT_EVERY};
use crate::event::Outcome;
use crate::genesys::GenesysClient;
use crate::health::{self, Readiness};
use crate::liveness::{Excuse, Liveness};
use crate::metrics as m;
use crate::pipeline::{
    Arrival, CLAIM_WAIT_MARGIN, FailureCause, Incoming, Pipeline, PipelineSettings,
    SystemicFailure, Verdict,
};
use crate::ratelimit::RateGate;

/// Reconnect backoff cap: long enough not to hammer a broker that is restarting.
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// Systemic pause backoff cap (docs/jobs-and-events.md §5: "capped at 30 s").
const PAUSE_CAP: Duration = Duration::from_secs(30);
/// Longest wait between two probes while the circuit breaker is open: a recovered Genesys is
/// noticed within ten seconds, and one probe every ten seconds is no load.
const CIRCUIT_PROBE_CAP: Duration = Duration::from_secs(10);
/// Decisions older than this are pruned: a CRM that resends a job a week later gets a new call.
const DECISION_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A started worker.
pub struct RunningWorker {
    /// Where `/metrics`, `/healthz`, `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Readiness flags, for tests and the demo.
    pub readiness: Arc<Readiness>,
    /// What `/healthz` says, and the jobs in flight it judges, for tests.
    pub liveness: Arc<Liveness>,
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
    let metrics = m::install(&settings.broker.prefix);
    let readiness = Arc::new(Readiness::default());
    let liveness = Arc::new(Liveness::new(settings.liveness_timeout));
    // The endpoint outlives the drain so probes see "not ready" while jobs finish.
    let server_stop = CancellationToken::new();
    let metrics_addr = health::serve(
        settings.metrics_addr,
        readiness.clone(),
        liveness.clone(),
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
    let gate = Arc::new(RateGate::for_settings(&settings, &shutdown));
    let genesys =
        GenesysClient::new(&settings.genesys, gate).context("cannot set up the Genesys client")?;
    let topology = Arc::new(Topology::new(
        &settings.broker.prefix,
        settings.broker.queue_type,
    ));
    let (pipeline, systemic_rx) = Pipeline::new(
        PipelineSettings {
            genesys,
            store,
            max_attempts: settings.max_attempts.get(),
            retry_ambiguous: settings.retry_ambiguous,
            worker: settings.worker_name.clone(),
            claim_wait: settings.genesys.timeout + CLAIM_WAIT_MARGIN,
        },
        shutdown.clone(),
    );
    let pipeline = Arc::new(pipeline);
    // The lease exists before the first claim, so no replica ever sees a claim of ours
    // without it.
    pipeline
        .heartbeat()
        .await
        .context("the decision store does not answer its first heartbeat")?;
    tracing::info!(
        broker = %crate::config::redact_url(&settings.broker.amqp_url),
        queue = %topology.jobs_queue,
        api = %settings.genesys.api_base,
        rate = %settings.rate_limit,
        burst = settings.rate_burst.get(),
        rate_mode = pipeline.genesys().gate().mode().as_str(),
        concurrency = settings.concurrency.get(),
        store = %pipeline.describe_store(),
        metrics = %metrics_addr,
        "dialer worker starting"
    );
    // Judged from here on, once the start can no longer fail: what came before either
    // finished or stopped the start.
    liveness
        .spawn_watchdog({
            let readiness = readiness.clone();
            let gate = pipeline.genesys().gate().clone();
            move || Excuse {
                paused: readiness.paused.load(Ordering::Relaxed),
                waiting_at_gate: gate.waiting(),
            }
        })
        .context("cannot start the liveness watchdog thread")?;
    liveness.spawn_runtime_heartbeat();
    let supervisor = Supervisor {
        settings,
        pipeline,
        topology,
        readiness: readiness.clone(),
        liveness: liveness.clone(),
        shutdown,
        systemic: systemic_rx,
        tracker: TaskTracker::new(),
        job_metrics: Arc::new(m::JobMetrics::register()),
        last_pause_end: None,
        pause_backoff: Duration::from_secs(1),
    };
    let stopped = liveness.clone();
    let task = tokio::spawn(async move {
        let result = supervisor.run().await;
        stopped.stop();
        server_stop.cancel();
        result
    });
    Ok(RunningWorker {
        metrics_addr,
        readiness,
        liveness,
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
    topology: Arc<Topology>,
    readiness: Arc<Readiness>,
    liveness: Arc<Liveness>,
    shutdown: CancellationToken,
    systemic: mpsc::UnboundedReceiver<SystemicFailure>,
    tracker: TaskTracker,
    job_metrics: Arc<m::JobMetrics>,
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
                    self.set_consuming(false);
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
        if let Err(error) = self.pipeline.end_lease().await {
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

    /// Whether a consumer is registered on the jobs queue: for `/readyz` and
    /// `dialer_consuming` ("connected but not consuming" shows as 1 and 0).
    fn set_consuming(&self, consuming: bool) {
        self.readiness.consuming.store(consuming, Ordering::Relaxed);
        metrics::gauge!(m::CONSUMING).set(if consuming { 1.0 } else { 0.0 });
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
        self.topology.declare(publisher.channel()).await?;
        self.topology.migrate(&connection, &publisher).await?;
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
        let queue = self.topology.jobs_queue.clone();
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
            self.set_consuming(true);
            // Cancelled by a job that could not finish on the broker (a closed publishing
            // channel, a deleted queue): consuming on would only cycle jobs through requeues,
            // so the session ends and the reconnect redeclares everything.
            let broken = CancellationToken::new();
            let mut circuit = self.pipeline.genesys().circuit().subscribe();
            let stop = loop {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break Stop::Shutdown,
                    _ = broken.cancelled() => break Stop::Broken,
                    Ok(()) = async { circuit.wait_for(Option::is_some).await.map(|_| ()) } => break Stop::Circuit,
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
            self.set_consuming(false);
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
                Stop::Circuit => {
                    if !self.circuit_pause().await {
                        return SessionEnd::Shutdown;
                    }
                }
            }
        }
    }

    /// Waits out a systemic failure: not ready, what failed (the credentials or the decision
    /// store) probed with capped backoff. Returns `false` when shutdown started meanwhile.
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

    /// Waits out an open circuit breaker: not ready, nothing consumed (the jobs it gave back
    /// wait in the queue), Genesys probed with capped backoff (never before a `Retry-After`
    /// pause has ended). Returns `false` when shutdown started meanwhile.
    async fn circuit_pause(&mut self) -> bool {
        self.readiness.paused.store(true, Ordering::Relaxed);
        let genesys = self.pipeline.genesys();
        let mut wait = Duration::from_secs(1);
        let resumed = loop {
            let next = Instant::now() + wait;
            let until = genesys
                .gate()
                .pause_deadline()
                .map_or(next, |pause| pause.max(next));
            tokio::select! {
                _ = self.shutdown.cancelled() => break false,
                _ = tokio::time::sleep_until(until) => {}
            }
            match genesys.probe().await {
                Ok(()) => break true,
                Err(error) => {
                    wait = (wait * 2).min(CIRCUIT_PROBE_CAP);
                    tracing::warn!(error = %error, retry_in_s = wait.as_secs(), "Genesys still looks down");
                }
            }
        };
        if resumed {
            genesys.circuit().close();
        }
        self.readiness.paused.store(false, Ordering::Relaxed);
        resumed
    }

    /// Whether what failed works again: a token for credentials; for the store, a heartbeat
    /// and then every decision it refused earlier written.
    async fn probe(&self, cause: FailureCause) -> anyhow::Result<()> {
        match cause {
            FailureCause::Credentials => self.pipeline.credentials_accepted().await?,
            FailureCause::Store => {
                self.pipeline.heartbeat().await?;
                if !self.pipeline.write_unwritten().await? {
                    anyhow::bail!("decisions are still waiting to be recorded");
                }
            }
        }
        Ok(())
    }

    fn spawn_job(&self, publisher: Publisher, delivery: Delivery, broken: CancellationToken) {
        let pipeline = self.pipeline.clone();
        let topology = self.topology.clone();
        let in_flight = self.liveness.job();
        let job_metrics = self.job_metrics.clone();
        self.tracker.spawn(async move {
            // Dropped when the task ends, however: the job's end is a move the watchdog sees.
            let _in_flight = in_flight;
            let started = Instant::now();
            let (job, waited) = incoming(&delivery, &topology);
            job_metrics.received(waited);
            // The step and the broker work after it are each boxed, so this task's own future
            // stays under 1 KiB. The step's future is a few KiB (under 4 in a release build);
            // inline, this task was copied whole when spawned and at each change of its stage,
            // which showed in the throughput profile (bench (2)), and it held room for both
            // futures for the job's whole life, which showed in the peak memory with 1,000 jobs
            // in flight (bench (6): 2.5 MiB more with the broker work inline).
            let step = Box::pin(pipeline.process(job));
            let verdict = match guarded(step).await {
                Ok(verdict) => verdict,
                Err(panic) => after_panic(&pipeline, &delivery, &panic),
            };
            let disposition = disposition(&verdict);
            match Box::pin(apply(&topology, &publisher, &delivery, verdict)).await {
                Ok(()) => job_metrics.finished(disposition, started.elapsed()),
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
            job_metrics.left();
        });
    }
}

enum Stop {
    Shutdown,
    Pause(SystemicFailure),
    Circuit,
    Broken,
}

/// The delivery as the pipeline sees it, and how long it waited. The dialer's marks (counters,
/// a replay) are believed only on what came through the internal route, which no CRM can write
/// to; on anything else they are ignored, so a publisher cannot make a job look like a retry or
/// a replay.
fn incoming<'a>(delivery: &'a Delivery, topology: &Topology) -> (Incoming<'a>, m::Waited) {
    let properties = &delivery.properties;
    let exchange = delivery.exchange.as_str();
    let trusted = exchange == topology.internal_exchange;
    if !trusted && Marks::present(properties) {
        tracing::warn!(
            exchange,
            "x-dialer-* headers on a message that did not come through the internal route are ignored"
        );
    }
    let marks = Marks::read(properties, trusted);
    let arrival = Arrival::of(delivery.redelivered, &marks);
    let waited = waited(
        arrival,
        delivery.redelivered,
        &marks,
        properties,
        headers::now_ms(),
    );
    let incoming = Incoming {
        body: &delivery.data,
        message_id: properties.message_id().as_ref().map(|s| s.as_str()),
        correlation_id: properties.correlation_id().as_ref().map(|s| s.as_str()),
        counters: marks.counters.unwrap_or_default(),
        arrival,
        redelivered: delivery.redelivered,
        exchange,
    };
    (incoming, waited)
}

/// How long a delivery waited, measured once per wait: a first delivery since the job's
/// creation (`timestamp_in_ms`, else the AMQP `timestamp`); a job back from a delay tier since
/// the worker sent it there. A broker redelivery or a replay measures nothing: its creation
/// time counts a wait already recorded (or a dead letter's days in the dead-letter queue).
fn waited(
    arrival: Arrival,
    redelivered: bool,
    marks: &Marks,
    properties: &BasicProperties,
    now_ms: u64,
) -> m::Waited {
    let since = |start_ms: u64| Duration::from_millis(now_ms.saturating_sub(start_ms));
    match (arrival, marks.delayed_at_ms) {
        (Arrival::New, _) => headers::created_at_ms(properties)
            .map_or(m::Waited::Unmeasured, |created| {
                m::Waited::InQueue(since(created))
            }),
        (Arrival::Retry, Some(delayed_at)) if !redelivered => m::Waited::InDelay(since(delayed_at)),
        _ => m::Waited::Unmeasured,
    }
}

/// Runs a job's step, turning a panic into its message: no input should make the step panic,
/// but if one ever does, the job must still end (and the panic be counted), not stay unacked
/// with the in-flight gauge stuck.
async fn guarded<F: std::future::Future<Output = Verdict>>(step: F) -> Result<Verdict, String> {
    use futures_util::FutureExt as _;
    std::panic::AssertUnwindSafe(step)
        .catch_unwind()
        .await
        .map_err(|panic| {
            metrics::counter!(m::JOB_PANICS_TOTAL).increment(1);
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned())
        })
}

/// What happens to a job whose step panicked: requeued once (a claim it made is then found
/// without a decision and ends `unknown`, as after a crash); a delivery that was already
/// redelivered ends `unknown` here, with an event and a dead letter, so a job that panics
/// every time cannot cycle forever.
fn after_panic(pipeline: &Pipeline, delivery: &Delivery, panic: &str) -> Verdict {
    let panic = crate::genesys::scrub(panic, crate::genesys::MESSAGE_LIMIT);
    tracing::error!(panic = %panic, redelivered = delivery.redelivered, "a job's step panicked");
    if !delivery.redelivered {
        return Verdict::Requeue {
            reason: "the job's step panicked",
        };
    }
    let now = time::OffsetDateTime::now_utc();
    let job_id = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|body| body.get("jobId")?.as_str().map(str::to_owned))
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
        })
        .map(|id| crate::genesys::scrub(&id, 128));
    let event = crate::event::ResultEvent {
        job_id,
        outcome: Outcome::Unknown,
        conversation_id: None,
        agent_user_id: None,
        phone_number: None,
        attempts: 0,
        error: Some(crate::event::EventError::new(
            "internal_error",
            format!(
                "the worker failed while handling this job ({panic}); the call may have been placed"
            ),
        )),
        attributes: None,
        received_at: now,
        completed_at: now,
        worker: pipeline.worker_name().to_owned(),
    };
    let bytes = event.to_json();
    Verdict::Publish {
        event: Box::new(event),
        bytes,
    }
}

/// What a verdict does with the job, for the metrics: ends it, or defers it.
fn disposition(verdict: &Verdict) -> m::Disposition {
    match verdict {
        Verdict::Publish { event, .. } => m::Disposition::Ended(event.outcome),
        Verdict::Delay { .. } => m::Disposition::Delayed,
        Verdict::Requeue { .. } => m::Disposition::Requeued,
    }
}

/// The ack decision, in one place: publish the event with confirms, then ack, dead-letter,
/// delay or requeue (`requeue` always written out).
async fn apply(
    topology: &Topology,
    publisher: &Publisher,
    delivery: &Delivery,
    verdict: Verdict,
) -> Result<(), BrokerError> {
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
                let (error_kind, error) = event
                    .error
                    .as_ref()
                    .map(|e| (e.kind.clone(), e.message.clone()))
                    .unwrap_or_default();
                let headers = DeadLetter {
                    job_id: event.job_id.clone(),
                    outcome: event.outcome.as_str().to_owned(),
                    error_kind,
                    error,
                    attempts: event.attempts,
                    at: headers::now_rfc3339(),
                }
                .properties(&delivery.properties);
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
        Verdict::Delay { wait, counters } => {
            let (_, queue) = topology.delay_queue(wait);
            publisher
                .publish(
                    "",
                    queue,
                    &delivery.data,
                    headers::delayed(&delivery.properties, counters, headers::now_ms()),
                    true,
                )
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

/// Properties of a result event (docs/jobs-and-events.md §3).
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
            if let Err(error) = pipeline.heartbeat().await {
                tracing::warn!(%error, "decision store heartbeat failed");
                pipeline.report_store_failure(&error);
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
            match pipeline.prune_decisions(DECISION_RETENTION).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned old decisions"),
                Err(error) => tracing::warn!(%error, "pruning decisions failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString};

    use super::*;
    use crate::broker::headers::Counters;
    use crate::config::QueueType;

    fn delivery(exchange: &str, redelivered: bool) -> Delivery {
        let mut headers = FieldTable::default();
        headers.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(4_294_967_295),
        );
        headers.insert(headers::TRIES.into(), AMQPValue::LongLongInt(2));
        headers.insert(
            headers::REPLAYED_AT.into(),
            AMQPValue::LongString(LongString::from("2026-01-01T00:00:00Z")),
        );
        let mut delivery = Delivery::mock(
            1,
            exchange.into(),
            "dial".into(),
            redelivered,
            b"{}".to_vec(),
        );
        delivery.properties = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("m-1".into());
        delivery
    }

    #[test]
    fn marks_count_only_through_the_internal_route() {
        let topology = Topology::new("p", QueueType::Quorum);
        for exchange in ["p.jobs", "", "amq.direct"] {
            let forged = delivery(exchange, false);
            let (seen, _) = incoming(&forged, &topology);
            assert_eq!(seen.arrival, Arrival::New, "{exchange:?}");
            assert_eq!(seen.counters, Counters::default(), "{exchange:?}");
            assert_eq!(seen.message_id, Some("m-1"));
            // The broker's redelivered flag cannot be forged: it still counts.
            let redelivered = delivery(exchange, true);
            assert_eq!(incoming(&redelivered, &topology).0.arrival, Arrival::Retry);
        }
        let ours = delivery("p.internal", false);
        let (seen, _) = incoming(&ours, &topology);
        assert_eq!(
            seen.arrival,
            Arrival::Retry,
            "counters make it the same job again"
        );
        assert_eq!(seen.counters.tries, 2);
        assert!(
            seen.counters.attempts < u32::MAX / 2,
            "capped: adding cannot wrap"
        );
    }

    #[test]
    fn a_wait_is_measured_on_a_first_delivery_or_back_from_a_delay_tier_only() {
        let now = 1_700_000_010_000;
        let mut table = FieldTable::default();
        table.insert(
            headers::TIMESTAMP_IN_MS.into(),
            AMQPValue::LongLongInt(1_700_000_008_750),
        );
        // The AMQP timestamp says 10 s; the millisecond header, 1.25 s, wins.
        let created = BasicProperties::default()
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let none = Marks::default();
        let delayed = Marks {
            delayed_at_ms: Some(1_700_000_004_000),
            ..Marks::default()
        };
        let wait = |arrival, redelivered, marks: &Marks| {
            waited(arrival, redelivered, marks, &created, now)
        };
        assert_eq!(
            wait(Arrival::New, false, &none),
            m::Waited::InQueue(Duration::from_millis(1250))
        );
        assert_eq!(
            waited(
                Arrival::New,
                false,
                &none,
                &BasicProperties::default().with_timestamp(1_700_000_000),
                now
            ),
            m::Waited::InQueue(Duration::from_secs(10)),
            "seconds when no header"
        );
        assert_eq!(
            waited(Arrival::New, false, &none, &BasicProperties::default(), now),
            m::Waited::Unmeasured
        );
        assert_eq!(
            wait(Arrival::Retry, false, &delayed),
            m::Waited::InDelay(Duration::from_secs(6))
        );
        // Redelivered by the broker (with or without a delay mark), replayed: not measured.
        assert_eq!(wait(Arrival::Retry, true, &none), m::Waited::Unmeasured);
        assert_eq!(wait(Arrival::Retry, true, &delayed), m::Waited::Unmeasured);
        assert_eq!(wait(Arrival::Replay, false, &none), m::Waited::Unmeasured);
        // A clock behind the publisher's: zero, not a negative wait.
        assert_eq!(
            waited(Arrival::New, false, &none, &created, 1_700_000_000_000),
            m::Waited::InQueue(Duration::ZERO)
        );
    }

    #[tokio::test]
    async fn a_panicking_step_is_caught_and_counted() {
        let caught = guarded(async {
            if std::hint::black_box(true) {
                panic!("boom in the step");
            }
            Verdict::Requeue {
                reason: "unreached",
            }
        })
        .await;
        assert_eq!(caught.err().as_deref(), Some("boom in the step"));
        let fine = guarded(async { Verdict::Requeue { reason: "ok" } }).await;
        assert!(matches!(fine, Ok(Verdict::Requeue { reason: "ok" })));
    }
}
