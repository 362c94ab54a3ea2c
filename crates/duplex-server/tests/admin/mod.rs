//! `duplex admin` end to end: the binary run as an operator would, against a store seeded
//! through the store's API, on a fresh SQLite file and (when `DATABASE_URL_POSTGRES` is set,
//! as scripts/test.sh does) on a fresh PostgreSQL database.

use std::future::Future;
use std::process::{Command, Output};
use std::time::Duration;

use duplex_store::testing::{TestDb, each_backend};
use duplex_store::{Store, UsageDelta, usd_to_micros};
use serde_json::Value;
use time::{Date, Month, OffsetDateTime};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const DAY: &str = "2026-11-30";

async fn bounded(fut: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test finished in time");
}

/// `duplex admin ARGS` with a clean environment naming only the store.
fn admin(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("admin")
        .args(args)
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("the duplex binary runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("UTF-8 output")
}

fn failure(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {o:?}");
    String::from_utf8(o.stderr.clone()).expect("UTF-8 errors")
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&stdout(o)).expect("--json prints JSON")
}

fn usage(seconds: i64, cost_usd: f64) -> UsageDelta {
    UsageDelta {
        conversation_ms: seconds * 1000,
        stt_ms: seconds * 500,
        llm_prompt_tokens: 100,
        llm_completion_tokens: 40,
        tts_chars: 300,
        cost_micro_usd: usd_to_micros(cost_usd),
    }
}

