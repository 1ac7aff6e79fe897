//! The Genesys Cloud client: tokens, placing a call for an agent, finding an agent by email,
//! every request paced by the process [`RateGate`], every failure classified once.

mod error;
mod model;
mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

pub use error::{ErrorClass, GenesysError, classify_status};
pub(crate) use model::parse_uuid;
pub use model::{CreateCallRequest, CreateCallResponse, ErrorBody, UserId};
pub use token::{Token, TokenManager, renewal_margin};

use crate::config::GenesysSettings;
use crate::metrics as m;
use crate::ratelimit::RateGate;
use error::parse_retry_after;
use model::{SearchedUser, UserSearchCriteria, UserSearchRequest, UsersSearchResponse};
use token::error_chain;

/// How long a found user id is trusted: agents' emails change rarely, and a stale id only
/// means one 404 (the job fails, not a wrong person rung).
const USER_CACHE_TTL: Duration = Duration::from_secs(600);
/// Unknown emails are remembered briefly, so a typo in a batch costs one lookup, not thousands,
/// while a newly created agent is found within a minute.
const UNKNOWN_USER_CACHE_TTL: Duration = Duration::from_secs(60);

/// The API operations the dialer uses, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `POST /api/v2/conversations/calls/user/{userId}`.
    PlaceCall,
    /// `POST /api/v2/users/search`.
    UserSearch,
    /// `GET /api/v2/users/{userId}`.
    GetUser,
}

impl Operation {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::PlaceCall => "place_call",
            Self::UserSearch => "user_search",
            Self::GetUser => "get_user",
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

    /// Places a call for `user`: `POST /api/v2/conversations/calls/user/{userId}`.
    /// With `cancel`, a request still waiting for its turn when it fires is not sent
    /// ([`GenesysError::Cancelled`]); one already sent is never abandoned.
    pub async fn place_call(
        &self,
        user: UserId,
        request: &CreateCallRequest,
        cancel: Option<&CancellationToken>,
    ) -> Answer<CreateCallResponse> {
        let url = self.url(&format!("/api/v2/conversations/calls/user/{user}"));
        self.send(Operation::PlaceCall, cancel, |http| {
            http.post(url.clone()).json(request)
        })
        .await
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
            .send(Operation::UserSearch, cancel, |http| {
                http.post(url.clone()).json(&body)
            })
            .await;
        let result = answer.result.and_then(|found| {
            let user = found
                .results
                .into_iter()
                .find(|u: &SearchedUser| u.state.as_deref() != Some("deleted"));
            let id = user
                .map(|u| {
                    UserId::parse(&u.id).map_err(|e| GenesysError::UnreadableSuccess {
                        status: 200,
                        message: format!("user search returned a bad id: {e}"),
                    })
                })
                .transpose()?;
            self.remember_user(key, id);
            Ok(id)
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
    /// A 401 renews the token and sends once more; a 429 pauses the whole gate.
    async fn send<T: DeserializeOwned>(
        &self,
        operation: Operation,
        cancel: Option<&CancellationToken>,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Answer<T> {
        let mut requests = 0;
        let mut token = match self.tokens.token().await {
            Ok(token) => token,
            Err(error) => {
                return Answer {
                    result: Err(error),
                    requests,
                };
            }
        };
        let mut renewed = false;
        loop {
            match cancel {
                Some(cancel) => tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Answer { result: Err(GenesysError::Cancelled), requests },
                    _ = self.gate.acquire() => {}
                },
                None => {
                    self.gate.acquire().await;
                }
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
                        Err(error) => {
                            return Answer {
                                result: Err(error),
                                requests,
                            };
                        }
                    };
                }
                Err(GenesysError::Api {
                    status: 401,
                    message,
                    ..
                }) => {
                    return Answer {
                        result: Err(GenesysError::TokenRejected(message)),
                        requests,
                    };
                }
                Err(error @ GenesysError::Api { status: 429, .. }) => {
                    let retry_after = match &error {
                        GenesysError::Api { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    // Genesys always sends Retry-After on 429; one second if a proxy dropped it.
                    // The gate pauses (the fleet, in fleet scope) and lowers its rate.
                    self.gate
                        .rate_limited(retry_after.unwrap_or(Duration::from_secs(1)))
                        .await;
                    metrics::counter!(m::GENESYS_RATE_LIMITED_TOTAL).increment(1);
                    return Answer {
                        result: Err(error),
                        requests,
                    };
                }
                result => return Answer { result, requests },
            }
        }
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        operation: Operation,
        request: reqwest::RequestBuilder,
    ) -> Result<T, GenesysError> {
        let started = Instant::now();
        let outcome = self.exchange(request).await;
        let status_label = match &outcome {
            Ok((status, ..)) => status_label(*status),
            Err(GenesysError::Connect(_)) => "connect",
            Err(GenesysError::Timeout) => "timeout",
            Err(_) => "transport",
        };
        metrics::counter!(m::GENESYS_REQUESTS_TOTAL, "operation" => operation.label(), "status" => status_label)
            .increment(1);
        metrics::histogram!(m::GENESYS_REQUEST_DURATION_SECONDS, "operation" => operation.label())
            .record(started.elapsed().as_secs_f64());
        let (status, headers, body) = outcome?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let (Some(count), Some(allowed)) = (
            header("inin-ratelimit-count").and_then(|v| v.parse::<f64>().ok()),
            header("inin-ratelimit-allowed").and_then(|v| v.parse::<f64>().ok()),
        ) {
            metrics::gauge!(m::GENESYS_RATELIMIT_USED).set(count);
            metrics::gauge!(m::GENESYS_RATELIMIT_ALLOWED).set(allowed);
            // With the seconds to the reset the gate can slow down before a 429 comes.
            if let Some(reset) = header("inin-ratelimit-reset").and_then(|v| v.parse::<f64>().ok())
            {
                self.gate.observe_allowance(count, allowed, reset).await;
            }
        }
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| GenesysError::UnreadableSuccess {
                status,
                message: e.to_string(),
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
            ratelimit_count = header("inin-ratelimit-count"),
            ratelimit_allowed = header("inin-ratelimit-allowed"),
            "Genesys answered with an error"
        );
        Err(error)
    }

    /// The HTTP exchange, with transport failures sorted by whether the request could have been sent.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, reqwest::header::HeaderMap, bytes::Bytes), GenesysError> {
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport_error)?;
        Ok((status, headers, body))
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
        _ => match status / 100 {
            2 => "2xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}
