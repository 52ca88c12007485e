//! A forward the broker refused in the middle of a router batch cannot let a later one of the
//! same user be applied first. On a RabbitMQ cluster a partition queue electing a new leader
//! nacks some of the router's forwards and accepts later ones of the same batch; the router
//! forwards the whole batch again in a new epoch. Here the partition queue is filled as such a
//! broker leaves it — epoch 100: seq 0, 1, (2 refused), 3; then the batch again as epoch 101:
//! seq 0 (the refused one), 1 (the copy of 100:3) — and the worker must apply them in the
//! order sent: 100:3 is set aside (no result, not applied), its copy 101:1 applied in its
//! place.

use lapin::types::{AMQPValue, FieldTable};
use walletq::broker::{Publisher, request_properties};
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Money, Op, Request, Status};

use crate::support::{request, spawn_app_with};

/// Publishes `request` straight into partition queue 0, stamped as the router would.
async fn forward(app: &crate::support::TestApp, request: &Request, epoch: i64, seq: i64) {
    let mut headers = FieldTable::default();
    headers.insert("x-walletq-routing-key".into(), AMQPValue::LongString(request.user_id.as_str().into()));
    headers.insert("x-walletq-epoch".into(), AMQPValue::LongLongInt(epoch));
    headers.insert("x-walletq-seq".into(), AMQPValue::LongLongInt(seq));
    let properties = request_properties(request.request_id.as_str())
        .with_reply_to(app.reply_queue.as_str().into())
        .with_headers(headers);
    let queue = app.names.partition_queue(0);
    let confirm = app.publisher.forward(&queue, &request.to_json(), properties).await.expect("publish");
    Publisher::confirmed(confirm).await.expect("confirm");
}

#[tokio::test]
async fn a_forward_behind_a_refused_one_is_set_aside_and_its_copy_applied_in_order() {
    let mut app = spawn_app_with(TopologySettings { partitions: 1, queue_type: QueueType::Quorum }, false).await;
    let first = request("fw-1", "fw", Op::Deposit, 100);
    let second = request("fw-2", "fw", Op::Deposit, 200);
    let refused = request("fw-3", "fw", Op::Deposit, 500);
    let later = request("fw-4", "fw", Op::Withdraw, 300);
    forward(&app, &first, 100, 0).await;
    forward(&app, &second, 100, 1).await;
    // 100:2 (`refused`) was nacked; 100:3 (`later`) was accepted behind the gap.
    forward(&app, &later, 100, 3).await;
    forward(&app, &refused, 101, 0).await;
    forward(&app, &later, 101, 1).await;
    app.start_worker();

    let results = app.next_results(4).await;
    let order: Vec<(&str, Option<Money>)> =
        results.iter().map(|(_, r)| (r.request_id.as_ref().expect("id").as_str(), r.balance)).collect();
    let money = |cents| Some(Money::from_cents(cents).expect("amount"));
    assert_eq!(
        order,
        vec![("fw-1", money(100)), ("fw-2", money(300)), ("fw-3", money(800)), ("fw-4", money(500))],
        "applied in the order sent, the copy behind the gap set aside"
    );
    assert!(results.iter().all(|(_, r)| r.status == Status::Approved && !r.replayed));
    app.stop_worker().await;
    assert!(app.try_next_result().is_none(), "the set-aside forward got no result");
    let cursor: (i64, i64) = sqlx::query_as("SELECT epoch, seq FROM partition_cursors WHERE partition = 0")
        .fetch_one(&app.pool)
        .await
        .expect("cursor");
    assert_eq!(cursor, (101, 1), "the cursor is stored with the batches");
    app.cleanup().await;
}

/// Forwards at or before the cursor (a batch delivered again after its commit, or a late copy
/// from an older epoch) are answered from storage when their request was applied, and set
/// aside when it was not (a newer epoch carries it): never applied anew out of their place.
#[tokio::test]
async fn forwards_at_or_before_the_cursor_are_only_replayed() {
    let mut app = spawn_app_with(TopologySettings { partitions: 1, queue_type: QueueType::Quorum }, false).await;
    let first = request("rp-1", "rp", Op::Deposit, 100);
    let second = request("rp-2", "rp", Op::Deposit, 200);
    let never = request("rp-3", "rp", Op::Withdraw, 300);
    let next = request("rp-4", "rp", Op::Deposit, 400);
    forward(&app, &first, 100, 0).await;
    forward(&app, &second, 101, 0).await;
    app.start_worker();
    app.next_results(2).await;
    // Delivered again (as after a lost ack), a late older-epoch forward never applied, then
    // the next of the current epoch.
    forward(&app, &first, 100, 0).await;
    forward(&app, &never, 100, 1).await;
    forward(&app, &next, 101, 1).await;

    let results = app.next_results(2).await;
    let seen: Vec<(&str, bool, Option<Money>)> =
        results.iter().map(|(_, r)| (r.request_id.as_ref().expect("id").as_str(), r.replayed, r.balance)).collect();
    let money = |cents| Some(Money::from_cents(cents).expect("amount"));
    assert_eq!(seen, vec![("rp-1", true, money(100)), ("rp-4", false, money(700))]);
    app.stop_worker().await;
    assert!(app.try_next_result().is_none(), "the late forward got no result");
    assert_eq!(app.count("SELECT count(*) FROM requests WHERE request_id = 'rp-3'").await, 0, "and was not applied");
    app.cleanup().await;
}
