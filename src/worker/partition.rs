//! One partition queue: consume in order, cut batches, hand them to the batch pipeline.
//! A failed batch goes back to its queue in order by closing the channel (never a
//! requeueing nack, which would reorder it behind prefetched deliveries).

use std::sync::Arc;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::WorkerContext;
use super::batch::process_batch;
use crate::backoff::jittered_delay;
use crate::broker::Publisher;

/// Serves partition `index` until `stop` is cancelled; returns an error when the
/// connection is unusable (the caller reconnects).
pub(super) async fn run(
    context: Arc<WorkerContext>,
    connection: Arc<Connection>,
    index: u16,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let queue = context.names.partition_queue(index);
    let batch_max = usize::from(context.settings.batch_max);
    let mut failures: u32 = 0;

    'channel: while !stop.is_cancelled() {
        let channel = connection.create_channel().await.with_context(|| format!("opening a channel for {queue}"))?;
        channel
            .basic_qos(context.settings.effective_prefetch(), BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let publisher = Publisher::on(channel.clone()).await?;
        let tag = format!("{}/{index}", context.worker_id);
        let mut consumer = channel
            .basic_consume(queue.as_str().into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("consuming {queue}"))?;
        tracing::debug!(%queue, "consuming");

        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = channel.close(200, "worker stopping".into()).await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            let first = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) if connection.status().connected() => {
                    tracing::warn!(%queue, %error, "channel failed; reopening");
                    failures = failures.saturating_add(1);
                    pause(&stop, failures, context.settings.backoff_max_ms).await;
                    continue 'channel;
                }
                Some(Err(error)) => return Err(error).context("the broker connection failed"),
                None if connection.status().connected() => {
                    tracing::warn!(%queue, "consumer was cancelled by the broker; consuming again");
                    pause(&stop, 1, context.settings.backoff_max_ms).await;
                    continue 'channel;
                }
                None => anyhow::bail!("the broker connection closed"),
            };

            // Take what is already here, up to batch_max, without waiting for more.
            let mut deliveries = vec![first];
            while deliveries.len() < batch_max {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => deliveries.push(delivery),
                    _ => break,
                }
            }

            match process_batch(&context, &publisher, &deliveries, &stop).await {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        %queue,
                        size = deliveries.len(),
                        error = %format!("{error:#}"),
                        "batch not applied; returning it to the queue in order"
                    );
                    let _ = channel.close(200, "batch returned to the queue".into()).await;
                    pause(&stop, failures, context.settings.backoff_max_ms).await;
                    continue 'channel;
                }
            }
        }
    }
    Ok(())
}

async fn pause(stop: &CancellationToken, attempt: u32, max_ms: u64) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(jittered_delay(attempt, max_ms)) => {}
    }
}
