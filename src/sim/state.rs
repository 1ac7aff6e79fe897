//! The simulator's shared state (tokens, rate windows, faults, the journal) and the helpers
//! every handler answers with: Genesys-shaped error bodies, 429s and JSON. The routes in
//! `server` and the API handlers in `api` both build on this; it imports neither.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::agents::Directory;
use super::faults::Faults;
use super::records::{self, CallAttempt, Clock, Journal, PlacedCall, RequestRecord, SimStats};

/// Header carrying the id Genesys Cloud echoes as `contextId` in error bodies.
pub(super) const CORRELATION_ID: HeaderName = HeaderName::from_static("inin-correlation-id");
/// The informational rate-limit headers Genesys sends on API answers.
pub(super) const RATELIMIT_COUNT: HeaderName = HeaderName::from_static("inin-ratelimit-count");
pub(super) const RATELIMIT_ALLOWED: HeaderName = HeaderName::from_static("inin-ratelimit-allowed");
pub(super) const RATELIMIT_RESET: HeaderName = HeaderName::from_static("inin-ratelimit-reset");

/// A token the simulator issued, with its rate-limit window (used in the token scope).
#[derive(Debug)]
struct TokenState {
    expires_at: Duration,
    window: Window,
}

/// One fixed rate-limit window: when it opened and how many requests it has let through.
#[derive(Debug, Default)]
struct Window {
    start: Duration,
    count: u32,
}

/// Whose allowance an API request counts against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateScope {
    /// Each token has its own allowance (Genesys's per-token limit).
    #[default]
    Token,
    /// All tokens of the client share one allowance, as org-wide limits (calls per second,
    /// per-org API limits) do: what a fleet of replicas, each with its own token, runs into.
    Client,
}

impl RateScope {
    /// Parses `token` or `client`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "token" => Ok(Self::Token),
            "client" => Ok(Self::Client),
            other => Err(format!(
                "{other:?} is not a rate scope; expected token or client"
            )),
        }
    }

    /// The name `parse` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Client => "client",
        }
    }
}

/// State shared by every request and the [`super::SimHandle`].
///
/// The mutable parts sit behind std `Mutex`es rather than tokio ones: every critical section is
/// a few map or vector operations and none is held across an `.await`, so a std mutex is cheaper
/// under load and lets the handle's accessors stay synchronous. Only `admit` holds two of these
/// locks at once (`tokens`, then `client_window`), always in that order, so they cannot deadlock.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) clock: Clock,
    pub(super) directory: Directory,
    client_id: String,
    client_secret: String,
    rate_limit: u32,
    rate_window: Duration,
    rate_scope: RateScope,
    pub(super) token_ttl: Duration,
    faults: Mutex<Faults>,
    // In the client scope the one window every token counts against; locked while `tokens` is
    // held (always in that order), so the two cannot deadlock.
    client_window: Mutex<Window>,
    tokens: Mutex<HashMap<String, TokenState>>,
    journal: Mutex<Journal>,
    /// Cancelled on shutdown; hung requests wait for it so that a graceful stop can finish.
    pub(super) shutdown: CancellationToken,
}

/// Locks a mutex, ignoring poisoning: a panicking request cannot leave these plain records in a
/// state worse than "one entry missing", and the simulator should keep serving.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The settings [`Shared`] is built from, already validated.
#[derive(Debug)]
pub(super) struct SharedConfig {
    pub(super) directory: Directory,
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) rate_limit: u32,
    pub(super) rate_window: Duration,
    pub(super) rate_scope: RateScope,
    pub(super) token_ttl: Duration,
    pub(super) faults: Faults,
    pub(super) shutdown: CancellationToken,
}

impl Shared {
    /// Builds the state and starts the simulator's clock.
    pub(super) fn new(config: SharedConfig) -> Shared {
        Shared {
            clock: Clock::start(),
            directory: config.directory,
            client_id: config.client_id,
            client_secret: config.client_secret,
            rate_limit: config.rate_limit,
            rate_window: config.rate_window,
            rate_scope: config.rate_scope,
            token_ttl: config.token_ttl,
            faults: Mutex::new(config.faults),
            client_window: Mutex::new(Window::default()),
            tokens: Mutex::new(HashMap::new()),
            journal: Mutex::new(Journal::default()),
            shutdown: config.shutdown,
        }
    }

