//! The fleet scope: one budget for every replica. With Redis, a GCRA whose state lives in Redis
//! and whose every step is one atomic Lua script; without it (or while it is unreachable), an
//! equal share per consumer on the jobs queue, read from the broker every [`CONSUMER_POLL`].
//!
//! Keys (all under `{<DIALER_PREFIX>}:rate:`, the braces keep them in one cluster slot):
//! `tat` (the theoretical arrival time, µs of Redis's clock), `pause` (the end of a fleet-wide
//! `Retry-After`, µs) and `adaptive` (a hash: the fleet's adaptive state and its version).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::RateMode;
use super::adaptive::{Adaptive, Limits, STEP_MS};
use crate::broker::{self, Topology};
use crate::config::RunSettings;
use crate::metrics as m;

/// How often the consumers on the jobs queue are counted. A replica that joins or leaves is
/// reflected in the others' shares at most this long (plus one broker round trip) later: the
/// only time the share mode can exceed the budget.
pub const CONSUMER_POLL: Duration = Duration::from_secs(2);
/// How often an unreachable Redis is tried again.
const REDIS_PROBE: Duration = Duration::from_secs(1);
/// Longest wait for one Redis call before the share mode takes over: a request must not wait
/// on a Redis that went silent.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// The adaptive state is forgotten after this long without a change: an idle fleet starts
/// again from its configured budget.
const ADAPTIVE_TTL_MS: u64 = 10 * 60 * 1000;

/// Reserves the next slot of the fleet. Returns {wait µs, fleet pause left µs, the adaptive
/// state's rate, ceiling, changed, decreased, version}. Numbers are µs of Redis's own clock,
/// so the replicas' clocks do not matter; each caller sleeps exactly the wait it is given.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local st = redis.call('HMGET', KEYS[3], 'rate', 'ceiling', 'changed', 'decreased', 'version')
local rate = tonumber(st[1])
if rate and rate > 0 and 1000000 / rate > interval then interval = 1000000 / rate end
local tau = (tonumber(ARGV[2]) - 1) * interval
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local pause = tonumber(redis.call('GET', KEYS[2])) or 0
local slot = math.max(now, tat - tau, pause)
redis.call('SET', KEYS[1], string.format('%.0f', math.max(tat, slot) + interval), 'PX', 60000)
return {string.format('%.0f', slot - now), string.format('%.0f', math.max(pause - now, 0)),
        st[1] or '', st[2] or '', st[3] or '', st[4] or '', st[5] or ''}
";

/// Pauses the fleet for ARGV[1] µs: no slot is handed out before then. A pause only grows.
const PAUSE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause_end = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1])) or 0
if pause_end > current then
  redis.call('SET', KEYS[1], string.format('%.0f', pause_end), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
";

/// Writes the adaptive state if its version is still ARGV[1] (compare and set): the arithmetic
/// stays in Rust (`adaptive.rs`), where it is tested, and concurrent replicas cannot both apply
/// the same step.
const STORE: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rate', ARGV[2], 'ceiling', ARGV[3], 'changed', ARGV[4],
           'decreased', ARGV[5], 'version', v + 1)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
";

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FleetError {
    /// The client reported an error (connection refused or lost, script error, …).
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within [`REDIS_TIMEOUT`].
    #[error("Redis did not answer within {REDIS_TIMEOUT:?}")]
    Timeout,
    /// An answer that is not what the script returns.
    #[error("Redis answered something unexpected: {0}")]
    Unexpected(String),
}

/// A reserved slot.
pub(super) struct Slot {
    /// How long to wait for it.
    pub(super) wait: Duration,
    /// What is left of a fleet-wide pause, if one runs.
    pub(super) fleet_pause: Option<Duration>,
}

