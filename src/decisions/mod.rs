//! The decision store: which jobs are claimed, waiting for a delayed retry or decided, so that a
//! redelivered job re-publishes its decision instead of ringing somebody twice, and a job whose
//! worker died mid-call is recognised (see "Decisions are durable" in `docs/jobs-and-events.md`
//! and `docs/decisions.md`).
//!
//! One interface, [`DecisionStore`], over three backends that each write every operation once:
//! SQLite ([`sqlite`]: the embedded `file` store), PostgreSQL ([`postgres`]: shared by a fleet
//! of replicas) and a map ([`memory`]: tests and benchmarks). Every backend passes the same
//! claim-semantics suite (`suite.rs`), so they cannot drift apart.

mod memory;
mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;

pub use memory::MemoryStore;
pub use postgres::{PostgresSettings, PostgresStore, check_url as check_postgres_url};
pub use sqlite::SqliteStore;

use crate::config::{DecisionStoreKind, Secret};
use crate::metrics as m;

/// How often a worker renews its lease (PostgreSQL) or checks its store (file): the heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How long a lease lasts after its last renewal: three heartbeats, so one slow or lost renewal
/// does not make a live replica look gone, and a dead one is known gone within 15 s.
pub const LEASE_FOR: Duration = Duration::from_secs(15);

/// Where a job stands in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Claimed by `owner` (a worker instance id), no decision yet.
    Claimed {
        /// The worker instance that claimed the job.
        owner: String,
    },
    /// Sent to a delay queue to be retried; may be claimed again by its delayed copy.
    Waiting,
    /// Decided; `event` is the result event exactly as it was published.
    Decided {
        /// The serialised result event.
        event: Vec<u8>,
    },
}

impl JobState {
    /// `claimed`, `waiting` or `decided`, as stored.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Claimed { .. } => "claimed",
            Self::Waiting => "waiting",
            Self::Decided { .. } => "decided",
        }
    }
}

/// What [`DecisionStore::try_claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimResult {
    /// The job was unknown or waiting and is now claimed by the caller: go ahead and dial.
    Claimed,
    /// The job is already claimed or decided; its state is unchanged.
    Existing(JobState),
}

/// One job's record, for a person reconciling (`dialer decisions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The job id.
    pub job_id: String,
    /// Its state.
    pub state: JobState,
    /// When the record last changed.
    pub updated_at: OffsetDateTime,
}

/// A failure of the decision store. Every variant names the store (file, or the database with
/// its password hidden) and the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create the decision store directory {}: {source}", dir.display())]
    CreateDir {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The lock file could not be opened or locked (other than by being held elsewhere).
    #[error("cannot lock the decision store with {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another store (usually another worker process) has the directory open.
    #[error(
        "the decision store directory {} is in use{}: two workers must not share one state directory (lock file {})",
        dir.display(),
        holder.map(|pid| format!(" by process {pid}")).unwrap_or_default(),
        lock.display()
    )]
    InUse {
        /// The state directory.
        dir: PathBuf,
        /// The lock file held by the other store.
        lock: PathBuf,
        /// The process id written in the lock file by its holder, when readable.
        holder: Option<u32>,
    },
    /// The store could not be opened or prepared.
    #[error("cannot open the decision store {store}: {step} failed: {detail}")]
    Open {
        /// The store (`file:<path>`, `postgres://…` without password).
        store: String,
        /// What was being done.
        step: &'static str,
        /// Why.
        detail: String,
    },
    /// The store was written by a newer build with a different schema.
    #[error(
        "the decision store {store} has schema version {found}; this build knows version {known} and older only: upgrade this worker (or point it at another store)"
    )]
    Schema {
        /// The store.
        store: String,
        /// The version found.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A read or write failed.
    #[error("decision store {store}: {op} failed: {detail}")]
    Query {
        /// The store.
        store: String,
        /// The operation (`claim`, `decide`, …).
        op: &'static str,
        /// Why.
        detail: String,
    },
    /// The store did not answer in time.
    #[error("decision store {store}: {op} did not answer within {after:?}")]
    Timeout {
        /// The store.
        store: String,
        /// The operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The store's files are gone or were replaced under the running store.
    #[error("decision store {store}: {detail}")]
    Vanished {
        /// The store.
        store: String,
        /// What changed.
        detail: String,
    },
    /// A record does not make sense (edited by hand, or a bug).
    #[error("decision store {store}: the record of job {job_id:?} is malformed: {detail}")]
    Corrupt {
        /// The store.
        store: String,
        /// The job whose record is malformed.
        job_id: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl StoreError {
    /// Whether the store could not be reached at all (rather than refusing what was asked):
    /// worth retrying as it is.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::Open {
                    step: "connecting",
                    ..
                }
        )
    }
}

