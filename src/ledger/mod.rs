//! PostgreSQL: the wallets, the stored requests and results, the append-only ledger.
//!
//! A batch is applied in one transaction with three set-based statements, whatever its
//! size: the fence check; the reads (the wallets locked, the requests already known); the
//! writes (balances, only where unchanged since the read; requests with their results;
//! ledger entries; coupons). docs/ARCHITECTURE.md explains why the fence check is a
//! statement of its own ("The fenced write is sound on its own").

pub mod audit;
mod cursors;
pub mod group;
pub mod holds;
pub mod limits;
mod load;
mod write;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use rust_decimal::Decimal;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::domain::{
    Coupon, ForwardStamp, Limits, Money, Request, RequestId, RequestResult, UserId, Wallet, plan_batch,
};
use crate::reach::{Service, ServiceError, Target};
use crate::telemetry::redact_url;

/// Why a batch was not applied. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A newer lock holder has written for this user: this worker's lock expired.
    #[error("fencing token for user {0} is older than one already written: the lock was lost")]
    StaleFence(UserId),
    /// PostgreSQL refused or failed the statement (or could not be reached).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored row cannot be read back as valid data.
    #[error("stored data breaks an invariant: {0}")]
    Corrupt(String),
    /// The batch's wallet write found wallets other than it read: `written` of `expected`
    /// rows matched. Another transaction wrote them meanwhile; retrying reads them afresh.
    #[error("{written} of {expected} wallet writes matched the balances read: a wallet changed meanwhile")]
    WalletChanged {
        /// Wallet rows the write meant to change.
        expected: usize,
        /// Wallet rows it changed.
        written: i64,
    },
    /// The transaction did not end within its client-side bound ([`TRANSACTION_TIMEOUT_MS`]
    /// by default): a stalled or half-open link, or a server that stopped answering. Its
    /// connection was closed, not returned to the pool. The transaction may have committed
    /// if the bound ran out during `COMMIT`; a retry then answers the batch as replays.
    #[error("the ledger transaction did not finish within {after_ms} ms; its connection was closed")]
    TimedOut {
        /// The bound that ran out.
        after_ms: u64,
    },
    /// The group committer is gone (the worker is shutting down).
    #[error("the ledger's group committer has stopped")]
    Stopped,
}

/// A wallet as read back: its figures, active holds and coupons.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredWallet {
    /// The wallet's owner.
    pub user_id: UserId,
    /// The money in the wallet.
    pub balance: Money,
    /// The sum of its active holds.
    pub held: Money,
    /// `balance − held`: what a withdrawal or a hold may take.
    pub available: Money,
    /// The active holds, soonest to expire first (at most [`ACTIVE_HOLDS_SHOWN_MAX`]).
    pub holds: Vec<holds::ActiveHold>,
    /// The coupons granted, oldest first.
    pub coupons: Vec<Coupon>,
}

/// Most active holds a wallet read lists.
pub const ACTIVE_HOLDS_SHOWN_MAX: i64 = 100;

/// Longest wait for a connection from the pool (opening one included).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a connection outside the pool (TCP, TLS, startup), such as the one that
/// creates a missing database: an address that drops packets fails instead of hanging.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Client-side bound on one ledger transaction, from BEGIN to COMMIT. Above
/// `statement_timeout` + `lock_timeout`, so the server's bounds end a slow statement first;
/// this one ends what they cannot: a stalled or half-open link, on which nothing answers.
pub const TRANSACTION_TIMEOUT_MS: u64 = 45_000;
/// TCP keepalive on the PostgreSQL sockets: the first probe after this much silence...
pub const TCP_KEEPALIVE_IDLE_MS: u64 = 10_000;
/// ...then one probe this often...
pub const TCP_KEEPALIVE_INTERVAL_MS: u64 = 5_000;
/// ...and the connection is dropped after this many unanswered probes (a dead peer on an
/// idle pooled connection is found in 10 + 3 × 5 = 25 s). The same total bounds data sent
/// and never acknowledged (`TCP_USER_TIMEOUT`), which keepalive does not cover.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
/// Server-side bound on any one statement of a walletq session (PostgreSQL `statement_timeout`).
pub const STATEMENT_TIMEOUT_MS: u64 = 30_000;
/// Longest wait for a row lock (PostgreSQL `lock_timeout`): a transaction blocked behind
/// another (a worker that lost its partition mid-batch) fails and its batches are retried,
/// rather than holding up the group commit until `statement_timeout`.
pub const LOCK_TIMEOUT_MS: u64 = 10_000;
/// A session left idle inside a transaction this long is ended by the server, freeing its
/// row locks (PostgreSQL `idle_in_transaction_session_timeout`).
pub const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// What connecting may do to the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Create the database when missing and run the embedded migrations (needs DDL rights).
    Migrate,
    /// Change nothing; fail unless every embedded migration is applied. For a role
    /// without DDL rights (deploy/postgres/roles.sql).
    Check,
}

