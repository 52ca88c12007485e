//! Integration tests against the real RabbitMQ, Redis and PostgreSQL.
//! Each test has its own namespace (queues, exchanges, Redis keys) and its own database,
//! removed when its fixture is dropped (also when the test panics); `support` holds the
//! fixture, the oracle and process control. The chaos test is `#[ignore]`d here and run
//! alone by `scripts/test`, since it restarts the shared services.

mod audit_checks;
mod chaos;
mod connection_errors;
mod consumer_handover;
mod crash;
mod crash_table;
mod dead_letters;
mod deploy;
mod failover;
mod fault;
mod fenced_write;
mod forwarding;
mod gateway;
mod group_commit;
mod group_locking;
mod holds;
mod ledger_timeout;
mod limits;
mod malformed;
mod node_loss;
mod operations;
mod outcomes;
mod pipeline;
mod poison;
mod privileges;
mod properties;
mod protocol;
mod scaling;
mod support;
mod topology;
