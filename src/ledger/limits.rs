//! Per-user limit overrides (set by an operator, never by a producer or a gateway user) and
//! the usage of a wallet's current window, read outside a batch.

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::Row;

use super::Ledger;
use crate::domain::limits::{LIMIT_WINDOW_S, USAGE_BUCKET_S};
use crate::domain::{Limits, Money, Usage, UserId};

/// A change an operator asks for: the limits given are set, the others kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitChange {
    /// New largest single withdrawal or hold.
    pub per_withdrawal: Option<Money>,
    /// New rolling 24-hour amount.
    pub daily_amount: Option<Money>,
    /// New rolling 24-hour count.
    pub daily_count: Option<u32>,
}

/// A wallet's limits as `walletq limits show`, `walletq balance` and the gateway show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LimitsView {
    /// The limits in force: the user's own, else the defaults.
    #[schema(value_type = Object)]
    pub in_force: Limits,
    /// The user's own limits (set with `walletq limits set`).
    #[schema(value_type = Object)]
    pub own: Limits,
    /// Money counted in the current 24-hour window.
    #[schema(value_type = String, example = "120.00")]
    pub used_amount: Money,
    /// Withdrawals and holds counted in the current 24-hour window.
    pub used_count: i64,
    /// What the daily amount still allows (`None`: no such limit).
    #[schema(value_type = Option<String>)]
    pub left_amount: Option<Money>,
    /// How many more withdrawals and holds the daily count allows (`None`: no such limit).
    pub left_count: Option<i64>,
    /// When the oldest usage in the window leaves it (allowance comes back then).
    pub frees_at: Option<DateTime<Utc>>,
}

/// The usage sum of the window at now, as a batch reads it (see `ledger/load.rs`).
const USAGE_SQL: &str = "WITH w AS (
         SELECT date_bin('1 minute', now() - interval '24 hours', timestamptz 'epoch') AS minute,
                date_bin('1 hour', now() - interval '24 hours', timestamptz 'epoch') + interval '1 hour' AS hour
     )
     SELECT coalesce(sum(u.amount), 0) AS amount, coalesce(sum(u.count), 0)::bigint AS count,
            min(u.bucket_start) FILTER (WHERE u.amount > 0 OR u.count > 0) AS oldest
     FROM limit_usage u, w
     WHERE u.user_id = $1
       AND ((u.span_s = 3600 AND u.bucket_start >= w.hour)
            OR (u.span_s = 60 AND u.bucket_start >= w.minute AND u.bucket_start < w.hour))";

impl Ledger {
    /// The user's own limits (all `None` when it has none).
    pub async fn own_limits(&self, user: &UserId) -> anyhow::Result<Limits> {
        let row = sqlx::query("SELECT per_withdrawal, daily_amount, daily_count FROM wallet_limits WHERE user_id = $1")
            .bind(user.as_str())
            .fetch_optional(self.pool())
            .await
            .context("reading a user's limits")?;
        let Some(row) = row else { return Ok(Limits::default()) };
        let money = |column: &str| -> anyhow::Result<Option<Money>> {
            let value: Option<Decimal> = row.try_get(column)?;
            value.map(|v| Money::from_decimal(v).context("a stored limit is not valid money")).transpose()
        };
        let count: Option<i32> = row.try_get("daily_count")?;
        Ok(Limits {
            per_withdrawal: money("per_withdrawal")?,
            daily_amount: money("daily_amount")?,
            daily_count: count.map(u32::try_from).transpose().context("a stored daily_count is negative")?,
        })
    }

    /// The user's usage of the current window.
    pub async fn limit_usage(&self, user: &UserId) -> anyhow::Result<Usage> {
        let row = sqlx::query(USAGE_SQL).bind(user.as_str()).fetch_one(self.pool()).await.context("reading usage")?;
        let amount: Decimal = row.try_get("amount")?;
        let count: i64 = row.try_get("count")?;
        let cents = i64::try_from((amount * Decimal::ONE_HUNDRED).trunc()).context("usage out of range")?;
        Ok(Usage { amount_cents: cents.max(0), count: count.max(0), oldest: row.try_get("oldest")? })
    }

    /// The user's limits: own, in force (with the ledger's defaults) and what is left.
    pub async fn limits_view(&self, user: &UserId) -> anyhow::Result<LimitsView> {
        let own = self.own_limits(user).await?;
        let in_force = own.or(self.default_limits());
        let usage = self.limit_usage(user).await?;
        let window = chrono::Duration::seconds(LIMIT_WINDOW_S + USAGE_BUCKET_S);
        Ok(LimitsView {
            in_force,
            own,
            used_amount: Money::from_cents(usage.amount_cents).unwrap_or(Money::ZERO),
            used_count: usage.count,
            left_amount: in_force
                .daily_amount
                .map(|daily| Money::from_cents((daily.cents() - usage.amount_cents).max(0)).unwrap_or(Money::ZERO)),
            left_count: in_force.daily_count.map(|daily| (i64::from(daily) - usage.count).max(0)),
            frees_at: usage.oldest.map(|oldest| oldest + window),
        })
    }

    /// Sets the limits `change` gives for `user` (keeping the others), recorded with the
    /// operator's `note`; returns the user's own limits after it. Batches that start after
    /// this commits apply them.
    pub async fn set_limits(&self, user: &UserId, change: LimitChange, note: Option<&str>) -> anyhow::Result<Limits> {
        sqlx::query(
            "WITH set AS (
                 INSERT INTO wallet_limits (user_id, per_withdrawal, daily_amount, daily_count, note, changed_at)
                 VALUES ($1, $2, $3, $4, $5, now())
                 ON CONFLICT (user_id) DO UPDATE SET
                     per_withdrawal = coalesce(EXCLUDED.per_withdrawal, wallet_limits.per_withdrawal),
                     daily_amount = coalesce(EXCLUDED.daily_amount, wallet_limits.daily_amount),
                     daily_count = coalesce(EXCLUDED.daily_count, wallet_limits.daily_count),
                     note = EXCLUDED.note, changed_at = EXCLUDED.changed_at
                 RETURNING *
             )
             INSERT INTO wallet_limit_changes (user_id, per_withdrawal, daily_amount, daily_count, cleared, note, changed_at)
             SELECT user_id, per_withdrawal, daily_amount, daily_count, false, note, changed_at FROM set",
        )
        .bind(user.as_str())
        .bind(change.per_withdrawal.map(Money::as_decimal))
        .bind(change.daily_amount.map(Money::as_decimal))
        .bind(change.daily_count.map(i32::try_from).transpose().context("daily_count is too large")?)
        .bind(note)
        .execute(self.pool())
        .await
        .context("setting limits (needs the schema owner's role: workers and gateways may only read them)")?;
        self.own_limits(user).await
    }

    /// Removes the user's own limits: the defaults apply again. Recorded with `note`.
    pub async fn clear_limits(&self, user: &UserId, note: Option<&str>) -> anyhow::Result<()> {
        sqlx::query(
            "WITH cleared AS (
                 UPDATE wallet_limits SET per_withdrawal = NULL, daily_amount = NULL, daily_count = NULL,
                                          note = $2, changed_at = now()
                 WHERE user_id = $1 RETURNING user_id
             )
             INSERT INTO wallet_limit_changes (user_id, cleared, note, changed_at) VALUES ($1, true, $2, now())",
        )
        .bind(user.as_str())
        .bind(note)
        .execute(self.pool())
        .await
        .context("clearing limits (needs the schema owner's role: workers and gateways may only read them)")?;
        Ok(())
    }
}