/// The ledger database.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    /// Client-side bound on one `apply_batch` transaction ([`TRANSACTION_TIMEOUT_MS`] unless
    /// [`Ledger::with_transaction_timeout`] changed it).
    transaction_timeout: Duration,
    /// The limits of every wallet without limits of its own (the worker's `--limit-*` flags).
    default_limits: Limits,
}

impl Ledger {
    /// Creates the database when missing, connects a pool and runs the embedded migrations.
    /// TLS follows the URL's `sslmode`; `ca_file` adds CA certificates to verify the server.
    pub async fn connect(database_url: &str, max_connections: u32, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        Self::connect_with(database_url, max_connections, ca_file, Schema::Migrate).await
    }

    /// Connects a pool; with [`Schema::Check`] it runs no DDL at all.
    pub async fn connect_with(
        database_url: &str,
        max_connections: u32,
        ca_file: Option<&Path>,
        schema: Schema,
    ) -> anyhow::Result<Self> {
        let shown = redact_url(database_url);
        let target = Target::parse(Service::PostgreSql, database_url, 5432)?;
        // Every ledger statement reads or writes by key: never plan a sequential scan. A
        // generic plan cached while a table was small or unanalysed (a fresh database) would
        // otherwise keep scanning the whole table for `= ANY($1)` as it grows, until
        // autovacuum's next ANALYZE invalidates it. With that excluded the generic plans are
        // the right ones, so plan each statement once per connection rather than per batch.
        let mut options =
            PgConnectOptions::from_str(database_url).with_context(|| format!("parsing {shown}"))?.options([
                ("statement_timeout", STATEMENT_TIMEOUT_MS.to_string()),
                ("lock_timeout", LOCK_TIMEOUT_MS.to_string()),
                ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_TIMEOUT_MS.to_string()),
                ("enable_seqscan", "off".to_owned()),
                ("plan_cache_mode", "force_generic_plan".to_owned()),
                // With sequential scans priced out, a statement that has no usable index (an
                // audit check, an operator's read) gets an enormous cost estimate, and JIT
                // would compile it (~200 ms each time): never worth it for these statements.
                ("jit", "off".to_owned()),
            ]);
        if let Some(ca_file) = ca_file {
            crate::tls::read_ca_pem(ca_file)?;
            options = options.ssl_root_cert(ca_file);
        }
        target.resolve().await?;
        if schema == Schema::Migrate {
            create_database_if_missing(&options, &shown, &target).await?;
        }
        // One connection first, so a wrong address, user or database is said as such at
        // once rather than as the pool's acquire timeout.
        connect_once(&options, &target).await?.close().await.context("closing the first connection")?;
        let port = options.get_port();
        let pool = PgPoolOptions::new()
            .after_connect(move |_, _| {
                Box::pin(async move {
                    tune_sockets_to(port);
                    Ok(())
                })
            })
            .max_connections(max_connections)
            .min_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {shown}"))?;
        match schema {
            Schema::Migrate => MIGRATOR.run(&pool).await.context("running database migrations")?,
            Schema::Check => check_migrated(&pool).await?,
        }
        Ok(Ledger {
            pool,
            transaction_timeout: Duration::from_millis(TRANSACTION_TIMEOUT_MS),
            default_limits: Limits::default(),
        })
    }

    /// Sets the client-side bound on one [`Ledger::apply_batch`] transaction (default
    /// [`TRANSACTION_TIMEOUT_MS`]). Tests shorten it to stall a link without waiting 45 s;
    /// keep it above `statement_timeout` + `lock_timeout` so the server's own bounds act first.
    pub fn with_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// Sets the limits of every wallet that has none of its own (default: none).
    pub fn with_default_limits(mut self, limits: Limits) -> Self {
        self.default_limits = limits;
        self
    }

    /// The limits of wallets without limits of their own.
    pub fn default_limits(&self) -> Limits {
        self.default_limits
    }

    /// The connection pool, for reads outside the pipeline.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `requests` in order under the given fencing tokens, in one transaction, and
    /// returns one result per request.
    ///
    /// The transaction is bounded on the client side too ([`Ledger::with_transaction_timeout`]):
    /// past the bound it is abandoned with [`LedgerError::TimedOut`] and its connection is
    /// closed rather than returned to the pool, whose state mid-statement nobody knows.
    pub async fn apply_batch(
        &self,
        requests: &[Request],
        fences: &[(UserId, i64)],
    ) -> Result<Vec<RequestResult>, LedgerError> {
        self.apply_forwarded(requests, fences, &[]).await
    }

    /// [`Ledger::apply_batch`] that also moves the given partitions' cursors (at most one
    /// each), in the same transaction: the forwards a partition admitted count as applied
    /// exactly when their requests are.
    pub async fn apply_forwarded(
        &self,
        requests: &[Request],
        fences: &[(UserId, i64)],
        cursors: &[(u16, ForwardStamp)],
    ) -> Result<Vec<RequestResult>, LedgerError> {
        let mut conn = self.pool.acquire().await?;
        let applying = apply_in(&mut conn, requests, fences, cursors, self.default_limits);
        match tokio::time::timeout(self.transaction_timeout, applying).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Closing the socket (dropping the detached connection) ends the server's
                // session as soon as the link carries the close; the pool opens a replacement.
                drop(conn.detach());
                let after_ms = u64::try_from(self.transaction_timeout.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(after_ms, "a ledger transaction timed out; its connection was closed");
                Err(LedgerError::TimedOut { after_ms })
            }
        }
    }

    /// The stored result of a request, if it was processed.
    pub async fn stored_result(&self, request_id: &RequestId) -> anyhow::Result<Option<RequestResult>> {
        let row: Option<String> = sqlx::query_scalar("SELECT result::text FROM requests WHERE request_id = $1")
            .bind(request_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .context("reading a stored result")?;
        row.map(|text| {
            serde_json::from_str::<RequestResult>(&text)
                .context("decoding a stored result")
                .map(|r| r.with_hold_figures())
        })
        .transpose()
    }

    /// The wallet of `user` with its coupons, or `None` when it has none.
    pub async fn wallet(&self, user: &UserId) -> anyhow::Result<Option<StoredWallet>> {
        // One connection for the three reads: a busy pool is waited for once.
        let mut conn = self.pool.acquire().await.context("reading a wallet")?;
        let figures: Option<(Decimal, Decimal)> =
            sqlx::query_as("SELECT balance, held FROM wallets WHERE user_id = $1")
                .bind(user.as_str())
                .fetch_optional(&mut *conn)
                .await
                .context("reading a wallet")?;
        let Some((balance, held)) = figures else {
            return Ok(None);
        };
        let rows = sqlx::query("SELECT code, kind FROM coupons WHERE user_id = $1 ORDER BY granted_at, code")
            .bind(user.as_str())
            .fetch_all(&mut *conn)
            .await
            .context("reading coupons")?;
        let coupons = rows
            .iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let kind = serde_json::from_value(serde_json::Value::String(kind)).context("unknown coupon kind")?;
                Ok(Coupon { code: row.try_get("code")?, kind })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let wallet = Wallet {
            balance: Money::from_decimal(balance).context("stored balance is not valid money")?,
            held: Money::from_decimal(held).context("stored held is not valid money")?,
        };
        let holds = holds::read_active_holds(&mut *conn, user, ACTIVE_HOLDS_SHOWN_MAX).await?;
        Ok(Some(StoredWallet {
            user_id: user.clone(),
            balance: wallet.balance,
            held: wallet.held,
            available: wallet.available(),
            holds,
            coupons,
        }))
    }
}

