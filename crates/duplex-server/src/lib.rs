//! The duplex server as a library: [`Server::bind`] builds everything from a [`Config`] and
//! returns the bound address, so tests run a real server on `127.0.0.1:0`; the `duplex` binary
//! is a thin wrapper around it.
//!
//! Modules: [`config`] (every environment variable, parsed into one section per subsystem;
//! each subsystem gets only its section), [`metrics`] (the Prometheus registry), `http` (the
//! endpoints), `serve` (the HTTP/1 accept loop: header read timeout, cap on connections not
//! yet upgraded), `session` (one WebSocket connection: reader, writer, actor).
//!
//! The server opens its [`Store`] (`DATABASE_URL`, applying pending migrations) before it
//! binds the port: a database it cannot use stops it at startup, not at the first session.

pub mod admin;
pub mod auth;
pub mod client_ip;
pub mod config;
mod http;
mod metering;
pub mod metrics;
pub mod providers;
mod serve;
mod session;
mod switches;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use duplex_providers::ProviderSet;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, ProviderMode};
pub use duplex_store::Store;
pub use metrics::Metrics;

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    serve: JoinHandle<std::io::Result<()>>,
    grace: std::time::Duration,
    store: Store,
    usage_backlog: metering::UsageBacklog,
}

impl Server {
    /// Binds the listener and starts serving. Returns once the port is bound.
    pub async fn bind(config: Config, metrics: Metrics) -> std::io::Result<Server> {
        // Provider usage goes to the Prometheus counters (add sinks with usage::FanOut).
        // ... and to the session they belong to, whose meter counts their cost.
        let routes = metering::SessionUsage::default();
        let sinks: Vec<Arc<dyn duplex_providers::UsageSink>> =
            vec![Arc::new(metrics.clone()), Arc::new(routes.clone())];
        let sink = duplex_providers::usage::FanOut(sinks);
        // Local engines read hundreds of MB of models: off the async runtime.
        let engines = config.engines.clone();
        let max_turn = config.turns.max_turn;
        let observer = Arc::new(metrics.clone());
        let providers = tokio::task::spawn_blocking(move || {
            providers::build(&engines, max_turn, Arc::new(sink), observer)
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
        Server::bind_inner(config, metrics, providers, routes).await
    }

    /// Like [`Server::bind`] with an explicit provider set (`None` = echo mode).
    pub async fn bind_with(
        config: Config,
        metrics: Metrics,
        providers: Option<ProviderSet>,
    ) -> std::io::Result<Server> {
        Server::bind_inner(
            config,
            metrics,
            providers,
            metering::SessionUsage::default(),
        )
        .await
    }

    async fn bind_inner(
        mut config: Config,
        metrics: Metrics,
        providers: Option<ProviderSet>,
        usage_routes: metering::SessionUsage,
    ) -> std::io::Result<Server> {
        let store = Store::open(&config.store.database_url).await.map_err(|e| {
            let url = config.store.database_url_for_logs();
            std::io::Error::other(format!("store ({url}): {e}"))
        })?;
        let billing = duplex_billing::Billing::new(
            store.clone(),
            config.billing.stripe_webhook_secret.clone(),
            config.billing.stripe_price_plans.clone(),
        );
        // Anonymous sessions: decided by the bind address (see `Config::anonymous_policy`).
        let anonymous = config.anonymous_policy();
        if let Some(a) = &anonymous {
            config.metering.anonymous_plan = Some(a.plan.clone());
            warn_anonymous(a, &config);
        }
        let listener = TcpListener::bind((config.server.bind_addr, config.server.port)).await?;
        let local_addr = listener.local_addr()?;
        let edge = serve::EdgeLimits {
            header_read_timeout: config.limits.header_read_timeout,
            max_pending: config.limits.max_pending_connections,
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let grace = config.limits.shutdown_grace;
        let switches = switches::watch_switches(
            config.metering.switches.clone(),
            config.metering.switches_file.clone(),
            shutdown.clone(),
        );
        let spend_cache =
            metering::SpendCache::new(config.metering.usage_heartbeat, metrics.clone());
        let usage_backlog =
            metering::UsageBacklog::spawn(store.clone(), spend_cache.clone(), metrics.clone());
        // Ended with the server (it stops at `shutdown`).
        drop(metering::spawn_reaper(
            store.clone(),
            metrics.clone(),
            config.metering.session_reap_after,
            shutdown.clone(),
        ));
        if let Some(p) = &providers {
            metrics.init_providers(p.stt.name(), p.llm.name(), p.tts.name());
        }
        // `duplex_ready` mirrors /readyz; `duplex_max_daily_spend_usd` the switches in force.
        metrics.ready.set(1);
        {
            let metrics = metrics.clone();
            let stop = shutdown.clone();
            let mut switches = switches.clone();
            tokio::spawn(async move {
                loop {
                    let cap = switches.borrow_and_update().max_daily_spend_micros;
                    metrics
                        .max_daily_spend_usd
                        .set(cap.map_or(0.0, |m| m as f64 / 1e6));
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        changed = switches.changed() => if changed.is_err() {
                            // No switches file: the cap never changes again.
                            stop.cancelled().await;
                            break;
                        },
                    }
                }
                metrics.ready.set(0);
            });
        }
        let state = Arc::new(http::AppState {
            auth: auth::Authenticator::new(&config.auth),
            connect_limiter: auth::ConnectLimiter::new(config.limits.connect_rate_per_min),
            switches,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            client_ip: client_ip::ClientIpSource {
                trusted: config.limits.trusted_proxies.clone(),
                header: config.limits.client_ip_header,
            },
            anonymous_per_client: anonymous.as_ref().is_some_and(|a| a.per_client),
            tracker: tracker.clone(),
            billing,
            session: session::SessionContext {
                config: Arc::new(config),
                metrics,
                providers,
                shutdown: shutdown.clone(),
                store: store.clone(),
                usage_routes,
                turn_limiter: duplex_metering::UserTurnLimiter::default(),
                spend_cache,
                usage_backlog: usage_backlog.clone(),
            },
        });
        let app = http::router(state.clone());
        let serve = tokio::spawn(serve::serve(
            listener,
            app,
            edge,
            state.session.metrics.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%local_addr, "listening");
        Ok(Server {
            local_addr,
            shutdown,
            tracker,
            serve,
            grace,
            store,
            usage_backlog,
        })
    }

    /// The store the server opened (for sessions, metering and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The token that starts a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until shutdown is requested, then drains: stops accepting, lets sessions finish
    /// their turn within the grace period, and returns when all sessions ended (or the grace
    /// period plus a margin ran out).
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        // Sessions close themselves by the grace deadline; the margin covers the close
        // handshake with clients.
        let margin = std::time::Duration::from_secs(2);
        if tokio::time::timeout(self.grace + margin, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after the grace period; exiting anyway");
        }
        let _ = tokio::time::timeout(margin, self.serve).await;
        // Writes that ended sessions handed over: applied before the store closes, within the
        // margin; what remains is logged as lost (a crash would lose it too, and the reaper
        // closes the rows).
        self.usage_backlog.flush(margin).await;
    }
}

/// A server anyone can reach without auth is worth a loud line at every start.
fn warn_anonymous(a: &config::AnonymousPolicy, config: &Config) {
    if !a.public {
        tracing::info!(
            plan = %a.plan,
            "no JWT_SECRET, JWT_JWKS_URL or CLERK_SECRET_KEY: anonymous sessions on a loopback bind"
        );
        return;
    }
    let bind = config.server.bind_addr;
    if a.plan == "unmetered" {
        tracing::warn!(
            %bind,
            "PUBLIC SERVER WITHOUT AUTH AND WITHOUT LIMITS: no JWT_SECRET, JWT_JWKS_URL or CLERK_SECRET_KEY, and ANONYMOUS_PLAN=unmetered: anyone who can reach this port talks on your engines for free"
        );
    } else {
        tracing::warn!(
            %bind,
            plan = %a.plan,
            "public server without auth: no JWT_SECRET, JWT_JWKS_URL or CLERK_SECRET_KEY; every client IP (IPv6 /64) is its own anonymous user `anon:<ip>` on the plan ANONYMOUS_PLAN (default free). Configure auth before you share this address"
        );
    }
}
