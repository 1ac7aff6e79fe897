//! Typed settings: raw strings from flags and environment variables become `Settings` once, at start.
//!
//! clap collects every value as a string (so `--help` shows the variable and its default);
//! this module turns them into typed values and, when one is wrong, stops the start with a
//! single line naming the variable, its flag, what it accepts and what it got.

mod parse;
mod regions;

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

pub use parse::{Rate, parse_duration, parse_rate};
pub use regions::{REGIONS, Region, resolve_environment};

use crate::cli::{BrokerArgs, GenesysArgs, RunArgs, SimArgs, StoreArgs};

/// A setting that could not be used: names the variable and its flag, says what it accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}: {problem}", setting_name(variable, flag))]
pub struct ConfigError {
    /// The environment variable, e.g. `DIALER_CONCURRENCY`.
    pub variable: &'static str,
    /// The matching command-line flag, without the dashes.
    pub flag: &'static str,
    /// What is wrong and what is accepted; never contains a secret.
    pub problem: String,
}

/// `DIALER_CONCURRENCY (--concurrency)`, or just `--since` for a flag with no variable.
fn setting_name(variable: &str, flag: &str) -> String {
    if variable.starts_with("--") {
        variable.to_owned()
    } else {
        format!("{variable} (--{flag})")
    }
}

impl ConfigError {
    fn new(variable: &'static str, flag: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            flag,
            problem: problem.into(),
        }
    }
}

/// A secret string (the OAuth client secret, bearer tokens) whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where Genesys Cloud is and how to authenticate against it.
#[derive(Clone, Debug)]
pub struct GenesysSettings {
    /// OAuth client id (client credentials grant).
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// Scheme, host and port of the API, e.g. `https://api.mypurecloud.com`.
    pub api_base: Url,
    /// Scheme, host and port of the login service, e.g. `https://login.mypurecloud.com`.
    pub login_base: Url,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
}

/// Queue type of the jobs queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated, durable; the default.
    Quorum,
    /// Single-node classic queue, for brokers without quorum queues.
    Classic,
}

/// Where claims and decisions are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionStoreKind {
    /// Embedded and crash-safe, under the state directory.
    File,
    /// PostgreSQL, shared by every replica of a fleet (`DIALER_DATABASE_URL`).
    Postgres,
    /// In memory: for tests and benchmarks only, forgets everything on exit.
    Memory,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for containers.
    Json,
}

/// Broker settings shared by every command that talks to RabbitMQ.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// AMQP URL; may contain a password, so it is never logged whole (see [`redact_url`]).
    pub amqp_url: String,
    /// Prefix of every queue and exchange name.
    pub prefix: String,
    /// Type of the jobs queue.
    pub queue_type: QueueType,
}

/// Everything `dialer run` needs.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// The broker.
    pub broker: BrokerSettings,
    /// Genesys Cloud.
    pub genesys: GenesysSettings,
    /// Jobs in flight (and prefetch).
    pub concurrency: NonZeroU16,
    /// Genesys API requests allowed per period for this process.
    pub rate_limit: Rate,
    /// Requests that may leave back to back above the steady rate.
    pub rate_burst: NonZeroU32,
    /// Place-call attempts per job before `failed`.
    pub max_attempts: NonZeroU32,
    /// Whether 500/502/504 and timeouts after sending are retried (off: outcome `unknown`).
    pub retry_ambiguous: bool,
    /// Listen address of `/metrics`, `/healthz`, `/readyz` (port 0 allowed).
    pub metrics_addr: SocketAddr,
    /// Decision store kind.
    pub decisions: DecisionStoreKind,
    /// Directory of the embedded decision store.
    pub state_dir: PathBuf,
    /// PostgreSQL URL of the shared decision store (`DIALER_DECISIONS=postgres` only); a
    /// secret, since it may hold the password.
    pub database_url: Option<Secret>,
    /// How long a shutdown waits for jobs in flight.
    pub shutdown_grace: Duration,
    /// How long jobs in flight (or the runtime) may stand still before `/healthz` fails.
    pub liveness_timeout: Duration,
    /// Name of this worker instance in result events.
    pub worker_name: String,
    /// Whether `rate_limit` is this process's or the whole fleet's.
    pub rate_scope: RateScope,
    /// Redis holding the fleet's shared budget (fleet scope only; it may hold a password).
    pub redis_url: Option<Secret>,
}

