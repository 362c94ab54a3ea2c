//! Authentication and admission at the edge, over real sockets: bearer tokens in each of their
//! three places, 401 with a reason, the subprotocol the handshake selects, the per-IP connect
//! rate limit (429), the Origin allow-list (403) and anonymous dev mode.
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
    c.jwt_secret = Some(Secret(SECRET.into()));
    c.jwt_issuer = Some("https://id.example".into());
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
    config.connect_rate_per_min = 2;
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
    config.allowed_origins = vec!["https://app.example".into()];
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
