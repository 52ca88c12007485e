//! Worker membership in Redis: heartbeats, the live list, and what each worker reports
//! for `walletq status`. The assignment itself is pure: [`crate::domain::assignment`].
//!
//! Keys (all under the namespace): `<ns>:workers` (sorted set: worker id → last heartbeat,
//! Redis clock, ms), `<ns>:worker:<id>` (JSON report, expires), `<ns>:partitions` (hash:
//! partition → JSON report of its current owner).

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::lock::connect_redis;

const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl * 2)
for i = 4, #ARGV, 2 do
  -- A new owner that has not processed anything yet keeps the previous owner's last time.
  local report = cjson.decode(ARGV[i + 1])
  if report['last_processed_at'] == nil or report['last_processed_at'] == cjson.null then
    local old = redis.call('HGET', KEYS[3], ARGV[i])
    if old then
      local previous = cjson.decode(old)['last_processed_at']
      if previous ~= nil and previous ~= cjson.null then
        report['last_processed_at'] = previous
        redis.call('HSET', KEYS[3], ARGV[i], cjson.encode(report))
      else
        redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
      end
    else
      redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    end
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// What a worker says about itself at each heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerReport {
    /// Who reports.
    pub worker_id: String,
    /// When this worker started.
    pub started_at: DateTime<Utc>,
    /// When it sent this report (its clock).
    pub heartbeat_at: DateTime<Utc>,
    /// The partitions it serves now.
    pub partitions: Vec<u16>,
    /// The walletq version it runs (a rolling upgrade is done when every worker runs the
    /// new one); `None` for a worker older than 0.2.0, which did not report it.
    #[serde(default)]
    pub version: Option<String>,
    /// When its router last forwarded a batch; the router that forwarded last is the active
    /// one (single active consumer on the ingress queue). `None`: never, or an older worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_forwarded_at: Option<DateTime<Utc>>,
    /// The broker address (host:port) its partitions' connection went to; absent in reports
    /// of workers older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
}

/// What the owner of a partition says about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartitionReport {
    /// The worker serving the partition.
    pub worker_id: String,
    /// Deliveries received but not yet acked or rejected.
    pub unacked: u64,
    /// Requests processed by this owner since it took the partition.
    pub processed: u64,
    /// When it last applied a batch there, if ever.
    pub last_processed_at: Option<DateTime<Utc>>,
    /// When this report was written.
    pub reported_at: DateTime<Utc>,
}

/// This worker's membership.
#[derive(Clone)]
pub struct Membership {
    redis: crate::redis_link::RedisLink,
    namespace: String,
    worker_id: String,
    member_ttl_ms: u64,
    heartbeat: Script,
}

impl Membership {
    /// Connects to Redis (reconnecting automatically afterwards).
    pub async fn connect(
        redis_url: &str,
        ca_file: Option<&Path>,
        namespace: &str,
        worker_id: &str,
        member_ttl_ms: u64,
    ) -> anyhow::Result<Self> {
        let redis = connect_redis(redis_url, ca_file).await?;
        Ok(Membership {
            redis,
            namespace: namespace.to_owned(),
            worker_id: worker_id.to_owned(),
            member_ttl_ms,
            heartbeat: Script::new(HEARTBEAT),
        })
    }

    /// Records a heartbeat with this worker's report and its partitions' reports, drops
    /// members silent for longer than the member TTL, and returns the live workers.
    pub async fn heartbeat(
        &self,
        report: &WorkerReport,
        partitions: &[(u16, PartitionReport)],
    ) -> anyhow::Result<Vec<String>> {
        let mut invocation = self.heartbeat.prepare_invoke();
        invocation
            .key(workers_key(&self.namespace))
            .key(worker_key(&self.namespace, &self.worker_id))
            .key(partitions_key(&self.namespace))
            .arg(&self.worker_id)
            .arg(self.member_ttl_ms)
            .arg(serde_json::to_string(report)?);
        for (partition, report) in partitions {
            invocation.arg(partition).arg(serde_json::to_string(report)?);
        }
        invocation.invoke_async(&mut self.redis.clone()).await.context("heartbeat to Redis")
    }

    /// Leaves the membership at once (graceful stop), so others take over without waiting.
    pub async fn leave(&self) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        redis::pipe()
            .zrem(workers_key(&self.namespace), &self.worker_id)
            .del(worker_key(&self.namespace, &self.worker_id))
            .query_async::<()>(&mut redis)
            .await
            .context("leaving the membership")
    }
}

/// Everything `walletq status` reads from Redis.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MembershipSnapshot {
    /// The live workers' reports.
    pub workers: Vec<WorkerReport>,
    /// The latest report of each partition.
    pub partitions: Vec<(u16, PartitionReport)>,
}

/// Reads the live workers and the partition reports of `namespace`.
pub async fn snapshot(
    redis_url: &str,
    ca_file: Option<&Path>,
    namespace: &str,
    member_ttl_ms: u64,
) -> anyhow::Result<MembershipSnapshot> {
    let mut redis = connect_redis(redis_url, ca_file).await?;
    let (seconds, micros): (i64, i64) =
        redis::cmd("TIME").query_async(&mut redis).await.context("reading Redis time")?;
    let now_ms = seconds * 1000 + micros / 1000;
    let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(workers_key(namespace))
        .arg(now_ms - i64::try_from(member_ttl_ms).unwrap_or(i64::MAX))
        .arg("+inf")
        .query_async(&mut redis)
        .await
        .context("reading live workers")?;
    let mut workers = Vec::new();
    for id in live {
        let report: Option<String> = redis::cmd("GET")
            .arg(worker_key(namespace, &id))
            .query_async(&mut redis)
            .await
            .context("reading a worker")?;
        if let Some(report) = report.and_then(|r| serde_json::from_str(&r).ok()) {
            workers.push(report);
        }
    }
    let raw: Vec<(u16, String)> = redis::cmd("HGETALL")
        .arg(partitions_key(namespace))
        .query_async(&mut redis)
        .await
        .context("reading partitions")?;
    let mut partitions: Vec<(u16, PartitionReport)> =
        raw.into_iter().filter_map(|(p, r)| serde_json::from_str(&r).ok().map(|r| (p, r))).collect();
    partitions.sort_by_key(|(p, _)| *p);
    Ok(MembershipSnapshot { workers, partitions })
}

fn workers_key(namespace: &str) -> String {
    format!("{namespace}:workers")
}

fn worker_key(namespace: &str, worker_id: &str) -> String {
    format!("{namespace}:worker:{worker_id}")
}

fn partitions_key(namespace: &str) -> String {
    format!("{namespace}:partitions")
}
