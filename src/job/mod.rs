//! The dial job (docs/jobs-and-events.md §2): a message body parsed once, at the edge, into a
//! [`DialJob`] whose fields are already checked, or a [`Rejection`] that names the field and
//! what is accepted. Phone numbers live in `phone`, the reading of single fields in `fields`.

mod fields;
mod phone;
mod user;

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use fields::{
    Body, attributes, check_email, instant, not_a_uuid, priority, shown, string,
    unknown_field_message,
};
pub use phone::PhoneNumber;
pub use user::{UserId, parse_uuid};

/// The largest body accepted (docs/jobs-and-events.md §2); checked before anything is parsed.
pub const MAX_JOB_BYTES: usize = 64 * 1024;

/// How far ahead `notBefore` may be (docs/jobs-and-events.md §2): a job further out is
/// `rejected` rather than hopping through the 10-minute delay tier for months, and it would
/// outlive the week its decision is kept.
pub const NOT_BEFORE_HORIZON: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The participant attribute the worker adds (= the `jobId`), so a job may not set it itself.
pub const JOB_ID_ATTRIBUTE: &str = "dialerJobId";

/// Limits, in characters (Unicode scalar values, as JSON Schema's `maxLength` counts).
/// They keep one job's strings small enough for Genesys, logs and events; docs/jobs-and-events.md
/// and the schema state the same numbers.
const MAX_JOB_ID_CHARS: usize = 128;
const MAX_EMAIL_CHARS: usize = 254;
const MAX_PHONE_CHARS: usize = 64;
const MAX_TEXT_CHARS: usize = 256;
const MAX_UUI_CHARS: usize = 1024;
const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_NAME_CHARS: usize = 256;
const MAX_ATTRIBUTE_VALUE_CHARS: usize = 2048;

/// Values quoted in messages are cut to this many characters: messages go into events, headers
/// and logs, and a 60 KiB string must not ride along.
const MAX_SHOWN_CHARS: usize = 40;

/// Every field a job may carry. Anything else is rejected, so a CRM's typo is not silently ignored.
pub const FIELDS: [&str; 15] = [
    "jobId",
    "agentUserId",
    "agentEmail",
    "phoneNumber",
    "defaultRegion",
    "callerId",
    "callerIdName",
    "callFromQueueId",
    "priority",
    "attributes",
    "uuiData",
    "label",
    "externalContactId",
    "notBefore",
    "expiresAt",
];

/// A job's idempotency key: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JobId(String);

