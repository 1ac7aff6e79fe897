//! OAuth client-credentials tokens: obtained on the login host, cached, renewed before they
//! expire and once when the API refuses one, with a single renewal in flight at a time.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use url::Url;

use super::error::GenesysError;
use super::model::{TokenErrorBody, TokenResponse};
use super::scrub::{MESSAGE_LIMIT, scrub};
use super::{ANSWER_LIMIT, read_capped};
use crate::config::Secret;
use crate::metrics as m;

/// A bearer token and when to stop using it.
#[derive(Debug)]
pub struct Token {
    /// The bearer value.
    pub value: Secret,
    /// When to fetch a new one: a margin before `expires_in` runs out.
    renew_at: Instant,
    /// Increases with every token fetched; tells a stale 401 from a current one.
    pub generation: u64,
}

/// How long before expiry a token is replaced: a minute (as the Go SDK does), or a fifth of
/// a short lifetime, so a 5-minute token is not renewed every request.
pub fn renewal_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(60))
}

/// The longest token lifetime believed. Genesys issues at most 48 h; renewing a little early
/// costs one request a day, while believing an absurd `expires_in` would keep a revoked token
/// in use (and `18446744073709551615` seconds would overflow the clock).
pub const TOKEN_LIFETIME_CAP: Duration = Duration::from_secs(24 * 3600);

/// `expires_in` as a lifetime: any JSON number (or a string of digits, as some proxies send),
/// clamped to 1 s ..= [`TOKEN_LIFETIME_CAP`]; `None` when it is not a number at all.
pub fn token_lifetime(expires_in: &serde_json::Value) -> Option<Duration> {
    let seconds = match expires_in {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(s) => s,
            // Negative, fractional or beyond u64: `as` saturates (NaN cannot come from JSON).
            None => n.as_f64().map(|f| f.max(0.0) as u64)?,
        },
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().unwrap_or(u64::MAX)
        }
        _ => return None,
    };
    // Genesys allows 300 s to 48 h; a token shorter than 1 s would be renewed on every request.
    Some(Duration::from_secs(
        seconds.clamp(1, TOKEN_LIFETIME_CAP.as_secs()),
    ))
}

/// After a failed token request, callers within this window get the same error without a new
/// request, so a burst of jobs does not hammer a login service that just said no.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// Fetches and caches tokens.
pub struct TokenManager {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    // std RwLock: read on every request, held for a clone only, never across an await.
    current: RwLock<Option<Arc<Token>>>,
    last_failure: RwLock<Option<(Instant, GenesysError)>>,
    // Async mutex held across the token request: the single-flight guard.
    renewal: tokio::sync::Mutex<u64>,
}

impl TokenManager {
    /// A manager for the token endpoint `<login_base>/oauth/token`.
    pub fn new(
        http: reqwest::Client,
        login_base: &Url,
        client_id: String,
        client_secret: Secret,
    ) -> Self {
        let mut token_url = login_base.clone();
        token_url.set_path("/oauth/token");
        Self {
            http,
            token_url,
            client_id,
            client_secret,
            current: RwLock::new(None),
            last_failure: RwLock::new(None),
            renewal: tokio::sync::Mutex::new(0),
        }
    }

    /// A valid token: the cached one, or a new one when it is near expiry.
    pub async fn token(&self) -> Result<Arc<Token>, GenesysError> {
        if let Some(token) = self.cached_fresh() {
            return Ok(token);
        }
        let mut generation = self.renewal.lock().await;
        // Another caller may have renewed while this one waited for the lock.
        if let Some(token) = self.cached_fresh() {
            return Ok(token);
        }
        self.fetch(&mut generation).await
    }

    /// A new token after the API refused `rejected` (401), unless another caller already replaced it.
    pub async fn renew_after_rejection(
        &self,
        rejected: &Token,
    ) -> Result<Arc<Token>, GenesysError> {
        let mut generation = self.renewal.lock().await;
        if let Some(token) = self.cached_fresh()
            && token.generation != rejected.generation
        {
            return Ok(token);
        }
        self.fetch(&mut generation).await
    }

