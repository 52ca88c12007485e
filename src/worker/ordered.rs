//! An ordered consumer of one queue, shared by the router and the partition pipelines: its
//! own channel with a prefetch and a confirm-mode publisher, batches cut from what has
//! already arrived, and one way back for a failed batch — closing the channel, which returns
//! every unacked delivery to the head of the queue in order (never a requeueing nack, which
//! would put it behind the deliveries prefetched after it).
//!
//! # One consumer per queue, never a standby
//!
//! The queues are declared with single active consumer, but walletq does not rely on it to
//! keep order: on RabbitMQ 3.10 a quorum queue whose active consumer is *cancelled* while it
//! holds unacked deliveries, and that has a standby consumer registered, delivers the
//! messages *behind* those deliveries to the standby first and the returned ones after them
//! (measured; a classic queue does not). lapin cancels a consumer that is dropped while its
//! channel is open (an aborted task), and other clients cancel before they close. One user's
//! requests would then be applied out of order. So a walletq consumer subscribes only when no
//! other consumer is there:
//!
//! 1. it declares `<queue>.owner`, an exclusive, auto-delete queue of its connection (the
//!    broker refuses a second connection with `RESOURCE_LOCKED`, and deletes the queue when
//!    the connection dies, however it dies); a refused claim is retried every
//!    [`CLAIM_POLL_MS`] (jittered) until the holder lets go;
//! 2. it waits until the broker reports no consumer on `queue` (the previous holder's
//!    deliveries are back in the queue by then);
//! 3. it consumes, and deletes `<queue>.owner` only after its own channel is closed.
//!
//! A handover therefore costs at most about one poll, and the next consumer always starts at
//! the head of the queue.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, AMQPSoftError, Publisher};

/// Mean pause between two attempts to claim a queue held by another consumer (jittered by
/// ±50 %, so the workers waiting for the same queue do not ask in step).
pub(super) const CLAIM_POLL_MS: u64 = 100;

/// Polls between two log lines of a consumer still waiting for a queue (about 30 s).
const CLAIM_WAIT_REPORT_POLLS: u32 = 300;

/// What [`OrderedConsumer::next_batch`] got.
pub(super) enum Next {
    /// One to `limit` deliveries, in queue order.
    Batch(Vec<Delivery>),
    /// `stop` was cancelled; the channel is closed and its unacked deliveries went back.
    Stopped,
    /// The channel failed, or the broker cancelled the consumer, while the connection is up:
    /// open a new consumer.
    Reopen,
    /// Nothing arrived before the deadline given to [`OrderedConsumer::next_batch_until`].
    Idle,
}

/// A consumer of one queue on a channel of its own, the only one on that queue.
pub(super) struct OrderedConsumer {
    /// Tells a failed channel (reopen) from a failed connection (reconnect).
    connection: Arc<Connection>,
    /// Consumes, acks and publishes (confirm mode); closing it returns what is unacked.
    channel: Channel,
    /// Confirm-mode publisher on `channel`, so acks and forwards share one channel.
    publisher: Publisher,
    /// The deliveries of `queue`, in queue order.
    consumer: Consumer,
    /// The queue consumed, for logs and for the claim's name.
    queue: String,
    /// The claim on `queue` (its `<queue>.owner` queue), released after `channel` closes.
    claim: Claim,
}

impl OrderedConsumer {
    /// Claims `queue` (waiting while another consumer holds it), then opens a channel with
    /// `prefetch` unacked deliveries at most and consumes `queue` with manual acks under
    /// `consumer_tag`. `None` when `stop` was cancelled while waiting.
    pub(super) async fn open(
        connection: Arc<Connection>,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let Some(claim) = Claim::take(&connection, queue, stop).await? else {
            return Ok(None);
        };
        match Self::consume(&connection, queue, prefetch, consumer_tag).await {
            Ok((channel, publisher, consumer)) => {
                tracing::debug!(%queue, "consuming");
                Ok(Some(OrderedConsumer { connection, channel, publisher, consumer, queue: queue.to_owned(), claim }))
            }
            Err(error) => {
                claim.release().await;
                Err(error)
            }
        }
    }

