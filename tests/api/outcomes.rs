//! One outcome per request_id, whatever happens between two copies of a message: the
//! router's second forward, a crash before the ack, or a producer's resend.

use walletq::domain::{Money, Op, Reason, Status, UserId};
use walletq::ledger::Ledger;

use crate::support::{CleanupOnDrop, drop_database, isolated_services, request};

/// Defect 5 of issue 16: a deposit refused because the balance would pass its largest value
/// was not stored, so a copy of it applied after a withdrawal was approved (`replayed:
/// false`) while the producer had kept the refusal.
#[tokio::test]
async fn a_copy_of_a_deposit_refused_past_the_largest_balance_gets_the_same_refusal() {
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let ledger = Ledger::connect(&services.database_url, 2, None).await.expect("PostgreSQL must be reachable");
    // A wallet at the largest balance, with the ledger entry that explains it.
    sqlx::query(
        "WITH wallet AS (INSERT INTO wallets (user_id, balance) VALUES ('rich', 9999999999999999.99)),
              seed AS (
                  INSERT INTO requests (request_id, user_id, op, amount, status, reason, result, processed_at)
                  VALUES ('seed', 'rich', 'deposit', 9999999999999999.99, 'approved', NULL,
                          '{\"request_id\":\"seed\",\"user_id\":\"rich\",\"status\":\"approved\"}', now()))
         INSERT INTO ledger_entries (request_id, user_id, delta, balance_after)
         VALUES ('seed', 'rich', 9999999999999999.99, 9999999999999999.99)",
    )
    .execute(ledger.pool())
    .await
    .expect("a wallet at the largest balance");
    let rich = UserId::parse("rich").expect("user id");
    let deposit = [request("too-much", "rich", Op::Deposit, 100)];

    let first = ledger.apply_batch(&deposit, &[(rich.clone(), 1)]).await.expect("the deposit")[0].clone();
    assert_eq!((first.status, first.reason), (Status::Rejected, Some(Reason::InvalidRequest)));
    let withdrawal = [request("room", "rich", Op::Withdraw, 500)];
    let made_room = ledger.apply_batch(&withdrawal, &[(rich.clone(), 2)]).await.expect("the withdrawal");
    assert_eq!(made_room[0].status, Status::Approved);
    let copy = ledger.apply_batch(&deposit, &[(rich.clone(), 3)]).await.expect("the copy")[0].clone();

    assert!(copy.replayed, "{copy:?}");
    assert_eq!(copy, walletq::domain::RequestResult { replayed: true, ..first }, "one outcome per request_id");
    let wallet = ledger.wallet(&rich).await.expect("read").expect("a wallet");
    assert_eq!(wallet.balance, Money::parse("9999999999999994.99").expect("money"), "the copy moved nothing");
    let audit = walletq::ledger::audit::audit(ledger.pool()).await.expect("audit");
    assert!(audit.is_clean(), "audit: {:?}", audit.checks);
    ledger.pool().close().await;
    drop_database(&services.namespace).await;
}
