//! The trust boundary: the dialer's `x-dialer-*` marks are believed only on what reaches the
//! jobs queue through its internal route. Tested with real, restricted RabbitMQ users holding
//! exactly the permissions docs/jobs-and-events.md gives a CRM and a worker, and the migration
//! from the delay tiers of the previous version.

use std::time::Duration;

use dialer::event::Outcome;
use dialer::sim::Faults;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::helpers::{TestApp, job, rfc3339, run_settings, spawn_sim, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// A RabbitMQ user created for one test with `rabbitmqctl`, deleted when dropped.
struct BrokerUser {
    name: String,
    url: String,
}

impl BrokerUser {
    /// Creates a user with a unique name and these permissions (regular expressions on the
    /// vhost `/`), and the AMQP URL to log in as it.
    fn create(role: &str, base_url: &str, configure: &str, write: &str, read: &str) -> Self {
        let name = format!("dialer-test-{role}-{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &name, &password]);
        let user = Self {
            url: {
                let mut url = url::Url::parse(base_url).expect("the test broker URL");
                url.set_username(&name).expect("a URL with a host");
                url.set_password(Some(&password))
                    .expect("a URL with a host");
                url.to_string()
            },
            name,
        };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &user.name,
            configure,
            write,
            read,
        ]);
        user
    }

    async fn connect(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("{} logs in: {e}", self.name))
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        // Runs on failure too: no test user outlives its test.
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

/// Runs `rabbitmqctl -q`, failing the test with its output when it fails. Blocking: it runs
/// before the worker starts or after it stopped.
fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl is on PATH");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `prefix` as a regular expression matching itself.
fn quoted(prefix: &str) -> String {
    prefix.replace('.', "\\.")
}

/// The permissions docs/jobs-and-events.md ("Permissions") gives a CRM: write on the jobs
/// exchange, nothing else.
fn crm_permissions(prefix: &str) -> [String; 3] {
    let p = quoted(prefix);
    ["^$".into(), format!("^{p}\\.jobs$"), "^$".into()]
}

/// The permissions the same page gives the worker (and `dialer dlq`, `dialer topology`).
fn worker_permissions(prefix: &str) -> [String; 3] {
    let p = quoted(prefix);
    [
        format!("^{p}\\."),
        format!("^({p}\\..*|amq\\.default)$"),
        format!("^{p}\\."),
    ]
}

/// Publishes on a fresh confirm channel; `Err` with the broker's reason when it is refused.
async fn try_publish(
    connection: &Connection,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties.with_delivery_mode(2),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let _ = channel.close(200, "done".into()).await;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err("nacked".into())
    }
}

/// Every mark the dialer uses, forged, with the largest counter a header can say.
fn forged() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-dialer-attempts".into(),
        AMQPValue::LongLongInt(4_294_967_295),
    );
    headers.insert("x-dialer-tries".into(), AMQPValue::LongLongInt(2));
    headers.insert(
        "x-dialer-replayed-at".into(),
        AMQPValue::LongString(LongString::from("2026-01-01T00:00:00Z")),
    );
    BasicProperties::default().with_headers(headers)
}

fn body(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("json")
}

fn dialled(app: &TestApp, job_id: &str) -> usize {
    app.sim
        .attempts()
        .iter()
        .filter(|a| {
            a.attributes
                .as_ref()
                .and_then(|a| a.get("dialerJobId"))
                .is_some_and(|id| id == job_id)
        })
        .count()
}