impl JobId {
    /// Checks `raw` against the job id rules; the message quotes the value but not the field,
    /// since the id may come from the body or from the AMQP `message_id`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if raw.is_empty() || raw.len() > MAX_JOB_ID_CHARS || !raw.chars().all(allowed) {
            return Err(format!(
                "{} is not a valid job id (expected 1 to {MAX_JOB_ID_CHARS} characters of A-Z a-z 0-9 . _ : -)",
                shown(raw)
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The agent the call is placed for: exactly one of `agentUserId` and `agentEmail`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Agent {
    /// A Genesys Cloud user id, used as is.
    UserId(UserId),
    /// An email address, to be resolved to a user id (lightly checked: one `@`, both sides
    /// non-empty, no whitespace, at most 254 characters).
    Email(String),
}

/// A checked dial job (docs/jobs-and-events.md §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialJob {
    /// The idempotency key: the body's `jobId`, else the AMQP `message_id`.
    pub job_id: JobId,
    /// Who the call is placed for.
    pub agent: Agent,
    /// Who is called.
    pub phone_number: PhoneNumber,
    /// `callerId`, passed to Genesys.
    pub caller_id: Option<String>,
    /// `callerIdName`, passed to Genesys.
    pub caller_id_name: Option<String>,
    /// `callFromQueueId`: a UUID, lower-case hyphenated.
    pub call_from_queue_id: Option<String>,
    /// `priority`, passed to Genesys.
    pub priority: Option<i32>,
    /// `attributes` as the job sent them (without `dialerJobId`, which a job may not set).
    pub attributes: BTreeMap<String, String>,
    /// `uuiData`, passed to Genesys.
    pub uui_data: Option<String>,
    /// `label`, passed to Genesys.
    pub label: Option<String>,
    /// `externalContactId`, passed to Genesys.
    pub external_contact_id: Option<String>,
    /// Not dialled before this instant.
    pub not_before: Option<OffsetDateTime>,
    /// Not dialled after this instant (outcome `expired`); always after `not_before`.
    pub expires_at: Option<OffsetDateTime>,
}

impl DialJob {
    /// Why the job may not wait for its `notBefore`: it is further than
    /// [`NOT_BEFORE_HORIZON`] after `now`. A message naming the field, or `None`.
    pub fn beyond_horizon(&self, now: OffsetDateTime) -> Option<String> {
        let not_before = self.not_before?;
        (not_before - now > NOT_BEFORE_HORIZON).then(|| {
            format!(
                "notBefore {} is more than 7 days ahead; publish the job at most 7 days before its time",
                not_before.format(&Rfc3339).unwrap_or_default()
            )
        })
    }
}

/// Why a body is not a dial job. The outcome is `rejected`: no call is attempted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// What kind of problem it is.
    pub kind: RejectionKind,
    /// One line naming the field and what is accepted.
    pub message: String,
    /// The best-known job id: the body's `jobId` if it was valid, else the AMQP `message_id`
    /// if valid, else none.
    pub job_id: Option<String>,
}

/// The kinds of [`Rejection`], for the event's `error.kind`, headers and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectionKind {
    /// The body is larger than [`MAX_JOB_BYTES`].
    TooLarge,
    /// The body is not UTF-8.
    NotUtf8,
    /// The body is not JSON.
    NotJson,
    /// The body is JSON but not an object.
    NotAnObject,
    /// A required field is missing (or null).
    MissingField,
    /// A field the job format does not have.
    UnknownField,
    /// A field with a wrong type or value, or fields that contradict each other.
    InvalidField,
}