/// Whose budget `DIALER_RATE_LIMIT` is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateScope {
    /// This process's own.
    #[default]
    Process,
    /// Every replica's together: shared through Redis, or split by the consumer count.
    Fleet,
}

/// Everything `dialer sim` needs (see [`crate::sim::SimSettings`] for what the simulator does with it).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// The only client id accepted.
    pub client_id: String,
    /// The only client secret accepted.
    pub client_secret: Secret,
    /// Raw agents JSON (or `None` for the demo set).
    pub agents_json: Option<String>,
    /// API requests allowed per token (or per client).
    pub rate_limit: Rate,
    /// Whose allowance `rate_limit` is.
    pub rate_scope: crate::sim::RateScope,
    /// `expires_in` of issued tokens.
    pub token_ttl: Duration,
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Parses the broker flags.
pub fn broker_settings(args: &BrokerArgs) -> Result<BrokerSettings> {
    let amqp_url = args.amqp_url.trim().to_owned();
    let parsed = Url::parse(&amqp_url).map_err(|e| {
        ConfigError::new(
            "DIALER_AMQP_URL",
            "amqp-url",
            format!("not a URL ({e}); expected amqp://user:pass@host:port/vhost or amqps://…"),
        )
    })?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(ConfigError::new(
            "DIALER_AMQP_URL",
            "amqp-url",
            format!(
                "scheme {:?} is not supported; expected amqp:// or amqps://",
                parsed.scheme()
            ),
        ));
    }
    let prefix = args.prefix.trim();
    let prefix_ok = !prefix.is_empty()
        && prefix.len() <= 200
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if !prefix_ok {
        return Err(ConfigError::new(
            "DIALER_PREFIX",
            "prefix",
            format!(
                "{prefix:?} is not usable; expected 1-200 characters of letters, digits, '.', '_', '-', ':'"
            ),
        ));
    }
    let queue_type = match args.queue_type.trim().to_ascii_lowercase().as_str() {
        "quorum" => QueueType::Quorum,
        "classic" => QueueType::Classic,
        other => {
            return Err(ConfigError::new(
                "DIALER_QUEUE_TYPE",
                "queue-type",
                format!("{other:?} is not a queue type; expected quorum or classic"),
            ));
        }
    };
    Ok(BrokerSettings {
        amqp_url,
        prefix: prefix.to_owned(),
        queue_type,
    })
}

/// Parses the Genesys Cloud flags (credentials are required).
pub fn genesys_settings(args: &GenesysArgs) -> Result<GenesysSettings> {
    let client_id = args
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            ConfigError::new(
                "GENESYS_CLIENT_ID",
                "client-id",
                "is required: the id of a client-credentials OAuth client",
            )
        })?
        .to_owned();
    let client_secret = client_secret(args)?;
    let (api_from_env, login_from_env) = resolve_environment(&args.environment)
        .map_err(|problem| ConfigError::new("GENESYS_ENVIRONMENT", "environment", problem))?;
    let api_base = match &args.api_base_url {
        Some(raw) if !raw.trim().is_empty() => {
            base_url(raw, "GENESYS_API_BASE_URL", "api-base-url")?
        }
        _ => api_from_env,
    };
    let login_base = match &args.login_base_url {
        Some(raw) if !raw.trim().is_empty() => {
            base_url(raw, "GENESYS_LOGIN_BASE_URL", "login-base-url")?
        }
        _ => login_from_env,
    };
    let timeout = duration(&args.timeout, "GENESYS_TIMEOUT", "timeout")?;
    let connect_timeout = duration(
        &args.connect_timeout,
        "GENESYS_CONNECT_TIMEOUT",
        "connect-timeout",
    )?;
    Ok(GenesysSettings {
        client_id,
        client_secret,
        api_base,
        login_base,
        timeout,
        connect_timeout,
    })
}

