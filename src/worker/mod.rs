//! The worker: connects the three services, declares the topology, joins the membership
//! and runs one strictly ordered pipeline per partition it owns. Partitions are assigned
//! by balanced rendezvous hashing over the live workers (heartbeats in Redis); single
//! active consumer on every queue guards the handover, per-user fenced locks back it up.

mod batch;
mod cursor;
mod endpoints;
mod expiry;
mod locking;
mod ordered;
mod partition;
mod router;
mod stats;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::jittered_delay;
use crate::broker::{self, AMQPSoftError, Names, declare_topology};
use crate::configuration::{ServiceSettings, TopologySettings, WorkerSettings};
use crate::domain::assignment::partitions_of;
use crate::ledger::group::GroupCommitter;
use crate::ledger::{Ledger, Schema};
use crate::lock::UserLocks;
use crate::membership::{Membership, WorkerReport};
pub use stats::PartitionStats;

/// The per-user lock batching the worker runs, public so integration tests can drive it
/// against a real Redis (merging, the group cap, releases) without a whole worker.
pub use locking::GroupLocker;
/// The ingress router on a connection of the caller's: public so the topology tests can
/// check its spread and the benchmark's broker-echo approach can run walletq's own hops
/// without the ledger. [`run_worker`] runs it supervised.
pub use router::{RouterSettings, run_router};

/// What every partition pipeline shares.
pub(crate) struct WorkerContext {
    /// The namespace's queue and exchange names.
    pub names: Names,
    /// PostgreSQL: applies the partitions' batches, merging those that wait together.
    pub ledger: GroupCommitter,
    /// Redis: takes and releases the partitions' user locks, merging the requests that wait
    /// together.
    pub locks: GroupLocker,
    /// The worker's tuning.
    pub settings: WorkerSettings,
    /// This worker's identity in the membership and in consumer tags.
    pub worker_id: String,
    /// Number of partition queues: a partition refuses a request whose user is not its own.
    pub partitions: u16,
    /// When this worker's router last forwarded a batch (Unix ms, 0: never): single active
    /// consumer lets one router forward at a time, so `walletq status` names the active one.
    pub router_forwarded_ms: Arc<AtomicI64>,
}

/// Shared state for `/readyz`.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    pub broker_connected: AtomicBool,
    pub membership_ok: AtomicBool,
}

/// Runs a worker until `shutdown` is cancelled; then finishes and acks the batches in
/// flight, leaves the membership and returns `Ok`.
pub async fn run_worker(
    services: ServiceSettings,
    topology: TopologySettings,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(ca_file) = &services.ca_file {
        // A wrong path is a configuration error, not an outage to wait out.
        crate::tls::read_ca_pem(ca_file)?;
    }
    if settings.metrics_addr.is_some() {
        // Before anything is counted, so start-up retries are exported too.
        crate::telemetry::prometheus()?;
    }
    let Some(connected) = connect_services(&services, &settings, &shutdown).await else {
        return Ok(());
    };
    let Connected { ledger, locks, membership, worker_id } = connected;
    let names = Names::new(services.namespace.clone());
    tracing::info!(%worker_id, namespace = names.namespace(), partitions = topology.partitions, "worker starting");
    let in_flight = settings.group_transactions.min(settings.db_connections) as usize;
    let ledger = GroupCommitter::spawn(ledger, in_flight);
    let locks = GroupLocker::spawn(locks);
    let partitions = topology.partitions;
    let router_forwarded_ms = Arc::new(AtomicI64::new(0));
    let context =
        Arc::new(WorkerContext { names, ledger, locks, settings, worker_id, partitions, router_forwarded_ms });
    let readiness = Arc::new(Readiness::default());
    if let Some(address) = context.settings.metrics_addr {
        endpoints::spawn(address, context.clone(), readiness.clone(), shutdown.clone()).await?;
    }
    let stop_router = shutdown.child_token();
    let router = spawn_router(&services, &context, stop_router.clone());
    let outcome = serve_sessions(&context, &membership, &readiness, &services, &topology, &shutdown).await;
    stop_router.cancel();
    if let Err(error) = router.await {
        tracing::warn!(%error, "the router task panicked");
    }
    if let Err(error) = membership.leave().await {
        tracing::warn!(error = %format!("{error:#}"), "could not leave the membership; it expires by itself");
    }
    tracing::info!("worker stopped");
    outcome
}

