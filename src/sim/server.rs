//! The simulator's HTTP front: routing, the token endpoint, authentication and rate limiting of
//! `/api/v2`, and the `/sim` inspection endpoints (the state they share is in `state`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

use super::api::{self, Handled};
use super::faults::Faults;
use super::records::{CallAttempt, PlacedCall};

use super::state::{
    CORRELATION_ID, RATELIMIT_ALLOWED, RATELIMIT_COUNT, RATELIMIT_RESET, Shared, api_error, json,
};

/// The simulator's routes. One fallback handler dispatches by hand so that every unknown path
/// or method gets a Genesys-style 404 rather than axum's empty 404/405.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

async fn dispatch(
    State(st): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    if path == "/oauth/token" {
        token(&st, &method, &headers, &body)
    } else if let Some(rest) = path.strip_prefix("/sim/") {
        admin(&st, &method, rest, &body)
    } else if path.starts_with("/api/v2/") {
        api(&st, &method, path, &headers, &body).await
    } else {
        let cid = Uuid::new_v4();
        with_correlation(not_found(cid), cid)
    }
}

/// The generic 404.
fn not_found(cid: Uuid) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "not.found",
        "The requested resource was not found.",
        cid,
    )
}

/// Adds the `ININ-Correlation-Id` header.
fn with_correlation(mut response: Response, cid: Uuid) -> Response {
    let mut buf = Uuid::encode_buffer();
    if let Ok(value) = HeaderValue::from_str(cid.hyphenated().encode_lower(&mut buf)) {
        response.headers_mut().insert(CORRELATION_ID, value);
    }
    response
}

/// `/api/v2/*`: record, authenticate, rate-limit, handle, delay, answer.
async fn api(
    st: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let now = st.clock.now();
    let cid = Uuid::new_v4();
    let seq = st.journal().arrived(now, method, path, Some(cid));
    let (latency, reject_all, outage, retry_after) = {
        let faults = st.faults_mut();
        (
            faults.latency_ms,
            faults.reject_credentials,
            faults.outage_status,
            faults.retry_after(),
        )
    };
    if let Some(status) = outage {
        let response = outage_response(st, method, path, body, now, cid, status, retry_after);
        st.journal().answered(seq, response.status().as_u16());
        return with_correlation(response, cid);
    }
    let response = match st.admit(headers, now, reject_all) {
        Err(denied) => {
            let (response, code) = denied.respond(cid);
            if let Some(user_id) = api::place_call_user(method, path) {
                api::record_refused_attempt(
                    st,
                    now,
                    user_id,
                    body,
                    response.status().as_u16(),
                    code,
                    cid,
                );
            }
            response
        }
        Ok(admitted) => match api::handle(st, method, path, body, now, cid) {
            Handled::Respond(mut response) => {
                let h = response.headers_mut();
                h.insert(RATELIMIT_COUNT, HeaderValue::from(admitted.count));
                h.insert(RATELIMIT_ALLOWED, HeaderValue::from(admitted.allowed));
                h.insert(RATELIMIT_RESET, HeaderValue::from(admitted.reset_secs));
                response
            }
            Handled::Hang => {
                // Never answer: the client times out. Only a shutdown ends the wait, so that a
                // graceful stop does not wait for it forever.
                st.shutdown.cancelled().await;
                let message = "The simulator is shutting down.";
                return with_correlation(
                    api_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service.unavailable",
                        message,
                        cid,
                    ),
                    cid,
                );
            }
        },
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    st.journal().answered(seq, response.status().as_u16());
    with_correlation(response, cid)
}

