//! The ingress router: empties the single ordered ingress queue into the partition queues,
//! `partition_of(routing key)`, in order. Every worker runs one; the claim on the ingress
//! queue (`super::ordered`) makes exactly one of them read it at a time.
//!
//! Forward (confirmed, mandatory) then ack: a crash in between forwards the same messages
//! again, right behind their first copies, so the duplicates are replays and order holds.
//!
//! The router is the one reader of what producers wrote, so it is where a message the AMQP
//! client cannot decode (a property that is not UTF-8, a header table the library refuses)
//! is met. lapin then closes the whole connection, so the router has a connection of its
//! own ([`supervise`]): a poisoned delivery never interrupts the partitions' batches. The
//! broker sets the message aside: the ingress queue is a quorum queue with
//! `x-delivery-limit` ([`crate::broker::INGRESS_DELIVERY_LIMIT`]), so after that many returns
//! it is dead-lettered to `<ns>.dead`. Every claim of the ingress queue starts with one
//! delivery in flight. When that first delivery comes back redelivered (the previous reader
//! left with deliveries in flight, maybe on a poison), or after this router's own connection
//! failed, the router goes on one delivery at a time ("careful mode") until a prefetch window
//! has passed, so only the message at the head is returned again and the valid ones behind
//! it are not counted toward the limit, whichever worker's router reads next. After a
//! decoding failure it reconnects at once (an outage still backs off). Everything the router
//! forwards was decoded and is encoded again by the
//! client, so the partition queues only ever hold decodable messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, ShortString};
use tokio_util::sync::CancellationToken;

use super::ordered::{Next, OrderedConsumer};
use crate::backoff::{jittered_delay, pause};
use crate::broker::{self, Names, Publisher};
use crate::domain::ForwardStamp;
use crate::domain::partitioning::partition_of;
use crate::ledger::Ledger;

/// Most messages forwarded per confirm round.
pub(super) const ROUTER_BATCH_MAX: usize = 1_024;

/// Header the router sets on every forwarded message to the routing key the producer used
/// (any producer value is replaced), so a partition can refuse a request whose routing key
/// is not its `user_id`.
pub(super) const ROUTING_KEY_HEADER: &str = "x-walletq-routing-key";

/// Header the router sets on every forward to its epoch (a `long long int`), and
/// [`FORWARD_SEQ_HEADER`] to the forward's place among the epoch's forwards into the same
/// partition queue, from 0 (`domain::forwarding`: a partition sets aside a forward that skips
/// one the broker refused).
pub(super) const FORWARD_EPOCH_HEADER: &str = "x-walletq-epoch";
/// See [`FORWARD_EPOCH_HEADER`].
pub(super) const FORWARD_SEQ_HEADER: &str = "x-walletq-seq";

/// Pause before reconnecting after a decoding failure: the broker has the message back at
/// once, and the sooner it is delivered again the sooner its delivery limit is reached.
const UNDECODABLE_RECONNECT_MS: u64 = 20;

/// How the router runs.
#[derive(Clone)]
pub struct RouterSettings {
    /// Number of partition queues to route into.
    pub partitions: u16,
    /// Unacked ingress deliveries in flight in normal operation.
    pub prefetch: u16,
    /// Cap of the jittered backoff after an outage.
    pub backoff_max_ms: u64,
    /// Consumer tag on the ingress queue (names the worker in the management UI).
    pub consumer_tag: String,
    /// Where each reading of the ingress queue gets its epoch, to stamp its forwards
    /// ([`FORWARD_EPOCH_HEADER`]); `None` forwards unstamped (the bench's broker echo, which
    /// has no ledger).
    pub epochs: Option<Ledger>,
}

/// Where the router stands after a failure: how many deliveries it still takes one at a
/// time so that only the message at the head of the queue is counted toward its limit.
#[derive(Debug, Default)]
struct Careful {
    deliveries_left: usize,
}

/// What one connection of the router ended with.
enum Ended {
    /// `stop` was cancelled.
    Stopped,
    /// The connection failed; `undecodable` when the client could not decode a frame.
    Failed { error: anyhow::Error, undecodable: bool },
}

