//! Persistence of duplex: users and their plans, the usage ledger, sessions, Stripe
//! subscriptions, processed webhook events and the audit log of plan changes. This is the only
//! crate with SQL; everything else calls the typed API of [`Store`] (or of [`Tx`] when several
//! writes must commit together).
//!
//! ## Backends
//!
//! SQLite is the embedded default (one file under the data directory, created on first run);
//! PostgreSQL is for production and for several server processes sharing one database.
//!
//! The pool is sqlx's [`AnyPool`] rather than an enum of a `SqlitePool` and a `PgPool`: every
//! query is written once, in the dialect both backends accept (`$1` placeholders — sqlx's
//! SQLite driver reads `$N` as the N-th argument —, `INSERT … ON CONFLICT … DO UPDATE …
//! RETURNING`), and runs unchanged on both, so the tests on each backend exercise the very
//! same code. The price is that `Any` carries only a few types (integers, floats, text, bytes),
//! so the schema uses portable columns: instants are Unix milliseconds, days are `YYYY-MM-DD`
//! text in UTC, money is integer micro-dollars (exact sums), durations are milliseconds. The
//! only dialect differences live in the two migration histories (`migrations/sqlite`,
//! `migrations/postgres`: identity columns and the `created_at` default) and in how a write
//! transaction starts ([`Backend`]).
//!
//! ## Concurrency
//!
//! Usage counters are incremented by a single upsert (`… DO UPDATE SET x = x + excluded.x
//! RETURNING …`), atomic on both backends, so concurrent sessions of one user and several
//! server processes on one PostgreSQL never lose an increment, and each caller gets the totals
//! that include its own increment. Multi-statement writes run in a [`Tx`]: on SQLite it starts
//! with `BEGIN IMMEDIATE` (takes the write lock up front, so two writers wait on the busy
//! timeout instead of failing to upgrade a read lock); on PostgreSQL rows are locked with a
//! no-op `UPDATE … RETURNING` before they are read, which works in both dialects.
//!
//! The frequent small writes (sessions' usage writes, every heartbeat, and the records of
//! session starts and ends) go through one writer per process on SQLite, which applies what
//! is queued in one transaction, and answers each caller (group
//! commit, `writer.rs`); on PostgreSQL each is its own transaction. A usage write returns the
//! totals the meter needs ([`UsageWritten`]), read inside its transaction.
//!
//! ## Time
//!
//! The store never reads the clock: days and instants are arguments. The one exception is the
//! database default of `users.created_at`.

pub mod testing;
mod writer;

pub use writer::{
    MAX_BATCH as WRITE_BATCH_MAX, QUEUE_CAPACITY as WRITE_QUEUE_CAPACITY, WriterStats,
};

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use sqlx::AnyConnection;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};
use time::{Date, Month, OffsetDateTime};

/// The plan every new user starts on, and the plan of a user without a paid subscription.
pub const FREE_PLAN: &str = "free";

/// Migrations, embedded so that the binary needs no files next to it: `(version,
/// description, SQLite SQL, PostgreSQL SQL)`. A test checks this list against `migrations/`.
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/sqlite/0001_initial.sql"),
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "usage_writes",
        include_str!("../../../migrations/sqlite/0002_usage_writes.sql"),
        include_str!("../../../migrations/postgres/0002_usage_writes.sql"),
    ),
    (
        3,
        "session_liveness",
        include_str!("../../../migrations/sqlite/0003_session_liveness.sql"),
        include_str!("../../../migrations/postgres/0003_session_liveness.sql"),
    ),
];

/// Versions and file names of the embedded migrations, for the test that compares them with
/// the `migrations/` folders.
pub fn embedded_migrations() -> impl Iterator<Item = (i64, &'static str)> {
    MIGRATIONS.iter().map(|(v, d, _, _)| (*v, *d))
}

/// One failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL names no backend this build supports.
    #[error("unsupported database URL scheme {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// The directory of the SQLite file could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The connection failed or the database refused a statement.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the migrations failed (or the database has migrations this build lacks).
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row the operation needs does not exist (e.g. an unknown user id).
    #[error("{0} not found")]
    NotFound(String),
    /// A stored value cannot be read back (e.g. a malformed day).
    #[error("invalid stored value: {0}")]
    Corrupt(String),
    /// SQLite's group-commit writer could not take or answer the write (see `writer.rs`).
    #[error("store writer: {0}")]
    Writer(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names, by its scheme.
    pub fn from_url(url: &str) -> Result<Backend> {
        let scheme = url.split(':').next().unwrap_or("");
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            other => Err(StoreError::UnsupportedUrl(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The SQLite URL of the database file in a data directory (created on first run).
pub fn sqlite_url_in(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("duplex.db").display())
}

/// A user, known by the subject of their auth token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub external_id: String,
    pub plan: String,
    pub stripe_customer_id: Option<String>,
    /// Lifetime free-trial allowance used so far.
    pub trial_ms_used: i64,
    pub created_at: OffsetDateTime,
}

/// An increment of usage. Every field is added to the day's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageDelta {
    pub conversation_ms: i64,
    pub stt_ms: i64,
    pub llm_prompt_tokens: i64,
    pub llm_completion_tokens: i64,
    pub tts_chars: i64,
    /// Provider cost in millionths of a US dollar (see [`usd_to_micros`]).
    pub cost_micro_usd: i64,
}

/// What a session's usage write ([`Store::add_session_usage`]) answers: whether it was
/// applied now, and the user's totals right after it, from the same transaction. A replay
/// (applied before) changes nothing and answers the current totals just the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageWritten {
    /// `false` for a replay of a write already applied.
    pub applied: bool,
    /// The user's totals for the write's day.
    pub day: DailyUsage,
    /// TTS characters of the write's calendar month (UTC), all days summed.
    pub tts_chars_month: i64,
    /// The user's lifetime free-trial use.
    pub trial_ms_used: i64,
}

/// A user's totals for one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DailyUsage {
    pub conversation_ms: i64,
    pub stt_ms: i64,
    pub llm_prompt_tokens: i64,
    pub llm_completion_tokens: i64,
    pub tts_chars: i64,
    pub cost_micro_usd: i64,
}

