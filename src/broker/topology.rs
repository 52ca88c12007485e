//! Names and idempotent declaration of the exchanges and queues.

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::configuration::{QueueType, TopologySettings};

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
    /// The exchange producers publish to (routing key = user id).
    pub fn requests_exchange(&self) -> String {
        format!("{}.requests", self.namespace)
    }
    /// The single ordered queue behind the requests exchange; the router empties it into
    /// the partition queues.
    pub fn ingress_queue(&self) -> String {
        format!("{}.ingress", self.namespace)
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

/// Declares the requests exchange (fanout) and its ingress queue, the partition queues
/// (all with single active consumer and dead-lettering), the dead-letter exchange and
/// queue and the results queue. Safe to repeat.
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

    channel
        .exchange_declare(names.requests_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .with_context(|| {
            format!(
                "declaring the requests exchange {} (fanout; an older x-consistent-hash one must be deleted first)",
                names.requests_exchange()
            )
        })?;
    let mut queues = vec![names.ingress_queue()];
    queues.extend((0..settings.partitions).map(|index| names.partition_queue(index)));
    for queue in &queues {
        let mut arguments = queue_arguments(settings.queue_type);
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(names.dead_exchange().into()));
        channel.queue_declare(queue.as_str().into(), queue_options, arguments).await.with_context(|| {
            format!("declaring queue {queue} (an existing queue with other arguments must be deleted first)")
        })?;
    }
    channel
        .queue_bind(
            names.ingress_queue().into(),
            names.requests_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding the ingress queue")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_wire_contract() {
        let names = Names::new("walletq");
        assert_eq!(names.requests_exchange(), "walletq.requests");
        assert_eq!(names.ingress_queue(), "walletq.ingress");
        assert_eq!(names.partition_queue(15), "walletq.requests.15");
        assert_eq!(names.dead_exchange(), "walletq.dead");
        assert_eq!(names.results_queue(), "walletq.results");
    }
}
