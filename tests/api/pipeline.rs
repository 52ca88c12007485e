//! End-to-end behaviour of the pipeline: the seed's race, order, exact money, idempotency.

use walletq::domain::{CouponKind, Money, Op, Reason, Status};

use crate::support::{SequentialModel, assert_matches_model, mixed_requests, request, spawn_app};

#[tokio::test]
async fn the_seeds_race_approves_exactly_300_of_500_in_publish_order() {
    let mut app = spawn_app().await;
    app.publish_all(&[request("seed-deposit", "alice", Op::Deposit, 30_000)]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved);

    let withdrawals: Vec<_> = (0..500).map(|i| request(format!("w-{i:03}"), "alice", Op::Withdraw, 100)).collect();
    app.publish_all(&withdrawals).await;
    let results = app.results_by_id(500).await;

    for (i, w) in withdrawals.iter().enumerate() {
        let result = &results[w.request_id.as_str()];
        if i < 300 {
            assert_eq!(result.status, Status::Approved, "withdrawal {i} should be approved");
            assert_eq!(result.balance, Money::from_cents(30_000 - 100 * (i as i64 + 1)));
        } else {
            assert_eq!(result.reason, Some(Reason::InsufficientFunds), "withdrawal {i} should be refused");
            assert_eq!(result.balance, Some(Money::ZERO));
        }
    }
    assert_eq!(app.balance("alice").await, Some(Money::ZERO));
    assert_eq!(app.count("SELECT count(*) FROM ledger_entries WHERE delta < 0").await, 300);
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 501);
    app.assert_ledger_matches_balance("alice").await;
    app.cleanup().await;
}

#[tokio::test]
async fn interleaved_requests_of_50_users_match_a_sequential_model() {
    let mut app = spawn_app().await;
    let requests = mixed_requests("user", 2_000, 50, 3, 20_000, 7);
    app.publish_all(&requests).await;
    let results = app.results_by_id(requests.len()).await;

    let mut model = SequentialModel::default();
    for r in &requests {
        assert_matches_model(&results[r.request_id.as_str()], model.apply(r));
    }
    for user in (0..50).map(|u| format!("user-{u}")) {
        assert_eq!(app.balance(&user).await.map(Money::cents), model.balance(&user), "balance of {user}");
        app.assert_ledger_matches_balance(&user).await;
    }
    app.cleanup().await;
}

#[tokio::test]
async fn json_number_amounts_are_exact() {
    let mut app = spawn_app().await;
    let reply = app.reply_queue.clone();
    for i in 0..3 {
        let body = format!(r#"{{"request_id":"tenth-{i}","user_id":"bob","op":"deposit","amount":0.1}}"#);
        app.publish_raw("bob", body.as_bytes(), Some(&reply)).await;
    }
    app.publish_raw(
        "bob",
        br#"{"request_id":"three-tenths","user_id":"bob","op":"withdraw","amount":"0.3"}"#,
        Some(&reply),
    )
    .await;
    let results = app.results_by_id(4).await;
    assert_eq!(results["tenth-2"].balance.map(|b| b.to_string()), Some("0.30".into()));
    let withdrawal = &results["three-tenths"];
    assert_eq!(withdrawal.status, Status::Approved);
    assert_eq!(withdrawal.balance, Some(Money::ZERO));
    assert_eq!(app.balance("bob").await, Some(Money::ZERO));
    app.cleanup().await;
}

#[tokio::test]
async fn a_request_id_applies_once_and_replays_its_result() {
    let mut app = spawn_app().await;
    let deposit = request("once", "carol", Op::Deposit, 25_000);
    for _ in 0..5 {
        app.publish_all(std::slice::from_ref(&deposit)).await;
    }
    let results: Vec<_> = app.next_results(5).await;
    let first = &results[0].1;
    assert!(!first.replayed);
    assert_eq!(first.coupon.as_ref().map(|c| c.kind), Some(CouponKind::RedPacket10));
    for (properties, replay) in &results[1..] {
        assert!(replay.replayed);
        assert_eq!(replay.processed_at, first.processed_at);
        assert_eq!(replay.coupon, first.coupon);
        assert_eq!(replay.balance, first.balance);
        assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-once"));
        assert_eq!(properties.message_id().as_ref().map(|c| c.as_str()), Some("once"));
    }
    assert_eq!(app.count("SELECT count(*) FROM ledger_entries").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM coupons").await, 1);

    app.publish_all(&[request("once", "carol", Op::Deposit, 30_000)]).await;
    let conflict = &app.next_results(1).await[0].1;
    assert_eq!(conflict.reason, Some(Reason::Conflict));
    assert_eq!(conflict.amount, Money::from_cents(30_000));
    assert_eq!(conflict.balance, Money::from_cents(25_000));
    assert!(!conflict.replayed);
    assert_eq!(app.balance("carol").await, Money::from_cents(25_000));
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 1);
    app.cleanup().await;
}

#[tokio::test]
async fn withdrawals_without_a_wallet_are_refused_and_stored() {
    let mut app = spawn_app().await;
    app.publish_all(&[request("nw-1", "dave", Op::Withdraw, 100)]).await;
    let result = &app.next_results(1).await[0].1;
    assert_eq!(result.reason, Some(Reason::NoWallet));
    assert_eq!(result.balance, None);
    assert_eq!(app.balance("dave").await, None);
    app.publish_all(&[request("nw-1", "dave", Op::Withdraw, 100)]).await;
    assert!(app.next_results(1).await[0].1.replayed);
    app.cleanup().await;
}

#[tokio::test]
async fn deposits_grant_the_coupon_of_their_tier() {
    let mut app = spawn_app().await;
    let deposits = [
        request("c-99", "erin", Op::Deposit, 9_999),
        request("c-100", "erin", Op::Deposit, 10_000),
        request("c-300", "erin", Op::Deposit, 30_000),
        request("c-500", "erin", Op::Deposit, 50_000),
    ];
    app.publish_all(&deposits).await;
    let results = app.results_by_id(4).await;
    let kind = |id: &str| results[id].coupon.as_ref().map(|c| c.kind);
    assert_eq!(kind("c-99"), None);
    assert_eq!(kind("c-100"), Some(CouponKind::RedPacket10));
    assert_eq!(kind("c-300"), Some(CouponKind::Spend300Save50));
    assert_eq!(kind("c-500"), Some(CouponKind::Lifetime20Off));
    let codes: std::collections::HashSet<_> =
        results.values().filter_map(|r| r.coupon.as_ref().map(|c| c.code.clone())).collect();
    assert_eq!(codes.len(), 3, "coupon codes are unique");
    assert_eq!(app.count("SELECT count(*) FROM coupons WHERE user_id = 'erin'").await, 3);
    app.cleanup().await;
}
