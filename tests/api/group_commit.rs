//! The group committer against the real PostgreSQL: batches handed over together share one
//! transaction and each gets back its own results; a batch that fails inside a merged
//! transaction fails alone; batches that share a user are applied one after the other.

use futures_util::future::join_all;
use walletq::domain::{Money, Op, Status, UserId};
use walletq::ledger::group::GroupCommitter;
use walletq::ledger::{Ledger, LedgerError};

use crate::support::{CleanupOnDrop, drop_database, isolated_services, request};

async fn fresh_ledger() -> (Ledger, String) {
    let services = isolated_services();
    let ledger = Ledger::connect(&services.database_url, 2, None).await.expect("PostgreSQL must be reachable");
    (ledger, services.namespace)
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user id")
}

async fn transactions(ledger: &Ledger) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT processed_at) FROM requests")
        .fetch_one(ledger.pool())
        .await
        .expect("count transactions")
}

#[tokio::test]
async fn batches_handed_over_together_share_one_transaction_and_keep_their_own_results() {
    let (ledger, namespace) = fresh_ledger().await;
    let _database = CleanupOnDrop::database(&namespace);
    let committer = GroupCommitter::spawn(ledger.clone(), 1);
    let batches: Vec<_> = (0..20)
        .map(|i| {
            let name = format!("user{i}");
            let requests = vec![
                request(format!("d{i}"), &name, Op::Deposit, 1_000),
                request(format!("w{i}"), &name, Op::Withdraw, 300),
            ];
            (requests, vec![(user(&name), 1)])
        })
        .collect();

    let outcomes = join_all(batches.iter().map(|(requests, fences)| committer.apply_batch(requests, fences))).await;

    for ((requests, _), outcome) in batches.iter().zip(outcomes) {
        let results = outcome.expect("every batch applies");
        let ids: Vec<_> = results.iter().filter_map(|r| r.request_id.clone()).collect();
        let expected: Vec<_> = requests.iter().map(|r| r.request_id.clone()).collect();
        assert_eq!(ids, expected, "each batch gets its own results, in its order");
        assert!(results.iter().all(|r| r.status == Status::Approved), "{results:?}");
        let user = &requests[0].user_id;
        let wallet = ledger.wallet(user).await.expect("read wallet").expect("a wallet");
        assert_eq!(wallet.balance, Money::from_cents(700).expect("money"), "{user}");
    }
    // Handed over at once while no transaction ran: one transaction for all twenty.
    assert_eq!(transactions(&ledger).await, 1);
    ledger.pool().close().await;
    drop_database(&namespace).await;
}

#[tokio::test]
async fn a_stale_fence_fails_only_its_own_batch_of_a_merged_transaction() {
    let (ledger, namespace) = fresh_ledger().await;
    let _database = CleanupOnDrop::database(&namespace);
    // bob's newest lock holder has written with token 100.
    ledger
        .apply_batch(&[request("b0", "bob", Op::Deposit, 5_000)], &[(user("bob"), 100)])
        .await
        .expect("bob's first batch");
    let committer = GroupCommitter::spawn(ledger.clone(), 1);
    let alice = [request("a1", "alice", Op::Deposit, 2_000)];
    let stale_bob = [request("b1", "bob", Op::Withdraw, 1_000)];
    let alice_fences = [(user("alice"), 1)];
    let bob_fences = [(user("bob"), 5)];

    let (alice_outcome, bob_outcome) =
        tokio::join!(committer.apply_batch(&alice, &alice_fences), committer.apply_batch(&stale_bob, &bob_fences));

    let alice_results = alice_outcome.expect("alice's batch is not failed by bob's");
    assert_eq!(alice_results[0].status, Status::Approved);
    assert!(
        matches!(bob_outcome, Err(LedgerError::StaleFence(ref stale)) if stale.as_str() == "bob"),
        "{bob_outcome:?}"
    );
    let bob = ledger.wallet(&user("bob")).await.expect("read").expect("a wallet");
    assert_eq!(bob.balance, Money::from_cents(5_000).expect("money"), "the stale withdrawal wrote nothing");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE request_id = 'b1'")
        .fetch_one(ledger.pool())
        .await
        .expect("count");
    assert_eq!(stored, 0);
    ledger.pool().close().await;
    drop_database(&namespace).await;
}

#[tokio::test]
async fn batches_sharing_a_user_are_applied_one_after_the_other_in_order() {
    let (ledger, namespace) = fresh_ledger().await;
    let _database = CleanupOnDrop::database(&namespace);
    let committer = GroupCommitter::spawn(ledger.clone(), 1);
    let deposit = [request("d1", "carol", Op::Deposit, 500)];
    let withdraw = [request("w1", "carol", Op::Withdraw, 500)];
    let fences = [(user("carol"), 1)];

    let (first, second) =
        tokio::join!(committer.apply_batch(&deposit, &fences), committer.apply_batch(&withdraw, &fences));

    assert_eq!(first.expect("deposit")[0].status, Status::Approved);
    // Only after the deposit is there money for the withdrawal.
    assert_eq!(second.expect("withdrawal")[0].status, Status::Approved);
    let carol = ledger.wallet(&user("carol")).await.expect("read").expect("a wallet");
    assert_eq!(carol.balance, Money::ZERO);
    assert_eq!(transactions(&ledger).await, 2, "not merged: they share a user");
    ledger.pool().close().await;
    drop_database(&namespace).await;
}
