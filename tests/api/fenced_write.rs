//! The fenced write against the real PostgreSQL, interleaved by hand: another transaction
//! creates a user's wallet and holds it uncommitted while `Ledger::apply_batch` for the same
//! user starts, blocks on it and goes on once it commits. The batch must see the wallet that
//! was created meanwhile, whatever its fences say, and never write over it.

use std::time::Duration;

use chrono::Utc;
use sqlx::{Connection, PgConnection};
use walletq::domain::{Money, Op, RequestResult, Status, UserId, Wallet};
use walletq::ledger::{Ledger, LedgerError};

use crate::support::model::cents;
use crate::support::{CleanupOnDrop, drop_database, eventually, isolated_services, request};

/// Longest wait for the batch to block behind the open transaction.
const BLOCKED_WITHIN: Duration = Duration::from_secs(10);

/// A test database with the schema, and a second connection on it outside the ledger's pool.
async fn ledger_and_raw_connection() -> (Ledger, PgConnection, String) {
    let services = isolated_services();
    let ledger = Ledger::connect(&services.database_url, 2, None).await.expect("PostgreSQL must be reachable");
    let raw = PgConnection::connect(&services.database_url).await.expect("a raw connection");
    (ledger, raw, services.namespace)
}

/// Opens a transaction on `raw` that does what a fenced deposit of 100.00 into the new wallet
/// of `user` writes (fence row with `fence`, wallet, request with its result, ledger entry),
/// and leaves it uncommitted.
async fn begin_creating_wallet(raw: &mut PgConnection, user: &str, fence: Option<i64>) {
    let deposit = request("a-create", user, Op::Deposit, 10_000);
    let result = RequestResult::approved(&deposit, Wallet::with_balance(cents(10_000)), None, Utc::now());
    let result = serde_json::to_string(&result).expect("a result as JSON");
    sqlx::query("BEGIN").execute(&mut *raw).await.expect("BEGIN");
    if let Some(fence) = fence {
        sqlx::query("INSERT INTO user_fences (user_id, fence) VALUES ($1, $2)")
            .bind(user)
            .bind(fence)
            .execute(&mut *raw)
            .await
            .expect("fence row");
    }
    let statements = [
        "INSERT INTO wallets (user_id, balance) VALUES ($1, 100.00)",
        "INSERT INTO requests (request_id, user_id, op, amount, status, reason, result, processed_at)
         VALUES ('a-create', $1, 'deposit', 100.00, 'approved', NULL, $2::jsonb, now())",
        "INSERT INTO ledger_entries (request_id, user_id, delta, balance_after) VALUES ('a-create', $1, 100.00, 100.00)",
    ];
    for sql in statements {
        let query = sqlx::query(sql).bind(user);
        let query = if sql.contains("$2") { query.bind(&result) } else { query };
        query.execute(&mut *raw).await.expect("the creating transaction");
    }
}

/// Waits until some backend of this test's database waits for a lock.
async fn wait_until_blocked(ledger: &Ledger) {
    eventually("the batch waiting for the open transaction", BLOCKED_WITHIN, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(ledger.pool())
        .await
        .expect("pg_stat_activity");
        (waiting > 0).then_some(())
    })
    .await;
}

/// Runs one request of `user` through `apply_batch` with `fences` while a transaction that
/// creates the user's wallet with 100.00 is open, commits that transaction once the batch
/// waits for it, and returns the batch's outcome.
async fn apply_behind_wallet_creation(
    op: Op,
    cents: i64,
    creator_fence: Option<i64>,
    batch_fences: &[(UserId, i64)],
) -> (Result<Vec<RequestResult>, LedgerError>, Ledger, String) {
    let (ledger, mut raw, namespace) = ledger_and_raw_connection().await;
    begin_creating_wallet(&mut raw, "u", creator_fence).await;
    let batch = [request("b-next", "u", op, cents)];
    let fences = batch_fences.to_vec();
    let applying = tokio::spawn({
        let ledger = ledger.clone();
        async move { ledger.apply_batch(&batch, &fences).await }
    });
    wait_until_blocked(&ledger).await;
    sqlx::query("COMMIT").execute(&mut raw).await.expect("COMMIT the creating transaction");
    let outcome = applying.await.expect("the batch task");
    raw.close().await.expect("close the raw connection");
    (outcome, ledger, namespace)
}

async fn stored_balance(ledger: &Ledger) -> Money {
    let user = UserId::parse("u").expect("user id");
    ledger.wallet(&user).await.expect("read the wallet").expect("a wallet").balance
}

async fn assert_audit_clean(ledger: &Ledger) {
    let audit = walletq::ledger::audit::audit(ledger.pool()).await.expect("audit");
    assert!(audit.is_clean(), "audit: {:?}", audit.checks);
}

fn money(cents: i64) -> Money {
    Money::from_cents(cents).expect("money")
}

#[tokio::test]
async fn a_fenced_deposit_behind_a_wallet_created_meanwhile_adds_to_it() {
    let fences = [(UserId::parse("u").expect("user id"), 20)];
    let (outcome, ledger, namespace) = apply_behind_wallet_creation(Op::Deposit, 5_000, Some(10), &fences).await;
    let _database = CleanupOnDrop::database(&namespace);

    let results = outcome.expect("the newer fence is accepted");
    assert_eq!(results[0].status, Status::Approved, "{results:?}");
    assert_eq!(results[0].balance, Some(money(15_000)), "the deposit adds to the wallet created meanwhile");
    assert_eq!(stored_balance(&ledger).await, money(15_000), "no money destroyed");
    assert_audit_clean(&ledger).await;
    ledger.pool().close().await;
    drop_database(&namespace).await;
}

#[tokio::test]
async fn a_fenced_withdrawal_behind_a_wallet_created_meanwhile_debits_it() {
    let fences = [(UserId::parse("u").expect("user id"), 20)];
    let (outcome, ledger, namespace) = apply_behind_wallet_creation(Op::Withdraw, 3_000, Some(10), &fences).await;
    let _database = CleanupOnDrop::database(&namespace);

    let results = outcome.expect("the newer fence is accepted");
    assert_eq!(results[0].reason, None, "not no_wallet: the wallet exists in every serial order");
    assert_eq!(results[0].balance, Some(money(7_000)));
    assert_eq!(stored_balance(&ledger).await, money(7_000));
    assert_audit_clean(&ledger).await;
    ledger.pool().close().await;
    drop_database(&namespace).await;
}

#[tokio::test]
async fn an_unfenced_write_refuses_to_overwrite_a_wallet_created_meanwhile() {
    // No fence at all (a caller that bypassed the locks): nothing serialises the two
    // transactions before the wallet write, so the write itself must refuse.
    let (outcome, ledger, namespace) = apply_behind_wallet_creation(Op::Deposit, 5_000, None, &[]).await;
    let _database = CleanupOnDrop::database(&namespace);

    assert!(matches!(outcome, Err(LedgerError::WalletChanged { .. })), "{outcome:?}");
    assert_eq!(stored_balance(&ledger).await, money(10_000), "nothing written over the wallet");
    let results = ledger
        .apply_batch(&[request("b-next", "u", Op::Deposit, 5_000)], &[])
        .await
        .expect("the same batch again, now that the wallet is committed");
    assert_eq!(results[0].balance, Some(money(15_000)));
    assert_audit_clean(&ledger).await;
    ledger.pool().close().await;
    drop_database(&namespace).await;
}
