//! The wire topology: partitioning by user spreads users evenly.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use walletq::broker::{Publisher, request_properties};
use walletq::configuration::{QueueType, TopologySettings};

use crate::helpers::spawn_app_with;

#[tokio::test]
async fn ten_thousand_users_spread_evenly_over_16_partitions() {
    let app = spawn_app_with(TopologySettings { partitions: 16, queue_type: QueueType::Classic }, false).await;
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
    let channel = app.connection.create_channel().await.expect("channel");
    let mut counts = Vec::new();
    for index in 0..16 {
        let queue = channel
            .queue_declare(
                app.names.partition_queue(index).as_str().into(),
                QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        counts.push(queue.message_count());
    }
    assert_eq!(counts.iter().sum::<u32>(), 10_000, "every message lands in exactly one partition");
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
