//! The store on both backends: every test runs on a fresh SQLite file and, when
//! `DATABASE_URL_POSTGRES` is set (scripts/test.sh sets it), on a fresh PostgreSQL database
//! (see `duplex_store::testing`).

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use duplex_store::testing::{TestDb, each_backend};
use duplex_store::{
    Backend, DailyUsage, FREE_PLAN, Store, StoreError, Subscription, UsageDelta, day_key,
};
use time::{Date, Month, OffsetDateTime};

/// Bounds every test: a hung lock must fail the test, not the CI job.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn bounded(fut: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test finished in time");
}

fn day(y: i32, m: Month, d: u8) -> Date {
    Date::from_calendar_date(y, m, d).unwrap()
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

async fn open(db: &TestDb) -> Store {
    let store = Store::open(&db.url)
        .await
        .expect("store opens and migrates");
    assert_eq!(store.backend(), db.backend);
    store
}

#[test]
fn migration_folders_agree_with_each_other_and_the_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
    let list = |backend: &str| -> BTreeSet<(i64, String)> {
        std::fs::read_dir(root.join(backend))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| {
                let stem = n.trim_end_matches(".sql");
                let (v, d) = stem.split_once('_').expect("NNNN_name.sql");
                (v.parse().expect("numeric version"), d.to_owned())
            })
            .collect()
    };
    let sqlite = list("sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(sqlite, list("postgres"), "one version per backend");
    let embedded: BTreeSet<(i64, String)> = duplex_store::embedded_migrations()
        .map(|(v, d)| (v, d.to_owned()))
        .collect();
    assert_eq!(embedded, sqlite, "MIGRATIONS in lib.rs lists every file");
}

#[tokio::test]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    bounded(each_backend("migrate", |db| async move {
        // Two processes starting at once on a fresh database.
        let a = Store::connect(&db.url).await.unwrap();
        let b = Store::connect(&db.url).await.unwrap();
        let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
        ra.unwrap();
        rb.unwrap();
        a.migrate().await.expect("a second run is a no-op");
        assert_eq!(a.ensure_user("u").await.unwrap().plan, FREE_PLAN);
        a.close().await;
        b.close().await;
    }))
    .await;
}

#[tokio::test]
async fn users_start_free_and_plan_changes_are_audited() {
    bounded(each_backend("users", |db| async move {
        let store = open(&db).await;
        let u = store.ensure_user("user_2abc").await.unwrap();
        assert_eq!(u.plan, FREE_PLAN);
        assert_eq!(u.external_id, "user_2abc");
        assert_eq!(u.trial_ms_used, 0);
        assert!(
            u.created_at.year() >= 2025,
            "created_at is the database's clock: {}",
            u.created_at
        );
        let again = store.ensure_user("user_2abc").await.unwrap();
        assert_eq!(again, u, "ensure_user is idempotent");
        assert_eq!(
            store.user_by_external_id("user_2abc").await.unwrap(),
            Some(u.clone())
        );
        assert_eq!(store.user_by_external_id("nobody").await.unwrap(), None);
        let other = store.ensure_user("user_other").await.unwrap();
        assert_ne!(other.id, u.id);

        let change = store
            .set_plan(u.id, "pro", "evt_1", at(1_750_000_000))
            .await
            .unwrap()
            .expect("free -> pro is a change");
        assert_eq!(
            (change.old_plan.as_str(), change.new_plan.as_str()),
            ("free", "pro")
        );
        assert_eq!(
            store
                .set_plan(u.id, "pro", "evt_2", at(1_750_000_001))
                .await
                .unwrap(),
            None,
            "same plan: nothing written"
        );
        store
            .set_plan(u.id, FREE_PLAN, "admin", at(1_750_000_002))
            .await
            .unwrap();
        let log = store.plan_changes(u.id).await.unwrap();
        let log: Vec<(&str, &str, &str, i64)> = log
            .iter()
            .map(|c| {
                (
                    c.old_plan.as_str(),
                    c.new_plan.as_str(),
                    c.source.as_str(),
                    c.changed_at.unix_timestamp(),
                )
            })
            .collect();
        assert_eq!(
            log,
            [
                ("free", "pro", "evt_1", 1_750_000_000),
                ("pro", "free", "admin", 1_750_000_002)
            ]
        );
        assert!(store.plan_changes(other.id).await.unwrap().is_empty());
        assert_eq!(
            store.user_by_id(other.id).await.unwrap().unwrap().plan,
            FREE_PLAN
        );
        assert!(matches!(
            store.set_plan(999_999, "pro", "x", at(0)).await,
            Err(StoreError::NotFound(_))
        ));
        store.close().await;
    }))
    .await;
}

