//! The `memory` backend: a map behind a mutex, for tests and benchmarks. It forgets everything
//! when the process exits, so the worker warns at start that it is for tests only, and
//! `dialer decisions` refuses it (see `docs/decisions.md`).
//!
//! Its own backend rather than SQLite `:memory:` because it sits on the hot path of every
//! throughput measurement: SQLite's statements (parse of the bound values, B-tree writes, the
//! transaction around a claim) cost about 20 µs of CPU per job, where the map costs under 1.
//! Every operation here has the meaning the SQL of the other two backends gives it, and the
//! claim-semantics suite (`suite.rs`) checks all three against each other.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use time::OffsetDateTime;

use super::{ClaimResult, JobState, StoredRecord, from_unix_ms, unix_ms};

/// One job's row, as the other backends store it.
struct Row {
    state: JobState,
    /// The `outcome` of a decided job's event, for [`MemoryStore::unknown_since`].
    outcome: Option<String>,
    updated_ms: i64,
    /// Order of writing, so that rows written in the same millisecond list in the order they
    /// were written (as the rowid orders them in SQLite).
    written: u64,
}

/// The map store. Every operation holds the lock for a few map operations, never across an
/// await, so a std mutex is the right one.
#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<Rows>,
}

#[derive(Default)]
struct Rows {
    by_job: HashMap<String, Row>,
    writes: u64,
}

impl Rows {
    fn write(&mut self, job_id: &str, state: JobState, outcome: Option<String>) {
        self.writes += 1;
        let row = Row {
            state,
            outcome,
            updated_ms: unix_ms(OffsetDateTime::now_utc()),
            written: self.writes,
        };
        match self.by_job.get_mut(job_id) {
            Some(existing) => *existing = row,
            None => {
                self.by_job.insert(job_id.to_owned(), row);
            }
        }
    }

    fn is_claimed_by(&self, job_id: &str, owner: &str) -> bool {
        matches!(
            self.by_job.get(job_id),
            Some(Row { state: JobState::Claimed { owner: holder }, .. }) if holder == owner
        )
    }
}

impl MemoryStore {
    fn rows(&self) -> std::sync::MutexGuard<'_, Rows> {
        // A panic while the lock was held left the map as it was after a whole operation
        // (each one changes one row in one assignment), so the data is still consistent.
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn claim_new(&self, job_id: &str, owner: &str) -> bool {
        let mut rows = self.rows();
        let unknown = !rows.by_job.contains_key(job_id);
        if unknown {
            let owner = owner.to_owned();
            rows.write(job_id, JobState::Claimed { owner }, None);
        }
        unknown
    }

    pub(super) fn try_claim(&self, job_id: &str, owner: &str) -> ClaimResult {
        let mut rows = self.rows();
        match rows.by_job.get(job_id).map(|row| &row.state) {
            None | Some(JobState::Waiting) => {
                let owner = owner.to_owned();
                rows.write(job_id, JobState::Claimed { owner }, None);
                ClaimResult::Claimed
            }
            Some(existing) => ClaimResult::Existing(existing.clone()),
        }
    }

    pub(super) fn decide(&self, job_id: &str, event: &[u8], outcome: Option<&str>) -> Vec<u8> {
        let mut rows = self.rows();
        if let Some(Row {
            state: JobState::Decided { event },
            ..
        }) = rows.by_job.get(job_id)
        {
            return event.clone();
        }
        let decided = JobState::Decided {
            event: event.to_vec(),
        };
        rows.write(job_id, decided, outcome.map(str::to_owned));
        event.to_vec()
    }

    pub(super) fn set_waiting(&self, job_id: &str, owner: &str) -> bool {
        let mut rows = self.rows();
        let claimed = rows.is_claimed_by(job_id, owner);
        if claimed {
            rows.write(job_id, JobState::Waiting, None);
        }
        claimed
    }

    pub(super) fn release(&self, job_id: &str, owner: &str) -> bool {
        let mut rows = self.rows();
        let claimed = rows.is_claimed_by(job_id, owner);
        if claimed {
            rows.by_job.remove(job_id);
        }
        claimed
    }

    pub(super) fn forget_decision(&self, job_id: &str) -> bool {
        let mut rows = self.rows();
        let decided = matches!(
            rows.by_job.get(job_id),
            Some(Row {
                state: JobState::Decided { .. },
                ..
            })
        );
        if decided {
            rows.by_job.remove(job_id);
        }
        decided
    }

    pub(super) fn record(&self, job_id: &str) -> Option<StoredRecord> {
        self.rows().by_job.get(job_id).map(|row| StoredRecord {
            job_id: job_id.to_owned(),
            state: row.state.clone(),
            updated_at: from_unix_ms(row.updated_ms),
        })
    }

    pub(super) fn unknown_since(&self, since: OffsetDateTime, limit: u32) -> Vec<StoredRecord> {
        let since = unix_ms(since);
        let rows = self.rows();
        let mut unknown: Vec<(&String, &Row)> = rows
            .by_job
            .iter()
            .filter(|(_, row)| row.outcome.as_deref() == Some("unknown") && row.updated_ms >= since)
            .collect();
        unknown.sort_unstable_by_key(|(_, row)| (row.updated_ms, row.written));
        unknown
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|(job_id, row)| StoredRecord {
                job_id: job_id.clone(),
                state: row.state.clone(),
                updated_at: from_unix_ms(row.updated_ms),
            })
            .collect()
    }

    pub(super) fn prune(&self, older_than: Duration) -> u64 {
        let cutoff = unix_ms(OffsetDateTime::now_utc())
            .saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        let mut rows = self.rows();
        let before = rows.by_job.len();
        rows.by_job.retain(|_, row| row.updated_ms >= cutoff);
        (before - rows.by_job.len()) as u64
    }
}
