//! The simulated `/api/v2` resources: user search and lookup, placing calls for a user, and
//! reading a placed call back. Authentication and rate limiting happen before these run.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::header::{LOCATION, RETRY_AFTER};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::agents::{AgentState, SimAgent};
use super::faults::Injection;
use super::records::{AttemptEntry, PlacedEntry};
use super::state::{Shared, TOO_MANY_REQUESTS_CODE, api_error, json, too_many_requests};

/// What to do with an admitted API request.
#[derive(Debug)]
pub(super) enum Handled {
    /// Send this answer.
    Respond(Response),
    /// Never answer (an injected hang).
    Hang,
}

/// The `{userId}` when this is a place-call request
/// (`POST /api/v2/conversations/calls/user/{userId}`).
pub(super) fn place_call_user<'p>(method: &Method, path: &'p str) -> Option<&'p str> {
    if method != Method::POST {
        return None;
    }
    let user = path.strip_prefix("/api/v2/conversations/calls/user/")?;
    (!user.is_empty() && !user.contains('/')).then_some(user)
}

/// Routes an admitted `/api/v2` request.
pub(super) fn handle(
    st: &Shared,
    method: &Method,
    path: &str,
    body: &[u8],
    now: Duration,
    cid: Uuid,
) -> Handled {
    if let Some(user_id) = place_call_user(method, path) {
        return place_call(st, user_id, body, now, cid);
    }
    let rest = path.strip_prefix("/api/v2/").unwrap_or_default();
    let mut segments = rest.split('/');
    let response = match (
        method,
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (&Method::POST, Some("users"), Some("search"), None, _) => search_users(st, body, cid),
        (&Method::GET, Some("users"), Some(id), None, _) if !id.is_empty() => get_user(st, id, cid),
        (&Method::POST, Some("conversations"), Some("calls"), None, _) => api_error(
            StatusCode::BAD_REQUEST,
            "bad.request",
            "A client credentials token cannot place calls with POST /api/v2/conversations/calls: it needs \
             the calling user's own token (implicit, authorization code, PKCE or SAML2 bearer grant). \
             Use POST /api/v2/conversations/calls/user/{userId} instead.",
            cid,
        ),
        (&Method::GET, Some("conversations"), Some("calls"), Some(id), None) if !id.is_empty() => {
            get_call(st, id, cid)
        }
        _ => api_error(
            StatusCode::NOT_FOUND,
            "not.found",
            "The requested resource was not found.",
            cid,
        ),
    };
    Handled::Respond(response)
}

/// `User` as Genesys Cloud returns it (the fields a dialer reads).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserOut<'a> {
    id: &'a str,
    name: &'a str,
    email: &'a str,
    state: &'static str,
    self_uri: String,
}

impl<'a> From<&'a SimAgent> for UserOut<'a> {
    fn from(agent: &'a SimAgent) -> Self {
        UserOut {
            id: &agent.id,
            name: &agent.name,
            email: &agent.email,
            state: agent.state.as_str(),
            self_uri: format!("/api/v2/users/{}", agent.id),
        }
    }
}

/// `GET /api/v2/users/{userId}`.
fn get_user(st: &Shared, id: &str, cid: Uuid) -> Response {
    match st.directory.by_id(id) {
        Some(agent) if agent.state != AgentState::Deleted => {
            json(StatusCode::OK, &UserOut::from(agent))
        }
        _ => api_error(
            StatusCode::NOT_FOUND,
            "not.found",
            &format!("User {id} not found"),
            cid,
        ),
    }
}

/// `UserSearchRequest`: every field of the real schema is accepted, unknown ones are refused.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "fields the real schema has; accepted and type-checked, not used"
)]
struct UserSearchRequest {
    #[serde(default)]
    query: Vec<UserSearchCriteria>,
    page_size: Option<u32>,
    page_number: Option<u32>,
    sort_order: Option<String>,
    sort_by: Option<String>,
    expand: Option<Vec<String>>,
    return_fields: Option<Vec<String>>,
    enforce_permissions: Option<bool>,
}

/// `UserSearchCriteria`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "fields the real schema has; accepted and type-checked, not used"
)]
struct UserSearchCriteria {
    #[serde(rename = "type")]
    kind: Option<String>,
    fields: Option<Vec<String>>,
    value: Option<String>,
    values: Option<Vec<String>>,
    operator: Option<String>,
    group: Option<Vec<UserSearchCriteria>>,
    start_value: Option<String>,
    end_value: Option<String>,
    date_format: Option<String>,
}

