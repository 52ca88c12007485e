//! The wire topology: partitioning by user spreads users evenly.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use walletq::broker::{Publisher, request_properties};
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::partitioning::partition_of;
use walletq::worker::{RouterSettings, run_router};

use crate::support::{eventually, spawn_app_with};

#[tokio::test]
async fn the_router_spreads_ten_thousand_users_evenly_over_16_partitions_by_the_fixed_function() {
    let app = spawn_app_with(TopologySettings { partitions: 16, queue_type: QueueType::Classic }, false).await;
    let connection =
        std::sync::Arc::new(walletq::broker::connect(&app.services.amqp_url, "router", None).await.expect("broker"));
    let stop = tokio_util::sync::CancellationToken::new();
    let settings = RouterSettings {
        partitions: 16,
        prefetch: 2_048,
        backoff_max_ms: 200,
        consumer_tag: "router".into(),
        epochs: None,
    };
    let router = tokio::spawn(run_router(connection, app.names.clone(), settings, stop.clone()));
    let mut confirms = Vec::new();
    for user in 0..10_000 {
        let user = format!("user-{user}");
        let confirm = app
            .publisher
            .send(&app.names.requests_exchange(), &user, b"{}", request_properties(&user))
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        Publisher::confirmed(confirm).await.expect("confirm");
    }
    let mut expected = [0u32; 16];
    for user in 0..10_000 {
        expected[usize::from(partition_of(&format!("user-{user}"), 16))] += 1;
    }
    let channel = app.connection.create_channel().await.expect("channel");
    let depth = |index: u16| {
        let channel = channel.clone();
        let queue = app.names.partition_queue(index);
        async move {
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .expect("queue")
                .message_count()
        }
    };
    let counts = eventually("the router emptying the ingress queue", std::time::Duration::from_secs(30), || async {
        let mut counts = Vec::new();
        for index in 0..16 {
            counts.push(depth(index).await);
        }
        (counts.iter().sum::<u32>() == 10_000).then_some(counts)
    })
    .await;
    stop.cancel();
    router.await.expect("router task").expect("router");
    assert_eq!(counts, expected, "each user lands in partition_of(user)");
    let mean = 10_000.0 / 16.0;
    for (index, count) in counts.iter().enumerate() {
        let deviation = (f64::from(*count) - mean).abs() / mean;
        assert!(deviation <= 0.20, "partition {index} holds {count} users, {:.0}% off the mean", deviation * 100.0);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn declaring_the_topology_twice_is_harmless() {
    let app = spawn_app_with(TopologySettings { partitions: 2, queue_type: QueueType::Quorum }, false).await;
    let channel = app.connection.create_channel().await.expect("channel");
    walletq::broker::declare_topology(&channel, &app.names, &app.topology).await.expect("second declaration");
    app.cleanup().await;
}