#[tokio::test]
async fn usage_ledger_by_day_month_and_spend() {
    bounded(each_backend("ledger", |db| async move {
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let b = store.ensure_user("b").await.unwrap().id;
        let d1 = day(2025, Month::January, 31);
        let d2 = day(2025, Month::February, 1);
        let delta = UsageDelta {
            conversation_ms: 5_000,
            stt_ms: 4_200,
            llm_prompt_tokens: 300,
            llm_completion_tokens: 40,
            tts_chars: 120,
            cost_micro_usd: 1_250,
        };
        assert_eq!(
            store.usage_for_day(a, d1).await.unwrap(),
            DailyUsage::default()
        );
        let first = store.add_usage(a, d1, delta).await.unwrap();
        assert_eq!(first.conversation_ms, 5_000);
        let second = store.add_usage(a, d1, delta).await.unwrap();
        assert_eq!(
            second,
            DailyUsage {
                conversation_ms: 10_000,
                stt_ms: 8_400,
                llm_prompt_tokens: 600,
                llm_completion_tokens: 80,
                tts_chars: 240,
                cost_micro_usd: 2_500,
            }
        );
        assert_eq!(second.conversation_seconds(), 10.0);
        assert_eq!(second.cost_usd(), 0.0025);
        assert_eq!(store.usage_for_day(a, d1).await.unwrap(), second);
        store
            .add_usage(
                a,
                d2,
                UsageDelta {
                    tts_chars: 7,
                    cost_micro_usd: 10,
                    ..UsageDelta::default()
                },
            )
            .await
            .unwrap();
        store.add_usage(b, d1, delta).await.unwrap();
        // The next day is its own row.
        assert_eq!(store.usage_for_day(a, d2).await.unwrap().tts_chars, 7);
        assert_eq!(
            store
                .tts_chars_for_month(a, 2025, Month::January)
                .await
                .unwrap(),
            240
        );
        assert_eq!(
            store
                .tts_chars_for_month(a, 2025, Month::February)
                .await
                .unwrap(),
            7
        );
        assert_eq!(
            store
                .tts_chars_for_month(a, 2024, Month::December)
                .await
                .unwrap(),
            0
        );
        // December rolls into the next year's January.
        store
            .add_usage(
                a,
                day(2025, Month::December, 31),
                UsageDelta {
                    tts_chars: 9,
                    ..UsageDelta::default()
                },
            )
            .await
            .unwrap();
        store
            .add_usage(
                a,
                day(2026, Month::January, 1),
                UsageDelta {
                    tts_chars: 1,
                    ..UsageDelta::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .tts_chars_for_month(a, 2025, Month::December)
                .await
                .unwrap(),
            9
        );
        // Spend sums every user of the day.
        assert_eq!(store.spend_for_day_micros(d1).await.unwrap(), 3_750);
        assert_eq!(store.spend_for_day(d1).await.unwrap(), 0.00375);
        assert_eq!(
            store.spend_for_day(day(2030, Month::May, 5)).await.unwrap(),
            0.0
        );
        assert_eq!(day_key(d2), "2025-02-01");
        store.close().await;
    }))
    .await;
}

#[tokio::test]
async fn trial_counter_and_sessions() {
    bounded(each_backend("trial", |db| async move {
        let store = open(&db).await;
        let u = store.ensure_user("t").await.unwrap().id;
        assert_eq!(store.add_trial_ms(u, 1_500).await.unwrap(), 1_500);
        assert_eq!(store.add_trial_ms(u, 500).await.unwrap(), 2_000);
        assert_eq!(
            store.user_by_id(u).await.unwrap().unwrap().trial_ms_used,
            2_000
        );
        assert!(matches!(
            store.add_trial_ms(424_242, 1).await,
            Err(StoreError::NotFound(_))
        ));

        store.session_started("s-1", u, at(100)).await.unwrap();
        let (start, end, reason) = store.session("s-1").await.unwrap().unwrap();
        assert_eq!((start, end, reason), (at(100), None, None));
        assert!(
            store
                .session_ended("s-1", at(160), "client_closed")
                .await
                .unwrap()
        );
        assert!(
            !store
                .session_ended("s-1", at(170), "shutdown")
                .await
                .unwrap(),
            "the first end wins"
        );
        let (_, end, reason) = store.session("s-1").await.unwrap().unwrap();
        assert_eq!(
            (end, reason.as_deref()),
            (Some(at(160)), Some("client_closed"))
        );
        assert!(!store.session_ended("never", at(1), "x").await.unwrap());
        assert!(
            store.session_started("s-1", u, at(200)).await.is_err(),
            "session ids are unique"
        );
        store.close().await;
    }))
    .await;
}

#[tokio::test]
async fn webhook_events_are_recorded_once_and_roll_back_with_their_effects() {
    bounded(each_backend("webhooks", |db| async move {
        let store = open(&db).await;
        let u = store.ensure_user("w").await.unwrap().id;
        assert!(
            store
                .record_webhook_event("evt_a", "x", at(1))
                .await
                .unwrap()
        );
        assert!(
            !store
                .record_webhook_event("evt_a", "x", at(2))
                .await
                .unwrap()
        );

        // An event and its effect roll back together (a failure before commit = Stripe retries).
        let mut tx = store.begin().await.unwrap();
        assert!(tx.record_webhook_event("evt_b", "y", at(3)).await.unwrap());
        tx.set_plan(u, "pro", "evt_b", at(3)).await.unwrap();
        drop(tx);
        assert_eq!(store.user_by_id(u).await.unwrap().unwrap().plan, FREE_PLAN);
        let mut tx = store.begin().await.unwrap();
        assert!(
            tx.record_webhook_event("evt_b", "y", at(4)).await.unwrap(),
            "rolled back: still new"
        );
        tx.set_plan(u, "pro", "evt_b", at(4)).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.user_by_id(u).await.unwrap().unwrap().plan, "pro");
        assert_eq!(store.plan_changes(u).await.unwrap().len(), 1);
        store.close().await;
    }))
    .await;
}

