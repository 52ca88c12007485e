//! `walletq dead`: see and recover the messages in the dead-letter queue `<ns>.dead`.
//!
//! Listing never consumes: the messages are fetched unacknowledged and returned to the
//! queue when the channel closes. A requeue publishes a message again through the requests
//! exchange with publisher confirms and acks it in `<ns>.dead` only after the confirm: an
//! interruption in between leaves it in the queue (and at worst publishes it twice, which
//! the request id makes harmless: a request is applied at most once).

use std::fmt::Write;

use anyhow::Context;
use chrono::{DateTime, Utc};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::broker::{self, Names, Publisher};
use crate::configuration::ServiceSettings;
use crate::domain::decode_request;

/// Header the router sets to the producer's routing key (see the worker's router).
const ROUTING_KEY_HEADER: &str = "x-walletq-routing-key";
/// Characters of the body shown by `list`.
const PREVIEW_CHARS: usize = 72;

/// One dead-lettered message as read from `<ns>.dead`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeadLetter {
    /// Stable id: the first 16 hex digits of SHA-256 of the message id and the body.
    pub id: String,
    /// When it was first dead-lettered (`x-death`).
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// Why (`x-death`): `rejected` (an invalid request, or one the database kept refusing),
    /// `delivery_limit` (a message no client could decode), `maxlen`, `expired`.
    pub reason: Option<String>,
    /// The queue it was dead-lettered from (`x-death`).
    pub queue: Option<String>,
    /// What is wrong with the body as a request, or `None` when it is a valid request.
    pub problem: Option<String>,
    /// The user, when readable.
    pub user_id: Option<String>,
    /// The request id, when readable.
    pub request_id: Option<String>,
    /// The routing key a requeue uses: the user id when readable, else the one it was
    /// first published with.
    pub routing_key: String,
    /// The start of the body.
    pub preview: String,
    /// The whole body (lossy UTF-8), for `show`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl DeadLetter {
    fn read(message: &BasicGetMessage) -> DeadLetter {
        let delivery = &message.delivery;
        let properties = &delivery.properties;
        let message_id = properties.message_id().as_ref().map(|m| m.as_str().to_owned());
        let death = first_death(properties);
        let field = |name: &str| death.and_then(|d| text(d.inner().get(name)));
        let decoded = decode_request(&delivery.data);
        let (problem, user_id, request_id) = match &decoded {
            Ok(request) => (None, Some(request.user_id.to_string()), Some(request.request_id.to_string())),
            Err(invalid) => (
                Some(invalid.detail.clone()),
                invalid.user_id.as_ref().map(ToString::to_string),
                invalid.request_id.as_ref().map(ToString::to_string).or(message_id.clone()),
            ),
        };
        let header_key = properties.headers().as_ref().and_then(|h| text(h.inner().get(ROUTING_KEY_HEADER)));
        let death_key = death.and_then(|d| match d.inner().get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(|k| text(Some(k))),
            _ => None,
        });
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        DeadLetter {
            id: message_key(message_id.as_deref(), &delivery.data),
            dead_lettered_at: death.and_then(|d| match d.inner().get("time") {
                Some(AMQPValue::Timestamp(seconds)) => DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0),
                _ => None,
            }),
            reason: field("reason"),
            queue: field("queue"),
            problem,
            // Routing key = user id (the protocol); a misrouted request is corrected by that.
            routing_key: user_id.clone().or(header_key).or(death_key).unwrap_or_default(),
            user_id,
            request_id,
            preview: body.chars().take(PREVIEW_CHARS).collect(),
            body: Some(body),
        }
    }
}

/// The id `list` shows for a message.
fn message_key(message_id: Option<&str>, body: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(message_id.unwrap_or_default());
    digest.update([0u8]);
    digest.update(body);
    hex::encode(digest.finalize())[..16].to_owned()
}

/// The oldest `x-death` entry: where and why the message was first dead-lettered.
fn first_death(properties: &BasicProperties) -> Option<&FieldTable> {
    match properties.headers().as_ref()?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().rev().find_map(|d| match d {
            AMQPValue::FieldTable(table) => Some(table),
            _ => None,
        }),
        _ => None,
    }
}

fn text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A connection and a channel on `<ns>.dead`, with how many messages it held when opened.
struct DeadQueue {
    connection: Connection,
    channel: Channel,
    names: Names,
    depth: u32,
}

impl DeadQueue {
    async fn open(services: &ServiceSettings) -> anyhow::Result<DeadQueue> {
        let names = Names::new(services.namespace.clone());
        let connection = broker::connect(&services.amqp_url, "walletq dead", services.ca_file.as_deref()).await?;
        let channel = connection.create_channel().await.context("opening a channel")?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let queue = names.dead_queue();
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .with_context(|| format!("queue {queue} does not exist: has a worker started in this namespace?"))?;
        Ok(DeadQueue { connection, channel, names, depth: declared.message_count() })
    }

    /// The next message, unacknowledged; `None` once the queue is empty.
    async fn next(&self) -> anyhow::Result<Option<BasicGetMessage>> {
        let queue = self.names.dead_queue();
        self.channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading {queue} (a message the AMQP client cannot decode stops the reading)"))
    }

