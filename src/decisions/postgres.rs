//! The PostgreSQL backend: decisions shared by every replica of a fleet, and the leases that
//! say which replicas are alive (see `docs/decisions.md`).
//!
//! Each operation is one statement, so one round trip (the claim is a function for that
//! reason: its upsert and its read-back must take separate snapshots). The schema is created
//! and migrated at start under an advisory lock, versioned in `dialer_schema_version`; a newer
//! schema than this build knows is refused.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Config, NoTls, Row};

use super::{
    ClaimResult, JobState, LEASE_FOR, StoreError, StoredRecord, from_unix_ms, parse_state, unix_ms,
};
use crate::config::{Secret, redact_url};

/// The schema this build writes. A database holding a higher number was migrated by a newer
/// build and is refused rather than misread.
pub(super) const SCHEMA_VERSION: i64 = 1;
/// Rows deleted per statement by `prune`, so a sweep never holds many row locks at once.
const PRUNE_BATCH: i64 = 1000;
/// Leases expired this long ago are deleted by `prune`; younger ones are kept so a person can
/// still see which replica held a claim.
const LEASE_KEEP: &str = "1 day";
/// Advisory lock key taken while the schema is created or migrated, so replicas starting
/// together do not race each other's `CREATE TABLE`.
const MIGRATION_LOCK: i64 = 0x6469_616c_6572;