fn client_secret(args: &GenesysArgs) -> Result<Secret> {
    const VAR: &str = "GENESYS_CLIENT_SECRET";
    const FLAG: &str = "client-secret";
    match (&args.client_secret, &args.client_secret_file) {
        (Some(secret), _) if !secret.trim().is_empty() => Ok(Secret::new(secret.trim())),
        (_, Some(path)) if !path.as_os_str().is_empty() => {
            let content = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "GENESYS_CLIENT_SECRET_FILE",
                    "client-secret-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // Secret files mounted from orchestrators usually end with a newline.
            let secret = content.trim();
            if secret.is_empty() {
                return Err(ConfigError::new(
                    "GENESYS_CLIENT_SECRET_FILE",
                    "client-secret-file",
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Secret::new(secret))
        }
        _ => Err(ConfigError::new(
            VAR,
            FLAG,
            "is required (or GENESYS_CLIENT_SECRET_FILE): the OAuth client's secret",
        )),
    }
}

/// Parses a base URL override: scheme, host and optional port; plain http only on loopback.
fn base_url(raw: &str, variable: &'static str, flag: &'static str) -> Result<Url> {
    let url = Url::parse(raw.trim()).map_err(|e| {
        ConfigError::new(
            variable,
            flag,
            format!("{raw:?} is not a URL ({e}); expected e.g. https://api.mypurecloud.com"),
        )
    })?;
    checked_base_url(url).map_err(|problem| ConfigError::new(variable, flag, problem))
}

/// Checks a base URL: https anywhere, http only to a loopback host (a simulator or a local proxy),
/// and nothing after the host but an optional `/`.
pub(crate) fn checked_base_url(url: Url) -> std::result::Result<Url, String> {
    let Some(host) = url.host() else {
        return Err(format!("{url} has no host"));
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err(format!(
                "plain http is refused for {host} (credentials would cross the network unencrypted); use https, or http only to a loopback host"
            ));
        }
        other => return Err(format!("scheme {other:?} is not supported; expected https")),
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "{url} has a path; give only scheme, host and port (without /api/v2)"
        ));
    }
    if url.query().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{} must not carry a query or credentials",
            url.host_str().unwrap_or_default()
        ));
    }
    Ok(url)
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

fn duration(raw: &str, variable: &'static str, flag: &'static str) -> Result<Duration> {
    parse_duration(raw).map_err(|problem| ConfigError::new(variable, flag, problem))
}

fn number<T: std::str::FromStr>(
    raw: &str,
    variable: &'static str,
    flag: &'static str,
    accepts: &str,
) -> Result<T> {
    raw.trim()
        .parse()
        .map_err(|_| ConfigError::new(variable, flag, format!("{raw:?} is not {accepts}")))
}

fn boolean(raw: &str, variable: &'static str, flag: &'static str) -> Result<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::new(
            variable,
            flag,
            format!("{raw:?} is not a boolean; expected true or false"),
        )),
    }
}

fn socket_addr(raw: &str, variable: &'static str, flag: &'static str) -> Result<SocketAddr> {
    number(
        raw,
        variable,
        flag,
        "an address; expected HOST:PORT, e.g. 0.0.0.0:9464",
    )
}

