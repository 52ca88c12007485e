//! What docs/PROTOCOL.md promises that no other test checks: the deposit past the largest
//! balance, where a replay is sent, invalid messages without `reply_to`, outages not counted
//! as attempts, and the exit status on a topology mismatch.

use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use walletq::broker::{Publisher, request_properties};
use walletq::configuration::{QueueType, TopologySettings, WorkerSettings};
use walletq::domain::{Money, Op, Reason, Request, RequestResult, Status};

use crate::support::{
    RESULT_TIMEOUT, TestApp, admin_pool, eventually, request, spawn_app, spawn_app_with, spawn_worker_process_logging,
};

/// Messages ready in `queue` (a passive declare: fails if the queue does not exist).
async fn ready(app: &TestApp, queue: &str) -> u32 {
    let channel = app.connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let count =
        channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("queue").message_count();
    let _ = channel.close(200, "OK".into()).await;
    count
}

/// Publishes `request` with the given `reply_to` and `correlation_id`, and awaits the confirm.
async fn publish_with(app: &TestApp, request: &Request, reply_to: Option<&str>, correlation_id: Option<&str>) {
    let mut properties = request_properties(request.request_id.as_str());
    if let Some(reply_to) = reply_to {
        properties = properties.with_reply_to(reply_to.into());
    }
    if let Some(correlation_id) = correlation_id {
        properties = properties.with_correlation_id(correlation_id.into());
    }
    let confirm = app
        .publisher
        .send(&app.names.requests_exchange(), request.user_id.as_str(), &request.to_json(), properties)
        .await
        .expect("publish");
    Publisher::confirmed(confirm).await.expect("confirm");
}

fn result_of(delivery: &lapin::message::Delivery) -> RequestResult {
    serde_json::from_slice(&delivery.data).expect("a result body")
}

fn id_of(result: &RequestResult) -> &str {
    result.request_id.as_ref().map(|r| r.as_str()).unwrap_or_default()
}

/// Sets `user`'s balance to 50 cents under the largest supported balance (no deposit can
/// reach it: one deposit is at most 1000000000.00).
async fn fill_wallet_to_the_brim(app: &TestApp, user: &str) {
    sqlx::query("UPDATE wallets SET balance = 9999999999999999.49 WHERE user_id = $1")
        .bind(user)
        .execute(&app.pool)
        .await
        .expect("set the balance");
}

