//! The SQLite backend: the embedded, crash-safe `file` store under `DIALER_STATE_DIR`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use time::OffsetDateTime;

use super::{ClaimResult, JobState, StoreError, StoredRecord, from_unix_ms, parse_state, unix_ms};

/// Name of the database file inside the state directory.
pub(super) const DB_FILE: &str = "decisions.sqlite3";
/// Name of the lock file inside the state directory; held exclusively while a store is open.
const LOCK_FILE: &str = "LOCK";
/// The schema this build writes (`PRAGMA user_version`). A file with a higher number was written
/// by a newer build and is refused rather than misread. 2 added the `outcome` column.
pub(super) const SCHEMA_VERSION: i64 = 2;
/// How long a statement waits for a lock held by another connection to the same file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows deleted per transaction by `prune`: small enough that claims waiting for the connection
/// are held up for milliseconds, not for the whole sweep.
pub(super) const PRUNE_BATCH: i64 = 1000;

/// The check on `state` is written as comparisons, not `state IN (...)`: SQLite builds a
/// temporary index for an `IN` list every time it checks a row, which was about a third of the
/// CPU cost of a claim or a decision. Both forms accept the same rows, so a
/// file created with the `IN` form by an earlier build needs no migration.
const SCHEMA_V1: &str = "
    CREATE TABLE IF NOT EXISTS decisions (
        job_id     TEXT PRIMARY KEY NOT NULL,
        state      TEXT NOT NULL
                   CHECK (state = 'claimed' OR state = 'waiting' OR state = 'decided'),
        owner      TEXT,
        event      BLOB,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS decisions_updated_at ON decisions (updated_at);
";

/// Version 1 → 2: the outcome beside the event, so `dialer decisions unknown` reads an index
/// instead of every event. Rows written by version 1 are filled in from their events.
const MIGRATE_V2: &str = "
    ALTER TABLE decisions ADD COLUMN outcome TEXT;
    UPDATE decisions SET outcome = json_extract(CAST(event AS TEXT), '$.outcome')
        WHERE state = 'decided' AND json_valid(CAST(event AS TEXT));
    CREATE INDEX IF NOT EXISTS decisions_unknown ON decisions (updated_at) WHERE outcome = 'unknown';
";

/// A row as stored, before it is checked.
type RawRow = (String, Option<String>, Option<Vec<u8>>, i64);

/// The SQLite store: one file, exclusively locked by the worker that writes it.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    // rusqlite is blocking, so file operations go through `spawn_blocking`; one connection is
    // enough because SQLite admits one writer at a time anyway, and a std Mutex (not tokio's)
    // because it is locked inside those blocking closures, never across an await.
    // Declared before `_lock` so that the database is closed before the lock is released.
    conn: Mutex<Connection>,
    file: FileIdentity,
    // Held, never read: the exclusive lock on `<dir>/LOCK` lives as long as this file handle.
    _lock: Option<File>,
}

