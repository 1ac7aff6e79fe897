//! `/healthz` against the real RabbitMQ and the simulator (README "Operations", `docs/runbook.md`
//! "Liveness"): a worker whose job is stuck fails it within `DIALER_LIVENESS_TIMEOUT`; an idle
//! worker, and jobs waiting their turn under a slow rate limit, do not.

use std::time::{Duration, Instant};

use dialer::config::Rate;
use dialer::event::Outcome;

use crate::helpers::{TestApp, job, run_settings, spawn_app, spawn_sim, wait_until};
use crate::proxy::TcpProxy;

const WAIT: Duration = Duration::from_secs(20);

/// `/healthz`'s status and body.
async fn healthz(app: &TestApp) -> (u16, String) {
    get(app, "/healthz").await
}

async fn get(app: &TestApp, path: &str) -> (u16, String) {
    let addr = app.worker.as_ref().expect("running").metrics_addr;
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("the endpoint answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

/// Polls `/healthz` until `until` and requires 200 at every look.
async fn healthy_throughout(app: &TestApp, until: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !until() {
        let (status, body) = healthz(app).await;
        assert_eq!(status, 200, "/healthz failed while {what}: {body}");
        assert!(Instant::now() < deadline, "timed out while {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job that can neither finish nor fail: the worker's broker connection stops carrying
/// anything (a half-open network) while the job is in flight, so its event's confirm never
/// comes. `/healthz` is ok until the job has stood still for the timeout, then fails with the
/// reason, while `/readyz` still says ready (the connection looks up). Once the connection is
/// closed, the job ends, `/healthz` recovers, and the job is placed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_stands_still_fails_healthz_within_the_liveness_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    // The call takes a moment, so the freeze below lands while the job is in flight.
    let sim = spawn_sim(|s| s.faults.latency_ms = 300).await;
    let settings = run_settings(&sim).await;
    let direct = url::Url::parse(&settings.broker.amqp_url).expect("the test broker's URL");
    let upstream = format!(
        "{}:{}",
        direct.host_str().expect("host"),
        direct.port().unwrap_or(5672)
    )
    .parse()
    .expect("an IP address and port");
    let proxy = TcpProxy::start(upstream).await;
    // The test's own connection goes straight to the broker; only the worker's is frozen.
    let mut app = TestApp::connect(sim, settings).await;
    let mut through_proxy = direct.clone();
    through_proxy
        .set_port(Some(proxy.addr().port()))
        .expect("a port");
    app.settings.broker.amqp_url = through_proxy.to_string();
    app.settings.liveness_timeout = TIMEOUT;
    let app = app.start_worker().await;
    let liveness = app.worker.as_ref().expect("running").liveness.clone();
    assert_eq!(healthz(&app).await, (200, "ok\n".to_owned()));

    app.publish_job(&job("stuck-1")).await;
    wait_until(WAIT, "the job is in flight", || {
        let in_flight = liveness.in_flight();
        async move { in_flight == 1 }
    })
    .await;
    let started = Instant::now();
    proxy.freeze();
    assert_eq!(
        healthz(&app).await.0,
        200,
        "ok while the job has not stood still for the timeout"
    );

    let deadline = started + TIMEOUT + Duration::from_secs(5);
    let body = loop {
        let (status, body) = healthz(&app).await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "/healthz still ok {:?} after the job stuck (timeout {TIMEOUT:?})",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "/healthz failed {:?} after the job stuck (timeout {TIMEOUT:?})",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= TIMEOUT - Duration::from_millis(500),
        "failed after only {:?}, before the timeout of {TIMEOUT:?}",
        started.elapsed()
    );
    assert!(
        body.starts_with("wedged: jobs in flight: 1, and none started or ended for"),
        "{body}"
    );
    assert!(body.contains("DIALER_LIVENESS_TIMEOUT"), "{body}");
    assert_eq!(body.lines().count(), 1, "one line: {body:?}");
    assert_eq!(
        get(&app, "/readyz").await.0,
        200,
        "readiness cannot see it: the connection looks up"
    );

    // Closed, the connection fails the job's publish: the job ends and the worker moves again.
    proxy.cut();
    wait_until(WAIT, "/healthz is ok again", || async {
        healthz(&app).await.0 == 200
    })
    .await;
    proxy.restore();
    let events = app.result_events(1, WAIT).await;
    assert_eq!(events[0].outcome, Outcome::Placed, "{:?}", events[0]);
    assert_eq!(app.sim.placed_calls().len(), 1, "placed once, not twice");
    app.cleanup().await;
}

/// An idle worker is alive however long it idles, and so is one whose jobs wait their turn
/// under a rate limit slower than the timeout: they wait on a schedule, not on a wedge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_and_jobs_waiting_for_a_slow_rate_stay_healthy() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let app = spawn_app(
        |_| {},
        |settings| {
            settings.liveness_timeout = TIMEOUT;
            // One request every 2 s, none back to back: twice the timeout between two turns.
            settings.rate_limit = Rate::new(30, Duration::from_secs(60)).expect("a rate");
            settings.rate_burst = std::num::NonZeroU32::MIN;
        },
    )
    .await;
    let idle_since = Instant::now();
    healthy_throughout(
        &app,
        || idle_since.elapsed() > TIMEOUT * 3,
        "the worker idles for three timeouts",
    )
    .await;

    let published = Instant::now();
    for id in ["slow-1", "slow-2", "slow-3"] {
        app.publish_job(&job(id)).await;
    }
    let liveness = app.worker.as_ref().expect("running").liveness.clone();
    // The first job leaves at once; the other two wait their turns, longer than the timeout.
    wait_until(WAIT, "jobs wait at the rate gate", || {
        let in_flight = liveness.in_flight();
        async move { in_flight >= 2 }
    })
    .await;
    healthy_throughout(
        &app,
        || app.sim.placed_calls().len() == 3,
        "jobs wait for their turns",
    )
    .await;
    assert!(
        published.elapsed() > TIMEOUT * 3,
        "the last job waited its turn longer than the timeout ({:?})",
        published.elapsed()
    );
    let events = app.result_events(3, WAIT).await;
    assert!(events.iter().all(|e| e.outcome == Outcome::Placed));
    app.cleanup().await;
}
