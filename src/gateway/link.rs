//! The gateway's one shared [`Client`], replaced by a new connection when the broker
//! connection is lost. While the broker is down, callers get an error at once instead of
//! queueing behind connection attempts.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::Client;
use crate::reach::ServiceError;
use crate::telemetry::redact_url;

/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed attempt, requests fail fast for this long before the next attempt.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
const UNREACHABLE: &str = "the message broker is unreachable; retry later";
const LOGIN_REFUSED: &str = "the message broker refused the gateway's login (ACCESS_REFUSED): the gateway's AMQP_URL user, password or \
     virtual host is wrong; an operator must fix it";

/// A lazily (re)connected, shared broker client.
pub(super) struct BrokerLink {
    amqp_url: String,
    namespace: String,
    ca_file: Option<std::path::PathBuf>,
    current: RwLock<Option<Arc<Client>>>,
    /// Held while connecting; remembers when and why the last attempt failed.
    attempt: Mutex<Option<(Instant, String)>>,
}

/// Why no client is available; the detail is safe to show (no URL, no credentials).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct BrokerDown(pub String);

impl BrokerLink {
    /// A link that connects on first use.
    pub(super) fn new(amqp_url: &str, namespace: &str, ca_file: Option<std::path::PathBuf>) -> Self {
        BrokerLink {
            amqp_url: amqp_url.to_owned(),
            namespace: namespace.to_owned(),
            ca_file,
            current: RwLock::new(None),
            attempt: Mutex::new(None),
        }
    }

    /// The connected client, connecting (again) when there is none or it was disconnected.
    pub(super) async fn client(&self) -> Result<Arc<Client>, BrokerDown> {
        if let Some(client) = self.connected() {
            return Ok(client);
        }
        let mut last_failure = self.attempt.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(client) = self.connected() {
            return Ok(client);
        }
        if let Some((_, why)) = last_failure.as_ref().filter(|(at, _)| at.elapsed() < RETRY_INTERVAL) {
            return Err(BrokerDown(why.clone()));
        }
        let outcome = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await.unwrap_or_else(|_| {
            tracing::warn!("gateway cannot reach the broker: no connection within {CONNECT_TIMEOUT:?}");
            Err(BrokerDown(UNREACHABLE.into()))
        });
        match outcome {
            Ok(client) => {
                let client = Arc::new(client);
                if let Ok(mut current) = self.current.write() {
                    *current = Some(client.clone());
                }
                *last_failure = None;
                tracing::info!(broker = %redact_url(&self.amqp_url), "gateway connected to the broker");
                Ok(client)
            }
            Err(down) => {
                *last_failure = Some((Instant::now(), down.0.clone()));
                Err(down)
            }
        }
    }

    /// A new client, once the requests exchange is known to exist: publishing to a missing
    /// exchange would close the publishing channel.
    async fn connect(&self) -> Result<Client, BrokerDown> {
        let client = Client::connect(&self.amqp_url, &self.namespace, self.ca_file.as_deref())
            .await
            .map_err(|error| broker_down(&error))?;
        let missing = match client.requests_exchange_exists().await {
            Ok(true) => return Ok(client),
            Ok(false) => {
                tracing::warn!(namespace = %self.namespace, "the requests exchange does not exist: start a worker");
                BrokerDown("the request queues are not declared yet: start a worker, it declares them".into())
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "gateway cannot check the requests exchange");
                BrokerDown(UNREACHABLE.into())
            }
        };
        client.close().await;
        Err(missing)
    }

    fn connected(&self) -> Option<Arc<Client>> {
        let current = self.current.read().ok()?;
        current.as_ref().filter(|client| client.is_connected()).cloned()
    }
}

/// Why a connection failed, logged and said for what it is: a refused login or virtual
/// host is a configuration error that retrying will not fix, unlike an outage.
fn broker_down(error: &anyhow::Error) -> BrokerDown {
    match ServiceError::find(error) {
        Some(refused @ (ServiceError::LoginRefused { .. } | ServiceError::VhostRefused { .. })) => {
            tracing::error!(error = %refused, "the broker refused the gateway's login");
            BrokerDown(LOGIN_REFUSED.into())
        }
        Some(unreachable) => {
            tracing::warn!(error = %unreachable, "gateway cannot reach the broker");
            BrokerDown(UNREACHABLE.into())
        }
        None => {
            tracing::warn!(error = %format!("{error:#}"), "gateway cannot reach the broker");
            BrokerDown(UNREACHABLE.into())
        }
    }
}