/// The fleet-scope half of the gate.
pub(super) struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Option<RedisBudget>,
    /// Consumers on the jobs queue as last read; at least 1.
    consumers: AtomicU32,
    mode: AtomicU32,
    /// The fleet's adaptive state and version as last read from Redis.
    state: Mutex<Option<(Adaptive, u64)>>,
    /// The last wall-clock ms this process tried a step up in Redis.
    last_step_ms: AtomicU64,
    probing: AtomicBool,
    budget: f64,
    shutdown: CancellationToken,
}

struct RedisBudget {
    connection: ConnectionManager,
    keys: [String; 3],
    reserve: Script,
    pause: Script,
    store: Script,
}

impl Fleet {
    /// Starts the consumer watcher and sets up the Redis client (lazily connected).
    pub(super) fn start(settings: &RunSettings, shutdown: &CancellationToken) -> Self {
        let redis = settings.redis_url.as_ref().and_then(|url| {
            let prefix = &settings.broker.prefix;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let built = redis::Client::open(url.expose())
                .and_then(|client| ConnectionManager::new_lazy_with_config(client, config));
            match built {
                Ok(connection) => Some(RedisBudget {
                    connection,
                    keys: ["tat", "pause", "adaptive"].map(|k| format!("{{{prefix}}}:rate:{k}")),
                    reserve: Script::new(RESERVE),
                    pause: Script::new(PAUSE),
                    store: Script::new(STORE),
                }),
                Err(error) => {
                    tracing::error!(redis = %crate::config::redact_url(url.expose()), %error, "cannot set up the Redis client; the fleet budget is shared by consumer count");
                    None
                }
            }
        });
        let mode = if redis.is_some() {
            RateMode::Redis
        } else {
            RateMode::Share
        };
        let inner = Arc::new(Inner {
            redis,
            consumers: AtomicU32::new(1),
            mode: AtomicU32::new(mode as u32),
            state: Mutex::new(None),
            last_step_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            budget: settings.rate_limit.count.get() as f64 / settings.rate_limit.per.as_secs_f64(),
            shutdown: shutdown.clone(),
        });
        let jobs_queue =
            Topology::new(&settings.broker.prefix, settings.broker.queue_type).jobs_queue;
        tokio::spawn(watch_consumers(
            Arc::clone(&inner),
            settings.broker.amqp_url.clone(),
            jobs_queue,
        ));
        Self { inner }
    }

    pub(super) fn has_redis(&self) -> bool {
        self.inner.redis.is_some()
    }

    pub(super) fn mode(&self) -> RateMode {
        mode_from(self.inner.mode.load(Ordering::Relaxed))
    }

    /// Sets the mode; true when it changed (counted and shown).
    pub(super) fn switch(&self, to: RateMode) -> bool {
        self.inner.switch(to)
    }

    /// Consumers on the jobs queue as last read (at least 1).
    pub(super) fn consumers(&self) -> u32 {
        self.inner.consumers.load(Ordering::Relaxed).max(1)
    }

    /// The fleet's adaptive state as last read from Redis.
    pub(super) fn cached_state(&self) -> Option<Adaptive> {
        self.inner.cached().map(|(state, _)| state)
    }

    /// Whether this process should try the fleet's next step up now: at most one try per
    /// step interval per process (Redis decides which replica's try counts).
    pub(super) fn claim_step(&self, now_ms: u64) -> bool {
        let last = self.inner.last_step_ms.load(Ordering::Relaxed);
        now_ms >= last.saturating_add(STEP_MS)
            && self
                .inner
                .last_step_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Reserves the next slot of the fleet's budget.
    pub(super) async fn reserve(&self, budget: f64, burst: u32) -> Result<Slot, FleetError> {
        let redis = self.inner.redis()?;
        let interval_us = (1e6 / budget).max(1.0).round();
        let mut invocation = redis.reserve.prepare_invoke();
        for key in &redis.keys {
            invocation.key(key);
        }
        invocation.arg(format!("{interval_us:.0}")).arg(burst);
        let mut connection = redis.connection.clone();
        let answer: Vec<String> =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| FleetError::Timeout)??;
        let micros = |i: usize| -> Result<u64, FleetError> {
            let raw = answer.get(i).map(String::as_str).unwrap_or_default();
            raw.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(|v| v as u64)
                .ok_or_else(|| FleetError::Unexpected(format!("{answer:?}")))
        };
        let wait = Duration::from_micros(micros(0)?);
        let pause = micros(1)?;
        if let Some(state) = parse_state(&answer[2..], self.inner.limits()) {
            self.inner.remember(state);
        }
        Ok(Slot {
            wait,
            fleet_pause: (pause > 0).then(|| Duration::from_micros(pause)),
        })
    }

