//! The HTTP side of the server. Endpoints:
//!
//! - `GET /v1/conversation` — WebSocket upgrade into a conversation session (`duplex.v1`,
//!   see `proto/PROTOCOL.md`). Refused before the upgrade, in this order: 503 while shutting
//!   down; 400 without a protocol version or for an unsupported `?v=`; 429 past
//!   `CONNECT_RATE_PER_MIN` attempts from the client IP (the TCP peer, or the address a
//!   trusted proxy names: `client_ip`; an IPv6 client per /64); 403 for an `Origin` not in
//!   `ALLOWED_ORIGINS`; 401 with the reason (missing token, bad signature, expired, wrong
//!   issuer or audience, unknown key) when auth is configured and the bearer token is not
//!   valid, 503 when the identity provider's keys cannot be fetched (see `auth`); 503 at the
//!   connection cap; 429 when the client IP is at its concurrent-session cap.
//!   The same URL without an upgrade (a plain `GET`) runs the same checks and answers with
//!   the refusal an upgrade would get, or 426 when an upgrade would be accepted: browsers
//!   hide the HTTP status of a failed WebSocket upgrade, so the browser client asks this way
//!   why it was refused (nothing is held: no permit, no per-IP slot).
//! - `GET /`, `GET /assets/{name}`, `GET /favicon.ico` — the browser voice client
//!   (`duplex-web`), unless `WEB_CLIENT=false`: embedded files with their content type, a
//!   strong `ETag` (304 on `If-None-Match`), `Cache-Control: no-cache`, a strict
//!   Content-Security-Policy and the other security headers of `duplex_web::SECURITY_HEADERS`.
//! - `GET /healthz` — liveness: 200 while the process serves requests.
//! - `GET /readyz` — readiness: 200 when providers are ready and the server is not draining,
//!   503 otherwise (load balancers stop routing new sessions during shutdown).
//! - `GET /metrics` — Prometheus text format; with `METRICS_TOKEN` set, only for requests with
//!   `Authorization: Bearer <METRICS_TOKEN>` (401 otherwise).
//! - `POST /webhooks/stripe` (path: `STRIPE_WEBHOOK_PATH`) — Stripe events, verified against
//!   `Stripe-Signature` on the raw body (at most [`STRIPE_BODY_LIMIT`] bytes) and applied to the
//!   store by `duplex-billing`: 200 when applied, already processed, stale or ignored; 400 with
//!   the reason for a bad signature or payload; 422 for an entitled subscription whose price
//!   `STRIPE_PRICE_PLANS` does not map (nothing applied: Stripe retries until it is mapped);
//!   500 when the store failed (nothing applied: Stripe retries); 503 when
//!   `STRIPE_WEBHOOK_SECRET` is not set. Every error answer counts in
//!   `duplex_stripe_webhook_errors_total{reason}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use duplex_proto::{self as proto, Encoding, ErrorCode, SessionStart};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::client_ip::{ClientIpSource, ClientKey};
use crate::session::{self, SessionContext};

/// tungstenite's read buffer per connection. tungstenite 0.28 zero-fills the free part of the
/// buffer before every socket read, including the read that finds the socket empty; with its
/// 128 KiB default that memset was ~10 % of the server's CPU in echo mode at 450 calls
/// (perf, 20 ms frames of 160-640 bytes). 4 KiB holds several frames of any client format;
/// a larger message still arrives whole (the buffer grows to the frame's length and is read
/// 4 KiB per call).
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

/// Shared state of all handlers.
pub(crate) struct AppState {
    pub session: SessionContext,
    pub tracker: TaskTracker,
    pub connections: Arc<Semaphore>,
    pub per_ip: Arc<Mutex<HashMap<ClientKey, usize>>>,
    /// How the client address is found (trusted proxies).
    pub client_ip: ClientIpSource,
    /// Anonymous sessions are one user per client (`anon:<client>`) rather than `anonymous`.
    pub anonymous_per_client: bool,
    pub auth: crate::auth::Authenticator,
    pub connect_limiter: crate::auth::ConnectLimiter,
    /// The current kill switches (`DUPLEX_SWITCHES_FILE` reloads), for sessions' meters.
    pub switches: tokio::sync::watch::Receiver<duplex_metering::Switches>,
    pub billing: duplex_billing::Billing,
}

