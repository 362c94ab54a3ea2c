//! The LLM router: one [`LanguageModel`] over named endpoints (each an OpenAI-compatible base
//! URL, key and model), with routing by plan tier, prompt size and remaining budget; failover
//! down a chain before the first token; per-endpoint circuit breakers; retries with
//! exponential backoff and jitter before the first token; and an optional response cache.
//!
//! The decisions live in sans-IO parts that take `now` as an argument and are tested as
//! timelines: [`CircuitBreaker`], [`RouterCore`] (route choice + breakers of all endpoints),
//! [`Failover`] (one request's attempts: which endpoint to try, until when to wait for its
//! first token, how long to back off, when to give up), [`ResponseCache`] and [`backoff`].
//! [`LlmRouter`] is the async shell: it opens the stream `Failover` names, races it against
//! the deadline it was given, reports what happened and forwards the committed stream. It
//! decides nothing itself.
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

    /// The chain for a request whose session asked for endpoint `wanted` (`session.start`
    /// `model`): that endpoint goes first if it is in the chain the route picked; otherwise
    /// it changes nothing. A client chooses among its plan's endpoints, never beyond them
    /// (nor past a size or budget rule that moved the turn to another chain).
    pub fn chain_for(&self, input: &RouteInput<'_>, wanted: Option<&str>) -> Vec<usize> {
        let mut chain = self.chain(input);
        if let Some(i) = wanted.and_then(|w| self.names.iter().position(|n| n == w))
            && let Some(at) = chain.iter().position(|&c| c == i)
        {
            chain.remove(at);
            chain.insert(0, i);
        }
        chain
    }

    /// The endpoints any request of `plan` may be routed to (whatever its size and budget),
    /// in first-use order: what a client of that plan may name as its `model`.
    pub fn plan_endpoints(&self, plan: Option<&str>) -> Vec<&str> {
        let mut out: Vec<usize> = Vec::new();
        let input = RouteInput {
            plan,
            prompt_tokens: 0,
            budget_remaining_usd: None,
        };
        let mut covered = false;
        for (conds, chain) in &self.routes {
            let plan_ok = conds
                .iter()
                .all(|c| !matches!(c, Condition::Plan(_)) || c.matches(&input));
            if !plan_ok {
                continue;
            }
            for &i in chain {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
            // A route with no condition but the plan catches every request of it.
            if conds.iter().all(|c| matches!(c, Condition::Plan(_))) {
                covered = true;
                break;
            }
        }
        if !covered {
            // Requests no route matches go to every endpoint in order.
            for i in 0..self.names.len() {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.into_iter().map(|i| self.names[i].as_str()).collect()
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
    /// After the first token, a gap this long without the next one ends the answer with
    /// [`ProviderError::Timeout`] (no failover: the user already heard the start).
    pub idle_timeout: Duration,
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
            // Tokens come every few tens of ms; an endpoint that stops for 10 s mid-answer
            // (bytes may still flow: SSE keep-alive comments) is stuck, and the turn should
            // end with an error rather than hold the user.
            idle_timeout: Duration::from_secs(10),
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

// ---------------------------------------------------------------------------------------------
// Failover: one request's attempts (sans-IO)
// ---------------------------------------------------------------------------------------------

/// What happened to the attempt the [`Failover`] asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum FailoverInput {
    /// The endpoint's stream yielded its first token (or finished without one: an empty
    /// answer is an answer). From here on the attempt is committed.
    FirstToken,
    /// The stream failed with this error (before or after the first token).
    Failed(ProviderError),
    /// The committed stream ended without finishing (no `Done`).
    Cut,
    /// The committed stream finished with `Done`.
    Finished,
    /// The caller gave up (the session cancelled the turn).
    Cancelled,
}

/// What the shell must do next for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum FailoverOutput {
    /// Open a stream on endpoint `endpoint`; without a first token by `deadline`, call
    /// [`Failover::handle_timeout`].
    Try { endpoint: usize, deadline: Instant },
    /// Nothing to do before this instant (a first-token deadline or a backoff); then call
    /// [`Failover::handle_timeout`].
    WaitUntil(Instant),
    /// The attempt on `endpoint` produced its first token: forward the stream to the session
    /// and report how it ends.
    Commit { endpoint: usize },
    /// The request is over with this error for the session.
    GiveUp(ProviderError),
    /// The request is over (finished, given up or cancelled).
    Idle,
}

/// Retry timing of a [`Failover`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub first_token_timeout: Duration,
    /// Extra passes over the chain after all of it failed before the first token.
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl From<&RouterConfig> for RetryPolicy {
    fn from(c: &RouterConfig) -> RetryPolicy {
        RetryPolicy {
            first_token_timeout: c.first_token_timeout,
            retries: c.retries,
            backoff_base: c.backoff_base,
            backoff_max: c.backoff_max,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Pick the next endpoint of the chain at the next poll.
    Next,
    /// Waiting for the first token of `endpoint` until `deadline`.
    Trying {
        endpoint: usize,
        deadline: Instant,
        announced: bool,
    },
    /// Waiting out the backoff before the next pass.
    Backoff { until: Instant, announced: bool },
    /// Forwarding the committed stream of `endpoint`.
    Streaming { endpoint: usize, announced: bool },
    /// Over; `GiveUp` is emitted once if there is an error.
    Over,
}

/// The attempts of one request, str0m-style: [`Failover::poll_output`] says what to try or
/// how long to wait, the shell reports what happened with [`Failover::handle_input`] and
/// [`Failover::handle_timeout`]. The breakers are shared by all requests, so they live in the
/// [`RouterCore`] passed to every call; the shell holds its lock only for the call.
///
/// It walks the chain (skipping endpoints whose breaker refuses), fails over on any failure
/// before the first token except a request error (400/413/422/invalid request: another
/// endpoint would reject it too), walks the chain again after a [`backoff`] `retries` times,
/// and after the first token never tries anything again: a failure is given up.
pub struct Failover {
    chain: Vec<usize>,
    policy: RetryPolicy,
    /// Uniform in [0, 1) per backoff; injected so a timeline is deterministic.
    jitter: Box<dyn FnMut() -> f64 + Send>,
    pass: u32,
    position: usize,
    phase: Phase,
    failures: Vec<String>,
    give_up: Option<ProviderError>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("chain", &self.chain)
            .field("pass", &self.pass)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl Failover {
    pub fn new(
        chain: Vec<usize>,
        policy: RetryPolicy,
        jitter: Box<dyn FnMut() -> f64 + Send>,
    ) -> Failover {
        Failover {
            chain,
            policy,
            jitter,
            pass: 0,
            position: 0,
            phase: Phase::Next,
            failures: Vec::new(),
            give_up: None,
        }
    }

    /// What to do next.
    pub fn poll_output(&mut self, now: Instant, core: &mut RouterCore) -> FailoverOutput {
        loop {
            match &mut self.phase {
                Phase::Next => {
                    if let Some(&endpoint) = self.chain.get(self.position) {
                        self.position += 1;
                        if core.try_acquire(now, endpoint) {
                            self.phase = Phase::Trying {
                                endpoint,
                                deadline: now + self.policy.first_token_timeout,
                                announced: false,
                            };
                        } else {
                            let name = &core.names()[endpoint];
                            self.failures.push(format!("{name}: circuit open"));
                        }
                    } else if self.pass < self.policy.retries {
                        self.pass += 1;
                        self.position = 0;
                        let delay = backoff(
                            self.pass,
                            self.policy.backoff_base,
                            self.policy.backoff_max,
                            (self.jitter)(),
                        );
                        self.phase = Phase::Backoff {
                            until: now + delay,
                            announced: false,
                        };
                    } else {
                        self.phase = Phase::Over;
                        self.give_up = Some(ProviderError::Connect(format!(
                            "all LLM endpoints failed: {}",
                            self.failures.join("; ")
                        )));
                    }
                }
                Phase::Trying {
                    endpoint,
                    deadline,
                    announced,
                } => {
                    if *announced {
                        return FailoverOutput::WaitUntil(*deadline);
                    }
                    *announced = true;
                    return FailoverOutput::Try {
                        endpoint: *endpoint,
                        deadline: *deadline,
                    };
                }
                Phase::Backoff { until, announced } => {
                    *announced = true;
                    return FailoverOutput::WaitUntil(*until);
                }
                Phase::Streaming {
                    endpoint,
                    announced,
                } => {
                    if *announced {
                        return FailoverOutput::Idle;
                    }
                    *announced = true;
                    return FailoverOutput::Commit {
                        endpoint: *endpoint,
                    };
                }
                Phase::Over => {
                    return match self.give_up.take() {
                        Some(e) => FailoverOutput::GiveUp(e),
                        None => FailoverOutput::Idle,
                    };
                }
            }
        }
    }

    /// Reports what happened to the current attempt.
    pub fn handle_input(&mut self, now: Instant, core: &mut RouterCore, input: FailoverInput) {
        match (self.phase, input) {
            (Phase::Trying { endpoint, .. }, FailoverInput::FirstToken) => {
                core.report(now, endpoint, Outcome::Success);
                self.phase = Phase::Streaming {
                    endpoint,
                    announced: false,
                };
            }
            (Phase::Trying { endpoint, .. }, FailoverInput::Failed(e)) if is_request_error(&e) => {
                core.report(now, endpoint, Outcome::Abandoned);
                self.give_up(e);
            }
            (Phase::Trying { endpoint, .. }, FailoverInput::Failed(e)) => {
                let name = &core.names()[endpoint];
                tracing::warn!(endpoint = %name, error = %e, "LLM endpoint failed before the first token; failing over");
                self.failures.push(format!("{name}: {e}"));
                core.report(now, endpoint, Outcome::Failure);
                self.phase = Phase::Next;
            }
            (Phase::Trying { endpoint, .. }, FailoverInput::Cancelled) => {
                // Neither success nor failure, but a half-open probe must not stay claimed.
                core.report(now, endpoint, Outcome::Abandoned);
                self.phase = Phase::Over;
            }
            (Phase::Streaming { endpoint, .. }, FailoverInput::Failed(e)) => {
                // The user heard the start: no failover, the error goes to the session.
                core.report(now, endpoint, Outcome::Failure);
                self.give_up(e);
            }
            (Phase::Streaming { endpoint, .. }, FailoverInput::Cut) => {
                let name = &core.names()[endpoint];
                self.give_up(ProviderError::Closed(format!(
                    "{name}: stream ended without finishing"
                )));
            }
            (Phase::Streaming { .. }, FailoverInput::Finished) | (_, FailoverInput::Cancelled) => {
                self.phase = Phase::Over
            }
            (phase, input) => {
                tracing::debug!(?phase, ?input, "failover input ignored in this phase");
            }
        }
    }

    /// Call when `now` reached the deadline of the last `Try` or `WaitUntil`.
    pub fn handle_timeout(&mut self, now: Instant, core: &mut RouterCore) {
        match self.phase {
            Phase::Trying { deadline, .. } if now >= deadline => {
                let e = ProviderError::Timeout(format!(
                    "no first token within {} ms",
                    self.policy.first_token_timeout.as_millis()
                ));
                self.handle_input(now, core, FailoverInput::Failed(e));
            }
            Phase::Backoff { until, .. } if now >= until => self.phase = Phase::Next,
            _ => {}
        }
    }

    fn give_up(&mut self, e: ProviderError) {
        self.phase = Phase::Over;
        self.give_up = Some(e);
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

/// The shell's side of a [`Failover`]: reports `Cancelled` if the request is dropped (the
/// session cancelled the turn) while an attempt is open, so a half-open probe cannot stay
/// claimed forever.
struct Attempts {
    core: Arc<Mutex<RouterCore>>,
    failover: Failover,
}

impl Attempts {
    fn poll(&mut self) -> FailoverOutput {
        let mut core = self.core.lock().expect("not poisoned");
        self.failover.poll_output(Instant::now(), &mut core)
    }

    fn input(&mut self, input: FailoverInput) {
        let mut core = self.core.lock().expect("not poisoned");
        self.failover.handle_input(Instant::now(), &mut core, input);
    }

    fn timeout(&mut self) {
        let mut core = self.core.lock().expect("not poisoned");
        self.failover.handle_timeout(Instant::now(), &mut core);
    }
}

impl Drop for Attempts {
    fn drop(&mut self) {
        self.input(FailoverInput::Cancelled);
    }
}

impl LanguageModel for LlmRouter {
    fn name(&self) -> &str {
        &self.name
    }

    fn check_model(&self, plan: Option<&str>, model: &str) -> Result<(), String> {
        let core = self.core.lock().expect("not poisoned");
        let allowed = core.plan_endpoints(plan);
        if allowed.contains(&model) {
            return Ok(());
        }
        // Client text in an error is quoted short (a hostile name could be long).
        const QUOTE_CHARS: usize = 64;
        let mut quoted: String = model.chars().take(QUOTE_CHARS).collect();
        if quoted.len() < model.len() {
            quoted.push('…');
        }
        Err(format!(
            "model {quoted:?} is not available on this plan (available: {}); the plan's default applies",
            allowed.join(", ")
        ))
    }

    fn stream(&self, request: LlmRequest) -> LlmStream {
        let this = self.clone();
        Box::pin(channel_stream(move |tx| async move {
            let input = RouteInput {
                plan: request.plan.as_deref(),
                prompt_tokens: estimate_tokens(&request),
                budget_remaining_usd: request.budget_remaining_usd,
            };
            // A model the session asked for by endpoint name goes first, within the chain
            // the route picked only.
            let chain = this
                .core
                .lock()
                .expect("not poisoned")
                .chain_for(&input, request.model.as_deref());
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

            let mut attempts = Attempts {
                core: this.core.clone(),
                failover: Failover::new(
                    chain,
                    RetryPolicy::from(&this.config),
                    Box::new(rand::random::<f64>),
                ),
            };
            // The attempt's stream and its first item, once an endpoint produced one.
            let mut committed: Option<(LlmStream, LlmEvent, usize)> = None;
            loop {
                match attempts.poll() {
                    FailoverOutput::Try { endpoint, deadline } => {
                        let mut s = this.endpoints[endpoint].stream(upstream.clone());
                        let got = tokio::time::timeout_at(deadline.into(), async {
                            loop {
                                match s.next().await {
                                    Some(Ok(LlmEvent::Delta(t))) if t.is_empty() => continue,
                                    Some(Ok(ev)) => return Ok(ev),
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
                        match got {
                            Err(_) => {
                                attempts.timeout();
                                this.observe(endpoint, true);
                            }
                            Ok(Err(e)) => {
                                let request_error = is_request_error(&e);
                                attempts.input(FailoverInput::Failed(e));
                                this.observe(endpoint, !request_error);
                            }
                            Ok(Ok(ev)) => {
                                committed = Some((s, ev, endpoint));
                                attempts.input(FailoverInput::FirstToken);
                                this.observe(endpoint, false);
                            }
                        }
                    }
                    FailoverOutput::WaitUntil(at) => {
                        tokio::time::sleep_until(at.into()).await;
                        attempts.timeout();
                    }
                    FailoverOutput::GiveUp(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    FailoverOutput::Idle => return,
                    FailoverOutput::Commit { .. } => break,
                }
            }
            let (mut stream, first, endpoint) = committed.expect("Commit follows a first token");
            let mut text = String::new();
            let done = match first {
                done @ LlmEvent::Done { .. } => done,
                LlmEvent::Delta(t) => {
                    text.push_str(&t);
                    if tx.send(Ok(LlmEvent::Delta(t))).await.is_err() {
                        return;
                    }
                    let idle = this.config.idle_timeout;
                    loop {
                        let next = tokio::time::timeout(idle, stream.next())
                            .await
                            .unwrap_or_else(|_| {
                                Some(Err(ProviderError::Timeout(format!(
                                    "{} sent no token for {} ms after the first",
                                    this.endpoints[endpoint].name(),
                                    idle.as_millis()
                                ))))
                            });
                        let end = match next {
                            Some(Ok(LlmEvent::Delta(t))) => {
                                text.push_str(&t);
                                if tx.send(Ok(LlmEvent::Delta(t))).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            Some(Ok(done)) => break done,
                            Some(Err(e)) => FailoverInput::Failed(e),
                            None => FailoverInput::Cut,
                        };
                        attempts.input(end);
                        this.observe(endpoint, false);
                        if let FailoverOutput::GiveUp(e) = attempts.poll() {
                            let _ = tx.send(Err(e)).await;
                        }
                        return;
                    }
                }
            };
            attempts.input(FailoverInput::Finished);
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

    /// Runs a script of `(at_ms, action)` against one request's [`Failover`] over endpoints
    /// `a`, `b` (chain `a,b`, one retry, first-token timeout 500 ms, backoff 100 ms at full
    /// jitter, breakers open after 2 failures for 1 s) and prints each output with the breaker
    /// states. `core` may carry state from earlier requests.
    fn failover_timeline(core: &mut RouterCore, t0: Instant, script: &[(u64, &str)]) -> String {
        let policy = RetryPolicy {
            first_token_timeout: ms(500),
            retries: 1,
            backoff_base: ms(100),
            backoff_max: ms(1000),
        };
        let mut f = Failover::new(vec![0, 1], policy, Box::new(|| 1.0));
        let mut out = String::new();
        let show = |o: FailoverOutput, core: &RouterCore| match o {
            FailoverOutput::Try { endpoint, deadline } => format!(
                "try {} until t={}",
                core.names()[endpoint],
                (deadline - t0).as_millis()
            ),
            FailoverOutput::WaitUntil(at) => format!("wait until t={}", (at - t0).as_millis()),
            FailoverOutput::Commit { endpoint } => format!("commit {}", core.names()[endpoint]),
            FailoverOutput::GiveUp(e) => format!("give up: {e}"),
            FailoverOutput::Idle => "idle".into(),
        };
        for &(at, action) in script {
            let now = t0 + ms(at);
            match action {
                "start" => {}
                "first" => f.handle_input(now, core, FailoverInput::FirstToken),
                "500" => f.handle_input(
                    now,
                    core,
                    FailoverInput::Failed(ProviderError::Http {
                        status: 500,
                        body: "boom".into(),
                    }),
                ),
                "400" => f.handle_input(
                    now,
                    core,
                    FailoverInput::Failed(ProviderError::Http {
                        status: 400,
                        body: "bad".into(),
                    }),
                ),
                "timeout" => f.handle_timeout(now, core),
                "cut" => f.handle_input(now, core, FailoverInput::Cut),
                "finished" => f.handle_input(now, core, FailoverInput::Finished),
                "cancel" => f.handle_input(now, core, FailoverInput::Cancelled),
                other => unreachable!("{other}"),
            }
            let o = f.poll_output(now, core);
            writeln!(
                out,
                "t={at:<5} {action:<8} -> {:<40} a={:?} b={:?}",
                show(o, core),
                core.state(now, 0),
                core.state(now, 1)
            )
            .unwrap();
        }
        out
    }

    fn two_endpoints() -> RouterCore {
        let breaker = BreakerConfig {
            failure_threshold: 2,
            cool_down: ms(1000),
        };
        RouterCore::new(vec!["a".into(), "b".into()], vec![], breaker).unwrap()
    }

    #[test]
    fn failover_walks_the_chain_backs_off_and_commits_at_the_first_token() {
        let t0 = Instant::now();
        let mut core = two_endpoints();
        let got = failover_timeline(
            &mut core,
            t0,
            &[
                (0, "start"),
                (10, "500"),       // a fails: b next, at once
                (200, "timeout"),  // too early for b's deadline: nothing changes
                (510, "timeout"),  // b never answered: the chain is exhausted, back off
                (560, "timeout"),  // still backing off
                (610, "timeout"),  // second pass from the top
                (650, "first"),    // a answers: committed, its breaker's count resets
                (700, "timeout"),  // deadlines no longer matter
                (900, "finished"), // the stream ended with Done
            ],
        );
        expect![[r#"
            t=0     start    -> try a until t=500                        a=Closed b=Closed
            t=10    500      -> try b until t=510                        a=Closed b=Closed
            t=200   timeout  -> wait until t=510                         a=Closed b=Closed
            t=510   timeout  -> wait until t=610                         a=Closed b=Closed
            t=560   timeout  -> wait until t=610                         a=Closed b=Closed
            t=610   timeout  -> try a until t=1110                       a=Closed b=Closed
            t=650   first    -> commit a                                 a=Closed b=Closed
            t=700   timeout  -> idle                                     a=Closed b=Closed
            t=900   finished -> idle                                     a=Closed b=Closed
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn after_the_first_token_a_failure_is_given_up_never_failed_over() {
        let t0 = Instant::now();
        let mut core = two_endpoints();
        let got = failover_timeline(&mut core, t0, &[(0, "start"), (100, "first"), (300, "500")]);
        expect![[r#"
            t=0     start    -> try a until t=500                        a=Closed b=Closed
            t=100   first    -> commit a                                 a=Closed b=Closed
            t=300   500      -> give up: HTTP 500: boom                  a=Closed b=Closed
        "#]]
        .assert_eq(&got);
        let got = failover_timeline(&mut core, t0, &[(0, "start"), (100, "first"), (300, "cut")]);
        expect![[r#"
            t=0     start    -> try a until t=500                        a=Closed b=Closed
            t=100   first    -> commit a                                 a=Closed b=Closed
            t=300   cut      -> give up: stream closed early: a: stream ended without finishing a=Closed b=Closed
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn failover_gives_up_naming_every_endpoint_and_skips_open_breakers() {
        let t0 = Instant::now();
        let mut core = two_endpoints();
        let got = failover_timeline(
            &mut core,
            t0,
            &[
                (0, "start"),
                (10, "500"),
                (20, "500"),
                (120, "timeout"),
                (130, "500"), // a's second failure opens its breaker
                (140, "500"), // and b's
            ],
        );
        expect![[r#"
            t=0     start    -> try a until t=500                        a=Closed b=Closed
            t=10    500      -> try b until t=510                        a=Closed b=Closed
            t=20    500      -> wait until t=120                         a=Closed b=Closed
            t=120   timeout  -> try a until t=620                        a=Closed b=Closed
            t=130   500      -> try b until t=630                        a=Open b=Closed
            t=140   500      -> give up: connect failed: all LLM endpoints failed: a: HTTP 500: boom; b: HTTP 500: boom; a: HTTP 500: boom; b: HTTP 500: boom a=Open b=Open
        "#]]
        .assert_eq(&got);
        // The next request finds both breakers open and gives up without trying; after the
        // cool-down one probe passes, and a request error is returned at once (another
        // endpoint would reject it too) without counting against the breaker.
        let got = failover_timeline(
            &mut core,
            t0,
            &[(500, "start"), (600, "timeout"), (601, "timeout")],
        );
        expect![[r#"
            t=500   start    -> wait until t=600                         a=Open b=Open
            t=600   timeout  -> give up: connect failed: all LLM endpoints failed: a: circuit open; b: circuit open; a: circuit open; b: circuit open a=Open b=Open
            t=601   timeout  -> idle                                     a=Open b=Open
        "#]]
        .assert_eq(&got);
        let got = failover_timeline(&mut core, t0, &[(1130, "start"), (1140, "400")]);
        expect![[r#"
            t=1130  start    -> try a until t=1630                       a=HalfOpen b=Open
            t=1140  400      -> give up: HTTP 400: bad                   a=HalfOpen b=HalfOpen
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn a_cancelled_probe_releases_the_half_open_breaker() {
        let t0 = Instant::now();
        let mut core = two_endpoints();
        for at in [0, 10] {
            core.report(t0 + ms(at), 0, Outcome::Failure);
        }
        // After a's cool-down the first request probes it and is cancelled mid-attempt.
        let got = failover_timeline(&mut core, t0, &[(1010, "start"), (1020, "cancel")]);
        expect![[r#"
            t=1010  start    -> try a until t=1510                       a=HalfOpen b=Closed
            t=1020  cancel   -> idle                                     a=HalfOpen b=Closed
        "#]]
        .assert_eq(&got);
        // So the next request may probe a again.
        let got = failover_timeline(&mut core, t0, &[(1030, "start"), (1040, "first")]);
        expect![[r#"
            t=1030  start    -> try a until t=1530                       a=HalfOpen b=Closed
            t=1040  first    -> commit a                                 a=Closed b=Closed
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
    fn a_client_model_only_reorders_its_plans_chain() {
        let routes =
            parse_routes("plan=free => cheap; budget<0.05 => cheap; * => main,cheap").unwrap();
        let core = RouterCore::new(
            vec!["main".into(), "cheap".into(), "premium".into()],
            routes,
            BreakerConfig::default(),
        )
        .unwrap();
        let pick = |plan, budget, wanted| {
            core.chain_for(
                &RouteInput {
                    plan,
                    prompt_tokens: 10,
                    budget_remaining_usd: budget,
                },
                wanted,
            )
            .iter()
            .map(|&i| core.names()[i].as_str())
            .collect::<Vec<_>>()
            .join(",")
        };
        // A free user naming the premium endpoint (or any other outside their route) still
        // gets their plan's chain.
        assert_eq!(pick(Some("free"), None, Some("premium")), "cheap");
        assert_eq!(pick(Some("free"), None, Some("main")), "cheap");
        // Within the chain, the named endpoint goes first.
        assert_eq!(pick(Some("pro"), None, Some("cheap")), "cheap,main");
        assert_eq!(pick(Some("pro"), None, Some("premium")), "main,cheap");
        // A budget rule is not overridden by the client's choice.
        assert_eq!(pick(Some("pro"), Some(0.01), Some("main")), "cheap");
        assert_eq!(pick(Some("pro"), None, Some("unknown")), "main,cheap");
        assert_eq!(core.plan_endpoints(Some("free")), ["cheap"]);
        assert_eq!(core.plan_endpoints(Some("pro")), ["cheap", "main"]);
        // Requests that no route matches go to every endpoint: then all are the plan's.
        let open = RouterCore::new(
            vec!["main".into(), "cheap".into(), "premium".into()],
            parse_routes("plan=free => cheap; tokens>100 => main").unwrap(),
            BreakerConfig::default(),
        )
        .unwrap();
        assert_eq!(open.plan_endpoints(Some("free")), ["cheap"]);
        assert_eq!(open.plan_endpoints(None), ["main", "cheap", "premium"]);
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
