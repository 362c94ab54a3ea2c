//! The IO side of metering: who the user is, what the store says they used, and writing the
//! meter's usage deltas. The decisions are made by the pure `duplex_metering::SessionMeter`
//! the session actor drives; this module only moves numbers between it and the store.
//!
//! Per-session provider costs reach the meter through [`SessionUsage`], a usage sink that
//! routes each provider's [`UsageRecord`] to the session it belongs to (by session id), so
//! that `MAX_DAILY_SPEND_USD` counts real provider cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use duplex_metering::{Plan, UsageTotals, UtcDate};
use duplex_providers::{UsageKind, UsageRecord, UsageSink};
use duplex_store::{Store, StoreError, User};
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::config::MeteringConfig;

/// Usage records queued for one session's actor. Records come a few per turn; 64 covers a
/// burst, and a full queue drops (the Prometheus counters still have them).
pub(crate) const SESSION_USAGE_CAPACITY: usize = 64;

/// The account a session is metered against.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    pub user: User,
    pub plan: Plan,
}

/// Resolves the user of a connection: the token's subject (created on first sight, plan
/// `free`) or an anonymous user (`anonymous`, or `anon:<client>` on a public server) on the
/// anonymous plan `Server::bind` resolved (`free` if it was not resolved: never unlimited by
/// accident).
pub(crate) async fn load_account(
    store: &Store,
    config: &MeteringConfig,
    identity: &Identity,
) -> Result<Account, StoreError> {
    let user = store.ensure_user(&identity.user_id).await?;
    let plan_name = if identity.anonymous {
        config.anonymous_plan.as_deref().unwrap_or("free")
    } else {
        user.plan.as_str()
    };
    let plan = config.plans.plan_or_free(plan_name).clone();
    Ok(Account { user, plan })
}

fn store_day(day: UtcDate) -> time::Date {
    let (y, m, d) = day.ymd();
    let month = time::Month::try_from(m as u8).expect("UtcDate months are 1..=12");
    time::Date::from_calendar_date(y, month, d as u8).expect("UtcDate is a valid date")
}

/// The user's totals for `day` as the store has them now (all sessions, all servers).
pub(crate) async fn totals(
    store: &Store,
    spend: &SpendCache,
    user_id: i64,
    day: UtcDate,
) -> Result<UsageTotals, StoreError> {
    let date = store_day(day);
    let usage = store.usage_for_day(user_id, date).await?;
    let (year, month) = day.month();
    let month = time::Month::try_from(month as u8).expect("months are 1..=12");
    let tts_month = store.tts_chars_for_month(user_id, year, month).await?;
    let spend = spend.get(store, day).await?;
    let trial_ms = store
        .user_by_id(user_id)
        .await?
        .map(|u| u.trial_ms_used)
        .unwrap_or(0);
    Ok(UsageTotals {
        day,
        seconds_today: (usage.conversation_ms.max(0) as u64) / 1000,
        trial_seconds_used: (trial_ms.max(0) as u64) / 1000,
        tts_characters_month: tts_month.max(0) as u64,
        spend_today_micros: spend,
    })
}

/// Writes one meter delta of session `session_id` and returns the user's new totals for its
/// day. Exactly once: the store applies each (session, `delta.seq`) once, so a delta sent
/// again after a write that timed out but committed is not counted twice (the totals read
/// back are the same either way).
pub(crate) async fn persist(
    store: &Store,
    spend: &SpendCache,
    session_id: &str,
    user_id: i64,
    delta: &duplex_metering::UsageDelta,
) -> Result<UsageTotals, StoreError> {
    let add = duplex_store::UsageDelta {
        conversation_ms: (delta.seconds * 1000) as i64,
        stt_ms: delta.stt_ms as i64,
        llm_prompt_tokens: 0,
        llm_completion_tokens: delta.llm_tokens as i64,
        tts_chars: delta.tts_characters as i64,
        cost_micro_usd: delta.cost_micros as i64,
    };
    let applied = store
        .add_session_usage(
            session_id,
            delta.seq,
            user_id,
            store_day(delta.day),
            add,
            (delta.trial_seconds * 1000) as i64,
            time::OffsetDateTime::now_utc(),
        )
        .await?;
    if !applied {
        tracing::info!(
            seq = delta.seq,
            "usage write was already applied (a replay after a lost answer)"
        );
    }
    let totals = totals(store, spend, user_id, delta.day).await?;
    spend
        .metrics
        .observe_user_day(totals.day.days_since_epoch(), totals.seconds_today);
    Ok(totals)
}

