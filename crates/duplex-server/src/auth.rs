//! Authentication and admission at the HTTP edge, before a WebSocket upgrade: who is calling
//! ([`Authenticator`]: bearer JWTs, HS256 with `JWT_SECRET` or RS256 with keys from
//! `JWT_JWKS_URL`, or from Clerk's Backend API `GET /v1/jwks` with `CLERK_SECRET_KEY` as the
//! bearer), how often a client may try ([`ConnectLimiter`], a token bucket per client IP, an
//! IPv6 client per /64: see `client_ip`),
//! and from which web pages ([`origin_allowed`], the `ALLOWED_ORIGINS` list).
//!
//! The token may come in three places, tried in this order: an `Authorization: Bearer` header,
//! a `bearer.<token>` entry of `Sec-WebSocket-Protocol` (browsers cannot set headers on a
//! WebSocket; they offer `["duplex.v1", "bearer.<token>"]` and the server selects only
//! `duplex.v1`), or the `token` query parameter. Anonymous mode is on only when none of
//! `JWT_SECRET`, `JWT_JWKS_URL` and `CLERK_SECRET_KEY` is set; who an anonymous user is (one
//! `anonymous`, or `anon:<client ip>` on a public server) is `Config::anonymous_policy`.
//!
//! Checked: signature, `exp` (required) and `nbf` with [`LEEWAY_SECS`] of clock skew, `iss`
//! against `JWT_ISSUER` and `aud` against `JWT_AUDIENCE` (each required when configured), and a
//! non-empty `sub`, which becomes the user id. Other claims (a `plan`, say) are ignored: plans
//! come from the store.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;

use crate::client_ip::ClientKey;
use crate::config::AuthConfig;
pub use crate::config::Secret;

/// Clock skew tolerated on `exp` and `nbf`: small, because tokens of browser sessions are
/// short-lived (Clerk's last 60 s), yet enough for hosts whose clocks drift a little.
pub const LEEWAY_SECS: u64 = 30;
/// An unknown `kid` triggers a JWKS fetch at most this often: key rotation is rare, and a
/// flood of tokens with made-up `kid`s must not become a flood of requests to the IdP.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Keys are refreshed this long after the last fetch even without an unknown `kid`, so a key
/// the IdP revoked stops working within this time.
const JWKS_TTL: Duration = Duration::from_secs(600);
/// The IdP must answer within this; the upgrade request waits on it.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Most IP addresses tracked by the connect limiter (a few MB at most): past it, addresses
/// whose bucket is full again are dropped, then any (which only gives those a fresh bucket).
const MAX_TRACKED_IPS: usize = 100_000;

/// Who opened a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`; in anonymous mode `anonymous`, or `anon:<client>` per client.
    pub user_id: String,
    pub anonymous: bool,
}

impl Identity {
    /// The one anonymous user of a private (loopback) server.
    pub fn anonymous() -> Identity {
        Identity {
            user_id: "anonymous".into(),
            anonymous: true,
        }
    }

    /// The anonymous user of one client (an IPv4 address or an IPv6 /64) on a public server.
    pub fn anonymous_client(client: ClientKey) -> Identity {
        Identity {
            user_id: format!("anon:{client}"),
            anonymous: true,
        }
    }
}

/// Compares a presented secret with the configured one without stopping at the first
/// differing byte (the time taken says nothing about how much of a guess was right).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request is not authenticated. The message is sent as the HTTP response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the header, the subprotocol list or the query.
    #[error("missing bearer token (Authorization header, `bearer.<token>` subprotocol or ?token=)")]
    MissingToken,
    /// Not a JWT, or its JSON is not what a JWT holds.
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify with the configured key.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is not `JWT_ISSUER`.
    #[error("wrong token issuer")]
    WrongIssuer,
    /// `aud` does not contain `JWT_AUDIENCE`.
    #[error("wrong token audience")]
    WrongAudience,
    /// A required claim (`exp`, `sub`, or `iss`/`aud` when configured) is absent or empty.
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    /// The header's `alg` is not one this server accepts with its configuration.
    #[error("token algorithm {0} not accepted")]
    Algorithm(String),
    /// The JWKS has no key with the token's `kid`.
    #[error("unknown signing key (kid {0:?})")]
    UnknownKid(String),
    /// The JWKS could not be fetched: the server cannot judge the token (503, not 401).
    #[error("identity provider keys unavailable: {0}")]
    JwksUnavailable(String),
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::JwksUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// Short label for the rejected-connections metric.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::JwksUnavailable(_) => "auth_unavailable",
            _ => "unauthorized",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

