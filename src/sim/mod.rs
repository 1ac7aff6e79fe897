//! A Genesys Cloud simulator (login host and API host on one listener) for development, tests,
//! the demo and benchmarks: tokens, user search, placing calls for a user, rate limits and
//! injected faults, behaving like the real service as `docs/genesys.md` describes it.
//!
//! Endpoints: `POST /oauth/token`; `POST /api/v2/users/search`, `GET /api/v2/users/{id}`,
//! `POST /api/v2/conversations/calls/user/{userId}`, `POST /api/v2/conversations/calls` (always
//! 400 for client credentials), `GET /api/v2/conversations/calls/{id}`; and, unauthenticated and
//! unrecorded, `GET /sim/calls|requests|stats|faults|agents`, `PUT /sim/faults`, `POST /sim/reset`.

mod agents;
mod api;
mod faults;
mod records;
mod server;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use axum::serve::ListenerExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{
    BrokerSettings, DecisionStoreKind, GenesysSettings, Rate, RunSettings, Secret,
};
use std::num::{NonZeroU16, NonZeroU32};

pub use agents::{AgentState, SimAgent, parse_agents};
pub use faults::Faults;
pub use records::{CallAttempt, PlacedCall, RequestRecord, SimStats};
pub use state::RateScope;

use agents::Directory;
use state::{Shared, SharedConfig};

/// How long [`SimHandle::shutdown`] waits for open connections before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the simulator is started with.
#[derive(Clone)]
pub struct SimSettings {
    /// Where to listen; port 0 picks a free port (see [`SimHandle::addr`]).
    pub addr: SocketAddr,
    /// The only client id `/oauth/token` accepts.
    pub client_id: String,
    /// The only client secret `/oauth/token` accepts.
    pub client_secret: String,
    /// The users the API knows; [`SimAgent::demo_set`] when the user gave none.
    pub agents: Vec<SimAgent>,
    /// API requests allowed per token (or per client, see `rate_scope`) in each window.
    pub rate_limit: u32,
    /// Length of the fixed rate-limit windows.
    pub rate_window: Duration,
    /// Whether each token has its own allowance or all of the client's tokens share one.
    pub rate_scope: RateScope,
    /// `expires_in` of issued tokens.
    pub token_ttl: Duration,
    /// Faults active from the start.
    pub faults: Faults,
}

impl Default for SimSettings {
    /// The defaults of `dialer sim` (README "Configuration of `dialer run`"): 127.0.0.1:9900, `demo`/`demo-secret`, the demo
    /// agents, 300 requests per minute per token, 24 h tokens, no faults.
    fn default() -> Self {
        SimSettings {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 9900)),
            client_id: "demo".to_owned(),
            client_secret: "demo-secret".to_owned(),
            agents: SimAgent::demo_set(),
            rate_limit: 300,
            rate_window: Duration::from_secs(60),
            rate_scope: RateScope::Token,
            token_ttl: Duration::from_secs(86_400),
            faults: Faults::default(),
        }
    }
}

impl fmt::Debug for SimSettings {
    /// Everything but the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSettings")
            .field("addr", &self.addr)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("agents", &self.agents)
            .field("rate_limit", &self.rate_limit)
            .field("rate_window", &self.rate_window)
            .field("rate_scope", &self.rate_scope)
            .field("token_ttl", &self.token_ttl)
            .field("faults", &self.faults)
            .finish()
    }
}

/// A running simulator. Dropping it stops the server too, without waiting.
///
/// Records are kept in memory until `POST /sim/reset`: a long benchmark pays for them.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// Genesys settings that reach this simulator: its URL for both the login and the API host,
    /// and the one pair of credentials it accepts.
    pub fn genesys_settings(&self) -> GenesysSettings {
        let (client_id, client_secret) = self.shared.credentials();
        let base = url::Url::parse(&self.base_url()).unwrap_or_else(|error| {
            unreachable!("a URL built from a socket address parses: {error}")
        });
        GenesysSettings {
            client_id: client_id.to_owned(),
            client_secret: Secret::new(client_secret),
            api_base: base.clone(),
            login_base: base,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// A worker against this simulator: the one starting point of the demo, the benchmark and
    /// the tests, which then change what their story or measurement needs. Memory decisions,
    /// metrics on a free loopback port, a rate that does not bind (1,000/s, burst 50), 16 jobs
    /// in flight, process scope.
    pub fn worker_settings(&self, broker: BrokerSettings, worker_name: &str) -> RunSettings {
        RunSettings {
            broker,
            genesys: self.genesys_settings(),
            concurrency: NonZeroU16::new(16).unwrap_or(NonZeroU16::MIN),
            rate_limit: Rate::new(1000, Duration::from_secs(1))
                .unwrap_or_else(|| unreachable!("1000/s is a rate")),
            rate_burst: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            max_attempts: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            retry_ambiguous: false,
            metrics_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            decisions: DecisionStoreKind::Memory,
            database_url: None,
            state_dir: std::env::temp_dir().join(format!(
                "dialer-{worker_name}-{}",
                uuid::Uuid::new_v4().simple()
            )),
            shutdown_grace: Duration::from_secs(5),
            liveness_timeout: Duration::from_secs(120),
            worker_name: worker_name.to_owned(),
            rate_scope: crate::config::RateScope::Process,
            redis_url: None,
        }
    }

    /// The address the simulator is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for both the login and the API host, e.g. `http://127.0.0.1:9900` (no trailing
    /// slash). A wildcard bind address is replaced by loopback so the URL can be connected to.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Replaces the active faults (also `PUT /sim/faults`).
    pub fn set_faults(&self, faults: Faults) {
        if let Err(e) = faults.validate() {
            // Still applied: a test may want odd values; the simulator copes with them.
            tracing::warn!("simulator faults out of range: {e}");
        }
        self.shared.set_faults(faults);
    }

    /// The active faults, with `fail_next`/`hang_next` as far as they are used up.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Every place-call request that reached the simulator, whatever it was answered (hung
    /// ones with status 0 and `hung`), in arrival order.
    pub fn attempts(&self) -> Vec<CallAttempt> {
        self.shared.attempts()
    }

    /// Every call actually created.
    pub fn placed_calls(&self) -> Vec<PlacedCall> {
        self.shared.placed_calls()
    }

    /// Every request to `/api/v2/*` and `/oauth/token`, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests()
    }

    /// The counters.
    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Stops accepting, lets answers in flight finish (hung requests are released), and waits
    /// for the server task, cutting connections still open after a few seconds.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                tracing::warn!(
                    "simulator connections still open after {SHUTDOWN_GRACE:?}; closing them"
                );
                abort.abort();
            }
        }
    }

    /// Makes every issued token expired, as if an admin revoked them: the next API request
    /// with one is refused (401) and the client must fetch a new token.
    pub fn revoke_tokens(&self) {
        self.shared.expire_tokens();
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        // A handle dropped without `shutdown` (a failing test) must not leave a server behind.
        self.shared.shutdown.cancel();
    }
}