impl RejectionKind {
    /// The snake_case name, e.g. `unknown_field`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::NotJson => "not_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField => "missing_field",
            Self::UnknownField => "unknown_field",
            Self::InvalidField => "invalid_field",
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a message body into a [`DialJob`] (docs/jobs-and-events.md §2). `message_id` is the AMQP property,
/// used as the job id when the body has none.
pub fn parse_job(body: &[u8], message_id: Option<&str>) -> Result<DialJob, Rejection> {
    // An empty message_id is what some clients send when they mean none.
    let property_id = message_id.filter(|id| !id.is_empty());
    let fallback_id = property_id.and_then(|id| JobId::parse(id).ok());
    let early = |kind, message| Rejection {
        kind,
        message,
        job_id: fallback_id.as_ref().map(|id| id.0.clone()),
    };

    // Length first: a huge body is refused before any of it is read.
    if body.len() > MAX_JOB_BYTES {
        let message = format!(
            "the job is {} bytes; at most {MAX_JOB_BYTES} (64 KiB) are accepted",
            body.len()
        );
        return Err(early(RejectionKind::TooLarge, message));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        let message = format!(
            "the job is not UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        );
        early(RejectionKind::NotUtf8, message)
    })?;
    let (fields, repeated) = match serde_json::from_str::<Body>(text) {
        Ok(Body::Object { fields, repeated }) => (fields, repeated),
        Ok(Body::Other(kind)) => {
            let message = format!("the job is a JSON {kind}; expected an object");
            return Err(early(RejectionKind::NotAnObject, message));
        }
        Err(e) => {
            return Err(early(
                RejectionKind::NotJson,
                format!("the job is not JSON: {e}"),
            ));
        }
    };

    // The body's id, when it is valid, names the job in the rejection even if other fields are bad.
    let body_id = match fields.get("jobId") {
        Some(Value::String(raw)) if repeated.as_deref() != Some("jobId") => JobId::parse(raw).ok(),
        _ => None,
    };
    let best_id = body_id.or_else(|| fallback_id.clone());
    let reject = |kind, message| Rejection {
        kind,
        message,
        job_id: best_id.as_ref().map(|id| id.0.clone()),
    };
    let invalid = |message| reject(RejectionKind::InvalidField, message);

    if let Some(name) = repeated {
        return Err(invalid(format!(
            "field {} appears more than once",
            shown(&name)
        )));
    }
    if let Some(name) = fields.keys().find(|name| !FIELDS.contains(&name.as_str())) {
        return Err(reject(
            RejectionKind::UnknownField,
            unknown_field_message(name),
        ));
    }

    let job_id = match string(&fields, "jobId", usize::MAX).map_err(invalid)? {
        Some(raw) => JobId::parse(raw).map_err(|e| invalid(format!("jobId {e}")))?,
        None => match property_id {
            Some(raw) => JobId::parse(raw).map_err(|e| {
                invalid(format!("the job has no jobId and its AMQP message_id {e}"))
            })?,
            None => {
                return Err(reject(
                    RejectionKind::MissingField,
                    "jobId is missing (send jobId in the body, or set the AMQP message_id)".into(),
                ));
            }
        },
    };

    let user_id = string(&fields, "agentUserId", MAX_TEXT_CHARS).map_err(invalid)?;
    let email = string(&fields, "agentEmail", MAX_EMAIL_CHARS).map_err(invalid)?;
    let agent = match (user_id, email) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "agentUserId and agentEmail are both set; give exactly one of them".into(),
            ));
        }
        (None, None) => {
            return Err(reject(
                RejectionKind::MissingField,
                "agentUserId or agentEmail is missing; give exactly one of them".into(),
            ));
        }
        (Some(raw), None) => {
            Agent::UserId(UserId::parse(raw).map_err(|_| invalid(not_a_uuid("agentUserId", raw)))?)
        }
        (None, Some(raw)) => Agent::Email(check_email(raw).map_err(invalid)?),
    };

    let region = string(&fields, "defaultRegion", MAX_TEXT_CHARS).map_err(invalid)?;
    let phone_number = match string(&fields, "phoneNumber", MAX_PHONE_CHARS).map_err(invalid)? {
        Some(raw) => PhoneNumber::parse(raw, region).map_err(invalid)?,
        None => {
            return Err(reject(
                RejectionKind::MissingField,
                "phoneNumber is missing (expected E.164 like +14155552671, or a national number \
                 with defaultRegion)"
                    .into(),
            ));
        }
    };

    let text = |name, max| {
        string(&fields, name, max)
            .map(|value| value.map(str::to_owned))
            .map_err(invalid)
    };
    let caller_id = text("callerId", MAX_TEXT_CHARS)?;
    let caller_id_name = text("callerIdName", MAX_TEXT_CHARS)?;
    let call_from_queue_id =
        match string(&fields, "callFromQueueId", MAX_TEXT_CHARS).map_err(invalid)? {
            Some(raw) => Some(
                parse_uuid(raw)
                    .map_err(|_| invalid(not_a_uuid("callFromQueueId", raw)))?
                    .hyphenated()
                    .to_string(),
            ),
            None => None,
        };
    let priority = priority(&fields).map_err(invalid)?;
    let attributes = attributes(&fields).map_err(invalid)?;
    let uui_data = text("uuiData", MAX_UUI_CHARS)?;
    let label = text("label", MAX_TEXT_CHARS)?;
    let external_contact_id = text("externalContactId", MAX_TEXT_CHARS)?;
    let not_before = instant(&fields, "notBefore").map_err(invalid)?;
    let expires_at = instant(&fields, "expiresAt").map_err(invalid)?;
    if let (Some(start), Some(end)) = (not_before, expires_at)
        && end <= start
    {
        // Such a job could never be dialled: say so now rather than let it wait to expire.
        return Err(invalid("expiresAt is not after notBefore".into()));
    }

    Ok(DialJob {
        job_id,
        agent,
        phone_number,
        caller_id,
        caller_id_name,
        call_from_queue_id,
        priority,
        attributes,
        uui_data,
        label,
        external_contact_id,
        not_before,
        expires_at,
    })
}

