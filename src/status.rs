//! `walletq status`: who serves which partition, how deep each queue is.

use std::collections::HashMap;
use std::fmt::Write;

use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::broker::{self, Names};
use crate::configuration::{ServiceSettings, TopologySettings};
use crate::membership::{self, WorkerReport};

/// One partition queue as seen now.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    /// The partition's index.
    pub partition: u16,
    /// Its queue's name.
    pub queue: String,
    /// The live worker that reports owning it, if any.
    pub active_worker: Option<String>,
    /// The broker node leading the queue (a quorum queue's leader, a classic queue's node),
    /// when `--management-url` lets `status` ask the management API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Messages ready in the queue.
    pub depth: u32,
    /// Deliveries the owner holds unacked.
    pub unacked: u64,
    /// Consumers registered on the queue (one active, the others standing by).
    pub consumers: u32,
    /// When the partition last applied a batch, if ever.
    pub last_processed_at: Option<DateTime<Utc>>,
}

/// The whole picture.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The namespace shown.
    pub namespace: String,
    /// One row per partition.
    pub partitions: Vec<PartitionStatus>,
    /// The live workers.
    pub workers: Vec<WorkerReport>,
    /// Messages waiting in the ingress queue for the router.
    pub ingress_depth: u32,
    /// Messages waiting in `<ns>.dead`.
    pub dead_lettered: u32,
    /// The live worker whose router forwarded last: the active router (single active
    /// consumer on the ingress queue lets one forward at a time). `None` until one forwards.
    pub active_router: Option<String>,
}

/// Reads Redis (membership) and RabbitMQ (queue depths).
pub async fn collect(
    services: &ServiceSettings,
    topology: &TopologySettings,
    member_ttl_ms: u64,
) -> anyhow::Result<StatusReport> {
    collect_with_leaders(services, topology, member_ttl_ms, None).await
}

/// [`collect`], and with `management_url` (RabbitMQ's management API,
/// `http://user:password@host:15672`) the node leading each partition queue.
pub async fn collect_with_leaders(
    services: &ServiceSettings,
    topology: &TopologySettings,
    member_ttl_ms: u64,
    management_url: Option<&str>,
) -> anyhow::Result<StatusReport> {
    let leaders = match management_url {
        Some(url) => queue_leaders(url, &services.amqp_url).await?,
        None => HashMap::new(),
    };
    let names = Names::new(services.namespace.clone());
    let ca_file = services.ca_file.as_deref();
    let snapshot = membership::snapshot(&services.redis_url, ca_file, names.namespace(), member_ttl_ms).await?;
    let connection = broker::connect(&services.amqp_url, "walletq status", ca_file).await?;
    let channel = connection.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let live: Vec<&str> = snapshot.workers.iter().map(|w| w.worker_id.as_str()).collect();
    let mut partitions = Vec::with_capacity(usize::from(topology.partitions));
    for partition in 0..topology.partitions {
        let queue = names.partition_queue(partition);
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .with_context(|| format!("queue {queue} does not exist: has a worker started in this namespace?"))?;
        let report = snapshot.partitions.iter().find(|(p, _)| *p == partition).map(|(_, r)| r);
        let owner = report.filter(|r| live.contains(&r.worker_id.as_str()));
        let leader = leaders.get(queue.as_str()).cloned();
        partitions.push(PartitionStatus {
            partition,
            queue,
            active_worker: owner.map(|r| r.worker_id.clone()),
            leader,
            depth: declared.message_count(),
            unacked: owner.map_or(0, |r| r.unacked),
            consumers: declared.consumer_count(),
            last_processed_at: report.and_then(|r| r.last_processed_at),
        });
    }
    let dead = channel
        .queue_declare(names.dead_queue().as_str().into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let ingress_depth = channel
        .queue_declare(names.ingress_queue().as_str().into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = connection.close(200, "OK".into()).await;
    let active_router = snapshot
        .workers
        .iter()
        .filter_map(|w| w.router_forwarded_at.map(|at| (at, w.worker_id.clone())))
        .max()
        .map(|(_, worker)| worker);
    Ok(StatusReport {
        namespace: names.namespace().to_owned(),
        partitions,
        workers: snapshot.workers,
        ingress_depth,
        dead_lettered: dead,
        active_router,
    })
}

/// The node of every queue of the AMQP URL's virtual host, by queue name, from RabbitMQ's
/// management API (`GET /api/queues/{vhost}`): a quorum queue's `leader`, else its `node`.
async fn queue_leaders(management_url: &str, amqp_url: &str) -> anyhow::Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Queue {
        name: String,
        leader: Option<String>,
        node: Option<String>,
    }
    let shown = crate::telemetry::redact_url(management_url);
    let mut url = url::Url::parse(management_url).with_context(|| format!("parsing the management URL {shown}"))?;
    let (user, password) = (url.username().to_owned(), url.password().map(str::to_owned));
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let first = broker::amqp_addresses(amqp_url).first().copied().unwrap_or_default();
    let vhost = url::Url::parse(first).ok().map(|u| u.path().trim_start_matches('/').to_owned());
    let vhost = vhost.filter(|v| !v.is_empty()).unwrap_or_else(|| "%2F".into());
    url.set_path(&format!("api/queues/{vhost}"));
    url.set_query(Some("columns=name,leader,node"));
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build()?;
    let queues: Vec<Queue> = client
        .get(url)
        .basic_auth(user, password)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("asking the management API at {shown} for the queues"))?
        .json()
        .await
        .with_context(|| format!("reading the queues from the management API at {shown}"))?;
    Ok(queues.into_iter().filter_map(|q| q.leader.or(q.node).map(|node| (q.name, node))).collect())
}

impl StatusReport {
    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<9} {:<28} {:<24} {:>7} {:>8} {:>9}  LAST PROCESSED",
            "PARTITION", "ACTIVE WORKER", "LEADER", "DEPTH", "UNACKED", "CONSUMERS"
        );
        for p in &self.partitions {
            let last = p.last_processed_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            let _ = writeln!(
                out,
                "{:<9} {:<28} {:<24} {:>7} {:>8} {:>9}  {}",
                p.partition,
                p.active_worker.as_deref().unwrap_or("-"),
                p.leader.as_deref().unwrap_or("-"),
                p.depth,
                p.unacked,
                p.consumers,
                last.as_deref().unwrap_or("-")
            );
        }
        if self.workers.is_empty() {
            let _ = writeln!(
                out,
                "\nno worker is alive in namespace {}: nothing is routed or applied until one starts (`walletq worker`)",
                self.namespace
            );
        } else {
            let _ = writeln!(out, "\n{} live worker(s):", self.workers.len());
        }
        for w in &self.workers {
            let partitions: Vec<String> = w.partitions.iter().map(u16::to_string).collect();
            let _ = writeln!(
                out,
                "  {:<28} v{:<8} since {}  broker {}  partitions [{}]",
                w.worker_id,
                w.version.as_deref().unwrap_or("<0.2.0"),
                w.started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                w.broker.as_deref().unwrap_or("-"),
                partitions.join(",")
            );
        }
        let router = self.active_router.as_deref().unwrap_or("none has forwarded a message yet");
        let _ = writeln!(out, "\nactive router: {router}");
        let _ = writeln!(out, "ingress queue {}.ingress: {} waiting", self.namespace, self.ingress_depth);
        let _ = writeln!(out, "dead-lettered messages waiting in {}.dead: {}", self.namespace, self.dead_lettered);
        out
    }
}
