//! One batch, in order: decode → lock users (Redis, fenced) → apply (one PostgreSQL
//! transaction) → publish results (confirmed) → ack → release locks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;

use super::WorkerContext;
use super::cursor::{Admitted, PartitionCursor};
use crate::backoff::jittered_delay;
use lapin::types::AMQPValue;

use super::router::ROUTING_KEY_HEADER;
use crate::broker::{IgnoredPublishTime, Publisher, json_properties, published_at_ms};
use crate::domain::partitioning::partition_of;
use crate::domain::{Admission, ForwardStamp, InvalidRequest, Request, RequestResult, UserId, decode_request};
use crate::lock::{LockAttempt, LockGrant};

/// User locks held for a batch: extended until the batch is acked or given back, so they
/// never lapse while its results are published (up to the confirm timeout, longer than a
/// lock's TTL), and released only after that ("ack before release").
pub(super) struct HeldLocks {
    pub(super) grant: LockGrant,
    /// Extends the locks every third of their TTL.
    keeper: tokio::task::JoinHandle<()>,
    /// Set by the keeper when an extension found a lock gone (expired, or Redis lost it).
    lost: Arc<AtomicBool>,
}

impl HeldLocks {
    pub(super) fn keep(context: &WorkerContext, grant: LockGrant) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(keep_alive(context.locks.locks().clone(), grant.clone(), lost.clone()));
        HeldLocks { grant, keeper, lost }
    }

    /// Stops extending and releases the locks: only once the batch is acked or returned.
    pub(super) async fn release(self, context: &WorkerContext) {
        self.keeper.abort();
        // Tests wait for this line to crash a worker between the ack and the release.
        tracing::debug!("batch acked or returned; releasing its user locks");
        if self.lost.load(Ordering::Relaxed) {
            tracing::warn!("a user lock expired while its batch ran; fencing kept the write safe");
        }
        context.locks.release(self.grant).await;
    }
}

/// A batch that was not acked, with the locks still held for it: the caller returns the
/// batch to its queue (or rejects it), then releases them.
pub(super) struct BatchFailure {
    pub error: anyhow::Error,
    pub locks: Option<HeldLocks>,
}

impl From<anyhow::Error> for BatchFailure {
    fn from(error: anyhow::Error) -> Self {
        BatchFailure { error, locks: None }
    }
}

/// When each stage of a batch ended, for the `batch stages` trace.
struct StageTimes {
    started: Instant,
    locked: Instant,
    applied: Instant,
    acked: Instant,
}

/// Applies one batch and acks it, then releases its locks. On error nothing was acked:
/// the caller returns the whole batch to the queue and then releases the locks it gets
/// back; whatever was committed is replayed, never applied twice. A forward that skips one
/// the broker refused is set aside (acked, neither applied nor answered; see
/// `domain::forwarding`).
pub(super) async fn process_batch(
    context: &WorkerContext,
    publisher: &Publisher,
    deliveries: &[Delivery],
    cursor: &mut PartitionCursor,
    stop: &CancellationToken,
) -> Result<(), BatchFailure> {
    let started = Instant::now();
    // Publish times as producers stamped them: only plausible ones are used (any producer
    // can send any header value).
    let started_ms = chrono::Utc::now().timestamp_millis();
    let published: Vec<_> = deliveries.iter().map(|d| published_at_ms(&d.properties, started_ms)).collect();
    let all: Vec<&Delivery> = deliveries.iter().collect();
    let Admitted { admissions, moved } = cursor.admit(&all);
    let admissions = replays_resolved(context, &all, admissions, cursor.partition()).await?;
    let admitted: Vec<&Delivery> =
        all.iter().zip(&admissions).filter(|(_, a)| **a == Admission::Apply).map(|(d, _)| *d).collect();
    report_set_aside(deliveries.len() - admitted.len(), cursor);
    let decoded: Vec<Result<Request, InvalidRequest>> =
        admitted.iter().map(|d| decode_for(context, d, cursor.partition())).collect();
    let valid: Vec<Request> = decoded.iter().filter_map(|d| d.as_ref().ok().cloned()).collect();
    let redelivered = deliveries.iter().filter(|d| d.redelivered).count();
    if redelivered > 0 {
        metrics::counter!("walletq_redeliveries_total").increment(redelivered as u64);
    }

    let (locks, applied, locked) = lock_and_apply(context, &valid, moved, stop).await?;
    let applied_at = Instant::now();
    let last = deliveries.last().map(|d| d.delivery_tag).context("empty batch")?;
    let outcome = publish_and_ack(context, publisher, &admitted, &decoded, applied, last).await;
    let acked = Instant::now();
    if let Err(error) = outcome {
        return Err(BatchFailure { error, locks });
    }
    cursor.settled(moved);
    if let Some(locks) = locks {
        locks.release(context).await;
    }
    let times = StageTimes { started, locked: locked.unwrap_or(started), applied: applied_at, acked };
    record_batch(deliveries.len(), &published, started_ms, &times);
    Ok(())
}