/// Runs the router on connections of its own (named `connection_name`) until `stop`,
/// reconnecting after every failure. Never returns an error: an outage is waited out.
pub(super) async fn supervise(
    amqp_url: String,
    ca_file: Option<std::path::PathBuf>,
    connection_name: String,
    names: Names,
    settings: RouterSettings,
    forwarded_ms: Arc<AtomicI64>,
    stop: CancellationToken,
) {
    let mut careful = Careful::default();
    let mut failures: u32 = 0;
    while !stop.is_cancelled() {
        let connected = broker::connect(&amqp_url, &connection_name, ca_file.as_deref()).await;
        let ended = match connected {
            Ok(connection) => {
                let connection = Arc::new(connection);
                let ended = route(connection.clone(), &names, &settings, &stop, &mut careful, &forwarded_ms).await;
                let _ = connection.close(200, "OK".into()).await;
                ended
            }
            Err(error) => Ended::Failed { error, undecodable: false },
        };
        let Ended::Failed { error, undecodable } = ended else {
            return;
        };
        careful.deliveries_left = usize::from(settings.prefetch.max(1));
        let delay = if undecodable {
            metrics::counter!("walletq_undecodable_deliveries_total", "queue" => "ingress").increment(1);
            tracing::error!(error = %format!("{error:#}"), limit = broker::INGRESS_DELIVERY_LIMIT,
                "a message at the head of the ingress queue cannot be decoded; the broker dead-letters it after its delivery limit");
            failures = 0;
            Duration::from_millis(UNDECODABLE_RECONNECT_MS)
        } else {
            failures = failures.saturating_add(1);
            metrics::counter!("walletq_reconnects_total", "service" => "rabbitmq-router").increment(1);
            tracing::warn!(error = %format!("{error:#}"), "router connection lost; reconnecting");
            jittered_delay(failures, settings.backoff_max_ms).max(Duration::from_millis(100))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Routes on `connection` until `stop`; returns an error when the connection is unusable.
pub async fn run_router(
    connection: Arc<Connection>,
    names: Names,
    settings: RouterSettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let forwarded_ms = AtomicI64::new(0);
    match route(connection, &names, &settings, &stop, &mut Careful::default(), &forwarded_ms).await {
        Ended::Stopped => Ok(()),
        Ended::Failed { error, .. } => Err(error),
    }
}

async fn route(
    connection: Arc<Connection>,
    names: &Names,
    settings: &RouterSettings,
    stop: &CancellationToken,
    careful: &mut Careful,
    forwarded_ms: &AtomicI64,
) -> Ended {
    let ingress = names.ingress_queue();
    let partition_queues: Vec<String> = (0..settings.partitions).map(|p| names.partition_queue(p)).collect();
    let mut failures: u32 = 0;
    while !stop.is_cancelled() {
        // Every claim starts with one delivery in flight: if the first one comes back
        // redelivered, the previous holder may have died on a message no client can decode,
        // and the router stays careful for a prefetch window (see the module docs).
        let opened = OrderedConsumer::open(connection.clone(), &ingress, 1, &settings.consumer_tag, stop).await;
        let source = match opened {
            Ok(Some(source)) => source,
            Ok(None) => return Ended::Stopped,
            Err(error) => return failed(error, &connection),
        };
        // No epoch (PostgreSQL unreachable): nothing is forwarded until there is one.
        let Some(stamps) = Stamps::start(settings).await else {
            source.give_back("no router epoch").await;
            failures = failures.saturating_add(1);
            pause(stop, failures, settings.backoff_max_ms).await;
            continue;
        };
        let claim = Claimed { source, stamps, narrow: true, first: true };
        match serve_claim(claim, &partition_queues, settings, stop, careful, forwarded_ms, &mut failures).await {
            Served::Stopped => return Ended::Stopped,
            Served::Reopen => {}
            Served::Failed(error) => return failed(error, &connection),
        }
    }
    Ended::Stopped
}

/// The ingress queue as one claim of it reads it.
struct Claimed {
    source: OrderedConsumer,
    stamps: Stamps,
    /// The consumer has a prefetch of 1 (the claim's first delivery, or careful mode).
    narrow: bool,
    /// No delivery was forwarded yet on this claim.
    first: bool,
}

/// How [`serve_claim`] ended.
enum Served {
    Stopped,
    /// The claim was let go (a failed batch, a failed channel): claim the queue again.
    Reopen,
    /// The connection is unusable.
    Failed(anyhow::Error),
}

/// Forwards batch after batch on one claim of the ingress queue.
async fn serve_claim(
    mut claim: Claimed,
    partition_queues: &[String],
    settings: &RouterSettings,
    stop: &CancellationToken,
    careful: &mut Careful,
    forwarded_ms: &AtomicI64,
    failures: &mut u32,
) -> Served {
    loop {
        let limit = if claim.narrow { 1 } else { ROUTER_BATCH_MAX };
        let deliveries = match claim.source.next_batch(limit, stop).await {
            Ok(Next::Batch(deliveries)) => deliveries,
            Ok(Next::Stopped) => return Served::Stopped,
            Ok(Next::Idle) => continue,
            Ok(Next::Reopen) => {
                *failures = failures.saturating_add(1);
                pause(stop, *failures, settings.backoff_max_ms).await;
                return Served::Reopen;
            }
            Err(error) => return Served::Failed(error),
        };
        if std::mem::take(&mut claim.first) && deliveries.iter().any(|d| d.redelivered) {
            careful.deliveries_left = careful.deliveries_left.max(usize::from(settings.prefetch.max(1)));
        }
        let left_after = careful.deliveries_left.saturating_sub(deliveries.len());
        // The delivery before widening is acked only after the consumer is cancelled.
        let widen = claim.narrow && left_after == 0;
        let ack = if widen { Ack::Later } else { Ack::Now };
        match forward(claim.source.publisher(), &deliveries, partition_queues, &mut claim.stamps, ack).await {
            Ok(()) => {
                *failures = 0;
                forwarded_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
                metrics::counter!("walletq_routed_total").increment(deliveries.len() as u64);
                if careful.deliveries_left > 0 && left_after == 0 {
                    tracing::info!(
                        "past the prefetch window of the previous reader; routing with the full prefetch again"
                    );
                }
                careful.deliveries_left = left_after;
                if widen {
                    match claim.source.widen_after(&deliveries, settings.prefetch).await {
                        Ok(source) => claim.source = source,
                        Err(error) => return Served::Failed(error),
                    }
                    claim.narrow = false;
                }
            }
            Err(error) if !claim.source.connected() => return Served::Failed(error),
            Err(error) => {
                *failures = failures.saturating_add(1);
                tracing::warn!(error = %format!("{error:#}"), size = deliveries.len(), "routing failed; returning the batch to the ingress queue");
                claim.source.give_back("batch returned to the ingress queue").await;
                pause(stop, *failures, settings.backoff_max_ms).await;
                return Served::Reopen;
            }
        }
    }
}

/// Forwards `deliveries` in order, waits for every confirm, then acks them all.
/// Whether [`forward`] acks the ingress deliveries once their copies are confirmed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    Now,
    /// The caller acks them after cancelling its consumer (leaving careful mode).
    Later,
}

async fn forward(
    publisher: &Publisher,
    deliveries: &[Delivery],
    partition_queues: &[String],
    stamps: &mut Stamps,
    ack: Ack,
) -> anyhow::Result<()> {
    let partitions = u16::try_from(partition_queues.len()).context("too many partition queues")?;
    let mut confirms = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let routing_key = delivery.routing_key.as_str();
        let partition = partition_of(routing_key, partitions);
        let queue = &partition_queues[usize::from(partition)];
        let properties = stamps.stamp(partition, with_routing_key(delivery.properties.clone(), &delivery.routing_key));
        confirms.push(publisher.forward(queue, &delivery.data, properties).await?);
    }
    for confirm in confirms {
        Publisher::confirmed(confirm).await?;
    }
    if ack == Ack::Later {
        return Ok(());
    }
    let last = deliveries.last().context("empty batch")?;
    publisher.channel().basic_ack(last.delivery_tag, BasicAckOptions { multiple: true }).await.context("acking ingress")
}

/// The stamps of one reading of the ingress queue: its epoch and the next sequence number
/// per partition queue.
struct Stamps {
    /// `None`: forwards go unstamped (no epoch source).
    epoch: Option<i64>,
    /// The next sequence number of each partition queue in this epoch.
    next: std::collections::HashMap<u16, i64>,
}

impl Stamps {
    /// A new epoch from `settings.epochs` (every reopen of the ingress consumer starts one);
    /// `None` (logged) when none could be drawn.
    async fn start(settings: &RouterSettings) -> Option<Stamps> {
        let epoch = match &settings.epochs {
            Some(ledger) => match ledger.next_router_epoch().await {
                Ok(epoch) => Some(epoch),
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "could not draw a router epoch; retrying");
                    return None;
                }
            },
            None => None,
        };
        Some(Stamps { epoch, next: std::collections::HashMap::new() })
    }

    /// `properties` stamped as the next forward into `partition`'s queue.
    fn stamp(&mut self, partition: u16, properties: lapin::BasicProperties) -> lapin::BasicProperties {
        let Some(epoch) = self.epoch else { return properties };
        let seq = self.next.entry(partition).or_insert(0);
        let stamp = ForwardStamp { epoch, seq: *seq };
        *seq += 1;
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(FORWARD_EPOCH_HEADER.into(), AMQPValue::LongLongInt(stamp.epoch));
        headers.insert(FORWARD_SEQ_HEADER.into(), AMQPValue::LongLongInt(stamp.seq));
        properties.with_headers(headers)
    }
}

/// `properties` with [`ROUTING_KEY_HEADER`] set to `routing_key`.
fn with_routing_key(properties: lapin::BasicProperties, routing_key: &ShortString) -> lapin::BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString(routing_key.as_str().into()));
    properties.with_headers(headers)
}

/// The router's view of a failed connection: was it a frame the client could not decode?
fn failed(error: anyhow::Error, connection: &Connection) -> Ended {
    let undecodable = is_undecodable(&error);
    if connection.status().connected() {
        tracing::debug!("the router's connection is still up after a failure; closing it");
    }
    Ended::Failed { error, undecodable }
}

/// True when lapin refused to parse a frame (a poison message), not an outage.
pub(crate) fn is_undecodable(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<lapin::Error>())
        .any(|e| matches!(e.kind(), lapin::ErrorKind::ParsingError(_)))
}
