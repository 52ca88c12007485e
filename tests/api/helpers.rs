//! `spawn_app`: an isolated walletq (namespace, database, Redis prefix) with a worker.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use walletq::broker::{Names, Publisher, declare_topology, request_properties};
use walletq::configuration::{QueueType, ServiceSettings, TopologySettings, WorkerSettings};
use walletq::domain::{Money, Op, Request, RequestId, RequestResult, Status, UserId};
use walletq::ledger::Ledger;

/// How long a test waits for results before it fails.
pub const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// Settings for the local services, with a fresh namespace and database.
pub fn isolated_services() -> ServiceSettings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let namespace = format!("t{}", &id[..12]);
    let base = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL must be a URL");
    url.set_path(&format!("walletq_{namespace}"));
    ServiceSettings {
        database_url: url.to_string(),
        amqp_url: env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        redis_url: env_or("REDIS_URL", "redis://127.0.0.1:6379"),
        namespace,
    }
}

/// A running, isolated walletq with a reply queue that collects results.
pub struct TestApp {
    pub services: ServiceSettings,
    pub topology: TopologySettings,
    pub names: Names,
    pub pool: PgPool,
    pub connection: Connection,
    pub publisher: Publisher,
    pub reply_queue: String,
    results: mpsc::UnboundedReceiver<(BasicProperties, RequestResult)>,
    worker: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

/// Starts an isolated app with an in-process worker (4 quorum partitions).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Quorum }, true).await
}

/// Starts an isolated app; with `worker: false` only the topology and database exist.
pub async fn spawn_app_with(topology: TopologySettings, worker: bool) -> TestApp {
    let services = isolated_services();
    let names = Names::new(services.namespace.clone());
    let ledger = Ledger::connect(&services.database_url, 4).await.expect("PostgreSQL must be reachable");
    let connection =
        walletq::broker::connect(&services.amqp_url, "walletq test").await.expect("RabbitMQ must be reachable");
    let setup = connection.create_channel().await.expect("channel");
    declare_topology(&setup, &names, &topology).await.expect("topology");
    let publisher = Publisher::open(&connection).await.expect("publisher");

    let replies = connection.create_channel().await.expect("channel");
    let (reply_queue, mut consumer) = walletq::broker::consume_reply_queue(&replies).await.expect("reply queue");
    let (sender, results) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let result: RequestResult = serde_json::from_slice(&delivery.data).expect("a result body");
            if sender.send((delivery.properties, result)).is_err() {
                break;
            }
        }
    });

    let mut app = TestApp {
        services,
        topology,
        names,
        pool: ledger.pool().clone(),
        connection,
        publisher,
        reply_queue,
        results,
        worker: None,
    };
    if worker {
        app.start_worker();
    }
    app
}

impl TestApp {
    /// Worker settings for tests: small lock TTL so takeovers are quick.
    pub fn worker_settings(&self) -> WorkerSettings {
        WorkerSettings { lock_ttl_ms: 2_000, backoff_max_ms: 200, db_connections: 4, ..WorkerSettings::default() }
    }

    /// Starts the in-process worker.
    pub fn start_worker(&mut self) {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(walletq::worker::run_worker(
            self.services.clone(),
            self.topology.clone(),
            self.worker_settings(),
            shutdown.clone(),
        ));
        self.worker = Some((shutdown, handle));
    }

    /// Publishes requests (replies to this app's queue), all in flight before any confirm
    /// is awaited.
    pub async fn publish_all(&self, requests: &[Request]) {
        let mut confirms = Vec::with_capacity(requests.len());
        for request in requests {
            let properties = request_properties(request.request_id.as_str())
                .with_reply_to(self.reply_queue.as_str().into())
                .with_correlation_id(format!("corr-{}", request.request_id).into());
            confirms.push(
                self.publisher
                    .send(&self.names.requests_exchange(), request.user_id.as_str(), &request.to_json(), properties)
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            Publisher::confirmed(confirm).await.expect("confirm");
        }
    }

    /// Publishes a raw body with the given routing key and reply queue.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], reply_to: Option<&str>) {
        let mut properties = walletq::broker::json_properties();
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let confirm =
            self.publisher.send(&self.names.requests_exchange(), routing_key, body, properties).await.expect("publish");
        Publisher::confirmed(confirm).await.expect("confirm");
    }