/// Claims, waiting marks and decisions, keyed by job id.
///
/// An enum over the three backends rather than a trait object: all are known here, and each
/// arm below is one line, so each operation's meaning is written once per backend.
///
/// The PostgreSQL arms box their futures: a pooled connection's query futures are about 4 KiB,
/// and inline they would make every operation's future (and so every job's, which holds
/// several) that large whichever store is configured, while the SQLite ones are small. A box
/// per operation is nothing beside a round trip to the database. The memory store's
/// operations are plain calls: nothing in them waits.
pub enum DecisionStore {
    /// The embedded store (`file`).
    Sqlite(SqliteStore),
    /// A map in this process (`memory`).
    Memory(MemoryStore),
    /// PostgreSQL, shared by a fleet.
    Postgres(PostgresStore),
}

impl DecisionStore {
    /// A store that forgets everything on exit: for tests and benchmarks only.
    pub fn memory() -> Self {
        Self::Memory(MemoryStore::default())
    }

    /// Opens (creating if needed) the embedded store in `state_dir`; see [`SqliteStore::open`].
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        SqliteStore::open(state_dir).map(Self::Sqlite)
    }

    /// Connects to PostgreSQL and creates or migrates the schema; see [`PostgresStore::connect`].
    pub async fn postgres(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let store = PostgresStore::connect(settings).await?;
        metrics::gauge!(m::DECISION_STORE_UP).set(1.0);
        Ok(Self::Postgres(store))
    }

    /// Opens the configured store: `file` in `state_dir`, `postgres` at `database_url`, or
    /// `memory`. With `read_only` (for `dialer decisions`), a file store is opened beside the
    /// worker that holds it, without its lock.
    pub async fn open_configured(
        kind: DecisionStoreKind,
        state_dir: &Path,
        database_url: Option<&Secret>,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        // Every operation's error series exists from the start, so the first failure is an
        // increase Prometheus can see (and the dashboard shows 0, not "no data").
        for op in OPERATIONS {
            metrics::counter!(m::DECISION_STORE_ERRORS_TOTAL, "op" => op).increment(0);
        }
        match kind {
            DecisionStoreKind::File if read_only => {
                SqliteStore::open_read_only(state_dir).map(Self::Sqlite)
            }
            DecisionStoreKind::File => Self::open(state_dir),
            DecisionStoreKind::Memory => Ok(Self::memory()),
            DecisionStoreKind::Postgres => {
                let url = database_url.ok_or_else(|| StoreError::Open {
                    store: "postgres".into(),
                    step: "reading DIALER_DATABASE_URL",
                    detail: "no URL given".into(),
                })?;
                let mut settings = PostgresSettings::new(url.clone());
                if read_only {
                    settings.pool_size = 1;
                }
                Self::postgres(&settings).await
            }
        }
    }

    /// Claims a job the store has no record of, for a new message: any record (a claim, a
    /// waiting mark, a decision) makes that message a duplicate, so whether it claimed is all
    /// the caller needs. One write, where reading the record and then claiming took two.
    pub async fn claim_new(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        counted(
            "claim_new",
            match self {
                Self::Sqlite(s) => s.claim_new(job_id, owner).await,
                Self::Memory(s) => Ok(s.claim_new(job_id, owner)),
                Self::Postgres(s) => Box::pin(s.claim_new(job_id, owner)).await,
            },
        )
    }

    /// Atomically: claims when the job is unknown or Waiting; otherwise returns the existing
    /// state unchanged.
    pub async fn try_claim(&self, job_id: &str, owner: &str) -> Result<ClaimResult, StoreError> {
        counted(
            "claim",
            match self {
                Self::Sqlite(s) => s.try_claim(job_id, owner).await,
                Self::Memory(s) => Ok(s.try_claim(job_id, owner)),
                Self::Postgres(s) => Box::pin(s.try_claim(job_id, owner)).await,
            },
        )
    }

    /// Records the decision, overwriting a claim or a waiting mark. Decisions never change: a
    /// second decide for an already decided job keeps the first decision. Returns the decision
    /// in force, which the caller publishes.
    pub async fn decide(&self, job_id: &str, event: &[u8]) -> Result<Vec<u8>, StoreError> {
        let outcome = outcome_of(event);
        counted(
            "decide",
            match self {
                Self::Sqlite(s) => s.decide(job_id, event, outcome.as_deref()).await,
                Self::Memory(s) => Ok(s.decide(job_id, event, outcome.as_deref())),
                Self::Postgres(s) => Box::pin(s.decide(job_id, event, outcome.as_deref())).await,
            },
        )
    }

    /// Claimed → Waiting, only if claimed by `owner`; otherwise does nothing.
    pub async fn set_waiting(&self, job_id: &str, owner: &str) -> Result<(), StoreError> {
        let changed = counted(
            "set_waiting",
            match self {
                Self::Sqlite(s) => s.set_waiting(job_id, owner).await,
                Self::Memory(s) => Ok(s.set_waiting(job_id, owner)),
                Self::Postgres(s) => Box::pin(s.set_waiting(job_id, owner)).await,
            },
        )?;
        if !changed {
            // Not an error: the caller no longer holds the claim, and the state it would have
            // overwritten (a decision, another owner's claim) is the one to keep.
            tracing::debug!(
                job_id,
                owner,
                "set_waiting: job not claimed by this owner; left as is"
            );
        }
        Ok(())
    }

    /// Removes a claim without a decision, only if claimed by `owner`; decided and waiting jobs
    /// are never released.
    pub async fn release(&self, job_id: &str, owner: &str) -> Result<(), StoreError> {
        let released = counted(
            "release",
            match self {
                Self::Sqlite(s) => s.release(job_id, owner).await,
                Self::Memory(s) => Ok(s.release(job_id, owner)),
                Self::Postgres(s) => Box::pin(s.release(job_id, owner)).await,
            },
        )?;
        if !released {
            tracing::debug!(
                job_id,
                owner,
                "release: job not claimed by this owner; left as is"
            );
        }
        Ok(())
    }

    /// Forgets a decided job so it can be claimed again: a person replaying it from the
    /// dead-letter queue has decided it should be tried once more. Returns whether a decision
    /// was removed; claims and waiting jobs are left alone.
    pub async fn forget_decision(&self, job_id: &str) -> Result<bool, StoreError> {
        counted(
            "forget_decision",
            match self {
                Self::Sqlite(s) => s.forget_decision(job_id).await,
                Self::Memory(s) => Ok(s.forget_decision(job_id)),
                Self::Postgres(s) => Box::pin(s.forget_decision(job_id)).await,
            },
        )
    }

    /// The job's state, or `None` when the store does not know it.
    pub async fn get(&self, job_id: &str) -> Result<Option<JobState>, StoreError> {
        Ok(self.record(job_id).await?.map(|record| record.state))
    }

    /// The job's whole record, or `None` when the store does not know it.
    pub async fn record(&self, job_id: &str) -> Result<Option<StoredRecord>, StoreError> {
        counted(
            "get",
            match self {
                Self::Sqlite(s) => s.record(job_id).await,
                Self::Memory(s) => Ok(s.record(job_id)),
                Self::Postgres(s) => Box::pin(s.record(job_id)).await,
            },
        )
    }

    /// Jobs decided `unknown` at or after `since`, oldest first, at most `limit`.
    pub async fn unknown_since(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        counted(
            "list_unknown",
            match self {
                Self::Sqlite(s) => s.unknown_since(since, limit).await,
                Self::Memory(s) => Ok(s.unknown_since(since, limit)),
                Self::Postgres(s) => Box::pin(s.unknown_since(since, limit)).await,
            },
        )
    }

    /// Deletes records, whatever their state, last changed more than `older_than` ago; returns
    /// how many. Claims go too: by then the broker has long stopped redelivering their jobs.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, StoreError> {
        counted(
            "prune",
            match self {
                Self::Sqlite(s) => s.prune(older_than).await,
                Self::Memory(s) => Ok(s.prune(older_than)),
                Self::Postgres(s) => Box::pin(s.prune(older_than)).await,
            },
        )
    }

    /// Whether the claim owner `owner` is still alive. `me` is the asking process's own owner
    /// id: a file or memory store has one process, so only `me` is alive; PostgreSQL reads the
    /// lease.
    pub async fn owner_alive(&self, owner: &str, me: &str) -> Result<bool, StoreError> {
        if owner == me {
            return Ok(true);
        }
        counted(
            "owner_alive",
            match self {
                Self::Sqlite(_) | Self::Memory(_) => Ok(false),
                Self::Postgres(s) => Box::pin(s.owner_alive(owner)).await,
            },
        )
    }

    /// Renews `owner`'s lease (PostgreSQL) or checks the store is still there (file): run every
    /// [`HEARTBEAT_EVERY`]. Also what a paused worker probes before it resumes.
    pub async fn heartbeat(&self, owner: &str) -> Result<(), StoreError> {
        let result = counted(
            "heartbeat",
            match self {
                Self::Sqlite(s) => s.ping().await,
                Self::Memory(_) => Ok(()),
                Self::Postgres(s) => Box::pin(s.renew_lease(owner)).await,
            },
        );
        if result.is_ok() {
            metrics::gauge!(m::DECISION_STORE_UP).set(1.0);
        }
        result
    }

    /// Gives up `owner`'s lease on a clean stop, so other replicas need not wait it out.
    pub async fn end_lease(&self, owner: &str) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(_) | Self::Memory(_) => Ok(()),
            Self::Postgres(s) => counted("end_lease", Box::pin(s.end_lease(owner)).await),
        }
    }

    /// Which store this is, for logs: `file:<path>`, `memory` or the database URL without its
    /// password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(s) => s.describe(),
            Self::Memory(_) => "memory".to_owned(),
            Self::Postgres(s) => s.describe(),
        }
    }
}

