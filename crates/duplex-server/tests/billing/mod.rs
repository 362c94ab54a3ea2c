//! Stripe webhooks end to end: signed requests over real sockets to `POST /webhooks/stripe`,
//! effects checked in the store. Every test runs on a fresh SQLite file and, when
//! `DATABASE_URL_POSTGRES` is set (scripts/test.sh sets it), on a fresh PostgreSQL database.
//! Payloads are the Stripe-shaped fixtures in `tests/data/stripe/`.

use std::future::Future;
use std::time::Duration;

use duplex_billing::signature::sign;
use duplex_billing::{PricePlans, WebhookSecret};
use duplex_server::{Config, Metrics, Server};
use duplex_store::testing::{TestDb, each_backend};
use duplex_store::{FREE_PLAN, Store};
use serde_json::{Value, json};

const SECRET: &str = "whsec_duplex_integration_test";
const PATH: &str = "/webhooks/stripe";
/// The user the checkout fixture names (`client_reference_id`).
const USER: &str = "user_2kV8xq3ExampleSub";
const SUB: &str = "sub_1QhCjzLkdIwHu7ixExample";
const CUSTOMER: &str = "cus_RaExample0001";
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn bounded(fut: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test finished in time");
}

fn config(db: &TestDb) -> Config {
    let mut c = Config::for_tests();
    c.store.database_url = db.url.clone();
    c.billing.stripe_webhook_secret = WebhookSecret::new(SECRET);
    c.billing.stripe_price_plans =
        PricePlans::parse("price_pro_monthly:pro,price_business_monthly:business").unwrap();
    c
}

async fn start(config: Config) -> Server {
    Server::bind(config, Metrics::new())
        .await
        .expect("server binds")
}

async fn stop(server: Server) {
    server.shutdown_token().cancel();
    server.wait().await;
}

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/stripe")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A fixture with its event id and `created` replaced (a distinct event of the same shape).
fn event(name: &str, id: &str, created: i64) -> Value {
    let mut e = fixture(name);
    e["id"] = json!(id);
    e["created"] = json!(created);
    e
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A minimal HTTP/1.1 POST: status and body.
async fn post(
    server: &Server,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // A server refusing an oversized body answers and closes without reading it: a failed
    // write is expected then, and the answer is still there to read.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("response in time");
    let buf = String::from_utf8_lossy(&raw).into_owned();
    assert!(buf.len() >= 12, "an HTTP response: {buf:?}");
    let status = buf[9..12].parse().expect("status code");
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sends `event` signed like Stripe does, now.
async fn deliver(server: &Server, event: &Value) -> (u16, String) {
    let body = serde_json::to_vec(event).unwrap();
    let secret = WebhookSecret::new(SECRET).unwrap();
    let header = sign(&body, &secret, now());
    post(server, PATH, &[("Stripe-Signature", header)], &body).await
}

async fn plan_of(store: &Store, external_id: &str) -> Option<String> {
    store
        .user_by_external_id(external_id)
        .await
        .unwrap()
        .map(|u| u.plan)
}

async fn audit_len(store: &Store, external_id: &str) -> usize {
    let user = store
        .user_by_external_id(external_id)
        .await
        .unwrap()
        .unwrap();
    store.plan_changes(user.id).await.unwrap().len()
}

#[tokio::test]
async fn checkout_then_subscription_sets_the_plan() {
    bounded(each_backend("wh_valid", |db| async move {
        let server = start(config(&db)).await;
        let store = server.store().clone();
        let (status, body) = deliver(&server, &fixture("checkout.session.completed")).await;
        assert_eq!((status, body.as_str()), (200, "applied\n"));
        let user = store
            .user_by_external_id(USER)
            .await
            .unwrap()
            .expect("user created");
        assert_eq!(user.stripe_customer_id.as_deref(), Some(CUSTOMER));
        assert_eq!(
            user.plan, FREE_PLAN,
            "no plan before the subscription is active"
        );

        let (status, _) = deliver(&server, &fixture("customer.subscription.created")).await;
        assert_eq!(status, 200);
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("pro"));
        let sub = store.subscription(SUB).await.unwrap().unwrap();
        assert_eq!(sub.status, "active");
        assert_eq!(sub.price_id.as_deref(), Some("price_pro_monthly"));
        assert_eq!(
            sub.current_period_end,
            Some(1_762_678_399),
            "from the item (basil API)"
        );
        assert_eq!(sub.user_id, Some(user.id));
        let log = store.plan_changes(user.id).await.unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(
            log[0].source, "evt_1QhCk1LkdIwHu7ixSubCreated",
            "audited with its event"
        );

        // A failed renewal keeps the plan while Stripe retries (documented policy).
        let (status, _) = deliver(&server, &fixture("invoice.payment_failed")).await;
        assert_eq!(status, 200);
        assert_eq!(
            store.subscription(SUB).await.unwrap().unwrap().status,
            "past_due"
        );
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("pro"));

        // Deletion ends it.
        let (status, _) = deliver(&server, &fixture("customer.subscription.deleted")).await;
        assert_eq!(status, 200);
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some(FREE_PLAN));
        assert_eq!(audit_len(&store, USER).await, 2);
        stop(server).await;
    }))
    .await;
}