/// alice talked long and cheaply, bob briefly and expensively on DAY; alice also today, with
/// a session a crashed server left open three hours ago.
async fn seed(db: &TestDb) -> Store {
    let store = Store::open(&db.url).await.expect("store opens");
    let day = Date::from_calendar_date(2026, Month::November, 30).unwrap();
    let today = OffsetDateTime::now_utc().date();
    let alice = store.ensure_user("alice").await.unwrap();
    let bob = store.ensure_user("bob,inc").await.unwrap();
    store
        .add_usage(alice.id, day, usage(3000, 0.25))
        .await
        .unwrap();
    store.add_usage(bob.id, day, usage(120, 1.5)).await.unwrap();
    store
        .add_usage(alice.id, today, usage(60, 0.01))
        .await
        .unwrap();
    let three_hours_ago = OffsetDateTime::now_utc() - time::Duration::hours(3);
    store
        .session_started("sess_stale", alice.id, three_hours_ago)
        .await
        .unwrap();
    store
        .session_started("sess_live", bob.id, OffsetDateTime::now_utc())
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn admin_answers_from_the_store_on_both_backends() {
    each_backend("admin", |db| {
        bounded(async move {
            let store = seed(&db).await;

            // Top users by cost, then by seconds.
            let top = json(&admin(
                &db,
                &["top", "--day", DAY, "--by", "cost", "--json"],
            ));
            let users: Vec<&str> = top
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["user"].as_str().unwrap())
                .collect();
            assert_eq!(users, ["bob,inc", "alice"], "{top}");
            assert_eq!(top[0]["cost_usd"], 1.5);
            assert_eq!(top[1]["conversation_seconds"], 3000.0);
            let text = stdout(&admin(&db, &["top", "--day", DAY, "--by", "seconds"]));
            let alice_at = text.find("alice").expect("alice listed");
            let bob_at = text.find("bob,inc").expect("bob listed");
            assert!(alice_at < bob_at, "{text}");
            let one = json(&admin(
                &db,
                &["top", "--day", DAY, "--limit", "1", "--json"],
            ));
            assert_eq!(one.as_array().unwrap().len(), 1);

            // One user's history.
            let alice = json(&admin(&db, &["user", "alice", "--days", "1", "--json"]));
            assert_eq!(alice["plan"], "free");
            assert_eq!(alice["usage"].as_array().unwrap().len(), 1, "{alice}"); // today only
            assert_eq!(alice["usage_total"]["conversation_seconds"], 60.0);
            assert_eq!(alice["open_sessions"][0]["id"], "sess_stale");
            let long = json(&admin(&db, &["user", "alice", "--days", "3650", "--json"]));
            assert_eq!(long["usage"].as_array().unwrap().len(), 2, "{long}");
            assert_eq!(long["usage"][0]["day"], DAY);
            assert_eq!(long["usage_total"]["conversation_seconds"], 3060.0);
            assert!(stdout(&admin(&db, &["user", "alice"])).contains("plan: free"));
            assert!(failure(&admin(&db, &["user", "carol"])).contains("no user \"carol\""));

            // A plan by hand, audited; unknown plans and users are refused.
            let out = stdout(&admin(
                &db,
                &["set-plan", "alice", "pro", "--reason", "ticket 7"],
            ));
            assert!(out.contains("free -> pro"), "{out}");
            let user = store.user_by_external_id("alice").await.unwrap().unwrap();
            assert_eq!(user.plan, "pro");
            let audit = store.plan_changes(user.id).await.unwrap();
            assert_eq!(audit.len(), 1);
            assert_eq!(audit[0].source, "admin: ticket 7");
            let again = json(&admin(
                &db,
                &["set-plan", "alice", "pro", "--reason", "again", "--json"],
            ));
            assert_eq!(again["changed"], false);
            let err = failure(&admin(&db, &["set-plan", "alice", "gold", "--reason", "x"]));
            assert!(
                err.contains("unknown plan \"gold\"") && err.contains("business"),
                "{err}"
            );
            let err = failure(&admin(&db, &["set-plan", "carol", "pro", "--reason", "x"]));
            assert!(err.contains("--create"), "{err}");
            stdout(&admin(
                &db,
                &["set-plan", "carol", "business", "--reason", "x", "--create"],
            ));
            let carol = store.user_by_external_id("carol").await.unwrap().unwrap();
            assert_eq!(carol.plan, "business");

            // Stale sessions: listed, then closed; the live one stays open.
            let dry = json(&admin(
                &db,
                &[
                    "close-stale-sessions",
                    "--older-than-hours",
                    "1",
                    "--dry-run",
                    "--json",
                ],
            ));
            assert_eq!(dry["sessions"].as_array().unwrap().len(), 1, "{dry}");
            assert!(
                store
                    .session("sess_stale")
                    .await
                    .unwrap()
                    .unwrap()
                    .1
                    .is_none()
            );
            let out = stdout(&admin(
                &db,
                &["close-stale-sessions", "--older-than-hours", "1"],
            ));
            assert!(
                out.contains("closed 1 session(s)") && out.contains("sess_stale"),
                "{out}"
            );
            let (_, ended, reason) = store.session("sess_stale").await.unwrap().unwrap();
            assert!(ended.is_some());
            assert_eq!(reason.as_deref(), Some("closed by duplex admin: stale"));
            assert!(
                store
                    .session("sess_live")
                    .await
                    .unwrap()
                    .unwrap()
                    .1
                    .is_none()
            );

            // The ledger as CSV (a user id with a comma is quoted).
            let csv = stdout(&admin(&db, &["export-usage", "--from", DAY, "--to", DAY]));
            let lines: Vec<&str> = csv.lines().collect();
            assert_eq!(lines[0], duplex_server::admin::CSV_HEADER);
            assert_eq!(lines.len(), 3, "{csv}");
            assert!(
                lines[1].starts_with("2026-11-30,alice,pro,3000.000,1500.000,100,40,300,0.25"),
                "{csv}"
            );
            assert!(
                lines[2].starts_with("2026-11-30,\"bob,inc\",free,120.000"),
                "{csv}"
            );
            let err = failure(&admin(
                &db,
                &["export-usage", "--from", DAY, "--to", "2026-11-01"],
            ));
            assert!(err.contains("is after"), "{err}");
            let err = failure(&admin(&db, &["top", "--day", "30/11/2026"]));
            assert!(err.contains("invalid day"), "{err}");
            store.close().await;
        })
    })
    .await;
}

#[test]
fn admin_help_names_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["admin", "--help"])
        .env_clear()
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for cmd in [
        "top",
        "user",
        "set-plan",
        "close-stale-sessions",
        "export-usage",
        "--json",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn a_store_that_cannot_be_opened_is_one_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["admin", "top"])
        .env_clear()
        .env("DUPLEX_DATA_DIR", "/proc/duplex-no-such-dir")
        .output()
        .unwrap();
    let err = failure(&out);
    assert!(
        err.starts_with("duplex admin: store (sqlite:///proc/duplex-no-such-dir/duplex.db"),
        "{err}"
    );
    assert!(err.contains("cannot create the data directory"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
