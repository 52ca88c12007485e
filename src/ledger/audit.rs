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
        "every request has at most one ledger entry, and one exactly when approved",
        "SELECT count(*) FROM requests",
        "SELECT r.request_id || ' (' || r.status || ') has ' || count(l.entry_id) || ' ledger entries'
         FROM requests r LEFT JOIN ledger_entries l ON l.request_id = r.request_id
         GROUP BY r.request_id, r.status
         HAVING count(l.entry_id) > 1 OR (r.status = 'approved') <> (count(l.entry_id) = 1)
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
         WHERE l.delta <> CASE r.op WHEN 'deposit' THEN r.amount ELSE -r.amount END
         ORDER BY l.entry_id LIMIT 20",
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