/// Creates the URL's database through the `postgres` maintenance database when it is
/// missing, with the same connection options (TLS included).
/// One connection outside the pool, bounded by [`CONNECT_TIMEOUT_MS`]; a failure is a
/// [`ServiceError`] naming the address and the likely fix.
async fn connect_once(options: &PgConnectOptions, target: &Target) -> Result<PgConnection, ServiceError> {
    let after = Duration::from_millis(CONNECT_TIMEOUT_MS);
    match tokio::time::timeout(after, PgConnection::connect_with(options)).await {
        Err(_) => Err(target.timed_out(after)),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(connect_error(target, options.get_database(), &error)),
    }
}

/// What a failed connection means, by variant and SQLSTATE; the server's message alone
/// (without sqlx's wrapping) when nothing more specific applies.
fn connect_error(target: &Target, database: Option<&str>, error: &sqlx::Error) -> ServiceError {
    match error {
        sqlx::Error::Io(io) => target.io_error(io),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid_authorization_specification (no such role, pg_hba), invalid_password
            Some("28000" | "28P01") => target.login_refused(),
            // invalid_catalog_name
            Some("3D000") => ServiceError::NoDatabase {
                service: Service::PostgreSql,
                address: target.address(),
                database: database.unwrap_or_default().to_owned(),
            },
            _ => target.other(&db.message()),
        },
        sqlx::Error::Tls(tls) => target.other(&format!("TLS: {tls}")),
        other => target.other(other),
    }
}

