//! The Genesys Cloud user a job names: a UUID, checked when the job is parsed, so it is safe to
//! put in a URL path by the time the Genesys client uses it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A Genesys Cloud user id: always a UUID, so it is safe to put in a URL path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(uuid::Uuid);

impl UserId {
    /// Parses a UUID in its hyphenated form.
    pub fn parse(raw: &str) -> Result<Self, String> {
        parse_uuid(raw).map(Self)
    }
}

/// Parses the hyphenated UUID form only (what Genesys uses), with a message naming the value.
pub fn parse_uuid(raw: &str) -> Result<uuid::Uuid, String> {
    if raw.len() != 36 {
        return Err(format!(
            "{raw:?} is not a UUID (expected 8-4-4-4-12 hex digits)"
        ));
    }
    uuid::Uuid::try_parse(raw)
        .map_err(|_| format!("{raw:?} is not a UUID (expected 8-4-4-4-12 hex digits)"))
}

impl TryFrom<String> for UserId {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        Self::parse(&raw)
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.to_string()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}
