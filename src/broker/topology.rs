//! Names and idempotent declaration of the exchanges and queues.

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// RabbitMQ queue type of the partition queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated (Raft) queues: survive a node's loss; the default.
    Quorum,
    /// Classic queues: lighter on one node, a single point of failure on a cluster.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// The shape of a namespace's queues, as plain settings (the command line's
/// `TopologySettings` converts into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Number of partition queues.
    pub partitions: u16,
    /// Queue type of the partition, dead-letter and results queues.
    pub queue_type: QueueType,
}

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
    /// True for the queues walletq reads requests or dead letters from (`<ns>.ingress`,
    /// `<ns>.requests.N`, `<ns>.dead`): a result must never be published there.
    pub fn is_own_input_queue(&self, queue: &str) -> bool {
        let Some(rest) = queue.strip_prefix(self.namespace.as_str()).and_then(|r| r.strip_prefix('.')) else {
            return false;
        };
        match rest.strip_prefix("requests.") {
            Some(index) => !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()),
            None => rest == "ingress" || rest == "dead" || rest == "requests",
        }
    }
    /// Where results go when a request has no `reply_to`.
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.namespace)
    }
}

/// Deliveries of one ingress message the broker counts as returned (a closed channel or
/// connection) before it dead-letters it to `<ns>.dead` (`x-delivery-limit`). The router
/// never returns ingress messages for a PostgreSQL or Redis outage (it does not use them),
/// and after a connection failure it takes one delivery at a time, so in practice only a
/// message the client cannot decode comes back this often (docs/ARCHITECTURE.md).
pub const INGRESS_DELIVERY_LIMIT: i64 = 10;

/// What to do when the broker refuses a declaration with other arguments (PRECONDITION_FAILED).
const REDECLARE_HINT: &str = "an existing queue with other arguments must be deleted first";

/// No replication arguments: a quorum queue gets the broker's default replica count, up to 3
/// nodes of the cluster (the `rabbit` application's `quorum_cluster_size`, 3 by default;
/// measured on 3.10: 3 members on a 3-node cluster), and its leader placement. Adding
/// `x-quorum-initial-group-size` or `x-queue-leader-locator` here would make every existing
/// deployment's redeclaration fail with PRECONDITION_FAILED (the broker checks both for
/// equivalence): docs/ARCHITECTURE.md, "Running on a RabbitMQ cluster".
fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.as_str().into()));
    arguments
}

/// Declares the requests exchange (fanout) and its ingress queue, the partition queues
/// (all with single active consumer and dead-lettering), the dead-letter exchange and
/// queue and the results queue. Safe to repeat.
pub async fn declare_topology(channel: &Channel, names: &Names, settings: impl Into<Topology>) -> anyhow::Result<()> {
    let settings: Topology = settings.into();
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let queue_options = QueueDeclareOptions::durable();

    channel
        .exchange_declare(names.dead_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .context("declaring the dead-letter exchange")?;
    channel
        .queue_declare(names.dead_queue().into(), queue_options, queue_arguments(settings.queue_type))
        .await
        .with_context(|| format!("declaring queue {} ({REDECLARE_HINT})", names.dead_queue()))?;
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
        .with_context(|| format!("declaring queue {} ({REDECLARE_HINT})", names.results_queue()))?;

    channel
        .exchange_declare(names.requests_exchange().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .with_context(|| {
            format!(
                "declaring the requests exchange {} (fanout; an older x-consistent-hash one must be deleted first)",
                names.requests_exchange()
            )
        })?;
    // The ingress queue is always a quorum queue, whatever the partitions' type: only a
    // quorum queue has a delivery limit, which sets aside a message no client can decode.
    let mut queues = vec![(names.ingress_queue(), QueueType::Quorum)];
    queues.extend((0..settings.partitions).map(|index| (names.partition_queue(index), settings.queue_type)));
    for (queue, queue_type) in &queues {
        let mut arguments = queue_arguments(*queue_type);
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(names.dead_exchange().into()));
        if *queue == names.ingress_queue() {
            arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(INGRESS_DELIVERY_LIMIT));
        }
        channel
            .queue_declare(queue.as_str().into(), queue_options, arguments)
            .await
            .with_context(|| format!("declaring queue {queue} ({REDECLARE_HINT})"))?;
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

    #[test]
    fn own_input_queues_are_recognised() {
        let names = Names::new("walletq");
        for queue in
            ["walletq.ingress", "walletq.requests.0", "walletq.requests.1023", "walletq.dead", "walletq.requests"]
        {
            assert!(names.is_own_input_queue(queue), "{queue}");
        }
        for queue in [
            "walletq.results",
            "walletq.requests.x",
            "walletq.requests.",
            "other.ingress",
            "walletqingress",
            "amq.gen-1",
            "",
        ] {
            assert!(!names.is_own_input_queue(queue), "{queue}");
        }
    }
}