/// Verifies tokens; one per server, shared by all handlers.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    /// One per algorithm: jsonwebtoken requires every listed algorithm to fit the key.
    hs256_validation: Validation,
    rs256_validation: Validation,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("jwks", &self.jwks.as_ref().map(|j| &j.url))
            .finish()
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Authenticator {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.jwt_issuer {
            Some(iss) => {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            None => v.iss = None,
        }
        match &config.jwt_audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience a token's `aud` is not checked (jsonwebtoken
            // would reject every token that has one).
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        Authenticator {
            hs256: config
                .jwt_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.0.as_bytes())),
            jwks: match (&config.jwt_jwks_url, &config.clerk_secret_key) {
                (Some(url), _) => Some(Jwks::new(url.clone(), None)),
                // Clerk's Backend API serves the instance's JWKS to holders of the secret key
                // (the public Frontend API copy would need the instance's domain too).
                (None, Some(key)) => Some(Jwks::new(
                    format!("{}/v1/jwks", config.clerk_api_url),
                    Some(key.clone()),
                )),
                (None, None) => None,
            },
            rs256_validation: Validation {
                algorithms: vec![Algorithm::RS256],
                ..v.clone()
            },
            hs256_validation: v,
        }
    }

    /// True when no auth is configured: every request is the anonymous user.
    pub fn is_anonymous(&self) -> bool {
        self.hs256.is_none() && self.jwks.is_none()
    }

    /// The identity of a request with `token` (see [`token_from_request`]).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if self.is_anonymous() {
            return Ok(Identity::anonymous());
        }
        let token = token.ok_or(AuthError::MissingToken)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let (key, validation) = match header.alg {
            Algorithm::HS256 => match &self.hs256 {
                Some(k) => (k.clone(), &self.hs256_validation),
                None => return Err(AuthError::Algorithm("HS256".into())),
            },
            Algorithm::RS256 => match &self.jwks {
                Some(j) => (j.key(header.kid.as_deref()).await?, &self.rs256_validation),
                None => return Err(AuthError::Algorithm("RS256".into())),
            },
            other => return Err(AuthError::Algorithm(format!("{other:?}"))),
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, validation)
            .map_err(|e| map_error(e.kind()))?;
        match data.claims.sub {
            Some(sub) if !sub.trim().is_empty() => Ok(Identity {
                user_id: sub,
                anonymous: false,
            }),
            _ => Err(AuthError::MissingClaim("sub".into())),
        }
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm => AuthError::Algorithm("for this key".into()),
        _ => AuthError::Malformed,
    }
}

/// The RS256 keys of an identity provider, fetched lazily and cached by `kid`.
struct Jwks {
    url: String,
    /// Sent as `Authorization: Bearer` (Clerk's Backend API needs the secret key).
    bearer: Option<Secret>,
    /// [`JWKS_MIN_REFRESH`]; shorter in tests.
    min_refresh: Duration,
    client: reqwest::Client,
    state: tokio::sync::Mutex<JwksState>,
}

