//! Live counters of the partitions this worker serves, for heartbeats and readiness.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};

use crate::membership::PartitionReport;

/// Counters of one partition while this worker owns it.
#[derive(Debug, Default)]
pub struct PartitionStats {
    unacked: AtomicU64,
    processed: AtomicU64,
    /// Unix ms of the last batch, 0 before the first.
    last_processed_ms: AtomicI64,
}

impl PartitionStats {
    /// A batch of `size` deliveries was received.
    pub fn received(&self, size: usize) {
        self.unacked.store(size as u64, Ordering::Relaxed);
    }

    /// The batch in flight was acked or returned to the queue.
    pub fn settled(&self, processed: usize) {
        self.unacked.store(0, Ordering::Relaxed);
        if processed > 0 {
            self.processed.fetch_add(processed as u64, Ordering::Relaxed);
            self.last_processed_ms.store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        }
    }

    /// The report published at each heartbeat.
    pub fn report(&self, worker_id: &str) -> PartitionReport {
        let last = self.last_processed_ms.load(Ordering::Relaxed);
        PartitionReport {
            worker_id: worker_id.to_owned(),
            unacked: self.unacked.load(Ordering::Relaxed),
            processed: self.processed.load(Ordering::Relaxed),
            last_processed_at: (last > 0).then(|| DateTime::from_timestamp_millis(last)).flatten(),
            reported_at: Utc::now(),
        }
    }
}
