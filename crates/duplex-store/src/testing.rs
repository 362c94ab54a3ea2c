//! Throwaway databases for tests (of this crate, the billing crate and the server): every
//! test runs once on a fresh SQLite file and once on a fresh PostgreSQL database.
//!
//! PostgreSQL comes from `DATABASE_URL_POSTGRES` (or `TEST_DATABASE_URL`): a URL of a database
//! the tests may create databases from, e.g. the throwaway cluster `scripts/test.sh` starts.
//! Without it, the PostgreSQL half is skipped with a loud message — except in CI (`CI` set),
//! where its absence fails the test: CI must never pass without having run it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{Connection, SqlSafeStr};

use crate::Backend;

/// The variables that may name the PostgreSQL server for tests, in order of preference.
pub const POSTGRES_URL_VARS: [&str; 2] = ["DATABASE_URL_POSTGRES", "TEST_DATABASE_URL"];

/// One fresh database.
#[derive(Debug)]
pub struct TestDb {
    pub backend: Backend,
    /// The URL to give to `Store::open` (or to the server's `DATABASE_URL`).
    pub url: String,
    cleanup: Cleanup,
}

#[derive(Debug, Clone)]
enum Cleanup {
    Dir(PathBuf),
    Database { admin_url: String, name: String },
}

/// The PostgreSQL URL for tests, if configured; panics in CI when it is not.
pub fn postgres_url() -> Option<String> {
    let url = POSTGRES_URL_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()));
    if url.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set but neither {} is: the PostgreSQL tests must run in CI \
                 (scripts/test.sh starts a throwaway cluster)",
                POSTGRES_URL_VARS.join(" nor ")
            );
        }
        eprintln!(
            "\n!!!!!!!! SKIPPING POSTGRESQL: set DATABASE_URL_POSTGRES (scripts/test.sh does) \
             to run this test on PostgreSQL too; it ran on SQLite only !!!!!!!!\n"
        );
    }
    url
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    format!(
        "duplex_t_{}_{}_{nanos}_{label}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestDb {
    /// A fresh SQLite file in a new temporary directory.
    pub fn sqlite(label: &str) -> TestDb {
        let dir = std::env::temp_dir().join(unique(label));
        std::fs::create_dir_all(&dir).expect("the temp dir is writable");
        TestDb {
            backend: Backend::Sqlite,
            url: crate::sqlite_url_in(&dir),
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A fresh database on the PostgreSQL server of `admin_url`.
    pub async fn postgres(admin_url: &str, label: &str) -> TestDb {
        sqlx::any::install_default_drivers();
        let name = unique(label);
        let mut admin = sqlx::AnyConnection::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
        let create = format!("CREATE DATABASE \"{name}\"");
        sqlx::raw_sql(sqlx::AssertSqlSafe(create).into_sql_str())
            .execute(&mut admin)
            .await
            .expect("CREATE DATABASE on the test server");
        let _ = admin.close().await;
        TestDb {
            backend: Backend::Postgres,
            url: with_database(admin_url, &name),
            cleanup: Cleanup::Database {
                admin_url: admin_url.to_owned(),
                name,
            },
        }
    }

    /// Removes the database (tests call it through [`each_backend`]; a failed test leaves its
    /// database behind for inspection).
    pub async fn remove(self) {
        match self.cleanup {
            Cleanup::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Database { admin_url, name } => {
                if let Ok(mut admin) = sqlx::AnyConnection::connect(&admin_url).await {
                    let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop).into_sql_str())
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            }
        }
    }
}

/// Runs `test` on a fresh SQLite database, then on a fresh PostgreSQL database when one is
/// configured (see the module docs), removing each database after the test passed on it.
pub async fn each_backend<F, Fut>(label: &str, test: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    // The PostgreSQL database is created only once the SQLite run passed, so a failing test
    // leaves nothing behind on the server.
    let postgres = postgres_url();
    run_on(TestDb::sqlite(label), label, &test).await;
    if let Some(admin) = postgres {
        run_on(TestDb::postgres(&admin, label).await, label, &test).await;
    }
}

async fn run_on<F, Fut>(db: TestDb, label: &str, test: &F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let keep = TestDb {
        backend: db.backend,
        url: db.url.clone(),
        cleanup: db.cleanup.clone(),
    };
    eprintln!("[{label}] on {}", db.backend.as_str());
    test(db).await;
    keep.remove().await;
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_replaced() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5433/duplex_test", "x"),
            "postgres://u@127.0.0.1:5433/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/db?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
