//! Plans and their limits, from configuration.
//!
//! `PLAN_LIMITS` grammar: plans separated by `;`, each `name:key=value,key=value`. Keys are
//! `daily_seconds`, `trial_seconds`, `monthly_tts_characters` and `turns_per_minute`; a value
//! is a whole number or `unlimited`. Entries override [`DEFAULT_PLAN_LIMITS`] key by key
//! (a key not named keeps its default; a plan not in the defaults starts unlimited), so
//! `PLAN_LIMITS=pro:daily_seconds=3600` changes one number and nothing else. The free plan's
//! conversation time comes from `FREE_DAILY_LIMIT_SECONDS` and `FREE_TRIAL_SECONDS` only (naming
//! those keys for `free` in `PLAN_LIMITS` is an error, so there is one place to look).
//!
//! Two plan names are built in: [`FREE`] (every user without a paid subscription) and
//! [`UNMETERED`] (no limits at all; the default plan of anonymous dev mode). The order of plans
//! (defaults first, then new plans in the order given) is the upgrade ladder: a plan's
//! upgrade hint names the next plan.

use duplex_proto as proto;

use crate::Error;

/// The plan of users without a subscription.
pub const FREE: &str = "free";
/// The built-in plan without limits.
pub const UNMETERED: &str = "unmetered";

/// Default `PLAN_LIMITS`: seeds from the issue (free: 5,000 TTS characters a month and 5 turns a
/// minute; pro: 50,000 characters) and a larger `business` tier. Daily time for pro is 2 hours,
/// business 8 hours (a working day of conversation).
pub const DEFAULT_PLAN_LIMITS: &str = "free:monthly_tts_characters=5000,turns_per_minute=5;\
     pro:daily_seconds=7200,monthly_tts_characters=50000,turns_per_minute=30;\
     business:daily_seconds=28800,monthly_tts_characters=500000,turns_per_minute=120";

/// Default `FREE_DAILY_LIMIT_SECONDS`: ten minutes a day lets a user try the product properly
/// while bounding what one free account can cost.
pub const DEFAULT_FREE_DAILY_SECONDS: u64 = 600;

/// One plan and its limits; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    /// Seconds of conversation per UTC day.
    pub daily_seconds: Option<u64>,
    /// One-time allowance on top of the daily seconds (see the crate docs).
    pub trial_seconds: Option<u64>,
    /// TTS characters per UTC calendar month.
    pub monthly_tts_characters: Option<u64>,
    /// Assistant turns (TTS requests) per rolling minute.
    pub turns_per_minute: Option<u32>,
    /// Sent with `limit_exceeded` for plan limits, e.g. "Upgrade to pro: 7200 s a day, ...".
    pub upgrade_hint: Option<String>,
}

impl Plan {
    /// A plan without limits.
    pub fn unlimited(name: &str) -> Plan {
        Plan {
            name: name.to_owned(),
            daily_seconds: None,
            trial_seconds: None,
            monthly_tts_characters: None,
            turns_per_minute: None,
            upgrade_hint: None,
        }
    }

    /// The plan as announced in `session.ready`.
    pub fn info(&self) -> proto::PlanInfo {
        proto::PlanInfo {
            name: self.name.clone(),
            limits: proto::PlanLimits {
                daily_seconds: self.daily_seconds,
                trial_seconds: self.trial_seconds,
                monthly_tts_characters: self.monthly_tts_characters,
                turns_per_minute: self.turns_per_minute,
            },
        }
    }

    fn summary(&self) -> String {
        let mut parts = Vec::new();
        let fmt = |v: Option<u64>, unit: &str| match v {
            Some(v) => format!("{v} {unit}"),
            None => format!("unlimited {unit}"),
        };
        parts.push(fmt(self.daily_seconds, "seconds a day"));
        parts.push(fmt(self.monthly_tts_characters, "TTS characters a month"));
        parts.push(fmt(self.turns_per_minute.map(u64::from), "turns a minute"));
        parts.join(", ")
    }
}

/// Every configured plan, in upgrade order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTable {
    plans: Vec<Plan>,
}

impl PlanTable {
    /// Builds the table from `PLAN_LIMITS` (empty = defaults only), `FREE_DAILY_LIMIT_SECONDS`
    /// (`None` = unlimited) and `FREE_TRIAL_SECONDS` (`None` or 0 = no trial).
    pub fn parse(
        plan_limits: &str,
        free_daily_seconds: Option<u64>,
        free_trial_seconds: Option<u64>,
    ) -> Result<PlanTable, Error> {
        let mut plans: Vec<Plan> = Vec::new();
        apply(&mut plans, DEFAULT_PLAN_LIMITS, false).expect("the defaults parse");
        let mut table = PlanTable { plans };
        table.amend(plan_limits)?;
        table.set_free_daily_seconds(free_daily_seconds);
        table.set_free_trial_seconds(free_trial_seconds.unwrap_or(0));
        Ok(table)
    }

