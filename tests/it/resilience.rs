//! Resilience against the real RabbitMQ and the simulator (`docs/jobs-and-events.md` §5, README "Operations"): SIGTERM in the
//! middle of a load, SIGKILL while calls are in flight then a restart on the same state
//! directory, and the worker's broker connection force-closed mid-load.
//!
//! The first two run the real binary (`dialer run`) as a child process configured by
//! environment variables, as a deployment would; the simulator stays in the test process so
//! the test can see every request it received.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use dialer::config::{DecisionStoreKind, Rate};
use dialer::event::{Outcome, ResultEvent};
use dialer::sim::SimHandle;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions};
use lapin::types::FieldTable;

use crate::children::ChildWorker;
use crate::helpers::{TestApp, job, run_settings, spawn_app, spawn_sim, wait_until};

/// Bound on any single wait for the worker to make progress.
pub(crate) const WAIT: Duration = Duration::from_secs(30);
/// Bound on a child's exit after a signal (the shutdown grace is 5 s).
pub(crate) const EXIT_WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// 1. SIGTERM in the middle of a load.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_load_exits_0_and_every_job_is_placed_once_or_back_in_the_queue() {
    const N: usize = 60;
    let app = child_app(200).await;
    let ids: Vec<String> = (0..N).map(|i| format!("term-{i}")).collect();
    for id in &ids {
        app.publish_job(&job(id)).await;
    }
    let mut child = ChildWorker::spawn(&app, "term");
    wait_until(WAIT, "the child worker has dialled some jobs", || {
        let attempts = app.sim.attempts().len();
        async move { attempts >= 8 }
    })
    .await;
    child.signal("TERM").await;
    let status = child.wait_exit(EXIT_WAIT).await;
    assert!(
        status.success(),
        "SIGTERM must end `dialer run` with exit 0, got {status}\n{}",
        child.log_tail()
    );

    // Every event was confirmed before its job was acked, and the child has closed its
    // connection, so what it decided is in the events queue and the rest is back in the jobs
    // queue (a quorum queue may take a moment to return the unacked messages).
    let events = drain_events(&app).await;
    wait_until(
        Duration::from_secs(10),
        "placed events plus jobs back in the queue account for every job",
        || async { events.len() + app.depth(&app.topology.jobs_queue).await as usize >= N },
    )
    .await;
    let queued = peek_job_ids(&app, &app.topology.jobs_queue).await;

    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for event in &events {
        assert_eq!(
            event.outcome,
            Outcome::Placed,
            "a clean shutdown decides nothing but placed calls: {event:?}"
        );
        let id = event.job_id.clone().expect("job id");
        let conversation = event.conversation_id.clone().expect("conversationId");
        assert!(
            placed.insert(id.clone(), conversation).is_none(),
            "{id}: two placed events"
        );
    }
    let queued_set: BTreeSet<String> = queued.iter().cloned().collect();
    assert_eq!(
        queued_set.len(),
        queued.len(),
        "a job is in the queue twice: {queued:?}"
    );
    assert!(
        placed.keys().all(|id| !queued_set.contains(id)),
        "a job both placed and back in the queue"
    );
    assert_eq!(
        placed.len() + queued.len(),
        N,
        "placed events ({}) + jobs back in the queue ({}) must be every job",
        placed.len(),
        queued.len()
    );
    let all: BTreeSet<String> = placed.keys().chain(queued.iter()).cloned().collect();
    assert_eq!(all, ids.iter().cloned().collect::<BTreeSet<_>>());
    assert!(
        !placed.is_empty() && !queued.is_empty(),
        "SIGTERM came mid-load: {} placed, {} back in the queue",
        placed.len(),
        queued.len()
    );
    // The simulator agrees: each placed job was dialled once, with the event's conversation;
    // no job given back was dialled.
    assert_dialled_at_most_once(&app.sim);
    let calls = calls_by_job(&app.sim);
    for (id, conversation) in &placed {
        assert_eq!(calls.get(id), Some(&vec![conversation.clone()]), "{id}");
    }
    for id in &queued {
        assert!(
            !calls.contains_key(id),
            "{id} was dialled but given back to the queue"
        );
    }
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);

    // A job given back had its claim released: a worker on the same state directory dials it
    // (placed, not `unknown`), once.
    let app = app.start_worker().await;
    let rest = collect_events(&app, "every job given back is decided", |events| {
        terminal_job_ids(events).len() >= queued.len()
    })
    .await;
    for event in &rest {
        assert_eq!(event.outcome, Outcome::Placed, "{event:?}");
        assert!(queued_set.contains(event.job_id.as_deref().unwrap_or_default()));
    }
    assert_dialled_at_most_once(&app.sim);
    assert_eq!(calls_by_job(&app.sim).len(), N, "every job dialled, once");
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL while calls are in flight, then a restart on the same state directory.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_call_then_restart_on_the_same_state_dir_rings_nobody_twice() {
    const N: usize = 24;
    let app = child_app(1000).await;
    let ids: Vec<String> = (0..N).map(|i| format!("kill-{i}")).collect();
    for id in &ids {
        app.publish_job(&job(id)).await;
    }
    let mut first = ChildWorker::spawn(&app, "kill-first");
    // The simulator records a call when the request arrives and answers a second later.
    wait_until(WAIT, "the child worker has calls on the wire", || {
        let attempts = app.sim.attempts().len();
        async move { attempts >= 4 }
    })
    .await;
    let on_the_wire = unanswered_calls(&app.sim);
    first.signal("KILL").await;
    let status = first.wait_exit(EXIT_WAIT).await;
    assert_eq!(
        status.signal(),
        Some(9),
        "the first worker was still running when killed: {status}\n{}",
        first.log_tail()
    );
    assert!(
        !on_the_wire.is_empty(),
        "the kill came while calls were in flight"
    );

    let mut second = ChildWorker::spawn(&app, "kill-second");
    let mut events = collect_events(&app, "every job has a terminal event", |events| {
        terminal_job_ids(events).len() >= N
    })
    .await;
    second.signal("TERM").await;
    let status = second.wait_exit(EXIT_WAIT).await;
    assert!(
        status.success(),
        "SIGTERM must end `dialer run` with exit 0, got {status}\n{}",
        second.log_tail()
    );
    // Anything published after the last job was decided (a repeat) is checked too.
    events.extend(drain_events(&app).await);

    let (decided, unknown) = placed_once_or_unknown(&app, &events, &ids);
    for id in &on_the_wire {
        assert!(
            unknown.contains(id),
            "{id} was on the wire when its worker died, so it must end `unknown`, got {:?}",
            decided.get(id)
        );
    }
    // `unknown` jobs are dead-lettered for a person to reconcile; nothing else is.
    let dead = peek_job_ids(&app, &app.topology.dead_letter_queue).await;
    assert_eq!(dead.into_iter().collect::<BTreeSet<_>>(), unknown);
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The worker's broker connection force-closed mid-load.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_force_closed_broker_connection_is_rebuilt_and_nobody_is_rung_twice() {
    const N: usize = 80;
    let worker_name = format!("resilience-{}", uuid::Uuid::new_v4().simple());
    let app = spawn_app(
        |s| s.faults.latency_ms = 100,
        |w| {
            w.worker_name = worker_name.clone();
            // 20 calls a second: the load lasts a few seconds, long enough to cut it in two.
            w.rate_limit = Rate::new(20, Duration::from_secs(1)).expect("rate");
            w.rate_burst = std::num::NonZeroU32::new(1).expect("burst");
        },
    )
    .await;
    let readiness = app.worker.as_ref().expect("worker").readiness.clone();
    let connection_name = format!("dialer {worker_name}");
    let old = wait_for_connection(&connection_name).await;

    let ids: Vec<String> = (0..N).map(|i| format!("conn-{i}")).collect();
    for id in &ids {
        app.publish_job(&job(id)).await;
    }
    wait_until(WAIT, "the worker has placed some calls", || {
        let placed = app.sim.placed_calls().len();
        async move { placed >= 10 }
    })
    .await;
    rabbitmqctl(&["close_connection", &old, "test: force-closed mid-load"]).await;
    let placed_at_close = app.sim.placed_calls().len();
    assert!(placed_at_close < N, "the connection was closed mid-load");

    wait_until(
        Duration::from_secs(10),
        "the worker reports not ready",
        || {
            let ready = readiness.is_ready();
            async move { !ready }
        },
    )
    .await;
    wait_until(WAIT, "the worker is ready again", || {
        let ready = readiness.is_ready();
        async move { ready }
    })
    .await;
    let new = wait_for_connection(&connection_name).await;
    assert_ne!(new, old, "a new connection replaced the closed one");

    let mut events = collect_events(&app, "every job has a terminal event", |events| {
        terminal_job_ids(events).len() >= N
    })
    .await;
    let mut app = app;
    app.stop_worker().await;
    events.extend(drain_events(&app).await);

    let (_, unknown) = placed_once_or_unknown(&app, &events, &ids);
    // The worker did not die: a copy redelivered after the reconnection waits for the decision
    // its first copy is making, so nothing needs to end `unknown`.
    assert!(
        unknown.is_empty(),
        "nothing needs to end `unknown`: {unknown:?}"
    );
    assert_eq!(app.depth(&app.topology.jobs_queue).await, 0);
    assert_eq!(app.depth(&app.topology.dead_letter_queue).await, 0);
    app.cleanup().await;
}