    /// The journal, locked.
    pub(super) fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.journal)
    }

    /// The faults, locked.
    pub(super) fn faults_mut(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    /// Replaces the faults.
    pub(super) fn set_faults(&self, faults: Faults) {
        *self.faults_mut() = faults;
    }

    /// A copy of the faults.
    pub(super) fn faults(&self) -> Faults {
        self.faults_mut().clone()
    }

    /// Every place-call attempt.
    pub(super) fn attempts(&self) -> Vec<CallAttempt> {
        self.journal().attempt_records(&self.clock)
    }

    /// Every placed call.
    pub(super) fn placed_calls(&self) -> Vec<PlacedCall> {
        self.journal().placed_records(&self.clock)
    }

    /// Every recorded request; formatting happens after the lock is released.
    pub(super) fn requests(&self) -> Vec<RequestRecord> {
        let snapshot = self.journal().request_snapshot();
        records::request_records(snapshot, &self.clock)
    }

    /// The counters.
    pub(super) fn stats(&self) -> SimStats {
        self.journal().stats()
    }

    /// Makes every issued token expired (tests of the expiry path; an admin revoking tokens).
    pub(super) fn expire_tokens(&self) {
        for token in lock(&self.tokens).values_mut() {
            token.expires_at = Duration::ZERO;
        }
    }

    /// Checks the bearer token and counts the request in its rate window (the token's, or the
    /// client's in the client scope).
    pub(super) fn admit(
        &self,
        headers: &HeaderMap,
        now: Duration,
        reject_all: bool,
    ) -> Result<Admitted, Denied> {
        let token = bearer(headers).ok_or(Denied::Missing)?;
        if reject_all {
            return Err(Denied::Refused);
        }
        let mut tokens = lock(&self.tokens);
        let state = tokens.get_mut(token).ok_or(Denied::Refused)?;
        if now >= state.expires_at {
            return Err(Denied::Expired);
        }
        match self.rate_scope {
            RateScope::Token => self.count_in(&mut state.window, now),
            RateScope::Client => self.count_in(&mut lock(&self.client_window), now),
        }
    }

    /// Counts one request in `window`, or refuses it when the window's allowance is used up.
    fn count_in(&self, window: &mut Window, now: Duration) -> Result<Admitted, Denied> {
        // Fixed windows: a window opens with the first request after the previous one ended
        // (for a token: with the token) and lasts `rate_window`.
        if now >= window.start + self.rate_window {
            window.start = now;
            window.count = 0;
        }
        let reset_secs = ceil_secs(window.start + self.rate_window - now).max(1);
        if window.count >= self.rate_limit {
            return Err(Denied::RateLimited {
                retry_after: reset_secs,
            });
        }
        window.count += 1;
        Ok(Admitted {
            count: window.count,
            allowed: self.rate_limit,
            reset_secs,
        })
    }

    /// Issues a new token valid for `ttl`; returns it.
    pub(super) fn issue_token(&self, now: Duration, ttl: Duration) -> String {
        // 32 random bytes: opaque and unguessable, like the real service's tokens.
        let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let state = TokenState {
            // Saturating: a test may ask for an `expires_in` of u64::MAX seconds.
            expires_at: now.saturating_add(ttl),
            window: Window {
                start: now,
                count: 0,
            },
        };
        lock(&self.tokens).insert(token.clone(), state);
        token
    }
}

/// Seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The bearer token of the `Authorization` header, if any.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A request let through, with what the `inin-ratelimit-*` headers report.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) count: u32,
    pub(super) allowed: u32,
    pub(super) reset_secs: u64,
}

/// Why an API request was turned away before being looked at.
#[derive(Debug)]
pub(super) enum Denied {
    Missing,
    Refused,
    Expired,
    RateLimited { retry_after: u64 },
}

impl Denied {
    /// The Genesys-style answer.
    pub(super) fn respond(&self, cid: Uuid) -> (Response, &'static str) {
        match self {
            Denied::Missing => {
                let code = "authentication.required";
                let message = "No authentication bearer token specified in authorization header.";
                (
                    api_error(StatusCode::UNAUTHORIZED, code, message, cid),
                    code,
                )
            }
            Denied::Refused => {
                let code = "bad.credentials";
                (
                    api_error(
                        StatusCode::UNAUTHORIZED,
                        code,
                        "Invalid login credentials.",
                        cid,
                    ),
                    code,
                )
            }
            Denied::Expired => {
                let code = "credentials.expired";
                let message = "The supplied credentials are expired and cannot be used.";
                (
                    api_error(StatusCode::UNAUTHORIZED, code, message, cid),
                    code,
                )
            }
            Denied::RateLimited { retry_after } => {
                (too_many_requests(*retry_after, cid), TOO_MANY_REQUESTS_CODE)
            }
        }
    }
}

/// The code of every 429 since Genesys normalised them in 2021.
pub(super) const TOO_MANY_REQUESTS_CODE: &str = "too.many.requests.retry.after";

/// A 429 exactly as Genesys Cloud sends it.
pub(super) fn too_many_requests(retry_after: u64, cid: Uuid) -> Response {
    let message =
        format!("Rate limit exceeded the maximum. Retry the request in [{retry_after}] seconds");
    let mut response = api_error(
        StatusCode::TOO_MANY_REQUESTS,
        TOO_MANY_REQUESTS_CODE,
        &message,
        cid,
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// Genesys Cloud's `ErrorBody`, with the fields the simulator fills.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    message: &'a str,
    code: &'a str,
    status: u16,
    context_id: Uuid,
    details: [(); 0],
    errors: [(); 0],
}

/// An `ErrorBody` answer whose `contextId` is the request's correlation id.
pub(super) fn api_error(status: StatusCode, code: &str, message: &str, cid: Uuid) -> Response {
    let body = ErrorBody {
        message,
        code,
        status: status.as_u16(),
        context_id: cid,
        details: [],
        errors: [],
    };
    json(status, &body)
}

/// A JSON answer.
pub(super) fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialise the answer: {e}"),
        )
            .into_response(),
    }
}

impl Shared {
    /// The one pair of credentials the simulator accepts.
    pub(super) fn credentials(&self) -> (&str, &str) {
        (&self.client_id, &self.client_secret)
    }

    /// Whether the `Authorization: Basic` header carries the configured client id and secret.
    pub(super) fn client_matches(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, encoded)) = value.split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = std::str::from_utf8(&decoded) else {
            return false;
        };
        decoded.split_once(':') == Some((self.client_id.as_str(), self.client_secret.as_str()))
    }
}
