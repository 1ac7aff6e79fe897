//! The Genesys Cloud client: tokens, placing a call for an agent, finding an agent by email,
//! every request paced by the process [`RateGate`], every failure classified once.

mod circuit;
mod error;
mod model;
mod scrub;
mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

pub(crate) use crate::job::parse_uuid;
pub use circuit::{CircuitBreaker, LONG_RATE_LIMIT_PAUSE, OPEN_AFTER, OpenReason};
pub use error::{ErrorClass, GenesysError, RETRY_AFTER_CAP, classify_status, parse_retry_after};
pub use model::{CreateCallRequest, CreateCallResponse, ErrorBody, UserId};
pub use scrub::{MESSAGE_LIMIT, REDACTED, SHORT_LIMIT, scrub};
pub use token::{TOKEN_LIFETIME_CAP, Token, TokenManager, renewal_margin, token_lifetime};

use crate::config::GenesysSettings;
use crate::metrics as m;
use crate::ratelimit::RateGate;
use model::{SearchedUser, UserSearchCriteria, UserSearchRequest, UsersSearchResponse};
use token::error_chain;

/// How long a found user id is trusted: agents' emails change rarely, and a stale id only
/// means one 404 (the job fails, not a wrong person rung).
const USER_CACHE_TTL: Duration = Duration::from_secs(600);
/// Unknown emails are remembered briefly, so a typo in a batch costs one lookup, not thousands,
/// while a newly created agent is found within a minute.
const UNKNOWN_USER_CACHE_TTL: Duration = Duration::from_secs(60);
/// The most of an answer body read. Every answer the dialer reads is a few hundred bytes;
/// anything longer is cut (an error message) or refused (a success body: `unknown`).
pub const ANSWER_LIMIT: usize = 256 * 1024;
/// The longest a request is held waiting for a `Retry-After` pause to end. It matches the
/// pipeline's in-process wait limit: a job waiting longer goes to a delay queue instead of
/// sitting unacked in the worker.
pub const GATE_HOLD_LIMIT: Duration = Duration::from_secs(5);
/// How often a request waiting at the gate looks again at the pause and its deadline.
const GATE_RECHECK: Duration = Duration::from_secs(1);

/// The API operations the dialer uses, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `POST /api/v2/conversations/calls/user/{userId}`.
    PlaceCall,
    /// `POST /api/v2/users/search`.
    UserSearch,
    /// `GET /api/v2/users/{userId}`.
    GetUser,
    /// The circuit breaker's probe (`GET /api/v2/users/{nil UUID}`).
    Probe,
}

impl Operation {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::PlaceCall => "place_call",
            Self::UserSearch => "user_search",
            Self::GetUser => "get_user",
            Self::Probe => "probe",
        }
    }
}

/// The result of one client operation and how many HTTP requests it sent (a 401 renewal sends two).
#[derive(Debug)]
pub struct Answer<T> {
    /// What Genesys said.
    pub result: Result<T, GenesysError>,
    /// API requests sent, for the job's `attempts`.
    pub requests: u32,
}

/// A Genesys Cloud API client for one OAuth client.
pub struct GenesysClient {
    http: reqwest::Client,
    api_base: Url,
    tokens: TokenManager,
    gate: Arc<RateGate>,
    circuit: CircuitBreaker,
    // std Mutex: looked up and updated without awaiting.
    users: Mutex<HashMap<String, (Option<UserId>, Instant)>>,
}

