//! The decision store (contract §4, "Decisions are durable"): which jobs are claimed, waiting for
//! a delayed retry or decided, so that a redelivered job re-publishes its decision instead of
//! ringing somebody twice, and a job whose worker died mid-call is recognised.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Name of the database file inside the state directory.
const DB_FILE: &str = "decisions.sqlite3";
/// Name of the lock file inside the state directory; held exclusively while a store is open.
const LOCK_FILE: &str = "LOCK";
/// The schema this build writes (`PRAGMA user_version`). A file with a higher number was written
/// by a newer build and is refused rather than misread.
const SCHEMA_VERSION: i64 = 1;
/// How long a statement waits for a lock held by another connection to the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows deleted per transaction by `prune`: small enough that claims waiting for the connection
/// are held up for milliseconds, not for the whole sweep.
const PRUNE_BATCH: i64 = 1000;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS decisions (
        job_id     TEXT PRIMARY KEY NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('claimed', 'waiting', 'decided')),
        owner      TEXT,
        event      BLOB,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS decisions_updated_at ON decisions (updated_at);
";

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

/// What [`DecisionStore::try_claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimResult {
    /// The job was unknown or waiting and is now claimed by the caller: go ahead and dial.
    Claimed,
    /// The job is already claimed or decided; its state is unchanged.
    Existing(JobState),
}

/// A failure of the decision store. Every variant names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create the decision store directory {}: {source}", dir.display())]
    CreateDir {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The lock file could not be opened or locked (other than by being held elsewhere).
    #[error("cannot lock the decision store with {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: io::Error,
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
    /// The database file could not be opened or prepared.
    #[error("cannot open the decision store {}: {step} failed: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Why.
        source: rusqlite::Error,
    },
    /// The database file was written by a newer build with a different schema.
    #[error(
        "the decision store {} has schema version {found}; this build knows version {SCHEMA_VERSION} only",
        path.display()
    )]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
    },
    /// A read or write failed.
    #[error("decision store {}: {op} failed: {source}", path.display())]
    Query {
        /// The database file.
        path: PathBuf,
        /// The operation (`claim`, `decide`, …).
        op: &'static str,
        /// Why.
        source: rusqlite::Error,
    },
    /// A record in the file does not make sense (edited by hand, or a bug).
    #[error("decision store {}: the record of job {job_id:?} is malformed: {detail}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The job whose record is malformed.
        job_id: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The blocking task running the operation did not complete (it panicked, or the runtime
    /// is shutting down).
    #[error("decision store {}: {op} did not complete: {source}", path.display())]
    Task {
        /// The database file.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// Why.
        source: tokio::task::JoinError,
    },
}

/// Claims, waiting marks and decisions, keyed by job id; either embedded on disk or in memory.
///
/// File-store operations run to completion in the blocking pool even when the future awaiting
/// them is dropped: a cancelled `try_claim` may still have claimed the job.
pub struct DecisionStore {
    backend: Backend,
}

// A private enum rather than a trait: there are two backends, both known here.
enum Backend {
    // A std Mutex: held for a map operation only, never across an await.
    Memory(Mutex<HashMap<String, Record>>),
    // Arc: `spawn_blocking` needs a `'static` handle on the connection.
    File(Arc<FileStore>),
}

struct Record {
    state: JobState,
    updated_at: i64,
}

struct FileStore {
    // rusqlite is blocking, so every use goes through `spawn_blocking`; one connection is
    // enough because SQLite admits one writer at a time anyway, and a std Mutex (not tokio's)
    // because it is locked inside those blocking closures, never across an await.
    // Declared before `_lock` so that the database is closed before the lock is released.
    conn: Mutex<Connection>,
    path: PathBuf,
    // Held, never read: the exclusive lock on `<dir>/LOCK` lives as long as this file handle.
    _lock: File,
}

/// A row as stored, before it is checked.
type RawRow = (String, Option<String>, Option<Vec<u8>>);