#[tokio::test]
async fn subscription_before_checkout_is_linked_when_the_checkout_arrives() {
    bounded(each_backend("wh_early_sub", |db| async move {
        let server = start(config(&db)).await;
        let store = server.store().clone();
        // Stripe usually sends customer.subscription.created before checkout.session.completed.
        let (status, _) = deliver(&server, &fixture("customer.subscription.created")).await;
        assert_eq!(status, 200);
        assert_eq!(plan_of(&store, USER).await, None, "no user is known yet");
        assert_eq!(
            store.subscription(SUB).await.unwrap().unwrap().user_id,
            None
        );
        let (status, _) = deliver(&server, &fixture("checkout.session.completed")).await;
        assert_eq!(status, 200);
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("pro"));
        stop(server).await;
    }))
    .await;
}

#[tokio::test]
async fn bad_signatures_are_refused_with_a_reason_and_change_nothing() {
    bounded(each_backend("wh_bad_sig", |db| async move {
        let server = start(config(&db)).await;
        let store = server.store().clone();
        let body = serde_json::to_vec(&fixture("checkout.session.completed")).unwrap();
        let good = WebhookSecret::new(SECRET).unwrap();

        // Tampered body: signed, then the user id swapped.
        let header = sign(&body, &good, now());
        let tampered = String::from_utf8(body.clone())
            .unwrap()
            .replace(USER, "user_attacker");
        let (status, reason) = post(
            &server,
            PATH,
            &[("Stripe-Signature", header)],
            tampered.as_bytes(),
        )
        .await;
        assert_eq!(status, 400);
        assert!(reason.contains("no signature matches"), "{reason}");

        // Signed with another secret.
        let wrong = WebhookSecret::new("whsec_someone_else").unwrap();
        let (status, reason) = post(
            &server,
            PATH,
            &[("Stripe-Signature", sign(&body, &wrong, now()))],
            &body,
        )
        .await;
        assert_eq!(status, 400);
        assert!(reason.contains("no signature matches"), "{reason}");

        // Correctly signed, but 10 minutes ago (a captured request replayed).
        let (status, reason) = post(
            &server,
            PATH,
            &[("Stripe-Signature", sign(&body, &good, now() - 600))],
            &body,
        )
        .await;
        assert_eq!(status, 400);
        assert!(reason.contains("tolerance"), "{reason}");

        // No header at all.
        let (status, reason) = post(&server, PATH, &[], &body).await;
        assert_eq!(status, 400);
        assert!(reason.contains("missing Stripe-Signature"), "{reason}");

        // Garbage header.
        let (status, reason) = post(
            &server,
            PATH,
            &[("Stripe-Signature", "sha256=abc".into())],
            &body,
        )
        .await;
        assert_eq!(status, 400);
        assert!(reason.contains("malformed"), "{reason}");

        assert_eq!(plan_of(&store, USER).await, None, "nothing was applied");
        assert_eq!(plan_of(&store, "user_attacker").await, None);
        // The genuine request still works afterwards: nothing was recorded as processed.
        let (status, _) = deliver(&server, &fixture("checkout.session.completed")).await;
        assert_eq!(status, 200);
        assert!(plan_of(&store, USER).await.is_some());
        stop(server).await;
    }))
    .await;
}

