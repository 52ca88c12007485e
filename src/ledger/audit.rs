//! `walletq audit`: the ledger's invariants, checked in SQL over the whole database.

use anyhow::Context;
use serde::Serialize;
use sqlx::{PgPool, Row};

/// One invariant: what it checks, how many rows it looked at, and the rows that break it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The invariant checked, in words.
    pub name: &'static str,
    /// How many rows the check looked at.
    pub checked: i64,
    /// The offending rows, described; empty when the invariant holds.
    pub violations: Vec<String>,
}

/// The audit's findings.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Every check, in a fixed order.
    pub checks: Vec<Check>,
}

impl AuditReport {
    /// True when every invariant holds.
    pub fn is_clean(&self) -> bool {
        self.checks.iter().all(|c| c.violations.is_empty())
    }
}

/// (name, count of rows checked, query returning one text column per offending row, at
/// most 20 rows each)
const CHECKS: &[(&str, &str, &str)] = &[
    (
        "no negative balance",
        "SELECT count(*) FROM wallets",
        "SELECT user_id || ' has balance ' || balance FROM wallets WHERE balance < 0 ORDER BY user_id LIMIT 20",
    ),
    (
        "every balance equals the sum of its ledger entries",
        "SELECT count(*) FROM wallets",
        "SELECT w.user_id || ': balance ' || w.balance || ', ledger sum ' || coalesce(sum(l.delta), 0)
         FROM wallets w LEFT JOIN ledger_entries l ON l.user_id = w.user_id
         GROUP BY w.user_id, w.balance HAVING w.balance <> coalesce(sum(l.delta), 0)
         ORDER BY w.user_id LIMIT 20",
    ),
    (
        "every ledger entry's balance_after is the running sum of its user's entries",
        "SELECT count(*) FROM ledger_entries",
        "SELECT 'entry ' || entry_id || ' of ' || user_id || ': balance_after ' || balance_after || ', running sum ' || running
         FROM (SELECT entry_id, user_id, balance_after,
                      sum(delta) OVER (PARTITION BY user_id ORDER BY entry_id) AS running
               FROM ledger_entries) AS chain
         WHERE running <> balance_after ORDER BY entry_id LIMIT 20",
    ),
    (
        "every applied request has exactly one stored result that matches it",
        "SELECT count(*) FROM requests",
        "SELECT request_id || ': stored result names ' || coalesce(result->>'request_id', 'nothing') || ' / ' || coalesce(result->>'status', 'no status')
         FROM requests
         WHERE result->>'request_id' IS DISTINCT FROM request_id OR result->>'status' IS DISTINCT FROM status
            OR result->>'user_id' IS DISTINCT FROM user_id
         ORDER BY request_id LIMIT 20",
    ),
    (
        "every request has at most one ledger entry, and one exactly when an approved withdrawal, deposit or capture",
        "SELECT count(*) FROM requests",
        "SELECT r.request_id || ' (' || r.status || ') has ' || count(l.entry_id) || ' ledger entries'
         FROM requests r LEFT JOIN ledger_entries l ON l.request_id = r.request_id
         GROUP BY r.request_id, r.status
         HAVING count(l.entry_id) > 1
             OR (r.status = 'approved' AND r.op IN ('withdraw', 'deposit', 'capture')) <> (count(l.entry_id) = 1)
         ORDER BY r.request_id LIMIT 20",
    ),
    (
        "no ledger entry without a request",
        "SELECT count(*) FROM ledger_entries",
        "SELECT 'entry ' || l.entry_id || ' names unknown request ' || l.request_id
         FROM ledger_entries l LEFT JOIN requests r ON r.request_id = l.request_id
         WHERE r.request_id IS NULL ORDER BY l.entry_id LIMIT 20",
    ),
    (
        "every ledger entry moves the request's amount in the request's direction",
        "SELECT count(*) FROM ledger_entries",
        "SELECT 'entry ' || l.entry_id || ': delta ' || l.delta || ' for ' || r.op || ' of ' || r.amount
         FROM ledger_entries l JOIN requests r ON r.request_id = l.request_id
         LEFT JOIN holds h ON r.op = 'capture' AND h.hold_id = r.hold_id
         WHERE l.delta IS DISTINCT FROM CASE r.op WHEN 'deposit' THEN r.amount WHEN 'capture' THEN -coalesce(r.amount, h.amount)
                                                   ELSE -r.amount END
         ORDER BY l.entry_id LIMIT 20",
    ),
    (
        "every wallet's held equals the sum of its active holds, and available is never negative",
        "SELECT count(*) FROM wallets",
        "SELECT w.user_id || ': held ' || w.held || ', active holds ' || coalesce(sum(h.amount), 0) || ', balance ' || w.balance
         FROM wallets w LEFT JOIN holds h ON h.user_id = w.user_id AND h.state = 'active'
         GROUP BY w.user_id, w.held, w.balance
         HAVING w.held <> coalesce(sum(h.amount), 0) OR w.held < 0
             -- a negative balance is the first check's finding, not counted twice here
             OR (w.held > w.balance AND w.balance >= 0)
         ORDER BY w.user_id LIMIT 20",
    ),
    (
        "every approved hold has one hold, and a hold is closed at most once, by its own user's approved capture or release",
        "SELECT count(*) FROM holds",
        "SELECT 'hold ' || r.request_id || ' approved but not stored' FROM requests r
         WHERE r.op = 'hold' AND r.status = 'approved' AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.hold_id = r.request_id)
         UNION ALL
         SELECT 'hold ' || h.hold_id || ' (' || h.state || ') closed by ' || coalesce(h.closed_by, 'nothing')
         FROM holds h LEFT JOIN requests c ON c.request_id = h.closed_by
         WHERE (h.state IN ('captured', 'released')) <> (c.request_id IS NOT NULL)
            OR c.status <> 'approved' OR c.user_id <> h.user_id OR c.hold_id <> h.hold_id
            OR (h.state = 'captured') <> (c.op IS NOT DISTINCT FROM 'capture')
            OR (h.state = 'released') <> (c.op IS NOT DISTINCT FROM 'release')
         UNION ALL
         SELECT r.op || ' ' || r.request_id || ' approved but closed no hold' FROM requests r
         WHERE r.op IN ('capture', 'release') AND r.status = 'approved'
           AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.closed_by = r.request_id)
         LIMIT 20",
    ),
    (
        "a capture takes at most its hold, and writes one ledger entry of what it took",
        "SELECT count(*) FROM holds WHERE state = 'captured'",
        "SELECT 'hold ' || h.hold_id || ': captured ' || coalesce(h.captured::text, 'nothing') || ' of ' || h.amount
                || ', ledger ' || coalesce((-l.delta)::text, 'no entry')
         FROM holds h LEFT JOIN ledger_entries l ON l.request_id = h.closed_by
         WHERE h.state = 'captured' AND (h.captured IS NULL OR h.captured > h.amount OR l.delta IS DISTINCT FROM -h.captured)
         ORDER BY h.hold_id LIMIT 20",
    ),
    (
        "no withdrawal or hold broke the limits in force when it was applied, over any 24 hours",
        "SELECT count(*) FROM requests WHERE limits IS NOT NULL",
        // For each approved withdrawal or hold stored with its limits, the exact window
        // (t - 24 h, t] ending at its time t: what left the wallet (withdrawals and holds)
        // minus what holds closed by t gave back. The batch counts the window's first
        // minute whole, so it never allows more than this.
        "WITH limited AS (
             SELECT request_id, user_id, processed_at AS t, amount, limits FROM requests
             WHERE limits IS NOT NULL AND status = 'approved' AND op IN ('withdraw', 'hold')
         ), used AS (
             SELECT l.*,
                    (SELECT coalesce(sum(r.amount), 0) FROM requests r
                     WHERE r.user_id = l.user_id AND r.status = 'approved' AND r.op IN ('withdraw', 'hold')
                       AND r.processed_at > l.t - interval '24 hours' AND r.processed_at <= l.t)
                  - (SELECT coalesce(sum(CASE h.state WHEN 'captured' THEN h.amount - h.captured ELSE h.amount END), 0)
                     FROM holds h
                     WHERE h.user_id = l.user_id AND h.state <> 'active'
                       AND h.created_at > l.t - interval '24 hours' AND h.closed_at <= l.t) AS amount_used,
                    (SELECT count(*) FROM requests r
                     WHERE r.user_id = l.user_id AND r.status = 'approved' AND r.op IN ('withdraw', 'hold')
                       AND r.processed_at > l.t - interval '24 hours' AND r.processed_at <= l.t)
                  - (SELECT count(*) FROM holds h
                     WHERE h.user_id = l.user_id AND h.state IN ('released', 'expired')
                       AND h.created_at > l.t - interval '24 hours' AND h.closed_at <= l.t) AS count_used
             FROM limited l
         )
         SELECT request_id || ' of ' || user_id || ': ' || amount || ' asked, ' || amount_used || ' and '
                || count_used || ' used in 24 h, limits ' || limits::text
         FROM used
         WHERE amount > (limits->>'per_withdrawal')::numeric
            OR amount_used > (limits->>'daily_amount')::numeric
            OR count_used > (limits->>'daily_count')::bigint
         ORDER BY t, request_id LIMIT 20",
    ),
];

/// Runs every check in one read-only, repeatable-read snapshot.
pub async fn audit(pool: &PgPool) -> anyhow::Result<AuditReport> {
    let mut tx = pool.begin().await.context("starting the audit transaction")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .context("taking a consistent snapshot")?;
    let mut checks = Vec::with_capacity(CHECKS.len());
    for (name, count_sql, violations_sql) in CHECKS {
        let checked: i64 =
            sqlx::query_scalar(*count_sql).fetch_one(&mut *tx).await.with_context(|| format!("counting for {name}"))?;
        let rows =
            sqlx::query(*violations_sql).fetch_all(&mut *tx).await.with_context(|| format!("checking {name}"))?;
        let violations = rows.iter().map(|row| row.try_get::<String, _>(0)).collect::<Result<Vec<_>, _>>()?;
        checks.push(Check { name, checked, violations });
    }
    tx.rollback().await.context("ending the audit transaction")?;
    Ok(AuditReport { checks })
}