/// A test app (topology, events queue) for a child worker: the simulator with `latency_ms`,
/// file decisions in a fresh state directory, 8 jobs in flight, a unique worker name. The
/// in-process worker is not started.
async fn child_app(latency_ms: u64) -> TestApp {
    let sim = spawn_sim(|s| s.faults.latency_ms = latency_ms).await;
    let mut settings = run_settings(&sim).await;
    settings.decisions = DecisionStoreKind::File;
    settings.concurrency = std::num::NonZeroU16::new(8).expect("nonzero");
    settings.worker_name = format!("resilience-{}", uuid::Uuid::new_v4().simple());
    TestApp::connect(sim, settings).await
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ's command line: the worker's connection, found by its name.

/// Runs `rabbitmqctl` with `args`, failing the test with its output when it fails.
pub(crate) async fn rabbitmqctl(args: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("rabbitmqctl")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} took more than 30 s"))
    .expect("rabbitmqctl is on PATH");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Pids of the open connections whose client-provided `connection_name` is `name`.
///
/// The plain output is used, not `--formatter json`: only it prints pids in the form
/// `close_connection` accepts (`<rabbit@host.1.2.0>`, not `#PID<1.2.0>`). Each line is the pid,
/// a tab, and the client properties as an Erlang term, e.g. `{"connection_name","dialer x"}`.
pub(crate) async fn connections_named(name: &str) -> Vec<String> {
    let out = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    let property = format!("{{\"connection_name\",\"{name}\"}}");
    out.lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, properties)| properties.contains(&property))
        .map(|(pid, _)| pid.trim().to_owned())
        .collect()
}