    /// Waits for the next `n` results on the reply queue.
    pub async fn next_results(&mut self, n: usize) -> Vec<(BasicProperties, RequestResult)> {
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.results.recv()).await {
                Ok(Some(result)) => out.push(result),
                Ok(None) => panic!("reply consumer stopped after {} of {n} results", out.len()),
                Err(_) => panic!("only {} of {n} results arrived within {RESULT_TIMEOUT:?}", out.len()),
            }
        }
        out
    }

    /// Results of `n` requests, keyed by request id.
    pub async fn results_by_id(&mut self, n: usize) -> HashMap<String, RequestResult> {
        self.next_results(n)
            .await
            .into_iter()
            .map(|(_, r)| (r.request_id.as_ref().expect("request id").as_str().to_owned(), r))
            .collect()
    }

    /// The balance stored for `user`, if it has a wallet.
    pub async fn balance(&self, user: &str) -> Option<Money> {
        let value: Option<rust_decimal::Decimal> = sqlx::query_scalar("SELECT balance FROM wallets WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .expect("balance query");
        value.map(|v| Money::from_decimal(v).expect("valid money"))
    }

    /// Count of rows that a scalar query returns.
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect("count query")
    }

    /// Sum of ledger deltas of `user` equals its balance.
    pub async fn assert_ledger_matches_balance(&self, user: &str) {
        let sum: Option<rust_decimal::Decimal> =
            sqlx::query_scalar("SELECT sum(delta) FROM ledger_entries WHERE user_id = $1")
                .bind(user)
                .fetch_one(&self.pool)
                .await
                .expect("ledger sum");
        let balance = self.balance(user).await.map(|m| m.as_decimal()).unwrap_or_default();
        assert_eq!(sum.unwrap_or_default(), balance, "ledger sum of {user} differs from its balance");
    }

    /// Stops the worker (as SIGTERM does) and waits for it.
    pub async fn stop_worker(&mut self) {
        if let Some((shutdown, handle)) = self.worker.take() {
            shutdown.cancel();
            handle.await.expect("worker task").expect("worker result");
        }
    }

    /// Stops the worker and removes the namespace's queues, exchanges, Redis keys and database.
    pub async fn cleanup(mut self) {
        self.stop_worker().await;
        let channel = self.connection.create_channel().await.expect("channel");
        let mut queues: Vec<String> = (0..self.topology.partitions).map(|i| self.names.partition_queue(i)).collect();
        queues.push(self.names.dead_queue());
        queues.push(self.names.results_queue());
        for queue in queues {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for exchange in [self.names.requests_exchange(), self.names.dead_exchange()] {
            let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = self.connection.close(200, "OK".into()).await;
        if let Ok(client) = redis::Client::open(self.services.redis_url.as_str()) {
            if let Ok(mut redis) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", self.names.namespace()))
                    .query_async(&mut redis)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
                }
            }
        }
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"walletq_{}\" WITH (FORCE)",
            self.services.namespace
        )))
        .execute(&admin_pool().await)
        .await;
    }
}

async fn admin_pool() -> PgPool {
    let base = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL must be a URL");
    url.set_path("/postgres");
    PgPool::connect(url.as_str()).await.expect("admin connection")
}

/// A valid request.
pub fn request(id: impl AsRef<str>, user: &str, op: Op, amount_cents: i64) -> Request {
    Request {
        request_id: RequestId::parse(id.as_ref()).expect("request id"),
        user_id: UserId::parse(user).expect("user id"),
        op,
        amount: Money::from_cents(amount_cents).expect("amount"),
    }
}

/// The rules, written again independently and in integer cents, as the oracle.
#[derive(Default)]
pub struct SequentialModel {
    balances: HashMap<String, i64>,
}

impl SequentialModel {
    /// Applies one request; returns (status, reason, balance after in cents).
    pub fn apply(&mut self, request: &Request) -> (Status, Option<&'static str>, Option<i64>) {
        let user = request.user_id.as_str().to_owned();
        let amount = request.amount.cents();
        match (request.op, self.balances.get(&user).copied()) {
            (Op::Deposit, balance) => {
                let after = balance.unwrap_or(0) + amount;
                self.balances.insert(user, after);
                (Status::Approved, None, Some(after))
            }
            (Op::Withdraw, None) => (Status::Rejected, Some("no_wallet"), None),
            (Op::Withdraw, Some(balance)) if balance < amount => {
                (Status::Rejected, Some("insufficient_funds"), Some(balance))
            }
            (Op::Withdraw, Some(balance)) => {
                self.balances.insert(user, balance - amount);
                (Status::Approved, None, Some(balance - amount))
            }
        }
    }

    pub fn balance(&self, user: &str) -> Option<i64> {
        self.balances.get(user).copied()
    }
}

/// Checks a result against the model's verdict.
pub fn assert_matches_model(result: &RequestResult, expected: (Status, Option<&'static str>, Option<i64>)) {
    let (status, reason, balance) = expected;
    assert_eq!(result.status, status, "status of {:?}", result.request_id);
    assert_eq!(result.reason.map(|r| r.as_str()), reason, "reason of {:?}", result.request_id);
    assert_eq!(result.balance.map(Money::cents), balance, "balance of {:?}", result.request_id);
}

/// A tiny deterministic generator (tests must be reproducible).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}
