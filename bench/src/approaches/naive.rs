//! Approach 1: the seed's first code. Read the balance, check it, write the new balance,
//! with nothing in between stopping another client doing the same: lost updates and
//! overdrafts under concurrency.

use sqlx::PgPool;

use super::{Direct, accounts};
use crate::stats::Outcome;
use walletq::domain::Request;

/// Read-check-write with no lock.
pub struct Naive {
    pool: PgPool,
}

impl Naive {
    /// The approach on its own pool.
    pub fn new(pool: PgPool) -> Self {
        Naive { pool }
    }
}

impl Direct for Naive {
    async fn execute(&self, request: &Request) -> anyhow::Result<Outcome> {
        accounts::read_check_write(&self.pool, request).await
    }
}