    /// The consuming channel, its publisher and the consumer, once `queue` is claimed.
    async fn consume(
        connection: &Connection,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> anyhow::Result<(Channel, Publisher, Consumer)> {
        let channel = connection.create_channel().await.with_context(|| format!("opening a channel for {queue}"))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.context("setting prefetch")?;
        let publisher = Publisher::on(channel.clone()).await?;
        let consumer = channel
            .basic_consume(queue.into(), consumer_tag.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("consuming {queue}"))?;
        Ok((channel, publisher, consumer))
    }

    /// The queue consumed.
    pub(super) fn queue(&self) -> &str {
        &self.queue
    }

    /// The channel's publisher (confirm mode), also for acks on the channel.
    pub(super) fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Waits for one delivery, then takes what the channel has already received, up to
    /// `limit`, without waiting for more. An error means the connection is gone.
    pub(super) async fn next_batch(&mut self, limit: usize, stop: &CancellationToken) -> anyhow::Result<Next> {
        self.next_batch_until(limit, stop, None).await
    }

    /// [`OrderedConsumer::next_batch`], or [`Next::Idle`] when nothing arrived by `deadline`.
    /// After [`Next::Stopped`] and [`Next::Reopen`] the channel is closed and the claim
    /// released: open a new consumer to go on.
    pub(super) async fn next_batch_until(
        &mut self,
        limit: usize,
        stop: &CancellationToken,
        deadline: Option<tokio::time::Instant>,
    ) -> anyhow::Result<Next> {
        let idle = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                self.close("stopping").await;
                return Ok(Next::Stopped);
            }
            next = self.consumer.next() => next,
            _ = idle => return Ok(Next::Idle),
        };
        let connected = self.connection.status().connected();
        let first = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) if connected => {
                tracing::warn!(queue = %self.queue, %error, "channel failed; reopening");
                self.close("reopening").await;
                return Ok(Next::Reopen);
            }
            Some(Err(error)) => return Err(error).context("the broker connection failed"),
            None if connected => {
                tracing::warn!(queue = %self.queue, "consumer was cancelled by the broker; consuming again");
                self.close("reopening").await;
                return Ok(Next::Reopen);
            }
            None => anyhow::bail!("the broker connection closed"),
        };
        let mut deliveries = vec![first];
        while deliveries.len() < limit.max(1) {
            match self.consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => deliveries.push(delivery),
                _ => break,
            }
        }
        Ok(Next::Batch(deliveries))
    }

    /// Closes the channel (its unacked deliveries go back to the head of the queue now, not
    /// during the caller's pause), then releases the claim so the next consumer may start.
    async fn close(&mut self, reason: &str) {
        let _ = self.channel.close(200, reason.into()).await;
        self.claim.release_now().await;
    }

    /// Goes on with a prefetch of `prefetch` after `done` (processed, not yet acked), keeping
    /// the claim: cancels the consumer while `done` still fills the prefetch (nothing else is
    /// checked out to it, so nothing comes back with one more delivery counted), acks `done`,
    /// and consumes again on a new channel.
    pub(super) async fn widen_after(mut self, done: &[Delivery], prefetch: u16) -> anyhow::Result<Self> {
        let last = done.last().context("nothing to widen after")?;
        let tag = self.consumer.tag();
        self.channel
            .basic_cancel(tag.clone(), lapin::options::BasicCancelOptions::default())
            .await
            .context("cancelling the consumer")?;
        self.channel
            .basic_ack(last.delivery_tag, lapin::options::BasicAckOptions { multiple: true })
            .await
            .context("acking after the cancel")?;
        let _ = self.channel.close(200, "widening".into()).await;
        let (channel, publisher, consumer) =
            Self::consume(&self.connection, &self.queue, prefetch, tag.as_str()).await?;
        (self.channel, self.publisher, self.consumer) = (channel, publisher, consumer);
        Ok(self)
    }

    /// Whether the connection is still up (a failure on a live connection is the channel's).
    pub(super) fn connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the channel: every unacked delivery goes back to the head of the queue, in
    /// order; then releases the claim.
    pub(super) async fn give_back(mut self, reason: &str) {
        self.close(reason).await;
    }
}

/// The claim on a queue: `<queue>.owner`, an exclusive queue of this connection.
struct Claim {
    /// The channel that declared `<queue>.owner`, and deletes it.
    channel: Channel,
    /// `<queue>.owner`.
    owner: String,
    /// Set once released, so dropping does not release it again.
    released: bool,
}

