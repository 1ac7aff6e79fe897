//! What can go wrong talking to Genesys Cloud, and the one table that says what each failure means
//! for a job (`docs/genesys.md`).

use std::time::Duration;

use super::model::ErrorBody;
use super::scrub::{MESSAGE_LIMIT, SHORT_LIMIT, scrub};
use crate::event::EventError;

/// The longest `Retry-After` honoured. Genesys's own SDKs give up beyond 180 s; an hour keeps a
/// server's (or a proxy's) absurd value from parking the process for days or overflowing a clock.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// What a failure means for the job that hit it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing was processed (429, 503, connection refused): retry after a wait.
    Transient {
        /// What the server asked for in `Retry-After`, when it did.
        retry_after: Option<Duration>,
    },
    /// The request may have been processed but no clear answer came (500, 502, 504, a timeout
    /// after sending, an unreadable 2xx). Retrying could ring somebody twice.
    Ambiguous,
    /// Genesys refused this job for good (400, 403 for this agent, 404, 409, 422).
    Permanent,
    /// Every job would fail the same way (credentials refused, a permission missing):
    /// stop consuming rather than dead-letter the queue.
    Systemic,
    /// The token was refused (401): renew it and send once more.
    RenewToken,
}

/// The classification table of `docs/genesys.md`, by error status and Genesys error code.
pub fn classify_status(
    status: u16,
    code: Option<&str>,
    retry_after: Option<Duration>,
) -> ErrorClass {
    match status {
        401 => ErrorClass::RenewToken,
        403 if matches!(
            code,
            Some("missing.permissions" | "missing.any.permissions")
        ) =>
        {
            ErrorClass::Systemic
        }
        429 | 503 => ErrorClass::Transient { retry_after },
        // 408 and 5xx other than 503: the request reached a server that may have acted on it.
        408 | 500..=599 => ErrorClass::Ambiguous,
        // 400, 403 (not.authorized for this agent), 404, 409, 422 and the other 4xx.
        _ => ErrorClass::Permanent,
    }
}

/// A failure talking to Genesys Cloud.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GenesysError {
    /// The API answered with an error status.
    #[error("Genesys answered {status}{}: {}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), message)]
    Api {
        /// HTTP status.
        status: u16,
        /// `ErrorBody.code`.
        code: Option<String>,
        /// `ErrorBody.message`, or the start of the raw body.
        message: String,
        /// `ININ-Correlation-Id` (or `contextId`).
        correlation_id: Option<String>,
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// The token endpoint refused the credentials (400/401): every request would fail.
    #[error("Genesys refused the OAuth client credentials ({status}): {message}")]
    CredentialsRefused {
        /// HTTP status of the token endpoint.
        status: u16,
        /// `error` / `error_description` of the answer.
        message: String,
    },
    /// The API refused a token it had just been given (401 twice): the client is not allowed in.
    #[error("Genesys refused a freshly issued token (401): {0}")]
    TokenRejected(String),
    /// The token endpoint could not be used (unreachable, 5xx, unreadable answer).
    #[error("cannot obtain a Genesys token: {0}")]
    TokenUnavailable(String),
    /// Could not connect: nothing was sent.
    #[error("cannot connect to Genesys: {0}")]
    Connect(String),
    /// The request timed out after it was (possibly) sent.
    #[error("Genesys did not answer within the timeout")]
    Timeout,
    /// The connection broke after the request was (possibly) sent.
    #[error("the connection to Genesys broke mid-request: {0}")]
    Transport(String),
    /// Not sent: shutdown started while the request waited for its turn.
    #[error("not sent: the worker is shutting down")]
    Cancelled,
    /// Genesys answered with a redirect, which is never followed: for the place-call POST the
    /// call may already exist; for a lookup or token request nothing happened.
    #[error("Genesys answered {status} (a redirect{}), which is not followed", location.as_deref().map(|l| format!(" to {l}")).unwrap_or_default())]
    Redirect {
        /// HTTP status (3xx).
        status: u16,
        /// `Location`, scrubbed and bounded.
        location: Option<String>,
        /// Whether the request could have placed a call.
        may_have_acted: bool,
    },
    /// Not sent: the job's `expiresAt` passed while the request waited for its turn.
    #[error("not sent: expiresAt passed before the request could leave")]
    DeadlinePassed,
    /// Not sent: the circuit breaker is open (Genesys looks down).
    #[error("not sent: the circuit breaker is open ({0})")]
    CircuitOpen(String),
    /// Not sent: the process is paused by a `Retry-After` longer than a job may be held.
    #[error("not sent: requests are paused for another {} s by a Genesys Retry-After", remaining.as_secs())]
    Paused {
        /// How much of the pause is left.
        remaining: Duration,
    },
    /// A success answer whose body could not be read: the call may exist.
    #[error("Genesys answered {status} with an unreadable body: {message}")]
    UnreadableSuccess {
        /// HTTP status.
        status: u16,
        /// What was wrong with it.
        message: String,
    },
}