impl GenesysClient {
    /// A client for `settings`, pacing its requests with `gate`.
    pub fn new(settings: &GenesysSettings, gate: Arc<RateGate>) -> Result<Self, GenesysError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .user_agent(concat!("dialer/", env!("CARGO_PKG_VERSION")))
            // Never follow a redirect: a followed 307 re-sends the place-call POST (each copy
            // may ring the person), and the bearer token would go wherever Location says.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| GenesysError::Connect(format!("cannot build the HTTP client: {e}")))?;
        let tokens = TokenManager::new(
            http.clone(),
            &settings.login_base,
            settings.client_id.clone(),
            settings.client_secret.clone(),
        );
        Ok(Self {
            http,
            api_base: settings.api_base.clone(),
            tokens,
            gate,
            circuit: CircuitBreaker::new(),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// The token manager (the worker checks credentials with it while paused).
    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    /// The process rate gate.
    pub fn gate(&self) -> &Arc<RateGate> {
        &self.gate
    }

    /// The circuit breaker every request consults (the worker pauses and probes on it).
    pub fn circuit(&self) -> &CircuitBreaker {
        &self.circuit
    }

    /// Places a call for `user`: `POST /api/v2/conversations/calls/user/{userId}`.
    /// With `cancel`, a request still waiting for its turn when it fires is not sent
    /// ([`GenesysError::Cancelled`]); one already sent is never abandoned. With `deadline`
    /// (the job's `expiresAt`), the request is not sent once it has passed, however long it
    /// waited for its turn ([`GenesysError::DeadlinePassed`]): the check is the last thing
    /// before the request leaves.
    pub async fn place_call(
        &self,
        user: UserId,
        request: &CreateCallRequest,
        cancel: Option<&CancellationToken>,
        deadline: Option<OffsetDateTime>,
    ) -> Answer<CreateCallResponse> {
        let url = self.url(&format!("/api/v2/conversations/calls/user/{user}"));
        let answer: Answer<CreateCallResponse> = self
            .send(Operation::PlaceCall, cancel, deadline, |http| {
                http.post(url.clone()).json(request)
            })
            .await;
        Answer {
            result: answer.result.and_then(validate_created),
            requests: answer.requests,
        }
    }

    /// Asks Genesys a harmless question (`GET /api/v2/users/{nil UUID}`) past the circuit
    /// breaker: `Ok` when it answers at all (a 404 included), `Err` while it looks down, is
    /// rate limiting, or refuses the credentials.
    pub async fn probe(&self) -> Result<(), GenesysError> {
        let url = self.url(&format!("/api/v2/users/{}", uuid::Uuid::nil()));
        let answer: Answer<serde_json::Value> = self
            .send(Operation::Probe, None, None, |http| http.get(url.clone()))
            .await;
        match answer.result {
            Ok(_) => Ok(()),
            Err(error) if error.looks_like_outage() || error.http_status() == Some(429) => {
                Err(error)
            }
            Err(error) if matches!(error.class(), ErrorClass::Systemic) => Err(error),
            // 404 (expected), 403 and the like: Genesys is there and answering.
            Err(_) => Ok(()),
        }
    }

    /// Finds the user whose email is exactly `email` (`POST /api/v2/users/search`, EXACT on
    /// `email`); `Ok(None)` when there is none. Answers are cached.
    pub async fn find_user_by_email(
        &self,
        email: &str,
        cancel: Option<&CancellationToken>,
    ) -> Answer<Option<UserId>> {
        let key = email.trim().to_ascii_lowercase();
        if let Some(cached) = self.cached_user(&key) {
            return Answer {
                result: Ok(cached),
                requests: 0,
            };
        }
        let url = self.url("/api/v2/users/search");
        let body = UserSearchRequest {
            query: [UserSearchCriteria {
                kind: "EXACT",
                fields: ["email"],
                value: &key,
            }],
            page_size: 1,
        };
        let answer: Answer<UsersSearchResponse> = self
            .send(Operation::UserSearch, cancel, None, |http| {
                http.post(url.clone()).json(&body)
            })
            .await;
        let result = answer.result.and_then(pick_user).inspect(|id| {
            self.remember_user(key, *id);
        });
        Answer {
            result,
            requests: answer.requests,
        }
    }

    fn cached_user(&self, key: &str) -> Option<Option<UserId>> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let (id, at) = users.get(key)?;
        let ttl = if id.is_some() {
            USER_CACHE_TTL
        } else {
            UNKNOWN_USER_CACHE_TTL
        };
        (at.elapsed() < ttl).then_some(*id)
    }

    fn remember_user(&self, key: String, id: Option<UserId>) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a flood of distinct unknown emails must not grow memory without limit.
        if users.len() >= 100_000 {
            users.retain(|_, (id, at)| id.is_some() && at.elapsed() < USER_CACHE_TTL);
        }
        users.insert(key, (id, Instant::now()));
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.api_base.clone();
        url.set_path(path);
        url
    }

