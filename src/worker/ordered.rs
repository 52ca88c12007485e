//! An ordered consumer of one queue, shared by the router and the partition pipelines: its
//! own channel with a prefetch and a confirm-mode publisher, batches cut from what has
//! already arrived, and one way back for a failed batch — closing the channel, which returns
//! every unacked delivery to the head of the queue in order (never a requeueing nack, which
//! would put it behind the deliveries prefetched after it).

use std::sync::Arc;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;

use crate::broker::Publisher;

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

/// A consumer of one queue on a channel of its own.
pub(super) struct OrderedConsumer {
    connection: Arc<Connection>,
    channel: Channel,
    publisher: Publisher,
    consumer: Consumer,
    queue: String,
}

impl OrderedConsumer {
    /// Opens a channel with `prefetch` unacked deliveries at most and consumes `queue` with
    /// manual acks under `consumer_tag`.
    pub(super) async fn open(
        connection: Arc<Connection>,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await.with_context(|| format!("opening a channel for {queue}"))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.context("setting prefetch")?;
        let publisher = Publisher::on(channel.clone()).await?;
        let consumer = channel
            .basic_consume(queue.into(), consumer_tag.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("consuming {queue}"))?;
        tracing::debug!(%queue, "consuming");
        Ok(OrderedConsumer { connection, channel, publisher, consumer, queue: queue.to_owned() })
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
                let _ = self.channel.close(200, "stopping".into()).await;
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
                self.close_for_reopen().await;
                return Ok(Next::Reopen);
            }
            Some(Err(error)) => return Err(error).context("the broker connection failed"),
            None if connected => {
                tracing::warn!(queue = %self.queue, "consumer was cancelled by the broker; consuming again");
                self.close_for_reopen().await;
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

    /// Closes the channel before the caller pauses and opens a new consumer: its unacked
    /// deliveries go back to the head of the queue now. Kept open during the pause, they
    /// would stay with this channel while single active consumer promotes a standby, which
    /// would then process the messages behind them out of order.
    async fn close_for_reopen(&self) {
        let _ = self.channel.close(200, "reopening".into()).await;
    }

    /// Hands the queue over without a delivery in flight, after `done` (already processed,
    /// not yet acked) : cancels the consumer while `done` still fills the prefetch, so the
    /// broker has nothing else checked out to this consumer, then acks `done` and closes the
    /// channel. Closing with a delivery in flight would let single active consumer start the
    /// next consumer before that delivery is returned, and it would then be read after the
    /// ones behind it (a quorum queue activates the next consumer on cancel, and returns the
    /// cancelled one's deliveries only when its channel goes).
    pub(super) async fn hand_over_after(self, done: &[Delivery]) -> anyhow::Result<()> {
        let last = done.last().context("nothing to hand over after")?;
        self.channel
            .basic_cancel(self.consumer.tag(), lapin::options::BasicCancelOptions::default())
            .await
            .context("cancelling the consumer")?;
        self.channel
            .basic_ack(last.delivery_tag, lapin::options::BasicAckOptions { multiple: true })
            .await
            .context("acking after the cancel")?;
        let _ = self.channel.close(200, "handed over".into()).await;
        Ok(())
    }

    /// Closes the channel: every unacked delivery goes back to the head of the queue, in order.
    pub(super) async fn give_back(self, reason: &str) {
        let _ = self.channel.close(200, reason.into()).await;
    }
}
