//! The result event (`docs/jobs-and-events.md` §3): the one terminal message per job, and the outcomes that decide
//! where the job goes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::job::Rejection;

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Genesys accepted the call (2xx). The job is acked.
    Placed,
    /// The job is invalid; no call was attempted. Dead-lettered.
    Rejected,
    /// Genesys refused for good, or transient failures outlasted the attempts. Dead-lettered.
    Failed,
    /// The request may have reached Genesys but no answer came; not retried, so nobody is rung
    /// twice. Dead-lettered, for a person to reconcile.
    Unknown,
    /// `expiresAt` passed before the call could be placed. The job is acked.
    Expired,
    /// A second message with a `jobId` already claimed or decided; answers that message, not
    /// the job. Acked.
    Duplicate,
}

impl Outcome {
    /// Every outcome, in the order `docs/jobs-and-events.md` §4 lists them.
    pub const ALL: [Outcome; 6] = [
        Self::Placed,
        Self::Rejected,
        Self::Failed,
        Self::Unknown,
        Self::Expired,
        Self::Duplicate,
    ];

    /// The position in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The wire name, e.g. `placed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::Duplicate => "duplicate",
        }
    }

    /// The routing key of the event on the reply exchange: `dial.<outcome>`.
    pub fn routing_key(self) -> String {
        format!("dial.{}", self.as_str())
    }

    /// Whether the job goes to the dead-letter queue (`rejected`, `failed`, `unknown`) rather
    /// than being acked.
    pub fn goes_to_dead_letter(self) -> bool {
        matches!(self, Self::Rejected | Self::Failed | Self::Unknown)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job did not end `placed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventError {
    /// A short snake_case name, e.g. `invalid_field`, `refused`, `timeout`.
    pub kind: String,
    /// One line for a person.
    pub message: String,
    /// The HTTP status Genesys answered with, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Genesys's error code, e.g. `not.found`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Genesys's `ININ-Correlation-Id`, for its support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl EventError {
    /// An error the worker itself decided on (expired, duplicate, interrupted, …).
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            message: message.into(),
            http_status: None,
            code: None,
            correlation_id: None,
        }
    }

    /// The error of a `rejected` event for a job that did not parse.
    pub fn from_rejection(rejection: &Rejection) -> Self {
        Self {
            kind: rejection.kind.as_str().to_owned(),
            message: rejection.message.clone(),
            http_status: None,
            code: None,
            correlation_id: None,
        }
    }
}

/// The result event (`docs/jobs-and-events.md` §3), published once per job before the job is acked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultEvent {
    /// The job's id; `null` (always written) when the body could not be read and there was no
    /// valid AMQP `message_id`.
    pub job_id: Option<String>,
    /// How the job ended.
    pub outcome: Outcome,
    /// The Genesys conversation id (`placed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// The resolved Genesys user id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_user_id: Option<String>,
    /// The normalised E.164 number, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// Place-call requests sent for this job, across redeliveries and delays.
    pub attempts: u32,
    /// Why the job did not end `placed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// The job's attributes, as it sent them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, String>>,
    /// When the worker received the job.
    #[serde(with = "rfc3339_utc")]
    pub received_at: OffsetDateTime,
    /// When the worker decided.
    #[serde(with = "rfc3339_utc")]
    pub completed_at: OffsetDateTime,
    /// Which worker instance decided.
    pub worker: String,
}

