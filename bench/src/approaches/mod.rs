//! The approaches the bench compares, one module each.
//!
//! Approaches 1–5 are direct: a client calls PostgreSQL (and Redis) itself and gets its
//! verdict back. They share one `accounts` table ([`accounts`]); the seed ran them on
//! MySQL through Django, here they run on the same PostgreSQL as walletq so only the
//! approach differs. Approaches 6–7 are queued: clients publish to the partition queues
//! with confirms and collect results from a reply queue.

pub mod accounts;
pub mod broker_echo;
pub mod conditional_update;
pub mod naive;
pub mod redis_lock;
pub mod select_for_update;
pub mod sql_lock_table;
pub mod walletq;

use std::future::Future;

use clap::ValueEnum;
use serde::Serialize;

use super::stats::Outcome;
use ::walletq::domain::Request;

/// An approach to concurrent withdrawals.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Approach {
    /// 1. Read, check, write; no lock at all (the seed's first code).
    Naive,
    /// 2. The seed's Redis lock: SETNX then EXPIRE, spin while taken, read-check-write, DEL.
    RedisLock,
    /// 3. The seed's lock table: insert a lock row, retry on conflict, delete stale locks.
    SqlLockTable,
    /// 4. SELECT … FOR UPDATE then UPDATE, in one transaction per request.
    SelectForUpdate,
    /// 5. One atomic `UPDATE … WHERE balance >= amount` per request.
    ConditionalUpdate,
    /// 6. A consumer on the same queues that replies at once: the broker's ceiling.
    BrokerEcho,
    /// 7. walletq: partitioned queues, batched, fenced, set-based.
    Walletq,
}

impl Approach {
    /// All approaches, in the order of the comparison.
    pub const ALL: [Approach; 7] = [
        Approach::Naive,
        Approach::RedisLock,
        Approach::SqlLockTable,
        Approach::SelectForUpdate,
        Approach::ConditionalUpdate,
        Approach::BrokerEcho,
        Approach::Walletq,
    ];

    /// The command-line name, e.g. `redis-lock`.
    pub fn name(self) -> &'static str {
        match self {
            Approach::Naive => "naive",
            Approach::RedisLock => "redis-lock",
            Approach::SqlLockTable => "sql-lock-table",
            Approach::SelectForUpdate => "select-for-update",
            Approach::ConditionalUpdate => "conditional-update",
            Approach::BrokerEcho => "broker-echo",
            Approach::Walletq => "walletq",
        }
    }

    /// The numbered label used in tables and plots, e.g. `2 redis-lock`.
    pub fn label(self) -> String {
        let number = Approach::ALL.iter().position(|a| *a == self).map_or(0, |i| i + 1);
        format!("{number} {}", self.name())
    }

    /// Whether it moves money, so its final balances can be checked.
    pub fn moves_money(self) -> bool {
        self != Approach::BrokerEcho
    }

    /// Whether it claims to be correct under concurrency (all but the naive code and the echo).
    pub fn claims_correctness(self) -> bool {
        !matches!(self, Approach::Naive | Approach::BrokerEcho)
    }

    /// Whether clients publish to the partition queues (rather than call the database).
    pub fn is_queued(self) -> bool {
        matches!(self, Approach::BrokerEcho | Approach::Walletq)
    }
}

/// A direct approach: one call runs one request and returns its verdict.
pub trait Direct: Send + Sync + 'static {
    /// Applies `request` and says whether it was approved.
    fn execute(&self, request: &Request) -> impl Future<Output = anyhow::Result<Outcome>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_numbered_in_comparison_order() {
        assert_eq!(Approach::Naive.label(), "1 naive");
        assert_eq!(Approach::Walletq.label(), "7 walletq");
        let names: Vec<_> = Approach::ALL.iter().map(|a| a.name()).collect();
        for (approach, name) in Approach::ALL.iter().zip(names) {
            assert_eq!(approach.to_possible_value().map(|v| v.get_name().to_owned()), Some(name.to_owned()));
        }
    }
}