/// The database file and which file it was when opened: a file deleted or replaced under the
/// running store would silently take the decisions with it, so the heartbeat compares.
struct FileIdentity {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SqliteStore {
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
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                file: FileIdentity {
                    id: file_id(&path),
                    path,
                },
                _lock: Some(lock),
            }),
        })
    }

    /// Opens the store in `state_dir` read-only, without its lock: for `dialer decisions` beside
    /// a running worker (WAL lets a reader in while the writer works).
    pub fn open_read_only(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(DB_FILE);
        let store = format!("file:{}", path.display());
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Open {
            store: store.clone(),
            step: "opening the file read-only",
            detail: e.to_string(),
        })?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| StoreError::Open {
                store: store.clone(),
                step: "reading the schema version",
                detail: e.to_string(),
            })?;
        if found != SCHEMA_VERSION {
            return Err(StoreError::Schema {
                store,
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                file: FileIdentity { id: None, path },
                _lock: None,
            }),
        })
    }

    pub(super) async fn claim_new(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        let (id, owner, now) = (job_id.to_owned(), owner.to_owned(), now_ms());
        self.run("claim_new", move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO decisions (job_id, state, owner, event, outcome, updated_at)
                     VALUES (?1, 'claimed', ?2, NULL, NULL, ?3)
                     ON CONFLICT (job_id) DO NOTHING",
                )?
                .execute(params![id, owner, now])?;
            Ok(inserted == 1)
        })
        .await
    }

    pub(super) async fn try_claim(
        &self,
        job_id: &str,
        owner: &str,
    ) -> Result<ClaimResult, StoreError> {
        let (id, owner, now) = (job_id.to_owned(), owner.to_owned(), now_ms());
        let existing = self
            .run("claim", move |conn| {
                // The upsert and the read-back share one transaction, so the state returned is
                // the one that made the claim fail.
                immediate(conn, |tx| {
                    let claimed = tx
                        .prepare_cached(
                            "INSERT INTO decisions (job_id, state, owner, event, outcome, updated_at)
                             VALUES (?1, 'claimed', ?2, NULL, NULL, ?3)
                             ON CONFLICT (job_id) DO UPDATE
                             SET state = 'claimed', owner = excluded.owner, event = NULL,
                                 outcome = NULL, updated_at = excluded.updated_at
                             WHERE decisions.state = 'waiting'",
                        )?
                        .execute(params![id, owner, now])?
                        == 1;
                    if claimed { Ok(None) } else { read_row(tx, &id) }
                })
            })
            .await?;
        match existing {
            None => Ok(ClaimResult::Claimed),
            Some(row) => Ok(ClaimResult::Existing(self.parse(job_id, row)?.state)),
        }
    }

    pub(super) async fn decide(
        &self,
        job_id: &str,
        event: &[u8],
        outcome: Option<&str>,
    ) -> Result<Vec<u8>, StoreError> {
        let (id, event, now) = (job_id.to_owned(), event.to_vec(), now_ms());
        let outcome = outcome.map(str::to_owned);
        let in_force = self
            .run("decide", move |conn| {
                immediate(conn, |tx| {
                    // `owner` is left as it was: who claimed the job stays visible to whoever
                    // inspects the record.
                    tx.prepare_cached(
                        "INSERT INTO decisions (job_id, state, owner, event, outcome, updated_at)
                         VALUES (?1, 'decided', NULL, ?2, ?3, ?4)
                         ON CONFLICT (job_id) DO UPDATE
                         SET state = 'decided', event = excluded.event, outcome = excluded.outcome,
                             updated_at = excluded.updated_at
                         WHERE decisions.state <> 'decided'",
                    )?
                    .execute(params![id, event, outcome, now])?;
                    read_row(tx, &id)
                })
            })
            .await?;
        match in_force
            .map(|row| self.parse(job_id, row))
            .transpose()?
            .map(|r| r.state)
        {
            Some(JobState::Decided { event }) => Ok(event),
            other => Err(StoreError::Corrupt {
                store: self.describe(),
                job_id: job_id.to_owned(),
                detail: format!("expected a decision after deciding, found {other:?}"),
            }),
        }
    }

    pub(super) async fn set_waiting(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        let (id, owner, now) = (job_id.to_owned(), owner.to_owned(), now_ms());
        self.run("set_waiting", move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE decisions SET state = 'waiting', owner = NULL, updated_at = ?3
                     WHERE job_id = ?1 AND state = 'claimed' AND owner = ?2",
                )?
                .execute(params![id, owner, now])?;
            Ok(n > 0)
        })
        .await
    }

    pub(super) async fn release(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        let (id, owner) = (job_id.to_owned(), owner.to_owned());
        self.run("release", move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM decisions WHERE job_id = ?1 AND state = 'claimed' AND owner = ?2",
                )?
                .execute(params![id, owner])?;
            Ok(n > 0)
        })
        .await
    }

    pub(super) async fn forget_decision(&self, job_id: &str) -> Result<bool, StoreError> {
        let id = job_id.to_owned();
        self.run("forget_decision", move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM decisions WHERE job_id = ?1 AND state = 'decided'")?
                .execute(params![id])?;
            Ok(n > 0)
        })
        .await
    }

    pub(super) async fn record(&self, job_id: &str) -> Result<Option<StoredRecord>, StoreError> {
        let id = job_id.to_owned();
        let row = self.run("get", move |conn| read_row(conn, &id)).await?;
        row.map(|row| self.parse(job_id, row)).transpose()
    }

    pub(super) async fn unknown_since(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let since = unix_ms(since);
        let rows = self
            .run("list_unknown", move |conn| {
                let mut statement = conn.prepare_cached(
                    "SELECT job_id, state, owner, event, updated_at FROM decisions
                     WHERE outcome = 'unknown' AND updated_at >= ?1
                     ORDER BY updated_at LIMIT ?2",
                )?;
                let rows = statement
                    .query_map(params![since, limit], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            (row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?),
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(job_id, row)| self.parse(&job_id, row))
            .collect()
    }

    pub(super) async fn prune(&self, older_than: Duration) -> Result<u64, StoreError> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        let mut total = 0;
        // In batches, each its own transaction and its own trip to the blocking pool, so that
        // claims and decisions are served between them.
        loop {
            let deleted = self
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

    /// Answers when the database answers and its file is still the one that was opened: a
    /// file deleted or replaced under a running store would lose every decision on restart.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let file = &self.inner.file;
        if file.id.is_some() {
            let now = file_id(&file.path);
            if now != file.id {
                return Err(StoreError::Vanished {
                    store: self.describe(),
                    detail: match now {
                        None => "the database file was deleted while the store was open".into(),
                        Some(_) => "the database file was replaced while the store was open".into(),
                    },
                });
            }
        }
        self.run("ping", |conn| {
            conn.prepare_cached("SELECT count(*) FROM decisions WHERE job_id = ''")?
                .query_row([], |row| row.get::<_, i64>(0))
        })
        .await
        .map(drop)
    }

    pub(super) fn describe(&self) -> String {
        format!("file:{}", self.inner.file.path.display())
    }

    /// Runs `f` on the connection in the blocking pool. It runs to completion even when the
    /// future awaiting it is dropped: a cancelled `try_claim` may still have claimed the job.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&mut lock(&inner.conn))).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(StoreError::Query {
                store: self.describe(),
                op,
                detail: source.to_string(),
            }),
            Err(source) => Err(StoreError::Query {
                store: self.describe(),
                op,
                detail: format!("the blocking task did not complete: {source}"),
            }),
        }
    }

    fn parse(
        &self,
        job_id: &str,
        (state, owner, event, updated_at): RawRow,
    ) -> Result<StoredRecord, StoreError> {
        let state = parse_state(&self.describe(), job_id, &state, owner, event)?;
        let updated_at = from_unix_ms(updated_at);
        Ok(StoredRecord {
            job_id: job_id.to_owned(),
            state,
            updated_at,
        })
    }
}