#[derive(Default)]
struct JwksState {
    keys: HashMap<String, DecodingKey>,
    /// Keys without a `kid` (usable only when the set has exactly one key).
    anonymous: Vec<DecodingKey>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

impl Jwks {
    fn new(url: String, bearer: Option<Secret>) -> Jwks {
        let client = reqwest::Client::builder()
            .timeout(JWKS_TIMEOUT)
            .build()
            .expect("a client with a timeout always builds");
        Jwks {
            url,
            bearer,
            min_refresh: JWKS_MIN_REFRESH,
            client,
            state: tokio::sync::Mutex::new(JwksState::default()),
        }
    }

    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        // One lock for lookup and refresh: concurrent requests with an unknown kid wait for
        // the one fetch instead of each starting their own.
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let stale = st.fetched_at.is_none_or(|t| now - t >= JWKS_TTL);
        let found = |st: &JwksState| match kid {
            Some(k) => st.keys.get(k).cloned(),
            None if st.keys.len() + st.anonymous.len() == 1 => {
                st.keys.values().chain(&st.anonymous).next().cloned()
            }
            None => None,
        };
        if !stale && let Some(k) = found(&st) {
            return Ok(k);
        }
        let may_fetch = st.attempted_at.is_none_or(|t| now - t >= self.min_refresh);
        let mut fetch_error = None;
        if may_fetch {
            st.attempted_at = Some(now);
            match self.fetch().await {
                Ok(set) => {
                    st.keys.clear();
                    st.anonymous.clear();
                    for jwk in &set.keys {
                        let Ok(key) = DecodingKey::from_jwk(jwk) else {
                            continue; // a key type this server does not use (e.g. an EC key)
                        };
                        match &jwk.common.key_id {
                            Some(kid) => {
                                st.keys.insert(kid.clone(), key);
                            }
                            None => st.anonymous.push(key),
                        }
                    }
                    st.fetched_at = Some(now);
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed");
                    fetch_error = Some(e);
                }
            }
        }
        if let Some(k) = found(&st) {
            return Ok(k); // fresh keys, or the cached ones while the IdP is unreachable
        }
        match fetch_error {
            // The key may exist at the IdP: the token cannot be judged now.
            Some(e) => Err(AuthError::JwksUnavailable(e)),
            None => Err(AuthError::UnknownKid(kid.unwrap_or("").to_owned())),
        }
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let mut req = self.client.get(&self.url);
        if let Some(key) = &self.bearer {
            req = req.bearer_auth(&key.0);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))
    }
}

/// The bearer token of an upgrade request: `Authorization: Bearer`, then a `bearer.<token>`
/// subprotocol entry, then `?token=`.
pub fn token_from_request<'a>(
    headers: &'a HeaderMap,
    query: &'a HashMap<String, String>,
) -> Option<&'a str> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let from_protocol = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|h| h.split(','))
            .find_map(|p| p.trim().strip_prefix("bearer."))
    };
    from_header
        .or_else(from_protocol)
        .or_else(|| query.get("token").map(String::as_str))
        .filter(|t| !t.is_empty())
}

/// `ALLOWED_ORIGINS` check: an empty list allows all; a request without `Origin` is not from a
/// browser page and is allowed (Origin protects browsers' users from other sites, it is not
/// authentication).
pub fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().trim_end_matches('/');
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

