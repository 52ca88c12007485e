//! One partition queue: consume in order, cut batches, hand them to the batch pipeline.
//! A failed batch goes back to its queue in order by closing the channel (never a
//! requeueing nack, which would reorder it behind prefetched deliveries).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use lapin::Connection;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use super::WorkerContext;
use super::batch::{process_batch, reject_after_attempts};
use super::ordered::{Next, OrderedConsumer};
use super::stats::PartitionStats;
use crate::backoff::pause;
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

    let tag = format!("{}/{index}", context.worker_id);
    'channel: while !stop.is_cancelled() {
        let mut source =
            OrderedConsumer::open(connection.clone(), &queue, context.settings.effective_prefetch(), &tag).await?;
        loop {
            let limit = if isolate_remaining > 0 { 1 } else { batch_max };
            let deliveries = match source.next_batch(limit, &stop).await? {
                Next::Batch(deliveries) => deliveries,
                Next::Stopped => return Ok(()),
                Next::Reopen => {
                    failures = failures.saturating_add(1);
                    pause(&stop, failures, context.settings.backoff_max_ms).await;
                    continue 'channel;
                }
            };
            stats.received(deliveries.len());
            let publisher = source.publisher();

            let span = tracing::debug_span!(
                "batch",
                partition = index,
                size = deliveries.len(),
                approved = tracing::field::Empty,
                rejected = tracing::field::Empty,
                invalid = tracing::field::Empty
            );
            let outcome =
                tracing::Instrument::instrument(process_batch(&context, publisher, &deliveries, &stop), span).await;
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
                                    reject_after_attempts(&context, publisher, delivery, attempts, &error).await;
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
                    source.give_back("batch returned to the queue").await;
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