impl DecisionStore {
    /// A store that forgets everything on exit: for tests and benchmarks only.
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory(Mutex::new(HashMap::new())),
        }
    }

    /// Opens (creating if needed) the embedded store `decisions.sqlite3` in `state_dir`,
    /// creating the directory too. Fails with [`StoreError::InUse`] while another store has
    /// the same directory open.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            dir: state_dir.to_path_buf(),
            source,
        })?;
        // Taken before the database is touched: two workers deciding the same jobs from one
        // file would each think the other's claims were crashed calls.
        let lock = lock_dir(state_dir)?;
        let path = state_dir.join(DB_FILE);
        let conn = open_db(&path)?;
        tracing::debug!(path = %path.display(), "decision store opened");
        Ok(Self {
            backend: Backend::File(Arc::new(FileStore {
                conn: Mutex::new(conn),
                path,
                _lock: lock,
            })),
        })
    }

    /// Atomically: claims when the job is unknown or Waiting; otherwise returns the existing
    /// state unchanged.
    pub async fn try_claim(&self, job_id: &str, owner: &str) -> Result<ClaimResult, StoreError> {
        let now = now_ms();
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                match map.get(job_id) {
                    Some(Record {
                        state: state @ (JobState::Claimed { .. } | JobState::Decided { .. }),
                        ..
                    }) => Ok(ClaimResult::Existing(state.clone())),
                    None
                    | Some(Record {
                        state: JobState::Waiting,
                        ..
                    }) => {
                        let state = JobState::Claimed {
                            owner: owner.to_owned(),
                        };
                        map.insert(
                            job_id.to_owned(),
                            Record {
                                state,
                                updated_at: now,
                            },
                        );
                        Ok(ClaimResult::Claimed)
                    }
                }
            }
            Backend::File(file) => {
                let (id, owner) = (job_id.to_owned(), owner.to_owned());
                let existing = file
                    .run("claim", move |conn| {
                        // The upsert and the read-back share one transaction, so the state
                        // returned is the one that made the claim fail.
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let claimed = tx
                            .prepare_cached(
                                "INSERT INTO decisions (job_id, state, owner, event, updated_at)
                                 VALUES (?1, 'claimed', ?2, NULL, ?3)
                                 ON CONFLICT (job_id) DO UPDATE
                                 SET state = 'claimed', owner = excluded.owner, event = NULL,
                                     updated_at = excluded.updated_at
                                 WHERE decisions.state = 'waiting'",
                            )?
                            .execute(params![id, owner, now])?
                            == 1;
                        let existing = if claimed { None } else { read_row(&tx, &id)? };
                        tx.commit()?;
                        Ok(existing)
                    })
                    .await?;
                match existing {
                    None => Ok(ClaimResult::Claimed),
                    Some(row) => Ok(ClaimResult::Existing(file.parse(job_id, row)?)),
                }
            }
        }
    }

    /// Records the decision, overwriting a claim or a waiting mark. Decisions never change: a
    /// second decide for an already decided job keeps the first decision. Returns the decision
    /// in force, which the caller publishes.
    pub async fn decide(&self, job_id: &str, event: &[u8]) -> Result<Vec<u8>, StoreError> {
        let now = now_ms();
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                if let Some(Record {
                    state: JobState::Decided { event },
                    ..
                }) = map.get(job_id)
                {
                    return Ok(event.clone());
                }
                let state = JobState::Decided {
                    event: event.to_vec(),
                };
                map.insert(
                    job_id.to_owned(),
                    Record {
                        state,
                        updated_at: now,
                    },
                );
                Ok(event.to_vec())
            }
            Backend::File(file) => {
                let (id, event) = (job_id.to_owned(), event.to_vec());
                let in_force = file
                    .run("decide", move |conn| {
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        // `owner` is left as it was: who claimed the job stays visible to
                        // whoever inspects the file.
                        tx.prepare_cached(
                            "INSERT INTO decisions (job_id, state, owner, event, updated_at)
                             VALUES (?1, 'decided', NULL, ?2, ?3)
                             ON CONFLICT (job_id) DO UPDATE
                             SET state = 'decided', event = excluded.event,
                                 updated_at = excluded.updated_at
                             WHERE decisions.state <> 'decided'",
                        )?
                        .execute(params![id, event, now])?;
                        let row = read_row(&tx, &id)?;
                        tx.commit()?;
                        Ok(row)
                    })
                    .await?;
                match in_force.map(|row| file.parse(job_id, row)).transpose()? {
                    Some(JobState::Decided { event }) => Ok(event),
                    other => Err(file.corrupt(
                        job_id,
                        format!("expected a decision after deciding, found {other:?}"),
                    )),
                }
            }
        }
    }

    /// Claimed → Waiting, only if claimed by `owner`; otherwise does nothing.
    pub async fn set_waiting(&self, job_id: &str, owner: &str) -> Result<(), StoreError> {
        let now = now_ms();
        let changed = match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                match map.get_mut(job_id) {
                    Some(record) if is_claimed_by(&record.state, owner) => {
                        *record = Record {
                            state: JobState::Waiting,
                            updated_at: now,
                        };
                        true
                    }
                    _ => false,
                }
            }
            Backend::File(file) => {
                let (id, owner) = (job_id.to_owned(), owner.to_owned());
                file.run("set_waiting", move |conn| {
                    let n = conn
                        .prepare_cached(
                            "UPDATE decisions SET state = 'waiting', owner = NULL, updated_at = ?3
                             WHERE job_id = ?1 AND state = 'claimed' AND owner = ?2",
                        )?
                        .execute(params![id, owner, now])?;
                    Ok(n > 0)
                })
                .await?
            }
        };
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
        let released = match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                let ours = map
                    .get(job_id)
                    .is_some_and(|record| is_claimed_by(&record.state, owner));
                if ours {
                    map.remove(job_id);
                }
                ours
            }
            Backend::File(file) => {
                let (id, owner) = (job_id.to_owned(), owner.to_owned());
                file.run("release", move |conn| {
                    let n = conn
                        .prepare_cached(
                            "DELETE FROM decisions
                             WHERE job_id = ?1 AND state = 'claimed' AND owner = ?2",
                        )?
                        .execute(params![id, owner])?;
                    Ok(n > 0)
                })
                .await?
            }
        };
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
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                let decided = map
                    .get(job_id)
                    .is_some_and(|record| matches!(record.state, JobState::Decided { .. }));
                if decided {
                    map.remove(job_id);
                }
                Ok(decided)
            }
            Backend::File(file) => {
                let id = job_id.to_owned();
                file.run("forget_decision", move |conn| {
                    let n = conn
                        .prepare_cached(
                            "DELETE FROM decisions WHERE job_id = ?1 AND state = 'decided'",
                        )?
                        .execute(params![id])?;
                    Ok(n > 0)
                })
                .await
            }
        }
    }

    /// The job's state, or `None` when the store does not know it.
    pub async fn get(&self, job_id: &str) -> Result<Option<JobState>, StoreError> {
        match &self.backend {
            Backend::Memory(map) => Ok(lock(map).get(job_id).map(|record| record.state.clone())),
            Backend::File(file) => {
                let id = job_id.to_owned();
                let row = file.run("get", move |conn| read_row(conn, &id)).await?;
                row.map(|row| file.parse(job_id, row)).transpose()
            }
        }
    }

    /// Deletes records, whatever their state, last changed more than `older_than` ago; returns
    /// how many. Claims go too: by then the broker has long stopped redelivering their jobs.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, StoreError> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = lock(map);
                let before = map.len();
                map.retain(|_, record| record.updated_at >= cutoff);
                Ok((before - map.len()) as u64)
            }
            Backend::File(file) => {
                let mut total = 0;
                // In batches, each its own transaction and its own trip to the blocking pool,
                // so that claims and decisions are served between them.
                loop {
                    let deleted = file
                        .run("prune", move |conn| {
                            conn.prepare_cached(
                                "DELETE FROM decisions WHERE rowid IN
                                 (SELECT rowid FROM decisions WHERE updated_at < ?1 LIMIT ?2)",
                            )?
                            .execute(params![cutoff, PRUNE_BATCH])
                        })
                        .await? as u64;
                    total += deleted;
                    if deleted < PRUNE_BATCH as u64 {
                        return Ok(total);
                    }
                }
            }
        }
    }

    /// Which kind of store this is, for logs: `file:<path>` or `memory`.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Memory(_) => "memory".to_owned(),
            Backend::File(file) => format!("file:{}", file.path.display()),
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

