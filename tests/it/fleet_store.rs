//! Several `dialer run` processes sharing one queue and one PostgreSQL decision store: a worker
//! SIGKILLed mid-call, a worker's broker connection closed mid-call, PostgreSQL cut under load;
//! and `dialer decisions` against the file and the PostgreSQL store.
//!
//! PostgreSQL is the local server (127.0.0.1:5432, trust auth) unless `DIALER_TEST_DATABASE_URL`
//! names another; each test creates a database of its own and drops it. Outages come from a
//! TCP proxy in front of it, never from stopping the server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;
use std::time::Duration;

use dialer::config::Secret;
use dialer::decisions::{DecisionStore, PostgresSettings};
use dialer::event::Outcome;

use crate::children::ChildWorker;
use crate::helpers::{TestApp, job, run_settings, spawn_sim, wait_until};
use crate::proxy::TcpProxy;
use crate::resilience::{
    EXIT_WAIT, WAIT, agreed_outcomes, assert_dialled_at_most_once, calls_by_job, collect_events,
    drain_events, peek_job_ids, placed_once_or_unknown, rabbitmqctl, terminal_job_ids,
    unanswered_calls, wait_for_connection,
};

/// The administrator URL of the test server.
fn admin_url() -> String {
    std::env::var("DIALER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database for one test, dropped at the end.
struct TestDatabase {
    name: String,
    url: url::Url,
}

impl TestDatabase {
    async fn create() -> Self {
        let admin = admin_url();
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "these tests need PostgreSQL: run one on 127.0.0.1:5432 with trust auth for user postgres, \
                     or set DIALER_TEST_DATABASE_URL to an administrator URL ({e})"
                )
            });
        tokio::spawn(connection);
        let name = format!("dialer_test_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let mut url = url::Url::parse(&admin).expect("admin URL");
        url.set_path(&name);
        Self { name, url }
    }

    /// The server's address, for a proxy in front of it.
    fn server(&self) -> SocketAddr {
        let host = self.url.host_str().expect("host");
        let port = self.url.port().unwrap_or(5432);
        format!("{host}:{port}").parse().expect("an IP address")
    }

    /// The database's URL through `proxy`.
    fn url_via(&self, proxy: &TcpProxy) -> String {
        let mut url = self.url.clone();
        url.set_ip_host(proxy.addr().ip()).expect("host");
        url.set_port(Some(proxy.addr().port())).expect("port");
        url.to_string()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A child worker on the shared store, with its own state directory and a fixed metrics port.
struct FleetWorker {
    child: ChildWorker,
    metrics: SocketAddr,
    name: String,
}

impl FleetWorker {
    fn spawn(app: &TestApp, label: &str, database_url: &str, genesys_timeout: &str) -> Self {
        // A port free now; the child binds it a moment later.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let child = ChildWorker::spawn_with(
            app,
            label,
            &[
                ("DIALER_DECISIONS", "postgres".to_owned()),
                ("DIALER_DATABASE_URL", database_url.to_owned()),
                (
                    "DIALER_STATE_DIR",
                    app.settings
                        .state_dir
                        .join(label)
                        .to_string_lossy()
                        .into_owned(),
                ),
                ("DIALER_METRICS_ADDR", metrics.to_string()),
                ("DIALER_CONCURRENCY", "4".to_owned()),
                ("GENESYS_TIMEOUT", genesys_timeout.to_owned()),
            ],
        );
        Self {
            child,
            metrics,
            name: format!("{}-{label}", app.settings.worker_name),
        }
    }

    /// `/readyz` answers 200 (`None` while the endpoint is not up).
    async fn ready(&self) -> Option<bool> {
        let url = format!("http://{}/readyz", self.metrics);
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        Some(response.status().is_success())
    }

    /// The value of `series` (name and labels, exactly as exported), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let url = format!("http://{}/metrics", self.metrics);
        let Ok(response) = reqwest::get(url).await else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        // `series` is a name, or a name with one label (`name{label="value"}`): every series
        // also carries the constant `prefix` label, so the label is looked for among the others.
        let (name, label) = match series.split_once('{') {
            Some((name, label)) => (name, Some(label.trim_end_matches('}'))),
            None => (series, None),
        };
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter(|line| label.is_none_or(|label| line.contains(label)))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn wait_ready(&self, ready: bool, within: Duration) {
        wait_until(
            within,
            &format!("{} reports ready = {ready}", self.name),
            || async move { self.ready().await == Some(ready) },
        )
        .await;
    }
}

/// The test app (topology, events queue) for child workers, with the simulator's latency.
async fn fleet_app(latency_ms: u64) -> TestApp {
    let sim = spawn_sim(|s| s.faults.latency_ms = latency_ms).await;
    let mut settings = run_settings(&sim).await;
    settings.worker_name = format!("fleet-{}", uuid::Uuid::new_v4().simple());
    TestApp::connect(sim, settings).await
}

async fn stop_all(workers: Vec<FleetWorker>) {
    for worker in &workers {
        worker.child.signal("TERM").await;
    }
    for mut worker in workers {
        let status = worker.child.wait_exit(EXIT_WAIT).await;
        assert!(
            status.success(),
            "SIGTERM must end `dialer run` with exit 0, got {status}\n{}",
            worker.child.log_tail()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. One of three workers SIGKILLed while its calls are in flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_one_of_three_workers_rings_nobody_twice_and_its_calls_end_unknown() {
    const N: usize = 36;
    let app = fleet_app(1500).await;
    let db = TestDatabase::create().await;
    let url = db.url.to_string();
    let ids: Vec<String> = (0..N).map(|i| format!("fk-{i}")).collect();
    // The victim starts first and alone, so the calls on the wire when it dies are its own.
    let mut victim = FleetWorker::spawn(&app, "victim", &url, "4s");
    victim.wait_ready(true, WAIT).await;
    for id in &ids {
        app.publish_job(&job(id)).await;
    }
    wait_until(WAIT, "the victim has calls on the wire", || {
        let on_the_wire = unanswered_calls(&app.sim).len();
        async move { on_the_wire >= 4 }
    })
    .await;
    // The other two start, and the victim dies before they have dialled anything (starting
    // takes them far longer than this), so every call on the wire now is the victim's.
    let survivors = vec![
        FleetWorker::spawn(&app, "a", &url, "4s"),
        FleetWorker::spawn(&app, "b", &url, "4s"),
    ];
    let on_the_wire = unanswered_calls(&app.sim);
    let attempted_before: BTreeSet<String> = app
        .sim
        .attempts()
        .into_iter()
        .filter_map(|a| a.attributes.and_then(|mut a| a.remove("dialerJobId")))
        .collect();
    victim.child.signal("KILL").await;
    let status = victim.child.wait_exit(EXIT_WAIT).await;
    assert_eq!(status.signal(), Some(9), "{}", victim.child.log_tail());
    assert!(
        !on_the_wire.is_empty(),
        "the kill came while calls were in flight"
    );
    for survivor in &survivors {
        survivor.wait_ready(true, WAIT).await;
    }

    let mut events = collect_events(&app, "every job has a terminal event", |events| {
        terminal_job_ids(events).len() >= N
    })
    .await;
    let waits_gone = {
        let mut sum = 0.0;
        for s in &survivors {
            sum += s
                .metric("dialer_decision_claim_waits_total{result=\"owner_gone\"}")
                .await;
            sum += s
                .metric("dialer_decision_claim_waits_total{result=\"timed_out\"}")
                .await;
        }
        sum
    };
    stop_all(survivors).await;
    events.extend(drain_events(&app).await);

    let (decided, unknown) = placed_once_or_unknown(&app, &events, &ids);
    // The victim's calls on the wire when it died end `unknown` (a survivor waited for the
    // victim's lease to run out); `unknown` is only ever a job the victim had dialled.
    for id in &on_the_wire {
        assert!(
            unknown.contains(id),
            "{id} was on the wire when its worker died: {:?}",
            decided.get(id)
        );
    }
    assert!(
        unknown.is_subset(&attempted_before),
        "only jobs the victim dialled end unknown: {unknown:?}"
    );
    assert!(
        waits_gone >= 1.0,
        "the survivors counted the claims they gave up on"
    );
    let dead = peek_job_ids(&app, &app.topology.dead_letter_queue).await;
    assert_eq!(dead.into_iter().collect::<BTreeSet<_>>(), unknown);
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 2. One worker's broker connection closed while its calls are in flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_broker_connection_hands_its_jobs_over_with_their_original_decisions() {
    const N: usize = 30;
    let app = fleet_app(1500).await;
    let db = TestDatabase::create().await;
    let url = db.url.to_string();
    let ids: Vec<String> = (0..N).map(|i| format!("fc-{i}")).collect();
    let cut = FleetWorker::spawn(&app, "cut", &url, "5s");
    cut.wait_ready(true, WAIT).await;
    let others = vec![
        FleetWorker::spawn(&app, "a", &url, "5s"),
        FleetWorker::spawn(&app, "b", &url, "5s"),
    ];
    for other in &others {
        other.wait_ready(true, WAIT).await;
    }
    let connection = wait_for_connection(&format!("dialer {}", cut.name)).await;
    for id in &ids {
        app.publish_job(&job(id)).await;
    }
    wait_until(WAIT, "every worker has calls on the wire", || {
        let on_the_wire = unanswered_calls(&app.sim).len();
        async move { on_the_wire >= 9 }
    })
    .await;
    rabbitmqctl(&["close_connection", &connection, "test: closed mid-call"]).await;

    let mut events = collect_events(&app, "every job has a terminal event", |events| {
        terminal_job_ids(events).len() >= N
    })
    .await;
    let mut workers = others;
    workers.push(cut);
    stop_all(workers).await;
    events.extend(drain_events(&app).await);

    let (_, unknown) = placed_once_or_unknown(&app, &events, &ids);
    // The worker did not die: whoever got the redelivered copy waited for its decision.
    assert!(
        unknown.is_empty(),
        "nothing needs to end `unknown`: {unknown:?}"
    );
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL cut for several seconds under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_under_load_pauses_the_fleet_and_it_resumes_by_itself() {
    const N: usize = 60;
    let app = fleet_app(300).await;
    let db = TestDatabase::create().await;
    let proxy = TcpProxy::start(db.server()).await;
    let url = db.url_via(&proxy);
    let workers = vec![
        FleetWorker::spawn(&app, "a", &url, "5s"),
        FleetWorker::spawn(&app, "b", &url, "5s"),
    ];
    for worker in &workers {
        worker.wait_ready(true, WAIT).await;
    }
    let ids: Vec<String> = (0..N).map(|i| format!("fp-{i}")).collect();
    for id in &ids {
        app.publish_job(&job(id)).await;
    }
    wait_until(WAIT, "some calls are placed", || {
        let placed = app.sim.placed_calls().len();
        async move { placed >= 8 }
    })
    .await;
    proxy.cut();
    let placed_at_cut = app.sim.placed_calls().len();
    for worker in &workers {
        // A busy worker notices at its next claim or decision, an idle one at its heartbeat.
        worker.wait_ready(false, Duration::from_secs(20)).await;
    }
    // Nothing is dialled while the store is away: no claim, no call.
    let attempts_while_cut = app.sim.attempts().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let in_flight_then = app.sim.attempts().len() - attempts_while_cut;
    assert_eq!(in_flight_then, 0, "calls were placed without a claim");
    let mut down = 0.0;
    for worker in &workers {
        down += worker.metric("dialer_decision_store_up").await;
    }
    assert_eq!(down, 0.0, "dialer_decision_store_up is 0 on every worker");
    assert!(placed_at_cut < N, "the cut came mid-load");
    proxy.restore();
    for worker in &workers {
        worker.wait_ready(true, Duration::from_secs(60)).await;
    }
    let mut events = collect_events(&app, "every job has a terminal event", |events| {
        terminal_job_ids(events).len() >= N
    })
    .await;
    let mut errors = 0.0;
    for worker in &workers {
        assert_eq!(worker.metric("dialer_decision_store_up").await, 1.0);
        errors += worker.metric("dialer_decision_store_errors_total").await;
    }
    assert!(errors >= 1.0, "the failures were counted");
    stop_all(workers).await;
    events.extend(drain_events(&app).await);

    let decided = agreed_outcomes(&events);
    assert_eq!(
        decided.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "nothing lost"
    );
    assert_dialled_at_most_once(&app.sim);
    let calls = calls_by_job(&app.sim);
    for (id, (outcome, conversation)) in &decided {
        // A call answered while the store was away keeps its real outcome: the decision was
        // held in memory and recorded when the store came back.
        assert_eq!(*outcome, Outcome::Placed, "{id}");
        assert_eq!(
            calls.get(id),
            Some(&vec![conversation.clone().expect("conversationId")]),
            "{id}: placed once, with the event's conversation"
        );
    }
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 4. `dialer decisions`.

fn dialer_decisions(env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dialer"));
    for (key, _) in std::env::vars() {
        if key.starts_with("DIALER_") || key.starts_with("GENESYS_") {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "warn").arg("decisions").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("dialer decisions runs")
}

async fn record_samples(store: &DecisionStore) {
    let unknown =
        serde_json::json!({"jobId": "u-1", "outcome": "unknown", "phoneNumber": "+14155552671"});
    let placed = serde_json::json!({"jobId": "p-1", "outcome": "placed", "conversationId": "c-1"});
    store
        .decide("u-1", &serde_json::to_vec(&unknown).unwrap())
        .await
        .unwrap();
    store
        .decide("p-1", &serde_json::to_vec(&placed).unwrap())
        .await
        .unwrap();
    store.try_claim("c-1", "worker-x").await.unwrap();
}

fn check_decisions_output(env: &[(&str, String)]) {
    let shown = dialer_decisions(env, &["show", "p-1"]);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let record: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(record["state"], "decided");
    assert_eq!(record["event"]["conversationId"], "c-1");

    let claimed = dialer_decisions(env, &["show", "c-1"]);
    let record: serde_json::Value = serde_json::from_slice(&claimed.stdout).expect("JSON");
    assert_eq!(record["state"], "claimed");
    assert_eq!(record["owner"], "worker-x");

    let missing = dialer_decisions(env, &["show", "nobody"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no record of job \"nobody\""));

    let listed = dialer_decisions(env, &["unknown", "--since", "2020-01-01T00:00:00Z"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["jobId"], "u-1");
    // Masked unless asked for.
    assert_eq!(lines[0]["event"]["phoneNumber"], "+14*******71");
    let full = dialer_decisions(
        env,
        &[
            "unknown",
            "--since",
            "2020-01-01T00:00:00Z",
            "--show-phone-numbers",
        ],
    );
    assert!(String::from_utf8_lossy(&full.stdout).contains("+14155552671"));

    let none = dialer_decisions(env, &["unknown", "--since", "2999-01-01T00:00:00Z"]);
    assert!(none.status.success());
    assert!(none.stdout.is_empty());
    let bad = dialer_decisions(env, &["unknown", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
}

#[tokio::test]
async fn dialer_decisions_reads_the_file_store_beside_its_worker() {
    let dir = std::env::temp_dir().join(format!(
        "dialer-decisions-{}",
        uuid::Uuid::new_v4().simple()
    ));
    // Held open, as a running worker holds it: the command reads beside it.
    let store = DecisionStore::open(&dir).unwrap();
    record_samples(&store).await;
    let env = [
        ("DIALER_DECISIONS", "file".to_owned()),
        ("DIALER_STATE_DIR", dir.to_string_lossy().into_owned()),
    ];
    tokio::task::spawn_blocking(move || check_decisions_output(&env))
        .await
        .unwrap();
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn dialer_decisions_reads_the_postgres_store() {
    let db = TestDatabase::create().await;
    let store = DecisionStore::postgres(&PostgresSettings::new(Secret::new(db.url.as_str())))
        .await
        .unwrap();
    record_samples(&store).await;
    let env = [
        ("DIALER_DECISIONS", "postgres".to_owned()),
        ("DIALER_DATABASE_URL", db.url.to_string()),
    ];
    tokio::task::spawn_blocking(move || check_decisions_output(&env))
        .await
        .unwrap();
    // Without a URL the command says which variable is missing.
    let missing = dialer_decisions(
        &[("DIALER_DECISIONS", "postgres".to_owned())],
        &["show", "x"],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("DIALER_DATABASE_URL"));
}

// ---------------------------------------------------------------------------------------------
// 5. The file store's database deleted under a running worker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_deleted_under_the_worker_is_detected_and_it_stops_being_ready() {
    let mut app = crate::helpers::spawn_app(
        |_| {},
        |w| w.decisions = dialer::config::DecisionStoreKind::File,
    )
    .await;
    app.publish_job(&job("vanish-1")).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed);
    let readiness = app.worker.as_ref().expect("worker").readiness.clone();
    assert!(readiness.is_ready());
    std::fs::remove_file(app.settings.state_dir.join("decisions.sqlite3"))
        .expect("the store's file exists");
    // The heartbeat (every 5 s) notices; the worker pauses rather than decide into a file
    // that is gone.
    wait_until(
        Duration::from_secs(15),
        "the worker reports not ready",
        || {
            let ready = readiness.is_ready();
            async move { !ready }
        },
    )
    .await;
    app.publish_job(&job("vanish-2")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.sim.attempts().len(),
        1,
        "nothing is dialled while the store is gone"
    );
    assert_eq!(
        app.depth(&app.topology.jobs_queue).await,
        1,
        "the job waits in the queue"
    );
    app.stop_worker().await;
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 6. PostgreSQL not answering when the worker starts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_database_answers_waits_not_ready_then_consumes() {
    let app = fleet_app(0).await;
    let db = TestDatabase::create().await;
    let proxy = TcpProxy::start(db.server()).await;
    proxy.cut();
    let worker = FleetWorker::spawn(&app, "early", &db.url_via(&proxy), "5s");
    // Alive and serving its endpoints, but not ready and not consuming.
    wait_until(WAIT, "the worker answers /readyz", || async {
        worker.ready().await.is_some()
    })
    .await;
    assert_eq!(worker.ready().await, Some(false));
    app.publish_job(&job("early-1")).await;
    proxy.restore();
    worker.wait_ready(true, Duration::from_secs(40)).await;
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed);
    stop_all(vec![worker]).await;
    app.cleanup().await;
}