    /// Sends one API request with a bearer token, after its turn under the rate gate.
    /// A 401 renews the token and sends once more; a 429 pauses the whole gate (and a long
    /// one opens the circuit breaker).
    async fn send<T: DeserializeOwned>(
        &self,
        operation: Operation,
        cancel: Option<&CancellationToken>,
        deadline: Option<OffsetDateTime>,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Answer<T> {
        let mut requests = 0;
        let fail = |error, requests| Answer {
            result: Err(error),
            requests,
        };
        if let Err(error) = self.check_circuit(operation) {
            return fail(error, requests);
        }
        let mut token = match self.tokens.token().await {
            Ok(token) => token,
            Err(error) => return fail(error, requests),
        };
        let mut renewed = false;
        loop {
            if let Err(error) = self.wait_turn(operation, cancel, deadline).await {
                return fail(error, requests);
            }
            requests += 1;
            let result = self
                .send_once(
                    operation,
                    build(&self.http).bearer_auth(token.value.expose()),
                )
                .await;
            match result {
                Err(GenesysError::Api { status: 401, .. }) if !renewed => {
                    renewed = true;
                    token = match self.tokens.renew_after_rejection(&token).await {
                        Ok(token) => token,
                        Err(error) => return fail(error, requests),
                    };
                }
                Err(GenesysError::Api {
                    status: 401,
                    message,
                    ..
                }) => return fail(GenesysError::TokenRejected(message), requests),
                Err(error @ GenesysError::Api { status: 429, .. }) => {
                    let retry_after = match &error {
                        GenesysError::Api { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    // Genesys always sends Retry-After on 429; one second if a proxy dropped it.
                    // Already capped at RETRY_AFTER_CAP when parsed. The gate pauses (the fleet,
                    // in fleet scope) and lowers its rate.
                    let pause = retry_after.unwrap_or(Duration::from_secs(1));
                    self.gate.rate_limited(pause).await;
                    if pause > LONG_RATE_LIMIT_PAUSE {
                        self.circuit.record_long_pause(pause);
                    }
                    metrics::counter!(m::GENESYS_RATE_LIMITED_TOTAL).increment(1);
                    return fail(error, requests);
                }
                result => return Answer { result, requests },
            }
        }
    }

    /// Refuses every request but the probe while the circuit breaker is open.
    fn check_circuit(&self, operation: Operation) -> Result<(), GenesysError> {
        match self.circuit.state() {
            Some((_, why)) if operation != Operation::Probe => Err(GenesysError::CircuitOpen(why)),
            _ => Ok(()),
        }
    }

    /// Waits for this request's turn under the gate, and decides at the last moment whether it
    /// may still leave: not when shutdown started, not when the job's deadline passed, not
    /// when the circuit breaker opened meanwhile, and not after holding the job through a
    /// `Retry-After` longer than [`GATE_HOLD_LIMIT`] (the caller delays the job instead).
    async fn wait_turn(
        &self,
        operation: Operation,
        cancel: Option<&CancellationToken>,
        deadline: Option<OffsetDateTime>,
    ) -> Result<(), GenesysError> {
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let passed = |d: OffsetDateTime| OffsetDateTime::now_utc() >= d;
        loop {
            if cancel.is_cancelled() {
                return Err(GenesysError::Cancelled);
            }
            if deadline.is_some_and(passed) {
                return Err(GenesysError::DeadlinePassed);
            }
            if let Some(until) = self.gate.pause_deadline() {
                let remaining = until.saturating_duration_since(Instant::now());
                if remaining > GATE_HOLD_LIMIT {
                    return Err(GenesysError::Paused { remaining });
                }
                if deadline.is_some_and(|d| OffsetDateTime::now_utc() + remaining >= d) {
                    return Err(GenesysError::DeadlinePassed);
                }
            }
            // Looked at every second while waiting: a long pause that starts meanwhile, or the
            // deadline passing, ends the wait (checked above) instead of holding the job.
            let interrupted = async {
                loop {
                    tokio::time::sleep(GATE_RECHECK).await;
                    let long_pause = self.gate.pause_deadline().is_some_and(|until| {
                        until.saturating_duration_since(Instant::now()) > GATE_HOLD_LIMIT
                    });
                    if long_pause || deadline.is_some_and(passed) {
                        return;
                    }
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(GenesysError::Cancelled),
                _ = self.gate.acquire() => break,
                _ = interrupted => {}
            }
        }
        if deadline.is_some_and(|d| OffsetDateTime::now_utc() >= d) {
            return Err(GenesysError::DeadlinePassed);
        }
        self.check_circuit(operation)
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        operation: Operation,
        request: reqwest::RequestBuilder,
    ) -> Result<T, GenesysError> {
        let started = Instant::now();
        let outcome = self.exchange(request).await;
        let status_label = match &outcome {
            Ok(exchange) => status_label(exchange.status),
            Err(GenesysError::Connect(_)) => "connect",
            Err(GenesysError::Timeout) => "timeout",
            Err(_) => "transport",
        };
        let result = self.read_answer(operation, outcome).await;
        match &result {
            Err(error) if error.looks_like_outage() => {
                self.circuit.record_failure(&error.to_string())
            }
            _ => self.circuit.record_answer(),
        }
        metrics::counter!(m::GENESYS_REQUESTS_TOTAL, "operation" => operation.label(), "status" => status_label)
            .increment(1);
        metrics::histogram!(m::GENESYS_REQUEST_DURATION_SECONDS, "operation" => operation.label())
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Turns an exchange into the operation's answer or its classified error.
    async fn read_answer<T: DeserializeOwned>(
        &self,
        operation: Operation,
        outcome: Result<Exchange, GenesysError>,
    ) -> Result<T, GenesysError> {
        let Exchange {
            status,
            headers,
            body,
            complete,
        } = outcome?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        // Gauges, and the gate's early warning of a 429. `inf` and `NaN` parse as f64, so only
        // finite, non-negative values are kept.
        let number = |name: &str| {
            header(name)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        if let (Some(count), Some(allowed)) = (
            number("inin-ratelimit-count"),
            number("inin-ratelimit-allowed"),
        ) {
            metrics::gauge!(m::GENESYS_RATELIMIT_USED).set(count);
            metrics::gauge!(m::GENESYS_RATELIMIT_ALLOWED).set(allowed);
            // With the seconds to the reset the gate can slow down before a 429 comes.
            if let Some(reset) = number("inin-ratelimit-reset") {
                self.gate.observe_allowance(count, allowed, reset).await;
            }
        }
        if (200..300).contains(&status) {
            if !complete {
                return Err(GenesysError::UnreadableSuccess {
                    status,
                    message: format!("the answer is larger than {ANSWER_LIMIT} bytes"),
                });
            }
            return serde_json::from_slice(&body).map_err(|e| GenesysError::UnreadableSuccess {
                status,
                message: scrub(&e.to_string(), MESSAGE_LIMIT),
            });
        }
        if (300..400).contains(&status) {
            let location = header("location").map(|l| scrub(l, MESSAGE_LIMIT));
            tracing::warn!(
                operation = operation.label(),
                status,
                location = location.as_deref(),
                "Genesys answered with a redirect; not followed"
            );
            return Err(GenesysError::Redirect {
                status,
                location,
                may_have_acted: operation == Operation::PlaceCall,
            });
        }
        let correlation_id = header("inin-correlation-id").map(str::to_owned);
        let retry_after = header("retry-after").and_then(parse_retry_after);
        let error = GenesysError::from_answer(status, correlation_id, retry_after, &body);
        tracing::debug!(
            operation = operation.label(),
            status,
            code = error.code(),
            correlation_id = error.correlation_id(),
            ratelimit_count = number("inin-ratelimit-count"),
            ratelimit_allowed = number("inin-ratelimit-allowed"),
            "Genesys answered with an error"
        );
        Err(error)
    }

    /// The HTTP exchange, with transport failures sorted by whether the request could have been
    /// sent, and at most [`ANSWER_LIMIT`] bytes of the body read.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Exchange, GenesysError> {
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let (body, complete) = read_capped(response, ANSWER_LIMIT)
            .await
            .map_err(transport_error)?;
        Ok(Exchange {
            status,
            headers,
            body,
            complete,
        })
    }
}

/// One HTTP answer, read up to [`ANSWER_LIMIT`].
struct Exchange {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
    /// `false` when the body was longer than the limit and cut.
    complete: bool,
}

/// Reads at most `limit` bytes of the body; `false` with them when there was more.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(bytes::Bytes, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body.into(), false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.into(), true))
}

/// The first user of a search answer that is not deleted; its id must be a UUID.
fn pick_user(found: UsersSearchResponse) -> Result<Option<UserId>, GenesysError> {
    let user = found
        .results
        .into_iter()
        .find(|u: &SearchedUser| u.state.as_deref() != Some("deleted"));
    user.map(|u| {
        UserId::parse(&u.id).map_err(|_| GenesysError::UnreadableSuccess {
            status: 200,
            message: format!(
                "user search returned an id that is not a UUID: {:?}",
                scrub(&u.id, 60)
            ),
        })
    })
    .transpose()
}

/// Reads a user-search answer body as the client does (for the fuzz targets).
pub fn read_user_search(body: &[u8]) -> Result<Option<UserId>, GenesysError> {
    let found: UsersSearchResponse =
        serde_json::from_slice(body).map_err(|e| GenesysError::UnreadableSuccess {
            status: 200,
            message: scrub(&e.to_string(), MESSAGE_LIMIT),
        })?;
    pick_user(found)
}

/// A placed call's answer is believed only if its id is a conversation id (a UUID): an empty
/// or absurd id is an answer nobody can act on, and the call may exist, so it is ambiguous.
pub fn validate_created(created: CreateCallResponse) -> Result<CreateCallResponse, GenesysError> {
    match parse_uuid(&created.id) {
        Ok(_) => Ok(created),
        Err(_) => Err(GenesysError::UnreadableSuccess {
            status: 200,
            message: format!(
                "the conversation id is not a UUID ({} bytes: {:?})",
                created.id.len(),
                scrub(&created.id, 40)
            ),
        }),
    }
}

/// Sorts a reqwest failure: a connect failure sent nothing; anything later may have been processed.
fn transport_error(error: reqwest::Error) -> GenesysError {
    if error.is_connect() {
        GenesysError::Connect(error_chain(&error))
    } else if error.is_timeout() {
        GenesysError::Timeout
    } else {
        GenesysError::Transport(error_chain(&error))
    }
}

/// A static label per status, so metric labels stay few and allocation-free.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        307 => "307",
        // Any other status by its class; what is in no class (a 1xx as a final answer, 600
        // and above) is `other`, never counted as a server error.
        _ => match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            5 => "5xx",
            _ => "other",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::status_label;

    #[test]
    fn a_status_label_is_the_code_or_its_true_class() {
        for (status, label) in [
            (200, "200"),
            (503, "503"),
            (307, "307"),
            (203, "2xx"),
            (308, "3xx"),
            (418, "4xx"),
            (599, "5xx"),
            (103, "1xx"),
            (600, "other"),
            (999, "other"),
        ] {
            assert_eq!(status_label(status), label, "{status}");
        }
    }
}
