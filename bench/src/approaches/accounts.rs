//! The `accounts` table the direct approaches (1–5) share, and the rule they all apply.

use std::collections::HashMap;

use anyhow::Context;
use rust_decimal::Decimal;
use sqlx::{PgExecutor, PgPool, Row};

use crate::stats::Outcome;
use walletq::domain::{Command, Money, Request, UserId};

/// One balance per user; like walletq's `wallets`, it can never go negative.
const SCHEMA: &str = "CREATE TABLE accounts (
    user_id  TEXT PRIMARY KEY,
    balance  NUMERIC(20, 2) NOT NULL CHECK (balance >= 0)
)";

/// Creates the table and opens the wallets.
pub async fn create(pool: &PgPool, opening: &[(UserId, Money)]) -> anyhow::Result<()> {
    sqlx::query(SCHEMA).execute(pool).await.context("creating the accounts table")?;
    let users: Vec<&str> = opening.iter().map(|(u, _)| u.as_str()).collect();
    let balances: Vec<Decimal> = opening.iter().map(|(_, b)| b.as_decimal()).collect();
    sqlx::query("INSERT INTO accounts (user_id, balance) SELECT * FROM unnest($1::text[], $2::numeric[])")
        .bind(&users)
        .bind(&balances)
        .execute(pool)
        .await
        .context("opening the accounts")?;
    Ok(())
}

/// Final balances in cents, by user.
pub async fn final_cents(pool: &PgPool) -> anyhow::Result<HashMap<String, i64>> {
    let rows =
        sqlx::query("SELECT user_id, balance FROM accounts").fetch_all(pool).await.context("reading balances")?;
    rows.iter()
        .map(|row| {
            let user: String = row.try_get("user_id")?;
            let balance: Decimal = row.try_get("balance")?;
            let balance = Money::from_decimal(balance).context("a stored balance is not valid money")?;
            Ok((user, balance.cents()))
        })
        .collect()
}

/// The balance of `user`, `None` without an account.
pub async fn read_balance<'e>(executor: impl PgExecutor<'e>, user: &UserId) -> anyhow::Result<Option<Money>> {
    let balance: Option<Decimal> = sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = $1")
        .bind(user.as_str())
        .fetch_optional(executor)
        .await
        .context("reading a balance")?;
    balance.map(|b| Money::from_decimal(b).context("a stored balance is not valid money")).transpose()
}

/// Overwrites the balance of `user` with `balance` (the "write" of read-check-write).
pub async fn write_balance<'e>(executor: impl PgExecutor<'e>, user: &UserId, balance: Money) -> anyhow::Result<()> {
    sqlx::query("UPDATE accounts SET balance = $2 WHERE user_id = $1")
        .bind(user.as_str())
        .bind(balance.as_decimal())
        .execute(executor)
        .await
        .context("writing a balance")?;
    Ok(())
}

/// The check of read-check-write: the verdict and, when approved, the new balance.
pub fn decide(balance: Option<Money>, request: &Request) -> (Outcome, Option<Money>) {
    let after = match (&request.command, balance) {
        (_, None) => None,
        (Command::Withdraw { amount }, Some(balance)) => balance.checked_sub(*amount),
        (Command::Deposit { amount }, Some(balance)) => balance.checked_add(*amount),
        (_, Some(_)) => None,
    };
    match after {
        Some(after) => (Outcome::Approved, Some(after)),
        None => (Outcome::Rejected, None),
    }
}

/// Read, check, write with whatever protection the caller holds around it.
pub async fn read_check_write(pool: &PgPool, request: &Request) -> anyhow::Result<Outcome> {
    let balance = read_balance(pool, &request.user_id).await?;
    let (outcome, after) = decide(balance, request);
    if let Some(after) = after {
        write_balance(pool, &request.user_id, after).await?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walletq::domain::{Op, RequestId};

    fn request(op: Op, cents: i64) -> Request {
        let amount = Money::from_cents(cents).unwrap();
        let command = if op == Op::Deposit { Command::Deposit { amount } } else { Command::Withdraw { amount } };
        Request {
            request_id: RequestId::parse("r").unwrap(),
            user_id: UserId::parse("u").unwrap(),
            command,
            reply_to: None,
        }
    }

    #[test]
    fn decide_follows_the_wallet_rules() {
        let balance = Money::from_cents(500);
        assert_eq!(decide(balance, &request(Op::Withdraw, 500)), (Outcome::Approved, Some(Money::ZERO)));
        assert_eq!(decide(balance, &request(Op::Withdraw, 501)), (Outcome::Rejected, None));
        assert_eq!(decide(balance, &request(Op::Deposit, 1)), (Outcome::Approved, Money::from_cents(501)));
        assert_eq!(decide(None, &request(Op::Deposit, 1)), (Outcome::Rejected, None));
    }
}