#[tokio::test]
async fn subscriptions_are_created_locked_updated_and_linked() {
    bounded(each_backend("subs", |db| async move {
        let store = open(&db).await;
        let u = store.ensure_user("s").await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let mut s = tx
            .lock_subscription("sub_1", "cus_1", at(10))
            .await
            .unwrap();
        assert_eq!(s.status, "incomplete");
        assert_eq!(s.last_event_created, Subscription::NEVER);
        assert_eq!(s.user_id, None);
        s.status = "active".into();
        s.price_id = Some("price_pro".into());
        s.plan = Some("pro".into());
        s.current_period_end = Some(1_760_000_000);
        s.last_event_created = 1_750_000_000;
        tx.update_subscription(&s, at(11)).await.unwrap();
        assert_eq!(tx.user_by_stripe_customer("cus_1").await.unwrap(), None);
        tx.link_stripe_customer(u.id, "cus_1").await.unwrap();
        let subs = tx.subscriptions_for_user(u.id).await.unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].user_id, Some(u.id));
        assert_eq!(subs[0].plan.as_deref(), Some("pro"));
        tx.commit().await.unwrap();

        let stored = store.subscription("sub_1").await.unwrap().unwrap();
        assert_eq!(stored.current_period_end, Some(1_760_000_000));
        assert_eq!(stored.last_event_created, 1_750_000_000);
        let user = store.user_by_id(u.id).await.unwrap().unwrap();
        assert_eq!(user.stripe_customer_id.as_deref(), Some("cus_1"));

        // Locking an existing row returns it unchanged.
        let mut tx = store.begin().await.unwrap();
        let again = tx
            .lock_subscription("sub_1", "cus_1", at(12))
            .await
            .unwrap();
        assert_eq!(again, stored);
        // The customer moves to the user of the newest checkout.
        let v = tx.ensure_user("v").await.unwrap();
        tx.link_stripe_customer(v.id, "cus_1").await.unwrap();
        assert_eq!(
            tx.user_by_stripe_customer("cus_1")
                .await
                .unwrap()
                .map(|x| x.id),
            Some(v.id)
        );
        assert!(tx.subscriptions_for_user(u.id).await.unwrap().is_empty());
        tx.commit().await.unwrap();
        store.close().await;
    }))
    .await;
}

