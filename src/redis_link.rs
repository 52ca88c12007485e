//! A Redis connection that reconnects by itself: to one server (`redis://`, `rediss://`), or
//! to whichever server the Sentinels name as the master of a service
//! (`redis+sentinel://[user:password@]host1:26379,host2:26379,host3:26379/mymaster[?db=N]`).
//!
//! Through Sentinel, the connection asks the Sentinels (in the order given, the first that
//! answers) for the master's address, checks that the server there says it is a master
//! (`ROLE`), and keeps that connection. When a command fails on the connection (I/O, timeout,
//! a dropped link, or `READONLY` from a master demoted to a replica), the error goes back to
//! the caller (who retries with backoff, as for any Redis outage) and the next command asks
//! the Sentinels again: after a failover, that is the promoted replica.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value};

/// The URL scheme of a Sentinel configuration.
pub(crate) const SENTINEL_SCHEME: &str = "redis+sentinel://";

/// A reconnecting Redis connection; cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct RedisLink(Link);

#[derive(Clone)]
enum Link {
    Direct(ConnectionManager),
    Sentinel(Arc<SentinelLink>),
}

impl RedisLink {
    /// A link to one server, through redis-rs's own reconnecting manager.
    pub fn direct(manager: ConnectionManager) -> Self {
        RedisLink(Link::Direct(manager))
    }

    /// A link to the master the Sentinels of `config` name, connected once before it is
    /// returned (so a wrong configuration fails at start-up). `timeout` bounds each
    /// connection attempt and each reply.
    pub async fn sentinel(config: SentinelConfig, timeout: Duration) -> anyhow::Result<Self> {
        let sentinel = Sentinel::build(config.sentinels.iter().map(|s| format!("redis://{s}")).collect())
            .context("configuring the Sentinels")?;
        let mut redis = redis::RedisConnectionInfo::default();
        if let Some(user) = &config.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &config.password {
            redis = redis.set_password(password);
        }
        redis = redis.set_db(config.db);
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
        let link = Arc::new(SentinelLink {
            service: config.service.clone(),
            node,
            timeout,
            state: tokio::sync::Mutex::new(SentinelState { sentinel, current: None, generation: 0 }),
        });
        link.connection()
            .await
            .with_context(|| format!("reaching the master of {:?} through Sentinel", config.service))?;
        Ok(RedisLink(Link::Sentinel(link)))
    }
}

/// A parsed `redis+sentinel://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// The Sentinels' `host:port`, in order (port 26379 when none is given).
    pub sentinels: Vec<String>,
    /// The service (master) name the Sentinels monitor.
    pub service: String,
    /// ACL user for the Redis servers (not the Sentinels).
    pub username: Option<String>,
    /// Password for the Redis servers (not the Sentinels).
    pub password: Option<String>,
    /// Database number (`?db=N`), 0 by default.
    pub db: i64,
}

/// Why a `redis+sentinel://` URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SentinelUrlError {
    /// The URL does not start with `redis+sentinel://`.
    #[error("a Sentinel URL starts with redis+sentinel://")]
    Scheme,
    /// No Sentinel address.
    #[error("a Sentinel URL lists at least one host:port")]
    NoSentinel,
    /// A Sentinel address whose port is not a number.
    #[error("a Sentinel's port is not a number")]
    Port,
    /// No service name after the hosts.
    #[error("a Sentinel URL names the master's service after the hosts: …/mymaster")]
    NoService,
    /// A query parameter other than `db`, or a `db` that is not a number.
    #[error("the only query parameter of a Sentinel URL is db=N")]
    Query,
    /// Credentials that are not valid percent-encoded UTF-8.
    #[error("the credentials of a Sentinel URL are not valid percent-encoded UTF-8")]
    Credentials,
}

impl SentinelConfig {
    /// Parses `redis+sentinel://[user:password@]host[:port][,host[:port]…]/service[?db=N]`.
    pub fn parse(url: &str) -> Result<Self, SentinelUrlError> {
        let rest = url.strip_prefix(SENTINEL_SCHEME).ok_or(SentinelUrlError::Scheme)?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let sentinels = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| match h.rsplit_once(':') {
                Some((host, port)) => {
                    port.parse::<u16>().map(|p| format!("{host}:{p}")).map_err(|_| SentinelUrlError::Port)
                }
                None => Ok(format!("{h}:26379")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sentinels.is_empty() {
            return Err(SentinelUrlError::NoSentinel);
        }
        let (service, query) = path.split_once('?').unwrap_or((path, ""));
        if service.is_empty() {
            return Err(SentinelUrlError::NoService);
        }
        let db = match query {
            "" => 0,
            q => q.strip_prefix("db=").and_then(|n| n.parse().ok()).ok_or(SentinelUrlError::Query)?,
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|d| d.into_owned())
                .map_err(|_| SentinelUrlError::Credentials)
        };
        let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            None => (None, None),
            Some((user, password)) => {
                (Some(decode(user)?).filter(|u| !u.is_empty()), Some(decode(password)?).filter(|p| !p.is_empty()))
            }
        };
        Ok(SentinelConfig { sentinels, service: service.to_owned(), username, password, db })
    }
}