impl fmt::Debug for DecisionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DecisionStore")
            .field(&self.describe())
            .finish()
    }
}

/// The `op` label values of `dialer_decision_store_errors_total`: every operation [`counted`].
const OPERATIONS: [&str; 12] = [
    "claim",
    "claim_new",
    "decide",
    "end_lease",
    "forget_decision",
    "get",
    "heartbeat",
    "list_unknown",
    "owner_alive",
    "prune",
    "release",
    "set_waiting",
];

/// Counts a failed operation (`dialer_decision_store_errors_total{op}`) and marks the store down;
/// the next successful heartbeat marks it up again.
fn counted<T>(op: &'static str, result: Result<T, StoreError>) -> Result<T, StoreError> {
    if let Err(error) = &result {
        metrics::counter!(m::DECISION_STORE_ERRORS_TOTAL, "op" => op).increment(1);
        metrics::gauge!(m::DECISION_STORE_UP).set(0.0);
        tracing::debug!(op, %error, "decision store operation failed");
    }
    result
}

/// The `outcome` field of a result event, stored beside it so `unknown` jobs can be listed
/// without reading every event.
fn outcome_of(event: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Outcome {
        outcome: String,
    }
    serde_json::from_slice::<Outcome>(event)
        .ok()
        .map(|o| o.outcome)
}