impl DailyUsage {
    pub fn conversation_seconds(&self) -> f64 {
        self.conversation_ms as f64 / 1000.0
    }

    pub fn cost_usd(&self) -> f64 {
        micros_to_usd(self.cost_micro_usd)
    }
}

/// Dollars to the integer micro-dollars the ledger stores (rounded to the nearest).
pub fn usd_to_micros(usd: f64) -> i64 {
    (usd * 1_000_000.0).round() as i64
}

pub fn micros_to_usd(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}

/// A plan change that was written (with its audit log row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanChange {
    pub user_id: i64,
    pub old_plan: String,
    pub new_plan: String,
    pub source: String,
    pub changed_at: OffsetDateTime,
}

/// Stripe's view of one subscription, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub stripe_subscription_id: String,
    pub stripe_customer_id: String,
    pub user_id: Option<i64>,
    /// Stripe's status (`active`, `trialing`, `past_due`, `canceled`, `unpaid`,
    /// `incomplete`, `incomplete_expired`, `paused`).
    pub status: String,
    pub price_id: Option<String>,
    /// The plan `price_id` maps to; `None` when the configuration does not name the price.
    pub plan: Option<String>,
    /// Unix seconds, as Stripe sends it.
    pub current_period_end: Option<i64>,
    /// `created` (Unix seconds) of the newest event applied; [`Subscription::NEVER`] while only
    /// a checkout has mentioned the subscription.
    pub last_event_created: i64,
}

impl Subscription {
    /// `last_event_created` of a row no subscription event has updated yet.
    pub const NEVER: i64 = -1;
}

/// A plan change from the audit log.
pub type AuditEntry = PlanChange;

