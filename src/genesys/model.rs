//! Wire types of the Genesys Cloud Platform API v2 that the dialer sends and reads
//! (schemas from the official SDKs; see `docs/genesys.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::job::UserId;
use crate::job::{DialJob, JOB_ID_ATTRIBUTE};

/// `CreateCallRequest`, flat, with only the fields a dialer for one agent uses.
/// There is no `from`/`to`/`type` object: the agent is the `{userId}` of the path.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCallRequest {
    /// The number to dial, E.164.
    pub phone_number: String,
    /// Caller id number shown to the callee.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_id: Option<String>,
    /// Caller id name shown to the callee.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_id_name: Option<String>,
    /// The queue to call on behalf of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_from_queue_id: Option<String>,
    /// Priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Attributes of the customer participant.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// User-to-user information.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uui_data: Option<String>,
    /// Conversation label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// External contact to associate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_contact_id: Option<String>,
}

impl CreateCallRequest {
    /// The place-call body for a job: its fields, with `dialerJobId` = the job id added to the
    /// attributes so the conversation can be traced back to the job.
    pub fn for_job(job: &DialJob) -> Self {
        let mut attributes = job.attributes.clone();
        attributes.insert(JOB_ID_ATTRIBUTE.to_owned(), job.job_id.as_str().to_owned());
        Self {
            phone_number: job.phone_number.e164().to_owned(),
            caller_id: job.caller_id.clone(),
            caller_id_name: job.caller_id_name.clone(),
            call_from_queue_id: job.call_from_queue_id.clone(),
            priority: job.priority,
            attributes,
            uui_data: job.uui_data.clone(),
            label: job.label.clone(),
            external_contact_id: job.external_contact_id.clone(),
        }
    }
}

/// `CreateCallResponse`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CreateCallResponse {
    /// The conversation id.
    pub id: String,
    /// Conversation name, when given.
    #[serde(default)]
    pub name: Option<String>,
    /// URI of the conversation.
    #[serde(default)]
    pub self_uri: Option<String>,
}

/// `ErrorBody`: what Genesys answers with an error status.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Human-readable message.
    #[serde(default)]
    pub message: Option<String>,
    /// Machine-readable code, e.g. `not.found`, `too.many.requests.retry.after`.
    #[serde(default)]
    pub code: Option<String>,
    /// The HTTP status again.
    #[serde(default)]
    pub status: Option<u16>,
    /// The correlation id again.
    #[serde(default)]
    pub context_id: Option<String>,
}

/// Body of `POST /api/v2/users/search` for one EXACT email.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UserSearchRequest<'a> {
    pub query: [UserSearchCriteria<'a>; 1],
    pub page_size: u32,
}

/// One search criterion.
#[derive(Debug, Serialize)]
pub(crate) struct UserSearchCriteria<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub fields: [&'static str; 1],
    pub value: &'a str,
}

/// `UsersSearchResponse`, the part the dialer reads.
#[derive(Debug, Deserialize)]
pub(crate) struct UsersSearchResponse {
    #[serde(default)]
    pub results: Vec<SearchedUser>,
}

/// A user in search results.
#[derive(Debug, Deserialize)]
pub(crate) struct SearchedUser {
    pub id: String,
    #[serde(default)]
    pub state: Option<String>,
}

/// Token endpoint answer.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub token_type: Option<String>,
    /// Any JSON number (or digits in a string): read by `token::token_lifetime`, which clamps
    /// it, so an absurd value is neither an error nor an overflow.
    pub expires_in: serde_json::Value,
}

/// Token endpoint error answer.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TokenErrorBody {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_call_request_is_flat_and_omits_what_is_unset() {
        let request = CreateCallRequest {
            phone_number: "+14155552671".into(),
            attributes: BTreeMap::from([("dialerJobId".into(), "j1".into())]),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({"phoneNumber": "+14155552671", "attributes": {"dialerJobId": "j1"}})
        );
    }

    #[test]
    fn user_ids_must_be_uuids() {
        assert!(UserId::parse("8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").is_ok());
        for bad in [
            "",
            "../users",
            "8f9a1c2e3b4d4e5f8a9b0c1d2e3f4a5b",
            "8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b/x",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad}");
        }
    }
}
