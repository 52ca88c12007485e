//! Node loss on the clustered engines users deploy: a 3-node RabbitMQ cluster
//! (`scripts/cluster-check.sh`) and Redis with Sentinel (`scripts/sentinel-check.sh`). Three
//! worker processes serve 20,000 requests published at 1,000 per second by a producer that
//! fails over too, while real nodes are SIGKILLed: nothing may be lost, applied twice or
//! applied out of per-user order, and the audit must be clean. Each test prints one summary
//! line with the time until every partition was served again after each kill.
//!
//! Both need instances of their own, so they are `#[ignore]`d; the scripts start the
//! instances, run one test each with `AMQP_URL` or `REDIS_URL` pointing at them and the
//! script itself as `WALLETQ_CLUSTER_CTL` or `WALLETQ_SENTINEL_CTL` (kill, start, leaders),
//! and stop them afterwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use walletq::broker::{Publisher, request_properties};
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Request, Status, partitioning::partition_of};

use crate::chaos::{Findings, analyse, read_results, user_history};
use crate::support::{
    CleanupOnDrop, TestApp, WorkerProcess, eventually, free_port, http_get, mixed_requests, spawn_app_with,
    spawn_worker_process_with, user_windows,
};

const REQUESTS: usize = 20_000;
const USERS: u64 = 200;
const PARTITIONS: u16 = 16;
const PUBLISH_RATE_PER_SEC: u64 = 1_000;
/// Most requests in flight before the producer awaits their confirms (fewer when a user
/// would appear twice).
const WINDOW: usize = 250;
/// Longest a kill may leave a partition unserved (measured figures in docs/SCALING.md).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// Longest the whole run may take.
const DEADLINE: Duration = Duration::from_secs(300);
/// The cluster test's producer stops here until the second node is killed, so that kill
/// too meets a stream in flight whatever the first restart took.
const HOLD_AT: usize = 14_000;

/// The control script of the instances under test (`kill`, `start`, `leaders`, …).
struct Ctl(String);

impl Ctl {
    fn from_env(variable: &str, script: &str) -> Ctl {
        Ctl(std::env::var(variable).unwrap_or_else(|_| panic!("{variable} is not set: run this test through {script}")))
    }

    /// Runs the script with `args`; its standard output.
    async fn run(&self, args: &[&str]) -> String {
        let (program, args) = (self.0.clone(), args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>());
        tokio::task::spawn_blocking(move || {
            let output = Command::new(&program).args(&args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
            assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        })
        .await
        .expect("control script")
    }
}

/// The paced producer: publishes every request with confirms, a window at a time (no user
/// twice in a window), and reconnects through the address list when a window fails, sending
/// again from the first unconfirmed request of the window. A user never has two unconfirmed
/// requests, so a leader change that refuses one publish and accepts a later one cannot put
/// a user's later request ahead of an earlier one (PROTOCOL.md, "Publishing in order").
struct Producer {
    /// Requests confirmed so far, in order: everything below was confirmed.
    confirmed: Arc<AtomicUsize>,
    /// Set to let the producer past `hold_at`.
    release: Arc<std::sync::atomic::AtomicBool>,
    /// Requests sent again after a failed window.
    task: tokio::task::JoinHandle<usize>,
}

impl Producer {
    /// Publishes `requests`, holding before request `hold_at` until [`Producer::release`].
    fn start(app: &TestApp, reply_to: &str, requests: &Arc<Vec<Request>>, hold_at: usize) -> Producer {
        let confirmed = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = Target {
            amqp_url: app.services.amqp_url.clone(),
            exchange: app.names.requests_exchange(),
            reply_to: reply_to.to_owned(),
        };
        let gate = Gate { at: hold_at, release: release.clone() };
        let task = tokio::spawn(produce(target, requests.clone(), confirmed.clone(), gate));
        Producer { confirmed, release, task }
    }

    /// Lets the producer past its hold.
    fn release(&self) {
        self.release.store(true, Ordering::Relaxed);
    }