/// The database: a cheap-to-clone handle on a connection pool.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite only: this process's writers take turns here, in arrival order, before they ask
    /// SQLite for its write lock. SQLite's own busy handler sleeps and polls (up to 100 ms a
    /// try), so many writers waiting on it leave the lock idle while each holds one of the
    /// pool's connections, and the readers starve for connections: measured under 1,000
    /// sessions, 10 % of them were refused at admission ("usage store unavailable"). Other
    /// processes on the same file still meet the busy handler (`busy_timeout`).
    writers: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// SQLite only: the group-commit writer of usage writes and session records (`writer.rs`).
    /// It takes the same turn as the writers above, once per batch.
    batched: std::sync::Arc<writer::Writer>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a pool on `url` (`sqlite://PATH?mode=rwc`, `sqlite::memory:`, `postgres://…`).
    /// For a SQLite file, creates its directory and switches the file to WAL (readers do not
    /// block the writer). Does not migrate: call [`Store::migrate`].
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let mut options = AnyPoolOptions::new();
        let mut sqlite_file = false;
        if backend == Backend::Sqlite {
            match sqlite_path(url) {
                None => {
                    // An in-memory database lives as long as a connection to it: keep exactly
                    // one, forever.
                    options = options
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                }
                Some(path) => {
                    sqlite_file = true;
                    options = options.after_connect(|conn, _| {
                        Box::pin(async move {
                            // SQLite's busy handler is not a fair queue: under many writers
                            // (sessions of a busy server, or two processes on one file) one
                            // can wait longer than sqlx's 5 s default, then fail with
                            // "database is locked". A write takes milliseconds; waiting up
                            // to 30 s is always better than losing a usage increment.
                            // WAL with synchronous=NORMAL: a commit does not wait for fsync;
                            // a process crash loses nothing, a power cut may lose the last
                            // commits but never corrupts the file.
                            sqlx::raw_sql(
                                "PRAGMA busy_timeout = 30000; PRAGMA synchronous = NORMAL;",
                            )
                            .execute(&mut *conn)
                            .await?;
                            Ok(())
                        })
                    });
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                            path: dir.to_owned(),
                            source,
                        })?;
                    }
                }
            }
        }
        let pool = options.connect(url).await?;
        if sqlite_file {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(Store {
            pool,
            backend,
            writers: Default::default(),
            batched: Default::default(),
        })
    }

    /// Opens the store and applies pending migrations: what the server does at startup.
    pub async fn open(url: &str) -> Result<Store> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations this build embeds that the database lacks. Safe to run from
    /// several processes at once: sqlx takes an advisory lock on PostgreSQL; SQLite has no
    /// such lock, so there two starters can race to the same migration, the loser's
    /// transaction rolls back ("table already exists"), and a retry finds it applied.
    pub async fn migrate(&self) -> Result<()> {
        // Bounded: a real failure (a broken migration) still surfaces after these tries.
        const SQLITE_TRIES: u32 = 5;
        let mut attempt = 1;
        loop {
            match self.migrate_once().await {
                Err(e) if self.backend == Backend::Sqlite && attempt < SQLITE_TRIES => {
                    tracing::debug!(error = %e, attempt, "migration raced another starter; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(attempt)))
                        .await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn migrate_once(&self) -> Result<()> {
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sqlite, postgres)| {
                let sql = match self.backend {
                    Backend::Sqlite => sqlite,
                    Backend::Postgres => postgres,
                };
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
            .run(&self.pool)
            .await?;
        Ok(())
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a write transaction; dropping the [`Tx`] without [`Tx::commit`] rolls it back.
    pub async fn begin(&self) -> Result<Tx> {
        let writer = self.writer_turn().await;
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(Tx {
            tx,
            _writer: writer,
        })
    }

    /// SQLite: waits for this process's turn to write (see the `writers` field); PostgreSQL
    /// needs no turn.
    async fn writer_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self.backend {
            Backend::Sqlite => Some(self.writers.clone().lock_owned().await),
            Backend::Postgres => None,
        }
    }

    /// The user with this external id, created on plan `free` if new.
    pub async fn ensure_user(&self, external_id: &str) -> Result<User> {
        // Read first: nearly every connection is a known user, and on SQLite even an
        // `INSERT … DO NOTHING` takes the write lock, waiting behind the usage writes (on
        // SQLite's busy handler, holding a pool connection) to insert nothing.
        if let Some(user) = self.user_by_external_id(external_id).await? {
            return Ok(user);
        }
        let _writer = self.writer_turn().await;
        let mut conn = self.pool.acquire().await?;
        ensure_user(&mut conn, external_id).await
    }

    /// Figures of SQLite's group-commit writer (see [`WRITE_BATCH_MAX`]); zeros on PostgreSQL.
    pub fn writer_stats(&self) -> WriterStats {
        self.batched.counters.stats()
    }

    /// Applies one of the batched writes: on SQLite through the group-commit writer, on
    /// PostgreSQL in its own transaction.
    async fn write(&self, op: WriteOp) -> Result<Written> {
        match self.backend {
            Backend::Sqlite => self.batched.write(&self.pool, &self.writers, op).await,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                let written = apply(&mut tx, &op).await?;
                tx.commit().await?;
                Ok(written)
            }
        }
    }

    pub async fn user_by_external_id(&self, external_id: &str) -> Result<Option<User>> {
        let mut conn = self.pool.acquire().await?;
        user_where(&mut conn, UserKey::External(external_id)).await
    }

    pub async fn user_by_id(&self, user_id: i64) -> Result<Option<User>> {
        let mut conn = self.pool.acquire().await?;
        user_where(&mut conn, UserKey::Id(user_id)).await
    }

    /// Sets a user's plan and writes the audit log row in the same transaction. Returns the
    /// change, or `None` when the user already had this plan (nothing written).
    pub async fn set_plan(
        &self,
        user_id: i64,
        plan: &str,
        source: &str,
        now: OffsetDateTime,
    ) -> Result<Option<PlanChange>> {
        let mut tx = self.begin().await?;
        let change = tx.set_plan(user_id, plan, source, now).await?;
        tx.commit().await?;
        Ok(change)
    }

    /// The audit log of one user's plan changes, oldest first.
    pub async fn plan_changes(&self, user_id: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT user_id, old_plan, new_plan, source, changed_at FROM plan_changes
             WHERE user_id = $1 ORDER BY changed_at, id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PlanChange {
                    user_id: r.try_get("user_id")?,
                    old_plan: r.try_get("old_plan")?,
                    new_plan: r.try_get("new_plan")?,
                    source: r.try_get("source")?,
                    changed_at: from_ms(r.try_get("changed_at")?)?,
                })
            })
            .collect()
    }

    /// Adds `delta` to the user's totals for `day` (UTC) in one atomic statement and returns
    /// the new totals, which include every increment committed before, from any session or
    /// server process.
    pub async fn add_usage(
        &self,
        user_id: i64,
        day: Date,
        delta: UsageDelta,
    ) -> Result<DailyUsage> {
        let mut conn = self.pool.acquire().await?;
        add_usage(&mut conn, user_id, day, delta).await
    }

    /// Applies usage write `seq` of a session exactly once: adds `delta` to the user's totals
    /// for `day` and `trial_ms` to their lifetime trial use, in one transaction with the
    /// record of `seq`, and returns the user's totals after it (read in the same transaction,
    /// so a heartbeat needs no reads after its write). `applied` is `false`, and nothing
    /// changed, when the session already had a write numbered `seq` or higher applied: a
    /// replay of a write whose answer was lost (it timed out after committing); the totals
    /// are still the current ones. A session's `seq`s must only grow, one write at a time
    /// (what `duplex_metering::SessionMeter` does), so no write is ever skipped. The write also
    /// stamps the session's row with `at` (its liveness, see `reap_silent_sessions`). On
    /// SQLite concurrent writes share a transaction (group commit, see [`WRITE_BATCH_MAX`]).
    #[allow(clippy::too_many_arguments)] // one write's identity, amounts and time, all required
    pub async fn add_session_usage(
        &self,
        session_id: &str,
        seq: u64,
        user_id: i64,
        day: Date,
        delta: UsageDelta,
        trial_ms: i64,
        at: OffsetDateTime,
    ) -> Result<UsageWritten> {
        let seq = i64::try_from(seq)
            .map_err(|_| StoreError::Corrupt(format!("usage write seq {seq} above i64")))?;
        let op = WriteOp::Usage(SessionUsageWrite {
            session_id: session_id.to_owned(),
            seq,
            user_id,
            day,
            delta,
            trial_ms,
            at,
        });
        match self.write(op).await? {
            Written::Usage(written) => Ok(written),
            other => Err(StoreError::Writer(format!(
                "a usage write was answered with {other:?}"
            ))),
        }
    }
}

/// One usage write of a session (see [`Store::add_session_usage`]).
#[derive(Debug, Clone)]
pub(crate) struct SessionUsageWrite {
    session_id: String,
    seq: i64,
    user_id: i64,
    day: Date,
    delta: UsageDelta,
    trial_ms: i64,
    at: OffsetDateTime,
}

/// The writes SQLite's writer batches (`writer.rs`).
#[derive(Debug, Clone)]
pub(crate) enum WriteOp {
    Usage(SessionUsageWrite),
    SessionStarted {
        session_id: String,
        user_id: i64,
        at: OffsetDateTime,
    },
    SessionEnded {
        session_id: String,
        at: OffsetDateTime,
        reason: String,
    },
}

/// The answer to a [`WriteOp`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Written {
    Usage(UsageWritten),
    SessionStarted,
    /// Whether this was the session's first end.
    SessionEnded(bool),
}

/// Applies one write on a connection inside a transaction (its caller commits).
pub(crate) async fn apply(conn: &mut AnyConnection, op: &WriteOp) -> Result<Written> {
    match op {
        WriteOp::Usage(w) => session_usage(conn, w).await.map(Written::Usage),
        WriteOp::SessionStarted {
            session_id,
            user_id,
            at,
        } => {
            sqlx::query("INSERT INTO sessions (id, user_id, started_at) VALUES ($1, $2, $3)")
                .bind(session_id)
                .bind(user_id)
                .bind(to_ms(*at))
                .execute(&mut *conn)
                .await?;
            Ok(Written::SessionStarted)
        }
        WriteOp::SessionEnded {
            session_id,
            at,
            reason,
        } => {
            let done = sqlx::query(
                "UPDATE sessions SET ended_at = $2, close_reason = $3
                 WHERE id = $1 AND ended_at IS NULL",
            )
            .bind(session_id)
            .bind(to_ms(*at))
            .bind(reason)
            .execute(&mut *conn)
            .await?;
            Ok(Written::SessionEnded(done.rows_affected() == 1))
        }
    }
}