/// Largest Stripe webhook body read. Stripe events are a few KB (lists inside objects are
/// truncated to 10 items); 1 MiB leaves room for large metadata and still bounds memory.
pub(crate) const STRIPE_BODY_LIMIT: usize = 1 << 20;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let stripe_path = state.session.config.billing.stripe_webhook_path.clone();
    let router = Router::new()
        .route(
            &stripe_path,
            post(stripe_webhook).layer(DefaultBodyLimit::max(STRIPE_BODY_LIMIT)),
        )
        .route("/v1/conversation", get(conversation))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = if state.session.config.server.web_client {
        router
            .route(
                "/",
                get(|headers: HeaderMap| async move { asset(duplex_web::index(), &headers) }),
            )
            .route("/assets/{name}", get(web_asset))
            .route(
                "/favicon.ico",
                get(|headers: HeaderMap| async move {
                    asset(
                        duplex_web::lookup("favicon.svg").expect("embedded"),
                        &headers,
                    )
                }),
            )
    } else {
        router
    };
    router.with_state(state)
}

async fn web_asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match duplex_web::lookup(&name) {
        Some(a) => asset(a, &headers),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

/// One embedded file of the browser client: 304 when the browser's copy is current.
fn asset(a: &'static duplex_web::Asset, headers: &HeaderMap) -> Response {
    let current = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| a.matches(v));
    let mut res = if current {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.content_type)], a.body).into_response()
    };
    let h = res.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(a.etag()));
    for (name, value) in duplex_web::SECURITY_HEADERS {
        h.insert(*name, HeaderValue::from_static(value));
    }
    res
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.session.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.session.config.auth.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::auth::constant_time_eq(given.as_bytes(), token.0.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "metrics need `Authorization: Bearer <METRICS_TOKEN>`\n",
            )
                .into_response();
        }
    }
    state
        .session
        .metrics
        .observe_store_writer(state.session.store.writer_stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.session.metrics.render(),
    )
        .into_response()
}

/// `POST /webhooks/stripe`: verify, apply, answer so that Stripe retries exactly the requests
/// that were not applied.
async fn stripe_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // A header that is not ASCII is malformed, not missing.
    let signature = headers
        .get("stripe-signature")
        .map(|v| v.to_str().unwrap_or(""));
    let now = time::OffsetDateTime::now_utc();
    match state.billing.handle(signature, &body, now).await {
        Ok(outcome) => {
            let word = match outcome {
                duplex_billing::Outcome::Applied { .. } => "applied",
                duplex_billing::Outcome::Duplicate => "already processed",
                duplex_billing::Outcome::Stale => "stale: ignored",
                duplex_billing::Outcome::Ignored { .. } => "ignored",
            };
            (StatusCode::OK, format!("{word}\n")).into_response()
        }
        Err(e) => {
            state
                .session
                .metrics
                .stripe_webhook_errors_total
                .with_label_values(&[e.label()])
                .inc();
            let status = StatusCode::from_u16(e.http_status())
                .expect("billing answers with valid status codes");
            if let duplex_billing::WebhookError::UnknownPrice { .. } = e {
                tracing::error!(error = %e, "stripe webhook not applied: map the price in STRIPE_PRICE_PLANS");
                return (status, format!("{e}\n")).into_response();
            }
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(error = %e, "stripe webhook not applied; Stripe will retry");
                return (status, "store unavailable: not applied, retry later\n").into_response();
            }
            tracing::warn!(error = %e, status = status.as_u16(), "stripe webhook refused");
            (status, format!("{e}\n")).into_response()
        }
    }
}