    /// Pauses the whole fleet for `duration` (a 429's `Retry-After`).
    pub(super) async fn pause(&self, duration: Duration) -> Result<(), FleetError> {
        let redis = self.inner.redis()?;
        let mut invocation = redis.pause.key(&redis.keys[1]);
        invocation.arg(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
        let mut connection = redis.connection.clone();
        let _: i64 = tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| FleetError::Timeout)??;
        Ok(())
    }

    /// Applies `step` to the fleet's adaptive state in Redis (read, compute, compare and set;
    /// a few tries when another replica changed it meanwhile). Returns the new state when
    /// `step` changed it.
    pub(super) async fn update(
        &self,
        step: impl Fn(&mut Adaptive) -> bool,
    ) -> Result<Option<Adaptive>, FleetError> {
        let redis = self.inner.redis()?;
        let limits = self.inner.limits();
        for _ in 0..3 {
            let mut connection = redis.connection.clone();
            let fields: Vec<Option<String>> = tokio::time::timeout(
                REDIS_TIMEOUT,
                redis::cmd("HMGET")
                    .arg(&redis.keys[2])
                    .arg(&["rate", "ceiling", "changed", "decreased", "version"])
                    .query_async(&mut connection),
            )
            .await
            .map_err(|_| FleetError::Timeout)??;
            let fields: Vec<String> = fields.into_iter().map(Option::unwrap_or_default).collect();
            let (mut state, version) =
                parse_state(&fields, limits).unwrap_or((Adaptive::new(limits), 0));
            if !step(&mut state) {
                self.inner.remember((state, version));
                return Ok(None);
            }
            let mut invocation = redis.store.key(&redis.keys[2]);
            invocation
                .arg(version)
                .arg(state.rate.to_string())
                .arg(
                    state
                        .ceiling
                        .map_or_else(|| "0".to_owned(), |c| c.to_string()),
                )
                .arg(state.changed_ms)
                .arg(state.decreased_ms)
                .arg(ADAPTIVE_TTL_MS);
            let stored: i64 =
                tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection))
                    .await
                    .map_err(|_| FleetError::Timeout)??;
            if stored == 1 {
                self.inner.remember((state, version + 1));
                return Ok(Some(state));
            }
        }
        Ok(None)
    }

    /// Tries Redis every [`REDIS_PROBE`] until it answers, then switches back to the Redis mode
    /// (one probe task at a time).
    pub(super) fn probe_until_back(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(REDIS_PROBE) => {}
                }
                let Ok(redis) = inner.redis() else { break };
                let mut connection = redis.connection.clone();
                let pong: Result<Result<String, _>, _> = tokio::time::timeout(
                    REDIS_TIMEOUT,
                    redis::cmd("PING").query_async(&mut connection),
                )
                .await;
                if matches!(pong, Ok(Ok(_))) {
                    if inner.switch(RateMode::Redis) {
                        tracing::info!(
                            "Redis reachable again: the fleet shares one rate budget in Redis"
                        );
                    }
                    break;
                }
            }
            inner.probing.store(false, Ordering::Release);
        });
    }
}

impl Inner {
    fn redis(&self) -> Result<&RedisBudget, FleetError> {
        self.redis
            .as_ref()
            .ok_or_else(|| FleetError::Unexpected("no Redis configured".to_owned()))
    }

    fn limits(&self) -> Limits {
        Limits::for_budget(self.budget)
    }

