//! Approach 7: walletq itself, its worker run in-process (`--workers` instances).

use std::collections::HashMap;

use anyhow::Context;
use rust_decimal::Decimal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::env::Environment;
use walletq::broker::{self, declare_topology};
use walletq::configuration::WorkerSettings;
use walletq::domain::{Money, UserId};
use walletq::ledger::{self, Ledger};

/// How requests were grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BatchSizes {
    /// Batches applied.
    pub batches: u64,
    /// Mean requests per batch.
    pub mean: f64,
    /// The largest batch.
    pub largest: u64,
}

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
        let ledger = Ledger::connect(&env.services.database_url, 2, env.services.ca_file.as_deref()).await?;
        let users: Vec<&str> = opening.iter().map(|(u, _)| u.as_str()).collect();
        let balances: Vec<Decimal> = opening.iter().map(|(_, b)| b.as_decimal()).collect();
        sqlx::query("INSERT INTO wallets (user_id, balance) SELECT * FROM unnest($1::text[], $2::numeric[])")
            .bind(&users)
            .bind(&balances)
            .execute(ledger.pool())
            .await
            .context("opening the wallets")?;

        // Declared here too (idempotently) so the consumer probe never meets a missing queue.
        let connection =
            broker::connect(&env.services.amqp_url, "walletq bench setup", env.services.ca_file.as_deref()).await?;
        let setup = connection.create_channel().await.context("opening a channel")?;
        declare_topology(&setup, &env.names, &env.topology).await?;
        let _ = connection.close(200, "OK".into()).await;

        let shutdown = CancellationToken::new();
        let workers = (0..workers.max(1))
            .map(|_| {
                tokio::spawn(walletq::worker::run_worker(
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

    /// How the requests were cut into batches, read back from the ledger (every request of
    /// a batch is stored with the batch's `processed_at`).
    pub async fn batch_sizes(&self) -> anyhow::Result<BatchSizes> {
        let (batches, largest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), max(n) FROM (SELECT count(*) AS n FROM requests GROUP BY processed_at) AS batches",
        )
        .fetch_one(self.ledger.pool())
        .await
        .context("reading batch sizes")?;
        let requests: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
            .fetch_one(self.ledger.pool())
            .await
            .context("counting requests")?;
        let mean = if batches > 0 { requests as f64 / batches as f64 } else { 0.0 };
        Ok(BatchSizes { batches: batches as u64, mean, largest: largest.unwrap_or(0) as u64 })
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
