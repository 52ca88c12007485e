//! Holds outside a batch: finding the due ones and the expiry results still to publish (the
//! partition's sweeper), listing a wallet's active holds, and reading one hold.
//!
//! A partition finds its own users' holds by `user_hash` (see
//! [`crate::domain::partitioning::user_hash`]), stored with each hold: PostgreSQL computes
//! the partition as the hash modulo the partition count, as the router does.

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::Row;

use super::Ledger;
use crate::domain::{HoldState, Money, RequestId, RequestResult, UserId};

/// The stored `user_hash` (an i64 with the u64 hash's bits) as the u64 it is, modulo the
/// partition count `$1`, equals the partition `$2`.
const IN_PARTITION: &str = "(CASE WHEN user_hash < 0 THEN user_hash::numeric + 18446744073709551616
                                ELSE user_hash::numeric END) % $1 = $2";

/// An active hold, as `walletq balance` and `GET /v1/wallet` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ActiveHold {
    /// The hold's id (its `hold` request's id).
    #[schema(value_type = String)]
    pub hold_id: RequestId,
    /// The money it reserves.
    #[schema(value_type = String, example = "25.00")]
    pub amount: Money,
    /// When it expires unless captured or released first.
    pub expires_at: DateTime<Utc>,
}

/// A hold as stored, active or closed, as `GET /v1/holds/{hold_id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHold {
    /// The hold's id (its `hold` request's id).
    pub hold_id: RequestId,
    /// The money it reserves (or reserved).
    pub amount: Money,
    /// Active, captured, released or expired, as last written (an active hold past its
    /// `expires_at` is expired by the next batch or sweep of its partition).
    pub state: HoldState,
    /// What its capture took; `Some` exactly when captured.
    pub captured: Option<Money>,
    /// When the hold was placed.
    pub created_at: DateTime<Utc>,
    /// When it expires (or expired) unless captured or released first.
    pub expires_at: DateTime<Utc>,
    /// When it was captured, released or expired; `None` while active.
    pub closed_at: Option<DateTime<Utc>>,
    /// The capture or release request that closed it; `None` while active or when expired.
    pub closed_by: Option<RequestId>,
}

/// An expiry result not yet published.
#[derive(Debug, Clone)]
pub struct UnsentExpiry {
    /// The hold that expired.
    pub hold_id: RequestId,
    /// Its `reply_to`; `None`: the results queue.
    pub reply_to: Option<String>,
    /// The result to publish.
    pub result: RequestResult,
}

impl Ledger {
    /// Users of partition `partition` (of `partitions`) with an active hold past its
    /// `expires_at`, at most `limit`.
    pub async fn due_hold_users(&self, partitions: u16, partition: u16, limit: i64) -> anyhow::Result<Vec<UserId>> {
        let sql = format!(
            "SELECT DISTINCT user_id FROM (
                 SELECT user_id FROM holds
                 WHERE state = 'active' AND expires_at <= statement_timestamp() AND {IN_PARTITION}
                 ORDER BY expires_at LIMIT $3) AS due"
        );
        let users: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(Decimal::from(partitions))
            .bind(Decimal::from(partition))
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .context("finding due holds")?;
        users.iter().map(|u| UserId::parse(u).context("a stored user_id is not valid")).collect()
    }

    /// Expiry results of partition `partition` not yet published, oldest first, at most `limit`.
    pub async fn unsent_expiries(
        &self,
        partitions: u16,
        partition: u16,
        limit: i64,
    ) -> anyhow::Result<Vec<UnsentExpiry>> {
        let sql = format!(
            "SELECT hold_id, reply_to, expiry_result::text AS result FROM holds
             WHERE state = 'expired' AND NOT expiry_sent AND {IN_PARTITION}
             ORDER BY closed_at, hold_id LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(Decimal::from(partitions))
            .bind(Decimal::from(partition))
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .context("reading unsent expiry results")?;
        rows.iter()
            .map(|row| {
                let hold_id: String = row.try_get("hold_id")?;
                let result: String = row.try_get("result")?;
                Ok(UnsentExpiry {
                    hold_id: RequestId::parse(&hold_id).context("a stored hold_id is not valid")?,
                    reply_to: row.try_get("reply_to")?,
                    result: serde_json::from_str(&result).context("decoding a stored expiry result")?,
                })
            })
            .collect()
    }

    /// Records that these holds' expiry results were published (confirmed by the broker).
    pub async fn mark_expiries_sent(&self, holds: &[RequestId]) -> anyhow::Result<()> {
        let ids: Vec<&str> = holds.iter().map(RequestId::as_str).collect();
        sqlx::query("UPDATE holds SET expiry_sent = true WHERE hold_id = ANY($1) AND state = 'expired'")
            .bind(&ids)
            .execute(self.pool())
            .await
            .context("recording published expiry results")?;
        Ok(())
    }

    /// The active holds of `user`, soonest to expire first, at most `limit`.
    pub async fn active_holds(&self, user: &UserId, limit: i64) -> anyhow::Result<Vec<ActiveHold>> {
        read_active_holds(self.pool(), user, limit).await
    }

    /// The hold `hold_id` of `user`, whatever its state; `None` when `user` has no such hold
    /// (never placed, refused, not applied yet, or another user's).
    pub async fn hold(&self, user: &UserId, hold_id: &RequestId) -> anyhow::Result<Option<StoredHold>> {
        let row = sqlx::query(
            "SELECT amount, state, captured, created_at, expires_at, closed_at, closed_by FROM holds
             WHERE hold_id = $1 AND user_id = $2",
        )
        .bind(hold_id.as_str())
        .bind(user.as_str())
        .fetch_optional(self.pool())
        .await
        .context("reading a hold")?;
        let Some(row) = row else {
            return Ok(None);
        };
        let money = |value: Decimal| Money::from_decimal(value).context("a stored hold amount is not valid");
        let state: String = row.try_get("state")?;
        let closed_by: Option<String> = row.try_get("closed_by")?;
        Ok(Some(StoredHold {
            hold_id: hold_id.clone(),
            amount: money(row.try_get("amount")?)?,
            state: HoldState::parse(&state).with_context(|| format!("a stored hold state {state:?} is not valid"))?,
            captured: row.try_get::<Option<Decimal>, _>("captured")?.map(money).transpose()?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            closed_at: row.try_get("closed_at")?,
            closed_by: closed_by
                .map(|id| RequestId::parse(&id).context("a stored closed_by is not a valid request id"))
                .transpose()?,
        }))
    }
}

/// [`Ledger::active_holds`] on any connection.
pub(super) async fn read_active_holds<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    user: &UserId,
    limit: i64,
) -> anyhow::Result<Vec<ActiveHold>> {
    let rows = sqlx::query(
        "SELECT hold_id, amount, expires_at FROM holds WHERE user_id = $1 AND state = 'active'
         ORDER BY expires_at, hold_id LIMIT $2",
    )
    .bind(user.as_str())
    .bind(limit)
    .fetch_all(executor)
    .await
    .context("reading active holds")?;
    rows.iter()
        .map(|row| {
            let hold_id: String = row.try_get("hold_id")?;
            let amount: Decimal = row.try_get("amount")?;
            Ok(ActiveHold {
                hold_id: RequestId::parse(&hold_id).context("a stored hold_id is not valid")?,
                amount: Money::from_decimal(amount).context("a stored hold amount is not valid")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .collect()
}