async fn create_database_if_missing(options: &PgConnectOptions, shown: &str, target: &Target) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let admin_options = options.clone().database("postgres");
    let mut admin = connect_once(&admin_options, target).await?;
    let exists_sql = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)";
    let exists: bool = sqlx::query_scalar(exists_sql).bind(&name).fetch_one(&mut admin).await?;
    if !exists {
        let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut admin).await {
            // Another process may have created it in the meantime.
            let exists: bool = sqlx::query_scalar(exists_sql).bind(&name).fetch_one(&mut admin).await?;
            if !exists {
                return Err(error).with_context(|| format!("creating database {shown}"));
            }
        }
        tracing::info!(database = %shown, "created database");
    }
    admin.close().await.context("closing the maintenance connection")?;
    Ok(())
}

/// Fails unless every migration embedded in this binary is applied.
async fn check_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .context("reading the applied migrations: run `walletq migrate` as the schema owner first")?;
    let missing: Vec<i64> = MIGRATOR.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the database lacks migrations {missing:?}: run `walletq migrate` as the schema owner first"
    );
    Ok(())
}

/// Tunes every TCP socket of this process connected to `port`: no Nagle's algorithm, and
/// keepalive with a user timeout. Runs after each connect; sqlx 0.9.0 offers neither option.
///
/// `TCP_NODELAY`: sqlx 0.9.0 stopped setting it (launchbadge/sqlx#4335, fixed upstream by
/// #4336, not released yet). Over TLS (`sslmode=prefer`, the default) a statement larger than
/// one 16 KiB record — a batch's `INSERT … unnest(…)` — is written as several records, and
/// Nagle holds the last one until the server's delayed ACK: about 40 ms per statement.
/// Remove that part once sqlx sets the option itself.
///
/// Keepalive ([`TCP_KEEPALIVE_IDLE_MS`] and the next two) and `TCP_USER_TIMEOUT`: a peer
/// that vanished (a host gone, a dropped NAT entry) is noticed within about 25 s instead of
/// the kernel's defaults (hours idle, about 15 minutes of retransmissions).
fn tune_sockets_to(port: u16) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_millis(TCP_KEEPALIVE_IDLE_MS))
        .with_interval(Duration::from_millis(TCP_KEEPALIVE_INTERVAL_MS))
        .with_retries(TCP_KEEPALIVE_PROBES);
    let user_timeout =
        Duration::from_millis(TCP_KEEPALIVE_IDLE_MS + TCP_KEEPALIVE_INTERVAL_MS * u64::from(TCP_KEEPALIVE_PROBES));
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<std::os::fd::RawFd>().ok()) else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the socket calls below; should another
        // thread close it meanwhile, they fail (EBADF, ENOTSOCK) and the failure is ignored.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let peer_port = socket.peer_addr().ok().and_then(|peer| peer.as_socket()).map(|peer| peer.port());
        if peer_port != Some(port) {
            continue;
        }
        if socket.tcp_nodelay().is_ok_and(|on| !on) {
            let _ = socket.set_tcp_nodelay(true);
        }
        if socket.keepalive().is_ok_and(|on| !on) {
            let _ = socket.set_tcp_keepalive(&keepalive);
            let _ = socket.set_tcp_user_timeout(Some(user_timeout));
        }
    }
}

fn new_coupon_code() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string().to_ascii_uppercase();
    format!("WQ-{}", &hex[..16])
}