/// The largest `pageSize` the search accepts.
const MAX_PAGE_SIZE: u32 = 100;

/// `POST /api/v2/users/search`, limited to what a dialer needs: EXACT matches on `email`.
fn search_users(st: &Shared, body: &[u8], cid: Uuid) -> Response {
    let bad = |code: &str, message: &str| api_error(StatusCode::BAD_REQUEST, code, message, cid);
    let request: UserSearchRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return bad(
                "bad.request",
                &format!("Invalid UserSearchRequest body: {e}"),
            );
        }
    };
    if request.query.is_empty() {
        return bad("bad.request", "query must hold at least one criterion.");
    }
    // All criteria must hold (AND), each naming the accepted emails.
    let mut wanted: Vec<Vec<&str>> = Vec::with_capacity(request.query.len());
    for criterion in &request.query {
        let Some(kind) = criterion.kind.as_deref() else {
            return bad("bad.request", "Every query criterion needs a type.");
        };
        let email_only = criterion
            .fields
            .as_deref()
            .is_some_and(|f| !f.is_empty() && f.iter().all(|f| f == "email"));
        let plain = criterion.group.is_none()
            && criterion
                .operator
                .as_deref()
                .is_none_or(|o| o.eq_ignore_ascii_case("AND"));
        if !kind.eq_ignore_ascii_case("EXACT") || !email_only || !plain {
            return bad(
                "bad.request",
                "The simulator supports only EXACT on email: {\"type\":\"EXACT\",\"fields\":[\"email\"],\"value\":...}.",
            );
        }
        let mut emails: Vec<&str> = criterion
            .values
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        emails.extend(criterion.value.as_deref());
        if emails.is_empty() {
            return bad(
                "bad.request",
                "An EXACT criterion needs a value (or values).",
            );
        }
        wanted.push(emails);
    }
    let page_size = request.page_size.unwrap_or(25);
    if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        return bad(
            "invalid.value",
            &format!("pageSize must be between 1 and {MAX_PAGE_SIZE}."),
        );
    }
    let page_number = request.page_number.unwrap_or(1);
    if page_number == 0 {
        return bad("invalid.value", "pageNumber starts at 1.");
    }

    // Look the first criterion's emails up in the index; the other criteria only filter.
    let mut matches: Vec<&SimAgent> = Vec::new();
    for email in &wanted[0] {
        let Some(agent) = st.directory.by_email(email) else {
            continue;
        };
        let all_hold = wanted[1..].iter().all(|emails| {
            emails
                .iter()
                .any(|e| e.trim().eq_ignore_ascii_case(&agent.email))
        });
        if agent.state != AgentState::Deleted
            && all_hold
            && !matches.iter().any(|m| m.id == agent.id)
        {
            matches.push(agent);
        }
    }
    let total = matches.len();
    let size = page_size as usize;
    let results: Vec<UserOut<'_>> = matches
        .into_iter()
        .skip(size.saturating_mul(page_number as usize - 1))
        .take(size)
        .map(UserOut::from)
        .collect();
    json(
        StatusCode::OK,
        &json!({
            "total": total,
            "pageCount": total.div_ceil(size),
            "pageSize": page_size,
            "pageNumber": page_number,
            "types": [],
            "results": results,
        }),
    )
}

/// `CreateCallRequest`, flat, exactly the fields of the real schema; anything else is refused.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "fields the real schema has; accepted and type-checked, not used"
)]
struct CreateCallRequest {
    phone_number: Option<String>,
    caller_id: Option<String>,
    caller_id_name: Option<String>,
    call_from_queue_id: Option<String>,
    call_queue_id: Option<String>,
    call_user_id: Option<String>,
    priority: Option<i64>,
    attributes: Option<BTreeMap<String, String>>,
    language_id: Option<String>,
    routing_skills_ids: Option<Vec<String>>,
    routing_skill_expression: Option<String>,
    conversation_ids: Option<Vec<String>>,
    participants: Option<Vec<Destination>>,
    uui_data: Option<String>,
    external_contact_id: Option<String>,
    label: Option<String>,
}

/// `Destination` (conference participants).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "fields the real schema has; accepted and type-checked, not used"
)]
struct Destination {
    address: Option<String>,
    name: Option<String>,
    user_id: Option<String>,
    queue_id: Option<String>,
}

/// The two fields worth recording from a body that was refused or never validated.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Lenient {
    phone_number: Option<String>,
    attributes: Option<BTreeMap<String, String>>,
}

