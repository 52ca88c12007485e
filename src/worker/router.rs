//! The ingress router: empties the single ordered ingress queue into the partition queues,
//! `partition_of(routing key)`, in order. Every worker runs one; single active consumer on
//! the ingress queue makes exactly one of them active at a time.
//!
//! Forward (confirmed, mandatory) then ack: a crash in between forwards the same messages
//! again, right behind their first copies, so the duplicates are replays and order holds.

use std::sync::Arc;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

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
        let channel = connection.create_channel().await.context("opening the router channel")?;
        channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await.context("setting router prefetch")?;
        let publisher = Publisher::on(channel.clone()).await?;
        let mut consumer = channel
            .basic_consume(
                ingress.as_str().into(),
                settings.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {ingress}"))?;
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = channel.close(200, "router stopping".into()).await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            let first = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(_)) | None if connection.status().connected() => {
                    failures = failures.saturating_add(1);
                    pause(&stop, failures, settings.backoff_max_ms).await;
                    continue 'channel;
                }
                Some(Err(error)) => return Err(error).context("the broker connection failed"),
                None => anyhow::bail!("the broker connection closed"),
            };
            let mut deliveries = vec![first];
            while deliveries.len() < ROUTER_BATCH_MAX {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => deliveries.push(delivery),
                    _ => break,
                }
            }
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
                channel.basic_ack(last.delivery_tag, BasicAckOptions { multiple: true }).await.context("acking ingress")
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
                    let _ = channel.close(200, "batch returned to the ingress queue".into()).await;
                    pause(&stop, failures, settings.backoff_max_ms).await;
                    continue 'channel;
                }
            }
        }
    }
    Ok(())
}