/// Parses everything `dialer run` needs.
pub fn run_settings(args: &RunArgs) -> Result<RunSettings> {
    let broker = broker_settings(&args.broker)?;
    let genesys = genesys_settings(&args.genesys)?;
    let concurrency: NonZeroU16 = number(
        &args.concurrency,
        "DIALER_CONCURRENCY",
        "concurrency",
        "a whole number from 1 to 65535",
    )?;
    let rate_limit = parse_rate(&args.rate_limit)
        .map_err(|problem| ConfigError::new("DIALER_RATE_LIMIT", "rate-limit", problem))?;
    let rate_burst: NonZeroU32 = number(
        &args.rate_burst,
        "DIALER_RATE_BURST",
        "rate-burst",
        "a whole number of at least 1",
    )?;
    let rate_scope = match args.rate_scope.trim().to_ascii_lowercase().as_str() {
        "process" => RateScope::Process,
        "fleet" => RateScope::Fleet,
        other => {
            return Err(ConfigError::new(
                "DIALER_RATE_SCOPE",
                "rate-scope",
                format!("{other:?} is not a rate scope; expected process or fleet"),
            ));
        }
    };
    let redis_url = match args.redis_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => {
            let parsed = Url::parse(raw).map_err(|e| {
                ConfigError::new(
                    "DIALER_REDIS_URL",
                    "redis-url",
                    format!("not a URL ({e}); expected redis://[:password@]host:port[/db]"),
                )
            })?;
            if parsed.scheme() != "redis" {
                return Err(ConfigError::new(
                    "DIALER_REDIS_URL",
                    "redis-url",
                    format!(
                        "{} uses scheme {:?}; expected redis:// (TLS is not built in)",
                        redact_url(raw),
                        parsed.scheme()
                    ),
                ));
            }
            Some(Secret::new(raw))
        }
    };
    let max_attempts: NonZeroU32 = number(
        &args.max_attempts,
        "DIALER_MAX_ATTEMPTS",
        "max-attempts",
        "a whole number of at least 1",
    )?;
    let retry_ambiguous = boolean(
        &args.retry_ambiguous,
        "DIALER_RETRY_AMBIGUOUS",
        "retry-ambiguous",
    )?;
    let metrics_addr = socket_addr(&args.metrics_addr, "DIALER_METRICS_ADDR", "metrics-addr")?;
    let (decisions, database_url) = store_settings(&args.store)?;
    let shutdown_grace = duration(
        &args.shutdown_grace,
        "DIALER_SHUTDOWN_GRACE",
        "shutdown-grace",
    )?;
    let liveness_timeout = duration(
        &args.liveness_timeout,
        "DIALER_LIVENESS_TIMEOUT",
        "liveness-timeout",
    )?;
    if liveness_timeout < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "DIALER_LIVENESS_TIMEOUT",
            "liveness-timeout",
            format!(
                "{:?} is too short to tell a wedged worker from a busy one; expected at least 1s (default 120s)",
                args.liveness_timeout
            ),
        ));
    }
    let worker_name = match args.worker_name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => default_worker_name(),
    };
    Ok(RunSettings {
        broker,
        genesys,
        concurrency,
        rate_limit,
        rate_burst,
        max_attempts,
        retry_ambiguous,
        metrics_addr,
        decisions,
        state_dir: args.store.state_dir.clone(),
        database_url,
        shutdown_grace,
        liveness_timeout,
        worker_name,
        rate_scope,
        redis_url,
    })
}

/// Parses the decision store flags: the kind and, for `postgres`, the database URL (from
/// `DIALER_DATABASE_URL` or the file `DIALER_DATABASE_URL_FILE` names).
pub fn store_settings(args: &StoreArgs) -> Result<(DecisionStoreKind, Option<Secret>)> {
    let kind = match args.decisions.trim().to_ascii_lowercase().as_str() {
        "file" => DecisionStoreKind::File,
        "postgres" => DecisionStoreKind::Postgres,
        "memory" => DecisionStoreKind::Memory,
        other => {
            return Err(ConfigError::new(
                "DIALER_DECISIONS",
                "decisions",
                format!(
                    "{other:?} is not a decision store; expected file (one worker per state directory), postgres (shared by a fleet) or memory (tests only)"
                ),
            ));
        }
    };
    if kind != DecisionStoreKind::Postgres {
        return Ok((kind, None));
    }
    let (url, variable, flag) = match (&args.database_url, &args.database_url_file) {
        (Some(url), _) if !url.trim().is_empty() => {
            (url.trim().to_owned(), "DIALER_DATABASE_URL", "database-url")
        }
        (_, Some(path)) if !path.as_os_str().is_empty() => {
            let content = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "DIALER_DATABASE_URL_FILE",
                    "database-url-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            (
                content.trim().to_owned(),
                "DIALER_DATABASE_URL_FILE",
                "database-url-file",
            )
        }
        _ => {
            return Err(ConfigError::new(
                "DIALER_DATABASE_URL",
                "database-url",
                "is required with DIALER_DECISIONS=postgres (or DIALER_DATABASE_URL_FILE): postgres://user:password@host:port/database",
            ));
        }
    };
    crate::decisions::check_postgres_url(&url)
        .map_err(|problem| ConfigError::new(variable, flag, problem))?;
    Ok((kind, Some(Secret::new(url))))
}

