//! The LLM router: one [`LanguageModel`] over named endpoints (each an OpenAI-compatible base
//! URL, key and model), with routing by plan tier, prompt size and remaining budget; failover
//! down a chain before the first token; per-endpoint circuit breakers; retries with
//! exponential backoff and jitter before the first token; and an optional response cache.
//!
//! The decisions live in sans-IO parts that take `now` as an argument and are tested as
//! timelines: [`CircuitBreaker`], [`RouterCore`] (route choice + breakers), [`ResponseCache`]
//! and [`backoff`]. [`LlmRouter`] is the async shell that runs attempts.
//!
//! Rules:
//! - A failure before the first token (connect error, 429, 5xx, 401/403/404, malformed or cut
//!   stream, or no first token within `first_token_timeout`) counts against the endpoint's
//!   breaker and moves on to the next endpoint of the chain. When the whole chain failed, it
//!   is walked again after a backoff, `retries` times. A request the endpoint rejects as
//!   invalid (400, 413, 422) is returned at once: another endpoint would reject it too.
//! - After the first token nothing is retried (the user already heard the start): a failure
//!   is an error item, which the session turns into an `error` event.
//! - A breaker opens after `failure_threshold` consecutive failures; after `cool_down` one
//!   request may probe it (half-open); the probe's success closes it, its failure re-opens it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::{LanguageModel, LlmEvent, LlmRequest, LlmStream, ProviderError};

// ---------------------------------------------------------------------------------------------
// Circuit breaker (sans-IO)
// ---------------------------------------------------------------------------------------------

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker refuses requests before one probe may pass.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            // Three in a row is an outage, not bad luck; one probe every 30 s costs little.
            failure_threshold: 3,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// What a breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused until the cool-down ends.
    Open,
    /// The cool-down ended: one probe may pass.
    HalfOpen,
}

/// How an attempt on an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// The caller gave up (cancelled) before an outcome: neither success nor failure.
    Abandoned,
}

/// A per-endpoint circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            config,
            consecutive_failures: 0,
            opened_at: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now >= at + self.config.cool_down => BreakerState::HalfOpen,
            Some(_) => BreakerState::Open,
        }
    }

    /// Asks to send a request; in half-open state only one probe at a time is allowed.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.probing => false,
            BreakerState::HalfOpen => {
                self.probing = true;
                true
            }
        }
    }

    pub fn report(&mut self, now: Instant, outcome: Outcome) {
        match outcome {
            Outcome::Success => {
                self.consecutive_failures = 0;
                self.opened_at = None;
                self.probing = false;
            }
            Outcome::Failure => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.probing || self.consecutive_failures >= self.config.failure_threshold {
                    self.opened_at = Some(now);
                }
                self.probing = false;
            }
            Outcome::Abandoned => self.probing = false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes (sans-IO)
// ---------------------------------------------------------------------------------------------

/// One condition of a route.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The request's plan tier equals this.
    Plan(String),
    /// Estimated prompt tokens compared with a number.
    Tokens(Cmp, u32),
    /// Remaining budget (USD) below this; never matches an unmetered request.
    BudgetBelow(f64),
}

/// A comparison of the token estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Gt,
    Ge,
    Lt,
    Le,
}

/// A route: when all conditions hold, try these endpoints in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub conditions: Vec<Condition>,
    pub chain: Vec<String>,
}

/// What routing looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteInput<'a> {
    pub plan: Option<&'a str>,
    pub prompt_tokens: u32,
    pub budget_remaining_usd: Option<f64>,
}

impl Condition {
    fn matches(&self, input: &RouteInput<'_>) -> bool {
        match self {
            Condition::Plan(p) => input.plan == Some(p.as_str()),
            Condition::Tokens(cmp, n) => {
                let t = input.prompt_tokens;
                match cmp {
                    Cmp::Gt => t > *n,
                    Cmp::Ge => t >= *n,
                    Cmp::Lt => t < *n,
                    Cmp::Le => t <= *n,
                }
            }
            Condition::BudgetBelow(b) => input.budget_remaining_usd.is_some_and(|r| r < *b),
        }
    }
}

