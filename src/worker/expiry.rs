//! Hold expiry, in the partition's own pipeline: every [`EXPIRY_SWEEP_INTERVAL_MS`] the
//! partition expires its users' due holds (a batch with no request, under the same user
//! locks and fences as any batch), then publishes the expiry results not yet published.
//!
//! A batch also expires its users' due holds before applying its requests (the rules
//! expire what is due at the batch's time first), so a capture never wins over an expiry
//! that came first. The expiry results are stored with the holds in the same transaction
//! and published by the next sweep; a result is marked sent only after the broker
//! confirmed it, so a crash between the two publishes it again (at least once, like every
//! result).

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::WorkerContext;
use super::batch::{HeldLocks, acquire};
use crate::broker::{Publisher, json_properties};

/// How often a partition expires its due holds and publishes the expiry results: the bound
/// on how late after `expires_at` an expiry result is published while the partition is served.
pub(super) const EXPIRY_SWEEP_INTERVAL_MS: u64 = 500;
/// Most users whose due holds one sweep expires (the rest wait for the next sweep).
const SWEEP_USERS_MAX: i64 = 256;
/// Most expiry results one sweep publishes.
const SWEEP_RESULTS_MAX: i64 = 1_024;

/// When a partition sweeps next.
pub(super) struct Sweeper {
    partition: u16,
    next_at: Instant,
}

impl Sweeper {
    /// A sweeper for `partition` that sweeps at once (a worker taking over a partition
    /// publishes what an earlier owner left).
    pub(super) fn new(partition: u16) -> Self {
        Sweeper { partition, next_at: Instant::now() }
    }

    /// When the next sweep is due.
    pub(super) fn next_at(&self) -> Instant {
        self.next_at
    }

    /// Sweeps when one is due. A failure (an outage) is logged and retried at the next one.
    pub(super) async fn sweep_when_due(
        &mut self,
        context: &WorkerContext,
        publisher: &Publisher,
        stop: &CancellationToken,
    ) {
        if Instant::now() < self.next_at {
            return;
        }
        if let Err(error) = sweep(context, publisher, self.partition, stop).await {
            tracing::warn!(partition = self.partition, error = %format!("{error:#}"), "hold expiry sweep failed; retrying");
        }
        self.next_at = Instant::now() + Duration::from_millis(EXPIRY_SWEEP_INTERVAL_MS);
    }
}

/// Expires the partition's due holds, then publishes its unsent expiry results.
async fn sweep(
    context: &WorkerContext,
    publisher: &Publisher,
    partition: u16,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let ledger = context.ledger.ledger();
    let users = ledger.due_hold_users(context.partitions, partition, SWEEP_USERS_MAX).await?;
    if !users.is_empty() {
        let held = HeldLocks::keep(context, acquire(context, &users, stop).await?);
        let applied = context.ledger.apply_batch(&[], &held.grant.fences).await;
        held.release(context).await;
        applied?;
        metrics::counter!("walletq_hold_sweeps_total").increment(1);
    }
    publish_unsent(context, publisher, partition).await
}

/// Publishes the partition's expiry results not yet sent, then records them as sent.
async fn publish_unsent(context: &WorkerContext, publisher: &Publisher, partition: u16) -> anyhow::Result<()> {
    let ledger = context.ledger.ledger();
    let unsent = ledger.unsent_expiries(context.partitions, partition, SWEEP_RESULTS_MAX).await?;
    if unsent.is_empty() {
        return Ok(());
    }
    let results_queue = context.names.results_queue();
    let mut confirms = Vec::with_capacity(unsent.len());
    for expiry in &unsent {
        let target = match expiry.reply_to.as_deref() {
            Some(reply_to) if !context.names.is_own_input_queue(reply_to) => reply_to,
            _ => results_queue.as_str(),
        };
        let properties = json_properties()
            .with_message_id(format!("expire:{}", expiry.hold_id).into())
            .with_correlation_id(expiry.hold_id.as_str().into());
        confirms.push(publisher.send("", target, &expiry.result.to_json(), properties).await?);
    }
    for confirm in confirms {
        Publisher::confirmed(confirm).await?;
    }
    let sent: Vec<_> = unsent.into_iter().map(|e| e.hold_id).collect();
    metrics::counter!("walletq_holds_expired_total").increment(sent.len() as u64);
    ledger.mark_expiries_sent(&sent).await
}
