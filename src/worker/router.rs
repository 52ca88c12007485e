//! The ingress router: empties the single ordered ingress queue into the partition queues,
//! `partition_of(routing key)`, in order. Every worker runs one; single active consumer on
//! the ingress queue makes exactly one of them active at a time.
//!
//! Forward (confirmed, mandatory) then ack: a crash in between forwards the same messages
//! again, right behind their first copies, so the duplicates are replays and order holds.

use std::sync::Arc;

use anyhow::Context;
use lapin::Connection;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;

use super::ordered::{Next, OrderedConsumer};
use crate::backoff::pause;
use crate::broker::{Names, Publisher};
use crate::domain::partitioning::partition_of;

/// Most messages forwarded per confirm round.
pub const ROUTER_BATCH_MAX: usize = 1_024;

/// How the router runs.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub partitions: u16,
    pub prefetch: u16,
    pub backoff_max_ms: u64,
    pub consumer_tag: String,
}

/// Routes until `stop`; returns an error when the connection is unusable.
pub async fn run_router(
    connection: Arc<Connection>,
    names: Names,
    settings: RouterSettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ingress = names.ingress_queue();
    let partition_queues: Vec<String> = (0..settings.partitions).map(|p| names.partition_queue(p)).collect();
    let mut failures: u32 = 0;
    'channel: while !stop.is_cancelled() {
        let mut source =
            OrderedConsumer::open(connection.clone(), &ingress, settings.prefetch, &settings.consumer_tag).await?;
        loop {
            let deliveries = match source.next_batch(ROUTER_BATCH_MAX, &stop).await? {
                Next::Batch(deliveries) => deliveries,
                Next::Stopped => return Ok(()),
                Next::Reopen => {
                    failures = failures.saturating_add(1);
                    pause(&stop, failures, settings.backoff_max_ms).await;
                    continue 'channel;
                }
            };
            let publisher = source.publisher();
            let forwarded = async {
                let mut confirms = Vec::with_capacity(deliveries.len());
                for delivery in &deliveries {
                    let partition = partition_of(delivery.routing_key.as_str(), settings.partitions);
                    let queue = &partition_queues[usize::from(partition)];
                    confirms.push(publisher.forward(queue, &delivery.data, delivery.properties.clone()).await?);
                }
                for confirm in confirms {
                    Publisher::confirmed(confirm).await?;
                }
                let last = deliveries.last().context("empty batch")?;
                publisher
                    .channel()
                    .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                    .await
                    .context("acking ingress")
            }
            .await;
            match forwarded {
                Ok(()) => {
                    failures = 0;
                    metrics::counter!("walletq_routed_total").increment(deliveries.len() as u64);
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %format!("{error:#}"), size = deliveries.len(), "routing failed; returning the batch to the ingress queue");
                    source.give_back("batch returned to the ingress queue").await;
                    pause(&stop, failures, settings.backoff_max_ms).await;
                    continue 'channel;
                }
            }
        }
    }
    Ok(())
}
