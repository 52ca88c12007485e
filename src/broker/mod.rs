//! RabbitMQ: connection, topology and publishing with confirms.

mod publish;
mod topology;

pub use publish::{PUBLISHED_MS_HEADER, Publisher, json_properties, published_at_ms, request_properties};
pub use topology::{CONSISTENT_HASH_PLUGIN, Names, declare_topology};

use anyhow::Context;
use lapin::{Connection, ConnectionProperties};

use crate::telemetry::redact_url;

/// Opens an AMQP connection (the URL's password never reaches errors or logs).
pub async fn connect(amqp_url: &str, connection_name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(amqp_url, properties)
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", redact_url(amqp_url)))
}