impl FileStore {
    /// Runs `f` on the connection in the blocking pool.
    async fn run<T, F>(self: &Arc<Self>, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let store = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || f(&mut lock(&store.conn))).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(StoreError::Query {
                path: self.path.clone(),
                op,
                source,
            }),
            Err(source) => Err(StoreError::Task {
                path: self.path.clone(),
                op,
                source,
            }),
        }
    }

    /// Checks a stored row against the states a job can be in.
    fn parse(&self, job_id: &str, (state, owner, event): RawRow) -> Result<JobState, StoreError> {
        match (state.as_str(), owner, event) {
            ("claimed", Some(owner), _) => Ok(JobState::Claimed { owner }),
            ("waiting", _, _) => Ok(JobState::Waiting),
            ("decided", _, Some(event)) => Ok(JobState::Decided { event }),
            ("claimed", None, _) => Err(self.corrupt(job_id, "claimed without an owner".into())),
            ("decided", _, None) => Err(self.corrupt(job_id, "decided without an event".into())),
            (other, _, _) => Err(self.corrupt(job_id, format!("unknown state {other:?}"))),
        }
    }

    fn corrupt(&self, job_id: &str, detail: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            job_id: job_id.to_owned(),
            detail,
        }
    }
}

/// Takes the exclusive lock on `<dir>/LOCK` and writes this process's id into it, so that the
/// next process to try can say who holds it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let lock_error = |source| StoreError::Lock {
        path: path.clone(),
        source,
    };
    // Not truncated on open: the file may belong to a running process whose pid we want to read.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(lock_error)?;
    // `flock` on Unix, `LockFileEx` on Windows: released by the OS when the process dies, so a
    // crashed worker never leaves a stale lock behind.
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let holder = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StoreError::InUse {
                dir: dir.to_path_buf(),
                lock: path,
                holder,
            });
        }
        Err(TryLockError::Error(source)) => return Err(lock_error(source)),
    }
    // The pid is for the error message above only; failing to write it costs nothing else.
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()));
    if let Err(error) = written {
        tracing::debug!(path = %path.display(), %error, "cannot write the pid into the lock file");
    }
    Ok(file)
}