    fn cached(&self) -> Option<(Adaptive, u64)> {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, (state, version): (Adaptive, u64)) {
        let mut cached = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Answers can arrive out of order: keep the newest version.
        if cached.is_none_or(|(_, v)| v <= version) {
            *cached = Some((state, version));
            drop(cached);
            if mode_from(self.mode.load(Ordering::Relaxed)) == RateMode::Redis {
                metrics::gauge!(m::RATE_LIMIT_EFFECTIVE).set(state.rate);
            }
        }
    }

    fn switch(&self, to: RateMode) -> bool {
        let from = self.mode.swap(to as u32, Ordering::Relaxed);
        if from == to as u32 {
            return false;
        }
        metrics::counter!(m::RATE_MODE_SWITCHES_TOTAL, "to" => to.as_str()).increment(1);
        for each in RateMode::ALL {
            metrics::gauge!(m::RATE_MODE, "mode" => each.as_str()).set(if each == to {
                1.0
            } else {
                0.0
            });
        }
        true
    }
}

fn mode_from(raw: u32) -> RateMode {
    match raw {
        1 => RateMode::Redis,
        2 => RateMode::Share,
        _ => RateMode::Process,
    }
}

/// Reads {rate, ceiling, changed, decreased, version}; `None` while Redis holds no state.
fn parse_state(fields: &[String], limits: Limits) -> Option<(Adaptive, u64)> {
    let number = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let rate = number(0).filter(|r| r.is_finite() && *r > 0.0)?;
    let ceiling = number(1).filter(|c| c.is_finite() && *c > 0.0);
    let integer = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((
        Adaptive {
            // Another replica may run with a larger budget (a rolling change): ours caps it.
            rate: rate.clamp(limits.floor, limits.budget),
            ceiling,
            changed_ms: integer(2).unwrap_or(0),
            decreased_ms: integer(3).unwrap_or(0),
        },
        integer(4).unwrap_or(0),
    ))
}

/// Counts the consumers on the jobs queue every [`CONSUMER_POLL`] over its own connection
/// (named so in the management UI), reconnecting after failures, until shutdown.
async fn watch_consumers(inner: Arc<Inner>, amqp_url: String, jobs_queue: String) {
    let mut channel: Option<(lapin::Connection, lapin::Channel)> = None;
    loop {
        if channel.is_none() {
            channel = async {
                let connection = broker::connect(&amqp_url, "dialer rate share").await.ok()?;
                let ch = connection.create_channel().await.ok()?;
                Some((connection, ch))
            }
            .await;
        }
        if let Some((_, ch)) = &channel {
            match broker::queue_counts(ch, &jobs_queue).await {
                Ok(counts) => {
                    let previous = inner.consumers.swap(counts.consumers, Ordering::Relaxed);
                    if previous != counts.consumers {
                        tracing::debug!(
                            consumers = counts.consumers,
                            "consumers on the jobs queue changed"
                        );
                    }
                    metrics::gauge!(m::FLEET_CONSUMERS).set(f64::from(counts.consumers));
                }
                Err(error) => {
                    // The queue may not exist yet (first start) or the connection broke:
                    // the last count stays in force, a new connection is made next time.
                    tracing::debug!(%error, "cannot count the consumers on the jobs queue");
                    channel = None;
                }
            }
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tokio::time::sleep(CONSUMER_POLL) => {}
        }
    }
    if let Some((connection, _)) = channel {
        let _ = connection.close(200, "shutdown".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_state_is_read_back_and_capped_by_the_budget() {
        let limits = Limits::for_budget(10.0);
        let fields = ["12.5", "0", "1000", "900", "7"].map(String::from);
        let (state, version) = parse_state(&fields, limits).expect("state");
        assert!((state.rate - 10.0).abs() < 1e-9);
        assert_eq!(state.ceiling, None);
        assert_eq!(
            (state.changed_ms, state.decreased_ms, version),
            (1000, 900, 7)
        );
        let empty = ["", "", "", "", ""].map(String::from);
        assert!(parse_state(&empty, limits).is_none());
    }
}