impl Lenient {
    fn read(body: &[u8]) -> Lenient {
        serde_json::from_slice(body).unwrap_or_default()
    }
}

/// Whether `number` is E.164: `+`, a non-zero digit, 7 to 15 digits in all.
///
/// Whether the real service checks the format is not documented (see `docs/genesys.md`); the simulator
/// is deliberately stricter, so that a client which forgets to normalise numbers is caught here.
fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Records an attempt turned away before it was looked at (401 or 429).
pub(super) fn record_refused_attempt(
    st: &Shared,
    now: Duration,
    user_id: &str,
    body: &[u8],
    status: u16,
    code: &'static str,
    cid: Uuid,
) {
    let lenient = Lenient::read(body);
    st.journal().attempt(AttemptEntry {
        at: now,
        user_id: user_id.into(),
        phone_number: lenient.phone_number,
        attributes: lenient.attributes,
        status,
        hung: false,
        code: Some(code),
        conversation_id: None,
        correlation_id: cid,
    });
}

/// `POST /api/v2/conversations/calls/user/{userId}`.
fn place_call(st: &Shared, user_id: &str, body: &[u8], now: Duration, cid: Uuid) -> Handled {
    let attempt =
        |status: u16, code: Option<&'static str>, phone: Option<String>, attributes| AttemptEntry {
            at: now,
            user_id: user_id.into(),
            phone_number: phone,
            attributes,
            status,
            hung: false,
            code,
            conversation_id: None,
            correlation_id: cid,
        };
    // Refuses the request with an error the caller cannot retry its way out of.
    let refuse = |status: StatusCode, code: &'static str, message: &str, phone, attributes| {
        st.journal()
            .attempt(attempt(status.as_u16(), Some(code), phone, attributes));
        Handled::Respond(api_error(status, code, message, cid))
    };

    let request: CreateCallRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let lenient = Lenient::read(body);
            let message = format!("Invalid CreateCallRequest body: {e}");
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad.request",
                &message,
                lenient.phone_number,
                lenient.attributes,
            );
        }
    };
    let attributes = request.attributes;
    let Some(phone) = request.phone_number else {
        let message = "phoneNumber is required (the simulator dials phone numbers only).";
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad.request",
            message,
            None,
            attributes,
        );
    };
    if !is_e164(&phone) {
        let message =
            format!("phoneNumber {phone:?} is not a valid E.164 number (+ and 7 to 15 digits).");
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid.value",
            &message,
            Some(phone),
            attributes,
        );
    }
    let agent = match st.directory.by_id(user_id) {
        Some(agent) if agent.state == AgentState::Active => agent,
        Some(agent) if agent.state == AgentState::Inactive => {
            let message = format!("User {user_id} is not active.");
            return refuse(
                StatusCode::NOT_FOUND,
                "not.found",
                &message,
                Some(phone),
                attributes,
            );
        }
        _ => {
            let message = format!("User {user_id} not found.");
            return refuse(
                StatusCode::NOT_FOUND,
                "not.found",
                &message,
                Some(phone),
                attributes,
            );
        }
    };

    let (injection, retry_after, answer_id, error_message) = {
        let mut faults = st.faults_mut();
        (
            faults.next_injection(),
            faults.retry_after(),
            faults.answer_id(),
            faults.error_message.clone(),
        )
    };
    match injection {
        Injection::Fail(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code = injected_code(status);
            let response = if status == StatusCode::TOO_MANY_REQUESTS {
                too_many_requests(retry_after, cid)
            } else {
                let message = error_message.unwrap_or_else(|| {
                    format!(
                        "Injected failure: the simulator was told to answer {}.",
                        status.as_u16()
                    )
                });
                let mut response = api_error(status, code, &message, cid);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
                }
                response
            };
            let mut journal = st.journal();
            journal.fault_injected();
            journal.attempt(attempt(
                status.as_u16(),
                Some(code),
                Some(phone),
                attributes,
            ));
            Handled::Respond(response)
        }
        Injection::Redirect => {
            // Back to the same path: a client that follows it sends the POST again, and again.
            let mut response = api_error(
                StatusCode::TEMPORARY_REDIRECT,
                "moved",
                "Injected redirect: the simulator was told to answer 307.",
                cid,
            );
            let location = format!("/api/v2/conversations/calls/user/{user_id}");
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(LOCATION, value);
            }
            let mut journal = st.journal();
            journal.fault_injected();
            journal.attempt(attempt(307, Some("moved"), Some(phone), attributes));
            Handled::Respond(response)
        }
        Injection::Hang => {
            let mut journal = st.journal();
            journal.fault_injected();
            journal.attempt(AttemptEntry {
                hung: true,
                ..attempt(0, None, Some(phone), attributes)
            });
            Handled::Hang
        }
        Injection::None => {
            let conversation_id = Uuid::new_v4();
            let answer = json!({
                "id": answer_id.unwrap_or_else(|| conversation_id.to_string()),
                "name": phone,
                "selfUri": format!("/api/v2/conversations/calls/{conversation_id}"),
            });
            let response = json(StatusCode::OK, &answer);
            let attributes = attributes.unwrap_or_default();
            let mut journal = st.journal();
            journal.attempt(AttemptEntry {
                conversation_id: Some(conversation_id),
                ..attempt(200, None, Some(phone.clone()), Some(attributes.clone()))
            });
            journal.placed(PlacedEntry {
                at: now,
                conversation_id,
                user_id: agent.id.clone(),
                phone_number: phone,
                caller_id: request.caller_id,
                caller_id_name: request.caller_id_name,
                attributes,
                agent_participant_id: Uuid::new_v4(),
                customer_participant_id: Uuid::new_v4(),
                correlation_id: cid,
            });
            Handled::Respond(response)
        }
    }
}

