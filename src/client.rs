//! `walletq::Client`: publish requests with confirms and, when asked, wait for results.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use walletq::{Client, domain::{Money, Op}};
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "walletq", None).await?;
//! let request = client.request("alice", Op::Withdraw, Money::parse_amount("12.34")?, None)?;
//! let result = client.submit_and_wait(&request, std::time::Duration::from_secs(10)).await?;
//! println!("{result:?}");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use tokio::sync::oneshot;

use crate::broker::{self, AMQPSoftError, Names, Publisher};
use crate::domain::{Command, HOLD_TIMEOUT_DEFAULT_S, Money, Op, Request, RequestId, RequestResult, UserId};

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<RequestResult>>>>;

/// Most results a client waits for at once.
pub(crate) const WAITING_MAX: usize = 100_000;

/// A producer of wallet requests.
pub struct Client {
    connection: Connection,
    publisher: Publisher,
    names: Names,
    reply_queue: String,
    waiters: Waiters,
}

impl Client {
    /// Connects and declares an exclusive reply queue for this client's results.
    /// `ca_file`: extra CA certificates for `amqps://` (see [`crate::tls`]).
    pub async fn connect(amqp_url: &str, namespace: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let connection = broker::connect(amqp_url, "walletq client", ca_file).await?;
        let publisher = Publisher::open(&connection).await?;
        let (reply_queue, mut consumer) = broker::open_reply_queue(&connection).await?;
        let waiters: Waiters = Arc::default();
        let routed = waiters.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(correlation_id) = delivery.properties.correlation_id().clone() else {
                    continue;
                };
                let Ok(result) = serde_json::from_slice::<RequestResult>(&delivery.data) else {
                    tracing::warn!("ignoring a reply that is not a walletq result");
                    continue;
                };
                let waiter = routed.lock().ok().and_then(|mut w| w.remove(correlation_id.as_str()));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(result);
                }
            }
        });
        Ok(Client { connection, publisher, names: Names::new(namespace), reply_queue, waiters })
    }

    /// Builds a validated withdrawal, deposit or hold (of the default timeout) of `amount`;
    /// a fresh UUID request id when none is given. Captures and releases name a hold: build
    /// them with [`Client::command`].
    pub fn request(&self, user: &str, op: Op, amount: Money, request_id: Option<&str>) -> anyhow::Result<Request> {
        let command = match op {
            Op::Withdraw => Command::Withdraw { amount },
            Op::Deposit => Command::Deposit { amount },
            Op::Hold => Command::Hold { amount, timeout_s: HOLD_TIMEOUT_DEFAULT_S },
            Op::Capture | Op::Release | Op::Expire => {
                anyhow::bail!("a {} names a hold: build it with Client::command", op.as_str())
            }
        };
        self.command(user, command, request_id)
    }

    /// Builds a validated request of any op; a fresh UUID request id when none is given.
    pub fn command(&self, user: &str, command: Command, request_id: Option<&str>) -> anyhow::Result<Request> {
        let fresh = uuid::Uuid::new_v4().to_string();
        let request_id = request_id.unwrap_or(&fresh);
        Ok(Request::new(
            RequestId::parse(request_id)
                .with_context(|| format!("request id {request_id:?} is not 1-64 characters of [A-Za-z0-9._:-]"))?,
            UserId::parse(user)
                .with_context(|| format!("user id {user:?} is not 1-64 characters of [A-Za-z0-9._:-]"))?,
            command,
        ))
    }

    /// Publishes a request and awaits the broker's confirm; its result goes to `reply_to`, or
    /// to the namespace's results queue when `None`. Await one user's submit before sending
    /// that user's next request, so a failover cannot reorder them (docs/PROTOCOL.md,
    /// "Publishing in order"); other users' requests may be submitted concurrently.
    pub async fn submit(&self, request: &Request, reply_to: Option<&str>) -> anyhow::Result<()> {
        self.publisher.publish_request(&self.names.requests_exchange(), request, reply_to).await
    }

    /// Whether the connection and the publishing channel are still open; a client that is
    /// not must be replaced by a new [`Client::connect`].
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.channel().status().connected()
    }

    /// Closes the connection; its reply queue goes with it.
    pub async fn close(&self) {
        let _ = self.connection.close(200, "OK".into()).await;
    }

    /// This client's exclusive reply queue: results sent there and not waited for are dropped.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// Whether the namespace's requests exchange exists (a worker declares it), checked
    /// passively on a short-lived channel.
    pub async fn requests_exchange_exists(&self) -> anyhow::Result<bool> {
        let channel = self.connection.create_channel().await.context("opening a channel")?;
        let options = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
        let exchange = self.names.requests_exchange();
        let kind = ExchangeKind::Fanout;
        match channel.exchange_declare(exchange.as_str().into(), kind, options, FieldTable::default()).await {
            Ok(()) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(true)
            }
            // A passive declare of a missing exchange closes the channel with 404 NOT_FOUND.
            Err(error) if crate::broker::soft_error(&error) == Some(AMQPSoftError::NOTFOUND) => Ok(false),
            Err(error) => Err(error).with_context(|| format!("checking exchange {exchange}")),
        }
    }

    /// Publishes a request and waits up to `timeout` for its result on this client's
    /// reply queue.
    pub async fn submit_and_wait(&self, request: &Request, timeout: Duration) -> anyhow::Result<RequestResult> {
        self.submit_and_wait_for(request, timeout).await?.ok_or_else(|| {
            anyhow::anyhow!("no result for request {} within {timeout:?}; it may still be applied", request.request_id)
        })
    }

    /// Publishes a request and waits up to `timeout` for its result: `Ok(None)` when it was
    /// published (confirmed) but no result came in time, or a concurrent wait for the same
    /// request id took the result over. An error means it may not have been published.
    pub async fn submit_and_wait_for(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> anyhow::Result<Option<RequestResult>> {
        let (sender, receiver) = oneshot::channel();
        let key = request.request_id.as_str().to_owned();
        {
            let mut waiters = self.waiters.lock().map_err(|_| anyhow::anyhow!("reply router poisoned"))?;
            anyhow::ensure!(waiters.len() < WAITING_MAX, "more than {WAITING_MAX} requests are waiting for results");
            waiters.insert(key.clone(), sender);
        }
        let outcome = match self.submit(request, Some(&self.reply_queue)).await {
            // A closed receiver means another wait for this id replaced ours: no result here.
            Ok(()) => Ok(tokio::time::timeout(timeout, receiver).await.ok().and_then(Result::ok)),
            Err(error) => Err(error),
        };
        if !matches!(outcome, Ok(Some(_))) {
            if let Ok(mut waiters) = self.waiters.lock() {
                waiters.remove(&key);
            }
        }
        outcome
    }
}
