//! One isolated environment per run: a fresh namespace (queues, exchanges, Redis keys) and
//! a fresh database, removed again afterwards.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};

use walletq::broker::{self, Names};
use walletq::configuration::{ServiceSettings, TopologySettings};
use walletq::telemetry::redact_url;

/// How long a run waits for the consumers of its partition queues to attach.
const CONSUMERS_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections PostgreSQL keeps for others (tests, psql) when a pool is sized to the clients.
const DB_CONNECTIONS_SPARE: i64 = 12;

/// A namespace and database of its own.
#[derive(Debug, Clone)]
pub struct Environment {
    /// The services, with this run's namespace and database URL.
    pub services: ServiceSettings,
    /// The run's queue and exchange names.
    pub names: Names,
    /// The run's partitions and queue type.
    pub topology: TopologySettings,
}

impl Environment {
    /// A fresh namespace `bench_<random>` and its database `walletq_bench_<random>`.
    pub fn fresh(base: &ServiceSettings, topology: &TopologySettings) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = format!("bench_{}", &id[..12]);
        let mut url = url::Url::parse(&base.database_url)
            .with_context(|| format!("parsing DATABASE_URL {}", redact_url(&base.database_url)))?;
        url.set_path(&format!("walletq_{namespace}"));
        let services = ServiceSettings { database_url: url.to_string(), namespace: namespace.clone(), ..base.clone() };
        Ok(Environment { services, names: Names::new(namespace), topology: topology.clone() })
    }

    /// Creates the (empty) database and returns a pool of `connections` on it.
    pub async fn create_database(&self, connections: u32) -> anyhow::Result<PgPool> {
        let url = &self.services.database_url;
        Postgres::create_database(url).await.with_context(|| format!("creating database {}", redact_url(url)))?;
        PgPoolOptions::new()
            .max_connections(connections)
            .min_connections(connections)
            .acquire_timeout(Duration::from_secs(60))
            .connect(url)
            .await
            .with_context(|| format!("connecting to {}", redact_url(url)))
    }

    /// Waits until the ingress queue (its router) and every partition queue have a consumer.
    pub async fn wait_for_consumers(&self) -> anyhow::Result<()> {
        let connection =
            broker::connect(&self.services.amqp_url, "walletq bench probe", self.services.ca_file.as_deref()).await?;
        let deadline = tokio::time::Instant::now() + CONSUMERS_TIMEOUT;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let queues = (0..self.topology.partitions).map(|i| self.names.partition_queue(i));
        for queue in std::iter::once(self.names.ingress_queue()).chain(queues) {
            loop {
                // A passive declare of a missing queue closes the channel: one channel per probe.
                let channel = connection.create_channel().await.context("opening a probe channel")?;
                let consumers = match channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await
                {
                    Ok(declared) => declared.consumer_count(),
                    Err(_) => 0,
                };
                let _ = channel.close(200, "OK".into()).await;
                if consumers > 0 {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "no consumer on {queue} after {CONSUMERS_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = connection.close(200, "OK".into()).await;
        Ok(())
    }

    /// Deletes the namespace's Redis keys, its queues and exchanges (when `broker`) and
    /// drops its database. Every step is tried; the first failure is returned.
    pub async fn cleanup(&self, broker: bool) -> anyhow::Result<()> {
        let broker = if broker { self.cleanup_broker().await } else { Ok(()) };
        let redis = self.cleanup_redis().await;
        let database = self.drop_database().await;
        broker.and(redis).and(database)
    }

    async fn cleanup_broker(&self) -> anyhow::Result<()> {
        let connection =
            broker::connect(&self.services.amqp_url, "walletq bench cleanup", self.services.ca_file.as_deref()).await?;
        let channel = connection.create_channel().await.context("opening a cleanup channel")?;
        let mut queues: Vec<String> = (0..self.topology.partitions).map(|i| self.names.partition_queue(i)).collect();
        queues.push(self.names.ingress_queue());
        queues.push(self.names.dead_queue());
        queues.push(self.names.results_queue());
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .with_context(|| format!("deleting queue {queue}"))?;
        }
        for exchange in [self.names.requests_exchange(), self.names.dead_exchange()] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .with_context(|| format!("deleting exchange {exchange}"))?;
        }
        let _ = connection.close(200, "OK".into()).await;
        Ok(())
    }

    async fn cleanup_redis(&self) -> anyhow::Result<()> {
        let client = redis::Client::open(self.services.redis_url.as_str()).context("parsing the Redis URL")?;
        let mut redis = client.get_multiplexed_async_connection().await.context("connecting to Redis")?;
        let pattern = format!("{}:*", self.names.namespace());
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut redis)
                .await
                .context("scanning the namespace's Redis keys")?;
            if !keys.is_empty() {
                let _: () = redis::cmd("UNLINK").arg(keys).query_async(&mut redis).await.context("unlinking keys")?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn drop_database(&self) -> anyhow::Result<()> {
        let admin = admin_pool(&self.services.database_url).await?;
        let database = format!("walletq_{}", self.names.namespace());
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")))
            .execute(&admin)
            .await
            .with_context(|| format!("dropping database {database}"))?;
        admin.close().await;
        Ok(())
    }
}

/// A one-connection pool on the server's `postgres` database.
async fn admin_pool(database_url: &str) -> anyhow::Result<PgPool> {
    let mut url = url::Url::parse(database_url).context("parsing DATABASE_URL")?;
    url.set_path("/postgres");
    PgPoolOptions::new()
        .max_connections(1)
        .connect(url.as_str())
        .await
        .with_context(|| format!("connecting to {}", redact_url(url.as_str())))
}

/// `wanted` connections, or fewer when the server has not that many to spare.
pub async fn affordable_connections(database_url: &str, wanted: u32) -> anyhow::Result<u32> {
    let admin = admin_pool(database_url).await?;
    let (max, used): (i64, i64) = sqlx::query_as(
        "SELECT current_setting('max_connections')::bigint - current_setting('superuser_reserved_connections')::bigint,
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(&admin)
    .await
    .context("reading max_connections")?;
    admin.close().await;
    let spare = u32::try_from((max - used - DB_CONNECTIONS_SPARE).max(1)).unwrap_or(1);
    Ok(wanted.min(spare))
}

/// Versions of the services, for the record.
pub async fn service_versions(services: &ServiceSettings) -> HashMap<String, String> {
    let mut versions = HashMap::new();
    if let Ok(admin) = admin_pool(&services.database_url).await {
        if let Ok(version) = sqlx::query_scalar::<_, String>("SHOW server_version").fetch_one(&admin).await {
            versions.insert("postgresql".into(), version);
        }
        for setting in ["synchronous_commit", "shared_buffers", "max_connections"] {
            let query = sqlx::AssertSqlSafe(format!("SHOW {setting}"));
            if let Ok(value) = sqlx::query_scalar::<_, String>(query).fetch_one(&admin).await {
                versions.insert(format!("postgresql.{setting}"), value);
            }
        }
        admin.close().await;
    }
    if let Ok(client) = redis::Client::open(services.redis_url.as_str()) {
        if let Ok(mut redis) = client.get_multiplexed_async_connection().await {
            if let Ok(info) = redis::cmd("INFO").arg("server").query_async::<String>(&mut redis).await {
                if let Some(version) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
                    versions.insert("redis".into(), version.trim().to_owned());
                }
            }
        }
    }
    versions
}
