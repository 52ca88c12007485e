//! The write of a batch: one statement for the whole plan.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::LedgerError;
use crate::domain::partitioning::user_hash;
use crate::domain::{BatchPlan, Command, HoldState, UserId, Wallet};

/// The write of [`write_plan`]: one round trip for the whole plan. The data-modifying CTEs
/// all run, and the foreign keys between them are checked at the end of the statement. The
/// wallet writes never overwrite blindly: `updated` matches only the figures read,
/// `created` only a wallet that is still missing, `closed` only a hold still active; the
/// statement returns how many of them matched.
const WRITE_PLAN_SQL: &str = "WITH balances AS (
         SELECT * FROM unnest($1::text[], $2::numeric[], $19::numeric[], $20::numeric[], $21::numeric[])
                  AS b(user_id, balance, read, held, read_held)
     ), updated AS (
         UPDATE wallets w SET balance = b.balance, held = b.held, updated_at = now()
         FROM balances b
         WHERE w.user_id = b.user_id AND b.read IS NOT NULL AND w.balance = b.read AND w.held = b.read_held
         RETURNING w.user_id
     ), created AS (
         INSERT INTO wallets (user_id, balance, held)
         SELECT user_id, balance, held FROM balances WHERE read IS NULL
         ON CONFLICT (user_id) DO NOTHING
         RETURNING user_id
     ), stored AS (
         INSERT INTO requests (request_id, user_id, op, amount, status, reason, result, processed_at, hold_id, timeout_s,
                               limits)
         SELECT r.id, r.user_id, r.op, r.amount, r.status, r.reason, r.result::jsonb, $10, r.hold_id, r.timeout_s,
                r.limits::jsonb
         FROM unnest($3::text[], $4::text[], $5::text[], $6::numeric[], $7::text[], $8::text[], $9::text[],
                     $22::text[], $23::integer[], $38::text[])
              AS r(id, user_id, op, amount, status, reason, result, hold_id, timeout_s, limits)
     ), entries AS (
         INSERT INTO ledger_entries (request_id, user_id, delta, balance_after)
         SELECT * FROM unnest($11::text[], $12::text[], $13::numeric[], $14::numeric[])
     ), granted AS (
         INSERT INTO coupons (code, user_id, kind, request_id)
         SELECT * FROM unnest($15::text[], $16::text[], $17::text[], $18::text[])
     ), placed AS (
         INSERT INTO holds (hold_id, user_id, user_hash, amount, state, captured, expires_at, created_at,
                            closed_at, closed_by, reply_to)
         SELECT h.id, h.user_id, h.user_hash, h.amount, h.state, h.captured, h.expires_at, $10,
                CASE WHEN h.state = 'active' THEN NULL ELSE $10 END, h.closed_by, h.reply_to
         FROM unnest($24::text[], $25::text[], $26::numeric[], $27::text[], $28::numeric[],
                     $29::timestamptz[], $30::text[], $31::text[], $37::bigint[])
              AS h(id, user_id, amount, state, captured, expires_at, closed_by, reply_to, user_hash)
     ), closed AS (
         UPDATE holds SET state = c.state, captured = c.captured, closed_at = $10, closed_by = c.closed_by,
                          expiry_result = c.expiry::jsonb
         FROM unnest($32::text[], $33::text[], $34::numeric[], $35::text[], $36::text[])
              AS c(id, state, captured, closed_by, expiry)
         WHERE holds.hold_id = c.id AND holds.state = 'active'
         RETURNING holds.hold_id
     ), used AS (
         INSERT INTO limit_usage (user_id, span_s, bucket_start, amount, count)
         SELECT u.user_id, s.span_s, date_bin(make_interval(secs => s.span_s), u.at, timestamptz 'epoch'),
                sum(u.amount), sum(u.count)
         FROM unnest($39::text[], $40::timestamptz[], $41::numeric[], $42::integer[]) AS u(user_id, at, amount, count)
              CROSS JOIN (VALUES (60), (3600)) AS s(span_s)
         GROUP BY 1, 2, 3
         ON CONFLICT (user_id, span_s, bucket_start) DO UPDATE
         SET amount = limit_usage.amount + EXCLUDED.amount, count = limit_usage.count + EXCLUDED.count
     )
     SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM created) + (SELECT count(*) FROM closed)";

