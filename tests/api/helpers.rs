//! `spawn_app`: an isolated walletq (namespace, database, Redis prefix) with a worker.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
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
use walletq::domain::{Money, Op, Request, RequestId, RequestResult, Status, UserId};
use walletq::ledger::Ledger;

/// How long a test waits for results before it fails.
pub(crate) const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

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
    pub(crate) async fn cleanup(mut self) {
        self.stop_worker().await;
        // A fresh connection: the test may have restarted the broker under the old one.
        let connection =
            walletq::broker::connect(&self.services.amqp_url, "walletq test cleanup", None).await.expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        let mut queues: Vec<String> = (0..self.topology.partitions).map(|i| self.names.partition_queue(i)).collect();
        queues.push(self.names.dead_queue());
        queues.push(self.names.ingress_queue());
        queues.push(self.names.results_queue());
        for queue in queues {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for exchange in [self.names.requests_exchange(), self.names.dead_exchange()] {
            let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = connection.close(200, "OK".into()).await;
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
        drop_database(&self.services.namespace).await;
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

/// A valid request.
pub(crate) fn request(id: impl AsRef<str>, user: &str, op: Op, amount_cents: i64) -> Request {
    Request {
        request_id: RequestId::parse(id.as_ref()).expect("request id"),
        user_id: UserId::parse(user).expect("user id"),
        op,
        amount: Money::from_cents(amount_cents).expect("amount"),
    }
}

/// The rules, written again independently and in integer cents, as the oracle.
#[derive(Default)]
pub(crate) struct SequentialModel {
    balances: HashMap<String, i64>,
}

impl SequentialModel {
    /// Applies one request; returns (status, reason, balance after in cents).
    pub(crate) fn apply(&mut self, request: &Request) -> (Status, Option<&'static str>, Option<i64>) {
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

    pub(crate) fn balance(&self, user: &str) -> Option<i64> {
        self.balances.get(user).copied()
    }
}

/// Checks a result against the model's verdict.
pub(crate) fn assert_matches_model(result: &RequestResult, expected: (Status, Option<&'static str>, Option<i64>)) {
    let (status, reason, balance) = expected;
    assert_eq!(result.status, status, "status of {:?}", result.request_id);
    assert_eq!(result.reason.map(|r| r.as_str()), reason, "reason of {:?}", result.request_id);
    assert_eq!(result.balance.map(Money::cents), balance, "balance of {:?}", result.request_id);
}

/// A tiny deterministic generator (tests must be reproducible).
pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub(crate) fn next_below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

/// A `walletq worker` child process, killed when dropped so a failing test leaves none behind.
pub(crate) struct WorkerProcess(Child);

impl WorkerProcess {
    /// SIGKILL, then reap.
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGSTOP: the process freezes wherever it is; its connections stay open.
    #[allow(dead_code, reason = "used by tests/chaos.rs")]
    pub(crate) fn pause(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.0.id() as i32, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP the worker");
    }

    /// SIGCONT after [`WorkerProcess::pause`].
    #[allow(dead_code, reason = "used by tests/chaos.rs")]
    pub(crate) fn resume(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
        assert_eq!(rc, 0, "SIGCONT the worker");
    }

    /// SIGTERM, then wait for the exit status.
    pub(crate) async fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM the worker");
        let mut child = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("placeholder"));
        tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the real `walletq worker` binary on this app's namespace and database.
pub(crate) fn spawn_worker_process(app: &TestApp) -> WorkerProcess {
    spawn_worker_process_with(app, &[])
}

/// Same, with extra environment (for instance `WALLETQ_METRICS_ADDR`, or a service URL
/// through a fault relay); stderr goes to the test's.
pub(crate) fn spawn_worker_process_with(app: &TestApp, extra_env: &[(&str, &str)]) -> WorkerProcess {
    spawn_worker_process_logging(app, extra_env, Stdio::inherit())
}

/// Same, with the worker's stderr (its log) sent to `stderr`, for instance a file the test
/// reads to observe what the worker did.
pub(crate) fn spawn_worker_process_logging(app: &TestApp, extra_env: &[(&str, &str)], stderr: Stdio) -> WorkerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_walletq"));
    command
        .arg("worker")
        .env("DATABASE_URL", &app.services.database_url)
        .env("AMQP_URL", &app.services.amqp_url)
        .env("REDIS_URL", &app.services.redis_url)
        .env("WALLETQ_NAMESPACE", &app.services.namespace)
        .env("WALLETQ_PARTITIONS", app.topology.partitions.to_string())
        .env("WALLETQ_QUEUE_TYPE", app.topology.queue_type.as_str())
        .env("WALLETQ_LOCK_TTL_MS", "2000")
        .env("WALLETQ_BACKOFF_MAX_MS", "200")
        .env("WALLETQ_BATCH_MAX", "64")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    WorkerProcess(command.spawn().expect("start the walletq binary"))
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

/// A minimal HTTP/1.1 GET over loopback: (status code, body).
pub(crate) async fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// A free loopback port for a child process to bind.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// `count` deterministic requests over `users` users named `<prefix>-<n>`: deposits with
/// probability `deposits_per_10` in 10, amounts 0.01 to `max_cents` cents.
pub(crate) fn mixed_requests(
    prefix: &str,
    count: usize,
    users: u64,
    deposits_per_10: u64,
    max_cents: u64,
    seed: u64,
) -> Vec<Request> {
    let mut rng = Lcg(seed);
    (0..count)
        .map(|i| {
            let user = format!("{prefix}-{}", rng.next_below(users));
            let op = if rng.next_below(10) < deposits_per_10 { Op::Deposit } else { Op::Withdraw };
            request(format!("{prefix}-{i}"), &user, op, 1 + rng.next_below(max_cents) as i64)
        })
        .collect()
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
