//! Time-of-day sizing: `[[fleet.policy]]` blocks, each active during its
//! cron `periods` in its `timezone`, and the choice of the block in force
//! at a given moment. Pure: the caller passes the wall clock.
//!
//! Like gitlab-runner's `[[runners.autoscaler.policy]]`, the LAST block
//! whose periods match wins, so blocks go from the most general to the most
//! specific; when none matches, the caller's default (the plain `[fleet]`
//! knobs) applies. A block with no periods matches always (gitlab-runner's
//! default period is `* * * * *`).
//!
//! Time zones: `UTC` and fixed offsets (`+02:00`, `-0530`) only. Named zones
//! (`Europe/Berlin`) are refused with a message saying so, because they need
//! a time-zone database and daylight-saving rules this module does not carry.
//!
//! Not responsible for reading the configuration (the caller maps its keys
//! onto [`PolicyBlock`]) or for sizing (see [`super::policy`]).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A schedule or time-zone text that does not parse. The message names the
/// field and how to write it; the caller prefixes the configuration key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("period {text:?}: {problem}")]
    Cron { text: String, problem: String },
    #[error(
        "timezone {0:?} is not supported; write \"UTC\" or a fixed offset like \"+02:00\" \
         (named zones and daylight saving are not supported yet)"
    )]
    TimeZone(String),
    #[error("scale_factor {0} must be a finite number of at least 0, like 0.5 or 1.0")]
    ScaleFactor(f64),
}

/// The five cron fields, in order, with their ranges and names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

const FIELDS: [Field; 5] = [
    Field::Minute,
    Field::Hour,
    Field::DayOfMonth,
    Field::Month,
    Field::DayOfWeek,
];

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    /// Inclusive bounds. Day-of-week accepts 7 as Sunday, as cron does.
    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Field::Minute => "write 0-59",
            Field::Hour => "write 0-23",
            Field::DayOfMonth => "write 1-31",
            Field::Month => "write 1-12 or jan-dec",
            Field::DayOfWeek => "write 0-7 (0 and 7 are Sunday) or sun-sat",
        }
    }

    fn value(self, text: &str) -> Option<u32> {
        if let Ok(n) = text.parse::<u32>() {
            return Some(n);
        }
        let lower = text.to_ascii_lowercase();
        let names: &[&str] = match self {
            Field::Month => &MONTH_NAMES,
            Field::DayOfWeek => &DAY_NAMES,
            _ => return None,
        };
        let offset = u32::from(self == Field::Month);
        names
            .iter()
            .position(|n| *n == lower)
            .and_then(|i| u32::try_from(i).ok())
            .map(|i| i + offset)
    }
}

/// A five-field cron expression: minute, hour, day-of-month, month,
/// day-of-week. Each field takes `*`, numbers, names (`jan`, `mon`), ranges
/// (`mon-fri`), steps (`*/15`, `8-18/2`) and comma lists of those.
///
/// As in cron, when both day-of-month and day-of-week are restricted (not
/// `*`), a day matches if either does.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    /// One bit per allowed value, per field, in [`FIELDS`] order.
    bits: [u64; 5],
    day_of_month_any: bool,
    day_of_week_any: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.text)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Cron {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |problem: String| ScheduleError::Cron {
            text: text.to_owned(),
            problem,
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        if parts.len() != FIELDS.len() {
            return Err(fail(format!(
                "has {} fields; write five: minute hour day-of-month month day-of-week, \
                 like \"* 8-18 * * mon-fri\"",
                parts.len()
            )));
        }
        let mut bits = [0_u64; 5];
        for ((slot, field), part) in bits.iter_mut().zip(FIELDS).zip(&parts) {
            *slot = parse_field(field, part).map_err(fail)?;
        }
        // Sunday is both 0 and 7; keep it as 0.
        if bits[4] & (1 << 7) != 0 {
            bits[4] = (bits[4] | 1) & !(1 << 7);
        }
        Ok(Cron {
            text: text.to_owned(),
            bits,
            day_of_month_any: parts[2] == "*",
            day_of_week_any: parts[4] == "*",
        })
    }
}

