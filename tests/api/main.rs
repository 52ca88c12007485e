//! Integration tests against the real RabbitMQ, Redis and PostgreSQL.
//! Each test has its own namespace (queues, exchanges, Redis keys) and its own database.

mod audit_checks;
mod crash;
mod crash_table;
mod fault;
mod fenced_write;
mod gateway;
mod group_commit;
mod group_locking;
mod helpers;
mod ledger_timeout;
mod malformed;
mod operations;
mod outcomes;
mod pipeline;
mod poison;
mod privileges;
mod properties;
mod protocol;
mod raw_amqp;
mod scaling;
mod topology;
