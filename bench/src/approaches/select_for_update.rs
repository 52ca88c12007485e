//! Approach 4: a row lock per request. `SELECT … FOR UPDATE` blocks other writers of the
//! same wallet until this transaction commits; then check and `UPDATE`.

use anyhow::Context;
use sqlx::PgPool;

use super::{Direct, accounts};
use crate::stats::Outcome;
use walletq::domain::Request;

/// One transaction per request holding the wallet's row lock.
pub struct SelectForUpdate {
    pool: PgPool,
}

impl SelectForUpdate {
    /// The approach on its own pool.
    pub fn new(pool: PgPool) -> Self {
        SelectForUpdate { pool }
    }
}

impl Direct for SelectForUpdate {
    async fn execute(&self, request: &Request) -> anyhow::Result<Outcome> {
        let mut tx = self.pool.begin().await.context("beginning a transaction")?;
        let balance: Option<rust_decimal::Decimal> =
            sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = $1 FOR UPDATE")
                .bind(request.user_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .context("locking the account row")?;
        let balance = balance
            .map(|b| walletq::domain::Money::from_decimal(b).context("a stored balance is not valid money"))
            .transpose()?;
        let (outcome, after) = accounts::decide(balance, request);
        if let Some(after) = after {
            accounts::write_balance(&mut *tx, &request.user_id, after).await?;
        }
        tx.commit().await.context("committing")?;
        Ok(outcome)
    }
}