fn parse_field(field: Field, text: &str) -> Result<u64, String> {
    let (low, high) = field.bounds();
    let mut bits = 0_u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => match step.parse::<u32>() {
                Ok(s) if s > 0 => (range, s),
                _ => {
                    return Err(format!(
                        "{} step {step:?} is not a positive number; write it like \"*/15\"",
                        field.name()
                    ))
                }
            },
            None => (item, 1),
        };
        let value = |t: &str| {
            field
                .value(t)
                .filter(|v| (low..=high).contains(v))
                .ok_or_else(|| {
                    format!(
                        "{} value {t:?} is out of range; {}",
                        field.name(),
                        field.hint()
                    )
                })
        };
        let (from, to) = if range == "*" {
            (low, high)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!(
                    "{} range {range:?} runs backwards; write it low-high, or split it \
                     into two ranges like \"fri-sat,sun-mon\"",
                    field.name()
                ));
            }
            (a, b)
        } else {
            let a = value(range)?;
            // "5/15" means from 5 to the end in steps of 15, as in cron.
            (a, if step > 1 { high } else { a })
        };
        let mut v = from;
        while v <= to {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl Cron {
    /// Whether the minute `at` falls in this period.
    pub fn matches(&self, at: &LocalTime) -> bool {
        let has = |i: usize, v: u32| self.bits[i] & (1_u64 << v) != 0;
        let day_of_month = has(2, at.day);
        let day_of_week = has(4, at.weekday);
        let day = if self.day_of_month_any || self.day_of_week_any {
            day_of_month && day_of_week
        } else {
            day_of_month || day_of_week
        };
        has(0, at.minute) && has(1, at.hour) && has(3, at.month) && day
    }
}

/// A time zone: UTC or a fixed offset from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeZone {
    /// Seconds east of UTC.
    offset_seconds: i32,
}

/// Largest offset in use anywhere (UTC+14, Kiribati), with room for -12.
const MAX_OFFSET_SECONDS: i32 = 14 * 3600;

impl TimeZone {
    pub const UTC: TimeZone = TimeZone { offset_seconds: 0 };

    /// A zone `offset_seconds` east of UTC.
    pub fn fixed(offset_seconds: i32) -> Option<TimeZone> {
        (offset_seconds.abs() <= MAX_OFFSET_SECONDS).then_some(TimeZone { offset_seconds })
    }

    /// The civil minute at `now` in this zone.
    pub fn local(&self, now: SystemTime) -> LocalTime {
        let since_epoch = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        LocalTime::from_unix(since_epoch.saturating_add(i64::from(self.offset_seconds)))
    }
}

impl FromStr for TimeZone {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = || ScheduleError::TimeZone(text.to_owned());
        let t = text.trim();
        if t.is_empty() || matches!(t, "UTC" | "Etc/UTC" | "Z" | "utc") {
            return Ok(TimeZone::UTC);
        }
        let t = t.strip_prefix("UTC").unwrap_or(t);
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(fail()),
        };
        let digits: String = rest.chars().filter(|c| *c != ':').collect();
        let all_digits = digits.chars().all(|c| c.is_ascii_digit());
        let (h, m) = match digits.len() {
            2 if all_digits => (&digits[..2], "0"),
            4 if all_digits => (&digits[..2], &digits[2..]),
            _ => return Err(fail()),
        };
        let (h, m): (i32, i32) = (
            h.parse().map_err(|_| fail())?,
            m.parse().map_err(|_| fail())?,
        );
        if m >= 60 {
            return Err(fail());
        }
        TimeZone::fixed(sign * (h * 3600 + m * 60)).ok_or_else(fail)
    }
}

/// A civil minute: what a cron field is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i64,
    /// 1-12.
    pub month: u32,
    /// 1-31.
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    /// 0 = Sunday … 6 = Saturday.
    pub weekday: u32,
}

const SECONDS_PER_DAY: i64 = 86_400;
/// 1970-01-01 was a Thursday.
const EPOCH_WEEKDAY: i64 = 4;

