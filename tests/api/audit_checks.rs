//! `walletq audit` can fail: for each of its checks, a fresh database with a consistent ledger
//! is corrupted (as superuser, with the append-only trigger and the foreign keys switched off
//! by `session_replication_role = replica`, and the `CHECK`s dropped where the data needs it)
//! in exactly the way that check guards against, and exactly that check must report it.

use walletq::domain::{Command, Op, RequestId, Status, UserId};
use walletq::ledger::Ledger;
use walletq::ledger::audit::audit;

use crate::support::model::{cents, command};
use crate::support::{CleanupOnDrop, drop_database, isolated_services, request};

fn id(text: &str) -> RequestId {
    RequestId::parse(text).expect("request id")
}

/// (the check that must fail, the statements that corrupt the ledger for it)
const CASES: &[(&str, &[&str])] = &[
    (
        "no negative balance",
        // A withdrawal from nothing, recorded consistently everywhere but in the sign.
        &[
            "ALTER TABLE wallets DROP CONSTRAINT wallets_balance_check",
            "ALTER TABLE wallets DROP CONSTRAINT wallets_held_check",
            "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_balance_after_check",
            "INSERT INTO wallets (user_id, balance) VALUES ('neg', -5.00)",
            "INSERT INTO requests (request_id, user_id, op, amount, status, reason, result, processed_at)
             VALUES ('n1', 'neg', 'withdraw', 5.00, 'approved', NULL,
                     '{\"request_id\":\"n1\",\"user_id\":\"neg\",\"status\":\"approved\"}', now())",
            "INSERT INTO ledger_entries (request_id, user_id, delta, balance_after) VALUES ('n1', 'neg', -5.00, -5.00)",
        ],
    ),
    (
        "every balance equals the sum of its ledger entries",
        &["UPDATE wallets SET balance = balance + 1 WHERE user_id = 'bob'"],
    ),
    (
        "every ledger entry's balance_after is the running sum of its user's entries",
        &["UPDATE ledger_entries SET balance_after = balance_after + 1 WHERE request_id = 'a-withdraw'"],
    ),
    (
        "every applied request has exactly one stored result that matches it",
        &["UPDATE requests SET result = jsonb_set(result, '{status}', '\"rejected\"') WHERE request_id = 'a-deposit'"],
    ),
    (
        "every request has at most one ledger entry, and one exactly when an approved withdrawal, deposit or capture",
        // Rejected in both the column and the result, yet its ledger entry stays.
        &["UPDATE requests SET status = 'rejected', result = jsonb_set(result, '{status}', '\"rejected\"')
           WHERE request_id = 'a-withdraw'"],
    ),
    ("no ledger entry without a request", &["DELETE FROM requests WHERE request_id = 'a-withdraw'"]),
    (
        "every ledger entry moves the request's amount in the request's direction",
        &["UPDATE requests SET amount = amount + 1 WHERE request_id = 'a-withdraw'"],
    ),
    (
        "every wallet's held equals the sum of its active holds, and available is never negative",
        &["UPDATE wallets SET held = held + 1 WHERE user_id = 'alice'"],
    ),
    (
        "every approved hold has one hold, and a hold is closed at most once, by its own user's approved capture or release",
        // A released hold forgotten: its approval and its release now point at nothing.
        &["DELETE FROM holds WHERE hold_id = 'b-hold'"],
    ),
    (
        "a capture takes at most its hold, and writes one ledger entry of what it took",
        &["UPDATE holds SET captured = captured - 1 WHERE hold_id = 'a-hold'"],
    ),
    (
        "no withdrawal or hold broke the limits in force when it was applied, over any 24 hours",
        // The withdrawal of 30.00 stored as if a per-withdrawal limit of 1.00 had been in force.
        &["UPDATE requests SET limits = '{\"per_withdrawal\":\"1.00\",\"daily_amount\":null,\"daily_count\":null}'
           WHERE request_id = 'a-withdraw'"],
    ),
];

/// A fresh database holding approvals, a rejection and a coupon for two users.
async fn consistent_ledger() -> (Ledger, String) {
    let services = isolated_services();
    let ledger = Ledger::connect(&services.database_url, 1, None).await.expect("PostgreSQL must be reachable");
    let batch = [
        request("a-deposit", "alice", Op::Deposit, 20_000),
        request("a-withdraw", "alice", Op::Withdraw, 3_000),
        request("a-too-much", "alice", Op::Withdraw, 100_000),
        request("b-deposit", "bob", Op::Deposit, 5_000),
        request("a-hold", "alice", Op::Hold, 2_000),
        command("a-capture", "alice", Command::Capture { hold_id: id("a-hold"), amount: Some(cents(1_500)) }),
        request("a-hold-open", "alice", Op::Hold, 1_000),
        request("b-hold", "bob", Op::Hold, 500),
        command("b-release", "bob", Command::Release { hold_id: id("b-hold") }),
    ];
    let fences = [(UserId::parse("alice").expect("user id"), 1), (UserId::parse("bob").expect("user id"), 1)];
    let results = ledger.apply_batch(&batch, &fences).await.expect("the seed batch");
    let statuses: Vec<Status> = results.iter().map(|r| r.status).collect();
    assert_eq!(statuses[..4], [Status::Approved, Status::Approved, Status::Rejected, Status::Approved]);
    assert!(statuses[4..].iter().all(|s| *s == Status::Approved), "{results:?}");
    (ledger, services.namespace)
}

async fn failing_checks(ledger: &Ledger) -> Vec<&'static str> {
    let report = audit(ledger.pool()).await.expect("audit");
    report.checks.iter().filter(|check| !check.violations.is_empty()).map(|check| check.name).collect()
}

#[tokio::test]
async fn each_audit_check_reports_exactly_the_corruption_it_guards_against() {
    let report_names: Vec<&str> = {
        let (ledger, namespace) = consistent_ledger().await;
        let _database = CleanupOnDrop::database(&namespace);
        assert_eq!(failing_checks(&ledger).await, Vec::<&str>::new(), "the seeded ledger is consistent");
        let names = audit(ledger.pool()).await.expect("audit").checks.iter().map(|c| c.name).collect();
        ledger.pool().close().await;
        drop_database(&namespace).await;
        names
    };
    let cased: Vec<&str> = CASES.iter().map(|(name, _)| *name).collect();
    assert_eq!(cased, report_names, "one case per audit check, in the audit's order");

    for (check, corruption) in CASES {
        let (ledger, namespace) = consistent_ledger().await;
        let _database = CleanupOnDrop::database(&namespace);
        let mut tx = ledger.pool().begin().await.expect("begin");
        sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.expect("replica role");
        for statement in *corruption {
            sqlx::query(*statement).execute(&mut *tx).await.unwrap_or_else(|e| panic!("{check}: {statement}: {e}"));
        }
        tx.commit().await.expect("commit the corruption");

        assert_eq!(failing_checks(&ledger).await, vec![*check], "only the check that guards this data fails");
        ledger.pool().close().await;
        drop_database(&namespace).await;
    }
}
