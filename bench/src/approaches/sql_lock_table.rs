//! Approach 3: the seed's lock table. A lock is a row: inserting it takes the lock, the
//! primary key refuses a second holder (unique violation: sleep and retry, deleting the
//! lock first when it is stale), deleting it releases the lock.

use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::PgPool;

use super::{Direct, accounts};
use crate::stats::Outcome;
use walletq::domain::Request;

/// A lock older than this is stale and may be deleted by anyone.
const LOCK_TTL_S: f64 = 10.0;
/// How long a client retries before it gives up on a lock.
const SPIN_LIMIT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "CREATE TABLE locks (
    name        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
)";

/// A per-user lock row around read-check-write.
pub struct SqlLockTable {
    pool: PgPool,
    spin: Duration,
}

impl SqlLockTable {
    /// Creates the lock table; a taken lock is retried every `spin`.
    pub async fn create(pool: PgPool, spin: Duration) -> anyhow::Result<Self> {
        sqlx::query(SCHEMA).execute(&pool).await.context("creating the lock table")?;
        Ok(SqlLockTable { pool, spin })
    }

    async fn lock(&self, name: &str, owner: &str) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        loop {
            let inserted = sqlx::query(
                "INSERT INTO locks (name, owner, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))",
            )
            .bind(name)
            .bind(owner)
            .bind(LOCK_TTL_S)
            .execute(&self.pool)
            .await;
            match inserted {
                Ok(_) => return Ok(()),
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                    sqlx::query("DELETE FROM locks WHERE name = $1 AND expires_at < now()")
                        .bind(name)
                        .execute(&self.pool)
                        .await
                        .context("deleting a stale lock")?;
                }
                Err(error) => return Err(error).context("inserting a lock row"),
            }
            if started.elapsed() > SPIN_LIMIT {
                bail!("lock {name} stayed taken for {SPIN_LIMIT:?}");
            }
            tokio::time::sleep(self.spin).await;
        }
    }
}

impl Direct for SqlLockTable {
    async fn execute(&self, request: &Request) -> anyhow::Result<Outcome> {
        let name = format!("wallet:{}", request.user_id);
        let owner = request.request_id.as_str();
        self.lock(&name, owner).await?;
        let outcome = accounts::read_check_write(&self.pool, request).await;
        sqlx::query("DELETE FROM locks WHERE name = $1 AND owner = $2")
            .bind(&name)
            .bind(owner)
            .execute(&self.pool)
            .await
            .context("releasing a lock row")?;
        outcome
    }
}