impl LocalTime {
    /// The civil time `seconds` after 1970-01-01T00:00 (proleptic Gregorian).
    fn from_unix(seconds: i64) -> LocalTime {
        let days = seconds.div_euclid(SECONDS_PER_DAY);
        let of_day = seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        // The casts below take values already reduced to small ranges.
        let small = |v: i64| u32::try_from(v).unwrap_or(0);
        LocalTime {
            year,
            month,
            day,
            hour: small(of_day / 3600),
            minute: small(of_day % 3600 / 60),
            weekday: small((days + EPOCH_WEEKDAY).rem_euclid(7)),
        }
    }
}

/// Year, month and day of the day `days` after 1970-01-01.
///
/// Counts in 400-year eras of 146 097 days starting on 1 March, so that the
/// leap day is the last day of its year and month lengths follow a fixed
/// pattern from March on.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    const DAYS_PER_ERA: i64 = 146_097;
    // 1970-01-01 is day 719 468 counted from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z.rem_euclid(DAYS_PER_ERA);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 153 days per five months.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let small = |v: i64| u32::try_from(v).unwrap_or(1);
    (year, small(month), small(day))
}

/// Idle-capacity knobs in force during some periods.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyBlock {
    /// When this block applies; empty means always.
    pub periods: Vec<Cron>,
    pub timezone: TimeZone,
    pub idle_count: u32,
    pub idle_time: Duration,
    pub scale_factor: f64,
    pub scale_factor_limit: u32,
}

impl PolicyBlock {
    /// Checks what the types cannot.
    ///
    /// # Errors
    /// [`ScheduleError::ScaleFactor`] for a negative or non-finite factor.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if !self.scale_factor.is_finite() || self.scale_factor < 0.0 {
            return Err(ScheduleError::ScaleFactor(self.scale_factor));
        }
        Ok(())
    }

    /// Whether this block applies at `now`.
    pub fn matches(&self, now: SystemTime) -> bool {
        if self.periods.is_empty() {
            return true;
        }
        let local = self.timezone.local(now);
        self.periods.iter().any(|p| p.matches(&local))
    }
}

/// The idle-capacity knobs in force now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActivePolicy {
    /// Idle job slots to keep beyond demand, at least.
    pub idle_count: u32,
    /// How long an instance must sit idle before it may be removed.
    pub idle_time: Duration,
    /// Idle slots as a factor of slots in use.
    pub scale_factor: f64,
    /// Most idle slots `scale_factor` may ask for; 0 means no limit.
    pub scale_factor_limit: u32,
    /// Index of the block in force, `None` for the default; for logs.
    pub block: Option<usize>,
}

