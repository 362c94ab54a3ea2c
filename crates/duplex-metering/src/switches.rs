//! Kill switches: operator controls that act on every session at once.
//!
//! They are read from the environment at startup ([`Switches::from_lookup`]) and may be
//! overridden at run time by a `KEY=VALUE` file ([`Switches::with_file`]); the server re-reads
//! that file every few seconds and feeds changes to every session as
//! [`crate::MeterInput::Switches`], so flipping a switch needs no restart.

use crate::Error;

/// The names of the switch variables (also the keys of the switches file).
pub const SWITCH_VARS: [&str; 3] = [
    "AI_GENERATION_ENABLED",
    "FREE_TIER_ENABLED",
    "MAX_DAILY_SPEND_USD",
];

/// The current kill-switch settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switches {
    /// `false`: every new assistant turn is denied (`generation_disabled`) and new sessions are
    /// refused.
    pub ai_generation_enabled: bool,
    /// `false`: users on the free plan are refused at session start and their turns denied.
    pub free_tier_enabled: bool,
    /// Generation stops for everyone once the day's recorded provider cost reaches this many
    /// micro-dollars (USD 1e-6). `None` = no cap.
    pub max_daily_spend_micros: Option<u64>,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            ai_generation_enabled: true,
            free_tier_enabled: true,
            max_daily_spend_micros: None,
        }
    }
}

impl Switches {
    /// Reads the switches from a variable lookup (the environment); unset or empty = default.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Switches, Error> {
        let mut s = Switches::default();
        for name in SWITCH_VARS {
            if let Some(v) = lookup(name).filter(|v| !v.trim().is_empty()) {
                s.set(name, &v)?;
            }
        }
        Ok(s)
    }

    /// `self` overridden by a switches file: `KEY=VALUE` lines, `#` comments and blank lines
    /// ignored, keys from [`SWITCH_VARS`]. An empty value resets a switch to its default. An
    /// unknown key or bad value is an error (the caller keeps the previous switches).
    pub fn with_file(&self, text: &str) -> Result<Switches, Error> {
        let mut s = self.clone();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| Error::Switch {
                name: format!("line {}", n + 1),
                value: line.to_owned(),
                reason: "expected KEY=VALUE".into(),
            })?;
            let (k, v) = (k.trim(), v.trim().trim_matches('"'));
            let Some(name) = SWITCH_VARS.iter().find(|n| **n == k) else {
                return Err(Error::Switch {
                    name: k.to_owned(),
                    value: v.to_owned(),
                    reason: format!("unknown switch; known: {}", SWITCH_VARS.join(", ")),
                });
            };
            if v.is_empty() {
                s.reset(name);
            } else {
                s.set(name, v)?;
            }
        }
        Ok(s)
    }

    fn reset(&mut self, name: &str) {
        let d = Switches::default();
        match name {
            "AI_GENERATION_ENABLED" => self.ai_generation_enabled = d.ai_generation_enabled,
            "FREE_TIER_ENABLED" => self.free_tier_enabled = d.free_tier_enabled,
            _ => self.max_daily_spend_micros = d.max_daily_spend_micros,
        }
    }

    /// Sets the switch `name` (one of [`SWITCH_VARS`]) from its text.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        let bad = |reason: &str| Error::Switch {
            name: name.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let v = value.trim();
        match name {
            "AI_GENERATION_ENABLED" => {
                self.ai_generation_enabled =
                    parse_bool(v).ok_or_else(|| bad("expected true or false"))?
            }
            "FREE_TIER_ENABLED" => {
                self.free_tier_enabled =
                    parse_bool(v).ok_or_else(|| bad("expected true or false"))?
            }
            "MAX_DAILY_SPEND_USD" => {
                self.max_daily_spend_micros = parse_usd_micros(v)
                    .ok_or_else(|| bad("expected an amount in USD such as 25 or 12.50"))?
            }
            _ => return Err(bad("not a switch")),
        }
        Ok(())
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `"12.50"` → `Some(Some(12_500_000))`; `"unlimited"` → `Some(None)`.
fn parse_usd_micros(v: &str) -> Option<Option<u64>> {
    if v.eq_ignore_ascii_case("unlimited") {
        return Some(None);
    }
    let usd: f64 = v.parse().ok()?;
    if !usd.is_finite() || !(0.0..=1e12).contains(&usd) {
        return None;
    }
    Some(Some((usd * 1e6).round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_then_file_overrides() {
        let env: HashMap<&str, &str> = [
            ("AI_GENERATION_ENABLED", "false"),
            ("MAX_DAILY_SPEND_USD", "12.5"),
        ]
        .into();
        let s = Switches::from_lookup(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(
            s,
            Switches {
                ai_generation_enabled: false,
                free_tier_enabled: true,
                max_daily_spend_micros: Some(12_500_000),
            }
        );
        let f = s
            .with_file("# ops\n\nAI_GENERATION_ENABLED = true\nFREE_TIER_ENABLED=off\nMAX_DAILY_SPEND_USD=\n")
            .unwrap();
        assert_eq!(
            f,
            Switches {
                ai_generation_enabled: true,
                free_tier_enabled: false,
                max_daily_spend_micros: None,
            }
        );
    }

    #[test]
    fn bad_values_name_the_switch() {
        let e = Switches::default()
            .with_file("AI_GENERATION_ENABLED=maybe")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid AI_GENERATION_ENABLED="maybe": expected true or false"#
        );
        let e = Switches::default().with_file("KILL=1").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid KILL=\"1\": unknown switch"),
            "{e}"
        );
        let e = Switches::from_lookup(|k| (k == "MAX_DAILY_SPEND_USD").then(|| "-3".into()))
            .unwrap_err();
        assert!(e.to_string().contains("MAX_DAILY_SPEND_USD"), "{e}");
        assert!(Switches::default().with_file("no equals sign").is_err());
    }
}