/// Opens the database file and prepares it: pragmas, then the schema.
fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let open_error = |step| {
        let path = path.to_path_buf();
        move |source| StoreError::Open { path, step, source }
    };
    let mut conn = Connection::open(path).map_err(open_error("opening the file"))?;
    // Only the lock-file holder uses this file, but a person inspecting it with the sqlite3
    // shell, or a backup tool, may hold a read lock for a moment: wait rather than fail.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(open_error("setting busy_timeout"))?;
    // WAL: a commit is one append and one fsync, and readers do not block the writer.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error("switching to WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some network file systems cannot share memory between processes, which WAL needs.
        // The rollback journal with synchronous=FULL is just as durable, only slower.
        tracing::warn!(path = %path.display(), mode, "decision store: WAL unavailable, using the rollback journal");
    }
    // FULL, not WAL's usual NORMAL: every commit is fsynced before it returns. A decision is
    // acknowledged to the broker right after it is recorded, so it must survive a power loss,
    // not just a crash of this process; NORMAL could lose the last commits to a power cut and
    // then the redelivered job would be dialled again.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_error("setting synchronous=FULL"))?;

    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_error("starting the schema transaction"))?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_error("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            path: path.to_path_buf(),
            found,
        });
    }
    tx.execute_batch(SCHEMA)
        .map_err(open_error("creating the schema"))?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(open_error("writing the schema version"))?;
    tx.commit().map_err(open_error("committing the schema"))?;
    Ok(conn)
}

