//! RabbitMQ: connection, topology and publishing with confirms.

mod publish;
mod topology;

pub use publish::{
    CONFIRM_TIMEOUT, IgnoredPublishTime, PUBLISHED_MS_HEADER, Publisher, json_properties, published_at_ms,
    request_properties,
};
pub use topology::{INGRESS_DELIVERY_LIMIT, Names, QueueType, Topology, declare_topology};

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lapin::protocol::AMQPErrorKind;
pub use lapin::protocol::AMQPSoftError;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use crate::reach::{Service, ServiceError, Target};
use crate::telemetry::redact_url;

/// AMQP heartbeat used when the URL sets none: a lost machine's connection (and so its
/// single-active-consumer slots) is noticed within about twice this.
pub const HEARTBEAT_DEFAULT_S: u16 = 10;

/// Longest wait for a connection to open: TCP, TLS and the AMQP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The addresses of an `AMQP_URL`: one URL, or several separated by commas (the nodes of a
/// cluster), in order, blanks trimmed. A comma inside a URL (a password) must be written
/// `%2C`.
pub fn amqp_addresses(amqp_url: &str) -> Vec<&str> {
    amqp_url.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
}

/// Opens an AMQP connection (the URL's password never reaches errors or logs). TLS is
/// used for `amqps://` URLs; `ca_file` adds CA certificates to the system roots.
/// `amqp_url` may list several addresses ([`amqp_addresses`]): see [`connect_reporting`].
pub async fn connect(amqp_url: &str, connection_name: &str, ca_file: Option<&Path>) -> anyhow::Result<Connection> {
    connect_reporting(amqp_url, connection_name, ca_file).await.map(|(connection, _)| connection)
}

/// Like [`connect`], and also returns the address (host:port) the connection went to. With
/// several addresses it starts at the one this process last connected to for the same list
/// (the first at start), and moves to the next on failure, each within [`CONNECT_TIMEOUT`];
/// it fails only when none answers, naming each (redacted) address and its error. Callers
/// retry with their own backoff.
pub async fn connect_reporting(
    amqp_url: &str,
    connection_name: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<(Connection, String)> {
    let addresses = amqp_addresses(amqp_url);
    anyhow::ensure!(!addresses.is_empty(), "the AMQP URL lists no address");
    let first = failover::preferred(amqp_url, addresses.len());
    let mut failures = Vec::new();
    for index in (0..addresses.len()).map(|i| (first + i) % addresses.len()) {
        match connect_one(addresses[index], connection_name, ca_file).await {
            Ok(connected) => {
                failover::remember(amqp_url, index);
                if !failures.is_empty() {
                    tracing::info!(broker = %connected.1, skipped = failures.len(), "connected to the next broker address");
                }
                return Ok(connected);
            }
            Err(error) if addresses.len() == 1 => return Err(error),
            Err(error) => failures.push(format!("{error:#}")),
        }
    }
    anyhow::bail!("no broker address answered: {}", failures.join("; "))
}

/// One address: (connection, its host:port).
async fn connect_one(
    amqp_url: &str,
    connection_name: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<(Connection, String)> {
    let shown = redact_url(amqp_url);
    let target = Target::parse(Service::RabbitMq, amqp_url, 5672)?;
    let mut uri: lapin::uri::AMQPUri = amqp_url.parse().map_err(|reason: String| ServiceError::InvalidUrl {
        service: Service::RabbitMq,
        url: shown.clone(),
        reason,
    })?;
    let vhost = uri.vhost.clone();
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_DEFAULT_S);
    }
    let address = format!("{}:{}", uri.authority.host, uri.authority.port);
    let tls = OwnedTLSConfig { identity: None, cert_chain: ca_file.map(crate::tls::read_ca_pem).transpose()? };
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let builder = DefaultConnectionBuilder::new()
        .context("starting the AMQP client")?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls);
    target.resolve().await?;
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, builder.connect()).await {
        Err(_) => return Err(target.timed_out(CONNECT_TIMEOUT).into()),
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return Err(connect_error(&target, &vhost, &error).into()),
    };
    Ok((connection, address))
}

/// What a failed AMQP connection means, by variant: a refused login (`ACCESS_REFUSED`, 403)
/// or virtual host (`NOT_ALLOWED`, 530), a refused TCP connection, or the client's words.
fn connect_error(target: &Target, vhost: &str, error: &lapin::Error) -> ServiceError {
    use lapin::protocol::AMQPHardError;
    match error.kind() {
        lapin::ErrorKind::IOError(io) => target.io_error(io),
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            // 403 is a "soft" code in the spec; at login it closes the connection.
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => target.login_refused(),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ServiceError::VhostRefused {
                service: Service::RabbitMq,
                address: target.address(),
                user: target.user.clone(),
                vhost: vhost.to_owned(),
            },
            _ => target.other(&amqp.get_message().as_str()),
        },
        _ => target.other(error),
    }
}

/// The address of each address list this process last connected to, so a reconnect tries
/// the node that worked last before the others.
mod failover {
    use std::collections::HashMap;
    use std::sync::Mutex;

    static LAST: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

    /// Where to start in a list of `len` addresses.
    pub(super) fn preferred(list: &str, len: usize) -> usize {
        let last = LAST.lock().ok().and_then(|map| map.as_ref().and_then(|m| m.get(list).copied()));
        last.filter(|&i| i < len).unwrap_or(0)
    }

    /// Records the address that answered.
    pub(super) fn remember(list: &str, index: usize) {
        if let Ok(mut map) = LAST.lock() {
            map.get_or_insert_with(HashMap::new).insert(list.to_owned(), index);
        }
    }
}

/// The broker's soft (channel-level) error code when `error` is one, matched by variant:
/// `PRECONDITIONFAILED` for a declaration with other arguments, `NOTFOUND` for a passive
/// declaration of something missing.
pub fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Declares an exclusive, server-named reply queue on its own channel and consumes it
/// without acks (replies are re-sendable results). Returns the queue name and the consumer.
pub async fn open_reply_queue(connection: &Connection) -> anyhow::Result<(String, lapin::Consumer)> {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let channel = connection.create_channel().await.context("opening the reply channel")?;
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