/// Makes phonenumber load its metadata now rather than inside the first job (about 0.7 s in a
/// debug build).
pub fn warm_up() {
    let _ = PhoneNumber::parse("+14155552671", None);
}

/// Jobs for the tests of this module and its parts.
#[cfg(test)]
mod test_support {
    pub(super) use super::*;

    pub(crate) const USER: &str = "8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
    pub(crate) const QUEUE: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

    pub(crate) fn parse(value: serde_json::Value) -> Result<DialJob, Rejection> {
        parse_job(value.to_string().as_bytes(), None)
    }

    pub(crate) fn minimal() -> serde_json::Value {
        serde_json::json!({"jobId": "job-1", "agentUserId": USER, "phoneNumber": "+14155552671"})
    }

    pub(crate) fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
        let mut job = minimal();
        job[field] = value;
        job
    }

    pub(crate) fn rejected(value: serde_json::Value) -> Rejection {
        match parse(value.clone()) {
            Ok(job) => panic!("{value} was accepted: {job:?}"),
            Err(rejection) => rejection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;

    #[test]
    fn a_minimal_job_is_accepted() {
        let job = parse(minimal()).unwrap();
        assert_eq!(job.job_id.as_str(), "job-1");
        assert_eq!(job.agent, Agent::UserId(UserId::parse(USER).unwrap()));
        assert_eq!(job.phone_number.e164(), "+14155552671");
        assert!(job.attributes.is_empty());
        assert_eq!(
            (job.priority, job.not_before, job.expires_at),
            (None, None, None)
        );
    }

    #[test]
    fn every_field_is_read() {
        let job = parse(serde_json::json!({
            "jobId": "crm:42",
            "agentEmail": "ada@example.com",
            "phoneNumber": "020 7183 8750",
            "defaultRegion": "gb",
            "callerId": "+442071838751",
            "callerIdName": "Example Ltd",
            "callFromQueueId": QUEUE.to_uppercase(),
            "priority": 5.0,
            "attributes": {"crmLeadId": "L-1", "empty": ""},
            "uuiData": "0123abcd",
            "label": "renewal",
            "externalContactId": "c-9",
            "notBefore": "2026-03-01T09:30:00Z",
            "expiresAt": "2026-03-01T18:00:00+01:00",
        }))
        .unwrap();
        assert_eq!(job.agent, Agent::Email("ada@example.com".into()));
        assert_eq!(job.phone_number.e164(), "+442071838750");
        assert_eq!(job.call_from_queue_id.as_deref(), Some(QUEUE));
        assert_eq!(job.priority, Some(5));
        assert_eq!(job.attributes["crmLeadId"], "L-1");
        assert_eq!(job.uui_data.as_deref(), Some("0123abcd"));
        assert_eq!(
            job.not_before,
            Some(time::macros::datetime!(2026-03-01 09:30 UTC))
        );
        assert_eq!(
            job.expires_at,
            Some(time::macros::datetime!(2026-03-01 17:00 UTC))
        );
    }

    #[test]
    fn exactly_one_agent() {
        let both = rejected(with("agentEmail", "ada@example.com".into()));
        assert_eq!(both.kind, RejectionKind::InvalidField);
        assert!(both.message.contains("both"), "{}", both.message);

        let mut neither = minimal();
        neither.as_object_mut().unwrap().remove("agentUserId");
        let neither = rejected(neither);
        assert_eq!(neither.kind, RejectionKind::MissingField);
        assert!(
            neither.message.contains("agentUserId or agentEmail"),
            "{}",
            neither.message
        );

        for email in [
            "ada",
            "@example.com",
            "ada@",
            "a@b@c",
            "ada lovelace@example.com",
        ] {
            let mut job = minimal();
            job.as_object_mut().unwrap().remove("agentUserId");
            job["agentEmail"] = email.into();
            assert!(rejected(job).message.starts_with("agentEmail"), "{email}");
        }
        let bad_id = rejected(with(
            "agentUserId",
            "8f9a1c2e3b4d4e5f8a9b0c1d2e3f4a5b".into(),
        ));
        assert!(
            bad_id.message.starts_with("agentUserId"),
            "{}",
            bad_id.message
        );
    }

    #[test]
    fn every_rejection_kind() {
        let cases: Vec<(Vec<u8>, RejectionKind)> = vec![
            (vec![b' '; MAX_JOB_BYTES + 1], RejectionKind::TooLarge),
            (b"{\"jobId\": \"\xff\"}".to_vec(), RejectionKind::NotUtf8),
            (b"{\"jobId\": ".to_vec(), RejectionKind::NotJson),
            (b"{} {}".to_vec(), RejectionKind::NotJson),
            (b"[1, 2]".to_vec(), RejectionKind::NotAnObject),
            (b"\"job\"".to_vec(), RejectionKind::NotAnObject),
            (b"{}".to_vec(), RejectionKind::MissingField),
            (
                with("phone", "x".into()).to_string().into_bytes(),
                RejectionKind::UnknownField,
            ),
            (
                with("priority", "high".into()).to_string().into_bytes(),
                RejectionKind::InvalidField,
            ),
        ];
        for (body, kind) in cases {
            let rejection = parse_job(&body, None).unwrap_err();
            assert_eq!(rejection.kind, kind, "{}", rejection.message);
        }
        let names: Vec<_> = [
            RejectionKind::TooLarge,
            RejectionKind::NotUtf8,
            RejectionKind::NotJson,
            RejectionKind::NotAnObject,
            RejectionKind::MissingField,
            RejectionKind::UnknownField,
            RejectionKind::InvalidField,
        ]
        .iter()
        .map(|kind| kind.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "too_large",
                "not_utf8",
                "not_json",
                "not_an_object",
                "missing_field",
                "unknown_field",
                "invalid_field"
            ]
        );
    }

    #[test]
    fn size_is_checked_before_anything_else() {
        let mut body = minimal().to_string().into_bytes();
        body.resize(MAX_JOB_BYTES, b' ');
        assert!(parse_job(&body, None).is_ok(), "exactly 64 KiB is accepted");
        body.push(b' ');
        let rejection = parse_job(&body, Some("m-1")).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::TooLarge);
        assert_eq!(rejection.job_id.as_deref(), Some("m-1"));
        assert!(
            rejection.message.contains("65537 bytes"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn the_body_job_id_wins_over_the_message_id() {
        let job = parse_job(minimal().to_string().as_bytes(), Some("m-1")).unwrap();
        assert_eq!(job.job_id.as_str(), "job-1");

        let mut no_id = minimal();
        no_id.as_object_mut().unwrap().remove("jobId");
        let job = parse_job(no_id.to_string().as_bytes(), Some("m-1")).unwrap();
        assert_eq!(job.job_id.as_str(), "m-1");

        let rejection = parse_job(no_id.to_string().as_bytes(), None).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::MissingField);
        assert!(rejection.message.starts_with("jobId is missing"));
        assert_eq!(
            parse_job(no_id.to_string().as_bytes(), Some(""))
                .unwrap_err()
                .kind,
            RejectionKind::MissingField
        );

        let rejection = parse_job(no_id.to_string().as_bytes(), Some("has space")).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::InvalidField);
        assert!(
            rejection.message.contains("message_id \"has space\""),
            "{}",
            rejection.message
        );
        assert_eq!(rejection.job_id, None);
    }

    #[test]
    fn the_rejection_names_the_best_known_job() {
        let bad_number = with("phoneNumber", "12".into()).to_string();
        assert_eq!(
            parse_job(bad_number.as_bytes(), Some("m-1"))
                .unwrap_err()
                .job_id
                .as_deref(),
            Some("job-1")
        );

        let mut bad_both = with("phoneNumber", "12".into());
        bad_both["jobId"] = "no spaces allowed".into();
        let rejection = parse_job(bad_both.to_string().as_bytes(), Some("m-1")).unwrap_err();
        assert!(
            rejection
                .message
                .starts_with("jobId \"no spaces allowed\" is not a valid job id")
        );
        assert_eq!(rejection.job_id.as_deref(), Some("m-1"));
        let rejection = parse_job(bad_both.to_string().as_bytes(), None).unwrap_err();
        assert_eq!(rejection.job_id, None);

        assert_eq!(
            parse_job(b"nope", Some("m-1"))
                .unwrap_err()
                .job_id
                .as_deref(),
            Some("m-1")
        );
        assert_eq!(parse_job(b"nope", Some("bad id")).unwrap_err().job_id, None);
    }

    #[test]
    fn job_ids_follow_the_documented_rules() {
        assert!(JobId::parse("a").is_ok());
        assert!(JobId::parse("crm:2026-03-01_lead.42").is_ok());
        assert!(JobId::parse(&"x".repeat(128)).is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(JobId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(JobId::parse("j-1").unwrap().to_string(), "j-1");
    }

    #[test]
    fn dialer_job_id_may_not_be_set_by_the_job() {
        let rejection = rejected(with("attributes", serde_json::json!({"dialerJobId": "x"})));
        assert_eq!(rejection.kind, RejectionKind::InvalidField);
        assert!(
            rejection.message.contains("dialerJobId"),
            "{}",
            rejection.message
        );
    }

    #[test]
    fn an_expiry_before_the_start_is_rejected() {
        let mut job = with("notBefore", "2026-03-01T10:00:00Z".into());
        job["expiresAt"] = "2026-03-01T11:00:00+01:00".into();
        assert_eq!(rejected(job).message, "expiresAt is not after notBefore");
    }

    #[test]
    fn the_call_request_carries_the_job_id() {
        let mut job = with("attributes", serde_json::json!({"crmLeadId": "L-1"}));
        job["callFromQueueId"] = QUEUE.into();
        job["priority"] = 3.into();
        let job = parse(job).unwrap();
        let request = crate::genesys::CreateCallRequest::for_job(&job);
        assert_eq!(request.phone_number, "+14155552671");
        assert_eq!(request.call_from_queue_id.as_deref(), Some(QUEUE));
        assert_eq!(request.priority, Some(3));
        assert_eq!(
            request.attributes,
            BTreeMap::from([
                ("crmLeadId".to_owned(), "L-1".to_owned()),
                ("dialerJobId".to_owned(), "job-1".to_owned()),
            ])
        );
        // The job keeps the attributes as sent, for the result event.
        assert_eq!(job.attributes.len(), 1);
    }

    #[test]
    fn not_before_has_a_horizon() {
        let now = OffsetDateTime::parse("2026-03-01T00:00:00Z", &Rfc3339).unwrap();
        let at = |t: &str| parse(with("notBefore", t.into())).unwrap();
        assert_eq!(at("2026-03-08T00:00:00Z").beyond_horizon(now), None);
        let far = at("2026-03-08T00:00:01Z").beyond_horizon(now).unwrap();
        assert!(
            far.starts_with("notBefore 2026-03-08T00:00:01Z is more than 7 days ahead"),
            "{far}"
        );
        assert!(at("9999-12-31T23:59:59Z").beyond_horizon(now).is_some());
        assert_eq!(parse(minimal()).unwrap().beyond_horizon(now), None);
    }

    #[test]
    fn warm_up_does_not_panic() {
        warm_up();
    }
}