const TASKS: i64 = 20;
const INCREMENTS: i64 = 50;

/// Every increment lands, and every caller sees a distinct running total that includes its
/// own increment (the upsert is atomic, not read-modify-write).
async fn hammer(stores: Vec<Store>, user_id: i64, d: Date) {
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = stores[t as usize % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..INCREMENTS {
                let delta = UsageDelta {
                    conversation_ms: 1_000,
                    tts_chars: 3,
                    cost_micro_usd: 7,
                    ..UsageDelta::default()
                };
                let totals = store.add_usage(user_id, d, delta).await.unwrap();
                seen.push(totals.conversation_ms);
            }
            seen
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for total in t.await.unwrap() {
            assert!(all.insert(total), "total {total} returned twice");
        }
    }
    let n = TASKS * INCREMENTS;
    let expected: BTreeSet<i64> = (1..=n).map(|i| i * 1_000).collect();
    assert_eq!(all, expected, "each caller saw its own increment");
    let totals = stores[0].usage_for_day(user_id, d).await.unwrap();
    assert_eq!(
        (
            totals.conversation_ms,
            totals.tts_chars,
            totals.cost_micro_usd
        ),
        (n * 1_000, n * 3, n * 7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_are_exact() {
    bounded(each_backend("concurrent", |db| async move {
        let store = open(&db).await;
        let u = store.ensure_user("busy").await.unwrap().id;
        hammer(vec![store.clone()], u, day(2025, Month::June, 1)).await;
        store.close().await;
    }))
    .await;
}

/// Two pools are two server processes: on PostgreSQL (the production setup for several
/// servers) and on one SQLite file alike, no increment is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_share_one_ledger() {
    bounded(each_backend("two_pools", |db| async move {
        let a = open(&db).await;
        let b = Store::open(&db.url).await.unwrap();
        let u = a.ensure_user("shared").await.unwrap().id;
        assert_eq!(b.ensure_user("shared").await.unwrap().id, u);
        hammer(vec![a.clone(), b.clone()], u, day(2025, Month::June, 2)).await;
        if db.backend == Backend::Postgres {
            eprintln!("two pools on PostgreSQL: exact");
        }
        a.close().await;
        b.close().await;
    }))
    .await;
}

#[tokio::test]
async fn sqlite_file_and_directory_are_created_on_first_run() {
    bounded(async {
        let dir =
            std::env::temp_dir().join(format!("duplex-store-first-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let nested = dir.join("a/b");
        let url = duplex_store::sqlite_url_in(&nested);
        let store = Store::open(&url).await.unwrap();
        store.ensure_user("x").await.unwrap();
        store.close().await;
        assert!(nested.join("duplex.db").is_file());
        // Reopening keeps the data.
        let store = Store::open(&url).await.unwrap();
        assert!(store.user_by_external_id("x").await.unwrap().is_some());
        store.close().await;
        std::fs::remove_dir_all(&dir).unwrap();

        let mem = Store::open("sqlite::memory:").await.unwrap();
        mem.ensure_user("m").await.unwrap();
        assert!(mem.user_by_external_id("m").await.unwrap().is_some());
    })
    .await;
}

#[tokio::test]
async fn a_replayed_session_usage_write_is_applied_once() {
    bounded(each_backend("usage_once", |db| async move {
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let d = day(2025, Month::March, 3);
        let delta = UsageDelta {
            conversation_ms: 5_000,
            tts_chars: 40,
            cost_micro_usd: 1_500,
            ..UsageDelta::default()
        };
        let write = |session: &'static str, seq: u64| {
            let store = store.clone();
            async move {
                store
                    .add_session_usage(session, seq, a, d, delta, 2_000, OffsetDateTime::now_utc())
                    .await
                    .unwrap()
                    .applied
            }
        };
        assert!(write("s1", 1).await, "first write applies");
        // The answer was lost (a timeout after the commit); the meter sends it again.
        assert!(!write("s1", 1).await, "a replay changes nothing");
        let after_one = store.usage_for_day(a, d).await.unwrap();
        assert_eq!(after_one.conversation_ms, 5_000);
        assert_eq!(after_one.tts_chars, 40);
        assert_eq!(after_one.cost_micro_usd, 1_500);
        assert_eq!(
            store.user_by_id(a).await.unwrap().unwrap().trial_ms_used,
            2_000
        );
        assert!(write("s1", 2).await, "the next write applies");
        // A late duplicate of an older write (the first attempt finally reaching the
        // database) is older than what was applied: nothing.
        assert!(!write("s1", 1).await);
        // Another session's numbering is its own.
        assert!(write("s2", 1).await);
        let totals = store.usage_for_day(a, d).await.unwrap();
        assert_eq!(totals.conversation_ms, 15_000);
        assert_eq!(totals.cost_micro_usd, 4_500);
        assert_eq!(
            store.user_by_id(a).await.unwrap().unwrap().trial_ms_used,
            6_000
        );
        // Concurrent deliveries of one write: exactly one applies.
        let (x, y) = tokio::join!(write("s1", 3), write("s1", 3));
        assert!(x ^ y, "one of two concurrent replays applies ({x}, {y})");
        assert_eq!(
            store.usage_for_day(a, d).await.unwrap().conversation_ms,
            20_000
        );
        // An unknown user: the error, and the write is not recorded as applied.
        assert!(matches!(
            store
                .add_session_usage("s3", 1, 999_999, d, delta, 0, OffsetDateTime::now_utc())
                .await,
            Err(StoreError::Database(_))
        ));
        store.close().await;
    }))
    .await;
}

#[tokio::test]
async fn silent_open_sessions_are_reaped_and_live_ones_kept() {
    bounded(each_backend("reap", |db| async move {
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let d = day(2025, Month::March, 3);
        // Three sessions started at t=1000: one whose server died (no write since), one still
        // writing heartbeats, one that ended normally.
        for id in ["dead", "live", "ended"] {
            store.session_started(id, a, at(1_000)).await.unwrap();
        }
        let delta = UsageDelta {
            conversation_ms: 5_000,
            ..UsageDelta::default()
        };
        store
            .add_session_usage("dead", 1, a, d, delta, 0, at(1_005))
            .await
            .unwrap();
        store
            .add_session_usage("live", 1, a, d, delta, 0, at(1_005))
            .await
            .unwrap();
        store
            .add_session_usage("live", 2, a, d, delta, 0, at(5_000))
            .await
            .unwrap();
        store
            .session_ended("ended", at(1_010), "closed")
            .await
            .unwrap();
        // Silent for 10 minutes at t=5100: only "dead".
        let reaped = store
            .reap_silent_sessions(at(5_100 - 600), at(5_100), "reaped")
            .await
            .unwrap();
        let ids: Vec<&str> = reaped.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["dead"]);
        // A second server reaping at the same time finds nothing more.
        assert!(
            store
                .reap_silent_sessions(at(5_100 - 600), at(5_100), "reaped")
                .await
                .unwrap()
                .is_empty()
        );
        // "live" is reaped only once it too falls silent.
        let later = store
            .reap_silent_sessions(at(5_000 + 1), at(5_700), "reaped")
            .await
            .unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].session_id, "live");
    }))
    .await;
}