/// Holds one slot of the per-IP cap; frees it on drop.
struct IpSlot {
    ip: ClientKey,
    map: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl IpSlot {
    fn acquire(
        map: &Arc<Mutex<HashMap<ClientKey, usize>>>,
        ip: ClientKey,
        cap: usize,
    ) -> Option<IpSlot> {
        let mut m = map
            .lock()
            .expect("per-IP map is never poisoned: no panics while held");
        let n = m.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            map: map.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self
            .map
            .lock()
            .expect("per-IP map is never poisoned: no panics while held");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

fn reject(state: &AppState, status: StatusCode, reason: &'static str, message: &str) -> Response {
    state
        .session
        .metrics
        .connections_rejected
        .with_label_values(&[reason])
        .inc();
    (status, format!("{message}\n")).into_response()
}

async fn conversation(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(state): State<Arc<AppState>>,
) -> Response {
    let config = state.session.config.clone();
    if state.session.shutdown.is_cancelled() {
        return reject(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server is shutting down",
        );
    }
    if let Some(v) = params.get("v")
        && v != &proto::VERSION.to_string()
    {
        return reject(
            &state,
            StatusCode::BAD_REQUEST,
            "bad_version",
            &format!("unsupported protocol version {v:?}; this server speaks v=1"),
        );
    }
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(','))
        .any(|p| p.trim() == proto::SUBPROTOCOL);
    if !offered && !params.contains_key("v") {
        return reject(
            &state,
            StatusCode::BAD_REQUEST,
            "no_version",
            "select the protocol version: offer the `duplex.v1` WebSocket subprotocol or add `?v=1`",
        );
    }
    // Who the client is: the TCP peer, unless a trusted proxy says otherwise.
    let client_ip = state.client_ip.client_ip(peer.ip(), &headers);
    let client = ClientKey::of(client_ip);
    // Cheap checks first: the rate limit also counts attempts with bad tokens.
    if !state.connect_limiter.check(client) {
        return reject(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "connect_rate",
            "too many connection attempts from this address; retry later",
        );
    }
    if !crate::auth::origin_allowed(&config.auth.allowed_origins, &headers) {
        return reject(
            &state,
            StatusCode::FORBIDDEN,
            "origin",
            "this Origin is not allowed (ALLOWED_ORIGINS)",
        );
    }
    let identity = match state
        .auth
        .authenticate(crate::auth::token_from_request(&headers, &params))
        .await
    {
        Ok(id) if id.anonymous && state.anonymous_per_client => {
            crate::auth::Identity::anonymous_client(client)
        }
        Ok(id) => id,
        Err(e) => {
            let status = e.status();
            let label = e.label();
            return reject(&state, status, label, &e.to_string());
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        // A plain GET: the admission checks' verdict, holding nothing (see the module doc).
        Err(
            WebSocketUpgradeRejection::InvalidConnectionHeader(_)
            | WebSocketUpgradeRejection::InvalidUpgradeHeader(_),
        ) => return admission_verdict(&state, client),
        Err(other) => return other.into_response(),
    };
    let Ok(permit): Result<OwnedSemaphorePermit, _> = state.connections.clone().try_acquire_owned()
    else {
        return reject(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "server is at its connection limit",
        );
    };
    let Some(slot) = IpSlot::acquire(&state.per_ip, client, config.limits.max_connections_per_ip)
    else {
        return reject(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "per_ip",
            "too many connections from this address",
        );
    };
    let ws = if offered {
        ws.protocols([proto::SUBPROTOCOL])
    } else {
        ws
    };
    let start = start_from_query(&params);
    let ctx = state.session.clone();
    let switches = state.switches.clone();
    let tracker = state.tracker.clone();
    // The session enforces `max_message_bytes` itself so it can answer with an error and a
    // 1009 close; tungstenite's own cap (which fails the socket without a word) sits above it
    // and only bounds memory for absurd messages.
    let hard_cap = config
        .limits
        .max_message_bytes
        .saturating_mul(4)
        .max(1 << 20);
    let limit = config.limits.max_message_bytes;
    // The session logs this as its peer: the client's address (with the TCP port only when
    // the client is the TCP peer; a proxy's port says nothing about the client).
    let peer = if client_ip == peer.ip().to_canonical() {
        SocketAddr::new(client_ip, peer.port())
    } else {
        tracing::debug!(%client_ip, proxy = %peer, "client named by a trusted proxy");
        SocketAddr::new(client_ip, 0)
    };
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                let _permit = permit;
                let _slot = slot;
                session::run(socket, ctx, start, peer, limit, identity, switches).await;
            })
        })
}

