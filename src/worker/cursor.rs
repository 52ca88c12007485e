//! A partition's cursor in the router's stream of forwards (`domain::forwarding`), as its
//! pipeline keeps it: read from PostgreSQL each time the partition starts consuming (one
//! consumer per queue at a time, so no one else moves it meanwhile), moved in the
//! transaction of each batch, and in memory only once the batch is acked.

use lapin::message::Delivery;
use lapin::types::AMQPValue;

use super::WorkerContext;
use super::router::{FORWARD_EPOCH_HEADER, FORWARD_SEQ_HEADER};
use crate::domain::ForwardStamp;
use crate::domain::forwarding::{Admission, admit_batch};
use crate::ledger::LedgerError;

/// Where a partition stands: the stamp of the last forward it applied.
pub(super) struct PartitionCursor {
    /// The partition whose cursor this is.
    partition: u16,
    /// The last forward applied, as stored; `None` before the first stamped one.
    at: Option<ForwardStamp>,
}

/// What a batch does with its forwards.
pub(super) struct Admitted {
    /// Per delivery, in order: apply it, or set it aside.
    pub(super) admissions: Vec<Admission>,
    /// Where the batch moves the cursor, for its transaction; `None` when it stays.
    pub(super) moved: Option<(u16, ForwardStamp)>,
}

impl PartitionCursor {
    /// The stored cursor of `partition`.
    pub(super) async fn load(context: &WorkerContext, partition: u16) -> Result<Self, LedgerError> {
        let at = context.ledger.ledger().partition_cursor(partition).await?;
        Ok(PartitionCursor { partition, at })
    }

    /// The partition whose cursor this is.
    pub(super) fn partition(&self) -> u16 {
        self.partition
    }

    /// The admission of each of `deliveries`, and where they move the cursor.
    pub(super) fn admit(&self, deliveries: &[&Delivery]) -> Admitted {
        let (admissions, after) = admit_batch(self.at, deliveries.iter().map(|d| forward_stamp(d)));
        let moved = after.filter(|after| Some(*after) != self.at).map(|after| (self.partition, after));
        Admitted { admissions, moved }
    }

    /// The batch that moved the cursor to `moved` is acked.
    pub(super) fn settled(&mut self, moved: Option<(u16, ForwardStamp)>) {
        if let Some((partition, stamp)) = moved {
            debug_assert_eq!(partition, self.partition, "a batch moves its own partition's cursor");
            debug_assert!(Some(stamp) > self.at, "a cursor only moves forward");
            self.at = Some(stamp);
        }
    }
}

/// The router's stamp on a forward, if it has one (a forward of an older router has none).
fn forward_stamp(delivery: &Delivery) -> Option<ForwardStamp> {
    let headers = delivery.properties.headers().as_ref()?;
    let number = |name: &str| match headers.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    };
    Some(ForwardStamp { epoch: number(FORWARD_EPOCH_HEADER)?, seq: number(FORWARD_SEQ_HEADER)? })
}
