//! The fixture: [`spawn_app`] starts an isolated walletq (namespace, database, Redis prefix)
//! with a worker; [`isolated_services`] gives a fresh namespace and database to tests that
//! build their own parts, and [`CleanupOnDrop::database`] drops that database when it goes
//! out of scope. Whatever a fixture creates is removed when it is dropped, even when the
//! test panics.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use walletq::broker::{Names, Publisher, declare_topology, request_properties};
use walletq::configuration::{QueueType, ServiceSettings, TopologySettings, WorkerSettings};
use walletq::domain::{Money, Request, RequestResult};
use walletq::ledger::Ledger;

/// How long a test waits for results before it fails.
pub(crate) const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable `key`, or `default`.
pub(crate) fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// Settings for the local services, with a fresh namespace and database.
pub(crate) fn isolated_services() -> ServiceSettings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let namespace = format!("t{}", &id[..12]);
    let base = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL must be a URL");
    url.set_path(&format!("walletq_{namespace}"));
    ServiceSettings {
        database_url: url.to_string(),
        amqp_url: env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        redis_url: env_or("REDIS_URL", "redis://127.0.0.1:6379"),
        ca_file: None,
        namespace,
    }
}

/// A running, isolated walletq with a reply queue that collects results.
pub(crate) struct TestApp {
    pub services: ServiceSettings,
    pub topology: TopologySettings,
    pub names: Names,
    pub pool: PgPool,
    pub connection: Connection,
    pub publisher: Publisher,
    pub reply_queue: String,
    results: mpsc::UnboundedReceiver<(BasicProperties, RequestResult)>,
    worker: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// Set once [`TestApp::cleanup`] has run: the drop has nothing left to do.
    cleaned: bool,
}

/// Starts an isolated app with an in-process worker (4 quorum partitions).
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Quorum }, true).await
}

/// Starts an isolated app; with `worker: false` only the topology and database exist.
pub(crate) async fn spawn_app_with(topology: TopologySettings, worker: bool) -> TestApp {
    let services = isolated_services();
    let names = Names::new(services.namespace.clone());
    let ledger = Ledger::connect(&services.database_url, 4, None).await.expect("PostgreSQL must be reachable");
    let connection =
        walletq::broker::connect(&services.amqp_url, "walletq test", None).await.expect("RabbitMQ must be reachable");
    let setup = connection.create_channel().await.expect("channel");
    declare_topology(&setup, &names, &topology).await.expect("topology");
    let publisher = Publisher::open(&connection).await.expect("publisher");

    let (reply_queue, mut consumer) = walletq::broker::open_reply_queue(&connection).await.expect("reply queue");
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
        cleaned: false,
    };
    if worker {
        app.start_worker();
    }
    app
}

impl TestApp {
    /// Worker settings for tests: small lock TTL so takeovers are quick.
    pub(crate) fn worker_settings(&self) -> WorkerSettings {
        WorkerSettings { lock_ttl_ms: 2_000, backoff_max_ms: 200, db_connections: 4, ..WorkerSettings::default() }
    }

    /// Starts the in-process worker.
    pub(crate) fn start_worker(&mut self) {
        let settings = self.worker_settings();
        self.start_worker_with(settings);
    }

    /// Starts the in-process worker with the given settings.
    pub(crate) fn start_worker_with(&mut self, settings: WorkerSettings) {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(walletq::worker::run_worker(
            self.services.clone(),
            self.topology.clone(),
            settings,
            shutdown.clone(),
        ));
        self.worker = Some((shutdown, handle));
    }