struct SentinelLink {
    service: String,
    node: SentinelNodeConnectionInfo,
    timeout: Duration,
    state: tokio::sync::Mutex<SentinelState>,
}

struct SentinelState {
    sentinel: Sentinel,
    /// The connection to the current master and its generation.
    current: Option<(u64, MultiplexedConnection)>,
    generation: u64,
}

impl SentinelLink {
    /// The connection to the master, asking the Sentinels when there is none.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut state = self.state.lock().await;
        if let Some(current) = &state.current {
            return Ok(current.clone());
        }
        let discover = async {
            let client = state.sentinel.async_master_for(&self.service, Some(&self.node)).await?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout));
            client.get_multiplexed_async_connection_with_config(&config).await
        };
        let connection = tokio::time::timeout(self.timeout * 2, discover)
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "no master found through the Sentinels in time")))??;
        state.generation += 1;
        let current = (state.generation, connection);
        state.current = Some(current.clone());
        tracing::info!(service = %self.service, "connected to the Redis master named by Sentinel");
        Ok(current)
    }

    /// Drops the connection of `generation` after a failure on it, unless another caller
    /// replaced it already.
    async fn forget(&self, generation: u64, error: &RedisError) {
        let mut state = self.state.lock().await;
        if state.current.as_ref().is_some_and(|(g, _)| *g == generation) {
            state.current = None;
            tracing::warn!(service = %self.service, error = %error, "Redis master connection failed; asking the Sentinels again");
        }
    }
}

/// Whether `error` says the connection no longer reaches a usable master.
fn lost_master(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || matches!(error.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown))
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Link::Direct(manager) => manager.req_packed_command(cmd),
            Link::Sentinel(link) => Box::pin(async move {
                let (generation, mut connection) = link.connection().await?;
                let outcome = connection.req_packed_command(cmd).await;
                if let Err(error) = &outcome {
                    if lost_master(error) {
                        link.forget(generation, error).await;
                    }
                }
                outcome
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Link::Direct(manager) => manager.req_packed_commands(pipeline, offset, count),
            Link::Sentinel(link) => Box::pin(async move {
                let (generation, mut connection) = link.connection().await?;
                let outcome = connection.req_packed_commands(pipeline, offset, count).await;
                if let Err(error) = &outcome {
                    if lost_master(error) {
                        link.forget(generation, error).await;
                    }
                }
                outcome
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Link::Direct(manager) => manager.get_db(),
            Link::Sentinel(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_service_and_the_credentials() {
        let config = SentinelConfig::parse("redis+sentinel://app:s%40cret@h1:26379,h2,h3:26381/mymaster?db=2");
        assert_eq!(
            config,
            Ok(SentinelConfig {
                sentinels: vec!["h1:26379".into(), "h2:26379".into(), "h3:26381".into()],
                service: "mymaster".into(),
                username: Some("app".into()),
                password: Some("s@cret".into()),
                db: 2,
            })
        );
        let plain = SentinelConfig::parse("redis+sentinel://127.0.0.1:26379/walletq").expect("valid");
        assert_eq!((plain.username, plain.password, plain.db), (None, None, 0));
        let password_only = SentinelConfig::parse("redis+sentinel://:pw@h/m").expect("valid");
        assert_eq!((password_only.username, password_only.password), (None, Some("pw".into())));
    }

    #[test]
    fn a_malformed_sentinel_url_is_refused_by_reason() {
        let cases = [
            ("redis://h:26379/m", SentinelUrlError::Scheme),
            ("redis+sentinel:///m", SentinelUrlError::NoSentinel),
            ("redis+sentinel://h:port/m", SentinelUrlError::Port),
            ("redis+sentinel://h:26379", SentinelUrlError::NoService),
            ("redis+sentinel://h:26379/", SentinelUrlError::NoService),
            ("redis+sentinel://h:26379/m?timeout=1", SentinelUrlError::Query),
            ("redis+sentinel://u:%ff@h/m", SentinelUrlError::Credentials),
        ];
        for (url, reason) in cases {
            assert_eq!(SentinelConfig::parse(url), Err(reason), "{url}");
        }
    }
}
