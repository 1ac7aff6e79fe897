//! Reading the fields of a job body: the one-pass reader that notices repeated names, and one
//! checker per kind of field, each returning a message that names the field.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    FIELDS, JOB_ID_ATTRIBUTE, MAX_ATTRIBUTE_NAME_CHARS, MAX_ATTRIBUTE_VALUE_CHARS, MAX_ATTRIBUTES,
    MAX_SHOWN_CHARS, MAX_TEXT_CHARS,
};

/// The top level of a body, read in one pass: an object (with the first name that appeared twice,
/// if any), or the kind of JSON value it was instead.
pub(super) enum Body {
    Object {
        fields: Map<String, Value>,
        repeated: Option<String>,
    },
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Body;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Body, E> {
        Ok(Body::Other("boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Body, E> {
        Ok(Body::Other("number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Body, E> {
        Ok(Body::Other("number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Body, E> {
        Ok(Body::Other("number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<Body, E> {
        Ok(Body::Other("string"))
    }

    fn visit_unit<E>(self) -> Result<Body, E> {
        Ok(Body::Other("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Body, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Body::Other("array"))
    }

    // Most JSON readers keep the last of two equal names silently; a job naming `phoneNumber`
    // twice is ambiguous, so it is noticed here and rejected.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
        let mut fields = Map::new();
        let mut repeated = None;
        while let Some((name, value)) = map.next_entry::<String, Value>()? {
            if fields.contains_key(&name) && repeated.is_none() {
                repeated = Some(name.clone());
            }
            fields.insert(name, value);
        }
        Ok(Body::Object { fields, repeated })
    }
}

/// An optional string field: absent and `null` are `None`; empty or longer than `max` characters
/// is an error, as is any other JSON type.
pub(super) fn string<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Option<&'a str>, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) if value.is_empty() => Err(format!(
            "{name} is empty (leave it out, or send null, when there is none)"
        )),
        Some(Value::String(value)) if value.chars().count() > max => {
            Err(format!("{name} is longer than {max} characters"))
        }
        Some(Value::String(value)) => Ok(Some(value)),
        Some(other) => Err(format!("{name} must be a string, not {}", json_kind(other))),
    }
}

/// `priority`: a whole number that fits an i32. `5.0` counts as whole, as JSON Schema's
/// `integer` says.
pub(super) fn priority(fields: &Map<String, Value>) -> Result<Option<i32>, String> {
    let number = match fields.get("priority") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(number)) => number,
        Some(other) => {
            return Err(format!(
                "priority must be an integer, not {}",
                json_kind(other)
            ));
        }
    };
    let whole = number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= i64::MAX as f64)
            .map(|f| f as i64)
    });
    whole
        .and_then(|value| i32::try_from(value).ok())
        .map(Some)
        .ok_or_else(|| {
            format!(
                "priority {number} is not a whole number from {} to {}",
                i32::MIN,
                i32::MAX
            )
        })
}

/// `attributes`: an object of string to string, without `dialerJobId`.
pub(super) fn attributes(fields: &Map<String, Value>) -> Result<BTreeMap<String, String>, String> {
    let object = match fields.get("attributes") {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(object)) => object,
        Some(other) => {
            return Err(format!(
                "attributes must be an object of strings, not {}",
                json_kind(other)
            ));
        }
    };
    if object.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "attributes has {} entries; at most {MAX_ATTRIBUTES} are accepted",
            object.len()
        ));
    }
    let mut attributes = BTreeMap::new();
    for (name, value) in object {
        if name == JOB_ID_ATTRIBUTE {
            return Err(format!(
                "attributes may not set {JOB_ID_ATTRIBUTE}: the worker adds it (= jobId)"
            ));
        }
        if name.is_empty() || name.chars().count() > MAX_ATTRIBUTE_NAME_CHARS {
            return Err(format!(
                "attribute name {} must have 1 to {MAX_ATTRIBUTE_NAME_CHARS} characters",
                shown(name)
            ));
        }
        let Value::String(value) = value else {
            return Err(format!(
                "attribute {} must be a string, not {}",
                shown(name),
                json_kind(value)
            ));
        };
        if value.chars().count() > MAX_ATTRIBUTE_VALUE_CHARS {
            return Err(format!(
                "attribute {} is longer than {MAX_ATTRIBUTE_VALUE_CHARS} characters",
                shown(name)
            ));
        }
        attributes.insert(name.clone(), value.clone());
    }
    Ok(attributes)
}

/// `notBefore` / `expiresAt`: RFC 3339 with an offset, date and time separated by `T`.
pub(super) fn instant(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<OffsetDateTime>, String> {
    let Some(raw) = string(fields, name, MAX_TEXT_CHARS)? else {
        return Ok(None);
    };
    // time's parser takes any separator (RFC 3339 allows a space "for readability"); the job
    // format and its schema say `T`, so one spelling is accepted everywhere.
    let separator_ok = matches!(raw.as_bytes().get(10), Some(b'T' | b't'));
    match OffsetDateTime::parse(raw, &Rfc3339) {
        Ok(at) if separator_ok => Ok(Some(at)),
        _ => Err(format!(
            "{name} {} is not an RFC 3339 time (expected e.g. 2026-03-01T09:30:00Z or \
             2026-03-01T10:30:00+01:00)",
            shown(raw)
        )),
    }
}

/// The light check of `agentEmail`: the directory lookup is the real one.
pub(super) fn check_email(raw: &str) -> Result<String, String> {
    let well_formed = match raw.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !raw.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if well_formed {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "agentEmail {} is not an email address (expected one @ with text on both sides, no spaces)",
            shown(raw)
        ))
    }
}