    /// Closes the connection: every message fetched and not acked goes back to the queue.
    async fn close(self) {
        let _ = self.channel.close(200, "OK".into()).await;
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

/// Up to `limit` messages of `<ns>.dead`, oldest first; the queue is left as it was.
pub(crate) async fn list(services: &ServiceSettings, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let queue = DeadQueue::open(services).await?;
    let mut letters = Vec::new();
    let outcome = async {
        while letters.len() < limit.min(queue.depth as usize) {
            let Some(message) = queue.next().await? else { break };
            letters.push(DeadLetter::read(&message));
        }
        anyhow::Ok(())
    }
    .await;
    queue.close().await;
    outcome.map(|()| letters)
}

/// The message with this id (as `list` shows it), if it is in `<ns>.dead`.
pub(crate) async fn show(services: &ServiceSettings, id: &str) -> anyhow::Result<Option<DeadLetter>> {
    Ok(list(services, usize::MAX).await?.into_iter().find(|letter| letter.id == id))
}

/// Which messages to requeue.
#[derive(Debug, Clone)]
pub(crate) enum Selection {
    /// Every message in the queue when the requeue starts.
    All,
    /// The messages with these ids (as `list` shows them).
    Ids(Vec<String>),
}

/// Publishes the selected messages again through the requests exchange, each confirmed
/// before it is acked (removed) in `<ns>.dead`; the others stay. Returns those requeued.
pub(crate) async fn requeue(services: &ServiceSettings, selection: &Selection) -> anyhow::Result<Vec<DeadLetter>> {
    let queue = DeadQueue::open(services).await?;
    let outcome = requeue_from(&queue, selection).await;
    queue.close().await;
    outcome
}

async fn requeue_from(queue: &DeadQueue, selection: &Selection) -> anyhow::Result<Vec<DeadLetter>> {
    let publisher = Publisher::open(&queue.connection).await?;
    let exchange = queue.names.requests_exchange();
    let mut requeued = Vec::new();
    for _ in 0..queue.depth {
        let Some(message) = queue.next().await? else { break };
        let letter = DeadLetter::read(&message);
        let chosen = match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&letter.id),
        };
        if !chosen {
            continue;
        }
        let properties = republished(&message.delivery.properties);
        let confirm = publisher.send(&exchange, &letter.routing_key, &message.delivery.data, properties).await?;
        Publisher::confirmed(confirm).await.with_context(|| format!("requeueing dead letter {}", letter.id))?;
        queue
            .channel
            .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("removing dead letter {} after its requeue", letter.id))?;
        tracing::info!(id = %letter.id, request_id = ?letter.request_id, "requeued a dead letter");
        requeued.push(letter);
    }
    Ok(requeued)
}

/// The message's properties for its new publication: persistent, without the headers the
/// broker and the router add (`x-death`, `x-first-death-*`, the routing key header).
fn republished(original: &BasicProperties) -> BasicProperties {
    let mut properties = original.clone().with_delivery_mode(2);
    if let Some(headers) = original.headers() {
        let mut kept = FieldTable::default();
        for (key, value) in headers.inner() {
            let name = key.as_str();
            if name != "x-death" && !name.starts_with("x-first-death-") && name != ROUTING_KEY_HEADER {
                kept.insert(key.clone(), value.clone());
            }
        }
        properties = properties.with_headers(kept);
    }
    properties
}

/// `list` as a table: id, time, reason, user, request id, problem, preview.
pub(crate) fn to_table(letters: &[DeadLetter]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16}  {:<20}  {:<14}  {:<16}  {:<24}  PROBLEM / BODY",
        "ID", "DEAD-LETTERED", "REASON", "USER", "REQUEST"
    );
    for letter in letters {
        let at = letter.dead_lettered_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let _ = writeln!(
            out,
            "{:<16}  {:<20}  {:<14}  {:<16}  {:<24}  {}\n{:>98}{}",
            letter.id,
            at.as_deref().unwrap_or("-"),
            letter.reason.as_deref().unwrap_or("-"),
            letter.user_id.as_deref().unwrap_or("-"),
            letter.request_id.as_deref().unwrap_or("-"),
            letter.problem.as_deref().unwrap_or("a valid request (refused by the database, or never decoded)"),
            "",
            letter.preview
        );
    }
    let _ = writeln!(out, "{} message(s)", letters.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_tell_bodies_and_message_ids_apart() {
        assert_eq!(message_key(Some("r1"), b"{}"), message_key(Some("r1"), b"{}"));
        assert_eq!(message_key(Some("r1"), b"{}").len(), 16);
        assert_ne!(message_key(Some("r1"), b"{}"), message_key(Some("r2"), b"{}"));
        assert_ne!(message_key(None, b"{}"), message_key(None, b"{ }"));
    }

    #[test]
    fn a_requeue_drops_the_broker_and_router_headers_and_keeps_the_rest() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(Vec::new().into()));
        headers.insert("x-first-death-reason".into(), AMQPValue::LongString("rejected".into()));
        headers.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString("alice".into()));
        headers.insert("x-published-ms".into(), AMQPValue::LongLongInt(1));
        let original = BasicProperties::default().with_message_id("r1".into()).with_headers(headers);
        let again = republished(&original);
        let kept: Vec<&str> = again.headers().as_ref().expect("headers").inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(kept, ["x-published-ms"]);
        assert_eq!(again.delivery_mode(), &Some(2));
        assert_eq!(again.message_id().as_ref().map(|m| m.as_str()), Some("r1"));
    }
}