/// Host name and process id: unique enough to tell replicas apart in result events.
fn default_worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "dialer".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Parses the simulator's flags.
pub fn sim_config(args: &SimArgs) -> Result<SimConfig> {
    let addr = socket_addr(&args.addr, "DIALER_SIM_ADDR", "addr")?;
    let rate_limit = parse_rate(&args.rate_limit)
        .map_err(|problem| ConfigError::new("DIALER_SIM_RATE_LIMIT", "rate-limit", problem))?;
    let rate_scope = crate::sim::RateScope::parse(&args.rate_scope)
        .map_err(|problem| ConfigError::new("DIALER_SIM_RATE_SCOPE", "rate-scope", problem))?;
    let token_ttl = duration(&args.token_ttl, "DIALER_SIM_TOKEN_TTL", "token-ttl")?;
    if token_ttl < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "DIALER_SIM_TOKEN_TTL",
            "token-ttl",
            "must be at least 1s (expires_in is in whole seconds)",
        ));
    }
    let agents_json = match args.agents.as_deref().map(str::trim) {
        None | Some("") => None,
        // A JSON array inline, or else the path of a file holding one.
        Some(inline) if inline.starts_with('[') => Some(inline.to_owned()),
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "DIALER_SIM_AGENTS",
                "agents",
                format!("cannot read {path}: {e}; expected a JSON array or the path of a file holding one"),
            )
        })?),
    };
    if args.client_id.trim().is_empty() || args.client_secret.trim().is_empty() {
        return Err(ConfigError::new(
            "GENESYS_CLIENT_ID",
            "client-id",
            "the simulator needs a non-empty client id and secret",
        ));
    }
    Ok(SimConfig {
        addr,
        client_id: args.client_id.trim().to_owned(),
        client_secret: Secret::new(args.client_secret.trim()),
        agents_json,
        rate_limit,
        rate_scope,
        token_ttl,
    })
}