/// The statements of one session usage write, inside its caller's transaction.
async fn session_usage(conn: &mut AnyConnection, w: &SessionUsageWrite) -> Result<UsageWritten> {
    // `DO UPDATE … WHERE` leaves the row alone (0 rows affected) on both backends when
    // the condition fails: that is the replay.
    let applied = sqlx::query(
        "INSERT INTO usage_writes (session_id, user_id, last_seq) VALUES ($1, $2, $3)
         ON CONFLICT (session_id) DO UPDATE SET last_seq = excluded.last_seq
         WHERE usage_writes.last_seq < excluded.last_seq",
    )
    .bind(&w.session_id)
    .bind(w.user_id)
    .bind(w.seq)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    let day = if applied {
        let day = add_usage(conn, w.user_id, w.day, w.delta).await?;
        // The session is alive as of this write (see `reap_silent_sessions`).
        sqlx::query("UPDATE sessions SET last_seen_at = $2 WHERE id = $1 AND ended_at IS NULL")
            .bind(&w.session_id)
            .bind(to_ms(w.at))
            .execute(&mut *conn)
            .await?;
        day
    } else {
        usage_for_day(conn, w.user_id, w.day).await?
    };
    // The trial use and the month's TTS characters in one statement (a round trip fewer on
    // the writer's serialized path); the counter is updated only when it changes: on
    // PostgreSQL an UPDATE writes a new row version (and locks the user) even when it adds 0.
    let (first, next) = month_bounds(w.day.year(), w.day.month())?;
    let row = if applied && w.trial_ms != 0 {
        sqlx::query(
            "UPDATE users SET trial_ms_used = trial_ms_used + $2 WHERE id = $1
             RETURNING trial_ms_used, (SELECT CAST(COALESCE(SUM(tts_chars), 0) AS BIGINT)
                 FROM usage_daily WHERE user_id = $1 AND day >= $3 AND day < $4) AS tts_month",
        )
        .bind(w.user_id)
        .bind(w.trial_ms)
        .bind(day_key(first))
        .bind(day_key(next))
        .fetch_optional(&mut *conn)
        .await?
    } else {
        sqlx::query(
            "SELECT trial_ms_used, (SELECT CAST(COALESCE(SUM(tts_chars), 0) AS BIGINT)
                 FROM usage_daily WHERE user_id = $1 AND day >= $2 AND day < $3) AS tts_month
             FROM users WHERE id = $1",
        )
        .bind(w.user_id)
        .bind(day_key(first))
        .bind(day_key(next))
        .fetch_optional(&mut *conn)
        .await?
    };
    let row = row.ok_or_else(|| StoreError::NotFound(format!("user {}", w.user_id)))?;
    let trial_ms_used: i64 = row.try_get("trial_ms_used")?;
    let tts_chars_month: i64 = row.try_get("tts_month")?;
    Ok(UsageWritten {
        applied,
        day,
        tts_chars_month,
        trial_ms_used,
    })
}

async fn add_usage(
    conn: &mut AnyConnection,
    user_id: i64,
    day: Date,
    delta: UsageDelta,
) -> Result<DailyUsage> {
    let row = sqlx::query(
        "INSERT INTO usage_daily (user_id, day, conversation_ms, stt_ms, llm_prompt_tokens,
             llm_completion_tokens, tts_chars, cost_micro_usd)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (user_id, day) DO UPDATE SET
             conversation_ms = usage_daily.conversation_ms + excluded.conversation_ms,
             stt_ms = usage_daily.stt_ms + excluded.stt_ms,
             llm_prompt_tokens = usage_daily.llm_prompt_tokens + excluded.llm_prompt_tokens,
             llm_completion_tokens =
                 usage_daily.llm_completion_tokens + excluded.llm_completion_tokens,
             tts_chars = usage_daily.tts_chars + excluded.tts_chars,
             cost_micro_usd = usage_daily.cost_micro_usd + excluded.cost_micro_usd
         RETURNING conversation_ms, stt_ms, llm_prompt_tokens, llm_completion_tokens,
             tts_chars, cost_micro_usd",
    )
    .bind(user_id)
    .bind(day_key(day))
    .bind(delta.conversation_ms)
    .bind(delta.stt_ms)
    .bind(delta.llm_prompt_tokens)
    .bind(delta.llm_completion_tokens)
    .bind(delta.tts_chars)
    .bind(delta.cost_micro_usd)
    .fetch_one(&mut *conn)
    .await?;
    daily_usage(&row)
}

async fn usage_for_day(conn: &mut AnyConnection, user_id: i64, day: Date) -> Result<DailyUsage> {
    let row = sqlx::query(
        "SELECT conversation_ms, stt_ms, llm_prompt_tokens, llm_completion_tokens, tts_chars,
             cost_micro_usd
         FROM usage_daily WHERE user_id = $1 AND day = $2",
    )
    .bind(user_id)
    .bind(day_key(day))
    .fetch_optional(&mut *conn)
    .await?;
    row.map_or(Ok(DailyUsage::default()), |r| daily_usage(&r))
}

/// The first day of a calendar month and of the next.
fn month_bounds(year: i32, month: Month) -> Result<(Date, Date)> {
    let first = Date::from_calendar_date(year, month, 1)
        .map_err(|e| StoreError::Corrupt(format!("month {year}-{month}: {e}")))?;
    let (next_year, next_month) = match month {
        Month::December => (year + 1, Month::January),
        m => (year, m.next()),
    };
    let next = Date::from_calendar_date(next_year, next_month, 1)
        .map_err(|e| StoreError::Corrupt(format!("month {next_year}-{next_month}: {e}")))?;
    Ok((first, next))
}