#[tokio::test]
async fn replayed_events_change_nothing() {
    bounded(each_backend("wh_replay", |db| async move {
        let server = start(config(&db)).await;
        let store = server.store().clone();
        deliver(&server, &fixture("checkout.session.completed")).await;
        let created = fixture("customer.subscription.created");
        let body = serde_json::to_vec(&created).unwrap();
        let header = sign(&body, &WebhookSecret::new(SECRET).unwrap(), now());
        let first = post(
            &server,
            PATH,
            &[("Stripe-Signature", header.clone())],
            &body,
        )
        .await;
        assert_eq!(first, (200, "applied\n".to_owned()));
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("pro"));
        // Downgrade by hand, then replay: the replay must not re-apply the upgrade.
        let user = store.user_by_external_id(USER).await.unwrap().unwrap();
        store
            .set_plan(user.id, FREE_PLAN, "test", time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        // The identical request, and a redelivery (Stripe signs each attempt anew).
        let again = post(&server, PATH, &[("Stripe-Signature", header)], &body).await;
        assert_eq!(again, (200, "already processed\n".to_owned()));
        let (status, said) = deliver(&server, &created).await;
        assert_eq!((status, said.as_str()), (200, "already processed\n"));
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some(FREE_PLAN));
        let log = store.plan_changes(user.id).await.unwrap();
        let stripe_entries = log
            .iter()
            .filter(|c| c.source == "evt_1QhCk1LkdIwHu7ixSubCreated")
            .count();
        assert_eq!(stripe_entries, 1, "one audit entry for the event: {log:?}");
        stop(server).await;
    }))
    .await;
}

#[tokio::test]
async fn out_of_order_subscription_updates_keep_the_newest_state() {
    bounded(each_backend("wh_order", |db| async move {
        let server = start(config(&db)).await;
        let store = server.store().clone();
        deliver(&server, &fixture("checkout.session.completed")).await;
        let t0 = 1_760_000_000;
        let mut created = event("customer.subscription.created", "evt_o_created", t0);
        created["data"]["object"]["status"] = json!("active");
        assert_eq!(deliver(&server, &created).await.0, 200);
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("pro"));

        // The newest state: upgraded to business at t0+200.
        let mut newer = event("customer.subscription.updated", "evt_o_newer", t0 + 200);
        newer["data"]["object"]["items"]["data"][0]["price"]["id"] =
            json!("price_business_monthly");
        assert_eq!(
            deliver(&server, &newer).await,
            (200, "applied\n".to_owned())
        );
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("business"));

        // An older update (t0+100, still on pro) arrives late: ignored.
        let older = event("customer.subscription.updated", "evt_o_older", t0 + 100);
        assert_eq!(
            deliver(&server, &older).await,
            (200, "stale: ignored\n".to_owned())
        );
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("business"));
        let sub = store.subscription(SUB).await.unwrap().unwrap();
        assert_eq!(sub.last_event_created, t0 + 200);
        assert_eq!(sub.price_id.as_deref(), Some("price_business_monthly"));

        // A `created` event under another id, older than the stored state: stale too.
        let late_created = event("customer.subscription.created", "evt_o_created_2", t0);
        assert_eq!(
            deliver(&server, &late_created).await,
            (200, "stale: ignored\n".to_owned())
        );
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("business"));

        // Deleted, then an update from before the deletion: canceled is final.
        let deleted = event("customer.subscription.deleted", "evt_o_deleted", t0 + 300);
        assert_eq!(deliver(&server, &deleted).await.0, 200);
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some(FREE_PLAN));
        let zombie = event("customer.subscription.updated", "evt_o_zombie", t0 + 300);
        assert_eq!(
            deliver(&server, &zombie).await,
            (200, "stale: ignored\n".to_owned())
        );
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some(FREE_PLAN));
        assert_eq!(
            store.subscription(SUB).await.unwrap().unwrap().status,
            "canceled"
        );
        // free -> pro -> business -> free
        assert_eq!(audit_len(&store, USER).await, 3);
        stop(server).await;
    }))
    .await;
}

#[tokio::test]
async fn unknown_types_are_acknowledged_and_rotation_accepts_any_v1() {
    bounded(each_backend("wh_unknown", |db| async move {
        let server = start(config(&db)).await;
        let (status, body) = deliver(&server, &fixture("customer.created")).await;
        assert_eq!((status, body.as_str()), (200, "ignored\n"));
        let (status, body) = deliver(&server, &fixture("customer.created")).await;
        assert_eq!((status, body.as_str()), (200, "already processed\n"));

        // During a secret roll Stripe sends one v1 per secret; ours is the second.
        let body = serde_json::to_vec(&fixture("checkout.session.completed")).unwrap();
        let t = now();
        let old = sign(&body, &WebhookSecret::new("whsec_rolled_out").unwrap(), t);
        let ours = sign(&body, &WebhookSecret::new(SECRET).unwrap(), t);
        let v1 = |h: &str| h.split_once(",v1=").unwrap().1.to_owned();
        let header = format!("t={t},v1={},v1={},v0=ignored", v1(&old), v1(&ours));
        let (status, said) = post(&server, PATH, &[("Stripe-Signature", header)], &body).await;
        assert_eq!((status, said.as_str()), (200, "applied\n"));
        assert!(plan_of(server.store(), USER).await.is_some());
        stop(server).await;
    }))
    .await;
}