/// A usage write of 1 s (and 10 TTS characters, 1 ms of trial) for `user` on `d`.
async fn second(
    store: &Store,
    session: &str,
    seq: u64,
    user: i64,
    d: Date,
) -> Result<duplex_store::UsageWritten, StoreError> {
    let delta = UsageDelta {
        conversation_ms: 1_000,
        tts_chars: 10,
        ..UsageDelta::default()
    };
    store
        .add_session_usage(session, seq, user, d, delta, 1, OffsetDateTime::now_utc())
        .await
}

/// Many sessions of several users write at once, each its `seq`s in order as the meter does
/// (one write in flight per session): every write lands once, and each answer carries its
/// user's totals right after its own increment (so a user's answers are exactly 1 s, 2 s, …,
/// n s). On SQLite the writes were committed in shared transactions (group commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_session_writes_land_once_each_with_their_totals() {
    bounded(each_backend("group_commit", |db| async move {
        const USERS: usize = 3;
        const SESSIONS_PER_USER: usize = 20;
        const WRITES: u64 = 5;
        let store = open(&db).await;
        let d = day(2025, Month::April, 9);
        let mut users = Vec::new();
        for u in 0..USERS {
            users.push(store.ensure_user(&format!("gc{u}")).await.unwrap().id);
        }
        // Holding a transaction holds SQLite's writer turn: every session's first write
        // queues behind it, so the writer must take them in batches.
        let held = store.begin().await.unwrap();
        let mut tasks = Vec::new();
        for (u, &user) in users.iter().enumerate() {
            for s in 0..SESSIONS_PER_USER {
                let store = store.clone();
                let session = format!("gc{u}-{s}");
                tasks.push(tokio::spawn(async move {
                    store
                        .session_started(&session, user, at(1_000))
                        .await
                        .unwrap();
                    let mut answers = Vec::new();
                    for seq in 1..=WRITES {
                        let w = second(&store, &session, seq, user, d).await.unwrap();
                        assert!(w.applied, "{session} write {seq} applied");
                        answers.push(w);
                    }
                    (user, answers)
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        held.rollback().await.unwrap();
        let mut seen: std::collections::BTreeMap<i64, BTreeSet<i64>> = Default::default();
        for t in tasks {
            let (user, answers) = t.await.unwrap();
            for w in answers {
                assert!(
                    seen.entry(user).or_default().insert(w.day.conversation_ms),
                    "total {} returned twice to user {user}",
                    w.day.conversation_ms
                );
                assert_eq!(w.tts_chars_month, w.day.tts_chars, "one day in the month");
                assert_eq!(
                    w.trial_ms_used * 1_000,
                    w.day.conversation_ms,
                    "same transaction"
                );
            }
        }
        let n = (SESSIONS_PER_USER as i64) * WRITES as i64;
        let expected: BTreeSet<i64> = (1..=n).map(|i| i * 1_000).collect();
        for &user in &users {
            assert_eq!(
                seen[&user], expected,
                "user {user}: each answer after its own write"
            );
            let totals = store.usage_for_day(user, d).await.unwrap();
            assert_eq!(
                (totals.conversation_ms, totals.tts_chars),
                (n * 1_000, n * 10)
            );
            assert_eq!(
                store.user_by_id(user).await.unwrap().unwrap().trial_ms_used,
                n
            );
        }
        let stats = store.writer_stats();
        eprintln!("writer: {stats:?}");
        if db.backend == Backend::Sqlite {
            let writes = (USERS * SESSIONS_PER_USER) as u64 * (WRITES + 1);
            assert_eq!(stats.writes, writes, "every write and start record, once");
            assert!(
                stats.largest > 1 && stats.batches < writes,
                "writes shared transactions: {stats:?}"
            );
        }
        store.close().await;
    }))
    .await;
}

/// A replay queued in the same batch as the write it repeats is applied once, and still
/// answers the current totals.
#[tokio::test]
async fn a_replay_inside_a_batch_is_applied_once() {
    bounded(each_backend("batch_replay", |db| async move {
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let d = day(2025, Month::April, 10);
        let before = store.writer_stats();
        // `join!` polls each in order before the writer task runs: on SQLite the three are
        // queued together and applied in one transaction.
        let (x, y, z) = tokio::join!(
            second(&store, "s1", 1, a, d),
            second(&store, "s1", 1, a, d),
            second(&store, "s2", 1, a, d),
        );
        let (x, y, z) = (x.unwrap(), y.unwrap(), z.unwrap());
        assert!(
            x.applied ^ y.applied,
            "one of the two applies ({x:?}, {y:?})"
        );
        assert!(z.applied);
        let replay = if x.applied { y } else { x };
        assert!(
            replay.day.conversation_ms >= 1_000,
            "the replay answers totals that include the write it repeats: {replay:?}"
        );
        let totals = store.usage_for_day(a, d).await.unwrap();
        assert_eq!(totals.conversation_ms, 2_000);
        assert_eq!(totals.tts_chars, 20);
        assert_eq!(store.user_by_id(a).await.unwrap().unwrap().trial_ms_used, 2);
        if db.backend == Backend::Sqlite {
            let after = store.writer_stats();
            assert_eq!(
                (after.batches - before.batches, after.writes - before.writes),
                (1, 3),
                "one batch held the three"
            );
            // In queue order: the write, its replay (the day as the write left it), then s2.
            assert_eq!(
                (
                    x.day.conversation_ms,
                    y.day.conversation_ms,
                    z.day.conversation_ms
                ),
                (1_000, 1_000, 2_000)
            );
        }
        store.close().await;
    }))
    .await;
}

/// Writes that fail (an unknown user, a session id used twice) fail alone: the others of
/// their batch commit and get their answers.
#[tokio::test]
async fn a_bad_write_in_a_batch_fails_only_itself() {
    bounded(each_backend("batch_bad", |db| async move {
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let d = day(2025, Month::April, 11);
        store.session_started("taken", a, at(1)).await.unwrap();
        let before = store.writer_stats();
        let (good1, unknown_user, dup_start, new_start, end, good2) = tokio::join!(
            second(&store, "s1", 1, a, d),
            second(&store, "s2", 1, 999_999, d),
            store.session_started("taken", a, at(2)),
            store.session_started("fresh", a, at(3)),
            store.session_ended("taken", at(4), "closed"),
            second(&store, "s3", 1, a, d),
        );
        assert!(
            matches!(unknown_user, Err(StoreError::Database(_))),
            "{unknown_user:?}"
        );
        assert!(dup_start.is_err(), "session ids are unique");
        new_start.unwrap();
        assert!(end.unwrap(), "the first end of `taken`");
        let (good1, good2) = (good1.unwrap(), good2.unwrap());
        assert!(good1.applied && good2.applied);
        // Each answer holds the day's totals as of its own write: one of the two good writes
        // went first. Which one is up to the backend (PostgreSQL runs them concurrently, one
        // transaction each), but no write is lost and neither answer counts the other twice.
        let mut days = [good1.day.conversation_ms, good2.day.conversation_ms];
        days.sort_unstable();
        assert_eq!(days, [1_000, 2_000]);
        assert_eq!(
            store.usage_for_day(a, d).await.unwrap().conversation_ms,
            2_000
        );
        assert_eq!(
            store
                .usage_for_day(999_999, d)
                .await
                .unwrap()
                .conversation_ms,
            0
        );
        assert_eq!(store.session("taken").await.unwrap().unwrap().0, at(1));
        assert!(store.session("fresh").await.unwrap().is_some());
        // The failed write was not recorded as applied: sent again (for a user that exists
        // now, as it were) it applies.
        let b = store.ensure_user("b").await.unwrap().id;
        assert!(second(&store, "s2", 1, b, d).await.unwrap().applied);
        if db.backend == Backend::Sqlite {
            let after = store.writer_stats();
            // The batch failed; its four good writes were applied one by one, then s2 again.
            assert_eq!(after.writes - before.writes, 5, "{before:?} -> {after:?}");
            // One writer task: the writes apply in queue order, good1 before good2.
            assert_eq!(good2.day.conversation_ms, 2_000);
        }
        store.close().await;
    }))
    .await;
}

/// A write that breaks the whole transaction (here a trigger that rolls back, standing in for
/// a full disk or an I/O error) fails only itself: the batch is applied again write by write.
#[tokio::test]
async fn a_write_that_aborts_the_batch_transaction_fails_only_itself() {
    bounded(async {
        let db = TestDb::sqlite("batch_abort");
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let d = day(2025, Month::April, 12);
        {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
            sqlx::raw_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON sessions WHEN NEW.id = 'poison'
                 BEGIN SELECT RAISE(ROLLBACK, 'poisoned session id'); END;",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
        let before = store.writer_stats();
        let (good1, poison, good2, start) = tokio::join!(
            second(&store, "s1", 1, a, d),
            store.session_started("poison", a, at(1)),
            second(&store, "s2", 1, a, d),
            store.session_started("fine", a, at(2)),
        );
        assert!(poison.is_err());
        assert!(good1.unwrap().applied && good2.unwrap().applied);
        start.unwrap();
        assert_eq!(
            store.usage_for_day(a, d).await.unwrap().conversation_ms,
            2_000
        );
        assert!(store.session("fine").await.unwrap().is_some());
        assert!(store.session("poison").await.unwrap().is_none());
        let after = store.writer_stats();
        assert_eq!(
            (after.batches - before.batches, after.writes - before.writes),
            (3, 3),
            "the batch failed as a whole; three of its writes applied alone"
        );
        store.close().await;
        db.remove().await;
    })
    .await;
}

/// What a usage write answers is what the separate reads return right after it: the day's
/// totals, the month's TTS characters (other days of the month included, other months not),
/// the trial use; for a replay too.
#[tokio::test]
async fn a_usage_write_answers_what_the_reads_return() {
    bounded(each_backend("write_totals", |db| async move {
        let store = open(&db).await;
        let a = store.ensure_user("a").await.unwrap().id;
        let other = store.ensure_user("other").await.unwrap().id;
        let writes: [(&str, u64, i64, Date, i64, i64); 7] = [
            ("s1", 1, a, day(2025, Month::May, 31), 70, 0),
            ("s1", 2, a, day(2025, Month::June, 1), 11, 500),
            ("s2", 1, other, day(2025, Month::June, 1), 1_000, 0),
            ("s1", 3, a, day(2025, Month::June, 2), 13, 0),
            ("s1", 3, a, day(2025, Month::June, 2), 13, 0), // a replay
            ("s3", 1, a, day(2025, Month::June, 2), 17, 250),
            ("s3", 2, a, day(2025, Month::July, 1), 19, 0),
        ];
        for (session, seq, user, d, tts, trial) in writes {
            let delta = UsageDelta {
                conversation_ms: 1_234,
                tts_chars: tts,
                cost_micro_usd: 5,
                ..UsageDelta::default()
            };
            let w = store
                .add_session_usage(session, seq, user, d, delta, trial, at(10))
                .await
                .unwrap();
            let read = duplex_store::UsageWritten {
                applied: w.applied,
                day: store.usage_for_day(user, d).await.unwrap(),
                tts_chars_month: store
                    .tts_chars_for_month(user, d.year(), d.month())
                    .await
                    .unwrap(),
                trial_ms_used: store.user_by_id(user).await.unwrap().unwrap().trial_ms_used,
            };
            assert_eq!(w, read, "{session} {seq}");
        }
        let june = store
            .tts_chars_for_month(a, 2025, Month::June)
            .await
            .unwrap();
        assert_eq!(june, 11 + 13 + 17);
        store.close().await;
    }))
    .await;
}
