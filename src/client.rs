//! `walletq::Client`: publish requests with confirms and, when asked, wait for results.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use walletq::{Client, domain::{Money, Op}};
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "walletq").await?;
//! let request = client.request("alice", Op::Withdraw, Money::parse_amount("12.34")?, None)?;
//! let result = client.submit_and_wait(&request, std::time::Duration::from_secs(10)).await?;
//! println!("{result:?}");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::Connection;
use tokio::sync::oneshot;

use crate::broker::{self, Names, Publisher};
use crate::domain::{Money, Op, Request, RequestId, RequestResult, UserId};

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<RequestResult>>>>;

/// Most results a client waits for at once.
pub const MAX_WAITING: usize = 100_000;

/// A producer of wallet requests.
pub struct Client {
    _connection: Connection,
    publisher: Publisher,
    names: Names,
    reply_queue: String,
    waiters: Waiters,
}

impl Client {
    /// Connects and declares an exclusive reply queue for this client's results.
    pub async fn connect(amqp_url: &str, namespace: &str) -> anyhow::Result<Self> {
        let connection = broker::connect(amqp_url, "walletq client").await?;
        let publisher = Publisher::open(&connection).await?;
        let replies = connection.create_channel().await.context("opening the reply channel")?;
        let (reply_queue, mut consumer) = broker::consume_reply_queue(&replies).await?;
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
        Ok(Client { _connection: connection, publisher, names: Names::new(namespace), reply_queue, waiters })
    }

    /// Builds a validated request; a fresh UUID request id when none is given.
    pub fn request(&self, user: &str, op: Op, amount: Money, request_id: Option<&str>) -> anyhow::Result<Request> {
        let fresh = uuid::Uuid::new_v4().to_string();
        let request_id = request_id.unwrap_or(&fresh);
        Ok(Request {
            request_id: RequestId::parse(request_id)
                .with_context(|| format!("request id {request_id:?} is not 1-64 characters of [A-Za-z0-9._:-]"))?,
            user_id: UserId::parse(user)
                .with_context(|| format!("user id {user:?} is not 1-64 characters of [A-Za-z0-9._:-]"))?,
            op,
            amount,
        })
    }

    /// Publishes a request (confirmed by the broker); its result goes to `reply_to`, or
    /// to the namespace's results queue when `None`.
    pub async fn submit(&self, request: &Request, reply_to: Option<&str>) -> anyhow::Result<()> {
        self.publisher.publish_request(&self.names.requests_exchange(), request, reply_to).await
    }

    /// Publishes a request and waits up to `timeout` for its result on this client's
    /// reply queue.
    pub async fn submit_and_wait(&self, request: &Request, timeout: Duration) -> anyhow::Result<RequestResult> {
        let (sender, receiver) = oneshot::channel();
        let key = request.request_id.as_str().to_owned();
        {
            let mut waiters = self.waiters.lock().map_err(|_| anyhow::anyhow!("reply router poisoned"))?;
            anyhow::ensure!(waiters.len() < MAX_WAITING, "more than {MAX_WAITING} requests are waiting for results");
            waiters.insert(key.clone(), sender);
        }
        let submitted = self.submit(request, Some(&self.reply_queue)).await;
        let outcome = match submitted {
            Ok(()) => tokio::time::timeout(timeout, receiver)
                .await
                .map_err(|_| anyhow::anyhow!("no result for request {key} within {timeout:?}; it may still be applied"))
                .and_then(|r| r.context("the reply consumer stopped")),
            Err(error) => Err(error),
        };
        if outcome.is_err() {
            if let Ok(mut waiters) = self.waiters.lock() {
                waiters.remove(&key);
            }
        }
        outcome
    }
}
