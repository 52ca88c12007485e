//! Per-user Redis locks with fencing tokens: the backstop behind single active consumers.
//!
//! A batch takes the lock of each of its users in one round trip (`SET NX PX` with a random
//! token, all or nothing), and gets with it a fencing token per user that only grows:
//! `max(previous + 1, Redis TIME in µs)`, so it keeps growing even after Redis restarts empty.
//! PostgreSQL stores the highest token per user and refuses a lower one, so a worker whose
//! lock expired can never write after a newer holder.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use crate::redis_link::{RedisLink, SENTINEL_SCHEME, SentinelConfig};

use crate::domain::UserId;
use crate::reach::{Service, ServiceError, Target};
use crate::telemetry::redact_url;

/// How long a fencing counter outlives its last use. Tokens stay monotonic after it
/// expires because they never fall below the Redis clock.
const FENCE_KEY_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

const ACQUIRE: &str = r"
local n = #KEYS / 2
for i = 1, n do
  if not redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    for j = 1, i - 1 do
      if redis.call('GET', KEYS[j]) == ARGV[1] then redis.call('DEL', KEYS[j]) end
    end
    return {0, i}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {1}
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[n + i]) or '0')
  local fence = math.max(current + 1, now)
  redis.call('SET', KEYS[n + i], string.format('%d', fence), 'PX', ARGV[3])
  out[i + 1] = fence
end
return out
";

const EXTEND: &str = r"
local held = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    held = held + 1
  end
end
return held
";

const RELEASE: &str = r"
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('DEL', KEYS[i])
    released = released + 1
  end
end
return released
";

