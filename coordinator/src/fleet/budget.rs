//! The monthly budget: how many launches the cap still pays for (a pure
//! function, table-tested here), and the month-to-date spend ledger that
//! survives restarts.
//!
//! The rule: a launch is allowed only while the month's spend so far plus
//! the whole fleet, the new instances included, running until the month
//! ends stays within `budget.monthly_usd`. That is a promise the fleet can
//! keep whatever happens next, since idle instances only ever make the
//! real bill smaller. Busy instances are never stopped for money: the cap
//! holds scale-out, not work in progress.
//!
//! Not responsible for prices (`pricing`), for weighing the cap against
//! the sizing policy (the planner in `policy` does, with
//! [`affordable_launches`]), for carrying decisions out (the reconcile
//! loop), or for writing the ledger to disk (the lease book's writer
//! thread does, off the async threads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::schedule::TimeZone;
use crate::store::{Change, Commit, Store, SPEND_FILE};

/// The operator's budget.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetSettings {
    /// Most the fleet may cost in a calendar month (UTC), in US dollars.
    pub monthly_usd: f64,
    /// What on-demand instances cost an hour, by instance type.
    pub on_demand_hourly_usd: BTreeMap<String, f64>,
}

/// Where the money stands, as [`affordable_launches`] (and through it the
/// fleet's planner) decides from it: plain figures the reconcile loop reads
/// from the ledger and the price book.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetInput {
    pub monthly_usd: f64,
    pub spent_usd: f64,
    /// What the instances running now cost an hour together.
    pub running_hourly_usd: f64,
    /// What one more instance costs an hour.
    pub launch_hourly_usd: f64,
    /// Hours until the month ends.
    pub hours_left: f64,
}

/// How many of `wanted` launches the cap pays for (see the module comment
/// for the rule).
pub fn affordable_launches(i: &BudgetInput, wanted: u32) -> u32 {
    if wanted == 0 {
        return 0;
    }
    let per_instance = i.launch_hourly_usd * i.hours_left.max(0.0);
    let committed = i.spent_usd + i.running_hourly_usd * i.hours_left.max(0.0);
    let room = i.monthly_usd - committed;
    // `<=` rather than `!(>)`: a NaN price cannot reach here, the
    // configuration and the price parser only produce finite numbers.
    if per_instance <= 0.0 {
        // Free instances: only a cap already broken stops them.
        return if room >= 0.0 { wanted } else { 0 };
    }
    if room < per_instance {
        return 0;
    }
    let fits = (room / per_instance).floor();
    if fits >= f64::from(wanted) {
        wanted
    } else {
        // Below `wanted`, so it fits in a u32.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = fits as u32;
        n
    }
}

/// The calendar month (UTC) of a moment, as `YYYY-MM`.
pub fn month_of(now: SystemTime) -> String {
    let t = TimeZone::UTC.local(now);
    format!("{:04}-{:02}", t.year, t.month)
}

/// Hours from `now` to the start of the next calendar month (UTC).
pub fn hours_left_in_month(now: SystemTime) -> f64 {
    let t = TimeZone::UTC.local(now);
    let (year, month) = if t.month == 12 {
        (t.year + 1, 1)
    } else {
        (t.year, t.month + 1)
    };
    let next = days_from_civil(year, month, 1) * 86_400;
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // Whole-second unix times of this era are exact in an f64.
    #[allow(clippy::cast_precision_loss)]
    let next = next as f64;
    ((next - now_secs) / 3600.0).max(0.0)
}

/// Time since the current calendar month (UTC) began.
fn since_month_start(now: SystemTime) -> Duration {
    let t = TimeZone::UTC.local(now);
    let start = u64::try_from(days_from_civil(t.year, t.month, 1) * 86_400).unwrap_or(0);
    now.duration_since(UNIX_EPOCH + Duration::from_secs(start))
        .unwrap_or_default()
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian), counting in
/// 400-year eras that start on 1 March so the leap day ends its year.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let m = i64::from(month);
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A ledger failure.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("cannot read the spend ledger {path}: {detail}; fix or remove the file (spend this month is then counted from zero)")]
    Read { path: PathBuf, detail: String },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct LedgerRecord {
    month: String,
    spent_usd: f64,
    /// Unix seconds the spend is counted up to.
    #[serde(default)]
    as_of_unix: u64,
}

