//! Settings from flags and environment, with defaults for the local services.

use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::domain::{Limits, Money};

/// Where the three services are, and which namespace of names this deployment uses.
#[derive(Args, Debug, Clone)]
pub struct ServiceSettings {
    /// PostgreSQL URL; the database is created when missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/walletq",
        hide_env_values = true
    )]
    pub database_url: String,
    /// RabbitMQ URL, or several separated by commas (the nodes of a cluster): a connection
    /// goes to the first that answers, starting with the one that answered last, and moves
    /// to the next on failure.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    pub amqp_url: String,
    /// Redis URL: `redis://`, `rediss://` (TLS), or
    /// `redis+sentinel://[user:password@]host:26379,host:26379,…/service[?db=N]` to follow
    /// the master the Sentinels name through failovers.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub redis_url: String,
    /// PEM file of CA certificates trusted for TLS to all three services (`amqps://`,
    /// `rediss://`, PostgreSQL `sslmode=verify-ca|verify-full`), besides the system roots
    /// (for Redis: instead of them).
    #[arg(long, env = "WALLETQ_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of every exchange, queue and Redis key (`walletq.requests`, `walletq:lock:…`).
    #[arg(long, env = "WALLETQ_NAMESPACE", default_value = "walletq", value_parser = parse_namespace)]
    pub namespace: String,
}

pub use crate::broker::QueueType;

/// `--queue-type quorum|classic`: the broker's plain enum, parsed by clap here, so the
/// adapter knows nothing of the command line.
impl ValueEnum for QueueType {
    fn value_variants<'a>() -> &'a [Self] {
        &[QueueType::Quorum, QueueType::Classic]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

impl From<&TopologySettings> for crate::broker::Topology {
    fn from(settings: &TopologySettings) -> Self {
        crate::broker::Topology { partitions: settings.partitions, queue_type: settings.queue_type }
    }
}

/// How the request topology is laid out.
#[derive(Args, Debug, Clone)]
pub struct TopologySettings {
    /// Number of partition queues (`<namespace>.requests.0` … `.N-1`).
    #[arg(long, env = "WALLETQ_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,
    /// Queue type of the partition queues (the ingress queue is always quorum: its delivery
    /// limit sets aside a message no client can decode).
    #[arg(long, env = "WALLETQ_QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum)]
    pub queue_type: QueueType,
}

/// Tuning of the worker pipeline; every bound is explicit.
#[derive(Args, Debug, Clone)]
pub struct WorkerSettings {
    /// Most deliveries applied in one batch (one lock round trip, one transaction).
    #[arg(long, env = "WALLETQ_BATCH_MAX", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_max: u16,
    /// Unacked deliveries the broker may push per partition (0 = twice `batch_max`).
    #[arg(long, env = "WALLETQ_PREFETCH", default_value_t = 0)]
    pub prefetch: u16,
    /// TTL of a per-user Redis lock; extended while the batch runs.
    #[arg(long, env = "WALLETQ_LOCK_TTL_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub lock_ttl_ms: u64,
    /// Attempts to take a batch's locks before the batch goes back to its queue.
    #[arg(long, env = "WALLETQ_LOCK_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub lock_attempts: u32,
    /// Upper bound of the jittered backoff between lock attempts and reconnects.
    #[arg(long, env = "WALLETQ_BACKOFF_MAX_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub backoff_max_ms: u64,
    /// PostgreSQL connections in the worker's pool.
    #[arg(long, env = "WALLETQ_DB_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub db_connections: u32,
    /// Ledger transactions in flight at once (group commit). Partitions' batches that wait
    /// while all are busy are merged into the next one; at most `db_connections`. One gives
    /// the largest merges and the best throughput (docs/BENCHMARKS.md).
    #[arg(long, env = "WALLETQ_GROUP_TRANSACTIONS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub group_transactions: u32,
    /// How long a shutdown waits for the batch in flight.
    #[arg(long, env = "WALLETQ_DRAIN_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub drain_timeout_ms: u64,
    /// Attempts at a message the database keeps refusing before it is rejected and dead-lettered.
    #[arg(long, env = "WALLETQ_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// Membership heartbeat period.
    #[arg(long, env = "WALLETQ_HEARTBEAT_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub heartbeat_ms: u64,
    /// A worker silent for this long is considered gone and its partitions move.
    #[arg(long, env = "WALLETQ_MEMBER_TTL_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    pub member_ttl_ms: u64,
    /// Run no DDL: check the schema is migrated instead of migrating it (for a database
    /// role without DDL rights; see deploy/postgres/roles.sql).
    #[arg(long, env = "WALLETQ_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Serve /metrics, /healthz and /readyz on this address (off when unset).
    #[arg(long, env = "WALLETQ_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The limits of wallets without limits of their own.
    #[command(flatten)]
    pub limits: LimitSettings,
}

/// Default withdrawal limits of every wallet (each off unless set); `walletq limits set`
/// overrides them per user. Give every service (worker, gateway, `walletq balance`) the same.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct LimitSettings {
    /// Largest single withdrawal or hold, e.g. 500.00.
    #[arg(long, env = "WALLETQ_LIMIT_PER_WITHDRAWAL", value_parser = parse_limit_amount)]
    pub limit_per_withdrawal: Option<Money>,
    /// Most money that may leave a wallet in any rolling 24 hours, e.g. 2000.00.
    #[arg(long, env = "WALLETQ_LIMIT_DAILY_AMOUNT", value_parser = parse_limit_amount)]
    pub limit_daily_amount: Option<Money>,
    /// Most withdrawals and holds of a wallet in any rolling 24 hours.
    #[arg(long, env = "WALLETQ_LIMIT_DAILY_COUNT", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit_daily_count: Option<u32>,
}

impl From<LimitSettings> for Limits {
    fn from(settings: LimitSettings) -> Self {
        Limits {
            per_withdrawal: settings.limit_per_withdrawal,
            daily_amount: settings.limit_daily_amount,
            daily_count: settings.limit_daily_count,
        }
    }
}

/// A limit's amount: the rules of a request amount (plain decimal, 2 places, above 0).
pub fn parse_limit_amount(text: &str) -> Result<Money, String> {
    Money::parse_amount(text).map_err(|e| e.to_string())
}

/// Where and how the HTTP gateway serves.
#[derive(Args, Debug, Clone)]
pub struct GatewaySettings {
    /// Address the HTTP API listens on.
    #[arg(long, env = "WALLETQ_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// PostgreSQL connections in the gateway's pool (reads of results and wallets).
    #[arg(long, env = "WALLETQ_DB_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub db_connections: u32,
    /// Longest lifetime a bearer token may declare (`exp` - `iat`, or `exp` - now without
    /// `iat`), e.g. 15m, 24h, 7days; longer-lived tokens are refused (1s to 366days).
    #[arg(long, env = "WALLETQ_JWT_MAX_TTL", default_value = "24h", value_parser = parse_max_ttl)]
    pub jwt_max_ttl: Duration,
    /// Run no DDL: check the schema is migrated instead of creating and migrating the
    /// database (for a read-only role; see deploy/postgres/roles.sql).
    #[arg(long, env = "WALLETQ_NO_MIGRATE")]
    pub no_migrate: bool,
    /// The limits of wallets without limits of their own, as the workers have them: shown
    /// by `GET /v1/wallet` (the workers enforce them).
    #[command(flatten)]
    pub limits: LimitSettings,
}

/// Longest `--jwt-max-ttl` accepted: a year and a day; a token living longer is not a session.
pub const JWT_MAX_TTL_CEILING: Duration = Duration::from_secs(366 * 24 * 60 * 60);

impl Default for GatewaySettings {
    fn default() -> Self {
        flag_defaults()
    }
}

/// A humantime duration (`90s`, `24h`, `7days`) between 1 s and [`JWT_MAX_TTL_CEILING`].
fn parse_max_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) || ttl > JWT_MAX_TTL_CEILING {
        return Err("must be between 1s and 366days".into());
    }
    Ok(ttl)
}

