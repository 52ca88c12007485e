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

/// How far ahead of this process's clock a publish time may be, in milliseconds: the
/// producers' clocks may run a little ahead; a time further out is not a publish time.
pub(super) const PUBLISHED_MS_MAX_SKEW_MS: i64 = 60_000;
/// How far behind this process's clock a publish time may be, in milliseconds (7 days): a
/// request queued longer than a week is not a latency worth recording, and older values
/// (0, small integers) are a producer's bug, not a time.
pub(super) const PUBLISHED_MS_MAX_AGE_MS: i64 = 7 * 24 * 60 * 60 * 1_000;

/// Why a message's publish time is ignored (not used for latency). The label is the
/// `reason` of `walletq_published_ms_ignored_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredPublishTime {
    /// [`PUBLISHED_MS_HEADER`] is there but is not a 32- or 64-bit integer.
    NotAnInteger,
    /// Before 1970.
    Negative,
    /// More than [`PUBLISHED_MS_MAX_SKEW_MS`] ahead of now.
    InTheFuture,
    /// More than [`PUBLISHED_MS_MAX_AGE_MS`] before now.
    TooOld,
}

impl IgnoredPublishTime {
    /// The metric label of this reason.
    pub fn as_label(self) -> &'static str {
        match self {
            IgnoredPublishTime::NotAnInteger => "not_an_integer",
            IgnoredPublishTime::Negative => "negative",
            IgnoredPublishTime::InTheFuture => "in_the_future",
            IgnoredPublishTime::TooOld => "too_old",
        }
    }
}

/// The publish time of a message in Unix milliseconds, if it is plausible at `now_ms`: the
/// [`PUBLISHED_MS_HEADER`] header when present, else the AMQP timestamp (seconds). `Ok(None)`
/// when the message carries neither. Any producer can set these, so a value that is not an
/// integer, negative, more than [`PUBLISHED_MS_MAX_SKEW_MS`] ahead or more than
/// [`PUBLISHED_MS_MAX_AGE_MS`] behind is refused rather than fed to a latency metric.
pub fn published_at_ms(properties: &BasicProperties, now_ms: i64) -> Result<Option<i64>, IgnoredPublishTime> {
    let header = properties.headers().as_ref().and_then(|headers| headers.inner().get(PUBLISHED_MS_HEADER));
    let published_ms = match header {
        Some(AMQPValue::LongLongInt(ms)) => *ms,
        Some(AMQPValue::LongInt(ms)) => i64::from(*ms),
        Some(AMQPValue::LongUInt(ms)) => i64::from(*ms),
        Some(_) => return Err(IgnoredPublishTime::NotAnInteger),
        None => match properties.timestamp() {
            // Past i64::MAX seconds is "in the future" like any other far-off time.
            Some(seconds) => i64::try_from(*seconds).unwrap_or(i64::MAX).saturating_mul(1_000),
            None => return Ok(None),
        },
    };
    plausible_published_ms(published_ms, now_ms).map(Some)
}

/// `published_ms` when it is a plausible publish time at `now_ms` (both Unix milliseconds).
pub(super) fn plausible_published_ms(published_ms: i64, now_ms: i64) -> Result<i64, IgnoredPublishTime> {
    if published_ms < 0 {
        Err(IgnoredPublishTime::Negative)
    } else if published_ms > now_ms.saturating_add(PUBLISHED_MS_MAX_SKEW_MS) {
        Err(IgnoredPublishTime::InTheFuture)
    } else if published_ms < now_ms.saturating_sub(PUBLISHED_MS_MAX_AGE_MS) {
        Err(IgnoredPublishTime::TooOld)
    } else {
        Ok(published_ms)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(PUBLISHED_MS_HEADER.into(), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn publish_times_must_be_plausible() {
        use IgnoredPublishTime::*;
        let now = chrono::Utc::now().timestamp_millis();
        let skew = PUBLISHED_MS_MAX_SKEW_MS;
        let age = PUBLISHED_MS_MAX_AGE_MS;
        for (published, expected) in [
            (i64::MIN, Err(Negative)),
            (-1, Err(Negative)),
            (0, Err(TooOld)),
            (now - age - 1, Err(TooOld)),
            (now - age, Ok(now - age)),
            (now, Ok(now)),
            (now + skew, Ok(now + skew)),
            (now + skew + 1, Err(InTheFuture)),
            (i64::MAX, Err(InTheFuture)),
        ] {
            assert_eq!(plausible_published_ms(published, now), expected, "{published}");
            let properties = with_header(AMQPValue::LongLongInt(published));
            assert_eq!(published_at_ms(&properties, now), expected.map(Some), "{published}");
        }
        // Clocks at the ends of the range do not overflow either.
        assert_eq!(plausible_published_ms(i64::MAX, i64::MAX), Ok(i64::MAX));
        assert_eq!(plausible_published_ms(0, i64::MIN), Err(InTheFuture));
    }

    #[test]
    fn publish_times_come_from_integer_headers_or_the_timestamp() {
        let now = chrono::Utc::now().timestamp_millis();
        assert_eq!(published_at_ms(&json_properties(), now).map(|ms| ms.is_some()), Ok(true));
        assert_eq!(published_at_ms(&BasicProperties::default(), now), Ok(None));
        for value in [
            AMQPValue::LongString("1700000000000".into()),
            AMQPValue::Double(1.7e12),
            AMQPValue::Float(1.0),
            AMQPValue::Boolean(true),
            AMQPValue::Void,
            AMQPValue::Timestamp(1_700_000_000),
        ] {
            let properties = with_header(value.clone()).with_timestamp(1_700_000_000);
            assert_eq!(published_at_ms(&properties, now), Err(IgnoredPublishTime::NotAnInteger), "{value:?}");
        }
        assert_eq!(published_at_ms(&with_header(AMQPValue::LongInt(-5)), now), Err(IgnoredPublishTime::Negative));
        assert_eq!(published_at_ms(&with_header(AMQPValue::LongUInt(5)), now), Err(IgnoredPublishTime::TooOld));
        let seconds = u64::try_from(now / 1_000).unwrap();
        let stamped = BasicProperties::default().with_timestamp(seconds);
        assert_eq!(published_at_ms(&stamped, now), Ok(Some(now / 1_000 * 1_000)));
        let far = BasicProperties::default().with_timestamp(u64::MAX);
        assert_eq!(published_at_ms(&far, now), Err(IgnoredPublishTime::InTheFuture));
    }
}
