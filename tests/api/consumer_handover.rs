//! A router killed while it holds a prefetch of one user's deposits, with a second worker up
//! and waiting for the ingress queue: the second one starts at the head of the queue, and
//! every deposit is applied in publish order (each result's balance is its place). The
//! second worker waits for the first one's claim (`src/worker/ordered.rs`) instead of standing
//! by; the handover by cancel, which a standby would get out of order, is covered by the unit
//! tests there.

use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Money, Op};

use crate::support::{
    RESULT_TIMEOUT, eventually, free_port, http_get, request, spawn_app_with, spawn_worker_process_with,
};

/// Deliveries a worker may hold unacked (its router's prefetch).
const PREFETCH: u32 = 40;
/// Deposits published while the router is frozen: three prefetches' worth.
const DEPOSITS: u32 = 3 * PREFETCH;

#[tokio::test]
async fn a_router_killed_holding_deliveries_hands_the_ingress_over_in_order() {
    let mut app = spawn_app_with(TopologySettings { partitions: 1, queue_type: QueueType::Quorum }, false).await;
    let prefetch = PREFETCH.to_string();
    let metrics = |port: u16| format!("127.0.0.1:{port}");
    let (first_metrics, second_metrics) = (metrics(free_port()), metrics(free_port()));
    let spawn = |app: &crate::support::TestApp, address: &str| {
        spawn_worker_process_with(app, &[("WALLETQ_PREFETCH", prefetch.as_str()), ("WALLETQ_METRICS_ADDR", address)])
    };

    // The first worker is the router: a deposit is served before the second one exists.
    let mut first = spawn(&app, &first_metrics);
    app.publish_all(&[request("handover-0", "handover", Op::Deposit, 100)]).await;
    app.next_results(1).await;
    let _second = spawn(&app, &second_metrics);
    eventually("the second worker is ready", RESULT_TIMEOUT, || async {
        http_get(&second_metrics, "/readyz").await.filter(|(status, _)| *status == 200)
    })
    .await;

    // Frozen, the router still takes a prefetch of deliveries from the broker and holds them.
    first.pause();
    let deposits: Vec<_> =
        (1..=DEPOSITS).map(|n| request(format!("handover-{n}"), "handover", Op::Deposit, 100)).collect();
    app.publish_all(&deposits).await;
    let ingress = app.names.ingress_queue();
    eventually("the frozen router holds its prefetch", RESULT_TIMEOUT, || async {
        let ready = app.queue_ready(&ingress).await;
        (ready == DEPOSITS - PREFETCH).then_some(())
    })
    .await;
    first.kill();

    let results = app.results_by_id(DEPOSITS as usize).await;
    let stored = app.stored_results().await;
    let mut out_of_place = Vec::new();
    for n in 1..=DEPOSITS {
        let id = format!("handover-{n}");
        let expected = Money::from_cents(i64::from(n + 1) * 100).expect("amount");
        let balance = stored.get(&id).and_then(|r| r.balance);
        if balance != Some(expected) || !results.contains_key(&id) {
            out_of_place.push(format!("{id}: balance {balance:?}, expected {expected}"));
        }
    }
    assert!(out_of_place.is_empty(), "deposits applied out of publish order: {out_of_place:?}");
    app.cleanup().await;
}
