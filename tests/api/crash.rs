//! Worker processes killed mid-stream, and graceful stops.

use std::time::Duration;

use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::Op;

use crate::support::{
    SequentialModel, assert_matches_model, mixed_requests, request, spawn_app_with, spawn_worker_process,
    wait_for_stored,
};

#[tokio::test]
async fn a_worker_killed_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let mut app = spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Quorum }, false).await;
    let requests = mixed_requests("k", 3_000, 20, 5, 5_000, 42);
    app.publish_all(&requests).await;

    let mut first = spawn_worker_process(&app);
    let seen = wait_for_stored(&app, 300, Duration::from_secs(60)).await;
    first.kill();
    assert!(seen < 3_000, "the worker was killed mid-stream");

    let second = spawn_worker_process(&app);
    wait_for_stored(&app, 3_000, Duration::from_secs(120)).await;

    // Every request has exactly one stored result and matches the per-user sequential model.
    let stored = app.stored_results().await;
    assert_eq!(stored.len(), 3_000);
    let mut model = SequentialModel::default();
    let mut approved = 0;
    for r in &requests {
        let expected = model.apply(r);
        approved += i64::from(expected.0 == walletq::domain::Status::Approved);
        assert_matches_model(&stored[r.request_id.as_str()], expected);
    }
    assert_eq!(app.count("SELECT count(*) FROM ledger_entries").await, approved, "one ledger entry per approval");
    for user in (0..20).map(|u| format!("k-{u}")) {
        app.assert_ledger_matches_balance(&user).await;
    }

    // Every request got a result on the reply queue; the ones redelivered after the kill
    // may come twice, the second time as a replay of the same result.
    let replies = app.next_results(3_000).await;
    let distinct: std::collections::HashSet<_> =
        replies.iter().filter_map(|(_, r)| r.request_id.as_ref().map(|id| id.as_str().to_owned())).collect();
    let mut extra = Vec::new();
    if distinct.len() < 3_000 {
        extra = app.next_results(3_000 - distinct.len()).await;
    }
    for (_, reply) in replies.iter().chain(&extra) {
        let id = reply.request_id.as_ref().expect("id").as_str();
        assert_eq!(reply.status, stored[id].status);
        assert_eq!(reply.balance, stored[id].balance);
    }

    // Killed before the cleanup: a live worker would declare the deleted queues again.
    drop(second);
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_finishes_the_batch_in_flight_and_exits_zero() {
    let mut app = spawn_app_with(TopologySettings { partitions: 2, queue_type: QueueType::Quorum }, false).await;
    let worker = spawn_worker_process(&app);
    let requests: Vec<_> = (0..200).map(|i| request(format!("t-{i}"), "term", Op::Deposit, 100)).collect();
    app.publish_all(&requests).await;
    wait_for_stored(&app, 1, Duration::from_secs(60)).await;
    let status = worker.terminate().await;
    assert!(status.success(), "worker exited with {status}");
    // What was stored was also acked or will be replayed; a new worker finishes the rest.
    let next = spawn_worker_process(&app);
    wait_for_stored(&app, 200, Duration::from_secs(60)).await;
    let results = app.next_results(200).await;
    assert!(results.iter().all(|(_, r)| r.status == walletq::domain::Status::Approved));
    drop(next);
    app.cleanup().await;
}
