//! Approach 2: the seed's Redis lock. `SETNX lock 1`, then `EXPIRE lock ttl` as a second
//! command (a crash in between leaves a lock that never expires — the seed's bug, kept);
//! while the lock is taken, sleep briefly and try again; then read-check-write in
//! PostgreSQL and `DEL` the lock.

use std::time::Duration;

use anyhow::{Context, bail};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use super::{Direct, accounts};
use crate::stats::Outcome;
use walletq::domain::Request;

/// The lock's expiry, in seconds (the seed's value).
const LOCK_TTL_S: i64 = 10;
/// How long a client spins before it gives up on a lock.
const SPIN_LIMIT: Duration = Duration::from_secs(60);

/// A per-user Redis lock around read-check-write.
pub struct RedisLock {
    pool: PgPool,
    redis: ConnectionManager,
    prefix: String,
    spin: Duration,
}

impl RedisLock {
    /// Locks are `<prefix>:seedlock:<user>`; a taken lock is retried every `spin`.
    pub async fn connect(pool: PgPool, redis_url: &str, prefix: &str, spin: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(redis_url).context("parsing the Redis URL")?;
        let redis = ConnectionManager::new(client).await.context("connecting to Redis")?;
        Ok(RedisLock { pool, redis, prefix: prefix.to_owned(), spin })
    }
}

impl Direct for RedisLock {
    async fn execute(&self, request: &Request) -> anyhow::Result<Outcome> {
        let key = format!("{}:seedlock:{}", self.prefix, request.user_id);
        let mut redis = self.redis.clone();
        let started = tokio::time::Instant::now();
        loop {
            let taken: bool = redis.set_nx(&key, 1).await.context("SETNX")?;
            if taken {
                let _: bool = redis.expire(&key, LOCK_TTL_S).await.context("EXPIRE")?;
                break;
            }
            if started.elapsed() > SPIN_LIMIT {
                bail!("lock {key} stayed taken for {SPIN_LIMIT:?}");
            }
            tokio::time::sleep(self.spin).await;
        }
        let outcome = accounts::read_check_write(&self.pool, request).await;
        let _: u64 = redis.del(&key).await.context("DEL")?;
        outcome
    }
}