/// What a plain `GET /v1/conversation` answers once the checks before the caps passed: the
/// caps' refusal, or 426 (the request would have been accepted as an upgrade).
fn admission_verdict(state: &AppState, ip: ClientKey) -> Response {
    if state.connections.available_permits() == 0 {
        return reject(
            state,
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "server is at its connection limit",
        );
    }
    let at_cap = state
        .per_ip
        .lock()
        .expect("per-IP map is never poisoned: no panics while held")
        .get(&ip)
        .is_some_and(|n| *n >= state.session.config.limits.max_connections_per_ip);
    if at_cap {
        return reject(
            state,
            StatusCode::TOO_MANY_REQUESTS,
            "per_ip",
            "too many connections from this address",
        );
    }
    (
        StatusCode::UPGRADE_REQUIRED,
        [(header::UPGRADE, "websocket")],
        "admission checks passed: open this URL as a WebSocket (subprotocol duplex.v1)\n",
    )
        .into_response()
}

/// `session.start` given as query parameters (`?sample_rate=8000&encoding=mulaw`), for clients
/// that cannot send a JSON message first. `None` when the URL has no `sample_rate`.
fn start_from_query(
    q: &HashMap<String, String>,
) -> Option<Result<SessionStart, (ErrorCode, String)>> {
    const FIELDS: [&str; 8] = [
        "sample_rate",
        "encoding",
        "language",
        "voice",
        "model",
        "system_prompt",
        "output_sample_rate",
        "output_encoding",
    ];
    // Not session fields: the protocol version and the auth token.
    const OTHER: [&str; 2] = ["v", "token"];
    let rate = q.get("sample_rate")?;
    Some((|| {
        if let Some(k) = q
            .keys()
            .find(|k| !FIELDS.contains(&k.as_str()) && !OTHER.contains(&k.as_str()))
        {
            return Err((
                ErrorCode::InvalidMessage,
                format!("unknown query parameter {k:?}"),
            ));
        }
        let num = |name: &str, v: &str| {
            v.parse::<u32>().map_err(|_| {
                (
                    ErrorCode::UnsupportedSampleRate,
                    format!("{name}={v:?} is not a number"),
                )
            })
        };
        let enc = |name: &str, v: &str| {
            Encoding::parse(v).ok_or_else(|| {
                (
                    ErrorCode::UnsupportedEncoding,
                    format!("{name}={v:?}: use pcm16 or mulaw"),
                )
            })
        };
        Ok(SessionStart {
            sample_rate: num("sample_rate", rate)?,
            encoding: q
                .get("encoding")
                .map(|v| enc("encoding", v))
                .transpose()?
                .unwrap_or_default(),
            language: q.get("language").cloned(),
            voice: q.get("voice").cloned(),
            model: q.get("model").cloned(),
            system_prompt: q.get("system_prompt").cloned(),
            output_sample_rate: q
                .get("output_sample_rate")
                .map(|v| num("output_sample_rate", v))
                .transpose()?,
            output_encoding: q
                .get("output_encoding")
                .map(|v| enc("output_encoding", v))
                .transpose()?,
        })
    })())
}