async fn tts_chars_for_month(
    conn: &mut AnyConnection,
    user_id: i64,
    year: i32,
    month: Month,
) -> Result<i64> {
    let (first, next) = month_bounds(year, month)?;
    // SUM of BIGINT is NUMERIC on PostgreSQL, which `Any` cannot carry: cast it back.
    let total: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(tts_chars), 0) AS BIGINT) FROM usage_daily
         WHERE user_id = $1 AND day >= $2 AND day < $3",
    )
    .bind(user_id)
    .bind(day_key(first))
    .bind(day_key(next))
    .fetch_one(&mut *conn)
    .await?;
    Ok(total)
}

impl Store {
    /// The user's totals for `day` (zeros when nothing was recorded).
    pub async fn usage_for_day(&self, user_id: i64, day: Date) -> Result<DailyUsage> {
        let mut conn = self.pool.acquire().await?;
        usage_for_day(&mut conn, user_id, day).await
    }

    /// TTS characters the user used in a calendar month (UTC), summed from the ledger.
    pub async fn tts_chars_for_month(&self, user_id: i64, year: i32, month: Month) -> Result<i64> {
        let mut conn = self.pool.acquire().await?;
        tts_chars_for_month(&mut conn, user_id, year, month).await
    }

    /// Adds to the user's lifetime free-trial usage; returns the new total.
    pub async fn add_trial_ms(&self, user_id: i64, ms: i64) -> Result<i64> {
        let total: Option<i64> = sqlx::query_scalar(
            "UPDATE users SET trial_ms_used = trial_ms_used + $2 WHERE id = $1
             RETURNING trial_ms_used",
        )
        .bind(user_id)
        .bind(ms)
        .fetch_optional(&self.pool)
        .await?;
        total.ok_or_else(|| StoreError::NotFound(format!("user {user_id}")))
    }

    /// Recorded provider cost of one UTC day over all users, in micro-dollars (for
    /// `MAX_DAILY_SPEND_USD`; [`micros_to_usd`] converts).
    pub async fn spend_for_day_micros(&self, day: Date) -> Result<i64> {
        let total: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(cost_micro_usd), 0) AS BIGINT) FROM usage_daily
             WHERE day = $1",
        )
        .bind(day_key(day))
        .fetch_one(&self.pool)
        .await?;
        Ok(total)
    }

    /// Recorded provider cost of one UTC day over all users, in US dollars.
    pub async fn spend_for_day(&self, day: Date) -> Result<f64> {
        Ok(micros_to_usd(self.spend_for_day_micros(day).await?))
    }

    /// Records the start of a session (on SQLite batched with other writes, like usage).
    pub async fn session_started(
        &self,
        session_id: &str,
        user_id: i64,
        at: OffsetDateTime,
    ) -> Result<()> {
        let op = WriteOp::SessionStarted {
            session_id: session_id.to_owned(),
            user_id,
            at,
        };
        match self.write(op).await? {
            Written::SessionStarted => Ok(()),
            other => Err(StoreError::Writer(format!(
                "a session start was answered with {other:?}"
            ))),
        }
    }

    /// Records the end of a session. The first end wins: returns `false` (and changes
    /// nothing) when the session already ended or was never started.
    pub async fn session_ended(
        &self,
        session_id: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<bool> {
        let op = WriteOp::SessionEnded {
            session_id: session_id.to_owned(),
            at,
            reason: reason.to_owned(),
        };
        match self.write(op).await? {
            Written::SessionEnded(first) => Ok(first),
            other => Err(StoreError::Writer(format!(
                "a session end was answered with {other:?}"
            ))),
        }
    }

    /// A session's `(started_at, ended_at, close_reason)`.
    pub async fn session(
        &self,
        session_id: &str,
    ) -> Result<Option<(OffsetDateTime, Option<OffsetDateTime>, Option<String>)>> {
        let row =
            sqlx::query("SELECT started_at, ended_at, close_reason FROM sessions WHERE id = $1")
                .bind(session_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            let ended: Option<i64> = r.try_get("ended_at")?;
            Ok((
                from_ms(r.try_get("started_at")?)?,
                ended.map(from_ms).transpose()?,
                r.try_get("close_reason")?,
            ))
        })
        .transpose()
    }

    /// Records a webhook event in its own transaction: `true` the first time. Effects that
    /// must happen exactly once go through [`Tx::record_webhook_event`] instead.
    pub async fn record_webhook_event(
        &self,
        event_id: &str,
        event_type: &str,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let first = tx.record_webhook_event(event_id, event_type, now).await?;
        tx.commit().await?;
        Ok(first)
    }

    /// A subscription by its Stripe id.
    pub async fn subscription(&self, stripe_subscription_id: &str) -> Result<Option<Subscription>> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(SELECT_SUBSCRIPTION)
            .bind(stripe_subscription_id)
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|r| subscription(&r)).transpose()
    }
}

/// What [`Store::top_users`] ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopBy {
    /// Recorded provider cost.
    Cost,
    /// Metered conversation time.
    Seconds,
}

/// One user's usage on one day, with who they are (operator reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDayUsage {
    pub day: Date,
    pub user_id: i64,
    pub external_id: String,
    pub plan: String,
    pub usage: DailyUsage,
}

/// A session that never recorded its end, closed by [`Store::close_stale_sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleSession {
    pub session_id: String,
    pub external_id: String,
    pub started_at: OffsetDateTime,
}

