//! Names and idempotent declaration of the exchanges and queues.

use anyhow::{Context, bail};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::configuration::{QueueType, TopologySettings};

/// The RabbitMQ plugin that provides the `x-consistent-hash` exchange type.
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";
/// Points each partition queue has on the hash ring; equal weights spread users evenly.
const BINDING_WEIGHT: &str = "20";

/// Names of the exchanges and queues of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

impl Names {
    /// Names under `namespace` (`walletq` by default).
    pub fn new(namespace: impl Into<String>) -> Self {
        Names { namespace: namespace.into() }
    }
    /// The namespace itself; also the Redis key prefix.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The consistent-hash exchange producers publish to.
    pub fn requests_exchange(&self) -> String {
        format!("{}.requests", self.namespace)
    }
    /// Partition queue `index`.
    pub fn partition_queue(&self, index: u16) -> String {
        format!("{}.requests.{index}", self.namespace)
    }
    /// The fanout exchange rejected messages are dead-lettered to.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    /// The queue that keeps dead-lettered messages.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    /// Where results go when a request has no `reply_to`.
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.namespace)
    }
}

fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.as_str().into()));
    arguments
}

/// Declares exchanges, partition queues (single active consumer, dead-lettering),
/// the dead-letter queue and the results queue. Safe to repeat.
pub async fn declare_topology(channel: &Channel, names: &Names, settings: &TopologySettings) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let queue_options = QueueDeclareOptions::durable();

    channel
        .exchange_declare(names.dead_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .context("declaring the dead-letter exchange")?;
    channel
        .queue_declare(names.dead_queue().into(), queue_options, queue_arguments(settings.queue_type))
        .await
        .with_context(|| format!("declaring queue {}", names.dead_queue()))?;
    channel
        .queue_bind(
            names.dead_queue().into(),
            names.dead_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding the dead-letter queue")?;
    channel
        .queue_declare(names.results_queue().into(), queue_options, queue_arguments(settings.queue_type))
        .await
        .with_context(|| format!("declaring queue {}", names.results_queue()))?;

    if let Err(error) = channel
        .exchange_declare(
            names.requests_exchange().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            durable,
            FieldTable::default(),
        )
        .await
    {
        let text = error.to_string();
        if text.contains("x-consistent-hash") || text.contains("exchange type") {
            bail!(
                "RabbitMQ lacks the x-consistent-hash exchange type: enable it with `rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN}` ({text})"
            );
        }
        return Err(error).context("declaring the requests exchange");
    }

    for index in 0..settings.partitions {
        let queue = names.partition_queue(index);
        let mut arguments = queue_arguments(settings.queue_type);
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(names.dead_exchange().into()));
        channel.queue_declare(queue.as_str().into(), queue_options, arguments).await.with_context(|| {
            format!("declaring partition queue {queue} (an existing queue with other arguments must be deleted first)")
        })?;
        channel
            .queue_bind(
                queue.as_str().into(),
                names.requests_exchange().into(),
                BINDING_WEIGHT.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding partition queue {queue}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_wire_contract() {
        let names = Names::new("walletq");
        assert_eq!(names.requests_exchange(), "walletq.requests");
        assert_eq!(names.partition_queue(15), "walletq.requests.15");
        assert_eq!(names.dead_exchange(), "walletq.dead");
        assert_eq!(names.results_queue(), "walletq.results");
    }
}
