//! Integration tests against the real RabbitMQ, Redis and PostgreSQL.
//! Each test has its own namespace (queues, exchanges, Redis keys) and its own database.

mod bench;
mod crash;
mod helpers;
mod malformed;
mod pipeline;
mod topology;