    /// Applies `PLAN_LIMITS` on top of the current limits, key by key (see the module docs).
    /// On an error the table is unchanged.
    pub fn amend(&mut self, plan_limits: &str) -> Result<(), Error> {
        let mut plans = self.plans.clone();
        apply(&mut plans, plan_limits, true)?;
        self.plans = plans;
        self.finish();
        Ok(())
    }

    /// The free plan's seconds a day (`FREE_DAILY_LIMIT_SECONDS`); `None` = unlimited.
    pub fn set_free_daily_seconds(&mut self, seconds: Option<u64>) {
        self.free_mut().daily_seconds = seconds;
        self.finish();
    }

    /// The free plan's one-time trial (`FREE_TRIAL_SECONDS`); 0 = no trial.
    pub fn set_free_trial_seconds(&mut self, seconds: u64) {
        self.free_mut().trial_seconds = (seconds > 0).then_some(seconds);
        self.finish();
    }

    fn free_mut(&mut self) -> &mut Plan {
        self.plans
            .iter_mut()
            .find(|p| p.name == FREE)
            .expect("the defaults define free")
    }

    /// Recomputes the upgrade hints and puts the built-in unmetered plan last.
    fn finish(&mut self) {
        self.plans.retain(|p| p.name != UNMETERED);
        let hints: Vec<Option<String>> = (0..self.plans.len())
            .map(|i| {
                self.plans
                    .get(i + 1)
                    .map(|next| format!("Upgrade to {}: {}.", next.name, next.summary()))
            })
            .collect();
        for (p, h) in self.plans.iter_mut().zip(hints) {
            p.upgrade_hint = h;
        }
        self.plans.push(Plan::unlimited(UNMETERED));
    }

    /// The plan called `name`, if configured.
    pub fn get(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }

    /// The plan called `name`, or [`FREE`] when no such plan is configured (a plan removed from
    /// the configuration while users still hold it must not become unlimited).
    pub fn plan_or_free(&self, name: &str) -> &Plan {
        self.get(name)
            .or_else(|| self.get(FREE))
            .expect("the table always has free")
    }

    /// Plan names in upgrade order (`unmetered` last).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plans.iter().map(|p| p.name.as_str())
    }

    /// The `session.ready` plan info for a plan name (unknown names: see [`Self::plan_or_free`]).
    pub fn info(&self, name: &str) -> proto::PlanInfo {
        self.plan_or_free(name).info()
    }
}

impl Default for PlanTable {
    fn default() -> Self {
        PlanTable::parse("", Some(DEFAULT_FREE_DAILY_SECONDS), None).expect("the defaults parse")
    }
}