/// Per-client token bucket on connection attempts: `rate_per_min` tokens a minute, bursts up
/// to the same number.
pub struct ConnectLimiter {
    rate_per_min: u32,
    buckets: Mutex<HashMap<ClientKey, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl ConnectLimiter {
    /// `rate_per_min` 0 turns the limit off.
    pub fn new(rate_per_min: u32) -> ConnectLimiter {
        ConnectLimiter {
            rate_per_min,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip`; false when its bucket is empty.
    pub fn check(&self, ip: ClientKey) -> bool {
        if self.rate_per_min == 0 {
            return true;
        }
        let cap = f64::from(self.rate_per_min);
        let per_sec = cap / 60.0;
        let now = Instant::now();
        let mut map = self
            .buckets
            .lock()
            .expect("limiter map is never poisoned: no panics while held");
        if map.len() >= MAX_TRACKED_IPS && !map.contains_key(&ip) {
            // A full bucket holds no information: dropping it changes nothing.
            map.retain(|_, b| b.tokens + (now - b.at).as_secs_f64() * per_sec < cap);
            if map.len() >= MAX_TRACKED_IPS {
                let victims: Vec<ClientKey> =
                    map.keys().take(map.len() / 10 + 1).copied().collect();
                for v in victims {
                    map.remove(&v);
                }
            }
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        b.tokens = (b.tokens + (now - b.at).as_secs_f64() * per_sec).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    /// A 2048-bit RSA key generated for these tests only (`openssl genrsa 2048`); it signs
    /// nothing outside them. Embedded because generating RSA keys at test time is slow.
    pub(crate) const TEST_RSA_PRIVATE_PEM: &str = include_str!("../tests/auth/test_rsa_key.pem");

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn config(pairs: &[(&str, &str)]) -> AuthConfig {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::Config::from_lookup(|k| map.get(k).cloned())
            .unwrap()
            .auth
    }

    fn hs(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    mod arbitrary_tokens {
        use super::*;
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use proptest::prelude::*;

        /// A JWT-shaped token: any header JSON (any `alg`, `kid`, `typ`), any claims, any
        /// signature; or any text at all.
        fn token() -> impl Strategy<Value = String> {
            let alg = prop::sample::select(vec![
                "HS256", "RS256", "none", "ES256", "HS512", "", "RS256\0",
            ]);
            let header = (
                alg,
                prop::option::of(".{0,20}"),
                prop::option::of("[A-Z]{0,4}"),
            )
                .prop_map(|(alg, kid, typ)| {
                    let mut h = json!({"alg": alg});
                    if let Some(k) = kid {
                        h["kid"] = json!(k);
                    }
                    if let Some(t) = typ {
                        h["typ"] = json!(t);
                    }
                    B64.encode(h.to_string())
                });
            let claims = (prop::option::of(".{0,12}"), any::<i64>(), ".{0,12}").prop_map(
                |(sub, exp, aud)| {
                    B64.encode(json!({"sub": sub, "exp": exp, "aud": aud}).to_string())
                },
            );
            let sig = prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| B64.encode(b));
            prop_oneof![
                (header, claims, sig).prop_map(|(h, c, s)| format!("{h}.{c}.{s}")),
                ".{0,200}",
                "[A-Za-z0-9_.=-]{0,300}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// No token that was not signed with the server's secret gets through, and none
            /// makes the verifier panic, whichever header or place it arrives in.
            #[test]
            fn unsigned_or_garbled_tokens_are_refused(t in token(), scheme in "(Bearer|bearer|Basic| )") {
                let auth = Authenticator::new(&config(&[("JWT_SECRET", "s3cret")]));
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let mut headers = HeaderMap::new();
                if let Ok(v) = header::HeaderValue::from_str(&format!("{scheme} {t}")) {
                    headers.insert(header::AUTHORIZATION, v);
                }
                if let Ok(v) = header::HeaderValue::from_str(&format!("duplex.v1, bearer.{t}")) {
                    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
                }
                let query = HashMap::from([("token".to_owned(), t.clone())]);
                let found = token_from_request(&headers, &query);
                prop_assert!(rt.block_on(auth.authenticate(found)).is_err());
                prop_assert!(rt.block_on(auth.authenticate(Some(&t))).is_err());
            }
        }
    }

    #[tokio::test]
    async fn hs256_claims_are_checked() {
        let auth = Authenticator::new(&config(&[
            ("JWT_SECRET", "s3cret"),
            ("JWT_ISSUER", "https://id.example"),
            ("JWT_AUDIENCE", "duplex"),
        ]));
        let good = json!({"sub": "user_1", "exp": now() + 600, "iss": "https://id.example", "aud": "duplex", "plan": "pro"});
        let with = |patch: serde_json::Value| {
            let mut c = good.clone();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            c
        };
        let check = |t: String| {
            let auth = &auth;
            async move { auth.authenticate(Some(&t)).await }
        };
        assert_eq!(
            check(hs("s3cret", good.clone())).await,
            Ok(Identity {
                user_id: "user_1".into(),
                anonymous: false
            })
        );
        let cases = [
            (hs("other", good.clone()), AuthError::BadSignature),
            (
                hs("s3cret", with(json!({"exp": now() - LEEWAY_SECS - 60}))),
                AuthError::Expired,
            ),
            (
                hs("s3cret", with(json!({"nbf": now() + LEEWAY_SECS + 60}))),
                AuthError::NotYetValid,
            ),
            (
                hs("s3cret", with(json!({"iss": "https://evil.example"}))),
                AuthError::WrongIssuer,
            ),
            (
                hs("s3cret", with(json!({"aud": "someone-else"}))),
                AuthError::WrongAudience,
            ),
            (
                hs("s3cret", with(json!({"exp": null}))),
                AuthError::MissingClaim("exp".into()),
            ),
            (
                hs("s3cret", with(json!({"sub": null}))),
                AuthError::MissingClaim("sub".into()),
            ),
            (
                hs("s3cret", with(json!({"sub": ""}))),
                AuthError::MissingClaim("sub".into()),
            ),
            ("not.a.jwt".to_owned(), AuthError::Malformed),
        ];
        for (token, want) in cases {
            assert_eq!(check(token).await, Err(want));
        }
        // Within the leeway: still valid.
        let t = hs("s3cret", with(json!({"exp": now() - 5, "nbf": now() + 5})));
        assert!(check(t).await.is_ok());
        assert_eq!(auth.authenticate(None).await, Err(AuthError::MissingToken));
        // RS256 is not accepted without a JWKS.
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &good,
            &EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE_PEM.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(check(rs).await, Err(AuthError::Algorithm("RS256".into())));
    }

    #[tokio::test]
    async fn anonymous_mode_only_without_auth_config() {
        let auth = Authenticator::new(&config(&[]));
        assert!(auth.is_anonymous());
        assert_eq!(auth.authenticate(None).await, Ok(Identity::anonymous()));
        let auth = Authenticator::new(&config(&[("JWT_JWKS_URL", "http://127.0.0.1:9/jwks")]));
        assert!(!auth.is_anonymous());
        assert_eq!(auth.authenticate(None).await, Err(AuthError::MissingToken));
    }

    /// A JWKS endpoint on loopback counting its requests; `up` false answers 500.
    async fn fake_jwks(
        set: serde_json::Value,
    ) -> (
        String,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::sync::Arc<Mutex<serde_json::Value>>,
    ) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let hits = Arc::new(AtomicUsize::new(0));
        let up = Arc::new(AtomicBool::new(true));
        let set = Arc::new(Mutex::new(set));
        let (h, u, s) = (hits.clone(), up.clone(), set.clone());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (h, u, s) = (h.clone(), u.clone(), s.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    if u.load(Ordering::SeqCst) {
                        (StatusCode::OK, s.lock().unwrap().to_string())
                    } else {
                        (StatusCode::INTERNAL_SERVER_ERROR, String::new())
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/jwks"), hits, up, set)
    }

    pub(crate) fn test_jwk(kid: &str) -> serde_json::Value {
        let key = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE_PEM.as_bytes()).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).unwrap()
    }

    fn rs(kid: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.to_owned());
        let key = EncodingKey::from_rsa_pem(TEST_RSA_PRIVATE_PEM.as_bytes()).unwrap();
        encode(&h, &claims, &key).unwrap()
    }

    #[tokio::test]
    async fn rs256_with_jwks_caches_keys_and_rate_limits_refreshes() {
        use std::sync::atomic::Ordering;
        let (url, hits, up, set) = fake_jwks(json!({"keys": [test_jwk("k1")]})).await;
        let mut auth = Authenticator::new(&config(&[
            ("JWT_JWKS_URL", &url),
            ("JWT_AUDIENCE", "duplex"),
        ]));
        let min_refresh = Duration::from_millis(300);
        auth.jwks.as_mut().unwrap().min_refresh = min_refresh;
        let claims = json!({"sub": "user_2", "exp": now() + 600, "aud": "duplex"});
        let hits = || hits.load(Ordering::SeqCst);
        let t = tokio::time::timeout(Duration::from_secs(10), async {
            let id = auth.authenticate(Some(&rs("k1", claims.clone()))).await;
            assert_eq!(id.unwrap().user_id, "user_2");
            // Cached: no second fetch.
            auth.authenticate(Some(&rs("k1", claims.clone())))
                .await
                .unwrap();
            assert_eq!(hits(), 1);
            // The IdP rotates in k2. Right after a fetch an unknown kid does not refetch...
            *set.lock().unwrap() = json!({"keys": [test_jwk("k1"), test_jwk("k2")]});
            assert_eq!(
                auth.authenticate(Some(&rs("k2", claims.clone()))).await,
                Err(AuthError::UnknownKid("k2".into()))
            );
            assert_eq!(hits(), 1);
            // ...once the minimum interval passed, it does, and finds the new key.
            tokio::time::sleep(min_refresh).await;
            assert!(
                auth.authenticate(Some(&rs("k2", claims.clone())))
                    .await
                    .is_ok()
            );
            assert_eq!(hits(), 2);
            // A made-up kid right after that: no request to the IdP.
            assert_eq!(
                auth.authenticate(Some(&rs("k9", claims.clone()))).await,
                Err(AuthError::UnknownKid("k9".into()))
            );
            assert_eq!(hits(), 2);
            // Wrong audience with a valid RS256 signature.
            let bad_aud = json!({"sub": "user_2", "exp": now() + 600, "aud": "other"});
            assert_eq!(
                auth.authenticate(Some(&rs("k1", bad_aud))).await,
                Err(AuthError::WrongAudience)
            );
            // The IdP goes down: cached keys keep working.
            up.store(false, Ordering::SeqCst);
            tokio::time::sleep(min_refresh).await;
            assert!(
                auth.authenticate(Some(&rs("k1", claims.clone())))
                    .await
                    .is_ok()
            );

            // An IdP that is down before the first fetch: 503, not 401.
            let (url, _, up, _) = fake_jwks(json!({"keys": [test_jwk("k1")]})).await;
            up.store(false, Ordering::SeqCst);
            let auth = Authenticator::new(&config(&[("JWT_JWKS_URL", &url)]));
            let e = auth
                .authenticate(Some(&rs("k1", claims.clone())))
                .await
                .unwrap_err();
            assert!(matches!(e, AuthError::JwksUnavailable(_)), "{e:?}");
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        });
        t.await.expect("in time");
    }

    #[test]
    fn tokens_come_from_header_then_subprotocol_then_query() {
        let mut h = HeaderMap::new();
        let mut q = HashMap::new();
        assert_eq!(token_from_request(&h, &q), None);
        q.insert("token".to_owned(), "q".to_owned());
        assert_eq!(token_from_request(&h, &q), Some("q"));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "duplex.v1, bearer.p".parse().unwrap(),
        );
        assert_eq!(token_from_request(&h, &q), Some("p"));
        h.insert(header::AUTHORIZATION, "bearer  h ".parse().unwrap());
        assert_eq!(token_from_request(&h, &q), Some("h"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(token_from_request(&h, &q), Some("p"));
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example".to_owned()];
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&allowed, &h), "no Origin: not a browser");
        h.insert(header::ORIGIN, "https://app.example".parse().unwrap());
        assert!(origin_allowed(&allowed, &h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!origin_allowed(&allowed, &h));
        assert!(origin_allowed(&[], &h), "empty list allows all");
    }

    #[tokio::test(start_paused = true)]
    async fn connect_limiter_refills_and_stays_bounded() {
        use std::net::IpAddr;
        let key = |ip: IpAddr| ClientKey::of(ip);
        let l = ConnectLimiter::new(6); // one token every 10 s, bursts of 6
        let ip = key([10, 0, 0, 1].into());
        for _ in 0..6 {
            assert!(l.check(ip));
        }
        assert!(!l.check(ip));
        assert!(
            l.check(key([10, 0, 0, 2].into())),
            "other addresses unaffected"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(l.check(ip));
        assert!(!l.check(ip));
        for i in 0..(MAX_TRACKED_IPS as u32 + 10) {
            l.check(key(IpAddr::from(i.to_be_bytes())));
        }
        assert!(l.tracked() <= MAX_TRACKED_IPS, "{}", l.tracked());
        assert!(ConnectLimiter::new(0).check(ip), "0 = off");
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_addresses_of_one_64_share_a_bucket() {
        use std::net::IpAddr;
        let key = |s: &str| ClientKey::of(s.parse::<IpAddr>().unwrap());
        let l = ConnectLimiter::new(2);
        assert!(l.check(key("2001:db8:1:2::1")));
        assert!(l.check(key("2001:db8:1:2::2")));
        assert!(
            !l.check(key("2001:db8:1:2:ffff::3")),
            "a third address of the same /64 is the same client"
        );
        assert!(
            l.check(key("2001:db8:1:3::1")),
            "another /64 is another client"
        );
    }
}
