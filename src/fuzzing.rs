//! Entry points for fuzzing the parsers that read outside input: the dial job parser and every
//! parser of a Genesys answer. The cargo-fuzz targets in `fuzz/` and the stable test that
//! mutates seed inputs (`tests/it/fuzz_inputs.rs`) call the same functions, so what CI runs
//! briefly on stable is what a fuzzer runs for hours on nightly.
//!
//! Each function must not panic for any input, and checks the bounds its parser promises
//! (a panic here is a finding).

use std::time::Duration;

use crate::genesys::{
    self, CreateCallResponse, ErrorClass, GenesysError, RETRY_AFTER_CAP, TOKEN_LIFETIME_CAP,
};
use crate::job::parse_job;

/// The dial job parser: the first byte chooses whether an AMQP `message_id` is given (the
/// next up-to-64 bytes, up to a NUL), the rest is the body.
pub fn job_parser(data: &[u8]) {
    let (message_id, body) = match data.split_first() {
        Some((flag, rest)) if flag & 1 == 1 => {
            let end = rest
                .iter()
                .take(64)
                .position(|b| *b == 0)
                .unwrap_or(rest.len().min(64));
            (
                std::str::from_utf8(&rest[..end]).ok(),
                rest.get(end + 1..).unwrap_or_default(),
            )
        }
        Some((_, rest)) => (None, rest),
        None => (None, data),
    };
    match parse_job(body, message_id) {
        Ok(job) => {
            let id = job.job_id.as_str();
            assert!(!id.is_empty() && id.len() <= 128, "job id {id:?}");
            // Mapping to the Genesys request never fails or panics for a parsed job.
            let request = crate::genesys::CreateCallRequest::for_job(&job);
            assert!(request.phone_number.starts_with('+'));
        }
        Err(rejection) => {
            assert!(!rejection.message.is_empty());
            if let Some(id) = &rejection.job_id {
                assert!(id.len() <= 128, "rejection job id of {} bytes", id.len());
            }
        }
    }
}

/// Every parser of a Genesys answer: error bodies with their headers, place-call and
/// user-search answers, token answers, `Retry-After`, and the scrubber. The first two bytes
/// choose a status; then a header value up to the first NUL; the rest is the body.
pub fn genesys_answers(data: &[u8]) {
    let status = match data {
        [a, b, ..] => 100 + u16::from_be_bytes([*a, *b]) % 500,
        _ => 500,
    };
    let rest = data.get(2..).unwrap_or_default();
    let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let header = String::from_utf8_lossy(&rest[..split]);
    let body = rest.get(split + 1..).unwrap_or_default();

    let retry_after = genesys::parse_retry_after(&header);
    if let Some(wait) = retry_after {
        assert!(wait <= RETRY_AFTER_CAP, "{wait:?}");
    }
    let error = GenesysError::from_answer(status, Some(header.to_string()), retry_after, body);
    let text = error.to_string();
    assert!(
        text.chars().count() < 2 * genesys::MESSAGE_LIMIT,
        "{} chars",
        text.len()
    );
    assert!(
        error
            .code()
            .is_none_or(|c| c.chars().count() <= genesys::SHORT_LIMIT)
    );
    assert!(
        error
            .correlation_id()
            .is_none_or(|c| c.chars().count() <= genesys::SHORT_LIMIT)
    );
    let _ = (
        error.kind(),
        error.counts_as_try(),
        error.looks_like_outage(),
    );
    if let ErrorClass::Transient {
        retry_after: Some(wait),
    } = error.class()
    {
        assert!(wait <= RETRY_AFTER_CAP);
    }

    if let Ok(created) = serde_json::from_slice::<CreateCallResponse>(body) {
        let _ = genesys::validate_created(created);
    }
    let _ = genesys::read_user_search(body);
    if let Ok(token) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(expires_in) = token.get("expires_in")
        && let Some(lifetime) = genesys::token_lifetime(expires_in)
    {
        assert!(lifetime >= Duration::from_secs(1) && lifetime <= TOKEN_LIFETIME_CAP);
        let _ = genesys::renewal_margin(lifetime);
    }

    let scrubbed = genesys::scrub(&String::from_utf8_lossy(body), 64);
    assert!(scrubbed.chars().count() <= 64);
    assert!(!scrubbed.contains('\n'));
}
