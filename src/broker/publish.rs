//! Publishing with publisher confirms.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};

use crate::domain::Request;

/// Header carrying the publish time in Unix milliseconds (the AMQP `timestamp` property
/// has whole seconds only); used for end-to-end latency.
pub const PUBLISHED_MS_HEADER: &str = "x-published-ms";

/// Longest wait for the broker to confirm one publish (a broker under a resource alarm
/// blocks publishers and confirms nothing).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Persistent JSON message properties, stamped with the publish time (AMQP `timestamp` in
/// seconds, and [`PUBLISHED_MS_HEADER`] in milliseconds).
pub fn json_properties() -> BasicProperties {
    let now = chrono::Utc::now();
    let mut headers = FieldTable::default();
    headers.insert(PUBLISHED_MS_HEADER.into(), AMQPValue::LongLongInt(now.timestamp_millis()));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(now.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// The publish time of a message in Unix milliseconds: the header when present, else the
/// AMQP timestamp (seconds).
pub fn published_at_ms(properties: &BasicProperties) -> Option<i64> {
    let from_header = properties.headers().as_ref().and_then(|headers| {
        headers.inner().get(PUBLISHED_MS_HEADER).and_then(|value| match value {
            AMQPValue::LongLongInt(ms) => Some(*ms),
            AMQPValue::LongInt(ms) => Some(i64::from(*ms)),
            AMQPValue::LongUInt(ms) => Some(i64::from(*ms)),
            _ => None,
        })
    });
    from_header.or_else(|| properties.timestamp().and_then(|s| i64::try_from(s).ok()).map(|s| s.saturating_mul(1000)))
}

/// Properties of a request: persistent JSON with message_id = request_id.
pub fn request_properties(request_id: &str) -> BasicProperties {
    json_properties().with_message_id(request_id.into())
}

/// A channel in confirm mode: every publish is confirmed by the broker before it counts.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `connection` and turns on publisher confirms.
    pub async fn open(connection: &Connection) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await.context("opening a publishing channel")?;
        Publisher::on(channel).await
    }

    /// Turns on publisher confirms on an existing channel.
    pub async fn on(channel: Channel) -> anyhow::Result<Self> {
        channel.confirm_select(ConfirmSelectOptions::default()).await.context("enabling publisher confirms")?;
        Ok(Publisher { channel })
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends one message; the returned confirm resolves when the broker has it.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<PublisherConfirm> {
        self.channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, properties)
            .await
            .with_context(|| format!("publishing to exchange {exchange:?} with key {routing_key:?}"))
    }

    /// Waits up to [`CONFIRM_TIMEOUT`] for one confirm; a broker nack, or a mandatory
    /// message returned as unroutable, is an error.
    pub async fn confirmed(confirm: PublisherConfirm) -> anyhow::Result<()> {
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| {
                anyhow::anyhow!("no publisher confirm within {CONFIRM_TIMEOUT:?}; is the broker blocking publishers?")
            })?
            .context("waiting for a publisher confirm")?;
        if confirmation.is_nack() {
            bail!("the broker refused (nacked) a published message");
        }
        if let Some(returned) = confirmation.take_message() {
            bail!("the broker returned a message as unroutable (routing key {:?})", returned.delivery.routing_key);
        }
        Ok(())
    }

    /// Sends a message to `queue` through the default exchange as mandatory: if the queue
    /// is missing, the confirm reports it instead of the broker dropping the message.
    pub async fn forward(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties,
            )
            .await
            .with_context(|| format!("forwarding to queue {queue:?}"))
    }

    /// Publishes a request to the partitioning exchange and waits for its confirm.
    pub async fn publish_request(
        &self,
        exchange: &str,
        request: &Request,
        reply_to: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut properties =
            request_properties(request.request_id.as_str()).with_correlation_id(request.request_id.as_str().into());
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let confirm = self.send(exchange, request.user_id.as_str(), &request.to_json(), properties).await?;
        Publisher::confirmed(confirm).await
    }
}
