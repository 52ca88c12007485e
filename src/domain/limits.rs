//! Withdrawal limits, enforced inside the serialized write path: a largest single
//! withdrawal or hold, and a rolling 24-hour amount and count.
//!
//! Usage is kept in time buckets beside the wallet (one minute and one hour wide), so a
//! batch reads at most 23 hour buckets and 60 minute buckets per user however many
//! withdrawals the user made. The window is `(now − 24 h, now]` counted at minute
//! resolution, conservatively: the whole minute bucket in which the window starts is
//! counted, so an allowance comes back at most one minute after 24 hours, never early.

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::{Deserialize, Serialize};

use super::money::Money;

/// The rolling window of the daily limits.
pub const LIMIT_WINDOW_S: i64 = 24 * 3_600;
/// The finest usage bucket: the window's resolution.
pub const USAGE_BUCKET_S: i64 = 60;

/// The limits in force for one wallet; `None` means no such limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Largest single withdrawal or hold.
    pub per_withdrawal: Option<Money>,
    /// Most money that may leave the wallet in any rolling 24 hours.
    pub daily_amount: Option<Money>,
    /// Most withdrawals and holds in any rolling 24 hours.
    pub daily_count: Option<u32>,
}

impl Limits {
    /// True when no limit is set.
    pub fn is_none(&self) -> bool {
        self.per_withdrawal.is_none() && self.daily_amount.is_none() && self.daily_count.is_none()
    }

    /// These limits, each one that is unset taken from `defaults`.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            per_withdrawal: self.per_withdrawal.or(defaults.per_withdrawal),
            daily_amount: self.daily_amount.or(defaults.daily_amount),
            daily_count: self.daily_count.or(defaults.daily_count),
        }
    }
}

/// What left a wallet in the current window: approved withdrawals and holds, minus what
/// released and expired holds (and the uncaptured rest of partial captures) gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Money counted in the window, in cents.
    pub amount_cents: i64,
    /// Withdrawals and holds counted in the window.
    pub count: i64,
    /// Start of the oldest bucket with usage: when it leaves the window, allowance comes back.
    pub oldest: Option<DateTime<Utc>>,
}

impl Usage {
    /// Adds (or, negative, gives back) usage recorded at `at`, if `at` is still in the window
    /// at `now`; returns whether it counted.
    pub fn record(&mut self, at: DateTime<Utc>, amount_cents: i64, count: i64, now: DateTime<Utc>) -> bool {
        if !in_window(at, now) {
            return false;
        }
        self.amount_cents += amount_cents;
        self.count += count;
        if amount_cents > 0 || count > 0 {
            let bucket = bucket_start(at);
            self.oldest = Some(self.oldest.map_or(bucket, |oldest| oldest.min(bucket)));
        }
        true
    }
}

/// The start of the minute bucket of `at`.
pub fn bucket_start(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(Duration::seconds(USAGE_BUCKET_S)).unwrap_or(at)
}

/// Whether usage recorded at `at` is counted in the window at `now`: its minute bucket
/// starts at or after the minute bucket in which the window starts.
pub fn in_window(at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    bucket_start(at) >= bucket_start(now - Duration::seconds(LIMIT_WINDOW_S))
}

/// Why a limit refuses a withdrawal or hold: the `detail` of its `limit_exceeded` rejection.
pub fn refusal(limits: &Limits, usage: &Usage, amount: Money) -> Option<String> {
    let until = || {
        usage.oldest.map_or_else(String::new, |oldest| {
            let back = oldest + Duration::seconds(LIMIT_WINDOW_S + USAGE_BUCKET_S);
            format!(" until {}", back.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        })
    };
    if let Some(largest) = limits.per_withdrawal.filter(|largest| amount > *largest) {
        return Some(format!("per_withdrawal {largest} exceeded: {amount} asked"));
    }
    if let Some(daily) = limits.daily_count.map(i64::from).filter(|daily| usage.count + 1 > *daily) {
        let left = (daily - usage.count).max(0);
        return Some(format!("daily_count {daily} reached: {left} left{}", until()));
    }
    if let Some(daily) = limits.daily_amount.filter(|daily| usage.amount_cents + amount.cents() > daily.cents()) {
        let left = Money::from_cents((daily.cents() - usage.amount_cents).max(0)).unwrap_or(Money::ZERO);
        return Some(format!("daily_amount {daily} reached: {left} left{}", until()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    #[test]
    fn each_limit_refuses_with_what_is_left_and_when_more_comes_back() {
        let limits =
            Limits { per_withdrawal: Some(money("100")), daily_amount: Some(money("500")), daily_count: Some(7) };
        let oldest = "2026-12-01T09:13:00Z".parse::<DateTime<Utc>>().unwrap();
        let usage = Usage { amount_cents: 48_750, count: 3, oldest: Some(oldest) };
        assert_eq!(refusal(&limits, &usage, money("12.50")), None, "exactly the limit is allowed");
        assert_eq!(
            refusal(&limits, &usage, money("12.51")).as_deref(),
            Some("daily_amount 500.00 reached: 12.50 left until 2026-12-02T09:14:00Z")
        );
        assert_eq!(
            refusal(&limits, &usage, money("100.01")).as_deref(),
            Some("per_withdrawal 100.00 exceeded: 100.01 asked")
        );
        let used_up = Usage { count: 7, ..usage };
        assert_eq!(
            refusal(&limits, &used_up, money("1")).as_deref(),
            Some("daily_count 7 reached: 0 left until 2026-12-02T09:14:00Z")
        );
        assert_eq!(refusal(&Limits::default(), &used_up, money("1000000")), None);
    }

    #[test]
    fn the_window_counts_the_minute_in_which_it_starts_and_nothing_older() {
        let now = "2026-12-02T10:00:30Z".parse::<DateTime<Utc>>().unwrap();
        assert!(in_window("2026-12-01T10:00:00Z".parse().unwrap(), now), "the boundary minute counts whole");
        assert!(!in_window("2026-12-01T09:59:59Z".parse().unwrap(), now));
        let mut usage = Usage::default();
        assert!(usage.record("2026-12-01T10:00:45Z".parse().unwrap(), 500, 1, now));
        assert!(!usage.record("2026-12-01T09:00:00Z".parse().unwrap(), 500, 1, now));
        assert_eq!((usage.amount_cents, usage.count), (500, 1));
        assert_eq!(usage.oldest, Some("2026-12-01T10:00:00Z".parse().unwrap()));
    }

    #[test]
    fn overrides_fall_back_to_the_defaults_one_by_one() {
        let defaults =
            Limits { per_withdrawal: Some(money("1")), daily_amount: Some(money("2")), daily_count: Some(3) };
        let own = Limits { daily_count: Some(9), ..Limits::default() };
        assert_eq!(own.or(defaults), Limits { daily_count: Some(9), ..defaults });
        assert!(Limits::default().is_none());
    }
}
