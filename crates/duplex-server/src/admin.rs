//! `duplex admin`: an operator's questions answered from the configured store (`DATABASE_URL`,
//! or the SQLite file in `DUPLEX_DATA_DIR`), without SQL: who spent what today, one user's
//! plan, subscriptions and history, a plan set by hand for support (audited), sessions a
//! crashed server left open, and the usage ledger as CSV. Text for people, `--json` for
//! scripts. Every query is a typed method of `duplex_store::Store`.

use std::io::Write;

use duplex_store::{
    DailyUsage, StaleSession, Store, StoreError, Subscription, TopBy, UserDayUsage, day_key,
    micros_to_usd, parse_day_key,
};
use serde_json::{Value, json};
use time::{Date, Duration, OffsetDateTime};

use crate::config::StoreConfig;

/// Operator commands on the configured store.
#[derive(clap::Args, Debug)]
#[command(
    about = "Operator commands on the configured store (DATABASE_URL, else the SQLite file in DUPLEX_DATA_DIR)",
    after_help = "Days are UTC, written YYYY-MM-DD, `today` or `yesterday`. Users are named by their id in \
                  the auth token (`sub`), as the usage ledger knows them. Examples:\n  \
                  duplex admin top --by cost\n  \
                  duplex admin user user_2abc --days 7\n  \
                  duplex admin set-plan user_2abc pro --reason \"refund ticket 123\"\n  \
                  duplex admin close-stale-sessions --older-than-hours 6\n  \
                  duplex admin export-usage --from 2026-11-01 --to 2026-11-30 > usage.csv"
)]
pub struct AdminArgs {
    /// Print JSON instead of text (CSV export: a JSON array).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// The users who spent the most (cost) or talked the most (seconds) on a day.
    Top {
        /// The UTC day.
        #[arg(long, default_value = "today")]
        day: String,
        /// Rank by recorded provider cost or by conversation seconds.
        #[arg(long, value_enum, default_value = "cost")]
        by: By,
        /// How many users.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// One user: plan, Stripe customer and subscriptions, plan changes, open sessions, and
    /// usage with cost per day.
    User {
        /// The user's id from the auth token (`sub`).
        user: String,
        /// Days of usage history, ending today.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Set a user's plan by hand (support). Written to the audit log with the reason. A later
    /// Stripe subscription event sets the plan from the subscription again.
    SetPlan {
        /// The user's id from the auth token (`sub`).
        user: String,
        /// A plan of this configuration (free, pro, business, or one from PLAN_LIMITS).
        plan: String,
        /// Why (kept in the audit log, e.g. a ticket number).
        #[arg(long)]
        reason: String,
        /// Create the user if they never connected yet.
        #[arg(long)]
        create: bool,
    },
    /// Record an end for sessions that have none and started long ago: sessions of a server
    /// that crashed or was killed. Their usage is already in the ledger (heartbeats).
    CloseStaleSessions {
        /// Sessions open longer than this are stale (a live session idles out after
        /// IDLE_TIMEOUT_SECS; the longest plan allows 8 hours a day).
        #[arg(long, default_value_t = 12)]
        older_than_hours: u32,
        /// List them without closing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// The usage ledger (one row per user per day) as CSV on stdout.
    ExportUsage {
        /// First UTC day.
        #[arg(long, default_value = "today")]
        from: String,
        /// Last UTC day (included).
        #[arg(long, default_value = "today")]
        to: String,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum By {
    Cost,
    Seconds,
}

/// Why an admin command failed; the message is for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The store could not be opened or a query failed.
    #[error("store ({url}): {source}")]
    Store { url: String, source: StoreError },
    /// No user with this id in the store.
    #[error(
        "no user {0:?} in the store (users appear at their first session; `set-plan --create` creates one)"
    )]
    NoUser(String),
    /// The plan is not one of this configuration.
    #[error("unknown plan {plan:?}; this configuration has: {known}")]
    UnknownPlan { plan: String, known: String },
    /// A day argument is not a day.
    #[error("invalid day {0:?}: expected YYYY-MM-DD, `today` or `yesterday`")]
    BadDay(String),
    /// `--from` is after `--to`, or a count is zero.
    #[error("{0}")]
    BadArgument(String),
    /// Writing the output failed (e.g. a closed pipe).
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs one admin command against the configured store, writing to `out`. `now` is the wall
/// clock (an argument, so that tests can fix "today").
pub async fn run(
    store_config: &StoreConfig,
    plans: &duplex_metering::PlanTable,
    args: AdminArgs,
    now: OffsetDateTime,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let url = store_config.database_url_for_logs();
    let store_err = |source| AdminError::Store {
        url: url.clone(),
        source,
    };
    let store = Store::open(&store_config.database_url)
        .await
        .map_err(store_err)?;
    let result = match args.command {
        AdminCommand::Top { day, by, limit } => {
            let day = parse_day(&day, now)?;
            if limit == 0 {
                return Err(AdminError::BadArgument("--limit must be at least 1".into()));
            }
            let by = match by {
                By::Cost => TopBy::Cost,
                By::Seconds => TopBy::Seconds,
            };
            let rows = store.top_users(day, by, limit).await.map_err(store_err)?;
            top(out, day, &rows, args.json)
        }
        AdminCommand::User { user, days } => {
            if days == 0 {
                return Err(AdminError::BadArgument("--days must be at least 1".into()));
            }
            let report =
                user_report(&store, &user, days, now.date())
                    .await
                    .map_err(|e| match e {
                        Lookup::NoUser => AdminError::NoUser(user.clone()),
                        Lookup::Store(e) => store_err(e),
                    })?;
            report.print(out, args.json)
        }
        AdminCommand::SetPlan {
            user,
            plan,
            reason,
            create,
        } => {
            if plans.get(&plan).is_none() {
                let known: Vec<&str> = plans.names().collect();
                return Err(AdminError::UnknownPlan {
                    plan,
                    known: known.join(", "),
                });
            }
            if reason.trim().is_empty() {
                return Err(AdminError::BadArgument(
                    "--reason must say why (it goes to the audit log)".into(),
                ));
            }
            let found = if create {
                Some(store.ensure_user(&user).await.map_err(store_err)?)
            } else {
                store.user_by_external_id(&user).await.map_err(store_err)?
            };
            let found = found.ok_or_else(|| AdminError::NoUser(user.clone()))?;
            let source = format!("admin: {}", reason.trim());
            let change = store
                .set_plan(found.id, &plan, &source, now)
                .await
                .map_err(store_err)?;
            if args.json {
                let v = json!({
                    "user": user, "old_plan": found.plan, "plan": plan,
                    "changed": change.is_some(), "source": source,
                });
                writeln!(out, "{v}")?;
            } else if change.is_some() {
                writeln!(out, "{user}: plan {} -> {plan} ({source})", found.plan)?;
            } else {
                writeln!(out, "{user}: already on plan {plan}; nothing written")?;
            }
            Ok(())
        }
        AdminCommand::CloseStaleSessions {
            older_than_hours,
            dry_run,
        } => {
            if older_than_hours == 0 {
                return Err(AdminError::BadArgument(
                    "--older-than-hours must be at least 1".into(),
                ));
            }
            let before = now - Duration::hours(i64::from(older_than_hours));
            let stale = if dry_run {
                store.stale_sessions(before).await
            } else {
                store
                    .close_stale_sessions(before, now, "closed by duplex admin: stale")
                    .await
            }
            .map_err(store_err)?;
            closed(out, &stale, dry_run, older_than_hours, args.json)
        }
        AdminCommand::ExportUsage { from, to } => {
            let (from, to) = (parse_day(&from, now)?, parse_day(&to, now)?);
            if from > to {
                return Err(AdminError::BadArgument(format!(
                    "--from {} is after --to {}",
                    day_key(from),
                    day_key(to)
                )));
            }
            let rows = store.usage_between(from, to).await.map_err(store_err)?;
            export(out, &rows, args.json)
        }
    };
    store.close().await;
    result
}

/// `YYYY-MM-DD`, `today` or `yesterday` (UTC).
fn parse_day(s: &str, now: OffsetDateTime) -> Result<Date, AdminError> {
    let today = now.date();
    match s.trim() {
        "today" => Ok(today),
        "yesterday" => today
            .previous_day()
            .ok_or_else(|| AdminError::BadDay(s.to_owned())),
        other => parse_day_key(other).map_err(|_| AdminError::BadDay(s.to_owned())),
    }
}

fn seconds(u: &DailyUsage) -> f64 {
    u.conversation_ms as f64 / 1000.0
}

fn usage_json(u: &DailyUsage) -> Value {
    json!({
        "conversation_seconds": seconds(u),
        "stt_seconds": u.stt_ms as f64 / 1000.0,
        "llm_prompt_tokens": u.llm_prompt_tokens,
        "llm_completion_tokens": u.llm_completion_tokens,
        "tts_characters": u.tts_chars,
        "cost_usd": micros_to_usd(u.cost_micro_usd),
    })
}

/// RFC 3339 in UTC to the second (the store's instants are UTC).
fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        day_key(t.date()),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn top(
    out: &mut dyn Write,
    day: Date,
    rows: &[UserDayUsage],
    json_out: bool,
) -> Result<(), AdminError> {
    if json_out {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut u = usage_json(&r.usage);
                u["user"] = json!(r.external_id);
                u["plan"] = json!(r.plan);
                u["day"] = json!(day_key(r.day));
                u
            })
            .collect();
        writeln!(out, "{}", Value::Array(v))?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(out, "no usage recorded on {}", day_key(day))?;
        return Ok(());
    }
    writeln!(out, "usage on {} (UTC)", day_key(day))?;
    writeln!(
        out,
        "{:<32} {:<10} {:>10} {:>10} {:>12} {:>10}",
        "user", "plan", "seconds", "cost_usd", "llm_tokens", "tts_chars"
    )?;
    for r in rows {
        let u = &r.usage;
        writeln!(
            out,
            "{:<32} {:<10} {:>10.0} {:>10.4} {:>12} {:>10}",
            r.external_id,
            r.plan,
            seconds(u),
            micros_to_usd(u.cost_micro_usd),
            u.llm_prompt_tokens + u.llm_completion_tokens,
            u.tts_chars
        )?;
    }
    Ok(())
}

enum Lookup {
    NoUser,
    Store(StoreError),
}

impl From<StoreError> for Lookup {
    fn from(e: StoreError) -> Lookup {
        Lookup::Store(e)
    }
}

struct UserReport {
    user: duplex_store::User,
    subscriptions: Vec<Subscription>,
    plan_changes: Vec<duplex_store::AuditEntry>,
    open_sessions: Vec<StaleSession>,
    from: Date,
    to: Date,
    usage: Vec<UserDayUsage>,
}

async fn user_report(
    store: &Store,
    external_id: &str,
    days: u32,
    today: Date,
) -> Result<UserReport, Lookup> {
    let user = store
        .user_by_external_id(external_id)
        .await?
        .ok_or(Lookup::NoUser)?;
    let from = today - Duration::days(i64::from(days) - 1);
    Ok(UserReport {
        subscriptions: store.subscriptions_for_user(user.id).await?,
        plan_changes: store.plan_changes(user.id).await?,
        open_sessions: store.open_sessions(user.id).await?,
        usage: store.user_usage_between(user.id, from, today).await?,
        user,
        from,
        to: today,
    })
}

impl UserReport {
    fn print(&self, out: &mut dyn Write, json_out: bool) -> Result<(), AdminError> {
        let u = &self.user;
        let total = self.usage.iter().fold(DailyUsage::default(), |mut t, d| {
            t.conversation_ms += d.usage.conversation_ms;
            t.stt_ms += d.usage.stt_ms;
            t.llm_prompt_tokens += d.usage.llm_prompt_tokens;
            t.llm_completion_tokens += d.usage.llm_completion_tokens;
            t.tts_chars += d.usage.tts_chars;
            t.cost_micro_usd += d.usage.cost_micro_usd;
            t
        });
        if json_out {
            let v = json!({
                "user": u.external_id,
                "id": u.id,
                "plan": u.plan,
                "created_at": rfc3339(u.created_at),
                "stripe_customer_id": u.stripe_customer_id,
                "trial_seconds_used": u.trial_ms_used as f64 / 1000.0,
                "subscriptions": self.subscriptions.iter().map(|s| json!({
                    "id": s.stripe_subscription_id, "status": s.status, "price_id": s.price_id,
                    "plan": s.plan, "current_period_end": s.current_period_end,
                })).collect::<Vec<_>>(),
                "plan_changes": self.plan_changes.iter().map(|c| json!({
                    "at": rfc3339(c.changed_at), "from": c.old_plan, "to": c.new_plan,
                    "source": c.source,
                })).collect::<Vec<_>>(),
                "open_sessions": self.open_sessions.iter().map(|s| json!({
                    "id": s.session_id, "started_at": rfc3339(s.started_at),
                })).collect::<Vec<_>>(),
                "usage": self.usage.iter().map(|d| {
                    let mut v = usage_json(&d.usage);
                    v["day"] = json!(day_key(d.day));
                    v
                }).collect::<Vec<_>>(),
                "usage_total": usage_json(&total),
                "from": day_key(self.from),
                "to": day_key(self.to),
            });
            writeln!(out, "{v}")?;
            return Ok(());
        }
        writeln!(out, "user {} (id {})", u.external_id, u.id)?;
        writeln!(out, "  plan: {}", u.plan)?;
        writeln!(out, "  created: {}", rfc3339(u.created_at))?;
        writeln!(
            out,
            "  stripe customer: {}",
            u.stripe_customer_id.as_deref().unwrap_or("none")
        )?;
        writeln!(
            out,
            "  trial used: {:.0} s",
            u.trial_ms_used as f64 / 1000.0
        )?;
        writeln!(out, "subscriptions: {}", self.subscriptions.len())?;
        for s in &self.subscriptions {
            writeln!(
                out,
                "  {} {} price {} -> plan {}",
                s.stripe_subscription_id,
                s.status,
                s.price_id.as_deref().unwrap_or("-"),
                s.plan.as_deref().unwrap_or("-")
            )?;
        }
        writeln!(out, "plan changes: {}", self.plan_changes.len())?;
        for c in &self.plan_changes {
            writeln!(
                out,
                "  {} {} -> {} ({})",
                rfc3339(c.changed_at),
                c.old_plan,
                c.new_plan,
                c.source
            )?;
        }
        writeln!(out, "open sessions: {}", self.open_sessions.len())?;
        for s in &self.open_sessions {
            writeln!(out, "  {} since {}", s.session_id, rfc3339(s.started_at))?;
        }
        writeln!(
            out,
            "usage {} .. {} (UTC days with usage):",
            day_key(self.from),
            day_key(self.to)
        )?;
        writeln!(
            out,
            "  {:<10} {:>10} {:>10} {:>12} {:>10}",
            "day", "seconds", "cost_usd", "llm_tokens", "tts_chars"
        )?;
        for d in self
            .usage
            .iter()
            .map(|d| (day_key(d.day), &d.usage))
            .chain([("total".to_owned(), &total)])
        {
            let (day, u) = d;
            writeln!(
                out,
                "  {:<10} {:>10.0} {:>10.4} {:>12} {:>10}",
                day,
                seconds(u),
                micros_to_usd(u.cost_micro_usd),
                u.llm_prompt_tokens + u.llm_completion_tokens,
                u.tts_chars
            )?;
        }
        Ok(())
    }
}

fn closed(
    out: &mut dyn Write,
    stale: &[StaleSession],
    dry_run: bool,
    hours: u32,
    json_out: bool,
) -> Result<(), AdminError> {
    if json_out {
        let v = json!({
            "dry_run": dry_run,
            "sessions": stale.iter().map(|s| json!({
                "id": s.session_id, "user": s.external_id, "started_at": rfc3339(s.started_at),
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let verb = if dry_run { "would close" } else { "closed" };
    writeln!(
        out,
        "{verb} {} session(s) open for more than {hours} h",
        stale.len()
    )?;
    for s in stale {
        writeln!(
            out,
            "  {} user {} since {}",
            s.session_id,
            s.external_id,
            rfc3339(s.started_at)
        )?;
    }
    Ok(())
}

/// CSV header of the usage export; one row per user per day.
pub const CSV_HEADER: &str = "day,user,plan,conversation_seconds,stt_seconds,llm_prompt_tokens,llm_completion_tokens,tts_characters,cost_usd";

fn export(out: &mut dyn Write, rows: &[UserDayUsage], json_out: bool) -> Result<(), AdminError> {
    if json_out {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut u = usage_json(&r.usage);
                u["day"] = json!(day_key(r.day));
                u["user"] = json!(r.external_id);
                u["plan"] = json!(r.plan);
                u
            })
            .collect();
        writeln!(out, "{}", Value::Array(v))?;
        return Ok(());
    }
    writeln!(out, "{CSV_HEADER}")?;
    for r in rows {
        let u = &r.usage;
        writeln!(
            out,
            "{},{},{},{:.3},{:.3},{},{},{},{:.6}",
            day_key(r.day),
            csv_field(&r.external_id),
            csv_field(&r.plan),
            seconds(u),
            u.stt_ms as f64 / 1000.0,
            u.llm_prompt_tokens,
            u.llm_completion_tokens,
            u.tts_chars,
            micros_to_usd(u.cost_micro_usd)
        )?;
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_csv_fields() {
        let now = OffsetDateTime::from_unix_timestamp(1_764_633_600).unwrap(); // 2025-12-02
        assert_eq!(day_key(parse_day("today", now).unwrap()), "2025-12-02");
        assert_eq!(day_key(parse_day("yesterday", now).unwrap()), "2025-12-01");
        assert_eq!(day_key(parse_day("2024-02-29", now).unwrap()), "2024-02-29");
        assert!(matches!(
            parse_day("2023-02-29", now),
            Err(AdminError::BadDay(_))
        ));
        assert_eq!(csv_field("user_1"), "user_1");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }
}
