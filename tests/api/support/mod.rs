//! Support code shared by the integration tests, by concern:
//!
//! - [`fixture`]: an isolated walletq ([`spawn_app`], [`TestApp`], [`isolated_services`]) and
//!   its cleanup, which also runs when a test panics (see [`TestApp`]'s `Drop`);
//! - [`model`]: the oracle ([`SequentialModel`], [`assert_matches_model`]) and deterministic
//!   workloads ([`Lcg`], [`mixed_requests`], [`request`]);
//! - [`process`]: the `walletq worker` binary as a child ([`WorkerProcess`],
//!   [`spawn_worker_process`]), [`free_port`] and [`http_get`];
//! - [`raw_amqp`]: a hand-made AMQP publisher for messages no client library will send.

pub(crate) mod fixture;
pub(crate) mod model;
pub(crate) mod process;
pub(crate) mod raw_amqp;

pub(crate) use fixture::*;
pub(crate) use model::*;
pub(crate) use process::*;