/// Longest wait for a Redis connection, and for any reply.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect attempts of a Redis connection before a command fails, and the cap of the delay between them.
pub const REDIS_RECONNECT_RETRIES: usize = 3;
/// Longest pause between two of those reconnect attempts.
pub const REDIS_RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// A Redis connection that reconnects by itself; every command times out after
/// [`REDIS_TIMEOUT`]. `rediss://` URLs use TLS, verified against `ca_file` when given
/// (instead of the system roots). A `redis+sentinel://` URL reaches the master the
/// Sentinels name, and follows a failover (`redis_link.rs`).
pub async fn connect_redis(redis_url: &str, ca_file: Option<&Path>) -> anyhow::Result<RedisLink> {
    let shown = redact_url(redis_url);
    if redis_url.starts_with(SENTINEL_SCHEME) {
        let config = SentinelConfig::parse(redis_url).with_context(|| format!("parsing Redis URL {shown}"))?;
        return RedisLink::sentinel(config, REDIS_TIMEOUT)
            .await
            .with_context(|| format!("connecting to Redis at {shown}"));
    }
    let target = Target::parse(Service::Redis, redis_url, 6379)?;
    let client = match ca_file {
        Some(path) if redis_url.starts_with("rediss://") => {
            let root_cert = Some(crate::tls::read_ca_pem(path)?.into_bytes());
            Client::build_with_tls(redis_url, redis::TlsCertificates { client_tls: None, root_cert })
        }
        _ => Client::open(redis_url),
    }
    .with_context(|| format!("parsing Redis URL {shown}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(REDIS_RECONNECT_RETRIES)
        .set_max_delay(REDIS_RECONNECT_MAX_DELAY);
    target.resolve().await?;
    let manager = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|error| anyhow::Error::from(redis_connect_error(&target, &error)))?;
    Ok(RedisLink::direct(manager))
}

/// What a failed Redis connection means, by kind and error code.
fn redis_connect_error(target: &Target, error: &redis::RedisError) -> ServiceError {
    if error.is_connection_refusal() {
        target.io_error(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    } else if error.is_timeout() {
        target.timed_out(REDIS_TIMEOUT)
    } else if error.kind() == redis::ErrorKind::AuthenticationFailed || error.code() == Some("WRONGPASS") {
        target.login_refused()
    } else {
        target.other(error)
    }
}

/// Locks held for one batch: the users, the random token and each user's fencing token.
#[derive(Debug, Clone)]
pub struct LockGrant {
    token: String,
    lock_keys: Vec<String>,
    /// `(user, fencing token)`, in the order the users were asked for.
    pub fences: Vec<(UserId, i64)>,
}

impl LockGrant {
    /// Splits a grant taken for several batches' users, in order, into one grant per batch:
    /// `sizes` are the batches' numbers of users. The grant comes back whole unless they add
    /// up to its own.
    pub fn split(self, sizes: &[usize]) -> Result<Vec<LockGrant>, LockGrant> {
        if sizes.iter().sum::<usize>() != self.lock_keys.len() || self.fences.len() != self.lock_keys.len() {
            return Err(self);
        }
        let mut keys = self.lock_keys.into_iter();
        let mut fences = self.fences.into_iter();
        Ok(sizes
            .iter()
            .map(|&n| LockGrant {
                token: self.token.clone(),
                lock_keys: keys.by_ref().take(n).collect(),
                fences: fences.by_ref().take(n).collect(),
            })
            .collect())
    }
}

/// The outcome of one attempt to lock a batch's users.
#[derive(Debug)]
pub enum LockAttempt {
    /// Every lock was taken: the grant with its fencing tokens.
    Granted(LockGrant),
    /// Another holder has this user's lock; nothing was taken.
    Contended(UserId),
}

/// The per-user locks of one namespace.
#[derive(Clone)]
pub struct UserLocks {
    redis: RedisLink,
    prefix: String,
    ttl_ms: u64,
    acquire: Script,
    extend: Script,
    release: Script,
}

impl UserLocks {
    /// Connects (with automatic reconnects) to Redis; keys are `<prefix>:lock:<user>`.
    pub async fn connect(redis_url: &str, ca_file: Option<&Path>, prefix: &str, ttl_ms: u64) -> anyhow::Result<Self> {
        Ok(UserLocks {
            redis: connect_redis(redis_url, ca_file).await?,
            prefix: prefix.to_owned(),
            ttl_ms,
            acquire: Script::new(ACQUIRE),
            extend: Script::new(EXTEND),
            release: Script::new(RELEASE),
        })
    }

    /// The lock TTL in milliseconds.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    fn lock_key(&self, user: &UserId) -> String {
        format!("{}:lock:{user}", self.prefix)
    }

    fn fence_key(&self, user: &UserId) -> String {
        format!("{}:fence:{user}", self.prefix)
    }

    /// Tries once to lock all `users` (distinct) in one round trip: all or nothing.
    pub async fn try_acquire(&self, users: &[UserId]) -> anyhow::Result<LockAttempt> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let lock_keys: Vec<String> = users.iter().map(|u| self.lock_key(u)).collect();
        let mut invocation = self.acquire.prepare_invoke();
        for key in &lock_keys {
            invocation.key(key);
        }
        for user in users {
            invocation.key(self.fence_key(user));
        }
        invocation.arg(&token).arg(self.ttl_ms).arg(FENCE_KEY_TTL_MS);
        let reply: Vec<i64> =
            invocation.invoke_async(&mut self.redis.clone()).await.context("taking user locks in Redis")?;
        match reply.as_slice() {
            [1, fences @ ..] if fences.len() == users.len() => Ok(LockAttempt::Granted(LockGrant {
                token,
                lock_keys,
                fences: users.iter().cloned().zip(fences.iter().copied()).collect(),
            })),
            [0, position] => {
                debug_assert!((1..=users.len() as i64).contains(position), "the lock script names a user it was given");
                let index = usize::try_from(*position - 1).unwrap_or(0).min(users.len().saturating_sub(1));
                let user = users.get(index).cloned().context("lock script named no user")?;
                Ok(LockAttempt::Contended(user))
            }
            other => anyhow::bail!("unexpected reply from the lock script: {other:?}"),
        }
    }

    /// Pushes the TTL of every lock still held back to the full TTL; true when all are held.
    pub async fn extend(&self, grant: &LockGrant) -> anyhow::Result<bool> {
        let mut invocation = self.extend.prepare_invoke();
        for key in &grant.lock_keys {
            invocation.key(key);
        }
        invocation.arg(&grant.token).arg(self.ttl_ms);
        let held: usize = invocation.invoke_async(&mut self.redis.clone()).await.context("extending user locks")?;
        Ok(held == grant.lock_keys.len())
    }

    /// Releases the locks this grant still holds (compare-and-delete).
    pub async fn release(&self, grant: &LockGrant) -> anyhow::Result<()> {
        self.release_all(std::slice::from_ref(grant)).await
    }

    /// Releases the locks these grants still hold, in one round trip (compare-and-delete,
    /// each key against its own grant's token).
    pub async fn release_all(&self, grants: &[LockGrant]) -> anyhow::Result<()> {
        let mut invocation = self.release.prepare_invoke();
        for grant in grants {
            for key in &grant.lock_keys {
                invocation.key(key);
                invocation.arg(&grant.token);
            }
        }
        let _released: usize =
            invocation.invoke_async(&mut self.redis.clone()).await.context("releasing user locks")?;
        Ok(())
    }

    /// A cheap round trip, for readiness checks.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.redis.clone()).await.context("pinging Redis")?;
        Ok(())
    }
}