    fn confirmed(&self) -> usize {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` requests are confirmed.
    async fn reached(&self, n: usize) {
        eventually(&format!("{n} requests confirmed"), DEADLINE, || async { (self.confirmed() >= n).then_some(()) })
            .await;
    }
}

/// Where the producer publishes.
struct Target {
    amqp_url: String,
    exchange: String,
    reply_to: String,
}

/// Where the producer holds, and what releases it.
struct Gate {
    at: usize,
    release: Arc<std::sync::atomic::AtomicBool>,
}

async fn produce(target: Target, requests: Arc<Vec<Request>>, progress: Arc<AtomicUsize>, gate: Gate) -> usize {
    let Target { amqp_url, exchange, reply_to } = target;
    let mut resent = 0;
    let mut publisher: Option<(lapin::Connection, Publisher)> = None;
    let started = tokio::time::Instant::now();
    let mut held = Duration::ZERO;
    for (first, window) in user_windows(&requests, WINDOW, |r| r.user_id.as_str()) {
        let due = Duration::from_millis(first as u64 * 1_000 / PUBLISH_RATE_PER_SEC);
        tokio::time::sleep_until(started + held + due).await;
        if first >= gate.at && !gate.release.load(Ordering::Relaxed) {
            let holding = tokio::time::Instant::now();
            while !gate.release.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            held += holding.elapsed();
        }
        let mut confirmed = 0;
        while confirmed < window.len() {
            let Some((_, current)) = &publisher else {
                publisher = match walletq::broker::connect(&amqp_url, "node-loss producer", None).await {
                    Ok(connection) => Publisher::open(&connection).await.ok().map(|p| (connection, p)),
                    Err(_) => None,
                };
                if publisher.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            };
            let attempt = async {
                let mut confirms = Vec::with_capacity(window.len() - confirmed);
                for r in &window[confirmed..] {
                    let properties = request_properties(r.request_id.as_str())
                        .with_reply_to(reply_to.as_str().into())
                        .with_correlation_id(r.request_id.as_str().into());
                    confirms.push(current.send(&exchange, r.user_id.as_str(), &r.to_json(), properties).await?);
                }
                for confirm in confirms {
                    Publisher::confirmed(confirm).await?;
                    confirmed += 1;
                    progress.store(first + confirmed, Ordering::Relaxed);
                }
                anyhow::Ok(())
            };
            if !matches!(tokio::time::timeout(Duration::from_secs(15), attempt).await, Ok(Ok(()))) {
                resent += window.len() - confirmed;
                publisher = None;
            }
        }
    }
    resent
}

/// Where each request sits: its index in publish order and its partition.
fn positions(requests: &[Request]) -> HashMap<String, (usize, u16)> {
    let position = |(i, r): (usize, &Request)| {
        (r.request_id.as_str().to_owned(), (i, partition_of(r.user_id.as_str(), PARTITIONS)))
    };
    requests.iter().enumerate().map(position).collect()
}

/// What a kill was followed by.
#[derive(Debug)]
struct Recovery {
    /// Until every partition had applied a request not yet confirmed at the kill.
    served: Duration,
    /// Until the producer had its first confirm after the kill.
    producer: Duration,
}

/// How long after `since` every partition had applied a request from index `from` on (not
/// yet confirmed when the node died), and the producer had a confirm again; the partitions
/// still waiting when `bound` ran out.
async fn served_again(
    pool: &sqlx::PgPool,
    positions: &HashMap<String, (usize, u16)>,
    producer: &Producer,
    from: usize,
    since: Instant,
    bound: Duration,
) -> Result<Recovery, BTreeSet<u16>> {
    let mut waiting: BTreeSet<u16> = (0..PARTITIONS).collect();
    let mut producer_back = None;
    let mut cursor = chrono::Utc::now() - chrono::Duration::seconds(30);
    while !waiting.is_empty() || producer_back.is_none() {
        if since.elapsed() > bound {
            return Err(waiting);
        }
        if producer_back.is_none() && producer.confirmed() > from {
            producer_back = Some(since.elapsed());
        }
        let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT request_id, processed_at FROM requests WHERE processed_at >= $1")
                .bind(cursor)
                .fetch_all(pool)
                .await
                .expect("the requests applied since the cursor");
        let mut latest = cursor;
        for (id, at) in &rows {
            if let Some(&(index, partition)) = positions.get(id) {
                if index >= from {
                    waiting.remove(&partition);
                }
            }
            latest = latest.max(*at);
        }
        // A transaction may commit after a later one: look back 2 s each time.
        cursor = cursor.max(latest - chrono::Duration::seconds(2));
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(Recovery { served: since.elapsed(), producer: producer_back.unwrap_or_default() })
}

/// Measures [`served_again`] and fails the test past [`RECOVERY_BOUND`].
async fn assert_served_again(
    app: &TestApp,
    positions: &HashMap<String, (usize, u16)>,
    producer: &Producer,
    from: usize,
    since: Instant,
) -> Recovery {
    match served_again(&app.pool, positions, producer, from, since, RECOVERY_BOUND).await {
        Ok(recovery) => recovery,
        Err(waiting) => panic!("partitions {waiting:?} not served again within {RECOVERY_BOUND:?} of the kill"),
    }
}

/// A durable quorum queue for the run's results: it survives a node's loss.
async fn declare_replies(app: &TestApp, queue: &str) -> CleanupOnDrop {
    let channel = app.connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments).await.expect("declare replies");
    let (url, queue) = (app.services.amqp_url.clone(), queue.to_owned());
    CleanupOnDrop::new(async move {
        if let Ok(connection) = walletq::broker::connect(&url, "node-loss cleanup", None).await {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
            }
        }
    })
}

/// Three worker processes, each with its metrics address; `amqp_url` gives each one's broker
/// address list (worker `i`'s).
fn spawn_workers(app: &TestApp, amqp_url: impl Fn(usize) -> String) -> Vec<(WorkerProcess, String)> {
    (0..3)
        .map(|i| {
            let metrics = format!("127.0.0.1:{}", free_port());
            let url = amqp_url(i);
            // NODE_LOSS_LOG=warn shows the workers' reconnects (error only by default: an
            // outage makes them warn many times a second).
            let log = std::env::var("NODE_LOSS_LOG").unwrap_or_else(|_| "error".into());
            let env =
                [("RUST_LOG", log.as_str()), ("WALLETQ_METRICS_ADDR", metrics.as_str()), ("AMQP_URL", url.as_str())];
            (spawn_worker_process_with(app, &env), metrics)
        })
        .collect()
}

/// Waits until three live workers serve all the partitions.
async fn await_three_workers(app: &TestApp) {
    eventually("3 workers serving every partition", Duration::from_secs(60), || async {
        let status = walletq::status::collect(&app.services, &app.topology, 3_000).await.ok()?;
        let served: usize = status.workers.iter().map(|w| w.partitions.len()).sum();
        (status.workers.len() == 3 && served == usize::from(PARTITIONS)).then_some(())
    })
    .await;
}

/// Everything checked at the end of a run.
struct Verdict {
    findings: Findings,
    /// The stored and answered history of the first users out of order, to explain a finding.
    histories: Vec<String>,
    stored: usize,
    entries: i64,
    approved: i64,
    audit_clean: bool,
    results_read: usize,
}

impl Verdict {
    async fn of(app: &TestApp, requests: &[Request], replies: &str) -> Verdict {
        let stored_count = || async {
            let stored: i64 = app.count("SELECT count(*) FROM requests").await;
            (stored >= REQUESTS as i64).then_some(())
        };
        eventually("every request stored", Duration::from_secs(180), stored_count).await;
        let results = read_results(&app.services.amqp_url, replies, (REQUESTS, 0), Duration::from_secs(60)).await;
        let stored = app.stored_results().await;
        let findings = analyse(requests, &results, &stored);
        let approved = stored.values().filter(|s| s.status == Status::Approved).count() as i64;
        let entries = app.count("SELECT count(*) FROM ledger_entries").await;
        let audit = walletq::ledger::audit::audit(&app.pool).await.expect("audit");
        let mut histories = Vec::new();
        for user in &findings.users_out_of_order {
            histories.push(user_history(&app.pool, &results, user).await);
        }
        Verdict {
            findings,
            histories,
            stored: stored.len(),
            entries,
            approved,
            audit_clean: audit.is_clean(),
            results_read: results.len(),
        }
    }

    /// "0 lost, 0 applied twice, 0 out of order, audit clean (…)".
    fn line(&self) -> String {
        let f = &self.findings;
        let applied_twice = f.applied_twice + usize::try_from((self.entries - self.approved).max(0)).unwrap_or(0);
        format!(
            "{} lost, {applied_twice} applied twice, {} out of order, audit {} ({} replays differing, {} results read)",
            f.lost,
            f.out_of_order,
            if self.audit_clean { "clean" } else { "FAILED" },
            f.replay_mismatch,
            self.results_read
        )
    }

    fn assert_passed(&self, summary: &str) {
        for example in self.findings.examples.iter().chain(&self.histories) {
            let _ = writeln!(std::io::stderr(), "node-loss finding: {example}");
        }
        let f = &self.findings;
        assert_eq!((f.lost, f.applied_twice, f.out_of_order, f.replay_mismatch), (0, 0, 0, 0), "{summary}");
        assert_eq!(self.stored, REQUESTS, "one stored result per request: {summary}");
        assert_eq!(self.entries, self.approved, "one ledger entry per approved request: {summary}");
        assert!(self.audit_clean, "audit: {summary}");
    }
}

/// The node (1-3) leading the most of this namespace's partition queues, other than `except`;
/// with how many it leads.
async fn most_leading_node(ctl: &Ctl, app: &TestApp, except: Option<u8>) -> (u8, usize) {
    let prefix = format!("{}.requests.", app.names.namespace());
    let listing = ctl.run(&["leaders"]).await;
    let mut led: BTreeMap<u8, usize> = (1..=3).filter(|n| Some(*n) != except).map(|n| (n, 0)).collect();
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        if let (Some(queue), Some(node)) = (words.next(), words.next().and_then(|n| n.parse::<u8>().ok())) {
            if queue.starts_with(&prefix) {
                if let Some(count) = led.get_mut(&node) {
                    *count += 1;
                }
            }
        }
    }
    led.into_iter().max_by_key(|(node, count)| (*count, std::cmp::Reverse(*node))).expect("a node")
}

/// `list` (comma-separated addresses) rotated left by `by`.
fn rotated(list: &str, by: usize) -> String {
    let mut addresses: Vec<&str> = walletq::broker::amqp_addresses(list);
    let len = addresses.len().max(1);
    addresses.rotate_left(by % len);
    addresses.join(",")
}

/// CPU seconds the instances under test have used so far (`cpu` of the control script).
async fn cpu_seconds(ctl: &Ctl) -> f64 {
    ctl.run(&["cpu"]).await.parse().unwrap_or(f64::NAN)
}

/// The test database's transactions, time its backends spent in statements (ms) and rows
/// written, from `pg_stat_database` (PostgreSQL 14+).
async fn database_cost(app: &TestApp) -> (i64, f64, i64) {
    sqlx::query_as(
        "SELECT xact_commit, coalesce(active_time, 0), tup_inserted + tup_updated
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&app.pool)
    .await
    .expect("pg_stat_database")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node cluster of scripts/cluster-check.sh, which runs it"]
async fn cluster_node_loss_loses_nothing_and_every_partition_is_served_again() {
    let ctl = Ctl::from_env("WALLETQ_CLUSTER_CTL", "scripts/cluster-check.sh");
    let app = spawn_app_with(TopologySettings { partitions: PARTITIONS, queue_type: QueueType::Quorum }, false).await;
    let list = app.services.amqp_url.clone();
    assert_eq!(walletq::broker::amqp_addresses(&list).len(), 3, "AMQP_URL lists the 3 nodes: {list}");
    let replies = format!("{}.node-loss-replies", app.names.namespace());
    let _remove_replies = declare_replies(&app, &replies).await;
    let requests = Arc::new(mixed_requests("k", REQUESTS, USERS, 4, 10_000, 13));
    let positions = positions(&requests);
    // Each worker starts at another node of the list.
    let workers = spawn_workers(&app, |i| rotated(&list, i));
    await_three_workers(&app).await;
    let leaders_at_start = check_status(&ctl, &app, None).await;
    let started = Instant::now();
    let cpu_before = cpu_seconds(&ctl).await;
    let producer = Producer::start(&app, &replies, &requests, HOLD_AT);

    // The steady phase before the first kill: broker CPU per request, all 3 nodes together.
    producer.reached(5_000).await;
    let broker_ms = (cpu_seconds(&ctl).await - cpu_before) * 1_000.0 / producer.confirmed() as f64;
    let first = kill_most_leading(&ctl, &app, &producer, &positions, None).await;
    let leaders_after_kill = check_status(&ctl, &app, Some(first.node)).await;
    let restarting = Instant::now();
    ctl.run(&["start", &first.node.to_string()]).await;
    let restart = restarting.elapsed();

    producer.reached(HOLD_AT).await;
    let second = kill_most_leading(&ctl, &app, &producer, &positions, Some(first.node)).await;
    let resent = producer.task.await.expect("producer");
    // The cluster whole again before the end (deleting a quorum queue waits for its members).
    let second_node = second.node.to_string();
    let restart_args = ["start", second_node.as_str()];
    let (verdict, _) = tokio::join!(Verdict::of(&app, &requests, &replies), ctl.run(&restart_args));
    drop(workers);
    let summary = format!(
        "cluster: {REQUESTS} requests, 3 workers, 3 nodes (partition leaders {leaders_at_start}, after the first kill \
         {leaders_after_kill}); node {} killed (led {} of {PARTITIONS} partition queues): \
         every partition served again in {:.1} s (producer confirmed again in {:.1} s); node restarted in {:.1} s; \
         node {} killed (led {}): served again in {:.1} s (producer {:.1} s); {} ({resent} messages re-sent, {:.1} s)",
        first.node,
        first.led,
        first.recovery.served.as_secs_f64(),
        first.recovery.producer.as_secs_f64(),
        restart.as_secs_f64(),
        second.node,
        second.led,
        second.recovery.served.as_secs_f64(),
        second.recovery.producer.as_secs_f64(),
        verdict.line(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(std::io::stderr(), "{summary}");
    let _ = writeln!(
        std::io::stderr(),
        "capacity: RabbitMQ 3-node cluster CPU {broker_ms:.3} ms per request (ingress, forward, delivery, result; \
         leaders and followers together; steady phase before the first kill)"
    );
    verdict.assert_passed(&summary);
    app.cleanup().await;
}

/// `walletq status` with the management API: every partition queue has a leader, none on
/// the `dead` node, and every worker reports a broker address of the list. Returns the
/// number of partition queues each node leads, e.g. "c1:16".
async fn check_status(ctl: &Ctl, app: &TestApp, dead: Option<u8>) -> String {
    let live = if dead == Some(1) { "2" } else { "1" };
    let management = ctl.run(&["management-url", live]).await;
    let status = walletq::status::collect_with_leaders(&app.services, &app.topology, 3_000, Some(&management))
        .await
        .expect("walletq status with the management API");
    let addresses: Vec<String> = walletq::broker::amqp_addresses(&app.services.amqp_url)
        .into_iter()
        .filter_map(|a| url::Url::parse(a).ok())
        .map(|u| format!("{}:{}", u.host_str().unwrap_or_default(), u.port().unwrap_or(5672)))
        .collect();
    for worker in &status.workers {
        let broker = worker.broker.as_deref().unwrap_or_default();
        assert!(
            addresses.iter().any(|a| a == broker),
            "{} reports broker {broker:?}, not one of {addresses:?}",
            worker.worker_id
        );
    }
    let mut led: BTreeMap<String, usize> = BTreeMap::new();
    for partition in &status.partitions {
        let leader =
            partition.leader.clone().unwrap_or_else(|| panic!("partition {} has no leader", partition.partition));
        let node = leader.trim_start_matches("walletq-").split('@').next().unwrap_or_default().to_owned();
        assert!(
            dead.is_none_or(|d| node != format!("c{d}")),
            "partition {} still led by the dead node",
            partition.partition
        );
        *led.entry(node).or_default() += 1;
    }
    led.iter().map(|(node, n)| format!("{node}:{n}")).collect::<Vec<_>>().join(" ")
}

/// A node kill and what followed.
struct Kill {
    node: u8,
    /// Partition queues it led.
    led: usize,
    /// Until every partition was served again, and the producer had a confirm again.
    recovery: Recovery,
}

/// SIGKILLs the node leading the most partition queues (other than `except`), then releases
/// the producer (held at [`HOLD_AT`] once there), and measures until every partition is
/// served again.
async fn kill_most_leading(
    ctl: &Ctl,
    app: &TestApp,
    producer: &Producer,
    positions: &HashMap<String, (usize, u16)>,
    except: Option<u8>,
) -> Kill {
    let (node, led) = most_leading_node(ctl, app, except).await;
    let from = producer.confirmed();
    let killed = Instant::now();
    ctl.run(&["kill", &node.to_string()]).await;
    if from >= HOLD_AT {
        producer.release();
    }
    match served_again(&app.pool, positions, producer, from, killed, RECOVERY_BOUND).await {
        Ok(recovery) => Kill { node, led, recovery },
        Err(waiting) => {
            let queues = ctl.run(&["queues"]).await;
            let stored = app.count("SELECT count(*) FROM requests").await;
            panic!(
                "node {node} killed: partitions {waiting:?} not served again within {RECOVERY_BOUND:?} \
                 ({stored} requests stored, {} confirmed); queues:\n{queues}",
                producer.confirmed()
            )
        }
    }
}

/// Completed batches, from the batch size histogram.
const BATCHES: &str = "walletq_batch_size_count";

/// A counter's value summed over the workers' `/metrics` (0 where it was never counted).
async fn counter_total(workers: &[(WorkerProcess, String)], name: &str) -> f64 {
    let mut total = 0.0;
    for (_, metrics) in workers {
        let Some((200, body)) = http_get(metrics, "/metrics").await else { continue };
        let value = body.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.split_whitespace().last());
        total += value.filter_map(|v| v.parse::<f64>().ok()).sum::<f64>();
    }
    total
}

/// The role (`master`, `slave`) the Redis server on `port` reports.
async fn redis_role(port: &str) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut connection).await.ok()?;
    match role.first() {
        Some(redis::Value::BulkString(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Some(redis::Value::SimpleString(text)) => Some(text.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Redis master, replica and Sentinels of scripts/sentinel-check.sh, which runs it"]
async fn sentinel_failover_loses_nothing_and_stale_fences_are_refused() {
    let ctl = Ctl::from_env("WALLETQ_SENTINEL_CTL", "scripts/sentinel-check.sh");
    let app = spawn_app_with(TopologySettings { partitions: PARTITIONS, queue_type: QueueType::Quorum }, false).await;
    assert!(app.services.redis_url.starts_with("redis+sentinel://"), "REDIS_URL names the Sentinels");
    let replies = format!("{}.node-loss-replies", app.names.namespace());
    let _remove_replies = declare_replies(&app, &replies).await;
    let requests = Arc::new(mixed_requests("n", REQUESTS, USERS, 4, 10_000, 17));
    let positions = positions(&requests);
    let amqp_url = app.services.amqp_url.clone();
    let workers = spawn_workers(&app, |_| amqp_url.clone());
    await_three_workers(&app).await;
    let started = Instant::now();
    let (redis_before, batches_before) = (cpu_seconds(&ctl).await, counter_total(&workers, BATCHES).await);
    let producer = Producer::start(&app, &replies, &requests, usize::MAX);

    producer.reached(6_000).await;
    // The steady phase before the kill: Redis CPU (master and replica) per batch.
    let batches = counter_total(&workers, BATCHES).await - batches_before;
    let redis_ms = (cpu_seconds(&ctl).await - redis_before) * 1_000.0 / batches;
    let from = producer.confirmed();
    let killed = Instant::now();
    let old_master = ctl.run(&["kill-master"]).await;
    let promoted = eventually("a replica promoted", Duration::from_secs(60), || async {
        let master = ctl.run(&["master"]).await;
        (master != old_master).then_some(killed.elapsed())
    })
    .await;
    let recovery = assert_served_again(&app, &positions, &producer, from, killed).await;
    ctl.run(&["start", &old_master]).await;
    let back = Instant::now();
    let rejoin = eventually("the old master back as a replica", Duration::from_secs(60), || async {
        (redis_role(&old_master).await.as_deref() == Some("slave")).then(|| back.elapsed())
    })
    .await;

    let resent = producer.task.await.expect("producer");
    let verdict = Verdict::of(&app, &requests, &replies).await;
    let stale = counter_total(&workers, "walletq_stale_fence_total").await;
    let (transactions, active_ms, rows) = database_cost(&app).await;
    let unavailable = counter_total(&workers, "walletq_lock_unavailable_total").await;
    drop(workers);
    let summary = format!(
        "sentinel: {REQUESTS} requests, 3 workers; master {old_master} SIGKILLed: replica promoted in {:.1} s, every partition \
         served again in {:.1} s, old master a replica again {:.1} s after its restart; {stale} batches refused by a stale fence, \
         {unavailable} returned while Redis was unavailable; {} ({resent} messages re-sent, {:.1} s)",
        promoted.as_secs_f64(),
        recovery.served.as_secs_f64(),
        rejoin.as_secs_f64(),
        verdict.line(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(std::io::stderr(), "{summary}");
    let _ = writeln!(
        std::io::stderr(),
        "capacity: Redis CPU {redis_ms:.3} ms per batch ({batches} batches before the kill, master and replica); \
         PostgreSQL {transactions} transactions, {:.2} ms in statements per transaction, {rows} rows written \
         ({:.3} ms per row)",
        active_ms / transactions.max(1) as f64,
        active_ms / rows.max(1) as f64
    );
    verdict.assert_passed(&summary);
    app.cleanup().await;
}
