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
use super::batch::{BatchFailure, process_batch, reject_after_attempts};
use super::cursor::PartitionCursor;
use super::expiry::Sweeper;
use super::ordered::{Next, OrderedConsumer};
use super::stats::PartitionStats;
use crate::backoff::pause;
use crate::ledger::LedgerError;

/// Most messages whose failed attempts a partition remembers at once.
const TRACKED_MESSAGES_MAX: usize = 10_000;

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
    let mut poison = PoisonTracker::default();

    let tag = format!("{}/{index}", context.worker_id);
    let mut sweeper = Sweeper::new(index);
    'channel: while !stop.is_cancelled() {
        let prefetch = context.settings.effective_prefetch();
        let Some(mut source) = OrderedConsumer::open(connection.clone(), &queue, prefetch, &tag, &stop).await? else {
            return Ok(());
        };
        let Some(mut cursor) = load_cursor(&context, index, &mut source).await else {
            source.give_back("no cursor").await;
            failures = failures.saturating_add(1);
            pause(&stop, failures, context.settings.backoff_max_ms).await;
            continue 'channel;
        };
        loop {
            sweeper.sweep_when_due(&context, source.publisher(), &stop).await;
            let limit = poison.batch_limit(batch_max);
            let deliveries = match source.next_batch_until(limit, &stop, Some(sweeper.next_at())).await? {
                Next::Batch(deliveries) => deliveries,
                Next::Idle => continue,
                Next::Stopped => return Ok(()),
                Next::Reopen => {
                    failures = failures.saturating_add(1);
                    pause(&stop, failures, context.settings.backoff_max_ms).await;
                    continue 'channel;
                }
            };
            stats.received(deliveries.len());
            match traced_batch(&context, source.publisher(), &deliveries, &mut cursor, &stop).await {
                Ok(()) => {
                    failures = 0;
                    poison.settled(&deliveries);
                    stats.settled(deliveries.len());
                }
                Err(failure) => {
                    failures = failures.saturating_add(1);
                    stats.settled(0);
                    match poison.after_failure(&context, source, &deliveries, &mut cursor, failure).await {
                        Some(kept) => {
                            stats.settled(1);
                            source = kept;
                        }
                        None => {
                            pause(&stop, failures, context.settings.backoff_max_ms).await;
                            continue 'channel;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// [`process_batch`] in a `batch` span that records its size and outcomes.
async fn traced_batch(
    context: &WorkerContext,
    publisher: &crate::broker::Publisher,
    deliveries: &[Delivery],
    cursor: &mut PartitionCursor,
    stop: &CancellationToken,
) -> Result<(), BatchFailure> {
    let span = tracing::debug_span!(
        "batch",
        partition = cursor.partition(),
        size = deliveries.len(),
        approved = tracing::field::Empty,
        rejected = tracing::field::Empty,
        invalid = tracing::field::Empty
    );
    tracing::Instrument::instrument(process_batch(context, publisher, deliveries, cursor, stop), span).await
}

/// The partition's stored cursor; `None` (logged) while PostgreSQL cannot say, since without
/// it no forward can be admitted.
async fn load_cursor(context: &WorkerContext, index: u16, source: &mut OrderedConsumer) -> Option<PartitionCursor> {
    match PartitionCursor::load(context, index).await {
        Ok(cursor) => Some(cursor),
        Err(error) => {
            tracing::warn!(queue = %source.queue(), error = %format!("{error:#}"), "could not read the partition's cursor; retrying");
            None
        }
    }
}

/// Finds and sets aside a message the database keeps refusing. After the database refused
/// a batch of several, the partition goes one message at a time through that many to find
/// the one it refuses; that one's attempts are counted, and after `max_attempts` it is
/// rejected with a result and dead-lettered.
#[derive(Default)]
struct PoisonTracker {
    /// Deliveries still to be taken one at a time.
    isolate_remaining: usize,
    /// Failed attempts per message (by [`message_key`]), at most [`TRACKED_MESSAGES_MAX`].
    refusals: HashMap<u64, u32>,
}

impl PoisonTracker {
    /// Most deliveries the next batch may have.
    fn batch_limit(&self, batch_max: usize) -> usize {
        if self.isolate_remaining > 0 { 1 } else { batch_max }
    }

    /// A batch was acked.
    fn settled(&mut self, deliveries: &[Delivery]) {
        self.isolate_remaining = self.isolate_remaining.saturating_sub(deliveries.len());
        for delivery in deliveries {
            self.refusals.remove(&message_key(delivery));
        }
    }

    /// After a failed batch: the message the database keeps refusing is rejected on the
    /// same channel (returned `Some`, to go on with), or else the batch goes back to its
    /// queue (`None`: reopen after a pause). Either way the batch's locks are released only
    /// after that, never while its messages are still unsettled.
    async fn after_failure(
        &mut self,
        context: &WorkerContext,
        source: OrderedConsumer,
        deliveries: &[Delivery],
        cursor: &mut PartitionCursor,
        failure: BatchFailure,
    ) -> Option<OrderedConsumer> {
        let BatchFailure { error, locks } = failure;
        if refused_by_fence(&error) {
            metrics::counter!("walletq_stale_fence_total").increment(1);
        }
        let rejected = self.refused(context, source.publisher(), deliveries, cursor, &error).await;
        let kept = if rejected {
            Some(source)
        } else {
            tracing::warn!(
                queue = %source.queue(),
                size = deliveries.len(),
                error = %format!("{error:#}"),
                "batch not applied; returning it to the queue in order"
            );
            source.give_back("batch returned to the queue").await;
            None
        };
        if let Some(locks) = locks {
            locks.release(context).await;
        }
        kept
    }

    /// A batch failed with `error`. True when it was a lone message refused too often, and
    /// it is now rejected and dead-lettered (acked on `publisher`'s channel).
    async fn refused(
        &mut self,
        context: &WorkerContext,
        publisher: &crate::broker::Publisher,
        deliveries: &[Delivery],
        cursor: &mut PartitionCursor,
        error: &anyhow::Error,
    ) -> bool {
        if !refused_by_database(error) {
            return false;
        }
        let [delivery] = deliveries else {
            self.isolate_remaining = deliveries.len();
            return false;
        };
        if self.refusals.len() >= TRACKED_MESSAGES_MAX {
            self.refusals.clear();
        }
        let attempts = self.refusals.entry(message_key(delivery)).or_insert(0);
        *attempts += 1;
        let attempts = *attempts;
        if attempts < context.settings.max_attempts {
            return false;
        }
        if reject_after_attempts(context, publisher, delivery, cursor, attempts, error).await.is_err() {
            return false;
        }
        tracing::error!(attempts, error = %format!("{error:#}"), "the database keeps refusing a request; rejected and dead-lettered it");
        self.refusals.remove(&message_key(delivery));
        self.isolate_remaining = self.isolate_remaining.saturating_sub(1);
        true
    }
}

/// True when PostgreSQL refused the batch because a newer lock holder of one of its users
/// has written (the batch's lock was lost: it expired, or a Redis failover dropped it).
fn refused_by_fence(error: &anyhow::Error) -> bool {
    error.chain().filter_map(|e| e.downcast_ref::<LedgerError>()).any(|e| matches!(e, LedgerError::StaleFence(_)))
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