/// The wallet columns of a plan: final figures, and the figures read (`None`: no wallet).
struct WalletColumns<'a> {
    users: Vec<&'a str>,
    balances: Vec<Decimal>,
    held: Vec<Decimal>,
    read: Vec<Option<Decimal>>,
    read_held: Vec<Option<Decimal>>,
}

impl<'a> WalletColumns<'a> {
    fn of(wallets: &'a [(UserId, Wallet)], read: &HashMap<UserId, Wallet>) -> Self {
        WalletColumns {
            users: wallets.iter().map(|(u, _)| u.as_str()).collect(),
            balances: wallets.iter().map(|(_, w)| w.balance.as_decimal()).collect(),
            held: wallets.iter().map(|(_, w)| w.held.as_decimal()).collect(),
            read: wallets.iter().map(|(u, _)| read.get(u).map(|w| w.balance.as_decimal())).collect(),
            read_held: wallets.iter().map(|(u, _)| read.get(u).map(|w| w.held.as_decimal())).collect(),
        }
    }
}

/// The hold columns: holds placed (inserted in their final state) and holds closed.
#[derive(Default)]
struct HoldColumns<'a> {
    ids: Vec<&'a str>,
    users: Vec<&'a str>,
    /// The users' partition hashes, the u64's bits as an i64.
    hashes: Vec<i64>,
    amounts: Vec<Decimal>,
    states: Vec<&'static str>,
    captured: Vec<Option<Decimal>>,
    expires_at: Vec<DateTime<Utc>>,
    closed_by: Vec<Option<&'a str>>,
    reply_to: Vec<Option<&'a str>>,
    expiries: Vec<Option<String>>,
}

impl<'a> HoldColumns<'a> {
    /// The placed holds' columns, then the closed holds'.
    fn of(plan: &'a BatchPlan) -> Result<(Self, Self), LedgerError> {
        let (mut placed, mut closed) = (HoldColumns::default(), HoldColumns::default());
        for write in &plan.holds {
            let columns = if write.placed { &mut placed } else { &mut closed };
            debug_assert!(write.placed || write.hold.state != HoldState::Active, "only a closed hold is updated");
            columns.ids.push(write.hold.hold_id.as_str());
            columns.users.push(write.hold.user_id.as_str());
            columns.hashes.push(i64::from_ne_bytes(user_hash(write.hold.user_id.as_str()).to_ne_bytes()));
            columns.amounts.push(write.hold.amount.as_decimal());
            columns.states.push(write.hold.state.as_str());
            columns.captured.push(write.hold.captured.map(|c| c.as_decimal()));
            columns.expires_at.push(write.hold.expires_at);
            columns.closed_by.push(write.closed_by.as_ref().map(|id| id.as_str()));
            columns.reply_to.push(write.hold.reply_to.as_deref());
            let expiry = write.expiry.as_ref().map(serde_json::to_string).transpose();
            columns.expiries.push(expiry.map_err(|e| LedgerError::Corrupt(format!("encoding a result: {e}")))?);
        }
        Ok((placed, closed))
    }
}

/// The request columns that need encoding: results and limits as JSON, hold timeouts.
struct Encoded {
    results: Vec<String>,
    limits: Vec<Option<String>>,
    timeouts: Vec<Option<i32>>,
}

impl Encoded {
    fn of(plan: &BatchPlan) -> Result<Self, LedgerError> {
        let new = &plan.new_requests;
        let results: Result<Vec<String>, _> = new.iter().map(|n| serde_json::to_string(&n.result)).collect();
        let limits: Result<Vec<Option<String>>, _> =
            new.iter().map(|n| n.limits.as_ref().map(serde_json::to_string).transpose()).collect();
        let timeouts = new
            .iter()
            .map(|n| match n.request.command {
                Command::Hold { timeout_s, .. } => i32::try_from(timeout_s).ok(),
                _ => None,
            })
            .collect();
        let encoding = |e: serde_json::Error| LedgerError::Corrupt(format!("encoding a result or limits: {e}"));
        Ok(Encoded { results: results.map_err(encoding)?, limits: limits.map_err(encoding)?, timeouts })
    }
}