#[tokio::test]
async fn a_deposit_past_the_largest_balance_is_acked_answered_and_its_refusal_replayed() {
    let mut app = spawn_app().await;
    let reply = app.reply_queue.clone();
    app.publish_all(&[request("open-max", "max", Op::Deposit, 100)]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved);
    fill_wallet_to_the_brim(&app, "max").await;
    let brim = Money::from_cents(999_999_999_999_999_949).expect("money");

    // With reply_to: the refusal arrives on the reply queue, with the current balance.
    let too_much = request("too-much", "max", Op::Deposit, 100);
    publish_with(&app, &too_much, Some(&reply), Some("corr-too-much")).await;
    // Without reply_to: the same refusal goes to <ns>.results.
    let too_much_quiet = request("too-much-quiet", "max", Op::Deposit, 100);
    publish_with(&app, &too_much_quiet, None, None).await;
    // A malformed marker behind them, on the same partition: once it is in <ns>.dead,
    // anything dead-lettered before it would be there too.
    app.publish_raw("max", br#"{"request_id":"marker","user_id":"max","op":"deposit"}"#, Some(&reply)).await;

    let results = app.next_results(2).await;
    let (properties, refused) = &results[0];
    assert_eq!(id_of(refused), "too-much");
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-too-much"));
    assert_eq!(refused.status, Status::Rejected);
    assert_eq!(refused.reason, Some(Reason::InvalidRequest));
    assert_eq!(refused.detail.as_deref(), Some("deposit would exceed the largest supported balance"));
    assert_eq!(refused.balance, Some(brim), "the refusal carries the current balance");
    assert!(!refused.replayed);
    assert_eq!(id_of(&results[1].1), "marker");
    assert_eq!(results[1].1.reason, Some(Reason::InvalidRequest));

    let mut results_queue = app.consume(&app.names.results_queue()).await;
    let quiet = result_of(&TestApp::next_delivery(&mut results_queue).await);
    assert_eq!(id_of(&quiet), "too-much-quiet");
    assert_eq!(quiet.reason, Some(Reason::InvalidRequest));
    assert_eq!(quiet.balance, Some(brim));

    // Not dead-lettered: only the marker reaches <ns>.dead.
    let dead_queue = app.names.dead_queue();
    eventually("the marker dead-lettered", RESULT_TIMEOUT, || async {
        (ready(&app, &dead_queue).await >= 1).then_some(())
    })
    .await;
    assert_eq!(ready(&app, &dead_queue).await, 1, "only the malformed marker is dead-lettered");
    let mut dead = app.consume(&dead_queue).await;
    let dead_letter = TestApp::next_delivery(&mut dead).await;
    assert!(String::from_utf8_lossy(&dead_letter.data).contains("marker"), "the one dead letter is the marker");
    assert_eq!(app.balance("max").await, Some(brim), "nothing was credited");

    // Stored like other rejections (issue 16, defect 5): every copy of the id gets this same
    // outcome, even after a withdrawal made room.
    assert_eq!(app.count("SELECT count(*) FROM requests WHERE request_id LIKE 'too-much%'").await, 2);
    app.publish_all(&[request("make-room", "max", Op::Withdraw, 1_000)]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved);
    publish_with(&app, &too_much, Some(&reply), Some("corr-again")).await;
    let again = &app.next_results(1).await[0].1;
    assert_eq!(id_of(again), "too-much");
    assert_eq!(again.status, Status::Rejected, "the copy gets the stored refusal, not a new evaluation");
    assert!(again.replayed, "the stored refusal is replayed");
    assert_eq!(again.balance, Some(brim), "the replay repeats the stored result");

    // Acked: once the worker is gone, nothing is left in (or returned to) any partition queue.
    app.stop_worker().await;
    for index in 0..app.topology.partitions {
        assert_eq!(ready(&app, &app.names.partition_queue(index)).await, 0, "partition {index} is empty");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_replay_goes_to_the_new_messages_reply_to_with_its_correlation_id() {
    let mut app = spawn_app().await;
    let first_queue = app.reply_queue.clone();
    let (second_queue, mut second) = walletq::broker::open_reply_queue(&app.connection).await.expect("reply queue");
    let deposit = request("dep-replayed", "rita", Op::Deposit, 15_000);

    publish_with(&app, &deposit, Some(&first_queue), Some("first")).await;
    let (properties, original) = app.next_results(1).await.remove(0);
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("first"));
    assert!(!original.replayed);
    let coupon = original.coupon.clone().expect("a deposit of 150.00 earns a coupon");

    publish_with(&app, &deposit, Some(&second_queue), Some("second")).await;
    let delivery = tokio::time::timeout(RESULT_TIMEOUT, second.next())
        .await
        .expect("the replay in time")
        .expect("consumer open")
        .expect("a delivery");
    let replay = result_of(&delivery);
    assert_eq!(delivery.properties.correlation_id().as_ref().map(|c| c.as_str()), Some("second"));
    assert!(replay.replayed);
    assert_eq!(replay.processed_at, original.processed_at);
    assert_eq!(replay.balance, original.balance);
    assert_eq!(replay.coupon.map(|c| c.code), Some(coupon.code));

    // Nothing more went to the first queue: the next result there is a later request's.
    app.publish_all(&[request("after-replay", "rita", Op::Withdraw, 100)]).await;
    let next = &app.next_results(1).await[0].1;
    assert_eq!(id_of(next), "after-replay", "the replay must not also go to the first reply_to");
    assert_eq!(app.count("SELECT count(*) FROM ledger_entries WHERE user_id = 'rita'").await, 2);
    app.cleanup().await;
}

#[tokio::test]
async fn an_invalid_message_without_reply_to_gets_no_result_and_is_dead_lettered() {
    let app = spawn_app().await;
    let invalid = br#"{"request_id":"bad-quiet","user_id":"ivan","op":"deposit","amount":"1e2"}"#;
    app.publish_raw("ivan", invalid, None).await;
    // Same user, so same partition, processed after the invalid one.
    app.publish_raw("ivan", br#"{"request_id":"good-quiet","user_id":"ivan","op":"deposit","amount":"2"}"#, None).await;

    let mut results = app.consume(&app.names.results_queue()).await;
    let first = result_of(&TestApp::next_delivery(&mut results).await);
    assert_eq!(id_of(&first), "good-quiet", "the invalid message must not produce a result");
    assert_eq!(first.status, Status::Approved);

    let mut dead = app.consume(&app.names.dead_queue()).await;
    let dead_letter = TestApp::next_delivery(&mut dead).await;
    assert_eq!(&dead_letter.data[..], &invalid[..], "dead-lettered with its body intact");
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 1, "the invalid message is not stored");
    app.cleanup().await;
}

#[tokio::test]
async fn a_database_outage_is_waited_out_not_counted_as_an_attempt() {
    let mut app = spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Quorum }, false).await;
    // One refusal would reject a request: any attempt counted during the outage would show.
    let settings = WorkerSettings { max_attempts: 1, ..app.worker_settings() };
    app.start_worker_with(settings);
    app.publish_all(&[request("before-outage", "olga", Op::Deposit, 1_000)]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved);

    // An outage of this test's own database only: no new connections, existing ones cut.
    let admin = admin_pool().await;
    let database = format!("walletq_{}", app.services.namespace);
    let allow = |allowed: bool| {
        let admin = admin.clone();
        let sql = format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allowed}");
        async move { sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await.expect("alter database") }
    };
    allow(false).await;
    let terminated: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&database)
            .fetch_all(&admin)
            .await
            .expect("terminate");
    assert!(!terminated.is_empty(), "the worker had connections to cut");

    publish_with(&app, &request("during-outage", "olga", Op::Withdraw, 400), Some(&app.reply_queue), None).await;
    // The request reaches the worker, which cannot reach PostgreSQL; the outage lasts long
    // enough for several tries (the backoff is capped at 200 ms in tests).
    let partition = app.names.partition_queue(walletq::domain::partitioning::partition_of("olga", 4));
    let ingress = app.names.ingress_queue();
    eventually("the request taken by the worker", RESULT_TIMEOUT, || async {
        (ready(&app, &ingress).await == 0 && ready(&app, &partition).await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    allow(true).await;

    let result = &app.next_results(1).await[0].1;
    assert_eq!(id_of(result), "during-outage");
    assert_eq!(result.status, Status::Approved, "applied after the outage, not rejected: {:?}", result.detail);
    assert_eq!(result.balance, Money::from_cents(600));
    assert_eq!(app.balance("olga").await, Money::from_cents(600));
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 2);
    assert_eq!(ready(&app, &app.names.dead_queue()).await, 0, "nothing dead-lettered");
    admin.close().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_exits_1_naming_precondition_failed_when_the_queue_type_differs() {
    let app = spawn_app_with(TopologySettings { partitions: 2, queue_type: QueueType::Classic }, false).await;
    // The namespace is classic; the worker asks for quorum.
    let worker = spawn_worker_process_logging(&app, &[("WALLETQ_QUEUE_TYPE", "quorum")], Stdio::piped());
    let output = tokio::time::timeout(RESULT_TIMEOUT, worker.output()).await.expect("the worker exits in time");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("worker stderr: {stderr}");
    assert_eq!(output.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(stderr.contains("PRECONDITION_FAILED"), "stderr names PRECONDITION_FAILED: {stderr}");
    assert!(stderr.contains("x-queue-type"), "stderr names the argument that differs: {stderr}");
    assert!(stderr.contains("must be deleted first"), "stderr gives the hint: {stderr}");
    assert!(
        stderr.contains(&format!("declaring queue {}.", app.services.namespace)),
        "stderr names the queue: {stderr}"
    );
    app.cleanup().await;
}