/// An AMQP URL with its password replaced, safe to log.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(extra: &[&str]) -> std::result::Result<RunSettings, ConfigError> {
        let mut argv = vec![
            "dialer",
            "run",
            "--client-id",
            "id",
            "--client-secret",
            "s3cret",
        ];
        argv.extend_from_slice(extra);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap parses");
        match cli.command {
            crate::cli::Command::Run(args) => run_settings(&args),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_database_url_is_read_from_its_file_and_never_shown() {
        let path = std::env::temp_dir().join(format!("dialer-url-{}", std::process::id()));
        std::fs::write(
            &path,
            "postgres://u:hunter2@db:5432/d?sslmode=verify-full\n",
        )
        .unwrap();
        let s = run_args(&[
            "--decisions",
            "postgres",
            "--database-url-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.decisions, DecisionStoreKind::Postgres);
        let url = s.database_url.as_ref().unwrap();
        assert_eq!(
            url.expose(),
            "postgres://u:hunter2@db:5432/d?sslmode=verify-full"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        // A bad URL's message does not echo the password either.
        let err = run_args(&[
            "--decisions",
            "postgres",
            "--database-url",
            "postgres://u:hunter2@h/d?sslmode=maybe",
        ])
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = run_args(&[]).expect("defaults are valid");
        assert_eq!(s.concurrency.get(), 32);
        assert_eq!(s.rate_limit, Rate::new(4, Duration::from_secs(1)).unwrap());
        assert_eq!(s.rate_burst.get(), 1);
        assert_eq!(s.max_attempts.get(), 5);
        assert_eq!(s.metrics_addr.to_string(), "0.0.0.0:9464");
        assert_eq!(s.genesys.api_base.as_str(), "https://api.mypurecloud.com/");
        assert_eq!(
            s.genesys.login_base.as_str(),
            "https://login.mypurecloud.com/"
        );
        assert_eq!(s.genesys.timeout, Duration::from_secs(10));
        assert_eq!(s.shutdown_grace, Duration::from_secs(20));
        assert_eq!(s.liveness_timeout, Duration::from_secs(120));
        assert_eq!(s.broker.prefix, "dialer");
        assert_eq!(s.broker.queue_type, QueueType::Quorum);
        assert_eq!(s.decisions, DecisionStoreKind::File);
        assert!(!s.retry_ambiguous);
        assert_eq!(s.rate_scope, RateScope::Process);
        assert!(s.redis_url.is_none());
    }

    #[test]
    fn the_liveness_timeout_is_a_duration_of_at_least_a_second() {
        let s = run_args(&["--liveness-timeout", "90s"]).expect("valid");
        assert_eq!(s.liveness_timeout, Duration::from_secs(90));
        for bad in ["soon", "0s", "500ms"] {
            let err = run_args(&["--liveness-timeout", bad]).unwrap_err();
            assert_eq!(err.variable, "DIALER_LIVENESS_TIMEOUT", "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn fleet_scope_and_redis_url_are_parsed_and_checked() {
        let s = run_args(&[
            "--rate-scope",
            "Fleet",
            "--redis-url",
            "redis://:pw@127.0.0.1:6379/0",
        ])
        .expect("valid");
        assert_eq!(s.rate_scope, RateScope::Fleet);
        assert_eq!(
            s.redis_url.as_ref().map(Secret::expose),
            Some("redis://:pw@127.0.0.1:6379/0")
        );
        for (extra, variable, hint) in [
            (
                ["--rate-scope", "org"],
                "DIALER_RATE_SCOPE",
                "process or fleet",
            ),
            (
                ["--redis-url", "127.0.0.1:6379"],
                "DIALER_REDIS_URL",
                "redis://",
            ),
            (
                ["--redis-url", "rediss://:secretpw@h:1"],
                "DIALER_REDIS_URL",
                "redis://",
            ),
        ] {
            let error = run_args(&extra).expect_err("refused").to_string();
            assert!(error.contains(variable), "{error}");
            assert!(error.contains(hint), "{error}");
            assert!(!error.contains("secretpw"), "{error}");
        }
    }

    #[test]
    fn a_bad_value_names_the_variable_and_what_it_accepts() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--concurrency", "0"], "DIALER_CONCURRENCY", "1 to 65535"),
            (
                &["--concurrency", "many"],
                "DIALER_CONCURRENCY",
                "whole number",
            ),
            (&["--rate-limit", "fast"], "DIALER_RATE_LIMIT", "/s"),
            (&["--rate-burst", "0"], "DIALER_RATE_BURST", "at least 1"),
            (&["--max-attempts=-1"], "DIALER_MAX_ATTEMPTS", "at least 1"),
            (
                &["--metrics-addr", "9464"],
                "DIALER_METRICS_ADDR",
                "HOST:PORT",
            ),
            (&["--timeout", "soon"], "GENESYS_TIMEOUT", "10s"),
            (
                &["--environment", "mars-1"],
                "GENESYS_ENVIRONMENT",
                "us-east-1",
            ),
            (&["--amqp-url", "http://x"], "DIALER_AMQP_URL", "amqp://"),
            (&["--prefix", "a b"], "DIALER_PREFIX", "letters"),
            (
                &["--queue-type", "stream"],
                "DIALER_QUEUE_TYPE",
                "quorum or classic",
            ),
            (
                &["--decisions", "disk"],
                "DIALER_DECISIONS",
                "postgres (shared by a fleet) or memory",
            ),
            (
                &["--decisions", "postgres"],
                "DIALER_DATABASE_URL",
                "is required with DIALER_DECISIONS=postgres",
            ),
            (
                &[
                    "--decisions",
                    "postgres",
                    "--database-url",
                    "mysql://u:hunter2@h/d",
                ],
                "DIALER_DATABASE_URL",
                "expected postgres://",
            ),
            (
                &[
                    "--decisions",
                    "postgres",
                    "--database-url-file",
                    "/nonexistent/url",
                ],
                "DIALER_DATABASE_URL_FILE",
                "cannot read /nonexistent/url",
            ),
            (
                &["--retry-ambiguous", "perhaps"],
                "DIALER_RETRY_AMBIGUOUS",
                "true or false",
            ),
            (
                &["--api-base-url", "http://genesys.example.com"],
                "GENESYS_API_BASE_URL",
                "loopback",
            ),
            (
                &["--login-base-url", "https://login.example.com/oauth"],
                "GENESYS_LOGIN_BASE_URL",
                "without /api/v2",
            ),
        ];
        for (argv, variable, accepts) in cases {
            let err = run_args(argv).expect_err(&format!("{argv:?} must be refused"));
            assert_eq!(err.variable, *variable, "{argv:?}");
            let line = err.to_string();
            assert!(line.contains(variable), "{line}");
            assert!(
                line.contains(accepts),
                "{argv:?}: {line:?} should mention {accepts:?}"
            );
            assert!(!line.contains('\n'), "one line: {line:?}");
        }
    }

    #[test]
    fn missing_credentials_are_named() {
        let cli = crate::cli::Cli::try_parse_from(["dialer", "run"]).expect("clap parses");
        let crate::cli::Command::Run(mut args) = cli.command else {
            unreachable!()
        };
        // The test process may have these set; make the case explicit.
        args.genesys.client_id = None;
        args.genesys.client_secret = None;
        args.genesys.client_secret_file = None;
        assert_eq!(
            run_settings(&args).unwrap_err().variable,
            "GENESYS_CLIENT_ID"
        );
        args.genesys.client_id = Some("id".into());
        assert_eq!(
            run_settings(&args).unwrap_err().variable,
            "GENESYS_CLIENT_SECRET"
        );
    }

    #[test]
    fn secret_file_is_read_and_trimmed_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("dialer-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "from-file-secret\n").unwrap();
        let cli = crate::cli::Cli::try_parse_from([
            "dialer",
            "run",
            "--client-id",
            "id",
            "--client-secret-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let crate::cli::Command::Run(mut args) = cli.command else {
            unreachable!()
        };
        args.genesys.client_secret = None;
        let s = run_settings(&args).unwrap();
        assert_eq!(s.genesys.client_secret.expose(), "from-file-secret");
        let shown = format!("{s:?} {}", s.genesys.client_secret);
        assert!(!shown.contains("from-file-secret"), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loopback_http_and_https_overrides_are_accepted() {
        let s = run_args(&[
            "--api-base-url",
            "http://127.0.0.1:9900",
            "--login-base-url",
            "http://localhost:9900/",
        ])
        .unwrap();
        assert_eq!(s.genesys.api_base.as_str(), "http://127.0.0.1:9900/");
        assert_eq!(s.genesys.login_base.as_str(), "http://localhost:9900/");
        let s = run_args(&["--api-base-url", "https://proxy.example.com:8443"]).unwrap();
        assert_eq!(
            s.genesys.api_base.as_str(),
            "https://proxy.example.com:8443/"
        );
        assert!(run_args(&["--api-base-url", "http://[::1]:1"]).is_ok());
    }

    #[test]
    fn redacts_amqp_passwords() {
        assert_eq!(
            redact_url("amqp://guest:hunter2@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host"), "amqp://host");
    }
}