/// The file's device and inode (Unix), to tell a replaced file from the one opened.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((metadata.dev(), metadata.ino()))
    }
    #[cfg(not(unix))]
    {
        Some((0, metadata.len().min(1)))
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
    let store = format!("file:{}", path.display());
    let conn = Connection::open(path).map_err(|e| StoreError::Open {
        store: store.clone(),
        step: "opening the file",
        detail: e.to_string(),
    })?;
    prepare(&conn, &store)?;
    Ok(conn)
}

/// Pragmas, then the schema, created or migrated inside one transaction.
fn prepare(conn: &Connection, store: &str) -> Result<(), StoreError> {
    let open_error = |step| {
        let store = store.to_owned();
        move |e: rusqlite::Error| StoreError::Open {
            store,
            step,
            detail: e.to_string(),
        }
    };
    // Only the lock-file holder writes this file, but a person inspecting it with the sqlite3
    // shell, `dialer decisions`, or a backup tool may hold a read lock for a moment: wait
    // rather than fail.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(open_error("setting busy_timeout"))?;
    // WAL: a commit is one append and one fsync, and readers do not block the writer.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error("switching to WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some network file systems cannot share memory between processes, which WAL
        // needs. The rollback journal with synchronous=FULL is just as durable, only slower.
        tracing::warn!(
            store,
            mode,
            "decision store: WAL unavailable, using the rollback journal"
        );
    }
    // FULL, not WAL's usual NORMAL: every commit is fsynced before it returns. A decision
    // is acknowledged to the broker right after it is recorded, so it must survive a power
    // loss, not just a crash of this process; NORMAL could lose the last commits to a power
    // cut and then the redelivered job would be dialled again.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_error("setting synchronous=FULL"))?;
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(open_error("starting the schema transaction"))?;
    let migrated = (|| {
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(open_error("reading the schema version"))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                store: store.to_owned(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        let has_table: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'decisions'",
                [],
                |row| row.get(0),
            )
            .map_err(open_error("reading the schema"))?;
        if !has_table || found < 1 {
            conn.execute_batch(SCHEMA_V1)
                .map_err(open_error("creating the schema"))?;
        }
        if found < 2 {
            conn.execute_batch(MIGRATE_V2)
                .map_err(open_error("migrating the schema to version 2"))?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_error("writing the schema version"))?;
        Ok(())
    })();
    match migrated {
        Ok(()) => conn
            .execute_batch("COMMIT")
            .map_err(open_error("committing the schema")),
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

fn read_row(conn: &Connection, job_id: &str) -> rusqlite::Result<Option<RawRow>> {
    conn.prepare_cached("SELECT state, owner, event, updated_at FROM decisions WHERE job_id = ?1")?
        .query_row([job_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()
}

/// Runs `body` in an immediate transaction, committed when it returns `Ok` and rolled back
/// otherwise (also when it panics). `BEGIN IMMEDIATE` and `COMMIT` are cached statements:
/// rusqlite's `Transaction` parses both again on every call, which was about a sixth of the
/// store's CPU time per job (a claim and a decision per job).
fn immediate<T>(
    conn: &Connection,
    body: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    /// Rolls back a transaction still open when dropped: after an error, a failed `COMMIT`
    /// or a panic, as rusqlite's `Transaction` does.
    struct Open<'c>(&'c Connection);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            if !self.0.is_autocommit() {
                let _ = self.0.execute_batch("ROLLBACK");
            }
        }
    }
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let open = Open(conn);
    let value = body(open.0)?;
    open.0.prepare_cached("COMMIT")?.execute([])?;
    Ok(value)
}

