//! `dialer decisions`: one job's recorded decision, and the jobs decided `unknown`, read from
//! whichever decision store is configured, for a person reconciling calls that may have been
//! placed.

use std::io::Write as _;

use anyhow::Context as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{DecisionStoreKind, Secret};
use crate::decisions::{DecisionStore, JobState, StoredRecord};
use crate::telemetry::mask_phone;

/// What to print.
#[derive(Clone, Debug)]
pub enum Action {
    /// One job's record.
    Show(String),
    /// Jobs decided `unknown` at or after a time, at most so many.
    Unknown {
        /// Since when.
        since: OffsetDateTime,
        /// At most this many.
        limit: u32,
    },
}

/// Where the store is.
#[derive(Clone, Debug)]
pub struct StoreLocation {
    /// Which store.
    pub kind: DecisionStoreKind,
    /// The embedded store's directory.
    pub state_dir: std::path::PathBuf,
    /// The shared store's URL.
    pub database_url: Option<Secret>,
}

/// Runs `action`, printing JSON to stdout; phone numbers are masked unless `show_phone`.
pub async fn run(store: StoreLocation, action: Action, show_phone: bool) -> anyhow::Result<()> {
    if store.kind == DecisionStoreKind::Memory {
        anyhow::bail!(
            "DIALER_DECISIONS=memory keeps nothing outside the worker's process; there is nothing to read"
        );
    }
    let opened = DecisionStore::open_configured(
        store.kind,
        &store.state_dir,
        store.database_url.as_ref(),
        true,
    )
    .await
    .context("cannot open the decision store")?;
    let mut out = std::io::stdout().lock();
    match action {
        Action::Show(job_id) => {
            let record = opened
                .record(&job_id)
                .await?
                .with_context(|| format!("no record of job {job_id:?} in {}", opened.describe()))?;
            let json = serde_json::to_string_pretty(&to_json(&record, show_phone))?;
            writeln!(out, "{json}")?;
        }
        Action::Unknown { since, limit } => {
            let records = opened.unknown_since(since, limit).await?;
            for record in &records {
                writeln!(out, "{}", to_json(record, show_phone))?;
            }
            eprintln!(
                "{} job(s) decided unknown since {} in {}{}",
                records.len(),
                since.format(&Rfc3339).unwrap_or_default(),
                opened.describe(),
                if records.len() as u64 == u64::from(limit) {
                    " (limit reached: use --limit or a later --since)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Parses `--since`; the default is the retention period (7 days).
pub fn parse_since(raw: Option<&str>) -> Result<OffsetDateTime, String> {
    match raw.map(str::trim) {
        None | Some("") => Ok(OffsetDateTime::now_utc() - time::Duration::days(7)),
        Some(text) => OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
            format!(
                "--since {text:?} is not an RFC 3339 time ({e}); expected e.g. 2026-11-30T00:00:00Z"
            )
        }),
    }
}

fn to_json(record: &StoredRecord, show_phone: bool) -> serde_json::Value {
    let mut json = serde_json::json!({
        "jobId": record.job_id,
        "state": record.state.name(),
        "updatedAt": record.updated_at.format(&Rfc3339).unwrap_or_default(),
    });
    match &record.state {
        JobState::Claimed { owner } => json["owner"] = owner.clone().into(),
        JobState::Waiting => {}
        JobState::Decided { event } => {
            let mut event = serde_json::from_slice::<serde_json::Value>(event)
                .unwrap_or_else(|_| String::from_utf8_lossy(event).into_owned().into());
            if !show_phone && let Some(phone) = event.get("phoneNumber").and_then(|p| p.as_str()) {
                event["phoneNumber"] = mask_phone(phone).into();
            }
            json["event"] = event;
        }
    }
    json
}
