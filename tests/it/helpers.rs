//! Shared test harness: the simulator on port 0, a client pointed at it, and (for worker tests)
//! a real RabbitMQ found as `DIALER_TEST_AMQP_URL`, else on 127.0.0.1:5672, else started with
//! testcontainers — or a failure saying which of the three to provide. Tests never skip.

use std::sync::Arc;
use std::time::Duration;

use dialer::config::{GenesysSettings, Rate};
use dialer::genesys::{GenesysClient, UserId};
use dialer::ratelimit::RateGate;
use dialer::sim::{self, Faults, SimAgent, SimHandle, SimSettings};

/// The demo agent every test calls for (active in the simulator's demo set).
pub fn agent() -> SimAgent {
    SimAgent::demo_set()
        .into_iter()
        .next()
        .expect("the demo set has agents")
}

/// The demo agent's id.
pub fn agent_id() -> UserId {
    UserId::parse(&agent().id).expect("demo ids are UUIDs")
}

/// Simulator settings for tests: loopback, port 0, a generous rate limit.
pub fn sim_settings() -> SimSettings {
    SimSettings {
        addr: "127.0.0.1:0".parse().expect("valid address"),
        client_id: "test-client".into(),
        client_secret: "test-secret".into(),
        agents: SimAgent::demo_set(),
        rate_limit: 100_000,
        rate_window: Duration::from_secs(60),
        rate_scope: sim::RateScope::Token,
        token_ttl: Duration::from_secs(86_400),
        faults: Faults::default(),
    }
}

/// Starts a simulator with `adjust` applied to the test settings.
pub async fn spawn_sim(adjust: impl FnOnce(&mut SimSettings)) -> SimHandle {
    let mut settings = sim_settings();
    adjust(&mut settings);
    sim::start(settings).await.expect("the simulator starts")
}

/// Genesys settings pointing at `sim` with the test credentials.
pub fn genesys_settings(sim: &SimHandle) -> GenesysSettings {
    // Short timeouts: the tests that hang the simulator should not wait ten seconds.
    GenesysSettings {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..sim.genesys_settings()
    }
}

/// A gate that never binds in tests that are not about pacing.
pub fn open_gate() -> Arc<RateGate> {
    Arc::new(RateGate::new(
        Rate::new(100_000, Duration::from_secs(1)).expect("rate"),
        std::num::NonZeroU32::new(1000).expect("burst"),
    ))
}

/// A client for `sim`.
pub fn client(sim: &SimHandle) -> GenesysClient {
    GenesysClient::new(&genesys_settings(sim), open_gate()).expect("client")
}

/// Token requests the simulator received.
pub fn token_requests(sim: &SimHandle) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.path == "/oauth/token")
        .count()
}

// ---------------------------------------------------------------------------------------------
// The broker and the worker.

use dialer::broker::Topology;
use dialer::config::{BrokerSettings, QueueType, RunSettings};
use dialer::event::ResultEvent;
use dialer::worker::RunningWorker;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// The broker URL for tests: `DIALER_TEST_AMQP_URL`, else 127.0.0.1:5672, else testcontainers.
pub async fn amqp_url() -> String {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(find_broker).await.clone()
}

async fn find_broker() -> String {
    if let Ok(url) = std::env::var("DIALER_TEST_AMQP_URL") {
        return url;
    }
    let local = "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned();
    if Connection::connect(&local, ConnectionProperties::default())
        .await
        .is_ok()
    {
        return local;
    }
    match start_container().await {
        Ok(url) => url,
        Err(error) => panic!(
            "integration tests need RabbitMQ: set DIALER_TEST_AMQP_URL, run one on 127.0.0.1:5672 (guest/guest), \
             or make Docker available for testcontainers ({error})"
        ),
    }
}

async fn start_container() -> Result<String, String> {
    use testcontainers::runners::AsyncRunner;
    use testcontainers_modules::rabbitmq::RabbitMq;
    // Kept for the life of the test process: the container stops when the process exits.
    static CONTAINER: OnceCell<testcontainers::ContainerAsync<RabbitMq>> = OnceCell::const_new();
    let container = CONTAINER
        .get_or_try_init(|| async { RabbitMq::default().start().await.map_err(|e| e.to_string()) })
        .await?;
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
}

/// A worker against the real broker and an in-process simulator, with unique queue names,
/// and a test connection that publishes jobs and reads events and dead letters.
pub struct TestApp {
    pub sim: SimHandle,
    pub settings: RunSettings,
    pub topology: Topology,
    pub shutdown: CancellationToken,
    pub worker: Option<RunningWorker>,
    pub connection: Connection,
    pub channel: Channel,
    pub events_queue: String,
}

/// Worker settings for tests: a unique prefix, the simulator, memory decisions, port 0.
pub async fn run_settings(sim: &SimHandle) -> RunSettings {
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    let broker = BrokerSettings {
        amqp_url: amqp_url().await,
        prefix,
        queue_type: QueueType::Quorum,
    };
    let mut settings = sim.worker_settings(broker, "test-worker");
    settings.genesys = genesys_settings(sim);
    settings.max_attempts = std::num::NonZeroU32::new(3).expect("nonzero");
    settings
}