#[tokio::test]
async fn forged_marks_from_a_crm_change_nothing_and_the_crm_cannot_reach_the_internal_route() {
    let sim = spawn_sim(|_| {}).await;
    let settings = run_settings(&sim).await;
    let prefix = settings.broker.prefix.clone();
    let [c, w, r] = worker_permissions(&prefix);
    let worker_user = BrokerUser::create("worker", &settings.broker.amqp_url, &c, &w, &r);
    let [c, w, r] = crm_permissions(&prefix);
    let crm_user = BrokerUser::create("crm", &settings.broker.amqp_url, &c, &w, &r);
    // The test's own connection (guest) declares first, as an operator would; the worker then
    // runs as a user with exactly the documented worker permissions.
    let mut app = TestApp::connect(sim, settings).await;
    app.settings.broker.amqp_url = worker_user.url.clone();
    let app = app.start_worker().await;
    assert_eq!(app.settings.max_attempts.get(), 3);
    let crm = crm_user.connect().await;
    let jobs_exchange = app.topology.jobs_exchange.clone();
    let crm_publish = |job_body: Vec<u8>, properties: BasicProperties| {
        let (crm, exchange) = (&crm, jobs_exchange.clone());
        async move {
            try_publish(crm, &exchange, "dial", &job_body, properties)
                .await
                .expect("a CRM may publish to the jobs exchange")
        }
    };

    // A duplicate stays a duplicate, however the copy is marked.
    crm_publish(body(&job("t-dup")), BasicProperties::default()).await;
    let first = app.result_events(1, WAIT).await;
    assert_eq!(first[0].outcome, Outcome::Placed, "{first:?}");
    crm_publish(body(&job("t-dup")), forged()).await;
    let second = app.result_events(1, WAIT).await;
    assert_eq!(second[0].outcome, Outcome::Duplicate, "{second:?}");
    assert_eq!(second[0].attempts, 0);
    assert_eq!(dialled(&app, "t-dup"), 1);

    // A replay mark does not reopen a decided `failed` job, even with another number.
    app.sim.set_faults(Faults {
        fail_next: vec![404],
        ..Faults::default()
    });
    crm_publish(body(&job("t-failed")), BasicProperties::default()).await;
    let failed = app.result_events(1, WAIT).await;
    assert_eq!(failed[0].outcome, Outcome::Failed, "{failed:?}");
    let mut other_number = job("t-failed");
    other_number["phoneNumber"] = "+442071838750".into();
    crm_publish(body(&other_number), forged()).await;
    let again = app.result_events(1, WAIT).await;
    assert_eq!(again[0].outcome, Outcome::Duplicate, "{again:?}");
    assert_eq!(dialled(&app, "t-failed"), 1, "a forged replay rang again");

    // Forged counters: one 503 does not use up the attempts (tries 2 of 3), and attempts
    // start from 0, not from 4294967295 (which would wrap or panic).
    app.sim.set_faults(Faults {
        fail_next: vec![503],
        ..Faults::default()
    });
    crm_publish(body(&job("t-503")), forged()).await;
    let placed = app.result_events(1, WAIT).await;
    assert_eq!(placed[0].outcome, Outcome::Placed, "{placed:?}");
    assert_eq!(placed[0].attempts, 2, "{placed:?}");

    // The worker's own round trip through a delay tier still carries its counters: a job due
    // in 8 s waits in a tier, comes back through the internal route and is placed.
    let mut later = job("t-later");
    let not_before = time::OffsetDateTime::now_utc() + Duration::from_secs(8);
    later["notBefore"] = rfc3339(not_before).into();
    crm_publish(body(&later), BasicProperties::default()).await;
    let later = app.result_events(1, WAIT).await;
    assert_eq!(later[0].outcome, Outcome::Placed, "{later:?}");
    assert_eq!(later[0].attempts, 1);

    // The CRM cannot write to the internal route, nor (through the default exchange) to a
    // delay tier that dead-letters into it.
    let refused = try_publish(
        &crm,
        &app.topology.internal_exchange,
        "dial",
        &body(&job("t-internal")),
        forged(),
    )
    .await
    .expect_err("a CRM publishing to the internal exchange is refused");
    assert!(refused.contains("ACCESS_REFUSED"), "{refused}");
    let tier = app.topology.delay_queues[0].1.clone();
    let refused = try_publish(&crm, "", &tier, &body(&job("t-tier")), forged())
        .await
        .expect_err("a CRM publishing through the default exchange is refused");
    assert!(refused.contains("ACCESS_REFUSED"), "{refused}");

    // The same marks through the internal route (as the dialer itself sends them) are
    // believed: the counters carry on.
    let mut marked = FieldTable::default();
    marked.insert("x-dialer-attempts".into(), AMQPValue::LongLongInt(7));
    try_publish(
        &app.connection,
        &app.topology.internal_exchange,
        "dial",
        &body(&job("t-internal-ok")),
        BasicProperties::default().with_headers(marked),
    )
    .await
    .expect("the operator's user may publish to the internal exchange");
    let believed = app.result_events(1, WAIT).await;
    assert_eq!(believed[0].outcome, Outcome::Placed, "{believed:?}");
    assert_eq!(believed[0].attempts, 8, "{believed:?}");

    assert_eq!(dialled(&app, "t-internal"), 0);
    assert_eq!(dialled(&app, "t-tier"), 0);
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    let _ = crm.close(200, "done".into()).await;
    app.cleanup().await;
    drop((crm_user, worker_user));
}