/// The answer to every `/api/v2` request during an injected outage: nothing is authenticated,
/// counted or handled; a place-call request is recorded as an attempt.
#[allow(clippy::too_many_arguments)]
fn outage_response(
    st: &Shared,
    method: &Method,
    path: &str,
    body: &[u8],
    now: Duration,
    cid: Uuid,
    status: u16,
    retry_after: u64,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let unavailable = status == StatusCode::SERVICE_UNAVAILABLE;
    let code = if unavailable {
        "service.unavailable"
    } else {
        "internal.server.error"
    };
    let mut response = api_error(
        status,
        code,
        "Injected outage: the simulator was told the API is down.",
        cid,
    );
    if unavailable {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    }
    if let Some(user_id) = api::place_call_user(method, path) {
        api::record_refused_attempt(st, now, user_id, body, status.as_u16(), code, cid);
    }
    response
}

/// `POST /oauth/token`: the client-credentials grant, as the login host answers it.
fn token(st: &Shared, method: &Method, headers: &HeaderMap, body: &[u8]) -> Response {
    let now = st.clock.now();
    let seq = st.journal().arrived(now, method, "/oauth/token", None);
    let (reject_all, ttl) = {
        let faults = st.faults_mut();
        (
            faults.reject_credentials,
            faults
                .token_ttl_secs
                .map_or(st.token_ttl, Duration::from_secs),
        )
    };
    let response = if method != Method::POST {
        oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "The token endpoint accepts only POST.",
        )
    } else if reject_all || !st.client_matches(headers) {
        oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid client credentials.",
        )
    } else {
        match grant_type(headers, body) {
            Some(grant) if grant == "client_credentials" => {
                let token = st.issue_token(now, ttl);
                let answer = TokenAnswer {
                    access_token: &token,
                    token_type: "bearer",
                    expires_in: ttl.as_secs(),
                };
                let mut response = json(StatusCode::OK, &answer);
                response
                    .headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            Some(_) => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "The simulator supports only grant_type=client_credentials.",
            ),
            None => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Missing grant_type: send an application/x-www-form-urlencoded body with grant_type=client_credentials.",
            ),
        }
    };
    let status = response.status();
    let mut journal = st.journal();
    journal.answered(seq, status.as_u16());
    journal.token_outcome(status.is_success());
    response
}

/// `grant_type` of a form-encoded body; `None` when missing or not a form.
fn grant_type(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let content_type = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return None;
    }
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.into_owned())
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    access_token: &'a str,
    token_type: &'a str,
    expires_in: u64,
}

/// The login host's error shape (`error`, `description`, `error_description`).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    #[derive(Serialize)]
    struct OAuthError<'a> {
        error: &'a str,
        description: &'a str,
        error_description: &'a str,
    }
    json(
        status,
        &OAuthError {
            error,
            description,
            error_description: description,
        },
    )
}

/// `/sim/*`: inspection and fault control, unauthenticated and unrecorded.
fn admin(st: &Shared, method: &Method, rest: &str, body: &[u8]) -> Response {
    let cid = Uuid::new_v4();
    match (method, rest) {
        (&Method::GET, "calls") => {
            #[derive(Serialize)]
            struct Calls {
                attempts: Vec<CallAttempt>,
                placed: Vec<PlacedCall>,
            }
            json(
                StatusCode::OK,
                &Calls {
                    attempts: st.attempts(),
                    placed: st.placed_calls(),
                },
            )
        }
        (&Method::GET, "requests") => json(StatusCode::OK, &st.requests()),
        (&Method::GET, "stats") => json(StatusCode::OK, &st.stats()),
        (&Method::GET, "agents") => json(StatusCode::OK, &st.directory.all()),
        (&Method::GET, "faults") => json(StatusCode::OK, &st.faults()),
        (&Method::PUT, "faults") => {
            let faults = serde_json::from_slice::<Faults>(body)
                .map_err(|e| e.to_string())
                .and_then(|f| f.validate().map(|()| f));
            match faults {
                Ok(faults) => {
                    st.set_faults(faults.clone());
                    json(StatusCode::OK, &faults)
                }
                Err(message) => with_correlation(
                    api_error(StatusCode::BAD_REQUEST, "bad.request", &message, cid),
                    cid,
                ),
            }
        }
        (&Method::POST, "reset") => {
            st.journal().reset();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => with_correlation(not_found(cid), cid),
    }
}