/// Parses routes in the `LLM_ROUTES` syntax: rules separated by `;`, each
/// `CONDITIONS => endpoint,endpoint`, conditions joined by `&`: `plan=NAME`, `tokens>N`
/// (also `>=`, `<`, `<=`), `budget<USD`, or `*` (always). The first matching rule wins.
/// Example: `plan=free => cheap; tokens>6000 => long,main; budget<0.05 => cheap; * => main,cheap`.
pub fn parse_routes(spec: &str) -> Result<Vec<Route>, String> {
    let mut routes = Vec::new();
    for rule in spec.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (conds, chain) = rule
            .split_once("=>")
            .ok_or_else(|| format!("rule {rule:?}: expected CONDITIONS => endpoints"))?;
        let chain: Vec<String> = chain
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if chain.is_empty() {
            return Err(format!("rule {rule:?}: no endpoints after =>"));
        }
        let mut conditions = Vec::new();
        for c in conds.split('&').map(str::trim) {
            if c == "*" {
                continue;
            }
            let cond = if let Some(p) = c.strip_prefix("plan=") {
                Condition::Plan(p.trim().to_owned())
            } else if let Some(rest) = c.strip_prefix("tokens") {
                let rest = rest.trim();
                let (cmp, n) = [
                    (">=", Cmp::Ge),
                    ("<=", Cmp::Le),
                    (">", Cmp::Gt),
                    ("<", Cmp::Lt),
                ]
                .iter()
                .find_map(|(op, cmp)| rest.strip_prefix(op).map(|n| (*cmp, n)))
                .ok_or_else(|| format!("condition {c:?}: expected tokens>N"))?;
                let n = n
                    .trim()
                    .parse()
                    .map_err(|_| format!("condition {c:?}: not a number"))?;
                Condition::Tokens(cmp, n)
            } else if let Some(b) = c.strip_prefix("budget<") {
                let b: f64 = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("condition {c:?}: not a number"))?;
                Condition::BudgetBelow(b)
            } else {
                return Err(format!(
                    "condition {c:?}: expected plan=NAME, tokens>N, budget<USD or *"
                ));
            };
            conditions.push(cond);
        }
        routes.push(Route { conditions, chain });
    }
    Ok(routes)
}

/// Route choice and breakers of all endpoints; the router's whole decision state.
#[derive(Debug, Clone)]
pub struct RouterCore {
    names: Vec<String>,
    breakers: Vec<CircuitBreaker>,
    /// Routes with chains resolved to endpoint indices.
    routes: Vec<(Vec<Condition>, Vec<usize>)>,
}