fn read_row(conn: &Connection, job_id: &str) -> rusqlite::Result<Option<RawRow>> {
    conn.prepare_cached("SELECT state, owner, event FROM decisions WHERE job_id = ?1")?
        .query_row([job_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()
}

fn is_claimed_by(state: &JobState, owner: &str) -> bool {
    matches!(state, JobState::Claimed { owner: o } if o == owner)
}

/// Locks a std Mutex, ignoring poisoning: a panic inside cannot leave either backend half
/// written (the map is changed by single inserts and removals; an SQLite transaction left open
/// by a panic is rolled back when it is dropped), so the data is still good.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wall-clock milliseconds since the Unix epoch: stored, so it must mean the same after a restart.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let name = format!(
                "dialer-decisions-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            Self(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Both backends. The file store's directory goes when its `TempDir` drops, which must
    /// come after the store: bindings drop in reverse order, hence `for (_dir, store)`.
    fn backends() -> Vec<(Option<TempDir>, DecisionStore)> {
        let dir = TempDir::new();
        let file = DecisionStore::open(&dir.0).unwrap();
        vec![(None, DecisionStore::memory()), (Some(dir), file)]
    }

    fn claimed(owner: &str) -> ClaimResult {
        ClaimResult::Existing(JobState::Claimed {
            owner: owner.into(),
        })
    }

    #[tokio::test]
    async fn claim_fresh_then_again() {
        for (_dir, store) in backends() {
            let what = store.describe();
            assert_eq!(
                store.try_claim("j1", "w1").await.unwrap(),
                ClaimResult::Claimed,
                "{what}"
            );
            assert_eq!(
                store.try_claim("j1", "w2").await.unwrap(),
                claimed("w1"),
                "{what}"
            );
            assert_eq!(
                store.try_claim("j1", "w1").await.unwrap(),
                claimed("w1"),
                "{what}"
            );
            assert_eq!(store.get("nope").await.unwrap(), None, "{what}");
        }
    }

    #[tokio::test]
    async fn a_forgotten_decision_can_be_claimed_again_and_claims_are_not_forgotten() {
        for (_dir, store) in backends() {
            let what = store.describe();
            store.try_claim("j1", "w1").await.unwrap();
            assert!(
                !store.forget_decision("j1").await.unwrap(),
                "{what}: a claim stays"
            );
            store.decide("j1", b"failed").await.unwrap();
            assert!(store.forget_decision("j1").await.unwrap(), "{what}");
            assert_eq!(store.get("j1").await.unwrap(), None, "{what}");
            assert_eq!(
                store.try_claim("j1", "w2").await.unwrap(),
                ClaimResult::Claimed,
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn waiting_job_can_be_claimed_again() {
        for (_dir, store) in backends() {
            let what = store.describe();
            store.try_claim("j1", "w1").await.unwrap();
            // Only the owner moves its claim to waiting.
            store.set_waiting("j1", "w2").await.unwrap();
            assert_eq!(
                store.get("j1").await.unwrap(),
                Some(JobState::Claimed { owner: "w1".into() }),
                "{what}"
            );
            store.set_waiting("j1", "w1").await.unwrap();
            assert_eq!(
                store.get("j1").await.unwrap(),
                Some(JobState::Waiting),
                "{what}"
            );
            assert_eq!(
                store.try_claim("j1", "w2").await.unwrap(),
                ClaimResult::Claimed,
                "{what}"
            );
            assert_eq!(
                store.try_claim("j1", "w3").await.unwrap(),
                claimed("w2"),
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn decided_job_is_not_claimed_and_keeps_its_first_decision() {
        for (_dir, store) in backends() {
            let what = store.describe();
            store.try_claim("j1", "w1").await.unwrap();
            assert_eq!(
                store.decide("j1", b"first").await.unwrap(),
                b"first",
                "{what}"
            );
            let decided = JobState::Decided {
                event: b"first".to_vec(),
            };
            assert_eq!(
                store.try_claim("j1", "w2").await.unwrap(),
                ClaimResult::Existing(decided.clone()),
                "{what}"
            );
            assert_eq!(
                store.decide("j1", b"second").await.unwrap(),
                b"first",
                "{what}"
            );
            assert_eq!(
                store.get("j1").await.unwrap(),
                Some(decided.clone()),
                "{what}"
            );
            // Neither waiting nor release touches a decision.
            store.set_waiting("j1", "w1").await.unwrap();
            store.release("j1", "w1").await.unwrap();
            assert_eq!(store.get("j1").await.unwrap(), Some(decided), "{what}");
            // A waiting job is decided too, and so is one never claimed.
            store.try_claim("j2", "w1").await.unwrap();
            store.set_waiting("j2", "w1").await.unwrap();
            assert_eq!(
                store.decide("j2", b"late").await.unwrap(),
                b"late",
                "{what}"
            );
            assert_eq!(store.decide("j3", b"").await.unwrap(), b"", "{what}");
            assert_eq!(
                store.get("j3").await.unwrap(),
                Some(JobState::Decided { event: vec![] }),
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn release_only_by_owner() {
        for (_dir, store) in backends() {
            let what = store.describe();
            store.try_claim("j1", "w1").await.unwrap();
            store.release("j1", "w2").await.unwrap();
            assert_eq!(
                store.try_claim("j1", "w2").await.unwrap(),
                claimed("w1"),
                "{what}"
            );
            store.release("j1", "w1").await.unwrap();
            assert_eq!(store.get("j1").await.unwrap(), None, "{what}");
            assert_eq!(
                store.try_claim("j1", "w2").await.unwrap(),
                ClaimResult::Claimed,
                "{what}"
            );
            // A waiting job is not a claim: release leaves it.
            store.set_waiting("j1", "w2").await.unwrap();
            store.release("j1", "w2").await.unwrap();
            assert_eq!(
                store.get("j1").await.unwrap(),
                Some(JobState::Waiting),
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn prune_removes_old_records() {
        for (_dir, store) in backends() {
            let what = store.describe();
            store.try_claim("a", "w1").await.unwrap();
            store.try_claim("b", "w1").await.unwrap();
            store.set_waiting("b", "w1").await.unwrap();
            store.decide("c", b"event").await.unwrap();
            assert_eq!(
                store.prune(Duration::from_secs(3600)).await.unwrap(),
                0,
                "{what}"
            );
            // Records are stamped in milliseconds; make sure they are strictly older than now.
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(store.prune(Duration::ZERO).await.unwrap(), 3, "{what}");
            assert_eq!(store.get("c").await.unwrap(), None, "{what}");
            assert_eq!(
                store.try_claim("c", "w2").await.unwrap(),
                ClaimResult::Claimed,
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn prune_works_in_batches() {
        let dir = TempDir::new();
        let store = DecisionStore::open(&dir.0).unwrap();
        let n = PRUNE_BATCH as usize * 2 + 7;
        // Inserted directly, in one transaction: one fsync per row would make this test slow.
        if let Backend::File(file) = &store.backend {
            let mut conn = lock(&file.conn);
            let tx = conn.transaction().unwrap();
            for i in 0..n {
                tx.execute(
                    "INSERT INTO decisions VALUES (?1, 'decided', NULL, x'00', 0)",
                    [format!("job-{i}")],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        store.decide("fresh", b"e").await.unwrap();
        assert_eq!(
            store.prune(Duration::from_secs(60)).await.unwrap(),
            n as u64
        );
        assert!(store.get("fresh").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn file_store_survives_drop_and_reopen() {
        let dir = TempDir::new();
        let store = DecisionStore::open(&dir.0).unwrap();
        assert_eq!(
            store.describe(),
            format!("file:{}", dir.0.join(DB_FILE).display())
        );
        store.try_claim("claimed", "w1").await.unwrap();
        store.try_claim("waiting", "w1").await.unwrap();
        store.set_waiting("waiting", "w1").await.unwrap();
        store.try_claim("decided", "w1").await.unwrap();
        store
            .decide("decided", b"{\"outcome\":\"placed\"}")
            .await
            .unwrap();
        // No close, no checkpoint: whatever a commit has returned must be in the file.
        drop(store);

        let store = DecisionStore::open(&dir.0).unwrap();
        assert_eq!(
            store.get("claimed").await.unwrap(),
            Some(JobState::Claimed { owner: "w1".into() })
        );
        assert_eq!(store.get("waiting").await.unwrap(), Some(JobState::Waiting));
        assert_eq!(
            store.get("decided").await.unwrap(),
            Some(JobState::Decided {
                event: b"{\"outcome\":\"placed\"}".to_vec()
            })
        );
    }

    #[tokio::test]
    async fn second_open_of_one_directory_is_refused_while_the_first_lives() {
        let dir = TempDir::new();
        let first = DecisionStore::open(&dir.0).unwrap();
        let err = DecisionStore::open(&dir.0).unwrap_err();
        assert!(
            matches!(&err, StoreError::InUse { holder: Some(pid), .. } if *pid == std::process::id()),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&dir.0.display().to_string()), "{message}");
        assert!(message.contains("in use"), "{message}");
        drop(first);
        let again = DecisionStore::open(&dir.0).unwrap();
        drop(again);
    }

    #[tokio::test]
    async fn open_reports_the_directory_it_cannot_create() {
        let dir = TempDir::new();
        std::fs::write(&dir.0, b"not a directory").unwrap();
        let err = DecisionStore::open(&dir.0.join("state")).unwrap_err();
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&dir.0.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(&dir.0).unwrap();
    }

    #[tokio::test]
    async fn open_refuses_a_newer_schema() {
        let dir = TempDir::new();
        drop(DecisionStore::open(&dir.0).unwrap());
        let conn = Connection::open(dir.0.join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = DecisionStore::open(&dir.0).unwrap_err();
        assert!(
            matches!(err, StoreError::Schema { found: 2, .. }),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_on_one_job_have_one_winner() {
        for (_dir, store) in backends() {
            let what = store.describe();
            let store = Arc::new(store);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..500 {
                let store = Arc::clone(&store);
                tasks.spawn(async move {
                    let owner = format!("w{i}");
                    let result = store.try_claim("contended", &owner).await.unwrap();
                    (owner, result)
                });
            }
            let mut winners = Vec::new();
            let mut losers = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined.unwrap() {
                    (owner, ClaimResult::Claimed) => winners.push(owner),
                    (_, ClaimResult::Existing(state)) => losers.push(state),
                }
            }
            assert_eq!(winners.len(), 1, "{what}: {winners:?}");
            let winner = JobState::Claimed {
                owner: winners[0].clone(),
            };
            assert_eq!(losers.len(), 499, "{what}");
            assert!(losers.iter().all(|s| *s == winner), "{what}");
        }
    }
}
