//! Shared test harness: the simulator on port 0, a client pointed at it, and (for worker tests)
//! a real RabbitMQ found as `DIALER_TEST_AMQP_URL`, else on 127.0.0.1:5672, else started with
//! testcontainers — or a failure saying which of the three to provide. Tests never skip.

use std::sync::Arc;
use std::time::Duration;

use dialer::config::{GenesysSettings, Rate, Secret};
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
    let base = url::Url::parse(&sim.base_url()).expect("sim URL");
    GenesysSettings {
        client_id: "test-client".into(),
        client_secret: Secret::new("test-secret"),
        api_base: base.clone(),
        login_base: base,
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
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
