//! Approach 6: the broker's ceiling. walletq's own queues and hops — the ingress queue,
//! walletq's router forwarding to the partition queues, a consumer per partition queue —
//! with the same durability (queue type, persistent messages), prefetch, batch cut and
//! confirmed replies, answering each request at once without Redis or PostgreSQL. No
//! worker on this topology can be faster on the same machine.

use std::sync::Arc;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::env::Environment;
use walletq::broker::{self, Publisher, declare_topology, json_properties};
use walletq::configuration::WorkerSettings;
use walletq::domain::{Money, RequestResult, Wallet, decode_request};
use walletq::worker::{RouterSettings, run_router};

/// The running echo consumers.
pub struct BrokerEcho {
    stop: CancellationToken,
    partitions: JoinSet<anyhow::Result<()>>,
    connection: Arc<Connection>,
}

impl BrokerEcho {
    /// Declares the topology and starts the router and one consumer per partition queue.
    pub async fn start(env: &Environment, settings: &WorkerSettings) -> anyhow::Result<Self> {
        let connection = Arc::new(
            broker::connect(&env.services.amqp_url, "walletq bench echo", env.services.ca_file.as_deref()).await?,
        );
        let setup = connection.create_channel().await.context("opening a channel")?;
        declare_topology(&setup, &env.names, &env.topology).await?;
        let _ = setup.close(200, "OK".into()).await;

        let stop = CancellationToken::new();
        let mut partitions = JoinSet::new();
        let router = RouterSettings {
            partitions: env.topology.partitions,
            prefetch: settings.effective_prefetch(),
            backoff_max_ms: settings.backoff_max_ms,
            consumer_tag: "walletq bench echo/router".to_owned(),
            epochs: None,
        };
        partitions.spawn(run_router(connection.clone(), env.names.clone(), router, stop.clone()));
        for index in 0..env.topology.partitions {
            let channel = connection.create_channel().await.context("opening a channel")?;
            channel.basic_qos(settings.effective_prefetch(), BasicQosOptions::default()).await.context("prefetch")?;
            let publisher = Publisher::on(channel.clone()).await?;
            let queue = env.names.partition_queue(index);
            let consumer = channel
                .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .with_context(|| format!("consuming {queue}"))?;
            partitions.spawn(echo(consumer, publisher, usize::from(settings.batch_max), stop.clone()));
        }
        Ok(BrokerEcho { stop, partitions, connection })
    }

    /// Stops the consumers; the first error one of them met, if any.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let mut outcome = Ok(());
        while let Some(joined) = self.partitions.join_next().await {
            if let Err(error) = joined.map_err(anyhow::Error::from).and_then(|r| r) {
                outcome = outcome.and(Err(error));
            }
        }
        let _ = self.connection.close(200, "OK".into()).await;
        outcome
    }
}

async fn echo(
    mut consumer: lapin::Consumer,
    publisher: Publisher,
    batch_max: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(delivery) => delivery.context("consuming")?,
                None => return Ok(()),
            },
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                _ => break,
            }
        }
        let now = chrono::Utc::now();
        let mut confirms = Vec::with_capacity(batch.len());
        for delivery in &batch {
            let result = match decode_request(&delivery.data) {
                Ok(request) => RequestResult::approved(&request, Wallet::with_balance(Money::ZERO), None, now),
                Err(invalid) => RequestResult::invalid(&invalid, now),
            };
            let properties = &delivery.properties;
            let reply_to = properties.reply_to().as_ref().map(|s| s.as_str()).unwrap_or_default();
            let mut reply = json_properties();
            if let Some(correlation_id) = properties.correlation_id() {
                reply = reply.with_correlation_id(correlation_id.clone());
            }
            confirms.push(publisher.send("", reply_to, &result.to_json(), reply).await?);
        }
        for confirm in confirms {
            Publisher::confirmed(confirm).await?;
        }
        if let Some(last) = batch.last() {
            publisher
                .channel()
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .context("acking")?;
        }
    }
}