/// Starts the simulator (adjusted by `sim`) and a worker (adjusted by `worker`).
pub async fn spawn_app(
    sim: impl FnOnce(&mut SimSettings),
    worker: impl FnOnce(&mut RunSettings),
) -> TestApp {
    let sim = spawn_sim(sim).await;
    let mut settings = run_settings(&sim).await;
    worker(&mut settings);
    let app = TestApp::connect(sim, settings).await;
    app.start_worker().await
}

impl TestApp {
    /// The test's own connection, the topology and a queue collecting every result event.
    pub async fn connect(sim: SimHandle, settings: RunSettings) -> Self {
        let topology = Topology::new(&settings.broker.prefix, settings.broker.queue_type);
        let connection =
            Connection::connect(&settings.broker.amqp_url, ConnectionProperties::default())
                .await
                .expect("test connection");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        // Declared here too so jobs can be published before the worker starts.
        topology.declare(&channel).await.expect("topology");
        let events_queue = format!("{}.test-events", settings.broker.prefix);
        channel
            .queue_declare(
                events_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("events queue");
        channel
            .queue_bind(
                events_queue.as_str().into(),
                topology.reply_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind events");
        TestApp {
            sim,
            settings,
            topology,
            shutdown: CancellationToken::new(),
            worker: None,
            connection,
            channel,
            events_queue,
        }
    }

    /// Starts the in-process worker and waits until it is ready.
    pub async fn start_worker(mut self) -> Self {
        self.shutdown = CancellationToken::new();
        let worker = dialer::worker::start(self.settings.clone(), self.shutdown.clone())
            .await
            .expect("worker starts");
        let readiness = worker.readiness.clone();
        wait_until(Duration::from_secs(20), "the worker is ready", || {
            let ready = readiness.is_ready();
            async move { ready }
        })
        .await;
        self.worker = Some(worker);
        self
    }

    /// Stops the worker (drain) and waits for it.
    pub async fn stop_worker(&mut self) {
        self.shutdown.cancel();
        if let Some(worker) = self.worker.take() {
            worker.wait().await.expect("worker stops cleanly");
        }
    }

    /// Publishes a job body to the jobs queue (default exchange) with confirms.
    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.topology.jobs_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }

    /// Publishes a JSON job.
    pub async fn publish_job(&self, job: &serde_json::Value) {
        self.publish(
            &serde_json::to_vec(job).expect("json"),
            BasicProperties::default(),
        )
        .await;
    }

    /// Waits for `n` result events (with their AMQP properties), failing after `timeout`.
    pub async fn events(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<(ResultEvent, BasicProperties, String)> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                self.events_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while events.len() < n {
            let delivery = tokio::time::timeout_at(deadline, consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {n} events within {timeout:?}: {events:#?}",
                        events.len()
                    )
                })
                .expect("consumer open")
                .expect("delivery");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            let event = ResultEvent::from_json(&delivery.data).expect("events are valid JSON");
            events.push((
                event,
                delivery.properties.clone(),
                delivery.routing_key.to_string(),
            ));
        }
        let _ = channel.close(200, "done".into()).await;
        events
    }

    /// Just the events.
    pub async fn result_events(&self, n: usize, timeout: Duration) -> Vec<ResultEvent> {
        self.events(n, timeout)
            .await
            .into_iter()
            .map(|(e, _, _)| e)
            .collect()
    }

    /// Takes `n` messages from `queue` (acking them), waiting up to `timeout` for them to arrive.
    pub async fn take(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut messages = Vec::new();
        while messages.len() < n {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .expect("basic.get")
            {
                Some(message) => {
                    message
                        .delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                    messages.push(message);
                }
                None => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "only {} of {n} messages in {queue}",
                        messages.len()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        messages
    }

    /// Messages ready in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        dialer::broker::queue_depth(&self.channel, queue)
            .await
            .expect("passive declare")
    }

    /// Stops the worker and deletes the test's queues.
    pub async fn cleanup(mut self) {
        self.stop_worker().await;
        self.topology
            .delete(&self.channel, &[self.events_queue.clone()])
            .await
            .expect("the test's queues and exchanges are deleted");
        let _ = self.connection.close(200, "done".into()).await;
        self.sim.shutdown().await;
        // Each test's state directory is its own (a fresh name); a test on the memory store
        // never creates it.
        let _ = std::fs::remove_dir_all(&self.settings.state_dir);
    }
}

/// Polls `condition` every 20 ms until it holds, failing with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A valid job for the demo agent.
pub fn job(id: &str) -> serde_json::Value {
    serde_json::json!({
        "jobId": id,
        "agentUserId": agent().id,
        "phoneNumber": "+14155552671",
        "attributes": {"crmRecord": id},
    })
}

/// RFC 3339, as jobs carry times.
pub fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("formattable")
}

/// Fails unless the simulator recorded `call` at or after `not_before`.
pub fn assert_placed_not_before(call: &dialer::sim::PlacedCall, not_before: time::OffsetDateTime) {
    let placed_at =
        time::OffsetDateTime::parse(&call.at, &time::format_description::well_known::Rfc3339)
            .expect("the simulator records RFC 3339 times");
    assert!(
        placed_at >= not_before,
        "placed at {placed_at}, not before {not_before}"
    );
}
