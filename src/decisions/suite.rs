//! The claim-semantics suite: the same cases against every backend (memory, file, PostgreSQL),
//! so their meaning cannot drift apart. PostgreSQL is the local server (`127.0.0.1:5432`, trust
//! auth) unless `DIALER_TEST_DATABASE_URL` names another; each test gets a database of its own,
//! dropped at the end. No server reachable fails the test, saying what to provide.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

use super::*;
use crate::config::Secret;

/// A unique directory under the system temp dir, removed on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new() -> Self {
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

/// The server the PostgreSQL cases use, as an administrator URL (its `postgres` database).
pub(super) fn admin_url() -> String {
    std::env::var("DIALER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database created for one test and dropped after it.
pub(super) struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    pub(super) async fn create() -> Self {
        let admin = admin_url();
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the decision store tests need PostgreSQL: run one on 127.0.0.1:5432 with trust auth for user postgres, \
                     or set DIALER_TEST_DATABASE_URL to an administrator URL ({}: {e})",
                    crate::config::redact_url(&admin)
                )
            });
        tokio::spawn(connection);
        let name = format!("dialer_test_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let mut url = url::Url::parse(&admin).expect("admin URL");
        url.set_path(&name);
        Self {
            name,
            url: url.to_string(),
        }
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Dropped from inside a runtime: a thread of its own with a runtime of its own.
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// One backend under test, with what must outlive it.
struct Backend {
    store: DecisionStore,
    // Dropped after the store (fields drop in declaration order).
    _dir: Option<TempDir>,
    _db: Option<TestDb>,
}

async fn backends() -> Vec<Backend> {
    let dir = TempDir::new();
    let file = DecisionStore::open(&dir.0).unwrap();
    let db = TestDb::create().await;
    let postgres = DecisionStore::postgres(&PostgresSettings::new(Secret::new(db.url())))
        .await
        .unwrap();
    vec![
        Backend {
            store: DecisionStore::memory(),
            _dir: None,
            _db: None,
        },
        Backend {
            store: file,
            _dir: Some(dir),
            _db: None,
        },
        Backend {
            store: postgres,
            _dir: None,
            _db: Some(db),
        },
    ]
}

fn claimed(owner: &str) -> ClaimResult {
    ClaimResult::Existing(JobState::Claimed {
        owner: owner.into(),
    })
}

#[tokio::test]
async fn claim_new_then_again() {
    for Backend { store, .. } in backends().await {
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
        let record = store.record("j1").await.unwrap().unwrap();
        assert_eq!(record.job_id, "j1", "{what}");
        let age = OffsetDateTime::now_utc() - record.updated_at;
        assert!(age.whole_seconds().abs() < 60, "{what}: {record:?}");
    }
}

#[tokio::test]
async fn claim_new_claims_only_a_job_without_a_record() {
    for Backend { store, .. } in backends().await {
        let what = store.describe();
        let claimed_by_w1 = Some(JobState::Claimed { owner: "w1".into() });
        assert!(store.claim_new("j1", "w1").await.unwrap(), "{what}");
        assert_eq!(store.get("j1").await.unwrap(), claimed_by_w1, "{what}");
        // Any record refuses it and is left as it was: a claim, a waiting mark, a decision.
        assert!(!store.claim_new("j1", "w1").await.unwrap(), "{what}");
        assert!(!store.claim_new("j1", "w2").await.unwrap(), "{what}");
        assert_eq!(store.get("j1").await.unwrap(), claimed_by_w1, "{what}");
        store.set_waiting("j1", "w1").await.unwrap();
        assert!(!store.claim_new("j1", "w2").await.unwrap(), "{what}");
        assert_eq!(
            store.get("j1").await.unwrap(),
            Some(JobState::Waiting),
            "{what}"
        );
        store.decide("j1", b"first").await.unwrap();
        assert!(!store.claim_new("j1", "w2").await.unwrap(), "{what}");
        assert_eq!(
            store.get("j1").await.unwrap(),
            Some(JobState::Decided {
                event: b"first".to_vec()
            }),
            "{what}"
        );
        // A decision set aside for a replay leaves no record: the job is new again.
        assert!(store.forget_decision("j1").await.unwrap(), "{what}");
        assert!(store.claim_new("j1", "w3").await.unwrap(), "{what}");
    }
}

#[tokio::test]
async fn a_forgotten_decision_can_be_claimed_again_and_claims_are_not_forgotten() {
    for Backend { store, .. } in backends().await {
        let what = store.describe();
        store.try_claim("j1", "w1").await.unwrap();
        assert!(
            !store.forget_decision("j1").await.unwrap(),
            "{what}: a claim stays"
        );
        store.try_claim("j2", "w1").await.unwrap();
        store.set_waiting("j2", "w1").await.unwrap();
        assert!(
            !store.forget_decision("j2").await.unwrap(),
            "{what}: waiting stays"
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
async fn set_waiting_only_by_owner_and_a_waiting_job_can_be_claimed_again() {
    for Backend { store, .. } in backends().await {
        let what = store.describe();
        store.try_claim("j1", "w1").await.unwrap();
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
        // Unknown jobs are not made waiting.
        store.set_waiting("nobody", "w1").await.unwrap();
        assert_eq!(store.get("nobody").await.unwrap(), None, "{what}");
    }
}

#[tokio::test]
async fn decide_overwrites_a_claim_and_keeps_the_first_decision() {
    for Backend { store, .. } in backends().await {
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
    for Backend { store, .. } in backends().await {
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
    for Backend { store, .. } in backends().await {
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
        // Records are stamped in milliseconds or finer; make sure they are strictly older.
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
async fn unknown_decisions_are_listed_since_a_time() {
    for Backend { store, .. } in backends().await {
        let what = store.describe();
        let before = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        store
            .decide("u1", br#"{"outcome":"unknown"}"#)
            .await
            .unwrap();
        store
            .decide("p1", br#"{"outcome":"placed"}"#)
            .await
            .unwrap();
        store
            .decide("u2", br#"{"outcome":"unknown"}"#)
            .await
            .unwrap();
        store.try_claim("c1", "w1").await.unwrap();
        let listed: Vec<String> = store
            .unknown_since(before, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        assert_eq!(listed, ["u1", "u2"], "{what}");
        assert_eq!(
            store.unknown_since(before, 1).await.unwrap().len(),
            1,
            "{what}"
        );
        let later = OffsetDateTime::now_utc() + time::Duration::minutes(1);
        assert!(
            store.unknown_since(later, 100).await.unwrap().is_empty(),
            "{what}"
        );
    }
}

#[tokio::test]
async fn owner_liveness() {
    for Backend { store, .. } in backends().await {
        let what = store.describe();
        // Oneself is alive whatever the store.
        assert!(store.owner_alive("me", "me").await.unwrap(), "{what}");
        store.heartbeat("other").await.unwrap();
        let other_alive = store.owner_alive("other", "me").await.unwrap();
        match &store {
            // One process per file or map: any other owner is a process that stopped.
            DecisionStore::Sqlite(_) | DecisionStore::Memory(_) => assert!(!other_alive, "{what}"),
            // A fresh lease is alive; none, or a given-up one, is gone.
            DecisionStore::Postgres(_) => {
                assert!(other_alive, "{what}");
                assert!(
                    !store.owner_alive("never-seen", "me").await.unwrap(),
                    "{what}"
                );
                store.end_lease("other").await.unwrap();
                assert!(!store.owner_alive("other", "me").await.unwrap(), "{what}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_on_one_job_have_one_winner() {
    for Backend { store, .. } in backends().await {
        let what = store.describe();
        let store = Arc::new(store);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
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
        assert_eq!(losers.len(), 199, "{what}");
        assert!(losers.iter().all(|s| *s == winner), "{what}");

        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let store = Arc::clone(&store);
            tasks.spawn(async move { store.claim_new("contended-new", &format!("w{i}")).await });
        }
        let mut claims = 0;
        while let Some(joined) = tasks.join_next().await {
            claims += usize::from(joined.unwrap().unwrap());
        }
        assert_eq!(claims, 1, "{what}: new claims on one job");
    }
}

#[tokio::test]
async fn postgres_refuses_a_newer_schema_and_migrates_idempotently() {
    let db = TestDb::create().await;
    let settings = PostgresSettings::new(Secret::new(db.url()));
    // Twice: the second start finds the schema in place.
    drop(DecisionStore::postgres(&settings).await.unwrap());
    drop(DecisionStore::postgres(&settings).await.unwrap());
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("UPDATE dialer_schema_version SET version = 99")
        .await
        .unwrap();
    let err = DecisionStore::postgres(&settings).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Schema { found: 99, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[tokio::test]
async fn a_postgres_url_is_described_without_its_password() {
    let db = TestDb::create().await;
    let mut url = url::Url::parse(db.url()).unwrap();
    url.set_password(Some("hunter2")).unwrap();
    let store = DecisionStore::postgres(&PostgresSettings::new(Secret::new(url.as_str())))
        .await
        .unwrap();
    assert!(
        !store.describe().contains("hunter2"),
        "{}",
        store.describe()
    );
    assert!(!format!("{store:?}").contains("hunter2"));
}
