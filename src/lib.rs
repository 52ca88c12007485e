//! walletq: wallet withdrawals that are safe under any concurrency.
//!
//! Requests arrive on RabbitMQ partition queues (partitioned by user), each consumed by a
//! single active worker; a batch takes per-user Redis locks with fencing tokens as a
//! backstop, is applied in one PostgreSQL transaction (idempotent by request id, never
//! negative), and its results are published to the reply queues before the ack.

mod backoff;
pub mod broker;
pub mod cli;
mod client;
pub mod configuration;
pub mod domain;
pub mod gateway;
pub mod ledger;
pub mod lock;
pub mod membership;
pub mod status;
pub mod telemetry;
mod tls;
pub mod worker;

pub use client::Client;
