//! The worker: connects the three services, declares the topology and runs one
//! strictly ordered pipeline per partition queue. Reconnects after broker failures.

mod batch;
mod partition;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::jittered_delay;
use crate::broker::{self, Names, declare_topology};
use crate::configuration::{ServiceSettings, TopologySettings, WorkerSettings};
use crate::ledger::Ledger;
use crate::lock::UserLocks;

/// What every partition pipeline shares.
pub(crate) struct WorkerContext {
    pub names: Names,
    pub ledger: Ledger,
    pub locks: UserLocks,
    pub settings: WorkerSettings,
    pub worker_id: String,
}

/// Runs a worker until `shutdown` is cancelled; then finishes and acks the batches in
/// flight and returns `Ok`.
pub async fn run_worker(
    services: ServiceSettings,
    topology: TopologySettings,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let names = Names::new(services.namespace.clone());
    let ledger = Ledger::connect(&services.database_url, settings.db_connections).await?;
    let locks = UserLocks::connect(&services.redis_url, names.namespace(), settings.lock_ttl_ms).await?;
    let worker_id = format!("{}-{}", hostname(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    tracing::info!(%worker_id, namespace = names.namespace(), partitions = topology.partitions, "worker starting");
    let context = Arc::new(WorkerContext { names, ledger, locks, settings, worker_id });

    let mut failures: u32 = 0;
    loop {
        let first_connection = failures == 0;
        match run_connection(&context, &services.amqp_url, &topology, &shutdown, first_connection).await {
            Ok(()) => {
                tracing::info!("worker stopped");
                return Ok(());
            }
            Err(ConnectionFailure::Fatal(error)) => return Err(error),
            Err(ConnectionFailure::Transient(error)) => {
                failures = failures.saturating_add(1);
                let delay = jittered_delay(failures, context.settings.backoff_max_ms).max(Duration::from_millis(100));
                tracing::warn!(error = %format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

enum ConnectionFailure {
    /// A configuration problem no retry fixes (for instance the plugin is missing).
    Fatal(anyhow::Error),
    Transient(anyhow::Error),
}

async fn run_connection(
    context: &Arc<WorkerContext>,
    amqp_url: &str,
    topology: &TopologySettings,
    shutdown: &CancellationToken,
    first_connection: bool,
) -> Result<(), ConnectionFailure> {
    let connection =
        broker::connect(amqp_url, &format!("walletq worker {}", context.worker_id)).await.map_err(|e| {
            if first_connection { ConnectionFailure::Fatal(e) } else { ConnectionFailure::Transient(e) }
        })?;
    let connection = Arc::new(connection);
    let declared = async {
        let channel = connection.create_channel().await.context("opening a channel")?;
        declare_topology(&channel, &context.names, topology).await?;
        channel.close(200, "OK".into()).await.context("closing the set-up channel")
    }
    .await;
    if let Err(error) = declared {
        return Err(if first_connection {
            ConnectionFailure::Fatal(error)
        } else {
            ConnectionFailure::Transient(error)
        });
    }

    let stop = shutdown.child_token();
    let mut partitions = JoinSet::new();
    for index in 0..topology.partitions {
        let (context, connection, stop) = (context.clone(), connection.clone(), stop.clone());
        partitions.spawn(async move { partition::run(context, connection, index, stop).await });
    }
    let mut first_error = None;
    while let Some(joined) = partitions.join_next().await {
        let outcome = joined.map_err(anyhow::Error::from).and_then(|result| result);
        if let Err(error) = outcome {
            stop.cancel();
            first_error.get_or_insert(error);
        }
    }
    let _ = connection.close(200, "OK".into()).await;
    match first_error {
        None => Ok(()),
        Some(error) => Err(ConnectionFailure::Transient(error)),
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}