/// The knobs in force at `now_utc`: those of the last block whose periods
/// match, else `default` (with `block` cleared).
pub fn active_policy(
    blocks: &[PolicyBlock],
    default: &ActivePolicy,
    now_utc: SystemTime,
) -> ActivePolicy {
    match blocks.iter().rposition(|b| b.matches(now_utc)) {
        Some(i) => {
            let b = &blocks[i];
            ActivePolicy {
                idle_count: b.idle_count,
                idle_time: b.idle_time,
                scale_factor: b.scale_factor,
                scale_factor_limit: b.scale_factor_limit,
                block: Some(i),
            }
        }
        None => ActivePolicy {
            block: None,
            ..default.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since the epoch of a UTC civil time, built independently of
    /// `civil_from_days` by counting days.
    fn utc(year: i64, month: u32, day: u32, hour: u32, minute: u32) -> SystemTime {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut days: i64 = (1970..year).map(|y| if leap(y) { 366 } else { 365 }).sum();
        let lengths = [
            31,
            if leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        days += lengths[..(month as usize - 1)].iter().sum::<i64>() + i64::from(day) - 1;
        let secs = days * SECONDS_PER_DAY + i64::from(hour) * 3600 + i64::from(minute) * 60;
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
    }

    fn cron(text: &str) -> Cron {
        text.parse().unwrap()
    }

    #[test]
    fn civil_time_from_clock() {
        // (utc instant, expected local fields, weekday)
        let cases = [
            (utc(1970, 1, 1, 0, 0), (1970, 1, 1, 0, 0), 4),
            (utc(2000, 2, 29, 23, 59), (2000, 2, 29, 23, 59), 2),
            (utc(2024, 12, 31, 12, 30), (2024, 12, 31, 12, 30), 2),
            (utc(2026, 3, 1, 0, 0), (2026, 3, 1, 0, 0), 0),
        ];
        for (at, (y, mo, d, h, mi), wd) in cases {
            let l = TimeZone::UTC.local(at);
            assert_eq!(
                (l.year, l.month, l.day, l.hour, l.minute, l.weekday),
                (y, mo, d, h, mi, wd),
                "{at:?}"
            );
        }
    }

    #[test]
    fn cron_matches() {
        // 2026-08-24 is a Monday.
        let cases: &[(&str, SystemTime, bool)] = &[
            ("* * * * *", utc(2026, 8, 24, 3, 7), true),
            ("* 8-18 * * mon-fri", utc(2026, 8, 24, 8, 0), true),
            ("* 8-18 * * mon-fri", utc(2026, 8, 24, 18, 59), true),
            ("* 8-18 * * mon-fri", utc(2026, 8, 24, 19, 0), false),
            ("* 8-18 * * mon-fri", utc(2026, 8, 24, 7, 59), false),
            ("* 8-18 * * mon-fri", utc(2026, 8, 23, 12, 0), false),
            ("* * * * sat,sun", utc(2026, 8, 23, 12, 0), true),
            ("* * * * 7", utc(2026, 8, 23, 12, 0), true),
            ("* * * * 0", utc(2026, 8, 23, 12, 0), true),
            ("*/15 * * * *", utc(2026, 8, 24, 3, 45), true),
            ("*/15 * * * *", utc(2026, 8, 24, 3, 46), false),
            ("5/20 * * * *", utc(2026, 8, 24, 3, 45), true),
            ("0-30/10 * * * *", utc(2026, 8, 24, 3, 40), false),
            ("0 0 1 jan *", utc(2027, 1, 1, 0, 0), true),
            ("0 0 1 JAN *", utc(2027, 2, 1, 0, 0), false),
            ("* * 1,15 * *", utc(2026, 8, 15, 9, 9), true),
            // Both day fields restricted: either matches (the 1st, or a Monday).
            ("* * 1 * mon", utc(2026, 8, 24, 9, 9), true),
            ("* * 1 * mon", utc(2026, 9, 1, 9, 9), true),
            ("* * 1 * mon", utc(2026, 8, 25, 9, 9), false),
        ];
        for (text, at, want) in cases {
            let got = cron(text).matches(&TimeZone::UTC.local(*at));
            assert_eq!(got, *want, "{text} at {at:?}");
        }
    }

    #[test]
    fn cron_errors_name_field_and_fix() {
        let cases = [
            ("* * * *", "has 4 fields; write five"),
            (
                "60 * * * *",
                "minute value \"60\" is out of range; write 0-59",
            ),
            (
                "* 24 * * *",
                "hour value \"24\" is out of range; write 0-23",
            ),
            (
                "* * 0 * *",
                "day-of-month value \"0\" is out of range; write 1-31",
            ),
            (
                "* * * foo *",
                "month value \"foo\" is out of range; write 1-12 or jan-dec",
            ),
            (
                "* * * * fri-mon",
                "day-of-week range \"fri-mon\" runs backwards",
            ),
            ("*/0 * * * *", "minute step \"0\" is not a positive number"),
            ("* * * * 8", "write 0-7 (0 and 7 are Sunday) or sun-sat"),
        ];
        for (text, want) in cases {
            let err = text.parse::<Cron>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.contains(&format!("{text:?}")), "{text}: {err}");
        }
    }

    #[test]
    fn time_zones() {
        let ok = [
            ("UTC", 0),
            ("", 0),
            ("+02:00", 7200),
            ("-05:30", -19_800),
            ("+0530", 19_800),
            ("UTC+01", 3600),
            ("+14:00", 50_400),
        ];
        for (text, secs) in ok {
            assert_eq!(
                text.parse::<TimeZone>(),
                Ok(TimeZone::fixed(secs).unwrap()),
                "{text}"
            );
        }
        for text in ["Europe/Berlin", "+15:00", "+02:60", "2", "+2:0:0"] {
            let err = text.parse::<TimeZone>().unwrap_err().to_string();
            assert!(
                err.contains("fixed offset like \"+02:00\""),
                "{text}: {err}"
            );
        }
    }

    fn block(periods: &[&str], tz: &str, idle_count: u32) -> PolicyBlock {
        PolicyBlock {
            periods: periods.iter().map(|p| cron(p)).collect(),
            timezone: tz.parse().unwrap(),
            idle_count,
            idle_time: Duration::from_secs(600),
            scale_factor: 0.0,
            scale_factor_limit: 0,
        }
    }

    #[test]
    fn last_matching_block_wins() {
        let default = ActivePolicy {
            idle_count: 1,
            idle_time: Duration::from_secs(60),
            ..ActivePolicy::default()
        };
        let work_hours = || block(&["* 8-17 * * mon-fri"], "UTC", 10);
        let plus_two_work_hours = || block(&["* 8-17 * * mon-fri"], "+02:00", 20);
        let always = || block(&[], "UTC", 3);
        // name, blocks, wall clock (UTC), expected idle_count, expected block.
        type Row = (
            &'static str,
            Vec<PolicyBlock>,
            SystemTime,
            u32,
            Option<usize>,
        );
        // 2026-08-24 is a Monday.
        #[rustfmt::skip]
        let cases: Vec<Row> = vec![
            ("no blocks: default",                        vec![],                         utc(2026, 8, 24, 9, 0),   1,  None),
            ("none matches: default",                     vec![work_hours()],             utc(2026, 8, 23, 9, 0),   1,  None),
            ("first minute of the period",                vec![work_hours()],             utc(2026, 8, 24, 8, 0),   10, Some(0)),
            ("last minute before it",                     vec![work_hours()],             utc(2026, 8, 24, 7, 59),  1,  None),
            ("last minute of the period",                 vec![work_hours()],             utc(2026, 8, 24, 17, 59), 10, Some(0)),
            ("first minute after it",                     vec![work_hours()],             utc(2026, 8, 24, 18, 0),  1,  None),
            ("later block wins",                          vec![always(), work_hours()],   utc(2026, 8, 24, 9, 0),   10, Some(1)),
            ("earlier block only when later misses",      vec![always(), work_hours()],   utc(2026, 8, 24, 20, 0),  3,  Some(0)),
            ("general block last hides the specific one", vec![work_hours(), always()],   utc(2026, 8, 24, 9, 0),   3,  Some(1)),
            // 06:00 UTC is 08:00 at +02:00: inside the +02:00 block, outside the UTC one.
            ("offset zone starts two hours earlier",      vec![plus_two_work_hours()],      utc(2026, 8, 24, 6, 0),   20, Some(0)),
            ("offset zone ends two hours earlier",        vec![plus_two_work_hours()],      utc(2026, 8, 24, 16, 0),  1,  None),
            // Sunday 22:30 UTC is Monday 00:30 at +02:00.
            ("offset moves the weekday",                  vec![block(&["* * * * mon"], "+02:00", 7)],
                                                                                          utc(2026, 8, 23, 22, 30), 7,  Some(0)),
            ("negative offset moves it back",             vec![block(&["* * * * sun"], "-03:00", 7)],
                                                                                          utc(2026, 8, 24, 2, 59),  7,  Some(0)),
        ];
        for (name, blocks, at, idle_count, index) in cases {
            let got = active_policy(&blocks, &default, at);
            assert_eq!((got.idle_count, got.block), (idle_count, index), "{name}");
        }
    }

    #[test]
    fn scale_factor_is_checked() {
        let mut b = block(&[], "UTC", 0);
        assert!(b.validate().is_ok());
        b.scale_factor = -1.0;
        let err = b.validate().unwrap_err().to_string();
        assert!(err.contains("scale_factor -1 must be"), "{err}");
        b.scale_factor = f64::NAN;
        assert!(b.validate().is_err());
    }
}