/// The day's provider spend across all users, read from the store at most once per `ttl` for
/// the whole server: every session's heartbeat needs it (for `MAX_DAILY_SPEND_USD`), and it
/// sums a row per user, so per-session reads would grow with sessions x users. The meter
/// already works on totals up to a heartbeat old, so a `ttl` of one heartbeat changes nothing.
/// What it reads, and each user's day totals that usage writes return, also go to the
/// metrics (`duplex_daily_spend_usd`, `duplex_busiest_user_seconds_today`).
#[derive(Clone)]
pub(crate) struct SpendCache {
    ttl: std::time::Duration,
    last: Arc<Mutex<Option<(UtcDate, std::time::Instant, u64)>>>,
    metrics: crate::Metrics,
}

impl SpendCache {
    pub fn new(ttl: std::time::Duration, metrics: crate::Metrics) -> SpendCache {
        SpendCache {
            ttl,
            last: Arc::default(),
            metrics,
        }
    }

    pub async fn get(&self, store: &Store, day: UtcDate) -> Result<u64, StoreError> {
        let now = std::time::Instant::now();
        let cached = *self
            .last
            .lock()
            .expect("spend cache lock is never poisoned");
        if let Some((d, at, micros)) = cached
            && d == day
            && now.duration_since(at) < self.ttl
        {
            return Ok(micros);
        }
        let micros = store.spend_for_day_micros(store_day(day)).await?.max(0) as u64;
        self.metrics.daily_spend_usd.set(micros as f64 / 1e6);
        *self
            .last
            .lock()
            .expect("spend cache lock is never poisoned") = Some((day, now, micros));
        Ok(micros)
    }
}

/// Routes provider usage records to the session they belong to.
#[derive(Clone, Default)]
pub(crate) struct SessionUsage {
    sessions: Arc<Mutex<HashMap<String, mpsc::Sender<UsageRecord>>>>,
}

/// Unregisters a session's route on drop.
pub(crate) struct UsageRoute {
    id: String,
    sessions: Arc<Mutex<HashMap<String, mpsc::Sender<UsageRecord>>>>,
}

impl Drop for UsageRoute {
    fn drop(&mut self) {
        self.sessions
            .lock()
            .expect("usage routes lock is never poisoned: no panics while held")
            .remove(&self.id);
    }
}

impl SessionUsage {
    /// Starts routing records of `session_id` to the returned receiver.
    pub fn register(&self, session_id: &str) -> (UsageRoute, mpsc::Receiver<UsageRecord>) {
        let (tx, rx) = mpsc::channel(SESSION_USAGE_CAPACITY);
        self.sessions
            .lock()
            .expect("usage routes lock is never poisoned: no panics while held")
            .insert(session_id.to_owned(), tx);
        let route = UsageRoute {
            id: session_id.to_owned(),
            sessions: self.sessions.clone(),
        };
        (route, rx)
    }
}

impl UsageSink for SessionUsage {
    fn record(&self, record: UsageRecord) {
        let tx = self
            .sessions
            .lock()
            .expect("usage routes lock is never poisoned: no panics while held")
            .get(&record.session_id)
            .cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(record);
        }
    }
}

/// A provider record as the meter's input.
pub(crate) fn provider_usage(record: &UsageRecord) -> duplex_metering::ProviderUsage {
    let q = record.quantity.max(0.0);
    let mut u = duplex_metering::ProviderUsage {
        cost_micros: (record.cost_usd.max(0.0) * 1_000_000.0).round() as u64,
        ..Default::default()
    };
    match record.kind {
        UsageKind::SttSeconds => u.stt_ms = (q * 1000.0).round() as u64,
        // Tokens are counted from the session's own stream events; here only the cost counts.
        UsageKind::LlmPromptTokens | UsageKind::LlmCompletionTokens => {}
        // Characters are counted by the session when it sends text to TTS.
        UsageKind::TtsCharacters => {}
    }
    u
}

/// How often the reaper looks (and once at start-up).
const REAP_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// Closes the session rows of dead servers (no usage write for `silent`, `SESSION_REAP_AFTER_SECS`:
/// a live session writes every heartbeat) at start-up and then every [`REAP_EVERY`], until
/// `stop`. Safe with several servers on one database (see `Store::reap_silent_sessions`).
pub(crate) fn spawn_reaper(
    store: Store,
    metrics: crate::Metrics,
    silent: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = time::OffsetDateTime::now_utc();
            match store
                .reap_silent_sessions(now - silent, now, "reaped: its server stopped writing")
                .await
            {
                Ok(reaped) if !reaped.is_empty() => {
                    metrics.sessions_reaped_total.inc_by(reaped.len() as u64);
                    tracing::warn!(
                        count = reaped.len(),
                        silent_secs = silent.as_secs(),
                        "closed open sessions whose server stopped writing"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not reap stale sessions"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REAP_EVERY) => {}
            }
        }
    })
}