impl WorkerSettings {
    /// Prefetch per partition channel.
    pub fn effective_prefetch(&self) -> u16 {
        if self.prefetch == 0 { self.batch_max.saturating_mul(2) } else { self.prefetch }
    }
}

fn parse_namespace(text: &str) -> Result<String, String> {
    let ok = (1..=48).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok { Ok(text.to_owned()) } else { Err("1-48 characters of [a-z0-9_-]".into()) }
}

/// Settings as their flags' defaults say, whatever the environment holds: each default is
/// written once, in its `#[arg]` attribute, and `Default` reads it from there.
fn flag_defaults<T: Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    let matches = command.try_get_matches_from(["defaults"]);
    // Every setting has a default or is optional (checked by `defaults_come_from_the_flags`).
    matches.and_then(|m| T::from_arg_matches(&m)).unwrap_or_else(|error| panic!("flag defaults: {error}"))
}

impl Default for ServiceSettings {
    fn default() -> Self {
        flag_defaults()
    }
}

impl Default for TopologySettings {
    fn default() -> Self {
        flag_defaults()
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        flag_defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_flags() {
        let worker = WorkerSettings::default();
        assert_eq!((worker.batch_max, worker.lock_ttl_ms, worker.member_ttl_ms), (256, 5_000, 3_000));
        assert_eq!(worker.effective_prefetch(), 512);
        assert_eq!(ServiceSettings::default().namespace, "walletq");
        assert_eq!(ServiceSettings::default().amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(TopologySettings::default().partitions, 16);
        assert_eq!(TopologySettings::default().queue_type, QueueType::Quorum);
        assert_eq!(GatewaySettings::default().listen, std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
    }

    #[test]
    fn namespace_is_restricted() {
        assert!(parse_namespace("walletq").is_ok());
        assert!(parse_namespace("t_1-x").is_ok());
        assert!(parse_namespace("").is_err());
        assert!(parse_namespace("Bad.Name").is_err());
    }

    #[test]
    fn the_token_lifetime_is_a_bounded_duration() {
        assert_eq!(parse_max_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_max_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_max_ttl("366days"), Ok(JWT_MAX_TTL_CEILING));
        for bad in ["0s", "500ms", "367days", "forever", "", "-1h"] {
            assert!(parse_max_ttl(bad).is_err(), "{bad:?}");
        }
        assert_eq!(GatewaySettings::default().jwt_max_ttl, Duration::from_secs(86_400));
    }
}