/// The Genesys error code for an injected status.
fn injected_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad.request",
        401 => "bad.credentials",
        403 => "missing.permissions",
        404 => "not.found",
        408 => "request.timeout",
        409 => "conflict",
        415 => "unsupported.media.type",
        422 => "invalid.value",
        429 => TOO_MANY_REQUESTS_CODE,
        502 => "bad.gateway",
        503 => "service.unavailable",
        504 => "request.timeout",
        s if s < 500 => "bad.request",
        _ => "internal.server.error",
    }
}

/// `GET /api/v2/conversations/calls/{conversationId}` for calls the simulator placed.
fn get_call(st: &Shared, id: &str, cid: Uuid) -> Response {
    let not_found = || {
        api_error(
            StatusCode::NOT_FOUND,
            "not.found",
            &format!("Conversation {id} not found"),
            cid,
        )
    };
    let Ok(conversation_id) = Uuid::parse_str(id) else {
        return not_found();
    };
    // Build the answer under the lock (a few clones), serialise after releasing it.
    let body = {
        let journal = st.journal();
        let Some(call) = journal.conversation(&conversation_id) else {
            return not_found();
        };
        json!({
            "id": call.conversation_id,
            "name": call.phone_number,
            "participants": [
                {
                    "id": call.agent_participant_id,
                    "purpose": "agent",
                    "user": { "id": call.user_id, "selfUri": format!("/api/v2/users/{}", call.user_id) },
                    "state": "connected",
                    "direction": "outbound",
                },
                {
                    "id": call.customer_participant_id,
                    "purpose": "customer",
                    "address": call.phone_number,
                    "state": "connected",
                    "direction": "outbound",
                    "attributes": call.attributes,
                },
            ],
            "selfUri": format!("/api/v2/conversations/calls/{}", call.conversation_id),
        })
    };
    json(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_is_checked_by_hand() {
        for ok in [
            "+15551234567",
            "+4915112345678",
            "+1234567",
            "+123456789012345",
        ] {
            assert!(is_e164(ok), "{ok} should be E.164");
        }
        for bad in [
            "0123",
            "+0123456789",
            "15551234567",
            "+1555-123-4567",
            "+123456",
            "+1234567890123456",
            "+",
        ] {
            assert!(!is_e164(bad), "{bad} should not be E.164");
        }
    }

    #[test]
    fn place_call_paths_are_recognised() {
        let id = "3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001";
        assert_eq!(
            place_call_user(
                &Method::POST,
                &format!("/api/v2/conversations/calls/user/{id}")
            ),
            Some(id)
        );
        assert_eq!(
            place_call_user(
                &Method::GET,
                &format!("/api/v2/conversations/calls/user/{id}")
            ),
            None
        );
        assert_eq!(
            place_call_user(&Method::POST, "/api/v2/conversations/calls"),
            None
        );
        assert_eq!(
            place_call_user(&Method::POST, "/api/v2/conversations/calls/user/"),
            None
        );
        assert_eq!(
            place_call_user(&Method::POST, "/api/v2/conversations/calls/user/a/b"),
            None
        );
    }
}
