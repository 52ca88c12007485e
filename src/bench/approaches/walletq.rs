//! Approach 7: walletq itself, its worker run in-process (`--workers` instances).

use std::collections::HashMap;

use anyhow::Context;
use rust_decimal::Decimal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bench::env::Environment;
use crate::configuration::WorkerSettings;
use crate::domain::{Money, UserId};
use crate::ledger::{self, Ledger};

/// Running walletq workers on a fresh database.
pub struct Walletq {
    shutdown: CancellationToken,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
    ledger: Ledger,
}

impl Walletq {
    /// Creates and migrates the database, opens the wallets, starts `workers` workers and
    /// waits until every partition queue has a consumer.
    pub async fn start(
        env: &Environment,
        settings: &WorkerSettings,
        workers: u16,
        opening: &[(UserId, Money)],
    ) -> anyhow::Result<Self> {
        let ledger = Ledger::connect(&env.services.database_url, 2).await?;
        let users: Vec<&str> = opening.iter().map(|(u, _)| u.as_str()).collect();
        let balances: Vec<Decimal> = opening.iter().map(|(_, b)| b.as_decimal()).collect();
        sqlx::query("INSERT INTO wallets (user_id, balance) SELECT * FROM unnest($1::text[], $2::numeric[])")
            .bind(&users)
            .bind(&balances)
            .execute(ledger.pool())
            .await
            .context("opening the wallets")?;

        let shutdown = CancellationToken::new();
        let workers = (0..workers.max(1))
            .map(|_| {
                tokio::spawn(crate::worker::run_worker(
                    env.services.clone(),
                    env.topology.clone(),
                    settings.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        let walletq = Walletq { shutdown, workers, ledger };
        if let Err(error) = env.wait_for_consumers().await {
            let _ = walletq.stop().await;
            return Err(error);
        }
        Ok(walletq)
    }

    /// Final balances in cents, by user.
    pub async fn final_cents(&self) -> anyhow::Result<HashMap<String, i64>> {
        Ok(ledger::balances(self.ledger.pool()).await?.into_iter().map(|(u, b)| (u, b.cents())).collect())
    }

    /// Stops the workers (finishing their batches in flight).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let mut outcome = Ok(());
        for worker in self.workers {
            if let Err(error) = worker.await.map_err(anyhow::Error::from).and_then(|r| r) {
                outcome = outcome.and(Err(error));
            }
        }
        self.ledger.pool().close().await;
        outcome
    }
}