    /// Publishes requests (replies to this app's queue), all in flight before any confirm
    /// is awaited.
    pub(crate) async fn publish_all(&self, requests: &[Request]) {
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
    pub(crate) async fn publish_raw(&self, routing_key: &str, body: &[u8], reply_to: Option<&str>) {
        let mut properties = walletq::broker::json_properties();
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let confirm =
            self.publisher.send(&self.names.requests_exchange(), routing_key, body, properties).await.expect("publish");
        Publisher::confirmed(confirm).await.expect("confirm");
    }

    /// Waits for the next `n` results on the reply queue.
    pub(crate) async fn next_results(&mut self, n: usize) -> Vec<(BasicProperties, RequestResult)> {
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

    /// A result that has already arrived on the reply queue, without waiting.
    pub(crate) fn try_next_result(&mut self) -> Option<RequestResult> {
        self.results.try_recv().ok().map(|(_, result)| result)
    }

    /// Results of `n` requests, keyed by request id.
    pub(crate) async fn results_by_id(&mut self, n: usize) -> HashMap<String, RequestResult> {
        self.next_results(n)
            .await
            .into_iter()
            .map(|(_, r)| (r.request_id.as_ref().expect("request id").as_str().to_owned(), r))
            .collect()
    }

    /// The balance stored for `user`, if it has a wallet.
    pub(crate) async fn balance(&self, user: &str) -> Option<Money> {
        let value: Option<rust_decimal::Decimal> = sqlx::query_scalar("SELECT balance FROM wallets WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .expect("balance query");
        value.map(|v| Money::from_decimal(v).expect("valid money"))
    }

    /// Count of rows that a scalar query returns.
    pub(crate) async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect("count query")
    }

    /// Sum of ledger deltas of `user` equals its balance.
    pub(crate) async fn assert_ledger_matches_balance(&self, user: &str) {
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
    pub(crate) async fn stop_worker(&mut self) {
        if let Some((shutdown, handle)) = self.worker.take() {
            shutdown.cancel();
            handle.await.expect("worker task").expect("worker result");
        }
    }

    /// Stops the worker and removes the namespace's queues, exchanges, Redis keys and database.
    /// Dropping the app does the same (see the `Drop` impl); this is the graceful way, and
    /// the drop is then a no-op.
    pub(crate) async fn cleanup(mut self) {
        self.stop_worker().await;
        let _ = self.connection.close(200, "OK".into()).await;
        self.pool.close().await;
        remove_namespace(self.services.clone(), self.names.clone(), self.topology.partitions, true).await;
        self.cleaned = true;
    }
}

/// A test that panics never reaches `cleanup().await`: the drop removes what the app created.
/// It cannot await, so it stops the in-process worker (cancelled, then aborted: the test's
/// runtime may be blocked in this very drop) and runs the removal on a thread of its own
/// with a runtime of its own, waiting for it. Its fresh connections do not depend on the
/// test's runtime; the database is dropped `WITH (FORCE)`, closing the app's own sessions.
impl Drop for TestApp {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        if let Some((shutdown, handle)) = self.worker.take() {
            shutdown.cancel();
            handle.abort();
        }
        let (services, names, partitions) = (self.services.clone(), self.names.clone(), self.topology.partitions);
        block_on_fresh_runtime(remove_namespace(services, names, partitions, false));
    }
}

/// Runs `future` to completion on a new thread with its own current-thread runtime, and
/// waits for it: for a `Drop`, which cannot await and may run inside (or while unwinding
/// out of) the test's runtime.
pub(crate) fn block_on_fresh_runtime(future: impl std::future::Future<Output = ()> + Send + 'static) {
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("cleanup runtime").block_on(future)
    });
    let _ = thread.join();
}

/// Runs an async cleanup when dropped, also when the test panics (through
/// [`block_on_fresh_runtime`]): for what a test creates besides a [`TestApp`].
pub(crate) struct CleanupOnDrop(Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>);

impl CleanupOnDrop {
    /// Runs `cleanup` when the guard is dropped.
    pub(crate) fn new(cleanup: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        CleanupOnDrop(Some(Box::pin(cleanup)))
    }