/// The transaction of [`Ledger::apply_batch`], on one connection.
async fn apply_in(
    conn: &mut PgConnection,
    requests: &[Request],
    fences: &[(UserId, i64)],
    cursors: &[(u16, ForwardStamp)],
    default_limits: Limits,
) -> Result<Vec<RequestResult>, LedgerError> {
    let mut tx = conn.begin().await?;

    // 1. Fencing, alone (see `fence`): refuse if a newer token has written for a user. The
    //    partitions' cursors move in the same statement.
    let mut sorted: Vec<&(UserId, i64)> = fences.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let fenced: Vec<String> = sorted.iter().map(|(u, _)| u.as_str().to_owned()).collect();
    let tokens: Vec<i64> = sorted.iter().map(|(_, t)| *t).collect();
    let accepted = fence(&mut tx, &fenced, &tokens, cursors).await?;
    if accepted.len() != fenced.len() {
        let stale = sorted
            .iter()
            .find(|(u, _)| !accepted.iter().any(|a| a == u.as_str()))
            .map(|(u, _)| u.clone())
            .ok_or_else(|| LedgerError::Corrupt("fence check returned unknown users".into()))?;
        return Err(LedgerError::StaleFence(stale));
    }

    // 2. The wallets (locked) of the requests' users and of the fenced ones (a batch with no
    //    request expires the due holds of its fenced users), the requests already known, the
    //    holds named or due, and the database's clock.
    let mut users: Vec<String> = requests.iter().map(|r| r.user_id.as_str().to_owned()).collect();
    users.extend(fenced);
    users.sort();
    users.dedup();
    let (state, now) = load::load(&mut tx, requests, &users, default_limits).await?;

    // 3. Apply the rules (pure), then write the plan: each wallet only if it still holds
    //    the figures read (or, when none was read, only if no one created it meanwhile).
    let read = state.wallets.clone();
    let plan = plan_batch(requests, state, now, new_coupon_code);
    write::write_plan(&mut tx, &plan, &read, now).await?;
    tx.commit().await?;
    Ok(plan.results)
}

/// Fences the users: upserts each user's fence row (sorted by the caller, so concurrent
/// batches can't deadlock) unless a newer token has written, and keeps it row-locked until
/// the transaction ends. Returns the users whose fence was accepted.
///
/// This is a statement of its own, before the reads: if it had to wait for another
/// transaction's fence row, the reads that follow take their snapshot after that transaction
/// ended and see everything it wrote, wallets it created included.
async fn fence(
    tx: &mut sqlx::PgConnection,
    users: &[String],
    tokens: &[i64],
    cursors: &[(u16, ForwardStamp)],
) -> Result<Vec<String>, LedgerError> {
    debug_assert!(
        cursors.iter().enumerate().all(|(i, (p, _))| cursors[..i].iter().all(|(q, _)| q != p)),
        "one cursor per partition in a transaction"
    );
    const STATEMENT: &str = concat!(
        "WITH cursors AS (",
        cursors::advance_cursors_sql!(),
        ") INSERT INTO user_fences (user_id, fence)
         SELECT * FROM unnest($4::text[], $5::bigint[])
         ON CONFLICT (user_id) DO UPDATE SET fence = EXCLUDED.fence
         WHERE user_fences.fence <= EXCLUDED.fence
         RETURNING user_id"
    );
    let accepted = sqlx::query_scalar(STATEMENT)
        .bind(cursors.iter().map(|(p, _)| i32::from(*p)).collect::<Vec<_>>())
        .bind(cursors.iter().map(|(_, c)| c.epoch).collect::<Vec<_>>())
        .bind(cursors.iter().map(|(_, c)| c.seq).collect::<Vec<_>>())
        .bind(users)
        .bind(tokens)
        .fetch_all(&mut *tx)
        .await?;
    Ok(accepted)
}

/// Per-user final balances, for callers that read many at once (tests, bench, audit).
pub async fn balances(pool: &PgPool) -> anyhow::Result<HashMap<String, Money>> {
    let rows = sqlx::query("SELECT user_id, balance FROM wallets").fetch_all(pool).await.context("reading balances")?;
    rows.iter()
        .map(|row| {
            let user: String = row.try_get("user_id")?;
            let balance: Decimal = row.try_get("balance")?;
            Ok((user, Money::from_decimal(balance).context("stored balance is not valid money")?))
        })
        .collect()
}
