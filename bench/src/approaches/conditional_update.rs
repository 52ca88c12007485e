//! Approach 5: the strongest direct approach. One atomic statement per request; the
//! `WHERE balance >= amount` guard and the row lock the UPDATE takes make it race-free.

use anyhow::Context;
use sqlx::PgPool;

use super::Direct;
use crate::stats::Outcome;
use walletq::domain::{Command, Request};

/// `UPDATE accounts SET balance = balance ± amount WHERE … [AND balance >= amount]`.
pub struct ConditionalUpdate {
    pool: PgPool,
}

impl ConditionalUpdate {
    /// The approach on its own pool.
    pub fn new(pool: PgPool) -> Self {
        ConditionalUpdate { pool }
    }
}

impl Direct for ConditionalUpdate {
    async fn execute(&self, request: &Request) -> anyhow::Result<Outcome> {
        let (statement, amount) = match request.command {
            Command::Withdraw { amount } => (
                "UPDATE accounts SET balance = balance - $2 WHERE user_id = $1 AND balance >= $2 RETURNING balance",
                amount,
            ),
            Command::Deposit { amount } => {
                ("UPDATE accounts SET balance = balance + $2 WHERE user_id = $1 RETURNING balance", amount)
            }
            _ => anyhow::bail!("the compared approaches only withdraw and deposit"),
        };
        let updated: Option<rust_decimal::Decimal> = sqlx::query_scalar(statement)
            .bind(request.user_id.as_str())
            .bind(amount.as_decimal())
            .fetch_optional(&self.pool)
            .await
            .context("updating the balance")?;
        Ok(if updated.is_some() { Outcome::Approved } else { Outcome::Rejected })
    }
}