impl Claim {
    /// Claims `queue` on `connection` once the broker reports no consumer on it. Waits as
    /// long as another connection holds the claim (it is released when that connection
    /// closes, however it ends) or a consumer is still registered; `None` when `stop` was
    /// cancelled first.
    async fn take(connection: &Connection, queue: &str, stop: &CancellationToken) -> anyhow::Result<Option<Claim>> {
        let mut waited: u32 = 0;
        loop {
            let owner = format!("{queue}.owner");
            let channel =
                connection.create_channel().await.with_context(|| format!("opening a channel to claim {queue}"))?;
            // Asking first keeps a waiting consumer from being refused (and logged) every poll.
            if consumers(&channel, queue).await? == 0 {
                let exclusive =
                    QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
                match channel.queue_declare(owner.as_str().into(), exclusive, FieldTable::default()).await {
                    Ok(_) => {
                        let mut claim = Claim { channel, owner, released: false };
                        // A consumer may have come and gone between the count and the claim.
                        if consumers(&claim.channel, queue).await? == 0 {
                            return Ok(Some(claim));
                        }
                        claim.release_now().await;
                    }
                    Err(error) if broker::soft_error(&error) == Some(AMQPSoftError::RESOURCELOCKED) => {}
                    Err(error) => return Err(error).with_context(|| format!("claiming {queue}")),
                }
            } else {
                let _ = channel.close(200, "waiting".into()).await;
            }
            waited = waited.saturating_add(1);
            if waited % CLAIM_WAIT_REPORT_POLLS == 0 {
                tracing::info!(%queue, waited_ms = u64::from(waited) * CLAIM_POLL_MS, "still waiting for the previous consumer to leave");
            }
            if !poll_pause(stop).await {
                return Ok(None);
            }
        }
    }

    /// Deletes `<queue>.owner`: the next consumer may claim the queue.
    async fn release_now(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let _ = self.channel.queue_delete(self.owner.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = self.channel.close(200, "released".into()).await;
    }

    /// [`Claim::release_now`] after a consumer that could not start.
    async fn release(mut self) {
        self.release_now().await;
    }
}

impl Drop for Claim {
    /// A claim dropped unreleased (its consumer's task ended on an error path) is released
    /// in the background, so its queue is not held until the connection closes.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (channel, owner) = (self.channel.clone(), std::mem::take(&mut self.owner));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = channel.queue_delete(owner.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = channel.close(200, "released".into()).await;
            });
        }
    }
}

/// Consumers the broker reports on `queue` (a passive declaration on `channel`).
async fn consumers(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("counting the consumers of {queue}"))?;
    Ok(declared.consumer_count())
}