/// `admissions` with every [`Admission::ReplayOnly`] decided: applied when its request is
/// stored (answered from storage) or it is not a valid request (answered and dead-lettered
/// again, which changes nothing), set aside otherwise (its request comes again from a newer
/// epoch, in its place).
async fn replays_resolved(
    context: &WorkerContext,
    deliveries: &[&Delivery],
    mut admissions: Vec<Admission>,
    partition: u16,
) -> Result<Vec<Admission>, BatchFailure> {
    let replay_only = |a: &Admission| *a == Admission::ReplayOnly;
    if !admissions.iter().any(replay_only) {
        return Ok(admissions);
    }
    // `None`: not asked, or not a valid request of this partition (answered again, harmless).
    let decoded: Vec<Option<Result<Request, InvalidRequest>>> = deliveries
        .iter()
        .zip(&admissions)
        .map(|(d, a)| replay_only(a).then(|| decode_in_partition(d, context.partitions, partition)))
        .collect();
    let ids: Vec<Option<String>> =
        decoded.iter().map(|d| d.as_ref().and_then(|d| d.as_ref().ok()).map(|r| r.request_id.to_string())).collect();
    let asked: Vec<String> = ids.iter().flatten().cloned().collect();
    let stored = context.ledger.ledger().stored_ids(&asked).await.map_err(|error| {
        BatchFailure::from(anyhow::Error::from(error).context("looking up forwards delivered again"))
    })?;
    for ((admission, id), decoded) in admissions.iter_mut().zip(&ids).zip(&decoded) {
        if *admission == Admission::ReplayOnly {
            let invalid = decoded.as_ref().is_some_and(|d| d.is_err());
            let seen = id.as_ref().is_some_and(|id| stored.contains(id));
            *admission = if invalid || seen { Admission::Apply } else { Admission::SetAside };
        }
    }
    Ok(admissions)
}

/// A delivery of partition `partition` decoded, with the `reply_to` later news of it (a
/// hold's expiry) goes to, unless that names one of walletq's own queues.
fn decode_for(context: &WorkerContext, delivery: &Delivery, partition: u16) -> Result<Request, InvalidRequest> {
    let mut request = decode_in_partition(delivery, context.partitions, partition)?;
    request.reply_to = delivery.properties.reply_to().as_ref().map(|r| r.as_str().to_owned());
    request.reply_to.take_if(|r| context.names.is_own_input_queue(r));
    Ok(request)
}

/// Counts and logs the forwards a batch set aside.
fn report_set_aside(count: usize, cursor: &PartitionCursor) {
    if count > 0 {
        metrics::counter!("walletq_forwards_set_aside_total").increment(count as u64);
        tracing::warn!(
            partition = cursor.partition(),
            count,
            "set aside forwards that skip one the broker refused; they come again from the router"
        );
    }
}

/// Takes the locks of the users of `valid` and applies it: the locks (kept alive), the
/// results in order, and when the locks were taken. Nothing to lock for no valid request.
async fn lock_and_apply(
    context: &WorkerContext,
    valid: &[Request],
    moved: Option<(u16, ForwardStamp)>,
    stop: &CancellationToken,
) -> Result<(Option<HeldLocks>, Vec<RequestResult>, Option<Instant>), BatchFailure> {
    if valid.is_empty() {
        // Only invalid messages (or none): their forwards still count as seen.
        if let Some((partition, stamp)) = moved {
            let advanced = context.ledger.ledger().advance_cursor(partition, stamp).await;
            advanced.map_err(|error| anyhow::Error::from(error).context("moving the partition's cursor"))?;
        }
        return Ok((None, Vec::new(), None));
    }
    let mut users: Vec<UserId> = Vec::new();
    for request in valid {
        if !users.contains(&request.user_id) {
            users.push(request.user_id.clone());
        }
    }
    let held = HeldLocks::keep(context, acquire(context, &users, stop).await?);
    let locked = Instant::now();
    match context.ledger.apply_forwarded(valid, &held.grant.fences, moved).await {
        Ok(results) => {
            debug_assert_eq!(results.len(), valid.len(), "one result per valid request");
            Ok((Some(held), results, Some(locked)))
        }
        Err(error) => {
            let error = anyhow::Error::from(error).context("applying the batch in PostgreSQL");
            Err(BatchFailure { error, locks: Some(held) })
        }
    }
}

