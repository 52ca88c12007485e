//! Horizontal scaling: workers share partitions evenly and take over from each other.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use walletq::configuration::{QueueType, TopologySettings};

use crate::support::{
    SequentialModel, TestApp, assert_matches_model, eventually, mixed_requests, spawn_app_with, spawn_worker_process,
    wait_for_stored,
};

/// The live workers and their partitions, when they cover 0..16 exactly once with the
/// expected number of workers each serving a share within `share`.
async fn balanced(app: &TestApp, workers: usize, share: std::ops::RangeInclusive<usize>) -> Option<Vec<Vec<u16>>> {
    let status = walletq::status::collect(&app.services, &app.topology, 3_000).await.ok()?;
    if status.workers.len() != workers {
        return None;
    }
    let mut seen = BTreeSet::new();
    for worker in &status.workers {
        if !share.contains(&worker.partitions.len()) {
            return None;
        }
        for p in &worker.partitions {
            if !seen.insert(*p) {
                return None;
            }
        }
    }
    (seen.len() == 16).then(|| status.workers.iter().map(|w| w.partitions.clone()).collect())
}

#[tokio::test]
async fn workers_share_partitions_evenly_and_take_over_after_a_kill() {
    let app = spawn_app_with(TopologySettings { partitions: 16, queue_type: QueueType::Quorum }, false).await;
    let mut workers: Vec<_> = (0..3).map(|_| spawn_worker_process(&app)).collect();
    eventually("3 workers sharing 16 partitions 6/5/5", Duration::from_secs(20), || balanced(&app, 3, 5..=6)).await;

    let requests = mixed_requests("s", 4_000, 40, 5, 3_000, 99);
    let (first_half, second_half) = requests.split_at(2_000);
    app.publish_all(first_half).await;

    let mut victim = workers.remove(0);
    victim.kill();
    let killed_at = Instant::now();
    eventually("2 survivors serving all 16 partitions", Duration::from_secs(10), || balanced(&app, 2, 8..=8)).await;
    let takeover = killed_at.elapsed();

    workers.push(spawn_worker_process(&app));
    let started_at = Instant::now();
    eventually("a new worker taking its share", Duration::from_secs(10), || balanced(&app, 3, 5..=6)).await;
    let join = started_at.elapsed();
    app.publish_all(second_half).await;

    wait_for_stored(&app, 4_000, Duration::from_secs(120)).await;
    let stored = app.stored_results().await;
    assert_eq!(stored.len(), 4_000);
    let mut model = SequentialModel::default();
    for r in &requests {
        assert_matches_model(&stored[r.request_id.as_str()], model.apply(r));
    }
    let report = walletq::ledger::audit::audit(&app.pool).await.expect("audit");
    assert!(report.is_clean(), "{report:?}");
    eprintln!("scaling: takeover after SIGKILL in {takeover:?}, new worker took its share in {join:?}");

    drop(workers);
    app.cleanup().await;
}

// Issue 16 defect 3 (the deliveries of a consumer cancelled by the broker, overtaken by a
// promoted standby) cannot happen any more: no walletq consumer registers while another holds
// the queue (the claims of src/worker/ordered.rs, whose unit tests show the handover in order).