/// Operator queries and repairs (`duplex admin`). Read-only unless the name says otherwise.
impl Store {
    /// The `limit` users with the most cost (or seconds) on `day`, most first; ties by user.
    pub async fn top_users(&self, day: Date, by: TopBy, limit: u32) -> Result<Vec<UserDayUsage>> {
        // Two fixed statements: the ORDER BY never comes from input.
        let sql = match by {
            TopBy::Cost => {
                "SELECT u.day, u.user_id, users.external_id, users.plan, u.conversation_ms,
                     u.stt_ms, u.llm_prompt_tokens, u.llm_completion_tokens, u.tts_chars,
                     u.cost_micro_usd
                 FROM usage_daily u JOIN users ON users.id = u.user_id
                 WHERE u.day = $1
                 ORDER BY u.cost_micro_usd DESC, u.conversation_ms DESC, users.external_id
                 LIMIT $2"
            }
            TopBy::Seconds => {
                "SELECT u.day, u.user_id, users.external_id, users.plan, u.conversation_ms,
                     u.stt_ms, u.llm_prompt_tokens, u.llm_completion_tokens, u.tts_chars,
                     u.cost_micro_usd
                 FROM usage_daily u JOIN users ON users.id = u.user_id
                 WHERE u.day = $1
                 ORDER BY u.conversation_ms DESC, u.cost_micro_usd DESC, users.external_id
                 LIMIT $2"
            }
        };
        let rows = sqlx::query(sql)
            .bind(day_key(day))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_day_usage).collect()
    }

    /// Every user's usage of every day in `from..=to`, by day then user (the CSV export).
    pub async fn usage_between(&self, from: Date, to: Date) -> Result<Vec<UserDayUsage>> {
        let rows = sqlx::query(
            "SELECT u.day, u.user_id, users.external_id, users.plan, u.conversation_ms, u.stt_ms,
                 u.llm_prompt_tokens, u.llm_completion_tokens, u.tts_chars, u.cost_micro_usd
             FROM usage_daily u JOIN users ON users.id = u.user_id
             WHERE u.day >= $1 AND u.day <= $2 ORDER BY u.day, users.external_id",
        )
        .bind(day_key(from))
        .bind(day_key(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_day_usage).collect()
    }

    /// One user's usage per day in `from..=to`, oldest first (days without usage are absent).
    pub async fn user_usage_between(
        &self,
        user_id: i64,
        from: Date,
        to: Date,
    ) -> Result<Vec<UserDayUsage>> {
        let rows = sqlx::query(
            "SELECT u.day, u.user_id, users.external_id, users.plan, u.conversation_ms, u.stt_ms,
                 u.llm_prompt_tokens, u.llm_completion_tokens, u.tts_chars, u.cost_micro_usd
             FROM usage_daily u JOIN users ON users.id = u.user_id
             WHERE u.user_id = $1 AND u.day >= $2 AND u.day <= $3 ORDER BY u.day",
        )
        .bind(user_id)
        .bind(day_key(from))
        .bind(day_key(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_day_usage).collect()
    }

    /// Every subscription linked to a user, newest event first.
    pub async fn subscriptions_for_user(&self, user_id: i64) -> Result<Vec<Subscription>> {
        let mut tx = self.begin().await?;
        let subs = tx.subscriptions_for_user(user_id).await?;
        tx.rollback().await?;
        Ok(subs)
    }

    /// Sessions of a user that are still open (no end recorded), oldest first.
    pub async fn open_sessions(&self, user_id: i64) -> Result<Vec<StaleSession>> {
        let rows = sqlx::query(
            "SELECT s.id, users.external_id, s.started_at FROM sessions s
             JOIN users ON users.id = s.user_id
             WHERE s.user_id = $1 AND s.ended_at IS NULL ORDER BY s.started_at, s.id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stale_session).collect()
    }

    /// Sessions without an end that started before `started_before`, oldest first.
    pub async fn stale_sessions(
        &self,
        started_before: OffsetDateTime,
    ) -> Result<Vec<StaleSession>> {
        let rows = sqlx::query(
            "SELECT s.id, users.external_id, s.started_at FROM sessions s
             JOIN users ON users.id = s.user_id
             WHERE s.ended_at IS NULL AND s.started_at < $1 ORDER BY s.started_at, s.id",
        )
        .bind(to_ms(started_before))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stale_session).collect()
    }

    /// Writes an end (`now`, `reason`) to every session started before `started_before` that
    /// has none: sessions of a server that crashed or was killed. Returns what it closed.
    /// Usage is not touched: it was written by the session's heartbeats.
    pub async fn close_stale_sessions(
        &self,
        started_before: OffsetDateTime,
        now: OffsetDateTime,
        reason: &str,
    ) -> Result<Vec<StaleSession>> {
        self.close_open_sessions(
            "SELECT s.id, users.external_id, s.started_at FROM sessions s
             JOIN users ON users.id = s.user_id
             WHERE s.ended_at IS NULL AND s.started_at < $1 ORDER BY s.started_at, s.id",
            started_before,
            now,
            reason,
        )
        .await
    }
}

impl Store {
    /// Writes an end (`now`, `reason`) to every open session whose last usage write (or, with
    /// none, its start) is before `silent_since`: sessions of a server that crashed or was
    /// killed. Safe with several servers on one database: a live session stamps its row with
    /// every heartbeat write. Returns what it closed.
    pub async fn reap_silent_sessions(
        &self,
        silent_since: OffsetDateTime,
        now: OffsetDateTime,
        reason: &str,
    ) -> Result<Vec<StaleSession>> {
        self.close_open_sessions(
            "SELECT s.id, users.external_id, s.started_at FROM sessions s
             JOIN users ON users.id = s.user_id
             WHERE s.ended_at IS NULL AND COALESCE(s.last_seen_at, s.started_at) < $1
             ORDER BY s.started_at, s.id",
            silent_since,
            now,
            reason,
        )
        .await
    }

    /// Ends (`now`, `reason`) every open session that `select` (with `$1` = `before`) lists, in
    /// one transaction; returns them in its order.
    async fn close_open_sessions(
        &self,
        select: &'static str,
        before: OffsetDateTime,
        now: OffsetDateTime,
        reason: &str,
    ) -> Result<Vec<StaleSession>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(select)
            .bind(to_ms(before))
            .fetch_all(&mut *tx.tx)
            .await?;
        let stale = rows.iter().map(stale_session).collect::<Result<Vec<_>>>()?;
        for s in &stale {
            sqlx::query(
                "UPDATE sessions SET ended_at = $2, close_reason = $3
                 WHERE id = $1 AND ended_at IS NULL",
            )
            .bind(&s.session_id)
            .bind(to_ms(now))
            .bind(reason)
            .execute(&mut *tx.tx)
            .await?;
        }
        tx.commit().await?;
        Ok(stale)
    }
}