    /// Forgets the cached token (the next request fetches one); used when credentials are retried.
    pub fn forget(&self) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
        *self.last_failure.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn cached_fresh(&self) -> Option<Arc<Token>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|token| Instant::now() < token.renew_at)
            .cloned()
    }

    async fn fetch(&self, generation: &mut u64) -> Result<Arc<Token>, GenesysError> {
        if let Some((at, error)) = &*self.last_failure.read().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < FAILURE_MEMORY
        {
            return Err(error.clone());
        }
        let result = self.request().await;
        metrics::counter!(m::TOKEN_RENEWALS_TOTAL, "result" => match &result {
            Ok(_) => "ok",
            Err(GenesysError::CredentialsRefused { .. }) => "refused",
            Err(_) => "error",
        })
        .increment(1);
        match result {
            Ok((value, lifetime)) => {
                *generation += 1;
                let now = Instant::now();
                // The lifetime is capped, so this cannot overflow; checked anyway, since a
                // panic here would take every job with it.
                let renew_at = now
                    .checked_add(lifetime.saturating_sub(renewal_margin(lifetime)))
                    .unwrap_or(now);
                let token = Arc::new(Token {
                    value,
                    renew_at,
                    generation: *generation,
                });
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                *self.last_failure.write().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::debug!(
                    expires_in = lifetime.as_secs(),
                    generation = *generation,
                    "obtained a Genesys token"
                );
                Ok(token)
            }
            Err(error) => {
                tracing::warn!(error = %error, "Genesys token request failed");
                *self.last_failure.write().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    async fn request(&self) -> Result<(Secret, Duration), GenesysError> {
        let response = self
            .http
            .post(self.token_url.clone())
            .basic_auth(&self.client_id, Some(self.client_secret.expose()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| {
                GenesysError::TokenUnavailable(format!(
                    "{} unreachable: {}",
                    self.token_url,
                    error_chain(&e)
                ))
            })?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            // Never followed: the credentials would go wherever the Location says.
            return Err(GenesysError::TokenUnavailable(format!(
                "token endpoint answered {status} (a redirect, not followed)"
            )));
        }
        let (body, complete) = read_capped(response, ANSWER_LIMIT).await.map_err(|e| {
            GenesysError::TokenUnavailable(format!("reading the answer: {}", error_chain(&e)))
        })?;
        if response_ok(status) {
            if !complete {
                return Err(GenesysError::TokenUnavailable(format!(
                    "token answer larger than {ANSWER_LIMIT} bytes"
                )));
            }
            let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                GenesysError::TokenUnavailable(scrub(
                    &format!("unreadable token answer: {e}"),
                    MESSAGE_LIMIT,
                ))
            })?;
            if parsed
                .token_type
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
            {
                return Err(GenesysError::TokenUnavailable(format!(
                    "unexpected token_type {:?}",
                    scrub(parsed.token_type.as_deref().unwrap_or_default(), 40)
                )));
            }
            let lifetime = token_lifetime(&parsed.expires_in).ok_or_else(|| {
                GenesysError::TokenUnavailable("token answer: expires_in is not a number".into())
            })?;
            if parsed.access_token.is_empty() {
                return Err(GenesysError::TokenUnavailable(
                    "token answer: access_token is empty".into(),
                ));
            }
            return Ok((Secret::new(parsed.access_token), lifetime));
        }
        let error: TokenErrorBody = serde_json::from_slice(&body).unwrap_or_default();
        let message = [error.error, error.error_description.or(error.description)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        let message = if message.is_empty() {
            String::from_utf8_lossy(&body[..body.len().min(4 * MESSAGE_LIMIT)]).into_owned()
        } else {
            message
        };
        let message = scrub(&message, MESSAGE_LIMIT);
        if matches!(status, 400 | 401) {
            Err(GenesysError::CredentialsRefused { status, message })
        } else {
            Err(GenesysError::TokenUnavailable(format!(
                "token endpoint answered {status}: {message}"
            )))
        }
    }
}

fn response_ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// A reqwest error with its causes, which is where "connection refused" actually is.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_margins() {
        assert_eq!(
            renewal_margin(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(
            renewal_margin(Duration::from_secs(300)),
            Duration::from_secs(60)
        );
        assert_eq!(
            renewal_margin(Duration::from_secs(10)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn lifetimes_are_clamped_whatever_the_number() {
        use serde_json::json;
        let day = TOKEN_LIFETIME_CAP;
        for (value, expected) in [
            (json!(86_400), Some(day)),
            (json!(300), Some(Duration::from_secs(300))),
            (json!(18446744073709551615u64), Some(day)),
            (json!(1e300), Some(day)),
            (json!(-5), Some(Duration::from_secs(1))),
            (json!(0), Some(Duration::from_secs(1))),
            (json!("3600"), Some(Duration::from_secs(3600))),
            (json!("99999999999999999999999"), Some(day)),
            (json!("soon"), None),
            (json!(null), None),
        ] {
            assert_eq!(token_lifetime(&value), expected, "{value}");
        }
    }
}