/// Waits until exactly one connection is named `name` and returns its pid.
pub(crate) async fn wait_for_connection(name: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pids = connections_named(name).await;
        if let [pid] = pids.as_slice() {
            return pid.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no single connection named {name:?}: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Events, queues and what the simulator saw.

/// Consumes result events until `done` holds for all of them so far, failing after `WAIT`.
pub(crate) async fn collect_events(
    app: &TestApp,
    what: &str,
    done: impl Fn(&[ResultEvent]) -> bool,
) -> Vec<ResultEvent> {
    let channel = app.connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            app.events_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume events");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut events = Vec::new();
    while !done(&events) {
        let delivery = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting until {what}: {} events, terminal for {} jobs",
                    events.len(),
                    terminal_job_ids(&events).len()
                )
            })
            .expect("consumer open")
            .expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        events.push(ResultEvent::from_json(&delivery.data).expect("events are valid JSON"));
    }
    let _ = channel.close(200, "done".into()).await;
    events
}

/// Every event already in the events queue (taken and acked).
pub(crate) async fn drain_events(app: &TestApp) -> Vec<ResultEvent> {
    let mut events = Vec::new();
    while let Some(message) = app
        .channel
        .basic_get(app.events_queue.as_str().into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        events.push(ResultEvent::from_json(&message.delivery.data).expect("valid event"));
    }
    events
}

/// The `jobId`s of the messages in `queue`, leaving them there: taken without an ack on a
/// channel of their own, which is then closed so the broker requeues them.
pub(crate) async fn peek_job_ids(app: &TestApp, queue: &str) -> Vec<String> {
    let channel = app.connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        let body: serde_json::Value =
            serde_json::from_slice(&message.delivery.data).expect("a job body");
        ids.push(body["jobId"].as_str().expect("jobId").to_owned());
    }
    channel
        .close(200, "peeked".into())
        .await
        .expect("close the peeking channel");
    ids
}