fn user_day_usage(r: &AnyRow) -> Result<UserDayUsage> {
    let day: String = r.try_get("day")?;
    Ok(UserDayUsage {
        day: parse_day_key(&day)?,
        user_id: r.try_get("user_id")?,
        external_id: r.try_get("external_id")?,
        plan: r.try_get("plan")?,
        usage: daily_usage(r)?,
    })
}

fn stale_session(r: &AnyRow) -> Result<StaleSession> {
    Ok(StaleSession {
        session_id: r.try_get("id")?,
        external_id: r.try_get("external_id")?,
        started_at: from_ms(r.try_get("started_at")?)?,
    })
}

/// The day a ledger key (`YYYY-MM-DD`) names.
pub fn parse_day_key(key: &str) -> Result<Date> {
    let corrupt = || StoreError::Corrupt(format!("day {key:?}"));
    let mut parts = key.splitn(3, '-');
    let mut next = || parts.next().ok_or_else(corrupt);
    let (y, m, d) = (next()?, next()?, next()?);
    let y: i32 = y.parse().map_err(|_| corrupt())?;
    let m: u8 = m.parse().map_err(|_| corrupt())?;
    let d: u8 = d.parse().map_err(|_| corrupt())?;
    let month = Month::try_from(m).map_err(|_| corrupt())?;
    Date::from_calendar_date(y, month, d).map_err(|_| corrupt())
}

/// A write transaction: the operations whose effects must commit together (a webhook event
/// and what it changes). Rolls back when dropped without [`Tx::commit`].
pub struct Tx {
    // Declared before the turn: a transaction dropped without commit rolls back before the
    // next writer's turn begins.
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Tx {
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// Records that a webhook event is being applied: `true` the first time, `false` when it
    /// was applied before (the caller then changes nothing). Concurrent deliveries of one
    /// event on PostgreSQL: the second waits for the first transaction and then sees `false`
    /// (or `true`, if the first rolled back).
    pub async fn record_webhook_event(
        &mut self,
        event_id: &str,
        event_type: &str,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO webhook_events (event_id, event_type, processed_at) VALUES ($1, $2, $3)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(event_type)
        .bind(to_ms(now))
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn ensure_user(&mut self, external_id: &str) -> Result<User> {
        ensure_user(&mut self.tx, external_id).await
    }

    pub async fn user_by_id(&mut self, user_id: i64) -> Result<Option<User>> {
        user_where(&mut self.tx, UserKey::Id(user_id)).await
    }

    pub async fn user_by_stripe_customer(&mut self, customer_id: &str) -> Result<Option<User>> {
        user_where(&mut self.tx, UserKey::StripeCustomer(customer_id)).await
    }

    /// Links a Stripe customer to a user, and every subscription of that customer without a
    /// user to them. One customer belongs to one user: a customer linked to another user
    /// before moves to this one (the newest checkout decides).
    pub async fn link_stripe_customer(&mut self, user_id: i64, customer_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE users SET stripe_customer_id = NULL
             WHERE stripe_customer_id = $1 AND id <> $2",
        )
        .bind(customer_id)
        .bind(user_id)
        .execute(&mut *self.tx)
        .await?;
        let done = sqlx::query("UPDATE users SET stripe_customer_id = $2 WHERE id = $1")
            .bind(user_id)
            .bind(customer_id)
            .execute(&mut *self.tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        sqlx::query(
            "UPDATE subscriptions SET user_id = $1
             WHERE stripe_customer_id = $2 AND (user_id IS NULL OR user_id <> $1)",
        )
        .bind(user_id)
        .bind(customer_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Sets a user's plan and writes the audit log row. `None` when the plan is unchanged.
    pub async fn set_plan(
        &mut self,
        user_id: i64,
        plan: &str,
        source: &str,
        now: OffsetDateTime,
    ) -> Result<Option<PlanChange>> {
        // A no-op update locks the row on PostgreSQL (SQLite's IMMEDIATE transaction already
        // holds the write lock) and returns the current plan in both dialects.
        let old: Option<String> =
            sqlx::query_scalar("UPDATE users SET plan = plan WHERE id = $1 RETURNING plan")
                .bind(user_id)
                .fetch_optional(&mut *self.tx)
                .await?;
        let old = old.ok_or_else(|| StoreError::NotFound(format!("user {user_id}")))?;
        if old == plan {
            return Ok(None);
        }
        sqlx::query("UPDATE users SET plan = $2 WHERE id = $1")
            .bind(user_id)
            .bind(plan)
            .execute(&mut *self.tx)
            .await?;
        sqlx::query(
            "INSERT INTO plan_changes (user_id, old_plan, new_plan, source, changed_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user_id)
        .bind(&old)
        .bind(plan)
        .bind(source)
        .bind(to_ms(now))
        .execute(&mut *self.tx)
        .await?;
        Ok(Some(PlanChange {
            user_id,
            old_plan: old,
            new_plan: plan.to_owned(),
            source: source.to_owned(),
            changed_at: now,
        }))
    }

    /// The subscription with this id, locked until the transaction ends; created first (status
    /// `incomplete`, no plan, `last_event_created` = [`Subscription::NEVER`]) if unknown, so
    /// that two events about one subscription are applied one after the other even when two
    /// server processes receive them at once.
    pub async fn lock_subscription(
        &mut self,
        stripe_subscription_id: &str,
        stripe_customer_id: &str,
        now: OffsetDateTime,
    ) -> Result<Subscription> {
        sqlx::query(
            "INSERT INTO subscriptions (stripe_subscription_id, stripe_customer_id, status,
                 last_event_created, updated_at)
             VALUES ($1, $2, 'incomplete', $3, $4)
             ON CONFLICT (stripe_subscription_id) DO NOTHING",
        )
        .bind(stripe_subscription_id)
        .bind(stripe_customer_id)
        .bind(Subscription::NEVER)
        .bind(to_ms(now))
        .execute(&mut *self.tx)
        .await?;
        let row = sqlx::query(
            "UPDATE subscriptions SET status = status WHERE stripe_subscription_id = $1
             RETURNING stripe_subscription_id, stripe_customer_id, user_id, status, price_id,
                 plan, current_period_end, last_event_created",
        )
        .bind(stripe_subscription_id)
        .fetch_one(&mut *self.tx)
        .await?;
        subscription(&row)
    }

    /// Writes a subscription's state (the row must exist: see [`Tx::lock_subscription`]).
    pub async fn update_subscription(
        &mut self,
        s: &Subscription,
        now: OffsetDateTime,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE subscriptions SET stripe_customer_id = $2, user_id = $3, status = $4,
                 price_id = $5, plan = $6, current_period_end = $7, last_event_created = $8,
                 updated_at = $9
             WHERE stripe_subscription_id = $1",
        )
        .bind(&s.stripe_subscription_id)
        .bind(&s.stripe_customer_id)
        .bind(s.user_id)
        .bind(&s.status)
        .bind(&s.price_id)
        .bind(&s.plan)
        .bind(s.current_period_end)
        .bind(s.last_event_created)
        .bind(to_ms(now))
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotFound(format!(
                "subscription {}",
                s.stripe_subscription_id
            )));
        }
        Ok(())
    }

    /// Every subscription linked to a user, newest event first.
    pub async fn subscriptions_for_user(&mut self, user_id: i64) -> Result<Vec<Subscription>> {
        let rows = sqlx::query(
            "SELECT stripe_subscription_id, stripe_customer_id, user_id, status, price_id, plan,
                 current_period_end, last_event_created
             FROM subscriptions WHERE user_id = $1
             ORDER BY last_event_created DESC, stripe_subscription_id",
        )
        .bind(user_id)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(subscription).collect()
    }
}

const SELECT_SUBSCRIPTION: &str = "SELECT stripe_subscription_id, stripe_customer_id, user_id,
     status, price_id, plan, current_period_end, last_event_created
     FROM subscriptions WHERE stripe_subscription_id = $1";

enum UserKey<'a> {
    Id(i64),
    External(&'a str),
    StripeCustomer(&'a str),
}

async fn ensure_user(conn: &mut AnyConnection, external_id: &str) -> Result<User> {
    sqlx::query("INSERT INTO users (external_id) VALUES ($1) ON CONFLICT (external_id) DO NOTHING")
        .bind(external_id)
        .execute(&mut *conn)
        .await?;
    // Users are never deleted, so the row exists now.
    user_where(conn, UserKey::External(external_id))
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("user {external_id:?} just inserted")))
}

