//! RabbitMQ: connection, topology and publishing with confirms.

mod publish;
mod topology;

pub use publish::{
    CONFIRM_TIMEOUT, PUBLISHED_MS_HEADER, Publisher, json_properties, published_at_ms, request_properties,
};
pub use topology::{CONSISTENT_HASH_PLUGIN, Names, declare_topology};

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use crate::telemetry::redact_url;

/// Longest wait for a connection to open: TCP, TLS and the AMQP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens an AMQP connection (the URL's password never reaches errors or logs). TLS is
/// used for `amqps://` URLs; `ca_file` adds CA certificates to the system roots.
pub async fn connect(amqp_url: &str, connection_name: &str, ca_file: Option<&Path>) -> anyhow::Result<Connection> {
    let shown = redact_url(amqp_url);
    let tls = OwnedTLSConfig { identity: None, cert_chain: ca_file.map(crate::tls::read_ca_pem).transpose()? };
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let builder = DefaultConnectionBuilder::new()
        .context("starting the AMQP client")?
        .with_uri_str(amqp_url.to_owned())
        .with_properties(properties)
        .with_tls_config(tls);
    tokio::time::timeout(CONNECT_TIMEOUT, builder.connect())
        .await
        .map_err(|_| anyhow::anyhow!("no connection within {CONNECT_TIMEOUT:?}"))
        .and_then(|connected| connected.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to RabbitMQ at {shown}"))
}