/// The trace and metrics of a finished batch: its stages, size, duration, and each
/// request's end-to-end latency from its (plausible) publish time.
fn record_batch(
    size: usize,
    published: &[Result<Option<i64>, IgnoredPublishTime>],
    started_ms: i64,
    times: &StageTimes,
) {
    // How long the oldest request of the batch waited between its publish and the start (-1: unknown).
    let queued_ms =
        published.iter().filter_map(|p| p.ok().flatten()).min().map_or(-1, |ms| started_ms.saturating_sub(ms));
    tracing::trace!(
        size,
        queued_ms,
        lock_us = (times.locked - times.started).as_micros() as u64,
        apply_us = (times.applied - times.locked).as_micros() as u64,
        publish_ack_us = (times.acked - times.applied).as_micros() as u64,
        release_us = times.acked.elapsed().as_micros() as u64,
        "batch stages"
    );
    metrics::histogram!("walletq_batch_size").record(size as f64);
    metrics::histogram!("walletq_batch_duration_seconds").record(times.started.elapsed().as_secs_f64());
    let now_ms = chrono::Utc::now().timestamp_millis();
    for published in published {
        match published {
            Ok(Some(published_ms)) => {
                // At most the skew plus age bounds: both values are plausible times.
                let seconds = now_ms.saturating_sub(*published_ms).max(0) as f64 / 1000.0;
                metrics::histogram!("walletq_end_to_end_latency_seconds").record(seconds);
            }
            Ok(None) => {}
            Err(ignored) => {
                metrics::counter!("walletq_published_ms_ignored_total", "reason" => ignored.as_label()).increment(1)
            }
        }
    }
}

/// Decodes a delivery of partition `partition` and checks that it belongs there: its user is
/// one of this partition's, and the routing key its producer used (which the router records
/// in [`ROUTING_KEY_HEADER`]) is its `user_id`. Whatever producers do, one user's requests
/// then have one reader: a request that would be served beside its user's partition is
/// refused as invalid, not applied.
fn decode_in_partition(delivery: &Delivery, partitions: u16, partition: u16) -> Result<Request, InvalidRequest> {
    let request = decode_request(&delivery.data)?;
    let user = request.user_id.as_str();
    let routing_key = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(ROUTING_KEY_HEADER).cloned())
        .and_then(|value| match value {
            AMQPValue::LongString(key) => Some(String::from_utf8_lossy(key.as_bytes()).into_owned()),
            _ => None,
        });
    let owner = partition_of(user, partitions);
    let detail = match routing_key {
        Some(key) if key != user => {
            format!("the routing key {key:?} is not the request's user_id {user:?}: publish with routing key = user_id")
        }
        _ if owner != partition => {
            format!(
                "user_id {user:?} belongs to partition {owner}, not {partition}: publish with routing key = user_id"
            )
        }
        _ => return Ok(request),
    };
    metrics::counter!("walletq_misrouted_total").increment(1);
    Err(InvalidRequest {
        detail,
        op: Some(request.op()),
        amount: request.amount(),
        request_id: Some(request.request_id),
        user_id: Some(request.user_id),
    })
}

/// Rejects one request the database refused `attempts` times: a result to its reply queue,
/// then dead-lettered. Nothing is stored, so a corrected request may use the id again.
pub(super) async fn reject_after_attempts(
    context: &WorkerContext,
    publisher: &Publisher,
    delivery: &Delivery,
    cursor: &mut PartitionCursor,
    attempts: u32,
    error: &anyhow::Error,
) -> anyhow::Result<()> {
    // Its forward counts as seen, or the next one would look like it skipped it.
    let Admitted { moved, .. } = cursor.admit(&[delivery]);
    if let Some((partition, stamp)) = moved {
        context.ledger.ledger().advance_cursor(partition, stamp).await.context("moving the partition's cursor")?;
    }
    let detail = format!("not applied after {attempts} attempts: the database refused it ({error:#})");
    let invalid = match decode_request(&delivery.data) {
        Ok(request) => InvalidRequest {
            detail,
            op: Some(request.op()),
            amount: request.amount(),
            request_id: Some(request.request_id),
            user_id: Some(request.user_id),
        },
        Err(mut invalid) => {
            invalid.detail = detail;
            invalid
        }
    };
    metrics::counter!("walletq_poison_messages_total").increment(1);
    publish_and_ack(context, publisher, &[delivery], &[Err(invalid)], Vec::new(), delivery.delivery_tag).await?;
    cursor.settled(moved);
    Ok(())
}