/// The topology as the version before the internal route declared it (the arguments of
/// `Topology::declare` at that commit, replicated): the delay tiers dead-letter through the
/// default exchange.
async fn declare_previous_topology(channel: &Channel, prefix: &str) {
    let jobs = format!("{prefix}.jobs");
    let dead = format!("{jobs}.dead");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    channel
        .queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await
        .expect("old dead-letter queue");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(&dead));
    channel
        .queue_declare(jobs.as_str().into(), durable, args)
        .await
        .expect("old jobs queue");
    let exchange = |name: String, kind| async move {
        channel
            .exchange_declare(
                name.as_str().into(),
                kind,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("old exchange");
    };
    exchange(jobs.clone(), ExchangeKind::Direct).await;
    channel
        .queue_bind(
            jobs.as_str().into(),
            jobs.as_str().into(),
            "dial".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("old binding");
    for (ttl_ms, tier) in [
        (1_000, "1s"),
        (5_000, "5s"),
        (30_000, "30s"),
        (120_000, "2m"),
        (600_000, "10m"),
    ] {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(&jobs));
        channel
            .queue_declare(
                format!("{jobs}.delay.{tier}").as_str().into(),
                durable,
                args,
            )
            .await
            .expect("old delay tier");
    }
    exchange(format!("{prefix}.replies"), ExchangeKind::Topic).await;
}

#[tokio::test]
async fn a_new_worker_starts_on_the_previous_topology_and_moves_its_delayed_jobs() {
    let sim = spawn_sim(|_| {}).await;
    let settings = run_settings(&sim).await;
    let prefix = settings.broker.prefix.clone();
    let old = Connection::connect(&settings.broker.amqp_url, ConnectionProperties::default())
        .await
        .expect("connection");
    let channel = old.create_channel().await.expect("channel");
    declare_previous_topology(&channel, &prefix).await;
    // A job the previous worker delayed after two attempts, waiting in its 30 s tier.
    let old_tier = format!("{prefix}.jobs.delay.30s");
    let mut headers = FieldTable::default();
    headers.insert("x-dialer-attempts".into(), AMQPValue::LongLongInt(2));
    headers.insert("x-dialer-tries".into(), AMQPValue::LongLongInt(1));
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = channel
        .basic_publish(
            "".into(),
            ShortString::from(old_tier.as_str()),
            BasicPublishOptions::default(),
            &body(&job("t-migrated")),
            BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());

    // The new version declares on top of it (a changed argument would be PRECONDITION_FAILED
    // and the start would fail) and moves the waiting job into its own tier.
    let app = TestApp::connect(sim, settings).await.start_worker().await;
    let new_tier = app
        .topology
        .delay_queue(dialer::broker::Delay::AtLeast(Duration::from_secs(30)));
    assert_ne!(new_tier.1, old_tier);
    wait_until(
        Duration::from_secs(10),
        "the old tiers are gone",
        || async {
            let mut gone = true;
            for (_, name) in &app.topology.legacy_delay_queues {
                // A passive declare of a missing queue closes its channel: one per look.
                let look = old.create_channel().await.expect("channel");
                gone &= dialer::broker::queue_depth(&look, name).await.is_err();
            }
            gone
        },
    )
    .await;
    assert_eq!(
        app.depth(&new_tier.1).await + app.depth(&app.topology.jobs_queue).await,
        1,
        "the job is in the new tier (or already back)"
    );
    let events = app.result_events(1, Duration::from_secs(60)).await;
    assert_eq!(events[0].outcome, Outcome::Placed, "{events:?}");
    assert_eq!(events[0].job_id.as_deref(), Some("t-migrated"));
    assert_eq!(
        events[0].attempts, 3,
        "the counters came back through the internal route and were believed"
    );
    let _ = old.close(200, "done".into()).await;
    app.cleanup().await;
}