/// Binds, spawns the server task and returns at once.
pub async fn start(settings: SimSettings) -> anyhow::Result<SimHandle> {
    settings
        .faults
        .validate()
        .map_err(|e| anyhow!("simulator faults: {e}"))?;
    if settings.rate_limit == 0 {
        bail!("simulator rate limit must allow at least 1 request per window");
    }
    if settings.rate_window.is_zero() {
        bail!("simulator rate window must be longer than 0");
    }
    let directory =
        Directory::new(settings.agents).map_err(|e| anyhow!("simulator agents: {e}"))?;
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("binding the simulator to {}", settings.addr))?;
    let addr = listener
        .local_addr()
        .context("reading the simulator's bound address")?;
    let shutdown = CancellationToken::new();
    let shared = Arc::new(Shared::new(SharedConfig {
        directory,
        client_id: settings.client_id,
        client_secret: settings.client_secret,
        rate_limit: settings.rate_limit,
        rate_window: settings.rate_window,
        rate_scope: settings.rate_scope,
        token_ttl: settings.token_ttl,
        faults: settings.faults,
        shutdown: shutdown.clone(),
    }));
    // Answers are small; Nagle's algorithm would only add delay to them.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("simulator: cannot set TCP_NODELAY: {e}");
        }
    });
    let app = server::router(Arc::clone(&shared));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!("simulator server stopped: {e}");
        }
    });
    tracing::info!(%addr, "Genesys Cloud simulator listening");
    Ok(SimHandle {
        addr,
        shared,
        task: Some(task),
    })
}

/// `dialer sim`: starts the simulator, prints `listening on http://HOST:PORT` as the first line
/// on stdout and a banner after it, and runs until SIGINT or SIGTERM.
pub async fn serve_until_ctrl_c(settings: SimSettings) -> anyhow::Result<()> {
    let banner_settings = settings.clone();
    let handle = start(settings).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listening_line(handle.addr()))?;
        // Flushed on its own: scripts wait for this line to learn the port.
        out.flush()?;
        for line in banner(&banner_settings, &handle.base_url()) {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    let signal = crate::shutdown::signal().await;
    handle.shutdown().await;
    signal
}

/// The first line `dialer sim` prints.
fn listening_line(addr: SocketAddr) -> String {
    format!("listening on http://{addr}")
}

/// What `dialer sim` prints after the first line: what this is, how to point a client at it,
/// the client id (never the secret) and the agents.
fn banner(settings: &SimSettings, base_url: &str) -> Vec<String> {
    let mut lines = vec![
        "This is a SIMULATOR of Genesys Cloud for development, tests and benchmarks, NOT the real Genesys Cloud service."
            .to_owned(),
        format!("  GENESYS_LOGIN_BASE_URL={base_url} GENESYS_API_BASE_URL={base_url}"),
        format!("  accepted client id: {} (secret not shown)", settings.client_id),
        format!(
            "  rate limit: {} requests per {} s per {}; tokens live {} s",
            settings.rate_limit,
            settings.rate_window.as_secs_f64(),
            match settings.rate_scope {
                RateScope::Token => "token",
                RateScope::Client => "client (all tokens together)",
            },
            settings.token_ttl.as_secs()
        ),
        format!("  agents ({}):", settings.agents.len()),
    ];
    lines.extend(settings.agents.iter().map(|a| {
        format!(
            "    {}  {}  {}  {}",
            a.id,
            a.email,
            a.state.as_str(),
            a.name
        )
    }));
    lines
}