/// Publishes a result for each of `deliveries` (the admitted ones), dead-letters the
/// invalid ones, then acks everything up to `last` (the set-aside deliveries too).
async fn publish_and_ack(
    context: &WorkerContext,
    publisher: &Publisher,
    deliveries: &[&Delivery],
    decoded: &[Result<Request, InvalidRequest>],
    applied: Vec<RequestResult>,
    last: u64,
) -> anyhow::Result<()> {
    let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let span = tracing::Span::current();
    span.record("approved", applied.iter().filter(|r| r.status == crate::domain::Status::Approved).count());
    span.record("rejected", applied.iter().filter(|r| r.status == crate::domain::Status::Rejected).count());
    span.record("invalid", decoded.iter().filter(|d| d.is_err()).count());
    let mut applied = applied.into_iter();
    let mut confirms = Vec::with_capacity(deliveries.len());
    let default_reply_to = context.names.results_queue();
    for (delivery, decoded) in deliveries.iter().zip(decoded) {
        let result = match decoded {
            Ok(_) => applied.next().context("the ledger returned fewer results than requests")?,
            Err(invalid) => {
                tracing::info!(detail = %invalid.detail, "rejecting an invalid message; dead-lettering it");
                metrics::counter!("walletq_dead_lettered_total").increment(1);
                RequestResult::invalid(invalid, now)
            }
        };
        count_result(&result);
        // An invalid message without a reply_to only goes to the dead-letter queue.
        let Some(reply_to) = reply_target(context, &delivery.properties, decoded.is_ok(), &default_reply_to) else {
            continue;
        };
        let reply = reply_properties(&delivery.properties, &result);
        confirms.push(publisher.send("", reply_to, &result.to_json(), reply).await?);
    }
    for confirm in confirms {
        Publisher::confirmed(confirm).await?;
    }
    settle(context, publisher, deliveries, decoded, last).await
}

/// Where a result goes: the request's `reply_to`, except one of walletq's own queues; else
/// the results queue for a valid request, and nowhere for an invalid one.
fn reply_target<'a>(
    context: &WorkerContext,
    properties: &'a lapin::BasicProperties,
    valid: bool,
    default_reply_to: &'a str,
) -> Option<&'a str> {
    match (properties.reply_to().as_ref(), valid) {
        (Some(reply_to), _) if context.names.is_own_input_queue(reply_to.as_str()) => {
            // Never into walletq's own request or dead-letter queues: the result would be
            // read as a request. It goes to the results queue instead.
            tracing::warn!(reply_to = %reply_to, "reply_to names one of walletq's own queues; the result goes to the results queue");
            metrics::counter!("walletq_reply_to_refused_total").increment(1);
            Some(default_reply_to)
        }
        (Some(reply_to), _) => Some(reply_to.as_str()),
        (None, true) => Some(default_reply_to),
        (None, false) => None,
    }
}

/// The result's properties: message_id = request_id, and the request's correlation_id (else
/// its message_id, else its request_id).
fn reply_properties(properties: &lapin::BasicProperties, result: &RequestResult) -> lapin::BasicProperties {
    let correlation_id = properties
        .correlation_id()
        .clone()
        .or_else(|| properties.message_id().clone())
        .or_else(|| result.request_id.as_ref().map(|id| id.as_str().into()));
    let mut reply = json_properties();
    if let Some(request_id) = &result.request_id {
        reply = reply.with_message_id(request_id.as_str().into());
    }
    if let Some(correlation_id) = correlation_id {
        reply = reply.with_correlation_id(correlation_id);
    }
    reply
}

