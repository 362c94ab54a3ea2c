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

/// The user's totals for `day` as the store has them now (all sessions, all servers), for a
/// new connection; `user` was just read (its trial use comes from it).
pub(crate) async fn totals(
    store: &Store,
    spend: &SpendCache,
    user: &User,
    day: UtcDate,
) -> Result<UsageTotals, StoreError> {
    let date = store_day(day);
    let usage = store.usage_for_day(user.id, date).await?;
    let (year, month) = day.month();
    let month = time::Month::try_from(month as u8).expect("months are 1..=12");
    let tts_month = store.tts_chars_for_month(user.id, year, month).await?;
    let spend = spend.get(store, day).await?;
    Ok(usage_totals(
        day,
        &usage,
        tts_month,
        user.trial_ms_used,
        spend,
    ))
}

fn usage_totals(
    day: UtcDate,
    usage: &duplex_store::DailyUsage,
    tts_month: i64,
    trial_ms: i64,
    spend_micros: u64,
) -> UsageTotals {
    UsageTotals {
        day,
        seconds_today: (usage.conversation_ms.max(0) as u64) / 1000,
        trial_seconds_used: (trial_ms.max(0) as u64) / 1000,
        tts_characters_month: tts_month.max(0) as u64,
        spend_today_micros: spend_micros,
    }
}

/// Writes one meter delta of session `session_id` and returns the user's new totals for its
/// day. Exactly once: the store applies each (session, `delta.seq`) once, so a delta sent
/// again after a write that timed out but committed is not counted twice (it answers the
/// current totals either way). One store transaction: the totals come back from the write
/// itself, and the day's spend over all users from [`SpendCache`].
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
    let written = store
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
    if !written.applied {
        tracing::info!(
            seq = delta.seq,
            "usage write was already applied (a replay after a lost answer)"
        );
    }
    let spend_micros = spend.get(store, delta.day).await?;
    let totals = usage_totals(
        delta.day,
        &written.day,
        written.tts_chars_month,
        written.trial_ms_used,
        spend_micros,
    );
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

/// Writes that ended sessions could not get acknowledged in time, kept and applied by the
/// server after their session is gone.
///
/// A session waits for its final usage write only so long (its deadline; shorter while the
/// server drains). Under an overloaded or briefly unavailable store that deadline passes with
/// writes unacknowledged; the session hands them here instead of dropping them. One task
/// applies them in order, each until the store acknowledges it (retrying with backoff). A
/// replay of a write that did commit adds nothing: the store applies a `(session, seq)` once.
/// Bounded: beyond [`UsageBacklog::CAPACITY`] writes, a new hand-off is refused, and its
/// seconds are logged at error level and counted in `duplex_usage_lost_seconds_total`, as are
/// writes still queued when the server exits ([`UsageBacklog::flush`]).
#[derive(Clone)]
pub(crate) struct UsageBacklog {
    inner: Arc<BacklogInner>,
}

struct BacklogInner {
    queue: Mutex<std::collections::VecDeque<Handed>>,
    wake: tokio::sync::Notify,
    metrics: crate::metrics::Metrics,
}

struct Handed {
    session_id: String,
    user_id: i64,
    delta: duplex_metering::UsageDelta,
}

impl UsageBacklog {
    /// Writes held at most: ~100 bytes each, so a few MiB at worst.
    pub const CAPACITY: usize = 65_536;