/// The worker's connections to PostgreSQL and Redis, and its identity.
struct Connected {
    ledger: Ledger,
    locks: UserLocks,
    membership: Membership,
    worker_id: String,
}

/// Connects PostgreSQL and Redis, waiting out outages; `None` when `shutdown` came first.
async fn connect_services(
    services: &ServiceSettings,
    settings: &WorkerSettings,
    shutdown: &CancellationToken,
) -> Option<Connected> {
    let backoff_max_ms = settings.backoff_max_ms;
    let namespace = services.namespace.as_str();
    let ca_file = services.ca_file.as_deref();
    let ledger = retry_until_up("PostgreSQL", backoff_max_ms, shutdown, || {
        let schema = if settings.no_migrate { Schema::Check } else { Schema::Migrate };
        let connecting = Ledger::connect_with(&services.database_url, settings.db_connections, ca_file, schema);
        async { Ok::<_, anyhow::Error>(connecting.await?.with_default_limits(settings.limits.into())) }
    })
    .await?;
    let locks = retry_until_up("Redis", backoff_max_ms, shutdown, || {
        UserLocks::connect(&services.redis_url, ca_file, namespace, settings.lock_ttl_ms)
    })
    .await?;
    let worker_id = format!("{}-{}", hostname(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let membership = retry_until_up("Redis", backoff_max_ms, shutdown, || {
        Membership::connect(&services.redis_url, ca_file, namespace, &worker_id, settings.member_ttl_ms)
    })
    .await?;
    Some(Connected { ledger, locks, membership, worker_id })
}

/// Starts the router on connections of its own: a message the client cannot decode closes
/// the router's connection, never the one the partitions' batches are in flight on.
fn spawn_router(
    services: &ServiceSettings,
    context: &WorkerContext,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(router::supervise(
        services.amqp_url.clone(),
        services.ca_file.clone(),
        format!("walletq worker {} router", context.worker_id),
        context.names.clone(),
        router::RouterSettings {
            partitions: context.partitions,
            prefetch: context.settings.effective_prefetch(),
            backoff_max_ms: context.settings.backoff_max_ms,
            consumer_tag: format!("{}/router", context.worker_id),
            epochs: Some(context.ledger.ledger().clone()),
        },
        context.router_forwarded_ms.clone(),
        stop,
    ))
}

/// Serves the owned partitions over one broker connection after another until `shutdown`
/// (then `Ok`) or a failure no reconnect fixes.
async fn serve_sessions(
    context: &Arc<WorkerContext>,
    membership: &Membership,
    readiness: &Arc<Readiness>,
    services: &ServiceSettings,
    topology: &TopologySettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let started_at = Utc::now();
    let mut failures: u32 = 0;
    loop {
        let session = Session { context, membership, readiness, started_at };
        let error = match session.run(services, topology, shutdown).await {
            Ok(()) => return Ok(()),
            Err(ConnectionFailure::Fatal(error)) => return Err(error),
            Err(ConnectionFailure::Transient(error)) => error,
        };
        readiness.broker_connected.store(false, Ordering::Relaxed);
        if router::is_undecodable(&error) {
            // Only the router publishes into partition queues, and what it forwards is
            // always decodable: someone with write access published there directly.
            metrics::counter!("walletq_undecodable_deliveries_total", "queue" => "partition").increment(1);
            tracing::error!(error = %format!("{error:#}"),
                "a partition queue holds a message no client can decode (only the router may publish there): move it away by hand; see docs/ARCHITECTURE.md");
        }
        metrics::counter!("walletq_reconnects_total", "service" => "rabbitmq").increment(1);
        failures = failures.saturating_add(1);
        let delay = jittered_delay(failures, context.settings.backoff_max_ms).max(Duration::from_millis(100));
        tracing::warn!(error = %format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "broker connection lost; reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Connects with capped, jittered backoff until it works or `shutdown` (then `None`): a
/// worker started during an outage waits for the service instead of exiting.
async fn retry_until_up<T, F, Fut>(
    service: &str,
    backoff_max_ms: u64,
    shutdown: &CancellationToken,
    mut connect: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt: u32 = 0;
    loop {
        match connect().await {
            Ok(value) => return Some(value),
            Err(error) => {
                attempt = attempt.saturating_add(1);
                let delay = jittered_delay(attempt, backoff_max_ms.max(1_000)).max(Duration::from_millis(100));
                metrics::counter!("walletq_reconnects_total", "service" => service.to_owned()).increment(1);
                tracing::warn!(service, error = %format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "service unavailable at start-up; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

enum ConnectionFailure {
    /// A configuration problem no retry fixes (an exchange or queue exists with another
    /// type or other arguments): the broker refused the declaration.
    Fatal(anyhow::Error),
    Transient(anyhow::Error),
}

/// One broker connection's life: serve the owned partitions until shutdown or failure.
struct Session<'a> {
    context: &'a Arc<WorkerContext>,
    membership: &'a Membership,
    readiness: &'a Arc<Readiness>,
    started_at: chrono::DateTime<Utc>,
}

struct RunningPartition {
    generation: u64,
    stop: CancellationToken,
    stats: Arc<PartitionStats>,
}

impl Session<'_> {
    async fn run(
        &self,
        services: &ServiceSettings,
        topology: &TopologySettings,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnectionFailure> {
        let context = self.context;
        let (connection, broker) = self.open(services, topology).await?;
        self.readiness.broker_connected.store(true, Ordering::Relaxed);

        let mut running: HashMap<u16, RunningPartition> = HashMap::new();
        let mut tasks: JoinSet<(u16, u64, anyhow::Result<()>)> = JoinSet::new();
        let mut generation: u64 = 0;
        let mut last_heartbeat_ok = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(context.settings.heartbeat_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let member_ttl = Duration::from_millis(context.settings.member_ttl_ms);

        let failure = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                _ = tick.tick() => {
                    let desired = self.desired(&running, topology.partitions, &broker, &mut last_heartbeat_ok, member_ttl).await;
                    if let Some(desired) = desired {
                        self.reconcile(&desired, &mut running, &mut tasks, &mut generation, &connection);
                    }
                }
                Some(joined) = tasks.join_next() => {
                    let (partition, task_generation, outcome) = match joined {
                        Ok(done) => done,
                        Err(error) => break Some(anyhow::Error::from(error).context("a partition task panicked")),
                    };
                    if running.get(&partition).is_some_and(|r| r.generation == task_generation) {
                        running.remove(&partition);
                    }
                    if let Err(error) = outcome {
                        break Some(error);
                    }
                }
            }
        };

        stop_partitions(&running, &mut tasks).await;
        let _ = connection.close(200, "OK".into()).await;
        match failure {
            None => Ok(()),
            Some(error) => Err(ConnectionFailure::Transient(error)),
        }
    }

    /// Opens the session's connection and declares the topology on it; the connection and
    /// the broker address (host:port) it went to. A declaration the broker refuses
    /// (PRECONDITION_FAILED: other arguments) is fatal; anything else transient.
    async fn open(
        &self,
        services: &ServiceSettings,
        topology: &TopologySettings,
    ) -> Result<(Arc<lapin::Connection>, String), ConnectionFailure> {
        let name = format!("walletq worker {}", self.context.worker_id);
        let (connection, address) = broker::connect_reporting(&services.amqp_url, &name, services.ca_file.as_deref())
            .await
            .map_err(ConnectionFailure::Transient)?;
        let channel =
            connection.create_channel().await.context("opening a channel").map_err(ConnectionFailure::Transient)?;
        if let Err(error) = declare_topology(&channel, &self.context.names, topology).await {
            let refused = error
                .chain()
                .filter_map(|e| e.downcast_ref::<lapin::Error>())
                .any(|e| broker::soft_error(e) == Some(AMQPSoftError::PRECONDITIONFAILED));
            return Err(if refused { ConnectionFailure::Fatal(error) } else { ConnectionFailure::Transient(error) });
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok((Arc::new(connection), address))
    }

    /// The partitions to serve after this heartbeat: `None` keeps the current ones (one
    /// failed heartbeat), an empty set once heartbeats failed for longer than `member_ttl`
    /// (the others have taken this worker's partitions by then).
    async fn desired(
        &self,
        running: &HashMap<u16, RunningPartition>,
        partitions: u16,
        broker: &str,
        last_heartbeat_ok: &mut Instant,
        member_ttl: Duration,
    ) -> Option<BTreeSet<u16>> {
        match self.heartbeat(running, partitions, broker).await {
            Ok(desired) => {
                *last_heartbeat_ok = Instant::now();
                Some(desired)
            }
            Err(error) if last_heartbeat_ok.elapsed() > member_ttl => {
                tracing::warn!(error = %format!("{error:#}"), "membership lost: releasing every partition");
                Some(BTreeSet::new())
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "heartbeat failed; keeping the current partitions");
                None
            }
        }
    }

    /// Heartbeats with this worker's reports and returns the partitions it should serve.
    async fn heartbeat(
        &self,
        running: &HashMap<u16, RunningPartition>,
        partitions: u16,
        broker: &str,
    ) -> anyhow::Result<BTreeSet<u16>> {
        let context = self.context;
        let mut owned: Vec<u16> = running.keys().copied().collect();
        owned.sort_unstable();
        let report = WorkerReport {
            worker_id: context.worker_id.clone(),
            started_at: self.started_at,
            heartbeat_at: Utc::now(),
            partitions: owned,
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            router_forwarded_at: match context.router_forwarded_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => chrono::DateTime::from_timestamp_millis(ms),
            },
            broker: Some(broker.to_owned()),
        };
        let partition_reports: Vec<_> = running.iter().map(|(p, r)| (*p, r.stats.report(&context.worker_id))).collect();
        let live = self.membership.heartbeat(&report, &partition_reports).await;
        self.readiness.membership_ok.store(live.is_ok(), Ordering::Relaxed);
        let live = live?;
        Ok(partitions_of(&context.worker_id, partitions, &live).into_iter().collect())
    }

    /// Starts the partitions newly owned and stops (after their batch in flight) the ones
    /// that moved away.
    fn reconcile(
        &self,
        desired: &BTreeSet<u16>,
        running: &mut HashMap<u16, RunningPartition>,
        tasks: &mut JoinSet<(u16, u64, anyhow::Result<()>)>,
        generation: &mut u64,
        connection: &Arc<lapin::Connection>,
    ) {
        running.retain(|partition, task| {
            let keep = desired.contains(partition);
            if !keep {
                tracing::info!(partition, "partition moved to another worker; handing it over");
                task.stop.cancel();
            }
            keep
        });
        for &partition in desired {
            if running.contains_key(&partition) {
                continue;
            }
            *generation += 1;
            let stop = CancellationToken::new();
            let stats = Arc::new(PartitionStats::default());
            running.insert(
                partition,
                RunningPartition { generation: *generation, stop: stop.clone(), stats: stats.clone() },
            );
            let (context, connection, task_generation) = (self.context.clone(), connection.clone(), *generation);
            tracing::info!(partition, "taking partition");
            tasks.spawn(async move {
                let outcome = partition::run(context, connection, partition, stats, stop).await;
                (partition, task_generation, outcome)
            });
        }
        metrics::gauge!("walletq_partitions_owned").set(running.len() as f64);
    }
}

/// Stops every partition after its batch in flight and waits for them.
async fn stop_partitions(
    running: &HashMap<u16, RunningPartition>,
    tasks: &mut JoinSet<(u16, u64, anyhow::Result<()>)>,
) {
    for partition in running.values() {
        partition.stop.cancel();
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((partition, _, Err(error))) = joined {
            tracing::debug!(partition, error = %format!("{error:#}"), "partition stopped with an error");
        }
    }
    metrics::gauge!("walletq_partitions_owned").set(0.0);
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}