/// Dead-letters the invalid deliveries, then acks the whole batch with one multiple ack.
///
/// walletq dead-letters them itself: it publishes each to `<ns>.dead` (mandatory, confirmed)
/// with the `x-death` entry RabbitMQ would add, and acks only after the confirms. A quorum
/// queue's own dead-lettering (`basic.reject`) is at-most-once: it drops the message when
/// `<ns>.dead` is not available, which the chaos test saw right after a broker restart. A
/// crash between the confirm and the ack dead-letters the redelivered copy again.
async fn settle(
    context: &WorkerContext,
    publisher: &Publisher,
    deliveries: &[&Delivery],
    decoded: &[Result<Request, InvalidRequest>],
    last: u64,
) -> anyhow::Result<()> {
    let dead_queue = context.names.dead_queue();
    let mut confirms = Vec::new();
    for (delivery, _) in deliveries.iter().zip(decoded).filter(|(_, d)| d.is_err()) {
        let properties = dead_letter_properties(delivery, chrono::Utc::now());
        confirms.push(publisher.forward(&dead_queue, &delivery.data, properties).await?);
    }
    for confirm in confirms {
        Publisher::confirmed(confirm).await.context("dead-lettering an invalid message")?;
    }
    publisher.channel().basic_ack(last, BasicAckOptions { multiple: true }).await.context("acking the batch")
}

/// A rejected delivery's properties as RabbitMQ dead-letters them: unchanged, persistent,
/// with an `x-death` entry (reason `rejected`, the queue it came from, when) and the
/// `x-first-death-*` headers, which `walletq dead` reads and a requeue removes.
fn dead_letter_properties(delivery: &Delivery, now: chrono::DateTime<chrono::Utc>) -> lapin::BasicProperties {
    use lapin::types::{FieldArray, FieldTable};
    let queue = AMQPValue::LongString(delivery.routing_key.as_str().into());
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
    death.insert("queue".into(), queue.clone());
    death.insert("time".into(), AMQPValue::Timestamp(u64::try_from(now.timestamp()).unwrap_or(0)));
    death.insert("exchange".into(), AMQPValue::LongString(delivery.exchange.as_str().into()));
    death.insert("routing-keys".into(), AMQPValue::FieldArray(FieldArray::from(vec![queue.clone()])));
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
    headers.insert("x-first-death-reason".into(), AMQPValue::LongString("rejected".into()));
    headers.insert("x-first-death-queue".into(), queue);
    headers.insert("x-first-death-exchange".into(), AMQPValue::LongString(delivery.exchange.as_str().into()));
    delivery.properties.clone().with_delivery_mode(2).with_headers(headers)
}

fn count_result(result: &RequestResult) {
    let op = result.op.map(|op| op.as_str()).unwrap_or("unknown");
    let status = result.status.as_str();
    let reason = result.reason.map(|r| r.as_str()).unwrap_or("none");
    metrics::counter!("walletq_requests_total", "op" => op, "status" => status, "reason" => reason).increment(1);
    if result.replayed {
        metrics::counter!("walletq_replays_total").increment(1);
    }
}

/// Takes the locks of `users` with bounded, jittered retries.
pub(super) async fn acquire(
    context: &WorkerContext,
    users: &[UserId],
    stop: &CancellationToken,
) -> anyhow::Result<LockGrant> {
    let attempts = context.settings.lock_attempts;
    let started = Instant::now();
    for attempt in 1..=attempts {
        let outcome = context.locks.try_acquire(users).await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                metrics::counter!("walletq_lock_unavailable_total").increment(1);
                return Err(error).context("Redis unavailable: failing closed, not applying without the user locks");
            }
        };
        match outcome {
            LockAttempt::Granted(grant) => {
                metrics::histogram!("walletq_lock_wait_seconds").record(started.elapsed().as_secs_f64());
                return Ok(grant);
            }
            LockAttempt::Contended(user) => {
                metrics::counter!("walletq_lock_contention_total").increment(1);
                tracing::debug!(%user, attempt, "user lock is held elsewhere; backing off");
                if attempt == attempts || stop.is_cancelled() {
                    bail!("the lock of user {user} stayed taken after {attempts} attempts");
                }
                tokio::time::sleep(jittered_delay(attempt, context.settings.backoff_max_ms)).await;
            }
        }
    }
    bail!("no lock attempts configured")
}

/// Extends the locks every third of their TTL while the batch runs.
async fn keep_alive(locks: crate::lock::UserLocks, grant: LockGrant, lost: Arc<AtomicBool>) {
    let period = Duration::from_millis((locks.ttl_ms() / 3).max(1));
    loop {
        tokio::time::sleep(period).await;
        match locks.extend(&grant).await {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "could not extend user locks")
            }
        }
    }
}