async fn user_where(conn: &mut AnyConnection, key: UserKey<'_>) -> Result<Option<User>> {
    let query = match key {
        UserKey::Id(id) => sqlx::query(
            "SELECT id, external_id, plan, stripe_customer_id, trial_ms_used, created_at
             FROM users WHERE id = $1",
        )
        .bind(id),
        UserKey::External(external) => sqlx::query(
            "SELECT id, external_id, plan, stripe_customer_id, trial_ms_used, created_at
             FROM users WHERE external_id = $1",
        )
        .bind(external),
        UserKey::StripeCustomer(customer) => sqlx::query(
            "SELECT id, external_id, plan, stripe_customer_id, trial_ms_used, created_at
             FROM users WHERE stripe_customer_id = $1",
        )
        .bind(customer),
    };
    let row = query.fetch_optional(&mut *conn).await?;
    row.map(|r| {
        Ok(User {
            id: r.try_get("id")?,
            external_id: r.try_get("external_id")?,
            plan: r.try_get("plan")?,
            stripe_customer_id: r.try_get("stripe_customer_id")?,
            trial_ms_used: r.try_get("trial_ms_used")?,
            created_at: from_ms(r.try_get("created_at")?)?,
        })
    })
    .transpose()
}

fn daily_usage(r: &AnyRow) -> Result<DailyUsage> {
    Ok(DailyUsage {
        conversation_ms: r.try_get("conversation_ms")?,
        stt_ms: r.try_get("stt_ms")?,
        llm_prompt_tokens: r.try_get("llm_prompt_tokens")?,
        llm_completion_tokens: r.try_get("llm_completion_tokens")?,
        tts_chars: r.try_get("tts_chars")?,
        cost_micro_usd: r.try_get("cost_micro_usd")?,
    })
}

fn subscription(r: &AnyRow) -> Result<Subscription> {
    Ok(Subscription {
        stripe_subscription_id: r.try_get("stripe_subscription_id")?,
        stripe_customer_id: r.try_get("stripe_customer_id")?,
        user_id: r.try_get("user_id")?,
        status: r.try_get("status")?,
        price_id: r.try_get("price_id")?,
        plan: r.try_get("plan")?,
        current_period_end: r.try_get("current_period_end")?,
        last_event_created: r.try_get("last_event_created")?,
    })
}

/// The ledger's key of a UTC day: `YYYY-MM-DD` (sorts like the dates it names).
pub fn day_key(day: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn to_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn from_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms} ms: {e}")))
}

/// The file of a SQLite URL, or `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let memory =
        path.is_empty() || path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory");
    (!memory).then(|| PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://data/duplex.db?mode=rwc"),
            Some(PathBuf::from("data/duplex.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///var/lib/duplex/duplex.db"),
            Some(PathBuf::from("/var/lib/duplex/duplex.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://x.db?mode=memory"), None);
    }

    #[test]
    fn backends_by_scheme() {
        assert_eq!(
            Backend::from_url("sqlite::memory:").unwrap(),
            Backend::Sqlite
        );
        assert_eq!(
            Backend::from_url("postgres://u:p@h/db").unwrap(),
            Backend::Postgres
        );
        let e = Backend::from_url("mysql://u:secret@h/db").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn days_and_money() {
        let d = Date::from_calendar_date(2025, Month::March, 7).unwrap();
        assert_eq!(day_key(d), "2025-03-07");
        assert_eq!(parse_day_key("2025-03-07").unwrap(), d);
        assert!(parse_day_key("2025-13-07").is_err());
        assert!(parse_day_key("yesterday").is_err());
        assert_eq!(usd_to_micros(0.0123456), 12346);
        assert_eq!(micros_to_usd(2_500_000), 2.5);
    }
}