/// Locks a std Mutex, ignoring poisoning: a panic inside cannot leave the database half
/// written (an SQLite transaction left open by a panic is rolled back when it is dropped), so
/// the data is still good.
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
    use super::super::suite::TempDir;
    use super::super::{DecisionStore, JobState};
    use super::*;

    #[test]
    fn a_failed_transaction_is_rolled_back_and_the_next_one_commits() {
        let dir = TempDir::new();
        let store = SqliteStore::open(&dir.0).unwrap();
        let conn = lock(&store.inner.conn);
        let insert = |conn: &Connection, id: &str| {
            conn.execute(
                "INSERT INTO decisions (job_id, state, updated_at) VALUES (?1, 'waiting', 0)",
                [id],
            )
        };
        let failed = immediate(&conn, |tx| {
            insert(tx, "a")?;
            // A state the check refuses: the whole transaction goes, "a" included.
            tx.execute(
                "INSERT INTO decisions (job_id, state, updated_at) VALUES ('b', 'lost', 0)",
                [],
            )
        });
        assert!(failed.is_err());
        assert!(conn.is_autocommit(), "no transaction left open");
        assert_eq!(read_row(&conn, "a").unwrap(), None);
        immediate(&conn, |tx| insert(tx, "c")).unwrap();
        assert!(conn.is_autocommit());
        assert_eq!(
            read_row(&conn, "c").unwrap().map(|row| row.0).as_deref(),
            Some("waiting")
        );
    }

    #[tokio::test]
    async fn prune_works_in_batches() {
        let dir = TempDir::new();
        let store = SqliteStore::open(&dir.0).unwrap();
        let n = PRUNE_BATCH as usize * 2 + 7;
        // Inserted directly, in one transaction: one fsync per row would make this test slow.
        {
            let mut conn = lock(&store.inner.conn);
            let tx = conn.transaction().unwrap();
            for i in 0..n {
                tx.execute(
                    "INSERT INTO decisions VALUES (?1, 'decided', NULL, x'00', 0, NULL)",
                    [format!("job-{i}")],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let store = DecisionStore::Sqlite(store);
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
        // A reader (`dialer decisions`) is let in beside the writer.
        let reader = SqliteStore::open_read_only(&dir.0).unwrap();
        first
            .decide("j", b"{\"outcome\":\"unknown\"}")
            .await
            .unwrap();
        assert!(reader.record("j").await.unwrap().is_some());
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
            matches!(
                err,
                StoreError::Schema {
                    found: 3,
                    known: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("upgrade"), "{err}");
    }

    #[tokio::test]
    async fn a_version_1_file_is_migrated_and_its_unknown_jobs_listed() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        {
            let conn = Connection::open(dir.0.join(DB_FILE)).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute(
                "INSERT INTO decisions VALUES ('old', 'decided', NULL, ?1, ?2)",
                params![b"{\"outcome\":\"unknown\"}".to_vec(), now_ms()],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = DecisionStore::open(&dir.0).unwrap();
        let listed = store
            .unknown_since(OffsetDateTime::UNIX_EPOCH, 10)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].job_id, "old");
    }

    #[tokio::test]
    async fn a_deleted_or_replaced_file_is_detected() {
        let dir = TempDir::new();
        let store = DecisionStore::open(&dir.0).unwrap();
        store.heartbeat("me").await.unwrap();
        std::fs::remove_file(dir.0.join(DB_FILE)).unwrap();
        let err = store.heartbeat("me").await.unwrap_err();
        assert!(matches!(err, StoreError::Vanished { .. }), "{err:?}");
        assert!(err.to_string().contains("deleted"), "{err}");
        std::fs::write(dir.0.join(DB_FILE), b"").unwrap();
        let err = store.heartbeat("me").await.unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
    }
}