/// Sleeps about [`CLAIM_POLL_MS`] (±50 %); false when `stop` was cancelled first.
async fn poll_pause(stop: &CancellationToken) -> bool {
    let pause = Duration::from_millis(rand::random_range(CLAIM_POLL_MS / 2..=CLAIM_POLL_MS * 3 / 2));
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// Against the local RabbitMQ (`AMQP_URL`), on a quorum queue of their own: a handover between
/// two consumers starts the second at the head of the queue.
#[cfg(test)]
mod tests {
    use lapin::options::BasicAckOptions;
    use lapin::types::AMQPValue;

    use super::*;

    /// Messages in the test queue, and the first consumer's prefetch (half of them).
    const MESSAGES: u32 = 80;
    const PREFETCH: u16 = 40;

    async fn connect(name: &str) -> Arc<Connection> {
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        Arc::new(broker::connect(&url, name, None).await.expect("RabbitMQ must be reachable"))
    }

    /// A fresh quorum queue with single active consumer holding `0..MESSAGES`, as walletq
    /// declares its own; returns its name.
    async fn queue_of_numbers(connection: &Connection) -> String {
        let queue = format!("t{:012x}.ordered", rand::random::<u64>() >> 16);
        let channel = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.queue_declare(queue.as_str().into(), durable, arguments).await.expect("declare");
        let publisher = Publisher::on(channel).await.expect("publisher");
        for n in 0..MESSAGES {
            let confirm = publisher
                .forward(&queue, n.to_string().as_bytes(), lapin::BasicProperties::default())
                .await
                .expect("publish");
            Publisher::confirmed(confirm).await.expect("confirm");
        }
        queue
    }

    fn numbers(deliveries: &[Delivery]) -> Vec<u32> {
        deliveries.iter().map(|d| String::from_utf8_lossy(&d.data).parse().expect("a number")).collect()
    }

    /// Reads `consumer` to the end of the queue, acking as it goes.
    async fn read_rest(consumer: &mut OrderedConsumer, stop: &CancellationToken) -> Vec<u32> {
        let mut seen = Vec::new();
        while seen.last() != Some(&(MESSAGES - 1)) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let Ok(Next::Batch(batch)) = consumer.next_batch_until(usize::MAX, stop, Some(deadline)).await else {
                panic!("the queue stopped after {seen:?}");
            };
            let last = batch.last().expect("a batch has a delivery").delivery_tag;
            consumer.publisher().channel().basic_ack(last, BasicAckOptions { multiple: true }).await.expect("ack");
            seen.extend(numbers(&batch));
        }
        seen
    }

    /// The first consumer takes 10, acks them and holds 30 more unacked; a second one asks
    /// for the queue. Returns the first, the second's pending open, and the queue's name.
    async fn first_holds_the_queue(
        stop: &CancellationToken,
    ) -> (OrderedConsumer, tokio::task::JoinHandle<Option<OrderedConsumer>>, String) {
        let first_connection = connect("ordered test: first").await;
        let queue = queue_of_numbers(&first_connection).await;
        let mut first = OrderedConsumer::open(first_connection, &queue, PREFETCH, "first", stop)
            .await
            .expect("open")
            .expect("open");
        let mut taken = Vec::new();
        while taken.len() < 10 {
            let Ok(Next::Batch(batch)) = first.next_batch(10 - taken.len(), stop).await else { panic!("no batch") };
            taken.extend(batch);
        }
        assert_eq!(numbers(&taken), (0..10).collect::<Vec<_>>());
        let last = taken.last().expect("ten").delivery_tag;
        first.publisher().channel().basic_ack(last, BasicAckOptions { multiple: true }).await.expect("ack");

        let second_connection = connect("ordered test: second").await;
        let (queue_name, stop) = (queue.clone(), stop.clone());
        let second = tokio::spawn(async move {
            OrderedConsumer::open(second_connection, &queue_name, 1_000, "second", &stop).await.expect("open")
        });
        // There is no event for "did not start": give it ten polls.
        tokio::time::sleep(Duration::from_millis(10 * CLAIM_POLL_MS)).await;
        assert!(!second.is_finished(), "the second consumer started while the first held the queue");
        (first, second, queue)
    }

    async fn delete(queue: &str) {
        let connection = connect("ordered test: cleanup").await;
        let channel = connection.create_channel().await.expect("channel");
        let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
        let _ = connection.close(200, "OK".into()).await;
    }

    /// Once the first has let go: the second consumer starts and reads 10..79 in order; then
    /// the queue is removed.
    async fn second_reads_the_rest(
        second: tokio::task::JoinHandle<Option<OrderedConsumer>>,
        queue: &str,
        stop: &CancellationToken,
    ) {
        let mut second = second.await.expect("task").expect("the second consumer starts");
        assert_eq!(read_rest(&mut second, stop).await, (10..MESSAGES).collect::<Vec<_>>());
        second.give_back("done").await;
        delete(queue).await;
    }

    #[tokio::test]
    async fn a_queue_given_back_goes_to_the_waiting_consumer_from_its_head() {
        let stop = CancellationToken::new();
        let (first, second, queue) = first_holds_the_queue(&stop).await;
        first.give_back("test").await;
        second_reads_the_rest(second, &queue, &stop).await;
    }

    #[tokio::test]
    async fn a_consumer_cancelled_while_holding_deliveries_is_not_overtaken() {
        let stop = CancellationToken::new();
        let (first, second, queue) = first_holds_the_queue(&stop).await;
        // As lapin does for a `Consumer` dropped with its channel open: a standby registered
        // now would be promoted here and read 40.. before the 30 still held.
        let options = lapin::options::BasicCancelOptions::default();
        first.channel.basic_cancel(first.consumer.tag(), options).await.expect("cancel");
        first.give_back("test").await;
        second_reads_the_rest(second, &queue, &stop).await;
    }

    #[tokio::test]
    async fn a_queue_whose_consumer_connection_closes_goes_to_the_waiting_consumer_from_its_head() {
        let stop = CancellationToken::new();
        let (first, second, queue) = first_holds_the_queue(&stop).await;
        // As a worker's connection ends when it exits: the claim goes with the connection.
        let _ = first.connection.close(200, "exiting".into()).await;
        second_reads_the_rest(second, &queue, &stop).await;
    }
}