impl GenesysError {
    /// What this failure means for the job.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Api {
                status,
                code,
                retry_after,
                ..
            } => classify_status(*status, code.as_deref(), *retry_after),
            Self::CredentialsRefused { .. }
            | Self::TokenRejected(_)
            | Self::TokenUnavailable(_) => ErrorClass::Systemic,
            Self::Connect(_) | Self::Cancelled | Self::CircuitOpen(_) => {
                ErrorClass::Transient { retry_after: None }
            }
            Self::Paused { remaining } => ErrorClass::Transient {
                retry_after: Some(*remaining),
            },
            Self::Redirect {
                may_have_acted: true,
                ..
            } => ErrorClass::Ambiguous,
            Self::Redirect { .. } => ErrorClass::Transient { retry_after: None },
            // Nothing was sent and nothing can be: the job is over.
            Self::DeadlinePassed => ErrorClass::Permanent,
            Self::Timeout | Self::Transport(_) | Self::UnreadableSuccess { .. } => {
                ErrorClass::Ambiguous
            }
        }
    }

    /// A short machine-readable name for events, headers and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Api { status: 429, .. } => "rate_limited",
            Self::Api { .. } => match self.class() {
                ErrorClass::Transient { .. } => "unavailable",
                ErrorClass::Ambiguous => "ambiguous",
                ErrorClass::Systemic => "missing_permissions",
                ErrorClass::RenewToken => "unauthorized",
                ErrorClass::Permanent => "refused",
            },
            Self::CredentialsRefused { .. } => "credentials_refused",
            Self::TokenRejected(_) => "token_rejected",
            Self::TokenUnavailable(_) => "token_unavailable",
            Self::Connect(_) => "connect",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::Transport(_) => "transport",
            Self::UnreadableSuccess { .. } => "unreadable_answer",
            Self::Redirect { .. } => "redirect",
            Self::DeadlinePassed => "expired",
            Self::CircuitOpen(_) => "circuit_open",
            Self::Paused { .. } => "rate_limited",
        }
    }

    /// Whether this failure counts toward `DIALER_MAX_ATTEMPTS`: a 429 or a pause it imposed
    /// is Genesys asking for patience, and a request not sent failed nothing.
    pub fn counts_as_try(&self) -> bool {
        !matches!(
            self,
            Self::Api { status: 429, .. }
                | Self::Paused { .. }
                | Self::CircuitOpen(_)
                | Self::Cancelled
                | Self::DeadlinePassed
        )
    }

    /// Whether this failure says Genesys is down (feeds the circuit breaker): no connection,
    /// no answer in time, a broken connection, or a 5xx.
    pub fn looks_like_outage(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout | Self::Transport(_) => true,
            Self::Api { status, .. } => (500..=599).contains(status),
            _ => false,
        }
    }

    /// HTTP status, when Genesys answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. }
            | Self::CredentialsRefused { status, .. }
            | Self::Redirect { status, .. }
            | Self::UnreadableSuccess { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Genesys's error code, when it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// `ININ-Correlation-Id`, when Genesys sent one.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::Api { correlation_id, .. } => correlation_id.as_deref(),
            _ => None,
        }
    }

    /// Builds an API error from a status, headers and body (an `ErrorBody` when it parses).
    /// Every piece of outside text is scrubbed and bounded here, once, so nothing a server
    /// sends reaches events, dead-letter headers or logs verbatim.
    pub(crate) fn from_answer(
        status: u16,
        correlation_id: Option<String>,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Self {
        let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
        let (code, message, context_id) = match parsed {
            Some(b) => (b.code, b.message, b.context_id),
            None => (None, None, None),
        };
        let message = match message {
            Some(message) => scrub(message.trim(), MESSAGE_LIMIT),
            None => {
                let head = &body[..body.len().min(MESSAGE_LIMIT * 4)];
                let text = String::from_utf8_lossy(head);
                let text = text.trim();
                if text.is_empty() {
                    "(no body)".to_owned()
                } else {
                    scrub(text, MESSAGE_LIMIT)
                }
            }
        };
        Self::Api {
            status,
            code: code.map(|c| scrub(&c, SHORT_LIMIT)),
            message,
            correlation_id: correlation_id
                .or(context_id)
                .map(|c| scrub(&c, SHORT_LIMIT)),
            retry_after,
        }
    }
}

/// Parses `Retry-After` in delta-seconds (what Genesys sends; HTTP dates are not used by
/// Genesys), capped at [`RETRY_AFTER_CAP`]: a number too large for any integer is the cap, not
/// an error and never an overflow.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let digits = value.trim();
    if digits.is_empty() || digits.len() > 64 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = digits.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(RETRY_AFTER_CAP))
}