/// Job ids with a terminal event (anything but `duplicate`, which answers a message).
pub(crate) fn terminal_job_ids(events: &[ResultEvent]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e.outcome != Outcome::Duplicate)
        .filter_map(|e| e.job_id.clone())
        .collect()
}

/// Each job's agreed outcome and conversation id, by job id.
pub(crate) type Decided = BTreeMap<String, (Outcome, Option<String>)>;

/// Each job's outcome and conversation, after checking that its repeated events agree.
pub(crate) fn agreed_outcomes(events: &[ResultEvent]) -> Decided {
    let mut decided = Decided::new();
    for event in events.iter().filter(|e| e.outcome != Outcome::Duplicate) {
        let id = event.job_id.clone().expect("job id");
        let this = (event.outcome, event.conversation_id.clone());
        if let Some(first) = decided.get(&id) {
            assert_eq!(
                first,
                &this,
                "{id}: repeated events disagree: {:#?}",
                events
                    .iter()
                    .filter(|e| e.job_id.as_deref() == Some(id.as_str()))
                    .collect::<Vec<_>>()
            );
        } else {
            decided.insert(id, this);
        }
    }
    decided
}

/// The checks every crash test makes of its events: no message was a duplicate (each job was
/// published once), every job has one agreed terminal outcome, nobody was dialled twice, and a
/// `placed` job was dialled once with the event's conversation. A job cut off mid-call may end
/// `unknown` (the call may or may not have been made, and it is never made again); no other
/// outcome is allowed. Returns the agreed outcomes and the jobs that ended `unknown`.
pub(crate) fn placed_once_or_unknown(
    app: &TestApp,
    events: &[ResultEvent],
    ids: &[String],
) -> (Decided, BTreeSet<String>) {
    assert!(
        events.iter().all(|e| e.outcome != Outcome::Duplicate),
        "each job was published once, so no message is a duplicate: {events:#?}"
    );
    let decided = agreed_outcomes(events);
    assert_eq!(
        decided.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert_dialled_at_most_once(&app.sim);
    let calls = calls_by_job(&app.sim);
    let mut unknown = BTreeSet::new();
    for (id, (outcome, conversation)) in &decided {
        match outcome {
            Outcome::Placed => assert_eq!(
                calls.get(id),
                Some(&vec![conversation.clone().expect("conversationId")]),
                "{id}: placed once, with the event's conversation"
            ),
            Outcome::Unknown => {
                unknown.insert(id.clone());
            }
            other => panic!("{id}: unexpected outcome {other:?}"),
        }
    }
    (decided, unknown)
}

/// The conversations the simulator created, by `dialerJobId`.
pub(crate) fn calls_by_job(sim: &SimHandle) -> HashMap<String, Vec<String>> {
    let mut calls: HashMap<String, Vec<String>> = HashMap::new();
    for call in sim.placed_calls() {
        calls
            .entry(call.attributes["dialerJobId"].clone())
            .or_default()
            .push(call.conversation_id);
    }
    calls
}

/// No job reached the simulator's place-call endpoint twice (whatever it was answered).
pub(crate) fn assert_dialled_at_most_once(sim: &SimHandle) {
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for attempt in sim.attempts() {
        let id = attempt
            .attributes
            .as_ref()
            .and_then(|a| a.get("dialerJobId"))
            .cloned()
            .expect("every place-call request names its job");
        *per_job.entry(id).or_default() += 1;
    }
    let twice: BTreeMap<_, _> = per_job.into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "jobs dialled more than once: {twice:?}");
}

/// Jobs whose place-call request has arrived but not been answered yet.
pub(crate) fn unanswered_calls(sim: &SimHandle) -> BTreeSet<String> {
    let waiting: BTreeSet<String> = sim
        .requests()
        .into_iter()
        .filter(|r| r.status == 0)
        .filter_map(|r| r.correlation_id)
        .collect();
    sim.attempts()
        .into_iter()
        .filter(|a| waiting.contains(&a.correlation_id))
        .filter_map(|a| a.attributes.and_then(|mut a| a.remove("dialerJobId")))
        .collect()
}