impl ResultEvent {
    /// The event as JSON, the message body.
    pub fn to_json(&self) -> Vec<u8> {
        // Every field is a string, a number, an enum or a map with string keys, and the times
        // are clamped to what RFC 3339 can write, so this cannot fail; if it ever did, an empty
        // body fails the consumer's parse loudly rather than taking the worker down.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an event (unknown fields are ignored, so newer events still read).
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// RFC 3339 times, written in UTC. RFC 3339 cannot write an offset with seconds nor a year
/// outside 0000–9999, which `time` can hold; converting to UTC and clamping the year (only a
/// broken clock gets there) means an event always serialises.
mod rfc3339_utc {
    use serde::{Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::macros::datetime;
    use time::{OffsetDateTime, UtcOffset};

    const EARLIEST: OffsetDateTime = datetime!(0000-01-01 00:00:00 UTC);
    const LATEST: OffsetDateTime = datetime!(9999-12-31 23:59:59.999_999_999 UTC);

    pub(super) fn serialize<S: Serializer>(
        at: &OffsetDateTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let utc = (*at).clamp(EARLIEST, LATEST).to_offset(UtcOffset::UTC);
        let text = utc.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<OffsetDateTime, D::Error> {
        time::serde::rfc3339::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_index_is_its_place_in_all() {
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
    }
    use time::macros::datetime;

    fn placed() -> ResultEvent {
        ResultEvent {
            job_id: Some("job-1".into()),
            outcome: Outcome::Placed,
            conversation_id: Some("2f0e8a34-5b6c-4d7e-8f90-a1b2c3d4e5f6".into()),
            agent_user_id: Some("8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
            phone_number: Some("+14155552671".into()),
            attempts: 1,
            error: None,
            attributes: Some(BTreeMap::from([("crmLeadId".into(), "L-1".into())])),
            received_at: datetime!(2026-03-01 09:30:00.25 UTC),
            completed_at: datetime!(2026-03-01 09:30:01 UTC),
            worker: "dialer-7f9c-1".into(),
        }
    }

    fn unreadable() -> ResultEvent {
        ResultEvent {
            job_id: None,
            outcome: Outcome::Rejected,
            conversation_id: None,
            agent_user_id: None,
            phone_number: None,
            attempts: 0,
            error: Some(EventError {
                kind: "not_json".into(),
                message: "the job is not JSON: expected value at line 1 column 1".into(),
                http_status: None,
                code: None,
                correlation_id: None,
            }),
            attributes: None,
            received_at: datetime!(2026-03-01 09:30 UTC),
            completed_at: datetime!(2026-03-01 09:30 UTC),
            worker: "dialer-7f9c-1".into(),
        }
    }

    #[test]
    fn events_round_trip() {
        for event in [placed(), unreadable()] {
            assert_eq!(ResultEvent::from_json(&event.to_json()).unwrap(), event);
        }
    }

    #[test]
    fn the_wire_form_is_camel_case_with_rfc3339_times() {
        let json: serde_json::Value = serde_json::from_slice(&placed().to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "jobId": "job-1",
                "outcome": "placed",
                "conversationId": "2f0e8a34-5b6c-4d7e-8f90-a1b2c3d4e5f6",
                "agentUserId": "8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
                "phoneNumber": "+14155552671",
                "attempts": 1,
                "attributes": {"crmLeadId": "L-1"},
                "receivedAt": "2026-03-01T09:30:00.25Z",
                "completedAt": "2026-03-01T09:30:01Z",
                "worker": "dialer-7f9c-1",
            })
        );
    }

    #[test]
    fn an_unknown_job_id_is_null_and_unset_fields_are_left_out() {
        let json: serde_json::Value = serde_json::from_slice(&unreadable().to_json()).unwrap();
        let object = json.as_object().unwrap();
        assert_eq!(object.get("jobId"), Some(&serde_json::Value::Null));
        for absent in ["conversationId", "agentUserId", "phoneNumber", "attributes"] {
            assert!(!object.contains_key(absent), "{absent}");
        }
        assert_eq!(
            json["error"],
            serde_json::json!({
                "kind": "not_json",
                "message": "the job is not JSON: expected value at line 1 column 1",
            })
        );
    }

    #[test]
    fn times_are_written_in_utc_and_always_serialise() {
        let mut event = placed();
        event.received_at = datetime!(2026-03-01 10:30:00 +01:00);
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(json["receivedAt"], "2026-03-01T09:30:00Z");
        // An offset with seconds, and a year RFC 3339 cannot write.
        event.received_at = datetime!(2026-03-01 10:30:00 +01:00:30);
        event.completed_at = datetime!(-0001-01-01 00:00 UTC);
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(json["receivedAt"], "2026-03-01T09:29:30Z");
        assert_eq!(json["completedAt"], "0000-01-01T00:00:00Z");
    }

    #[test]
    fn outcomes_have_routing_keys_and_destinations() {
        let keys: Vec<_> = Outcome::ALL.iter().map(|o| o.routing_key()).collect();
        assert_eq!(
            keys,
            [
                "dial.placed",
                "dial.rejected",
                "dial.failed",
                "dial.unknown",
                "dial.expired",
                "dial.duplicate"
            ]
        );
        let dead: Vec<_> = Outcome::ALL
            .into_iter()
            .filter(|o| o.goes_to_dead_letter())
            .collect();
        assert_eq!(dead, [Outcome::Rejected, Outcome::Failed, Outcome::Unknown]);
        for outcome in Outcome::ALL {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
            assert_eq!(outcome.to_string(), outcome.as_str());
        }
    }

    #[test]
    fn errors_come_from_rejections() {
        let rejection = crate::job::parse_job(b"[]", Some("m-1")).unwrap_err();
        let error = EventError::from_rejection(&rejection);
        assert_eq!(error.kind, "not_an_object");
        assert_eq!(error.message, rejection.message);
    }
}
