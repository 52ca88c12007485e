//! walletq: wallet withdrawals that are safe under any concurrency.
//!
//! Producers publish requests (JSON) to RabbitMQ; a router moves them from one ordered
//! ingress queue to partition queues by user, each consumed by a single active worker. A
//! worker applies a batch under per-user Redis locks with fencing tokens (a backstop), in one
//! PostgreSQL transaction (idempotent by request id, never negative), publishes each result
//! to its reply queue, acks, and only then releases the locks.
//!
//! # Layers
//!
//! Dependencies point inward; `layers::dependencies_point_inward` (a test) fails otherwise.
//!
//! | layer | modules | knows |
//! | --- | --- | --- |
//! | domain (pure) | [`domain`]: money, requests and their decoding, results, the wallet rules ([`domain::plan_batch`]), partitioning, worker assignment | nothing outside itself: no RabbitMQ, Redis, SQL or clock |
//! | adapters | [`broker`] (RabbitMQ: topology, confirms), [`lock`] (Redis: fenced user locks), [`membership`] (Redis: heartbeats), [`ledger`] (PostgreSQL: batches, audit), [`telemetry`], [`reach`] (connection failures a user can act on), and the private `redis_link` (Redis: one server or the master Sentinel names), `backoff`, `tls` and `grouping` (the one machine behind group commit and group locking) | the domain, and plain settings; never the pipeline or an edge |
//! | pipeline | [`worker`]: the router, one ordered pipeline per partition, group commit and group locking | the domain and the adapters |
//! | edges | [`gateway`] (HTTP), [`Client`] (producers in Rust), [`status`], [`configuration`] (flags and environment), and the private `cli` (the `walletq` command, run by [`run_cli`]) and `dead` (dead letters) | everything |
//!
//! # The public surface
//!
//! What a producer needs ([`Client`], the [`domain`] types, the protocol's
//! [`domain::decode_request`] and `RequestResult`) and what an embedder needs to run and
//! observe walletq in its own process ([`worker::run_worker`], [`gateway::app`],
//! [`ledger::Ledger`] with its audit, [`configuration`], [`status`]). The adapters stay
//! public because the integration tests and the bench drive them directly (group commit,
//! fenced locks, topology); the command line and the dead-letter tool are the binary's own.
//!
//! docs/ARCHITECTURE.md walks through the flow, the crash table and the module map.

pub mod broker;
pub mod configuration;
pub mod domain;
pub mod gateway;
pub mod ledger;
pub mod lock;
pub mod membership;
pub mod reach;
pub mod status;
pub mod telemetry;
pub mod worker;

mod backoff;
mod cli;
mod client;
mod dead;
mod grouping;
mod redis_link;
mod tls;

pub use cli::main as run_cli;
pub use client::Client;

#[cfg(test)]
mod layers {
    //! The layer map above, checked against the source.

    use std::path::{Path, PathBuf};

    /// Every `.rs` file under `dir`, recursively.
    fn sources(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(sources(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        files
    }

    /// `(file, line)` of every line in `paths` (files or directories under src/) that names
    /// one of `forbidden`.
    fn offending(paths: &[&str], forbidden: &[&str]) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        for path in paths {
            let path = src.join(path);
            let files = if path.is_dir() { sources(&path) } else { vec![path] };
            assert!(!files.is_empty(), "no source under {}", src.display());
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                for (number, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or_default();
                    if forbidden.iter().any(|name| code.contains(name)) {
                        found.push(format!("{}:{}: {}", file.display(), number + 1, line.trim()));
                    }
                }
            }
        }
        found
    }

    const ADAPTERS: &[&str] = &[
        "broker",
        "lock.rs",
        "membership.rs",
        "ledger",
        "telemetry.rs",
        "backoff.rs",
        "tls.rs",
        "reach.rs",
        "redis_link.rs",
    ];
    const EDGES: &[&str] =
        &["crate::cli", "crate::gateway", "crate::client", "crate::status", "crate::configuration", "crate::dead"];

    #[test]
    fn dependencies_point_inward() {
        let mut outward = Vec::new();
        let outside_domain = [
            "crate::broker",
            "crate::lock",
            "crate::membership",
            "crate::ledger",
            "crate::telemetry",
            "crate::reach",
            "crate::backoff",
            "crate::tls",
            "crate::worker",
            "lapin",
            "redis::",
            "sqlx",
            "axum",
            "tokio",
        ];
        outward.extend(offending(&["domain"], &outside_domain));
        outward.extend(offending(&["domain"], EDGES));
        let mut pipeline_and_edges = vec!["crate::worker"];
        pipeline_and_edges.extend(EDGES);
        outward.extend(offending(ADAPTERS, &pipeline_and_edges));
        outward.extend(offending(&["worker"], &EDGES[..4]));
        assert!(outward.is_empty(), "imports against the layer map (src/lib.rs):\n{}", outward.join("\n"));
    }

    #[test]
    fn the_check_sees_an_outward_import() {
        let found = offending(&["lib.rs"], &["crate::layers_marker_for_the_self_test"]);
        // This very line names the marker, so the scan must find it.
        assert_eq!(found.len(), 1, "{found:?}");
    }
}