    /// Drops the database of `namespace` (from [`isolated_services`]) when the guard is
    /// dropped; an explicit [`drop_database`] before that is harmless.
    pub(crate) fn database(namespace: &str) -> Self {
        let namespace = namespace.to_owned();
        CleanupOnDrop::new(async move { drop_database(&namespace).await })
    }
}

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        if let Some(cleanup) = self.0.take() {
            block_on_fresh_runtime(cleanup);
        }
    }
}

/// Removes a namespace's queues, exchanges, Redis keys and database, over fresh connections
/// (the test may have restarted a service under the old ones). What is already gone is
/// skipped; a broker that does not answer fails the test when `strict` (the explicit
/// [`TestApp::cleanup`]), and is skipped otherwise (a drop, maybe of a failing test).
async fn remove_namespace(services: ServiceSettings, names: Names, partitions: u16, strict: bool) {
    let connection = walletq::broker::connect(&services.amqp_url, "walletq test cleanup", None).await;
    assert!(!strict || connection.is_ok(), "broker: {:?}", connection.as_ref().err());
    if let Ok(connection) = connection {
        let channel = connection.create_channel().await;
        assert!(!strict || channel.is_ok(), "channel: {:?}", channel.as_ref().err());
        if let Ok(channel) = channel {
            let mut queues: Vec<String> = (0..partitions).map(|i| names.partition_queue(i)).collect();
            queues.push(names.dead_queue());
            queues.push(names.ingress_queue());
            queues.push(names.results_queue());
            for queue in queues {
                let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
            }
            for exchange in [names.requests_exchange(), names.dead_exchange()] {
                let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
            }
        }
        let _ = connection.close(200, "OK".into()).await;
    }
    remove_redis_keys(&services.redis_url, names.namespace()).await;
    drop_database(&services.namespace).await;
}

/// Deletes every Redis key of `namespace` (best effort).
pub(crate) async fn remove_redis_keys(redis_url: &str, namespace: &str) {
    if let Ok(client) = redis::Client::open(redis_url) {
        if let Ok(mut redis) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{namespace}:*")).query_async(&mut redis).await.unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
            }
        }
    }
}

/// Drops the database of an isolated namespace (see [`isolated_services`]).
pub(crate) async fn drop_database(namespace: &str) {
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"walletq_{namespace}\" WITH (FORCE)")))
        .execute(&admin_pool().await)
        .await;
}

/// A pool on the server's `postgres` database (superuser), for what a test database cannot do.
pub(crate) async fn admin_pool() -> PgPool {
    let base = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL must be a URL");
    url.set_path("/postgres");
    PgPool::connect(url.as_str()).await.expect("admin connection")
}

/// Waits until at least `at_least` requests are stored.
pub(crate) async fn wait_for_stored(app: &TestApp, at_least: i64, timeout: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let stored = app.count("SELECT count(*) FROM requests").await;
        if stored >= at_least {
            return stored;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {stored} of {at_least} requests stored in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, or fails after `timeout`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestApp {
    /// Every stored result, by request id.
    pub(crate) async fn stored_results(&self) -> HashMap<String, RequestResult> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT request_id, result::text FROM requests")
            .fetch_all(&self.pool)
            .await
            .expect("stored results");
        rows.into_iter().map(|(id, r)| (id, serde_json::from_str(&r).expect("a stored result"))).collect()
    }

    /// Messages ready in `queue` (not counting deliveries held unacked by a consumer), from a
    /// passive declaration on a channel of its own.
    pub(crate) async fn queue_ready(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("queue exists");
        let _ = channel.close(200, "OK".into()).await;
        declared.message_count()
    }

    /// Consumes `queue` without acks (for reading results or dead letters in tests).
    pub(crate) async fn consume(&self, queue: &str) -> lapin::Consumer {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume")
    }

    /// The next message on a consumer, failing the test after [`RESULT_TIMEOUT`].
    pub(crate) async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
        tokio::time::timeout(RESULT_TIMEOUT, consumer.next())
            .await
            .expect("a message in time")
            .expect("consumer open")
            .expect("a delivery")
    }
}