/// Milliseconds since the Unix epoch: how both backends store and compare times.
fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The time a stored millisecond count stands for (the epoch for one out of range).
fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Checks a stored row against the states a job can be in.
fn parse_state(
    store: &str,
    job_id: &str,
    state: &str,
    owner: Option<String>,
    event: Option<Vec<u8>>,
) -> Result<JobState, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        store: store.to_owned(),
        job_id: job_id.to_owned(),
        detail,
    };
    match (state, owner, event) {
        ("claimed", Some(owner), _) => Ok(JobState::Claimed { owner }),
        ("waiting", _, _) => Ok(JobState::Waiting),
        ("decided", _, Some(event)) => Ok(JobState::Decided { event }),
        ("claimed", None, _) => Err(corrupt("claimed without an owner".into())),
        ("decided", _, None) => Err(corrupt("decided without an event".into())),
        (other, _, _) => Err(corrupt(format!("unknown state {other:?}"))),
    }
}

#[cfg(test)]
mod operation_tests {
    #[test]
    fn every_counted_operation_is_listed() {
        let source = include_str!("mod.rs");
        let mut counted: Vec<&str> = source
            .split("counted(")
            .skip(1)
            .filter_map(|call| call.trim_start().strip_prefix('"')?.split('"').next())
            .filter(|op| !op.is_empty() && op.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .collect();
        counted.sort_unstable();
        counted.dedup();
        assert_eq!(
            counted,
            super::OPERATIONS,
            "OPERATIONS must list every counted op"
        );
    }
}
