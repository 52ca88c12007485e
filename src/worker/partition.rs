//! One partition queue: consume in order, cut batches, hand them to the batch pipeline.
//! A failed batch goes back to its queue in order by closing the channel (never a
//! requeueing nack, which would reorder it behind prefetched deliveries).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::WorkerContext;
use super::batch::{process_batch, reject_after_attempts};
use super::stats::PartitionStats;
use crate::backoff::pause;
use crate::broker::Publisher;
use crate::ledger::LedgerError;

/// Most messages whose failed attempts a partition remembers at once.
const MAX_TRACKED_MESSAGES: usize = 10_000;

/// Serves partition `index` until `stop` is cancelled; returns an error when the
/// connection is unusable (the caller reconnects).
pub(super) async fn run(
    context: Arc<WorkerContext>,
    connection: Arc<Connection>,
    index: u16,
    stats: Arc<PartitionStats>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let queue = context.names.partition_queue(index);
    let batch_max = usize::from(context.settings.batch_max);
    let mut failures: u32 = 0;
    // After the database refused a batch, go one message at a time through that many
    // messages to find the one it refuses; count that one's attempts.
    let mut isolate_remaining: usize = 0;
    let mut refusals: HashMap<u64, u32> = HashMap::new();

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

            // Take what is already here, up to the limit, without waiting for more.
            let limit = if isolate_remaining > 0 { 1 } else { batch_max };
            let mut deliveries = vec![first];
            while deliveries.len() < limit {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => deliveries.push(delivery),
                    _ => break,
                }
            }
            stats.received(deliveries.len());

            let span = tracing::debug_span!(
                "batch",
                partition = index,
                size = deliveries.len(),
                approved = tracing::field::Empty,
                rejected = tracing::field::Empty,
                invalid = tracing::field::Empty
            );
            let outcome =
                tracing::Instrument::instrument(process_batch(&context, &publisher, &deliveries, &stop), span).await;
            match outcome {
                Ok(()) => {
                    failures = 0;
                    isolate_remaining = isolate_remaining.saturating_sub(deliveries.len());
                    for delivery in &deliveries {
                        refusals.remove(&message_key(delivery));
                    }
                    stats.settled(deliveries.len());
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    stats.settled(0);
                    if refused_by_database(&error) {
                        if deliveries.len() > 1 {
                            isolate_remaining = deliveries.len();
                        } else if let Some(delivery) = deliveries.first() {
                            if refusals.len() >= MAX_TRACKED_MESSAGES {
                                refusals.clear();
                            }
                            let attempts = refusals.entry(message_key(delivery)).or_insert(0);
                            *attempts += 1;
                            if *attempts >= context.settings.max_attempts {
                                let attempts = *attempts;
                                let rejected =
                                    reject_after_attempts(&context, &publisher, delivery, attempts, &error).await;
                                if rejected.is_ok() {
                                    tracing::error!(%queue, attempts, error = %format!("{error:#}"), "the database keeps refusing a request; rejected and dead-lettered it");
                                    refusals.remove(&message_key(delivery));
                                    isolate_remaining = isolate_remaining.saturating_sub(1);
                                    stats.settled(1);
                                    continue;
                                }
                            }
                        }
                    }
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

/// True when PostgreSQL itself refused the batch (a data or constraint error, a raised
/// exception), as opposed to an outage: retrying the same messages may fail forever.
fn refused_by_database(error: &anyhow::Error) -> bool {
    error.chain().filter_map(|e| e.downcast_ref::<LedgerError>()).any(|e| match e {
        LedgerError::Database(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("22") || code.starts_with("23") || code.starts_with("P0")
        }
        LedgerError::Corrupt(_) => true,
        _ => false,
    })
}

fn message_key(delivery: &Delivery) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    delivery.properties.message_id().as_ref().map(|m| m.as_str()).hash(&mut hasher);
    delivery.data.hash(&mut hasher);
    hasher.finish()
}
