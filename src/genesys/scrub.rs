//! Text that came from outside (error messages, redirect targets, unreadable answers) made safe
//! to put in events, dead-letter headers and logs: bounded in length, one line, and with
//! anything that looks like a credential replaced.

/// Longest outside text kept in an error message, in characters. Long enough for every
/// Genesys `ErrorBody.message` seen; short enough that an event stays small.
pub const MESSAGE_LIMIT: usize = 300;
/// Longest error `code` or correlation id kept (Genesys codes and UUIDs are far shorter).
pub const SHORT_LIMIT: usize = 80;
/// A run of token alphabet this long is treated as a secret: OAuth bearer tokens, JWTs, API
/// keys and hex digests are all longer, while words and ids in error messages are shorter.
const TOKEN_RUN: usize = 32;

/// What a credential-like run is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Makes outside text safe to log and publish: control characters become spaces, a word after
/// `Bearer`/`Basic` and every long run of base64/hex alphabet (except a UUID) becomes
/// [`REDACTED`], and the result is cut to `limit` characters (with `…` when cut).
pub fn scrub(text: &str, limit: usize) -> String {
    // Work on a bounded prefix: a 20 MB answer costs no more than a short one.
    let prefix: String = text
        .chars()
        .take(limit.saturating_mul(4).max(limit + TOKEN_RUN))
        .collect();
    let mut out = String::with_capacity(prefix.len().min(limit + 16));
    let mut redact_next_word = false;
    for (word, separator) in words(&prefix) {
        if redact_next_word && !word.is_empty() {
            out.push_str(REDACTED);
            redact_next_word = false;
        } else {
            redact_runs(word, &mut out);
            if word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic") {
                redact_next_word = true;
            }
        }
        if let Some(separator) = separator {
            out.push(if separator.is_control() {
                ' '
            } else {
                separator
            });
        }
    }
    truncate(&out, limit, prefix.chars().count() < text.chars().count())
}

/// Splits on whitespace and quoting/punctuation that cannot be part of a token, keeping each
/// separator so the text reads as before.
fn words(text: &str) -> Vec<(&str, Option<char>)> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (index, c) in text.char_indices() {
        if c.is_whitespace()
            || c.is_control()
            || matches!(
                c,
                '"' | '\''
                    | ','
                    | ';'
                    | '('
                    | ')'
                    | '['
                    | ']'
                    | '{'
                    | '}'
                    | '<'
                    | '>'
                    | '&'
                    | '?'
                    | '#'
            )
        {
            parts.push((&text[start..index], Some(c)));
            start = index + c.len_utf8();
        }
    }
    parts.push((&text[start..], None));
    parts
}

/// Copies `word` into `out`, replacing each long run of token alphabet that is not a UUID.
fn redact_runs(word: &str, out: &mut String) {
    let is_token_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '_' | '-' | '=' | '.' | '%');
    let mut run_start: Option<usize> = None;
    let flush = |out: &mut String, run: &str| {
        if run.len() >= TOKEN_RUN && uuid::Uuid::try_parse(run).is_err() && !is_plain_words(run) {
            out.push_str(REDACTED);
        } else {
            out.push_str(run);
        }
    };
    for (index, c) in word.char_indices() {
        match (is_token_char(c), run_start) {
            (true, None) => run_start = Some(index),
            (true, Some(_)) => {}
            (false, Some(start)) => {
                flush(out, &word[start..index]);
                run_start = None;
                out.push(c);
            }
            (false, None) => out.push(c),
        }
    }
    if let Some(start) = run_start {
        flush(out, &word[start..]);
    }
}

/// A long run that is a dotted or dashed identifier made of short readable parts (a Genesys
/// error code such as `too.many.requests.retry.after`, a host name) is not a secret.
fn is_plain_words(run: &str) -> bool {
    run.split(['.', '-', '_', '/'])
        .all(|part| part.len() < 16 && part.chars().all(|c| c.is_ascii_lowercase()))
}

fn truncate(text: &str, limit: usize, already_cut: bool) -> String {
    let count = text.chars().count();
    if count <= limit && !already_cut {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(limit.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_and_long_runs_are_redacted() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijklmnop";
        let text = format!("invalid header Authorization: Bearer abc123 and {token} here");
        let clean = scrub(&text, MESSAGE_LIMIT);
        assert!(!clean.contains("abc123"), "{clean}");
        assert!(!clean.contains("eyJ"), "{clean}");
        assert!(clean.contains("invalid header Authorization: Bearer [redacted]"));
        let hex = "deadbeef".repeat(8);
        assert_eq!(scrub(&format!("key={hex}"), 100), "[redacted]");
        assert_eq!(scrub(&format!("key {hex}!"), 100), "key [redacted]!");
    }

    #[test]
    fn ordinary_messages_ids_and_codes_are_kept() {
        for text in [
            "User 3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001 is not active.",
            "Rate limit exceeded the maximum. Retry the request in [42] seconds",
            "code too.many.requests.retry.after from api.mypurecloud.com",
        ] {
            assert_eq!(scrub(text, MESSAGE_LIMIT), text);
        }
    }

    #[test]
    fn output_is_bounded_and_one_line() {
        let huge = "a b\n".repeat(5_000_000);
        let clean = scrub(&huge, 50);
        assert_eq!(clean.chars().count(), 50);
        assert!(clean.ends_with('…'));
        assert!(!clean.contains('\n'));
        assert_eq!(scrub("line\r\nbreak", 50), "line  break");
        assert_eq!(scrub("", 10), "");
        assert_eq!(scrub("é".repeat(20).as_str(), 5).chars().count(), 5);
    }
}
