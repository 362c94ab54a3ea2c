//! Wall-clock values the shell passes in: [`UnixMs`] (a reading of the UTC clock) and
//! [`UtcDate`] (a UTC calendar day, the unit of daily limits). Plain arithmetic on the proleptic
//! Gregorian calendar (Howard Hinnant's `days_from_civil` / `civil_from_days`); no time zone
//! database is needed because every limit resets at UTC midnight.

use std::fmt;
use std::str::FromStr;

const MS_PER_DAY: u64 = 86_400_000;

/// Milliseconds since the Unix epoch, UTC: a wall-clock reading taken by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMs(pub u64);

impl UnixMs {
    /// The UTC day this instant falls on.
    pub fn date(self) -> UtcDate {
        UtcDate {
            days: (self.0 / MS_PER_DAY) as i64,
        }
    }

    /// RFC 3339 with second precision and `Z`, e.g. `2025-06-02T00:00:00Z`.
    pub fn rfc3339(self) -> String {
        let (y, m, d) = self.date().ymd();
        let secs = (self.0 % MS_PER_DAY) / 1000;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// A UTC calendar day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDate {
    /// Days since 1970-01-01.
    days: i64,
}

impl UtcDate {
    /// The day `y-m-d`, or `None` if there is no such day (or it is before 1970).
    pub fn from_ymd(y: i32, m: u32, d: u32) -> Option<UtcDate> {
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) || y < 1970 {
            return None;
        }
        let y = i64::from(if m <= 2 { y - 1 } else { y });
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = i64::from((m + 9) % 12);
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some(UtcDate {
            days: era * 146_097 + doe - 719_468,
        })
    }

    /// Days since 1970-01-01.
    pub fn days_since_epoch(self) -> i64 {
        self.days
    }

    /// `(year, month 1-12, day 1-31)`.
    pub fn ymd(self) -> (i32, u32, u32) {
        let z = self.days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
        (y, m, d)
    }

    /// `(year, month)`: the unit of monthly limits.
    pub fn month(self) -> (i32, u32) {
        let (y, m, _) = self.ymd();
        (y, m)
    }

    /// The following day.
    pub fn next(self) -> UtcDate {
        UtcDate {
            days: self.days + 1,
        }
    }

    /// Midnight (00:00:00 UTC) at the start of this day.
    pub fn start(self) -> UnixMs {
        UnixMs(self.days.max(0) as u64 * MS_PER_DAY)
    }

    /// The first day of the following month.
    pub fn first_of_next_month(self) -> UtcDate {
        let (y, m) = self.month();
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        UtcDate::from_ymd(y, m, 1).expect("the first of a month always exists")
    }
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

impl fmt::Display for UtcDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl FromStr for UtcDate {
    type Err = String;

    /// Parses `YYYY-MM-DD`.
    fn from_str(s: &str) -> Result<UtcDate, String> {
        let bad = || format!("{s:?} is not a YYYY-MM-DD date");
        let mut parts = s.splitn(3, '-');
        let mut next = || parts.next().ok_or_else(bad);
        let (y, m, d) = (next()?, next()?, next()?);
        let y = y.parse().map_err(|_| bad())?;
        let m = m.parse().map_err(|_| bad())?;
        let d = d.parse().map_err(|_| bad())?;
        UtcDate::from_ymd(y, m, d).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip_over_many_years() {
        let start = UtcDate::from_ymd(1970, 1, 1).unwrap();
        assert_eq!(start.days_since_epoch(), 0);
        let mut d = start;
        for _ in 0..(366 * 140) {
            let (y, m, day) = d.ymd();
            assert_eq!(UtcDate::from_ymd(y, m, day), Some(d), "{y}-{m}-{day}");
            assert_eq!(d.to_string().parse::<UtcDate>(), Ok(d));
            d = d.next();
        }
    }

    #[test]
    fn known_dates_and_rfc3339() {
        // 2024-02-29T23:59:59Z = 1709251199 s.
        let t = UnixMs(1_709_251_199_000);
        assert_eq!(t.date().to_string(), "2024-02-29");
        assert_eq!(t.rfc3339(), "2024-02-29T23:59:59Z");
        assert_eq!(t.date().next().start().rfc3339(), "2024-03-01T00:00:00Z");
        assert_eq!(t.date().first_of_next_month().to_string(), "2024-03-01");
        let dec = UtcDate::from_ymd(2025, 12, 31).unwrap();
        assert_eq!(dec.first_of_next_month().to_string(), "2026-01-01");
        assert_eq!(UtcDate::from_ymd(2025, 2, 29), None);
        assert!("2025-13-01".parse::<UtcDate>().is_err());
    }
}
