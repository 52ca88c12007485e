//! Integration tests of the bench against the real RabbitMQ, Redis and PostgreSQL (the
//! same services as walletq's own tests/api). Each bench run uses fresh namespaces and
//! databases of its own.

mod bench;

/// The environment variable `key`, or `default` when unset.
pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}