/// The error of a `failed` or `unknown` event for what Genesys did or did not answer.
impl From<&GenesysError> for EventError {
    fn from(error: &GenesysError) -> Self {
        Self {
            kind: error.kind().to_owned(),
            message: error.to_string(),
            http_status: error.http_status(),
            code: error.code().map(str::to_owned),
            correlation_id: error.correlation_id().map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_error_carries_what_genesys_answered() {
        let genesys = GenesysError::Api {
            status: 404,
            code: Some("not.found".into()),
            message: "user not found".into(),
            correlation_id: Some("c0ffee".into()),
            retry_after: None,
        };
        let error = EventError::from(&genesys);
        assert_eq!(error.kind, "refused");
        assert_eq!(error.http_status, Some(404));
        assert_eq!(error.code.as_deref(), Some("not.found"));
        assert_eq!(error.correlation_id.as_deref(), Some("c0ffee"));
    }

    #[test]
    fn the_classification_table_of_the_contract() {
        let ra = Some(Duration::from_secs(3));
        let cases = [
            (429, None, ErrorClass::Transient { retry_after: ra }),
            (503, None, ErrorClass::Transient { retry_after: ra }),
            (401, Some("bad.credentials"), ErrorClass::RenewToken),
            (500, None, ErrorClass::Ambiguous),
            (502, None, ErrorClass::Ambiguous),
            (504, Some("request.timeout"), ErrorClass::Ambiguous),
            (400, Some("bad.request"), ErrorClass::Permanent),
            (404, Some("not.found"), ErrorClass::Permanent),
            (409, None, ErrorClass::Permanent),
            (422, None, ErrorClass::Permanent),
            (403, Some("not.authorized"), ErrorClass::Permanent),
            (403, Some("missing.permissions"), ErrorClass::Systemic),
            (403, Some("missing.any.permissions"), ErrorClass::Systemic),
        ];
        for (status, code, class) in cases {
            assert_eq!(
                classify_status(status, code, ra),
                class,
                "{status} {code:?}"
            );
        }
    }

    #[test]
    fn transport_failures() {
        assert_eq!(
            GenesysError::Connect("refused".into()).class(),
            ErrorClass::Transient { retry_after: None }
        );
        assert_eq!(GenesysError::Timeout.class(), ErrorClass::Ambiguous);
        assert_eq!(
            GenesysError::Transport("reset".into()).class(),
            ErrorClass::Ambiguous
        );
        assert_eq!(
            GenesysError::CredentialsRefused {
                status: 401,
                message: String::new()
            }
            .class(),
            ErrorClass::Systemic
        );
        assert_eq!(
            GenesysError::TokenUnavailable("down".into()).class(),
            ErrorClass::Systemic
        );
    }

    #[test]
    fn error_bodies_are_read() {
        let body = br#"{"message":"Rate limit exceeded the maximum. Retry the request in [2] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"abc","details":[],"errors":[]}"#;
        let error = GenesysError::from_answer(429, None, Some(Duration::from_secs(2)), body);
        assert_eq!(error.code(), Some("too.many.requests.retry.after"));
        assert_eq!(error.correlation_id(), Some("abc"));
        assert_eq!(error.kind(), "rate_limited");
        assert!(
            error
                .to_string()
                .contains("Retry the request in [2] seconds")
        );
        let error =
            GenesysError::from_answer(502, Some("c-1".into()), None, b"<html>bad gateway</html>");
        assert_eq!(error.correlation_id(), Some("c-1"));
        assert_eq!(error.class(), ErrorClass::Ambiguous);
        assert!(error.to_string().contains("bad gateway"));
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(" 42 "), Some(Duration::from_secs(42)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn huge_retry_after_is_capped_not_an_overflow() {
        for huge in ["18446744073709551615", "99999999999999999999999999", "3601"] {
            assert_eq!(parse_retry_after(huge), Some(RETRY_AFTER_CAP), "{huge}");
        }
    }

    #[test]
    fn outside_text_is_scrubbed_and_bounded() {
        let body = format!(
            r#"{{"message":"bad token Bearer {}","code":"{}","contextId":"c"}}"#,
            "x".repeat(40),
            "c".repeat(500)
        );
        let error = GenesysError::from_answer(400, None, None, body.as_bytes());
        let text = error.to_string();
        assert!(!text.contains("xxxx"), "{text}");
        assert!(error.code().unwrap().chars().count() <= SHORT_LIMIT);
        let raw = "y".repeat(10_000_000);
        let error = GenesysError::from_answer(502, None, None, raw.as_bytes());
        assert!(error.to_string().len() < 2 * MESSAGE_LIMIT);
    }

    #[test]
    fn redirects_are_ambiguous_only_where_a_call_may_exist() {
        let redirect = |may_have_acted| GenesysError::Redirect {
            status: 307,
            location: None,
            may_have_acted,
        };
        assert_eq!(redirect(true).class(), ErrorClass::Ambiguous);
        assert_eq!(
            redirect(false).class(),
            ErrorClass::Transient { retry_after: None }
        );
        assert_eq!(redirect(true).kind(), "redirect");
    }
}