/// Writes a plan in one statement. `read` holds the wallets the plan started from: a wallet
/// is updated only while it still holds those figures, and created only if it still does
/// not exist; a hold is closed only while still active. When any of them fails its test
/// nothing is written ([`LedgerError::WalletChanged`]).
pub(super) async fn write_plan(
    tx: &mut sqlx::PgConnection,
    plan: &BatchPlan,
    read: &HashMap<UserId, Wallet>,
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    if plan.is_empty() {
        return Ok(());
    }
    let new = &plan.new_requests;
    let wallets = WalletColumns::of(&plan.wallets, read);
    let (placed, closed) = HoldColumns::of(plan)?;
    let encoded = Encoded::of(plan)?;
    let entries: Vec<_> = new.iter().filter_map(|n| n.entry.map(|e| (n, e))).collect();
    let coupons: Vec<_> = new.iter().filter_map(|n| n.result.coupon.as_ref().map(|c| (n, c))).collect();

    let written: i64 = sqlx::query_scalar(WRITE_PLAN_SQL)
        .bind(&wallets.users)
        .bind(&wallets.balances)
        .bind(new.iter().map(|n| n.request.request_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|n| n.request.user_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|n| n.request.op().as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|n| n.request.amount().map(|a| a.as_decimal())).collect::<Vec<_>>())
        .bind(new.iter().map(|n| n.result.status.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|n| n.result.reason.map(|r| r.as_str())).collect::<Vec<_>>())
        .bind(&encoded.results)
        .bind(now)
        .bind(entries.iter().map(|(n, _)| n.request.request_id.as_str()).collect::<Vec<_>>())
        .bind(entries.iter().map(|(n, _)| n.request.user_id.as_str()).collect::<Vec<_>>())
        .bind(entries.iter().map(|(_, e)| Decimal::new(e.delta_cents, 2)).collect::<Vec<_>>())
        .bind(entries.iter().map(|(_, e)| e.balance_after.as_decimal()).collect::<Vec<_>>())
        .bind(coupons.iter().map(|(_, c)| c.code.as_str()).collect::<Vec<_>>())
        .bind(coupons.iter().map(|(n, _)| n.request.user_id.as_str()).collect::<Vec<_>>())
        .bind(coupons.iter().map(|(_, c)| c.kind.as_str()).collect::<Vec<_>>())
        .bind(coupons.iter().map(|(n, _)| n.request.request_id.as_str()).collect::<Vec<_>>())
        .bind(&wallets.read)
        .bind(&wallets.held)
        .bind(&wallets.read_held)
        .bind(new.iter().map(|n| n.request.command.hold_id().map(|id| id.as_str())).collect::<Vec<_>>())
        .bind(&encoded.timeouts)
        .bind(&placed.ids)
        .bind(&placed.users)
        .bind(&placed.amounts)
        .bind(&placed.states)
        .bind(&placed.captured)
        .bind(&placed.expires_at)
        .bind(&placed.closed_by)
        .bind(&placed.reply_to)
        .bind(&closed.ids)
        .bind(&closed.states)
        .bind(&closed.captured)
        .bind(&closed.closed_by)
        .bind(&closed.expiries)
        .bind(&placed.hashes)
        .bind(&encoded.limits)
        .bind(plan.usage.iter().map(|u| u.user_id.as_str()).collect::<Vec<_>>())
        .bind(plan.usage.iter().map(|u| u.at).collect::<Vec<_>>())
        .bind(plan.usage.iter().map(|u| Decimal::new(u.amount_cents, 2)).collect::<Vec<_>>())
        .bind(plan.usage.iter().map(|u| i32::try_from(u.count).unwrap_or(0)).collect::<Vec<_>>())
        .fetch_one(&mut *tx)
        .await?;
    let expected = wallets.users.len() + closed.ids.len();
    if written != expected as i64 {
        return Err(LedgerError::WalletChanged { expected, written });
    }
    Ok(())
}
