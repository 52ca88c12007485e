//! RabbitMQ: connection, topology and publishing with confirms.

mod publish;
mod topology;

pub use publish::{Publisher, json_properties, request_properties};
pub use topology::{CONSISTENT_HASH_PLUGIN, Names, declare_topology};

use anyhow::Context;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::telemetry::redact_url;

/// Opens an AMQP connection (the URL's password never reaches errors or logs).
pub async fn connect(amqp_url: &str, connection_name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(amqp_url, properties)
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", redact_url(amqp_url)))
}

/// Declares an exclusive, auto-deleted reply queue on `channel` and consumes it without
/// acks (results are replayable by request id, so a lost one is asked for again).
/// Returns the queue's generated name, for `reply_to`, and the consumer.
pub async fn consume_reply_queue(channel: &Channel) -> anyhow::Result<(String, Consumer)> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .context("declaring the reply queue")?;
    let name = queue.name().as_str().to_owned();
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .context("consuming the reply queue")?;
    Ok((name, consumer))
}