impl RouterCore {
    /// Fails when a route names an unknown endpoint.
    pub fn new(
        names: Vec<String>,
        routes: Vec<Route>,
        breaker: BreakerConfig,
    ) -> Result<RouterCore, String> {
        let mut resolved = Vec::new();
        for r in routes {
            let chain = r
                .chain
                .iter()
                .map(|n| {
                    names
                        .iter()
                        .position(|e| e == n)
                        .ok_or_else(|| format!("route names unknown endpoint {n:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            resolved.push((r.conditions, chain));
        }
        Ok(RouterCore {
            breakers: names.iter().map(|_| CircuitBreaker::new(breaker)).collect(),
            names,
            routes: resolved,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The chain for a request: the first matching route, or every endpoint in order.
    pub fn chain(&self, input: &RouteInput<'_>) -> Vec<usize> {
        self.routes
            .iter()
            .find(|(conds, _)| conds.iter().all(|c| c.matches(input)))
            .map(|(_, chain)| chain.clone())
            .unwrap_or_else(|| (0..self.names.len()).collect())
    }

    pub fn try_acquire(&mut self, now: Instant, endpoint: usize) -> bool {
        self.breakers[endpoint].try_acquire(now)
    }

    pub fn report(&mut self, now: Instant, endpoint: usize, outcome: Outcome) {
        self.breakers[endpoint].report(now, outcome);
    }

    pub fn state(&self, now: Instant, endpoint: usize) -> BreakerState {
        self.breakers[endpoint].state(now)
    }
}

/// The delay before retry pass `pass` (1, 2, …): `base * 2^(pass-1)`, capped at `max`,
/// scaled by `0.5 + jitter/2` where `jitter` is uniform in [0, 1) — so concurrent sessions
/// that failed together do not retry together.
pub fn backoff(pass: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << pass.saturating_sub(1).min(16));
    exp.min(max).mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// Estimated prompt tokens: about 4 characters per token for English text.
pub fn estimate_tokens(request: &LlmRequest) -> u32 {
    let chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
    (chars / 4) as u32
}

// ---------------------------------------------------------------------------------------------
// Response cache (sans-IO)
// ---------------------------------------------------------------------------------------------

/// Completed answers by (route target, model, prompt), with a TTL and a size bound.
#[derive(Debug, Clone)]
pub struct ResponseCache {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<String, (Instant, String, String)>,
    order: VecDeque<String>,
}

impl ResponseCache {
    pub fn new(ttl: Duration, capacity: usize) -> ResponseCache {
        ResponseCache {
            ttl,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The key of a request sent to `target` (the chain's first endpoint).
    pub fn key(target: &str, request: &LlmRequest) -> String {
        let messages = serde_json::to_string(&request.messages).expect("messages serialize");
        format!(
            "{target}\u{0}{}\u{0}{messages}",
            request.model.as_deref().unwrap_or("")
        )
    }

    /// The cached (text, model), if fresh.
    pub fn get(&self, now: Instant, key: &str) -> Option<(String, String)> {
        self.entries
            .get(key)
            .filter(|(at, _, _)| now < *at + self.ttl)
            .map(|(_, text, model)| (text.clone(), model.clone()))
    }

    pub fn insert(&mut self, now: Instant, key: String, text: String, model: String) {
        if self
            .entries
            .insert(key.clone(), (now, text, model))
            .is_none()
        {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The async shell
// ---------------------------------------------------------------------------------------------

/// Timing and retry settings of the router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// No first token within this (connect included) counts as a failure of the endpoint.
    pub first_token_timeout: Duration,
    /// Extra passes over the chain after all of it failed before the first token.
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub breaker: BreakerConfig,
    /// `Some(ttl)` turns the response cache on.
    pub cache_ttl: Option<Duration>,
    pub cache_capacity: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            // A voice user notices ~1 s of silence; 5 s without a token means the endpoint is
            // stuck, and the next one is still faster than waiting.
            first_token_timeout: Duration::from_secs(5),
            retries: 1,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(2),
            breaker: BreakerConfig::default(),
            cache_ttl: None,
            // Answers are short; 1,000 of them are well under a megabyte.
            cache_capacity: 1000,
        }
    }
}

/// Where the router reports what operators watch (the server's metrics): failovers and
/// breaker states. Called from the router's tasks; must not block.
pub trait RouterObserver: Send + Sync {
    /// The router's endpoints, once, when the observer is attached.
    fn endpoints(&self, names: &[String]);
    /// `endpoint` failed before its first token; the router moves on down the chain.
    fn failover(&self, endpoint: &str);
    /// `endpoint`'s breaker after an outcome: open (or half-open) or closed.
    fn breaker(&self, endpoint: &str, open: bool);
}

/// An LLM over named endpoints; see the module docs.
#[derive(Clone)]
pub struct LlmRouter {
    name: String,
    endpoints: Vec<Arc<dyn LanguageModel>>,
    core: Arc<Mutex<RouterCore>>,
    cache: Option<Arc<Mutex<ResponseCache>>>,
    config: RouterConfig,
    observer: Option<Arc<dyn RouterObserver>>,
}

impl std::fmt::Debug for LlmRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmRouter")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LlmRouter {
    /// Endpoints are named by their [`LanguageModel::name`]; routes refer to those names.
    pub fn new(
        endpoints: Vec<Arc<dyn LanguageModel>>,
        routes: Vec<Route>,
        config: RouterConfig,
    ) -> Result<LlmRouter, String> {
        if endpoints.is_empty() {
            return Err("the router needs at least one endpoint".into());
        }
        let names: Vec<String> = endpoints.iter().map(|e| e.name().to_owned()).collect();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(format!("endpoint name {n:?} is used twice"));
            }
        }
        let name = if names.len() == 1 {
            names[0].clone()
        } else {
            "router".to_owned()
        };
        let core = RouterCore::new(names, routes, config.breaker)?;
        let cache = config
            .cache_ttl
            .map(|ttl| Arc::new(Mutex::new(ResponseCache::new(ttl, config.cache_capacity))));
        Ok(LlmRouter {
            name,
            endpoints,
            core: Arc::new(Mutex::new(core)),
            cache,
            config,
            observer: None,
        })
    }

    /// Reports failovers and breaker states to `observer` from now on.
    pub fn with_observer(mut self, observer: Arc<dyn RouterObserver>) -> LlmRouter {
        observer.endpoints(self.core.lock().expect("not poisoned").names());
        self.observer = Some(observer);
        self
    }

    /// Tells the observer about endpoint `idx` after an outcome was reported.
    fn observe(&self, idx: usize, failover: bool) {
        let Some(observer) = &self.observer else {
            return;
        };
        let name = self.endpoints[idx].name();
        if failover {
            observer.failover(name);
        }
        let state = self
            .core
            .lock()
            .expect("not poisoned")
            .state(Instant::now(), idx);
        observer.breaker(name, state != BreakerState::Closed);
    }

    /// The breaker state of an endpoint, by name (for tests and diagnostics).
    pub fn breaker_state(&self, endpoint: &str) -> Option<BreakerState> {
        let core = self.core.lock().expect("not poisoned");
        let i = core.names().iter().position(|n| n == endpoint)?;
        Some(core.state(Instant::now(), i))
    }
}

/// Reports `Abandoned` if an attempt is dropped (the session cancelled the turn) before its
/// outcome was known, so a half-open probe cannot stay claimed forever.
struct Attempt {
    core: Arc<Mutex<RouterCore>>,
    endpoint: usize,
    settled: bool,
}

impl Attempt {
    fn settle(&mut self, outcome: Outcome) {
        self.settled = true;
        self.core
            .lock()
            .expect("not poisoned")
            .report(Instant::now(), self.endpoint, outcome);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(Outcome::Abandoned);
        }
    }
}

/// Errors that another endpoint would answer the same way.
fn is_request_error(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::InvalidRequest(_)
            | ProviderError::Http {
                status: 400 | 413 | 422,
                ..
            }
    )
}

enum First {
    Delta(String),
    Done(LlmEvent),
}

impl LanguageModel for LlmRouter {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, request: LlmRequest) -> LlmStream {
        let this = self.clone();
        Box::pin(channel_stream(move |tx| async move {
            let input = RouteInput {
                plan: request.plan.as_deref(),
                prompt_tokens: estimate_tokens(&request),
                budget_remaining_usd: request.budget_remaining_usd,
            };
            let mut chain = this.core.lock().expect("not poisoned").chain(&input);
            // A model the session asked for by endpoint name (or that endpoint's name) goes first.
            if let Some(wanted) = request.model.as_deref()
                && let Some(i) = this.endpoints.iter().position(|e| e.name() == wanted)
            {
                chain.retain(|&c| c != i);
                chain.insert(0, i);
            }
            // Endpoints use their configured model.
            let mut upstream = request.clone();
            upstream.model = None;
            let target = this.endpoints[chain[0]].name().to_owned();
            let cache_key = this
                .cache
                .as_ref()
                .map(|_| ResponseCache::key(&target, &upstream));
            if let (Some(cache), Some(key)) = (&this.cache, &cache_key) {
                let hit = cache.lock().expect("not poisoned").get(Instant::now(), key);
                if let Some((text, model)) = hit {
                    tracing::debug!(endpoint = %target, "LLM answer from cache");
                    if !text.is_empty() && tx.send(Ok(LlmEvent::Delta(text))).await.is_err() {
                        return;
                    }
                    let _ = tx.send(Ok(LlmEvent::Done { usage: None, model })).await;
                    return;
                }
            }

            let mut failures: Vec<String> = Vec::new();
            for pass in 0..=this.config.retries {
                if pass > 0 {
                    let delay = backoff(
                        pass,
                        this.config.backoff_base,
                        this.config.backoff_max,
                        rand::random::<f64>(),
                    );
                    tokio::time::sleep(delay).await;
                }
                for &idx in &chain {
                    let endpoint = &this.endpoints[idx];
                    let name = endpoint.name().to_owned();
                    if !this
                        .core
                        .lock()
                        .expect("not poisoned")
                        .try_acquire(Instant::now(), idx)
                    {
                        failures.push(format!("{name}: circuit open"));
                        continue;
                    }
                    let mut attempt = Attempt {
                        core: this.core.clone(),
                        endpoint: idx,
                        settled: false,
                    };
                    let mut stream = endpoint.stream(upstream.clone());
                    let first = tokio::time::timeout(this.config.first_token_timeout, async {
                        loop {
                            match stream.next().await {
                                Some(Ok(LlmEvent::Delta(t))) if t.is_empty() => continue,
                                Some(Ok(LlmEvent::Delta(t))) => return Ok(First::Delta(t)),
                                Some(Ok(done @ LlmEvent::Done { .. })) => {
                                    return Ok(First::Done(done));
                                }
                                Some(Err(e)) => return Err(e),
                                None => {
                                    return Err(ProviderError::Closed(
                                        "stream ended without an answer".into(),
                                    ));
                                }
                            }
                        }
                    })
                    .await;
                    let first = match first {
                        Err(_) => Err(ProviderError::Timeout(format!(
                            "no first token within {} ms",
                            this.config.first_token_timeout.as_millis()
                        ))),
                        Ok(r) => r,
                    };
                    let first = match first {
                        Ok(f) => f,
                        Err(e) if is_request_error(&e) => {
                            attempt.settle(Outcome::Abandoned);
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(endpoint = %name, error = %e, "LLM endpoint failed before the first token; failing over");
                            attempt.settle(Outcome::Failure);
                            this.observe(idx, true);
                            failures.push(format!("{name}: {e}"));
                            continue;
                        }
                    };
                    attempt.settle(Outcome::Success);
                    this.observe(idx, false);
                    let mut text = String::new();
                    let done = match first {
                        First::Done(done) => done,
                        First::Delta(t) => {
                            text.push_str(&t);
                            if tx.send(Ok(LlmEvent::Delta(t))).await.is_err() {
                                return;
                            }
                            loop {
                                match stream.next().await {
                                    Some(Ok(LlmEvent::Delta(t))) => {
                                        text.push_str(&t);
                                        if tx.send(Ok(LlmEvent::Delta(t))).await.is_err() {
                                            return;
                                        }
                                    }
                                    Some(Ok(done)) => break done,
                                    Some(Err(e)) => {
                                        this.core.lock().expect("not poisoned").report(
                                            Instant::now(),
                                            idx,
                                            Outcome::Failure,
                                        );
                                        this.observe(idx, false);
                                        let _ = tx.send(Err(e)).await;
                                        return;
                                    }
                                    None => {
                                        let _ = tx
                                            .send(Err(ProviderError::Closed(format!(
                                                "{name}: stream ended without finishing"
                                            ))))
                                            .await;
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    if let (Some(cache), Some(key), LlmEvent::Done { model, .. }) =
                        (&this.cache, cache_key, &done)
                    {
                        cache.lock().expect("not poisoned").insert(
                            Instant::now(),
                            key,
                            text,
                            model.clone(),
                        );
                    }
                    let _ = tx.send(Ok(done)).await;
                    return;
                }
            }
            let _ = tx
                .send(Err(ProviderError::Connect(format!(
                    "all LLM endpoints failed: {}",
                    failures.join("; ")
                ))))
                .await;
        }))
    }
}

/// Builds an LLM stream fed by a spawned producer. Dropping the stream aborts the producer
/// task, which drops whatever it holds (an HTTP response, an upstream stream): that is how
/// cancellation reaches the network.
pub(crate) fn channel_stream<F, Fut>(
    producer: F,
) -> impl Stream<Item = Result<LlmEvent, ProviderError>> + Send + 'static
where
    F: FnOnce(mpsc::Sender<Result<LlmEvent, ProviderError>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // One item in flight: the consumer reads tokens as they come, and a small buffer keeps
    // backpressure on the producer.
    let (tx, rx) = mpsc::channel(1);
    let handle = tokio::spawn(producer(tx));
    let guard = AbortOnDrop(handle.abort_handle());
    futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv().await.map(|item| (item, (rx, guard)))
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use std::fmt::Write;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs a script of `(at_ms, action)` against a breaker and prints what it did.
    fn breaker_timeline(script: &[(u64, &str)]) -> String {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 3,
            cool_down: ms(1000),
        });
        let mut out = String::new();
        for &(at, action) in script {
            let now = t0 + ms(at);
            let result = match action {
                "try" => format!("allowed={}", b.try_acquire(now)),
                "ok" => {
                    b.report(now, Outcome::Success);
                    String::new()
                }
                "fail" => {
                    b.report(now, Outcome::Failure);
                    String::new()
                }
                "abandon" => {
                    b.report(now, Outcome::Abandoned);
                    String::new()
                }
                other => unreachable!("{other}"),
            };
            writeln!(
                out,
                "t={at:<5} {action:<7} {result:<13} -> {:?}",
                b.state(now)
            )
            .unwrap();
        }
        out
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let got = breaker_timeline(&[
            (0, "try"),
            (10, "fail"),
            (20, "try"),
            (30, "fail"),
            (40, "try"),
            (50, "ok"), // a success resets the count
            (60, "fail"),
            (70, "fail"),
            (80, "fail"), // third in a row: open
            (90, "try"),
            (1079, "try"),  // still cooling down
            (1080, "try"),  // half-open: the probe passes...
            (1081, "try"),  // ...and only one probe
            (1200, "fail"), // probe failed: open again from here
            (1300, "try"),
            (2200, "try"),
            (2250, "abandon"), // the probe was cancelled: another may go
            (2260, "try"),
            (2300, "ok"), // probe succeeded: closed
            (2310, "try"),
        ]);
        expect![[r#"
            t=0     try     allowed=true  -> Closed
            t=10    fail                  -> Closed
            t=20    try     allowed=true  -> Closed
            t=30    fail                  -> Closed
            t=40    try     allowed=true  -> Closed
            t=50    ok                    -> Closed
            t=60    fail                  -> Closed
            t=70    fail                  -> Closed
            t=80    fail                  -> Open
            t=90    try     allowed=false -> Open
            t=1079  try     allowed=false -> Open
            t=1080  try     allowed=true  -> HalfOpen
            t=1081  try     allowed=false -> HalfOpen
            t=1200  fail                  -> Open
            t=1300  try     allowed=false -> Open
            t=2200  try     allowed=true  -> HalfOpen
            t=2250  abandon               -> HalfOpen
            t=2260  try     allowed=true  -> HalfOpen
            t=2300  ok                    -> Closed
            t=2310  try     allowed=true  -> Closed
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn routes_parse_and_choose_by_plan_size_and_budget() {
        let routes = parse_routes(
            "plan=free => cheap; tokens>1000 & plan=pro => long,main; budget<0.05 => cheap; * => main,cheap",
        )
        .unwrap();
        let core = RouterCore::new(
            vec!["main".into(), "cheap".into(), "long".into()],
            routes,
            BreakerConfig::default(),
        )
        .unwrap();
        let pick = |plan, tokens, budget| {
            core.chain(&RouteInput {
                plan,
                prompt_tokens: tokens,
                budget_remaining_usd: budget,
            })
            .iter()
            .map(|&i| core.names()[i].as_str())
            .collect::<Vec<_>>()
            .join(",")
        };
        let mut out = String::new();
        for (plan, tokens, budget) in [
            (Some("free"), 10, None),
            (Some("pro"), 10, None),
            (Some("pro"), 5000, None),
            (Some("pro"), 5000, Some(0.01)),
            (None, 5000, Some(0.01)),
            (None, 5000, Some(1.0)),
            (None, 10, None),
        ] {
            writeln!(
                out,
                "{plan:?} tokens={tokens} budget={budget:?} -> {}",
                pick(plan, tokens, budget)
            )
            .unwrap();
        }
        expect![[r#"
            Some("free") tokens=10 budget=None -> cheap
            Some("pro") tokens=10 budget=None -> main,cheap
            Some("pro") tokens=5000 budget=None -> long,main
            Some("pro") tokens=5000 budget=Some(0.01) -> long,main
            None tokens=5000 budget=Some(0.01) -> cheap
            None tokens=5000 budget=Some(1.0) -> main,cheap
            None tokens=10 budget=None -> main,cheap
        "#]]
        .assert_eq(&out);
        // Without routes every endpoint is tried in order.
        let core = RouterCore::new(
            vec!["a".into(), "b".into()],
            vec![],
            BreakerConfig::default(),
        )
        .unwrap();
        assert_eq!(
            core.chain(&RouteInput {
                plan: None,
                prompt_tokens: 0,
                budget_remaining_usd: None
            }),
            [0, 1]
        );
    }

    #[test]
    fn route_errors_are_reported() {
        for bad in [
            "plan=free",
            "plan=free =>",
            "tokens~3 => a",
            "budget<x => a",
            "colour=red => a",
        ] {
            assert!(parse_routes(bad).is_err(), "{bad}");
        }
        let routes = parse_routes("* => nowhere").unwrap();
        let e = RouterCore::new(vec!["a".into()], routes, BreakerConfig::default()).unwrap_err();
        assert!(e.contains("nowhere"), "{e}");
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let base = ms(100);
        let max = ms(1000);
        assert_eq!(backoff(1, base, max, 0.0), ms(50));
        assert_eq!(backoff(1, base, max, 1.0), ms(100));
        assert_eq!(backoff(2, base, max, 1.0), ms(200));
        assert_eq!(backoff(3, base, max, 0.0), ms(200));
        assert_eq!(backoff(10, base, max, 1.0), ms(1000));
        assert_eq!(backoff(40, base, max, 0.5), ms(750));
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let mut c = ResponseCache::new(ms(1000), 2);
        c.insert(t0, "a".into(), "A".into(), "m".into());
        assert_eq!(c.get(t0 + ms(999), "a"), Some(("A".into(), "m".into())));
        assert_eq!(c.get(t0 + ms(1000), "a"), None);
        c.insert(t0, "b".into(), "B".into(), "m".into());
        c.insert(t0, "c".into(), "C".into(), "m".into());
        assert_eq!(c.get(t0, "a"), None, "evicted: capacity 2");
        assert!(c.get(t0, "c").is_some());
    }
}
