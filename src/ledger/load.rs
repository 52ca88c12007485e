//! The read of a batch: one statement for the wallets (locked), the known requests, the
//! holds the batch may touch, and the database's clock. Also one stored request, outside a
//! batch, for the gateway's repeated Idempotency-Keys.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Ledger, LedgerError};
use crate::domain::{
    Command, Hold, HoldState, LedgerState, Limits, Money, Op, Request, RequestId, RequestResult, StoredRequest, Usage,
    UserId, Wallet,
};

/// Every row kind in one result set: the columns each kind leaves unused are NULL.
///
/// The clock is `statement_timestamp()` of this statement, which starts after the fence
/// statement: if the fence waited for another batch of one of these users, this batch's
/// time is after that batch committed, so one user's batches get increasing times.
///
/// The limit usage of the window `(now − 24 h, now]` is the sum of the hour buckets that lie
/// wholly inside it and of the minute buckets from the minute in which it starts to the first
/// whole hour (see [`crate::domain::limits`]): at most 23 + 60 rows per user. Buckets start
/// on multiples of their span since the Unix epoch (`date_bin`, whatever the session's time
/// zone).
const LOAD_SQL: &str = "WITH locked AS (
         SELECT user_id, balance, held FROM wallets WHERE user_id = ANY($1) FOR UPDATE
     ), window_start AS (
         SELECT date_bin('1 minute', statement_timestamp() - interval '24 hours', timestamptz 'epoch') AS minute,
                date_bin('1 hour', statement_timestamp() - interval '24 hours', timestamptz 'epoch')
                    + interval '1 hour' AS hour
     )
     SELECT 'clock' AS kind, NULL::text AS user_id, NULL::text AS id, NULL::text AS op,
            NULL::numeric AS amount, NULL::numeric AS figure, NULL::text AS hold_id,
            NULL::integer AS timeout_s, statement_timestamp() AS at, NULL::timestamptz AS since,
            NULL::text AS note
     UNION ALL
     SELECT 'wallet', user_id, NULL, NULL, balance, held, NULL, NULL, NULL, NULL, NULL FROM locked
     UNION ALL
     SELECT 'known', user_id, request_id, op, amount, NULL, hold_id, timeout_s, NULL, NULL, result::text
     FROM requests WHERE request_id = ANY($2)
     UNION ALL
     SELECT 'hold', user_id, hold_id, state, amount, captured, NULL, NULL, expires_at, created_at, reply_to
     FROM holds WHERE hold_id = ANY($3)
     UNION ALL
     SELECT 'hold', user_id, hold_id, state, amount, captured, NULL, NULL, expires_at, created_at, reply_to
     FROM holds WHERE user_id = ANY($1) AND state = 'active' AND expires_at <= statement_timestamp()
     UNION ALL
     SELECT 'limits', user_id, NULL, NULL, per_withdrawal, daily_amount, NULL, daily_count, NULL, NULL, NULL
     FROM wallet_limits WHERE user_id = ANY($1)
     UNION ALL
     SELECT 'usage', u.user_id, NULL, NULL, sum(u.amount), sum(u.count), NULL, NULL, NULL,
            min(u.bucket_start) FILTER (WHERE u.amount > 0 OR u.count > 0), NULL
     FROM limit_usage u, window_start w
     WHERE u.user_id = ANY($1)
       AND ((u.span_s = 3600 AND u.bucket_start >= w.hour)
            OR (u.span_s = 60 AND u.bucket_start >= w.minute AND u.bucket_start < w.hour))
     GROUP BY u.user_id";

/// Locks and reads what the batch needs, in one statement; returns it with the batch's time.
pub(super) async fn load(
    tx: &mut sqlx::PgConnection,
    requests: &[Request],
    users: &[String],
    default_limits: Limits,
) -> Result<(LedgerState, DateTime<Utc>), LedgerError> {
    let ids: Vec<&str> = requests.iter().map(|r| r.request_id.as_str()).collect();
    let named: Vec<&str> = requests.iter().filter_map(|r| r.command.hold_id()).map(RequestId::as_str).collect();
    let rows = sqlx::query(LOAD_SQL).bind(users).bind(&ids).bind(&named).fetch_all(&mut *tx).await?;

    let mut state = LedgerState::default();
    let mut now = None;
    for row in rows {
        let kind: String = row.try_get("kind")?;
        match kind.as_str() {
            "clock" => now = Some(row.try_get::<DateTime<Utc>, _>("at")?),
            "wallet" => {
                let user = user_of(&row)?;
                let wallet = Wallet { balance: money(&row, "amount")?, held: money(&row, "figure")? };
                if wallet.held > wallet.balance {
                    return Err(LedgerError::Corrupt(format!("{user} holds {} of {}", wallet.held, wallet.balance)));
                }
                state.wallets.insert(user, wallet);
            }
            "known" => {
                let stored = decode_stored(&row)?;
                state.known.insert(stored.request.request_id.clone(), stored);
            }
            "limits" => {
                let own = decode_limits(&row)?;
                state.limits.insert(user_of(&row)?, own);
            }
            "usage" => {
                let usage = decode_usage(&row)?;
                state.usage.insert(user_of(&row)?, usage);
            }
            _ => {
                let hold = decode_hold(&row)?;
                state.holds.insert(hold.hold_id.clone(), hold);
            }
        }
    }
    let now = now.ok_or_else(|| LedgerError::Corrupt("the batch read returned no clock".into()))?;
    for user in users {
        let user = UserId::parse(user).ok_or_else(|| corrupt("user_id"))?;
        let own = state.limits.get(&user).copied().unwrap_or_default();
        let in_force = own.or(default_limits);
        if in_force.is_none() {
            state.limits.remove(&user);
        } else {
            state.limits.insert(user, in_force);
        }
    }
    Ok((state, now))
}