pub(super) fn not_a_uuid(name: &str, raw: &str) -> String {
    format!(
        "{name} {} is not a UUID (expected 8-4-4-4-12 hex digits)",
        shown(raw)
    )
}

/// Names the unknown field, and the known one it most likely meant when only case or
/// separators differ (`phone_number`, `PhoneNumber`).
pub(super) fn unknown_field_message(name: &str) -> String {
    let folded: String = name
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .collect();
    match FIELDS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(&folded))
    {
        Some(known) => format!("unknown field {}; did you mean {known}?", shown(name)),
        None => format!(
            "unknown field {}; the accepted fields are {}",
            shown(name),
            FIELDS.join(", ")
        ),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most [`MAX_SHOWN_CHARS`] of `raw`, with `...` when cut.
fn cut(raw: &str) -> String {
    match raw.char_indices().nth(MAX_SHOWN_CHARS) {
        Some((end, _)) => format!("{}...", &raw[..end]),
        None => raw.to_owned(),
    }
}

/// `raw` quoted for a message, cut short.
pub(super) fn shown(raw: &str) -> String {
    format!("{:?}", cut(raw))
}

#[cfg(test)]
mod tests {
    use crate::job::RejectionKind;
    use crate::job::test_support::*;

    #[test]
    fn null_is_the_same_as_absent() {
        let mut job = minimal();
        for field in [
            "agentEmail",
            "callerId",
            "priority",
            "attributes",
            "notBefore",
            "defaultRegion",
        ] {
            job[field] = serde_json::Value::Null;
        }
        assert!(parse(job).is_ok());
    }

    #[test]
    fn unknown_fields_are_named() {
        let rejection = rejected(with("agentEmial", "x".into()));
        assert_eq!(rejection.kind, RejectionKind::UnknownField);
        assert!(
            rejection.message.contains("\"agentEmial\""),
            "{}",
            rejection.message
        );
        assert!(
            rejection.message.contains("phoneNumber"),
            "{}",
            rejection.message
        );
        let rejection = rejected(with("phone_number", "x".into()));
        assert!(
            rejection.message.ends_with("did you mean phoneNumber?"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn a_field_given_twice_is_rejected() {
        let body = br#"{"jobId":"j","agentUserId":"8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
            "phoneNumber":"+14155552671","phoneNumber":"+442071838750"}"#;
        let rejection = parse_job(body, None).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::InvalidField);
        assert!(
            rejection
                .message
                .contains("\"phoneNumber\" appears more than once")
        );
        assert_eq!(rejection.job_id.as_deref(), Some("j"));
    }

    #[test]
    fn attributes_are_strings() {
        for bad in [
            serde_json::json!({"n": 1}),
            serde_json::json!({"n": null}),
            serde_json::json!({"": "x"}),
            serde_json::json!(["a"]),
            serde_json::json!({"long": "x".repeat(2049)}),
        ] {
            let rejection = rejected(with("attributes", bad.clone()));
            assert!(
                rejection.message.starts_with("attribute"),
                "{bad}: {}",
                rejection.message
            );
        }
    }

    #[test]
    fn other_fields_are_checked() {
        for (field, value, start) in [
            (
                "callFromQueueId",
                serde_json::json!("queue-1"),
                "callFromQueueId \"queue-1\" is not a UUID",
            ),
            (
                "priority",
                serde_json::json!(1.5),
                "priority 1.5 is not a whole number",
            ),
            (
                "priority",
                serde_json::json!(3_000_000_000u64),
                "priority 3000000000 is not a whole number",
            ),
            (
                "priority",
                serde_json::json!("1"),
                "priority must be an integer, not a string",
            ),
            ("callerId", serde_json::json!(""), "callerId is empty"),
            (
                "label",
                serde_json::json!("x".repeat(257)),
                "label is longer than 256 characters",
            ),
            (
                "uuiData",
                serde_json::json!(7),
                "uuiData must be a string, not a number",
            ),
            (
                "notBefore",
                serde_json::json!("2026-03-01 09:30:00Z"),
                "notBefore \"2026-03-01 09:30:00Z\" is not an RFC 3339",
            ),
            (
                "expiresAt",
                serde_json::json!("2026-03-01T09:30:00"),
                "expiresAt \"2026-03-01T09:30:00\" is not an RFC 3339",
            ),
            (
                "jobId",
                serde_json::json!(42),
                "jobId must be a string, not a number",
            ),
        ] {
            let rejection = rejected(with(field, value));
            assert_eq!(rejection.kind, RejectionKind::InvalidField);
            assert!(
                rejection.message.starts_with(start),
                "{}",
                rejection.message
            );
        }
        assert!(parse(with("uuiData", "x".repeat(1024).into())).is_ok());
        assert!(parse(with("priority", (-7).into())).is_ok());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let rejection = rejected(with("agentUserId", "x".repeat(200).into()));
        assert!(rejection.message.len() < 120, "{}", rejection.message);
        assert!(rejection.message.contains("..."));
    }
}