fn apply(plans: &mut Vec<Plan>, spec: &str, user: bool) -> Result<(), Error> {
    let err = |msg: String| Error::PlanLimits(msg);
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, keys) = entry
            .split_once(':')
            .ok_or_else(|| err(format!("{entry:?}: expected `plan:key=value,...`")))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(err(format!(
                "plan name {name:?}: use lowercase letters, digits, `_` and `-`"
            )));
        }
        if name == UNMETERED {
            return Err(err(format!("{UNMETERED:?} is built in and has no limits")));
        }
        let i = match plans.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                plans.push(Plan::unlimited(name));
                plans.len() - 1
            }
        };
        let plan = &mut plans[i];
        for kv in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err(format!("{name}: {kv:?} is not key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            let value = if v == "unlimited" {
                None
            } else {
                Some(v.parse::<u64>().map_err(|_| {
                    err(format!(
                        "{name}.{k}={v:?}: expected a whole number or `unlimited`"
                    ))
                })?)
            };
            if user && name == FREE && (k == "daily_seconds" || k == "trial_seconds") {
                return Err(err(format!(
                    "free.{k}: set FREE_DAILY_LIMIT_SECONDS / FREE_TRIAL_SECONDS instead"
                )));
            }
            match k {
                "daily_seconds" => plan.daily_seconds = value,
                "trial_seconds" => plan.trial_seconds = value.filter(|&t| t > 0),
                "monthly_tts_characters" => plan.monthly_tts_characters = value,
                "turns_per_minute" => {
                    plan.turns_per_minute = value
                        .map(|v| {
                            u32::try_from(v)
                                .map_err(|_| err(format!("{name}.turns_per_minute: too large")))
                        })
                        .transpose()?
                }
                _ => {
                    return Err(err(format!(
                        "{name}: unknown key {k:?} (daily_seconds, trial_seconds, \
                         monthly_tts_characters, turns_per_minute)"
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn defaults() {
        let t = PlanTable::default();
        expect![[r#"
            [
                Plan {
                    name: "free",
                    daily_seconds: Some(
                        600,
                    ),
                    trial_seconds: None,
                    monthly_tts_characters: Some(
                        5000,
                    ),
                    turns_per_minute: Some(
                        5,
                    ),
                    upgrade_hint: Some(
                        "Upgrade to pro: 7200 seconds a day, 50000 TTS characters a month, 30 turns a minute.",
                    ),
                },
                Plan {
                    name: "pro",
                    daily_seconds: Some(
                        7200,
                    ),
                    trial_seconds: None,
                    monthly_tts_characters: Some(
                        50000,
                    ),
                    turns_per_minute: Some(
                        30,
                    ),
                    upgrade_hint: Some(
                        "Upgrade to business: 28800 seconds a day, 500000 TTS characters a month, 120 turns a minute.",
                    ),
                },
                Plan {
                    name: "business",
                    daily_seconds: Some(
                        28800,
                    ),
                    trial_seconds: None,
                    monthly_tts_characters: Some(
                        500000,
                    ),
                    turns_per_minute: Some(
                        120,
                    ),
                    upgrade_hint: None,
                },
                Plan {
                    name: "unmetered",
                    daily_seconds: None,
                    trial_seconds: None,
                    monthly_tts_characters: None,
                    turns_per_minute: None,
                    upgrade_hint: None,
                },
            ]
        "#]]
        .assert_debug_eq(&t.plans);
    }

    #[test]
    fn overrides_are_per_key_and_new_plans_start_unlimited() {
        let t = PlanTable::parse(
            " pro:daily_seconds=3600 ; team:daily_seconds=unlimited,turns_per_minute=60;free:turns_per_minute=unlimited",
            None,
            Some(1800),
        )
        .unwrap();
        let pro = t.get("pro").unwrap();
        assert_eq!(pro.daily_seconds, Some(3600));
        assert_eq!(pro.monthly_tts_characters, Some(50_000), "kept its default");
        let team = t.get("team").unwrap();
        assert_eq!(
            (team.daily_seconds, team.turns_per_minute),
            (None, Some(60))
        );
        assert_eq!(team.monthly_tts_characters, None);
        let free = t.get("free").unwrap();
        assert_eq!(free.daily_seconds, None);
        assert_eq!(free.trial_seconds, Some(1800));
        assert_eq!(free.turns_per_minute, None);
        assert_eq!(
            t.names().collect::<Vec<_>>(),
            ["free", "pro", "business", "team", "unmetered"]
        );
        assert_eq!(t.plan_or_free("gold").name, "free");
        assert_eq!(t.info("pro").limits.daily_seconds, Some(3600));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = |s| {
            PlanTable::parse(s, Some(600), None)
                .unwrap_err()
                .to_string()
        };
        expect![[r#"invalid PLAN_LIMITS: "pro": expected `plan:key=value,...`"#]]
            .assert_eq(&e("pro"));
        expect![[r#"invalid PLAN_LIMITS: pro: unknown key "daily" (daily_seconds, trial_seconds, monthly_tts_characters, turns_per_minute)"#]]
            .assert_eq(&e("pro:daily=5"));
        expect![[r#"invalid PLAN_LIMITS: pro.daily_seconds="lots": expected a whole number or `unlimited`"#]]
            .assert_eq(&e("pro:daily_seconds=lots"));
        expect!["invalid PLAN_LIMITS: free.daily_seconds: set FREE_DAILY_LIMIT_SECONDS / FREE_TRIAL_SECONDS instead"]
            .assert_eq(&e("free:daily_seconds=5"));
        expect![[r#"invalid PLAN_LIMITS: "unmetered" is built in and has no limits"#]]
            .assert_eq(&e("unmetered:daily_seconds=5"));
        expect![[
            r#"invalid PLAN_LIMITS: plan name "Pro": use lowercase letters, digits, `_` and `-`"#
        ]]
        .assert_eq(&e("Pro:daily_seconds=5"));
    }

    /// The server sets each variable on its own, in any order: the same table as `parse`.
    #[test]
    fn amending_in_any_order_equals_parsing() {
        let spec = "pro:daily_seconds=3600;team:turns_per_minute=60";
        let parsed = PlanTable::parse(spec, None, Some(120)).unwrap();
        let mut a = PlanTable::default();
        a.amend(spec).unwrap();
        a.set_free_daily_seconds(None);
        a.set_free_trial_seconds(120);
        let mut b = PlanTable::default();
        b.set_free_trial_seconds(120);
        b.set_free_daily_seconds(None);
        b.amend(spec).unwrap();
        assert_eq!(a, parsed);
        assert_eq!(b, parsed);
        assert_eq!(parsed.names().last(), Some(UNMETERED));
        let before = a.clone();
        assert!(a.amend("free:daily_seconds=5").is_err());
        assert_eq!(a, before, "a failed amend changes nothing");
    }
}
