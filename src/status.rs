//! `walletq status`: who serves which partition, how deep each queue is.

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
}

/// Reads Redis (membership) and RabbitMQ (queue depths).
pub async fn collect(
    services: &ServiceSettings,
    topology: &TopologySettings,
    member_ttl_ms: u64,
) -> anyhow::Result<StatusReport> {
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
        partitions.push(PartitionStatus {
            partition,
            queue,
            active_worker: owner.map(|r| r.worker_id.clone()),
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
    Ok(StatusReport {
        namespace: names.namespace().to_owned(),
        partitions,
        workers: snapshot.workers,
        ingress_depth,
        dead_lettered: dead,
    })
}

impl StatusReport {
    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<9} {:<28} {:>7} {:>8} {:>9}  LAST PROCESSED",
            "PARTITION", "ACTIVE WORKER", "DEPTH", "UNACKED", "CONSUMERS"
        );
        for p in &self.partitions {
            let last = p.last_processed_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            let _ = writeln!(
                out,
                "{:<9} {:<28} {:>7} {:>8} {:>9}  {}",
                p.partition,
                p.active_worker.as_deref().unwrap_or("-"),
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
                "  {:<28} v{:<8} since {}  partitions [{}]",
                w.worker_id,
                w.version.as_deref().unwrap_or("<0.2.0"),
                w.started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                partitions.join(",")
            );
        }
        let _ = writeln!(out, "\ningress queue {}.ingress: {} waiting", self.namespace, self.ingress_depth);
        let _ = writeln!(out, "dead-lettered messages waiting in {}.dead: {}", self.namespace, self.dead_lettered);
        out
    }
}