#[tokio::test]
async fn unconfigured_webhooks_answer_503_and_the_path_and_size_are_bounded() {
    bounded(async {
        // No secret: never accept unsigned events.
        let server = start(Config::for_tests()).await;
        let body = serde_json::to_vec(&fixture("checkout.session.completed")).unwrap();
        let (status, reason) = post(&server, PATH, &[], &body).await;
        assert_eq!(status, 503);
        assert!(reason.contains("STRIPE_WEBHOOK_SECRET"), "{reason}");
        stop(server).await;

        let db = TestDb::sqlite("wh_path");
        let mut c = config(&db);
        c.billing.stripe_webhook_path = "/hooks/billing".into();
        let server = start(c).await;
        let header = sign(&body, &WebhookSecret::new(SECRET).unwrap(), now());
        let (status, _) = post(
            &server,
            PATH,
            &[("Stripe-Signature", header.clone())],
            &body,
        )
        .await;
        assert_eq!(
            status, 404,
            "the default path is not served when configured elsewhere"
        );
        let (status, _) = post(
            &server,
            "/hooks/billing",
            &[("Stripe-Signature", header)],
            &body,
        )
        .await;
        assert_eq!(status, 200);
        let huge = vec![b' '; duplex_billing_body_limit() + 1];
        let (status, _) = post(&server, "/hooks/billing", &[], &huge).await;
        assert_eq!(status, 413, "bodies over the limit are refused unread");
        stop(server).await;
        db.remove().await;
    })
    .await;
}

/// The server's webhook body limit (`STRIPE_BODY_LIMIT` in `http.rs`, 1 MiB).
fn duplex_billing_body_limit() -> usize {
    1 << 20
}

#[tokio::test]
async fn an_unknown_price_is_refused_and_counted_until_it_is_mapped() {
    bounded(each_backend("wh_unknown_price", |db| async move {
        let metrics = Metrics::new();
        let server = Server::bind(config(&db), metrics.clone())
            .await
            .expect("server binds");
        let store = server.store().clone();
        let (status, _) = deliver(&server, &fixture("checkout.session.completed")).await;
        assert_eq!(status, 200);
        let mut sub = fixture("customer.subscription.created");
        sub["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_new_tier");
        let (status, body) = deliver(&server, &sub).await;
        assert_eq!(status, 422, "{body}");
        assert!(body.contains("price_new_tier"), "{body}");
        assert!(body.contains("STRIPE_PRICE_PLANS"), "{body}");
        assert!(
            metrics
                .render()
                .contains("duplex_stripe_webhook_errors_total{reason=\"unknown_price\"} 1"),
            "{}",
            metrics.render()
        );
        // Nothing was applied, not even the event id: a redelivery is not a duplicate.
        // (The checkout created the subscription's row; the event did not touch it.)
        let row = store.subscription(SUB).await.unwrap().unwrap();
        assert_eq!((row.price_id, row.plan), (None, None));
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some(FREE_PLAN));
        let (status, _) = deliver(&server, &sub).await;
        assert_eq!(status, 422);
        stop(server).await;

        // The operator maps the price and restarts; Stripe's next retry applies it.
        let mut c = config(&db);
        c.billing.stripe_price_plans =
            PricePlans::parse("price_pro_monthly:pro,price_new_tier:business").unwrap();
        let server = start(c).await;
        let (status, body) = deliver(&server, &sub).await;
        assert_eq!((status, body.as_str()), (200, "applied\n"));
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some("business"));
        // A canceled subscription grants nothing whatever its price: applied.
        let mut gone = event("customer.subscription.deleted", "evt_gone_unknown", now());
        gone["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_retired");
        let (status, _) = deliver(&server, &gone).await;
        assert_eq!(status, 200);
        assert_eq!(plan_of(&store, USER).await.as_deref(), Some(FREE_PLAN));
        stop(server).await;
    }))
    .await;
}