/// Month-to-date spend, kept in `state_dir/spend.json`.
#[derive(Debug)]
pub struct SpendLedger {
    /// Writes the file, off the caller's thread.
    store: Store,
    record: LedgerRecord,
    /// What the file holds, so a pass writes only when the spend moved.
    saved: LedgerRecord,
}

/// How much accrued spend may go unsaved: a crash loses at most this.
const SAVE_EVERY_USD: f64 = 0.01;

impl SpendLedger {
    /// Opens the ledger in `state_dir`, empty if there is none yet; `store`
    /// (opened on the same state directory) writes it.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn open(state_dir: &Path, store: Store) -> Result<Self, BudgetError> {
        let path = state_dir.join(SPEND_FILE);
        let record = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| BudgetError::Read {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerRecord::default(),
            Err(e) => {
                return Err(BudgetError::Read {
                    path,
                    detail: e.to_string(),
                })
            }
        };
        Ok(Self {
            store,
            saved: record.clone(),
            record,
        })
    }

    /// Adds what instances costing `hourly_usd` together cost over
    /// `elapsed`, up to `now`. A new month starts from zero.
    pub fn accrue(&mut self, now: SystemTime, hourly_usd: f64, elapsed: Duration) {
        let month = month_of(now);
        let mut elapsed = elapsed;
        if self.record.month != month {
            self.record = LedgerRecord {
                month,
                ..LedgerRecord::default()
            };
            // Only this month's share of a span that began in the last.
            elapsed = elapsed.min(since_month_start(now));
        }
        self.record.spent_usd += hourly_usd.max(0.0) * elapsed.as_secs_f64() / 3600.0;
        self.record.as_of_unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let moved = self.record.month != self.saved.month
            || self.record.spent_usd - self.saved.spent_usd >= SAVE_EVERY_USD;
        if moved {
            // Nobody waits for it: the writer says so if it fails.
            drop(self.save());
        }
    }

    /// Up to when the spend was counted when the ledger was last written:
    /// a restarted coordinator accrues the time it was down from here, at
    /// the rate of the fleet it finds (the instances it adopts ran on).
    pub fn counted_until(&self) -> Option<SystemTime> {
        (self.record.as_of_unix > 0)
            .then(|| UNIX_EPOCH + Duration::from_secs(self.record.as_of_unix))
    }

    /// Spend so far in the month of `now`.
    pub fn spent(&self, now: SystemTime) -> f64 {
        if self.record.month == month_of(now) {
            self.record.spent_usd
        } else {
            0.0
        }
    }

    /// Hands the ledger to the writer, which replaces the file so that a
    /// crash or a power loss leaves the old or the new. Await the commit to
    /// know it is on disk.
    pub fn save(&mut self) -> Commit {
        let bytes = serde_json::to_vec(&self.record)
            .expect("a record of strings and numbers always serialises");
        self.saved = self.record.clone();
        self.store.submit(vec![Change::Spend {
            record: bytes.into(),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(monthly: f64, spent: f64, running: f64, launch: f64, hours: f64) -> BudgetInput {
        BudgetInput {
            monthly_usd: monthly,
            spent_usd: spent,
            running_hourly_usd: running,
            launch_hourly_usd: launch,
            hours_left: hours,
        }
    }

    #[test]
    fn the_cap_holds_scale_out() {
        #[rustfmt::skip]
        let cases = [
            // name,                                   monthly, spent, running/h, launch/h, hours, wanted, want
            ("plenty of room",                          1000.0,   0.0,   0.0,   0.10,  100.0, 5, 5),
            ("room for exactly two",                      20.0,   0.0,   0.0,   0.10,  100.0, 5, 2),
            ("just under two",                            19.99,  0.0,   0.0,   0.10,  100.0, 5, 1),
            ("spend so far counts",                       20.0,  10.0,   0.0,   0.10,  100.0, 5, 1),
            ("running fleet counts to month end",         20.0,   0.0,   0.15,  0.10,  100.0, 5, 0),
            ("cap already broken",                        20.0,  25.0,   0.0,   0.10,  100.0, 5, 0),
            ("near month end the same money buys more",   20.0,   0.0,   0.0,   0.10,   10.0, 50, 20),
            ("free instances only stop at a broken cap",  20.0,   5.0,   0.0,   0.0,   100.0, 3, 3),
            ("free instances, cap broken",                20.0,  21.0,   0.0,   0.0,   100.0, 3, 0),
            ("nothing wanted",                            20.0,   0.0,   0.0,   0.10,  100.0, 0, 0),
            ("spot-cheap: tiny prices barely count",      10.0,   0.0,   0.00001, 0.00001, 720.0, 8, 8),
        ];
        for (name, monthly, spent, running, launch, hours, wanted, want) in cases {
            assert_eq!(
                affordable_launches(&input(monthly, spent, running, launch, hours), wanted),
                want,
                "{name}"
            );
        }
    }

    fn utc(year: i64, month: u32, day: u32, hour: u64) -> SystemTime {
        let days = u64::try_from(days_from_civil(year, month, day)).expect("after 1970");
        UNIX_EPOCH + Duration::from_secs(days * 86_400 + hour * 3600)
    }

    #[test]
    fn months_and_hours_left() {
        assert_eq!(month_of(utc(2026, 12, 1, 18)), "2026-12");
        assert_eq!(month_of(utc(2024, 2, 29, 23)), "2024-02");
        // December: 31 days, from the 1st at 18:00 to January 1st.
        assert!((hours_left_in_month(utc(2026, 12, 1, 18)) - (30.0 * 24.0 + 6.0)).abs() < 1e-9);
        // A leap February.
        assert!((hours_left_in_month(utc(2024, 2, 1, 0)) - 29.0 * 24.0).abs() < 1e-9);
        assert!((hours_left_in_month(utc(2025, 2, 28, 23)) - 1.0).abs() < 1e-9);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn the_ledger_accrues_survives_a_reopen_and_resets_each_month() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let dec = utc(2026, 12, 10, 0);
        let mut ledger = SpendLedger::open(dir.path(), store.clone()).expect("open");
        assert_eq!(ledger.spent(dec), 0.0);
        // Two instances at $0.50 an hour for 3 hours.
        ledger.accrue(dec, 1.0, Duration::from_secs(3 * 3600));
        assert!((ledger.spent(dec) - 3.0).abs() < 1e-9);
        ledger.save().wait().expect("save");
        // Spend that did not move is not written again on every pass.
        let on_disk = std::fs::read(dir.path().join("spend.json")).expect("read");
        ledger.accrue(dec + Duration::from_secs(60), 0.0, Duration::from_secs(60));
        store.submit(Vec::new()).wait().expect("flush");
        assert_eq!(
            std::fs::read(dir.path().join("spend.json")).expect("read"),
            on_disk
        );
        let reopened = SpendLedger::open(dir.path(), store.clone()).expect("reopen");
        assert!((reopened.spent(dec) - 3.0).abs() < 1e-9);
        // January starts from zero.
        let jan = utc(2027, 1, 1, 1);
        assert_eq!(reopened.spent(jan), 0.0);
        let mut reopened = reopened;
        reopened.accrue(jan, 2.0, Duration::from_secs(1800));
        assert!((reopened.spent(jan) - 1.0).abs() < 1e-9);
        // A restart accrues its downtime from where the ledger stopped.
        let later = jan + Duration::from_secs(600);
        reopened.accrue(later, 6.0, Duration::from_secs(600));
        reopened.save().wait().expect("save");
        let again = SpendLedger::open(dir.path(), store.clone()).expect("reopen");
        assert_eq!(again.counted_until(), Some(later));
        assert!((again.spent(later) - 2.0).abs() < 1e-9);
        // A span reaching back into December counts only its January part.
        let other = tempfile::tempdir().expect("tempdir");
        let mut fresh = SpendLedger::open(other.path(), Store::open(other.path()).expect("store"))
            .expect("open");
        fresh.accrue(utc(2027, 1, 1, 1), 1.0, Duration::from_secs(5 * 3600));
        assert!((fresh.spent(utc(2027, 1, 1, 1)) - 1.0).abs() < 1e-9);
        // A damaged file is named with the fix.
        std::fs::write(dir.path().join("spend.json"), b"{not json").expect("write");
        let err = SpendLedger::open(dir.path(), store)
            .expect_err("damaged")
            .to_string();
        assert!(
            err.contains("spend.json") && err.contains("remove the file"),
            "{err}"
        );
    }
}