/// Each version's migration, applied in order from the version found.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    r"
    CREATE TABLE dialer_decisions (
        job_id     TEXT PRIMARY KEY,
        state      TEXT NOT NULL CHECK (state IN ('claimed', 'waiting', 'decided')),
        owner      TEXT,
        event      BYTEA,
        outcome    TEXT,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX dialer_decisions_updated_at ON dialer_decisions (updated_at);
    CREATE INDEX dialer_decisions_unknown ON dialer_decisions (updated_at) WHERE outcome = 'unknown';
    CREATE TABLE dialer_leases (
        owner       TEXT PRIMARY KEY,
        lease_until TIMESTAMPTZ NOT NULL
    );
    -- Claims when unknown or waiting, else returns the record as it is. A function so that it
    -- is one round trip and the read-back, a statement of its own, sees a row a concurrent
    -- claim committed after this one's upsert began. Loops when the row vanished in between
    -- (released or pruned).
    CREATE FUNCTION dialer_try_claim(p_job TEXT, p_owner TEXT)
    RETURNS TABLE (claimed BOOLEAN, r_state TEXT, r_owner TEXT, r_event BYTEA, r_updated_ms BIGINT)
    LANGUAGE plpgsql AS $$
    BEGIN
        LOOP
            INSERT INTO dialer_decisions AS d (job_id, state, owner, event, outcome, updated_at)
            VALUES (p_job, 'claimed', p_owner, NULL, NULL, now())
            ON CONFLICT (job_id) DO UPDATE
            SET state = 'claimed', owner = excluded.owner, event = NULL, outcome = NULL,
                updated_at = excluded.updated_at
            WHERE d.state = 'waiting';
            IF FOUND THEN
                RETURN QUERY SELECT true, 'claimed'::TEXT, p_owner, NULL::BYTEA,
                    (extract(epoch FROM now()) * 1000)::BIGINT;
                RETURN;
            END IF;
            RETURN QUERY SELECT false, d.state, d.owner, d.event,
                    (extract(epoch FROM d.updated_at) * 1000)::BIGINT
                FROM dialer_decisions d WHERE d.job_id = p_job;
            IF FOUND THEN
                RETURN;
            END IF;
        END LOOP;
    END
    $$;
    ",
];

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database?sslmode=…`; a secret (it holds the password).
    pub url: Secret,
    /// Connections at most: the pool is bounded so a fleet cannot exhaust the server's
    /// `max_connections`.
    pub pool_size: usize,
    /// How long one operation (a pool checkout included) may take before it is a failure.
    pub op_timeout: Duration,
}

impl PostgresSettings {
    /// Settings for `url` with the defaults: 16 connections, 5 s per operation.
    pub fn new(url: Secret) -> Self {
        Self {
            url,
            pool_size: 16,
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// The shared store.
pub struct PostgresStore {
    pool: Pool,
    describe: String,
    op_timeout: Duration,
}

/// Whether TLS is used and what it checks, from the URL's `sslmode` (libpq's names and meanings).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tls {
    /// `disable`.
    Off,
    /// `prefer` (the default, as in libpq): encrypted when the server offers TLS; the
    /// certificate is not checked.
    Prefer,
    /// `require`: encrypted or no connection; the certificate is not checked (as in libpq).
    Require,
    /// `verify-full` (and `verify-ca`, held to the same stricter check): encrypted, the
    /// certificate chains to a trusted root (`sslrootcert`, else the system's) and names the host.
    Verify {
        /// `sslrootcert`: a PEM file of the roots to trust instead of the system's.
        root_cert: Option<std::path::PathBuf>,
    },
}

/// Splits `sslmode` off the URL (tokio-postgres knows only disable/prefer/require) and parses
/// the rest. The error never contains the password.
fn parse_url(raw: &str) -> Result<(Config, Tls), String> {
    let mut url = url::Url::parse(raw.trim()).map_err(|e| {
        format!("not a URL ({e}); expected postgres://user:password@host:port/database")
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme {:?} is not supported; expected postgres:// or postgresql://",
            url.scheme()
        ));
    }
    let mut tls = Tls::Prefer;
    let mut root_cert = None;
    let mut kept = Vec::new();
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "sslmode" => {
                tls = match value.as_ref() {
                    "disable" => Tls::Off,
                    "allow" | "prefer" => Tls::Prefer,
                    "require" => Tls::Require,
                    "verify-ca" | "verify-full" => Tls::Verify { root_cert: None },
                    other => {
                        return Err(format!(
                            "sslmode={other:?} is not known; expected disable, prefer, require, verify-ca or verify-full"
                        ));
                    }
                };
            }
            "sslrootcert" => root_cert = Some(std::path::PathBuf::from(value.as_ref())),
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    if let Tls::Verify { root_cert: root } = &mut tls {
        *root = root_cert;
    }
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    let mut config: Config = url
        .as_str()
        .parse()
        .map_err(|e| format!("not a usable PostgreSQL URL: {e}"))?;
    if config.get_application_name().is_none() {
        config.application_name("dialer");
    }
    config.ssl_mode(match tls {
        Tls::Off => tokio_postgres::config::SslMode::Disable,
        Tls::Prefer => tokio_postgres::config::SslMode::Prefer,
        Tls::Require | Tls::Verify { .. } => tokio_postgres::config::SslMode::Require,
    });
    // A server that went away is noticed by the per-operation timeout; keepalives also close
    // idle pooled connections to a host that vanished.
    config.connect_timeout(Duration::from_secs(5));
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    Ok((config, tls))
}

/// Checks `DIALER_DATABASE_URL` without connecting; the message never contains the password.
pub fn check_url(raw: &str) -> Result<(), String> {
    parse_url(raw).map(drop)
}

impl PostgresStore {
    /// Connects (the pool opens connections on demand; one is opened now to fail early), and
    /// creates or migrates the schema.
    pub async fn connect(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let describe = redact_url(settings.url.expose());
        let open_error = |step: &'static str| {
            let store = describe.clone();
            move |detail: String| StoreError::Open {
                store,
                step,
                detail,
            }
        };
        let (config, tls) =
            parse_url(settings.url.expose()).map_err(open_error("reading the URL"))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Tls::Off => Manager::from_config(config, NoTls, manager_config),
            tls => Manager::from_config(
                config,
                RustlsConnector::new(&tls).map_err(open_error("setting up TLS"))?,
                manager_config,
            ),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.op_timeout))
            .create_timeout(Some(settings.op_timeout))
            .recycle_timeout(Some(settings.op_timeout))
            .build()
            .map_err(|e| open_error("building the connection pool")(e.to_string()))?;
        let store = Self {
            pool,
            describe,
            op_timeout: settings.op_timeout,
        };
        store.migrate().await?;
        tracing::debug!(store = %store.describe, "decision store opened");
        Ok(store)
    }

    /// Creates the schema or brings it to [`SCHEMA_VERSION`], in one transaction under an
    /// advisory lock.
    async fn migrate(&self) -> Result<(), StoreError> {
        let open_error = |step: &'static str| {
            let store = self.describe.clone();
            move |e: tokio_postgres::Error| StoreError::Open {
                store,
                step,
                detail: error_text(&e),
            }
        };
        let mut client = tokio::time::timeout(self.op_timeout, self.pool.get())
            .await
            .map_err(|_| StoreError::Timeout {
                store: self.describe.clone(),
                op: "connect",
                after: self.op_timeout,
            })?
            .map_err(|e| StoreError::Open {
                store: self.describe.clone(),
                step: "connecting",
                detail: pool_error_text(&e),
            })?;
        let tx = client
            .transaction()
            .await
            .map_err(open_error("starting the schema transaction"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(open_error("locking the schema"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS dialer_schema_version (version BIGINT NOT NULL)",
        )
        .await
        .map_err(open_error("creating the version table"))?;
        let found: i64 = tx
            .query_opt("SELECT max(version) FROM dialer_schema_version", &[])
            .await
            .map_err(open_error("reading the schema version"))?
            .and_then(|row| row.get::<_, Option<i64>>(0))
            .unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                store: self.describe.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            let version = i64::try_from(index).unwrap_or(i64::MAX) + 1;
            if version > found {
                tx.batch_execute(migration)
                    .await
                    .map_err(open_error("migrating the schema"))?;
                tracing::info!(store = %self.describe, version, "decision store schema migrated");
            }
        }
        tx.execute("DELETE FROM dialer_schema_version", &[])
            .await
            .map_err(open_error("writing the schema version"))?;
        tx.execute(
            "INSERT INTO dialer_schema_version (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(open_error("writing the schema version"))?;
        tx.commit()
            .await
            .map_err(open_error("committing the schema"))?;
        Ok(())
    }

    pub(super) async fn claim_new(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        // A row inserted concurrently by another replica makes this one wait for its commit,
        // then do nothing: one of them claims.
        self.execute(
            "claim_new",
            "INSERT INTO dialer_decisions (job_id, state, owner, event, outcome, updated_at)
             VALUES ($1, 'claimed', $2, NULL, NULL, now())
             ON CONFLICT (job_id) DO NOTHING",
            &[&job_id, &owner],
        )
        .await
        .map(|inserted| inserted == 1)
    }

    pub(super) async fn try_claim(
        &self,
        job_id: &str,
        owner: &str,
    ) -> Result<ClaimResult, StoreError> {
        let rows = self
            .query(
                "claim",
                "SELECT claimed, r_state, r_owner, r_event, r_updated_ms FROM dialer_try_claim($1, $2)",
                &[&job_id, &owner],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| self.corrupt(job_id, "the claim returned no row"))?;
        if row.get::<_, bool>(0) {
            return Ok(ClaimResult::Claimed);
        }
        Ok(ClaimResult::Existing(
            self.parse(job_id, row.get(1), row.get(2), row.get(3), row.get(4))?
                .state,
        ))
    }

    pub(super) async fn decide(
        &self,
        job_id: &str,
        event: &[u8],
        outcome: Option<&str>,
    ) -> Result<Vec<u8>, StoreError> {
        // Every column falls back to its old value when already decided, so the statement
        // always returns the decision in force, in one round trip.
        let rows = self
            .query(
                "decide",
                "INSERT INTO dialer_decisions AS d (job_id, state, owner, event, outcome, updated_at)
                 VALUES ($1, 'decided', NULL, $2, $3, now())
                 ON CONFLICT (job_id) DO UPDATE SET
                     event = CASE WHEN d.state = 'decided' THEN d.event ELSE excluded.event END,
                     outcome = CASE WHEN d.state = 'decided' THEN d.outcome ELSE excluded.outcome END,
                     updated_at = CASE WHEN d.state = 'decided' THEN d.updated_at ELSE excluded.updated_at END,
                     state = 'decided'
                 RETURNING event",
                &[&job_id, &event, &outcome],
            )
            .await?;
        rows.first()
            .and_then(|row| row.get::<_, Option<Vec<u8>>>(0))
            .ok_or_else(|| self.corrupt(job_id, "no decision in force after deciding"))
    }

    pub(super) async fn set_waiting(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        self.execute(
            "set_waiting",
            "UPDATE dialer_decisions SET state = 'waiting', owner = NULL, updated_at = now()
             WHERE job_id = $1 AND state = 'claimed' AND owner = $2",
            &[&job_id, &owner],
        )
        .await
        .map(|n| n > 0)
    }

    pub(super) async fn release(&self, job_id: &str, owner: &str) -> Result<bool, StoreError> {
        self.execute(
            "release",
            "DELETE FROM dialer_decisions WHERE job_id = $1 AND state = 'claimed' AND owner = $2",
            &[&job_id, &owner],
        )
        .await
        .map(|n| n > 0)
    }

    pub(super) async fn forget_decision(&self, job_id: &str) -> Result<bool, StoreError> {
        self.execute(
            "forget_decision",
            "DELETE FROM dialer_decisions WHERE job_id = $1 AND state = 'decided'",
            &[&job_id],
        )
        .await
        .map(|n| n > 0)
    }

    pub(super) async fn record(&self, job_id: &str) -> Result<Option<StoredRecord>, StoreError> {
        let rows = self
            .query(
                "get",
                "SELECT state, owner, event, (extract(epoch FROM updated_at) * 1000)::BIGINT
                 FROM dialer_decisions WHERE job_id = $1",
                &[&job_id],
            )
            .await?;
        rows.first()
            .map(|row| self.parse(job_id, row.get(0), row.get(1), row.get(2), row.get(3)))
            .transpose()
    }

    pub(super) async fn unknown_since(
        &self,
        since: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let since_ms = unix_ms(since);
        let rows = self
            .query(
                "list_unknown",
                "SELECT job_id, state, owner, event, (extract(epoch FROM updated_at) * 1000)::BIGINT
                 FROM dialer_decisions
                 WHERE outcome = 'unknown' AND updated_at >= to_timestamp($1::BIGINT / 1000.0)
                 ORDER BY updated_at LIMIT $2",
                &[&since_ms, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let job_id: String = row.get(0);
                self.parse(&job_id, row.get(1), row.get(2), row.get(3), row.get(4))
            })
            .collect()
    }

    pub(super) async fn prune(&self, older_than: Duration) -> Result<u64, StoreError> {
        let seconds = older_than.as_secs_f64();
        let mut total = 0;
        loop {
            let deleted = self
                .execute(
                    "prune",
                    "DELETE FROM dialer_decisions WHERE ctid IN (
                         SELECT ctid FROM dialer_decisions
                         WHERE updated_at < now() - make_interval(secs => $1) LIMIT $2)",
                    &[&seconds, &PRUNE_BATCH],
                )
                .await?;
            total += deleted;
            if deleted < PRUNE_BATCH as u64 {
                break;
            }
        }
        self.execute(
            "prune",
            &format!(
                "DELETE FROM dialer_leases WHERE lease_until < now() - interval '{LEASE_KEEP}'"
            ),
            &[],
        )
        .await?;
        Ok(total)
    }

    pub(super) async fn owner_alive(&self, owner: &str) -> Result<bool, StoreError> {
        let rows = self
            .query(
                "owner_alive",
                "SELECT lease_until > now() FROM dialer_leases WHERE owner = $1",
                &[&owner],
            )
            .await?;
        Ok(rows.first().is_some_and(|row| row.get::<_, bool>(0)))
    }

    pub(super) async fn renew_lease(&self, owner: &str) -> Result<(), StoreError> {
        // The database's clock, not the replicas': leases are compared by one clock only.
        self.execute(
            "heartbeat",
            "INSERT INTO dialer_leases (owner, lease_until)
             VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (owner) DO UPDATE SET lease_until = excluded.lease_until",
            &[&owner, &LEASE_FOR.as_secs_f64()],
        )
        .await
        .map(drop)
    }

    pub(super) async fn end_lease(&self, owner: &str) -> Result<(), StoreError> {
        self.execute(
            "end_lease",
            "DELETE FROM dialer_leases WHERE owner = $1",
            &[&owner],
        )
        .await
        .map(drop)
    }

    pub(super) fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.prepared(op, sql, async |client, statement| {
            client.query(statement, params).await
        })
        .await
    }

    async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.prepared(op, sql, async |client, statement| {
            client.execute(statement, params).await
        })
        .await
    }

    /// Runs `sql`, prepared once per pooled connection, through `send`, within the operation's
    /// time bound; every failure is named after `op`.
    async fn prepared<T>(
        &self,
        op: &'static str,
        sql: &str,
        send: impl AsyncFnOnce(
            &tokio_postgres::Client,
            &tokio_postgres::Statement,
        ) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.timed(op, async {
            let client = self.pool.get().await.map_err(|e| self.pool_error(op, &e))?;
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(|e| self.error(op, &e))?;
            send(&client, &statement)
                .await
                .map_err(|e| self.error(op, &e))
        })
        .await
    }

    /// Bounds an operation: a database behind a dead network would otherwise hold the job.
    async fn timed<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.op_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Timeout {
                    store: self.describe.clone(),
                    op,
                    after: self.op_timeout,
                })
            })
    }

    fn error(&self, op: &'static str, error: &tokio_postgres::Error) -> StoreError {
        StoreError::Query {
            store: self.describe.clone(),
            op,
            detail: error_text(error),
        }
    }

    fn pool_error(&self, op: &'static str, error: &deadpool_postgres::PoolError) -> StoreError {
        StoreError::Query {
            store: self.describe.clone(),
            op,
            detail: pool_error_text(error),
        }
    }

    fn corrupt(&self, job_id: &str, detail: &str) -> StoreError {
        StoreError::Corrupt {
            store: self.describe.clone(),
            job_id: job_id.to_owned(),
            detail: detail.to_owned(),
        }
    }

    fn parse(
        &self,
        job_id: &str,
        state: String,
        owner: Option<String>,
        event: Option<Vec<u8>>,
        updated_ms: i64,
    ) -> Result<StoredRecord, StoreError> {
        let state: JobState = parse_state(&self.describe, job_id, &state, owner, event)?;
        Ok(StoredRecord {
            job_id: job_id.to_owned(),
            state,
            updated_at: from_unix_ms(updated_ms),
        })
    }
}

/// tokio-postgres's `Display` says only "db error"; the server's message is in the source.
fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

fn pool_error_text(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => error_text(e),
        other => other.to_string(),
    }
}

/// TLS to PostgreSQL with rustls (the stack the Genesys client uses): with `verify-full` the
/// platform's verifier or the `sslrootcert` roots check the certificate and the host name;
/// with `prefer` and `require` the session is encrypted but, as in libpq, not verified.
#[derive(Clone)]
struct RustlsConnector(Arc<rustls::ClientConfig>);

impl RustlsConnector {
    fn new(tls: &Tls) -> Result<Self, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        use rustls_platform_verifier::ConfigVerifierExt as _;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = match tls {
            Tls::Verify {
                root_cert: Some(path),
            } => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
            Tls::Verify { root_cert: None } => {
                rustls::ClientConfig::with_platform_verifier().map_err(|e| e.to_string())?
            }
            Tls::Off | Tls::Prefer | Tls::Require => {
                rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                    .with_no_client_auth()
            }
        };
        Ok(Self(Arc::new(config)))
    }
}

/// libpq's `prefer` / `require`: the handshake's signatures are checked (so the session is
/// really encrypted to whoever holds the certificate's key), the certificate itself is not.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_owned())?;
        Ok(RustlsConnect {
            config: Arc::clone(&self.0),
            name,
        })
    }
}

/// One TLS handshake to one server.
struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            Ok(RustlsStream(connector.connect(self.name, stream).await?))
        })
    }
}

/// A TLS session to PostgreSQL.
struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding would need the server certificate's hash algorithm parsed
        // from X.509; without it SCRAM still authenticates, and TLS still verifies the server.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_and_removed_and_the_password_never_shows() {
        let (config, tls) = parse_url(
            "postgres://u:hunter2@db.example:5433/d?sslmode=verify-full&application_name=x",
        )
        .unwrap();
        assert_eq!(tls, Tls::Verify { root_cert: None });
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(
            parse_url("postgres://h/d?sslmode=disable").unwrap().1,
            Tls::Off
        );
        assert_eq!(parse_url("postgres://h/d").unwrap().1, Tls::Prefer);
        let err = parse_url("postgres://u:hunter2@h/d?sslmode=sometimes").unwrap_err();
        assert!(err.contains("sslmode"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_url("mysql://u:hunter2@h/d").unwrap_err();
        assert!(
            !err.contains("hunter2") && err.contains("postgres://"),
            "{err}"
        );
    }

    #[test]
    fn sslrootcert_is_kept_for_verification_and_a_missing_file_is_named() {
        let (_, tls) =
            parse_url("postgres://h/d?sslmode=verify-ca&sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(
            tls,
            Tls::Verify {
                root_cert: Some("/etc/ca.pem".into())
            }
        );
        let err = RustlsConnector::new(&Tls::Verify {
            root_cert: Some("/nonexistent/ca.pem".into()),
        })
        .err()
        .expect("refused");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[tokio::test]
    async fn sslmode_require_encrypts_and_verify_full_checks_the_certificate() {
        let admin = super::super::suite::admin_url();
        let (client, connection) = tokio_postgres::connect(&admin, NoTls).await.unwrap();
        tokio::spawn(connection);
        let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        let connect = |mode: &str| {
            let settings = PostgresSettings::new(Secret::new(format!("{admin}?sslmode={mode}")));
            async move { PostgresStore::connect(&settings).await.map(drop) }
        };
        if ssl == "on" {
            // Debian's server presents its snakeoil certificate: encrypted under `require`,
            // refused under `verify-full` (no trusted root names 127.0.0.1).
            connect("require").await.unwrap();
            let err = connect("verify-full").await.unwrap_err();
            assert!(err.to_string().contains("certificate"), "{err}");
        } else {
            // No TLS on the server: `require` must refuse rather than fall back to plain text.
            assert!(connect("require").await.is_err());
            connect("prefer").await.unwrap();
        }
    }
}
