//! The partitions' cursors in the router's stream of forwards (`domain::forwarding`): where a
//! router's epoch comes from, and where each partition stands. A batch moves its partition's
//! cursor in its own transaction (the fence statement, see `super::fence`); these are the
//! reads, and the move of a batch that applies nothing.

use super::{Ledger, LedgerError};
use crate::domain::ForwardStamp;

impl Ledger {
    /// A new router epoch: larger than every epoch drawn before, on any worker.
    pub async fn next_router_epoch(&self) -> Result<i64, LedgerError> {
        Ok(sqlx::query_scalar("SELECT nextval('router_epochs')").fetch_one(self.pool()).await?)
    }

    /// The stamp of the last forward partition `partition` applied, if any.
    pub async fn partition_cursor(&self, partition: u16) -> Result<Option<ForwardStamp>, LedgerError> {
        let row: Option<(i64, i64)> = sqlx::query_as("SELECT epoch, seq FROM partition_cursors WHERE partition = $1")
            .bind(i32::from(partition))
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|(epoch, seq)| ForwardStamp { epoch, seq }))
    }

    /// Which of `request_ids` are stored (applied before): a forward at or before its
    /// partition's cursor is applied only as such a replay.
    pub async fn stored_ids(&self, request_ids: &[String]) -> Result<std::collections::HashSet<String>, LedgerError> {
        let stored: Vec<String> = sqlx::query_scalar("SELECT request_id FROM requests WHERE request_id = ANY($1)")
            .bind(request_ids)
            .fetch_all(self.pool())
            .await?;
        Ok(stored.into_iter().collect())
    }

    /// Moves partition `partition`'s cursor to `cursor`, never back: for a batch that applies
    /// no request (only invalid messages), so its forwards count as seen.
    pub async fn advance_cursor(&self, partition: u16, cursor: ForwardStamp) -> Result<(), LedgerError> {
        sqlx::query(ADVANCE_CURSORS)
            .bind([i32::from(partition)])
            .bind([cursor.epoch])
            .bind([cursor.seq])
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// Moves the cursors `$1` (partitions) to `($2, $3)` (epochs, sequences), each only forward.
/// A macro so the fence statement can embed it (`concat!` takes literals only).
macro_rules! advance_cursors_sql {
    () => {
        "INSERT INTO partition_cursors (partition, epoch, seq)
         SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[])
         ON CONFLICT (partition) DO UPDATE SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq
         WHERE (partition_cursors.epoch, partition_cursors.seq) < (EXCLUDED.epoch, EXCLUDED.seq)"
    };
}
pub(super) use advance_cursors_sql;

const ADVANCE_CURSORS: &str = advance_cursors_sql!();