    /// Starts the task that applies handed-over writes; it lives as long as the runtime (it
    /// has nothing to do once the queue is empty).
    pub fn spawn(store: Store, spend: SpendCache, metrics: crate::metrics::Metrics) -> Self {
        let backlog = UsageBacklog {
            inner: Arc::new(BacklogInner {
                queue: Mutex::new(std::collections::VecDeque::new()),
                wake: tokio::sync::Notify::new(),
                metrics,
            }),
        };
        let inner = backlog.inner.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let next = inner
                    .queue
                    .lock()
                    .expect("backlog lock")
                    .front()
                    .map(|h| (h.session_id.clone(), h.user_id, h.delta.clone()));
                let Some((session_id, user_id, delta)) = next else {
                    inner.wake.notified().await;
                    continue;
                };
                let written = tokio::time::timeout(
                    crate::session::STORE_TIMEOUT,
                    persist(&store, &spend, &session_id, user_id, &delta),
                )
                .await;
                match written {
                    Ok(Ok(_)) => {
                        failures = 0;
                        let mut q = inner.queue.lock().expect("backlog lock");
                        q.pop_front();
                        inner.metrics.usage_backlog_writes.set(q.len() as i64);
                        tracing::info!(
                            session = %session_id,
                            seq = delta.seq,
                            seconds = delta.seconds,
                            "backlog: a session's usage write applied after the session ended"
                        );
                    }
                    Ok(Err(e)) => {
                        failures += 1;
                        tracing::warn!(error = %e, session = %session_id, seq = delta.seq, "backlog: usage write failed; retrying");
                    }
                    Err(_) => {
                        failures += 1;
                        tracing::warn!(session = %session_id, seq = delta.seq, "backlog: usage write timed out; retrying");
                    }
                }
                if failures > 0 {
                    let backoff = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
                    tokio::time::sleep(std::time::Duration::from_millis(backoff)).await;
                }
            }
        });
        backlog
    }

    /// Takes over the writes a session could not get acknowledged (in their order).
    pub fn hand_off(
        &self,
        session_id: &str,
        user_id: i64,
        deltas: Vec<duplex_metering::UsageDelta>,
    ) {
        let mut q = self.inner.queue.lock().expect("backlog lock");
        for delta in deltas {
            if q.len() >= Self::CAPACITY {
                tracing::error!(
                    session = %session_id,
                    user_id,
                    seq = delta.seq,
                    seconds = delta.seconds,
                    cost_micros = delta.cost_micros,
                    "USAGE LOST: the usage backlog is full (the store has not answered for a long time)"
                );
                self.inner
                    .metrics
                    .usage_lost_seconds_total
                    .inc_by(delta.seconds);
                continue;
            }
            q.push_back(Handed {
                session_id: session_id.to_owned(),
                user_id,
                delta,
            });
        }
        self.inner.metrics.usage_backlog_writes.set(q.len() as i64);
        drop(q);
        self.inner.wake.notify_one();
    }

    /// Writes waiting.
    pub fn len(&self) -> usize {
        self.inner.queue.lock().expect("backlog lock").len()
    }

    /// At exit: waits up to `within` for the queue to empty; what is still queued then is
    /// logged at error level and counted as lost. Returns the seconds lost.
    pub async fn flush(&self, within: std::time::Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        while self.len() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let q = self.inner.queue.lock().expect("backlog lock");
        let mut lost = 0;
        for h in q.iter() {
            lost += h.delta.seconds;
            tracing::error!(
                session = %h.session_id,
                user_id = h.user_id,
                seq = h.delta.seq,
                seconds = h.delta.seconds,
                cost_micros = h.delta.cost_micros,
                "USAGE LOST: the server exits with this usage write unacknowledged"
            );
        }
        self.inner.metrics.usage_lost_seconds_total.inc_by(lost);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(seq: u64, seconds: u64, retried: bool) -> duplex_metering::UsageDelta {
        duplex_metering::UsageDelta {
            seq,
            day: duplex_metering::UtcDate::from_ymd(2026, 12, 2).unwrap(),
            seconds,
            trial_seconds: 0,
            tts_characters: 0,
            llm_tokens: 0,
            stt_ms: 0,
            cost_micros: 0,
            last: true,
            retried,
        }
    }

    async fn seconds_on_the_day(store: &Store, user_id: i64) -> i64 {
        let day = time::Date::from_calendar_date(2026, time::Month::December, 2).unwrap();
        store
            .usage_for_day(user_id, day)
            .await
            .unwrap()
            .conversation_ms
            / 1000
    }

    #[tokio::test]
    async fn handed_over_writes_are_applied_once_each_after_the_session_is_gone() {
        let db = duplex_store::testing::TestDb::sqlite("backlog");
        let store = Store::open(&db.url).await.unwrap();
        let user = store.ensure_user("u1").await.unwrap();
        store
            .session_started("s1", user.id, time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        let metrics = crate::Metrics::new();
        let spend = SpendCache::new(std::time::Duration::from_secs(5), metrics.clone());
        // Write 1 committed but its answer was lost: the session hands it over as a replay,
        // with the never-sent rest as write 2.
        persist(&store, &spend, "s1", user.id, &delta(1, 5, false))
            .await
            .unwrap();
        let backlog = UsageBacklog::spawn(store.clone(), spend, metrics.clone());
        backlog.hand_off("s1", user.id, vec![delta(1, 5, true), delta(2, 7, false)]);
        assert_eq!(backlog.flush(std::time::Duration::from_secs(10)).await, 0);
        assert_eq!(seconds_on_the_day(&store, user.id).await, 12);
        assert_eq!(metrics.usage_backlog_writes.get(), 0);
        assert_eq!(metrics.usage_lost_seconds_total.get(), 0);
    }

    #[tokio::test]
    async fn a_store_that_stays_down_keeps_the_writes_queued_and_counts_them_lost_at_exit() {
        let db = duplex_store::testing::TestDb::sqlite("backlog_down");
        let store = Store::open(&db.url).await.unwrap();
        let user = store.ensure_user("u1").await.unwrap();
        let metrics = crate::Metrics::new();
        let spend = SpendCache::new(std::time::Duration::from_secs(5), metrics.clone());
        let backlog = UsageBacklog::spawn(store.clone(), spend, metrics.clone());
        store.close().await;
        backlog.hand_off("s1", user.id, vec![delta(1, 4, false), delta(2, 3, false)]);
        // Retried, never dropped while the server runs.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!(backlog.len(), 2);
        assert_eq!(metrics.usage_backlog_writes.get(), 2);
        assert_eq!(
            backlog.flush(std::time::Duration::from_millis(100)).await,
            7
        );
        assert_eq!(metrics.usage_lost_seconds_total.get(), 7);
    }
}
