//! The gateway's one shared [`Client`], replaced by a new connection when the broker
//! connection is lost. While the broker is down, callers get an error at once instead of
//! queueing behind connection attempts.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::Client;
use crate::telemetry::redact_url;

/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed attempt, requests fail fast for this long before the next attempt.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// A lazily (re)connected, shared broker client.
pub struct BrokerLink {
    amqp_url: String,
    namespace: String,
    current: RwLock<Option<Arc<Client>>>,
    /// Held while connecting; remembers when the last attempt failed.
    attempt: Mutex<Option<Instant>>,
}

/// Why no client is available; the detail is safe to show (no URL, no credentials).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerDown(pub String);

impl BrokerLink {
    /// A link that connects on first use.
    pub fn new(amqp_url: &str, namespace: &str) -> Self {
        BrokerLink {
            amqp_url: amqp_url.to_owned(),
            namespace: namespace.to_owned(),
            current: RwLock::new(None),
            attempt: Mutex::new(None),
        }
    }

    /// The connected client, connecting (again) when there is none or it was disconnected.
    pub async fn client(&self) -> Result<Arc<Client>, BrokerDown> {
        if let Some(client) = self.connected() {
            return Ok(client);
        }
        let mut last_failure = self.attempt.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(client) = self.connected() {
            return Ok(client);
        }
        if last_failure.is_some_and(|at| at.elapsed() < RETRY_INTERVAL) {
            return Err(BrokerDown("the message broker is unreachable; retry later".into()));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&self.amqp_url, &self.namespace)).await {
            Ok(Ok(client)) => {
                let client = Arc::new(client);
                if let Ok(mut current) = self.current.write() {
                    *current = Some(client.clone());
                }
                *last_failure = None;
                tracing::info!(broker = %redact_url(&self.amqp_url), "gateway connected to the broker");
                Ok(client)
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(error)) => format!("{error:#}"),
                    _ => format!("no connection within {CONNECT_TIMEOUT:?}"),
                };
                tracing::warn!(%error, "gateway cannot reach the broker");
                *last_failure = Some(Instant::now());
                Err(BrokerDown("the message broker is unreachable; retry later".into()))
            }
        }
    }

    fn connected(&self) -> Option<Arc<Client>> {
        let current = self.current.read().ok()?;
        current.as_ref().filter(|client| client.is_connected()).cloned()
    }
}