fn corrupt(what: &str) -> LedgerError {
    LedgerError::Corrupt(format!("stored {what} is not valid"))
}

fn user_of(row: &PgRow) -> Result<UserId, LedgerError> {
    let user: String = row.try_get("user_id")?;
    UserId::parse(&user).ok_or_else(|| corrupt("user_id"))
}

fn money(row: &PgRow, column: &str) -> Result<Money, LedgerError> {
    let value: Decimal = row.try_get(column)?;
    Money::from_decimal(value).ok_or_else(|| corrupt(column))
}

fn optional_money(row: &PgRow, column: &str) -> Result<Option<Money>, LedgerError> {
    let value: Option<Decimal> = row.try_get(column)?;
    value.map(|value| Money::from_decimal(value).ok_or_else(|| corrupt(column))).transpose()
}

impl Ledger {
    /// The request `request_id` as first stored, with its result, if it was processed: what
    /// a batch compares a repeated id with ([`Request::same_body`]).
    pub async fn stored_request(&self, request_id: &RequestId) -> anyhow::Result<Option<StoredRequest>> {
        let row = sqlx::query(
            "SELECT user_id, request_id AS id, op, amount, hold_id, timeout_s, result::text AS note
             FROM requests WHERE request_id = $1",
        )
        .bind(request_id.as_str())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(decode_stored).transpose()?)
    }
}

/// A stored request, rebuilt from its columns, with its stored result.
fn decode_stored(row: &PgRow) -> Result<StoredRequest, LedgerError> {
    let request_id: String = row.try_get("id")?;
    let op: String = row.try_get("op")?;
    let amount = optional_money(row, "amount")?;
    let hold_id: Option<String> = row.try_get("hold_id")?;
    let hold_id = hold_id.map(|id| RequestId::parse(&id).ok_or_else(|| corrupt("hold_id"))).transpose()?;
    let timeout_s: Option<i32> = row.try_get("timeout_s")?;
    let timeout_s = timeout_s.map(|s| u32::try_from(s).map_err(|_| corrupt("timeout_s"))).transpose()?;
    let command = match (Op::parse(&op), amount, hold_id, timeout_s) {
        (Some(Op::Withdraw), Some(amount), None, None) => Command::Withdraw { amount },
        (Some(Op::Deposit), Some(amount), None, None) => Command::Deposit { amount },
        (Some(Op::Hold), Some(amount), None, Some(timeout_s)) => Command::Hold { amount, timeout_s },
        (Some(Op::Capture), amount, Some(hold_id), None) => Command::Capture { hold_id, amount },
        (Some(Op::Release), None, Some(hold_id), None) => Command::Release { hold_id },
        _ => return Err(corrupt("request fields")),
    };
    let request_id = RequestId::parse(&request_id).ok_or_else(|| corrupt("request_id"))?;
    let request = Request::new(request_id, user_of(row)?, command);
    let result: String = row.try_get("note")?;
    let result: RequestResult =
        serde_json::from_str(&result).map_err(|e| LedgerError::Corrupt(format!("stored result: {e}")))?;
    Ok(StoredRequest { request, result: result.with_hold_figures() })
}

fn decode_hold(row: &PgRow) -> Result<Hold, LedgerError> {
    let hold_id: String = row.try_get("id")?;
    let state: String = row.try_get("op")?;
    Ok(Hold {
        hold_id: RequestId::parse(&hold_id).ok_or_else(|| corrupt("hold_id"))?,
        user_id: user_of(row)?,
        amount: money(row, "amount")?,
        state: HoldState::parse(&state).ok_or_else(|| corrupt("hold state"))?,
        captured: optional_money(row, "figure")?,
        expires_at: row.try_get("at")?,
        placed_at: row.try_get("since")?,
        reply_to: row.try_get("note")?,
    })
}

/// A user's own limits (per withdrawal in `amount`, daily amount in `figure`, daily count
/// in `timeout_s`).
fn decode_limits(row: &PgRow) -> Result<Limits, LedgerError> {
    let daily_count: Option<i32> = row.try_get("timeout_s")?;
    Ok(Limits {
        per_withdrawal: optional_money(row, "amount")?,
        daily_amount: optional_money(row, "figure")?,
        daily_count: daily_count.map(|n| u32::try_from(n).map_err(|_| corrupt("daily_count"))).transpose()?,
    })
}

/// A user's usage in the window (amount in `amount`, count in `figure`, oldest bucket in
/// `since`). Give-backs of usage recorded before it was tracked could take a sum below 0:
/// it counts as 0.
fn decode_usage(row: &PgRow) -> Result<Usage, LedgerError> {
    let amount: Option<Decimal> = row.try_get("amount")?;
    let count: Option<Decimal> = row.try_get("figure")?;
    let cents = amount.unwrap_or_default() * Decimal::ONE_HUNDRED;
    let count = count.unwrap_or_default();
    Ok(Usage {
        amount_cents: i64::try_from(cents.trunc()).map_err(|_| corrupt("usage amount"))?.max(0),
        count: i64::try_from(count.trunc()).map_err(|_| corrupt("usage count"))?.max(0),
        oldest: row.try_get("since")?,
    })
}
