//! Authentication and admission at the edge, over real sockets: bearer tokens in each of their
//! three places, 401 with a reason, the subprotocol the handshake selects, the per-IP connect
//! rate limit (429), the Origin allow-list (403), anonymous mode (one user on a loopback bind,
//! one limited user per client IP on a public one), and the client IP behind trusted proxies.
//!
//! `test_rsa_key.pem` (next to this file) is a throwaway RSA key made for these tests with
//! `openssl genrsa 2048`; it is used only by the server's unit tests of RS256/JWKS.

use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use super::{TestServer, WAIT, connect, test_config};
use duplex_replay::client::Client;
use duplex_server::Config;
use duplex_server::auth::Secret;

const SECRET: &str = "integration-test-secret";

fn auth_config() -> Config {
    let mut c = test_config();
    c.auth.jwt_secret = Some(Secret(SECRET.into()));
    c.auth.jwt_issuer = Some("https://id.example".into());
    c
}

fn token(secret: &str, sub: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let claims = serde_json::json!({"sub": sub, "exp": exp, "iss": "https://id.example"});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw upgrade request with extra headers: the socket and the selected subprotocol, or the
/// refusal's status and body.
async fn handshake(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Option<String>), (u16, String)> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let res = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time");
    match res {
        Ok((ws, resp)) => {
            let proto = resp
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            Ok((ws, proto))
        }
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            Err((
                resp.status().as_u16(),
                String::from_utf8_lossy(body).into_owned(),
            ))
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// Starts a session on a raw socket and waits for `session.ready`.
async fn ready(ws: &mut Ws) -> serde_json::Value {
    let start = r#"{"type":"session.start","sample_rate":16000}"#;
    ws.send(Message::text(start)).await.unwrap();
    let fut = async {
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m.unwrap() {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "session.ready" {
                    return v;
                }
            }
        }
        panic!("closed before session.ready");
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("session.ready in time")
}

#[tokio::test]
async fn missing_or_bad_tokens_get_401_with_a_reason() {
    let ts = TestServer::start(auth_config()).await;
    let url = format!("{}?v=1", ts.url());
    let (status, body) = handshake(&url, &[]).await.expect_err("refused");
    assert_eq!(status, 401);
    assert!(body.contains("missing bearer token"), "{body}");

    let bad = format!("Bearer {}", token("wrong-secret", "u1"));
    let (status, body) = handshake(&url, &[("authorization", &bad)])
        .await
        .expect_err("refused");
    assert_eq!(status, 401);
    assert!(body.contains("bad token signature"), "{body}");

    let (status, body) = handshake(&format!("{url}&token=garbage"), &[])
        .await
        .expect_err("refused");
    assert_eq!((status, body.trim()), (401, "malformed token"));
    let (_, metrics) = ts.http("/metrics").await;
    assert!(
        metrics.contains(r#"duplex_connections_rejected_total{reason="unauthorized"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn tokens_in_header_subprotocol_and_query_are_accepted() {
    let ts = TestServer::start(auth_config()).await;
    let t = token(SECRET, "user_42");

    let bearer = format!("Bearer {t}");
    let (mut ws, proto) = handshake(
        &ts.url(),
        &[
            ("authorization", &bearer),
            ("sec-websocket-protocol", "duplex.v1"),
        ],
    )
    .await
    .expect("header token accepted");
    assert_eq!(proto.as_deref(), Some("duplex.v1"));
    ready(&mut ws).await;

    // Browsers: the token rides in the subprotocol list; only duplex.v1 is selected.
    let offer = format!("duplex.v1, bearer.{t}");
    let (mut ws, proto) = handshake(&ts.url(), &[("sec-websocket-protocol", &offer)])
        .await
        .expect("subprotocol token accepted");
    assert_eq!(proto.as_deref(), Some("duplex.v1"));
    ready(&mut ws).await;

    let (mut ws, proto) = handshake(&format!("{}?v=1&token={t}", ts.url()), &[])
        .await
        .expect("query token accepted");
    assert_eq!(proto, None, "nothing offered, nothing selected");
    ready(&mut ws).await;

    // The project's client offering the browser-style list works end to end too.
    let mut c = Client::connect_with_protocol(&ts.url(), Some(&offer), Some(super::start(16000)))
        .await
        .expect("connects");
    c.wait_ready(WAIT).await.expect("session.ready");
}

#[tokio::test]
async fn connect_rate_limit_answers_429() {
    let mut config = test_config();
    config.limits.connect_rate_per_min = 2;
    let ts = TestServer::start(config).await;
    let _a = connect(&ts, 16000).await;
    let _b = connect(&ts, 16000).await;
    let (status, body) = handshake(&format!("{}?v=1", ts.url()), &[])
        .await
        .expect_err("third attempt within the minute is refused");
    assert_eq!(status, 429);
    assert!(body.contains("too many connection attempts"), "{body}");
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let mut config = test_config();
    config.auth.allowed_origins = vec!["https://app.example".into()];
    let ts = TestServer::start(config).await;
    let url = format!("{}?v=1", ts.url());
    let (status, _) = handshake(&url, &[("origin", "https://evil.example")])
        .await
        .expect_err("refused");
    assert_eq!(status, 403);
    let (mut ws, _) = handshake(&url, &[("origin", "https://app.example")])
        .await
        .expect("allowed origin");
    ready(&mut ws).await;
    // No Origin: a non-browser client.
    let (mut ws, _) = handshake(&url, &[]).await.expect("no origin");
    ready(&mut ws).await;
}

#[tokio::test]
async fn anonymous_mode_without_auth_config() {
    let ts = TestServer::start(test_config()).await;
    // No token at all (`connect` waits for session.ready), and a token is ignored rather
    // than checked.
    let _c = connect(&ts, 16000).await;
    let (mut ws, _) = handshake(&format!("{}?v=1&token=whatever", ts.url()), &[])
        .await
        .expect("anonymous mode accepts");
    self::ready(&mut ws).await;
}

/// A stand-in for Clerk's Backend API on loopback: `GET /v1/jwks` answers the instance's JWKS
/// (the test RSA key, `kid` `ins_test`) to `Authorization: Bearer <secret key>` and 401
/// otherwise, as Clerk does. Returns its base URL and the number of JWKS requests.
async fn fake_clerk(
    secret_key: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let key = EncodingKey::from_rsa_pem(TEST_RSA_PEM.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("ins_test".into());
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/v1/jwks",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let (jwks, counter) = (jwks.clone(), counter.clone());
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let expected = format!("Bearer {secret_key}");
                if headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(expected.as_str())
                {
                    (axum::http::StatusCode::OK, jwks)
                } else {
                    (
                        axum::http::StatusCode::UNAUTHORIZED,
                        r#"{"errors":[{"code":"authentication_invalid"}]}"#.to_owned(),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

/// The throwaway key of these tests (see the module docs).
const TEST_RSA_PEM: &str = include_str!("test_rsa_key.pem");

/// A token shaped like a Clerk session token: RS256, the instance's `kid`, `sub` the Clerk
/// user id, `iss` the Frontend API, `azp` the page's origin, `sid` the session.
fn clerk_token(sub: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "sub": sub, "iss": "https://clerk.example.accounts.dev", "azp": "http://localhost:3000",
        "sid": "sess_test", "iat": now, "nbf": now - 5, "exp": now + 60,
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("ins_test".into());
    let key = EncodingKey::from_rsa_pem(TEST_RSA_PEM.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn clerk_config(api_url: &str, secret_key: &str) -> Config {
    let vars = [
        ("CLERK_SECRET_KEY", secret_key.to_owned()),
        ("CLERK_API_URL", api_url.to_owned()),
        (
            "JWT_ISSUER",
            "https://clerk.example.accounts.dev".to_owned(),
        ),
    ];
    let parsed =
        Config::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .expect("valid config");
    let mut c = test_config();
    c.auth.clerk_secret_key = parsed.auth.clerk_secret_key;
    c.auth.clerk_api_url = parsed.auth.clerk_api_url;
    c.auth.jwt_issuer = parsed.auth.jwt_issuer;
    c
}

#[tokio::test]
async fn clerk_session_tokens_are_verified_with_the_jwks_of_the_backend_api() {
    use std::sync::atomic::Ordering;
    let (api, hits) = fake_clerk("sk_test_duplex").await;
    let ts = TestServer::start(clerk_config(&api, "sk_test_duplex")).await;

    // No token: Clerk mode is not anonymous.
    let (status, _) = handshake(&ts.url(), &[("sec-websocket-protocol", "duplex.v1")])
        .await
        .expect_err("refused");
    assert_eq!(status, 401);

    // A Clerk session token in the browser's subprotocol list opens a session as its user.
    let offer = format!("duplex.v1, bearer.{}", clerk_token("user_2clerk"));
    let (mut ws, _) = handshake(&ts.url(), &[("sec-websocket-protocol", &offer)])
        .await
        .expect("Clerk token accepted");
    ready(&mut ws).await;
    let user = ts
        .server
        .store()
        .user_by_external_id("user_2clerk")
        .await
        .unwrap();
    assert!(user.is_some(), "the session's user is the token's sub");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "one JWKS fetch, then cached"
    );

    // A token signed with HS256 (e.g. forged with a guessed secret) is not accepted.
    let forged = token("sk_test_duplex", "user_2clerk");
    let bearer = format!("Bearer {forged}");
    let url = format!("{}?v=1", ts.url());
    let (status, body) = handshake(&url, &[("authorization", &bearer)])
        .await
        .expect_err("refused");
    assert_eq!(
        (status, body.trim()),
        (401, "token algorithm HS256 not accepted")
    );
}

#[tokio::test]
async fn a_wrong_clerk_secret_key_makes_the_keys_unavailable() {
    let (api, _) = fake_clerk("sk_test_duplex").await;
    let ts = TestServer::start(clerk_config(&api, "sk_test_wrong")).await;
    let bearer = format!("Bearer {}", clerk_token("user_2clerk"));
    let (status, body) = handshake(&format!("{}?v=1", ts.url()), &[("authorization", &bearer)])
        .await
        .expect_err("refused");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("HTTP 401"), "{body}");
}

/// The client IP keys the per-IP limits: a header from an untrusted peer changes nothing, a
/// trusted proxy's `X-Forwarded-For` names the client, and IPv6 clients are keyed per /64.
#[tokio::test]
async fn per_ip_limits_key_on_the_client_behind_trusted_proxies_only() {
    let url_of = |ts: &TestServer| format!("{}?v=1", ts.url());
    // No trusted proxy: the TCP peer (127.0.0.1) is the client, whatever it claims.
    let mut config = test_config();
    config.limits.connect_rate_per_min = 1;
    let ts = TestServer::start(config).await;
    let (mut ws, _) = handshake(&url_of(&ts), &[("x-forwarded-for", "198.51.100.1")])
        .await
        .expect("first attempt");
    ready(&mut ws).await;
    let (status, _) = handshake(
        &url_of(&ts),
        &[
            ("x-forwarded-for", "198.51.100.2"),
            ("forwarded", "for=198.51.100.2"),
        ],
    )
    .await
    .expect_err("a spoofed header from an untrusted peer does not give a fresh bucket");
    assert_eq!(status, 429);

    // Behind a trusted proxy (the test connects from 127.0.0.1): each forwarded client has
    // its own bucket, and addresses the client put left of the proxy's entry are ignored.
    let mut config = test_config();
    config.limits.connect_rate_per_min = 1;
    config.limits.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let ts = TestServer::start(config).await;
    let url = url_of(&ts);
    for xff in ["198.51.100.1", "6.6.6.6, 198.51.100.2"] {
        let (mut ws, _) = handshake(&url, &[("x-forwarded-for", xff)])
            .await
            .expect("a new client");
        ready(&mut ws).await;
    }
    let (status, _) = handshake(&url, &[("x-forwarded-for", "7.7.7.7, 198.51.100.1")])
        .await
        .expect_err("the same client again");
    assert_eq!(status, 429);
    // IPv6: one /64 is one client.
    let (mut ws, _) = handshake(&url, &[("x-forwarded-for", "2001:db8:1:2::1")])
        .await
        .expect("first address of the /64");
    ready(&mut ws).await;
    let (status, _) = handshake(&url, &[("x-forwarded-for", "2001:db8:1:2:ffff::9")])
        .await
        .expect_err("another address of the same /64");
    assert_eq!(status, 429);
    let (mut ws, _) = handshake(&url, &[("x-forwarded-for", "2001:db8:1:3::1")])
        .await
        .expect("another /64");
    ready(&mut ws).await;

    // The concurrent-session cap keys on the same client.
    let mut config = test_config();
    config.limits.max_connections_per_ip = 1;
    config.limits.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let ts = TestServer::start(config).await;
    let url = url_of(&ts);
    let (mut held, _) = handshake(&url, &[("x-forwarded-for", "198.51.100.1")])
        .await
        .expect("first session");
    ready(&mut held).await;
    let (status, body) = handshake(&url, &[("x-forwarded-for", "198.51.100.1")])
        .await
        .expect_err("same client, second session");
    assert_eq!(status, 429, "{body}");
    let (mut other, _) = handshake(&url, &[("x-forwarded-for", "198.51.100.2")])
        .await
        .expect("another client behind the same proxy");
    ready(&mut other).await;
}

/// Without auth, a loopback bind keeps the zero-config experience (one `anonymous` user,
/// unmetered); a public bind meters each client IP as its own user on `free`.
#[tokio::test]
async fn anonymous_sessions_are_per_client_and_free_on_a_public_bind() {
    // Loopback (the tests' default).
    let ts = TestServer::start(test_config()).await;
    let (mut ws, _) = handshake(&format!("{}?v=1", ts.url()), &[])
        .await
        .expect("accepted");
    let r = ready(&mut ws).await;
    assert_eq!(r["plan"]["name"], "unmetered", "{r}");
    let store = ts.server.store();
    assert!(
        store
            .user_by_external_id("anonymous")
            .await
            .unwrap()
            .is_some()
    );

    // A public bind (all interfaces), reached over loopback.
    let mut config = test_config();
    config.server.bind_addr = std::net::Ipv4Addr::UNSPECIFIED.into();
    let ts = TestServer::start(config).await;
    let url = format!(
        "ws://127.0.0.1:{}/v1/conversation?v=1",
        ts.server.local_addr().port()
    );
    let (mut ws, _) = handshake(&url, &[("x-forwarded-for", "198.51.100.1")])
        .await
        .expect("accepted");
    let r = ready(&mut ws).await;
    assert_eq!(r["plan"]["name"], "free", "{r}");
    assert_eq!(r["plan"]["limits"]["daily_seconds"], 600, "{r}");
    let store = ts.server.store();
    assert!(
        store
            .user_by_external_id("anon:127.0.0.1")
            .await
            .unwrap()
            .is_some(),
        "keyed by the TCP peer: no proxy is trusted"
    );
    assert!(
        store
            .user_by_external_id("anonymous")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .user_by_external_id("anon:198.51.100.1")
            .await
            .unwrap()
            .is_none()
    );

    // Behind a trusted proxy on the same host (loopback bind, so public): the forwarded
    // client is the user; the operator may opt in to unmetered explicitly.
    let mut config = test_config();
    config.limits.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    config.metering.anonymous_plan = Some("unmetered".into());
    let ts = TestServer::start(config).await;
    let url = format!("{}?v=1", ts.url());
    let (mut ws, _) = handshake(&url, &[("x-forwarded-for", "2001:db8:1:2::7")])
        .await
        .expect("accepted");
    let r = ready(&mut ws).await;
    assert_eq!(r["plan"]["name"], "unmetered", "{r}");
    let store = ts.server.store();
    assert!(
        store
            .user_by_external_id("anon:2001:db8:1:2::/64")
            .await
            .unwrap()
            .is_some()
    );
}
