//! The group locker against the real Redis: lock requests handed over together are taken in
//! one script and each batch gets a grant of its own users; a held lock fails only the batch
//! that asks for it; queued releases free the locks.

use futures_util::future::join_all;
use walletq::domain::UserId;
use walletq::lock::{LockAttempt, LockGrant, UserLocks};
use walletq::worker::GroupLocker;

use crate::support::{block_on_fresh_runtime, isolated_services, remove_redis_keys};

struct Fixture {
    locks: UserLocks,
    admin: redis::aio::MultiplexedConnection,
    namespace: String,
    redis_url: String,
}

/// The namespace's keys go also when a test panics before `cleanup`.
impl Drop for Fixture {
    fn drop(&mut self) {
        let (redis_url, namespace) = (self.redis_url.clone(), self.namespace.clone());
        block_on_fresh_runtime(async move { remove_redis_keys(&redis_url, &namespace).await });
    }
}

impl Fixture {
    async fn new() -> Self {
        let services = isolated_services();
        let locks =
            UserLocks::connect(&services.redis_url, None, &services.namespace, 5_000).await.expect("Redis must be up");
        let admin = redis::Client::open(services.redis_url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        Fixture { locks, admin, namespace: services.namespace, redis_url: services.redis_url }
    }

    async fn holder(&mut self, user: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(format!("{}:lock:{user}", self.namespace))
            .query_async(&mut self.admin)
            .await
            .expect("GET")
    }

    async fn cleanup(mut self) {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*", self.namespace)).query_async(&mut self.admin).await.expect("keys");
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query_async(&mut self.admin).await.expect("del");
        }
    }
}

fn users(names: &[String]) -> Vec<UserId> {
    names.iter().map(|n| UserId::parse(n).expect("user id")).collect()
}

fn granted(outcome: anyhow::Result<LockAttempt>) -> LockGrant {
    match outcome.expect("Redis answers") {
        LockAttempt::Granted(grant) => grant,
        LockAttempt::Contended(user) => panic!("{user} is held"),
    }
}

#[tokio::test]
async fn requests_handed_over_together_get_grants_of_their_own_users_and_releases_free_them() {
    let mut fixture = Fixture::new().await;
    let locker = GroupLocker::spawn(fixture.locks.clone());
    let batches: Vec<Vec<UserId>> =
        (0..10).map(|b| users(&[format!("u{b}a"), format!("u{b}b"), format!("u{b}c")])).collect();

    let grants: Vec<LockGrant> =
        join_all(batches.iter().map(|b| locker.try_acquire(b))).await.into_iter().map(granted).collect();

    for (batch, grant) in batches.iter().zip(&grants) {
        let fenced: Vec<&UserId> = grant.fences.iter().map(|(user, _)| user).collect();
        assert_eq!(fenced, batch.iter().collect::<Vec<_>>(), "each grant fences its own users, in order");
        assert!(grant.fences.iter().all(|(_, fence)| *fence > 0));
    }
    assert!(fixture.holder("u3b").await.is_some(), "the locks are held");
    let first = fixture.holder("u0a").await;
    assert_eq!(fixture.holder("u9c").await, first, "one lock script took them all");

    for grant in grants {
        locker.release(grant).await;
    }
    // Releases queued before a request are sent before it: the same users are free again.
    let again = granted(locker.try_acquire(&batches[4]).await);
    assert_ne!(fixture.holder("u4a").await, first, "held under the new grant's token");
    assert!(fixture.holder("u0a").await.is_none(), "released");
    locker.release(again).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_held_lock_fails_only_the_batch_that_asks_for_it() {
    let mut fixture = Fixture::new().await;
    let locker = GroupLocker::spawn(fixture.locks.clone());
    let _: () = redis::cmd("SET")
        .arg(format!("{}:lock:held", fixture.namespace))
        .arg("another-worker")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut fixture.admin)
        .await
        .expect("SET");
    let blocked = users(&["held".to_owned(), "other".to_owned()]);
    let free = users(&["free".to_owned()]);

    let (blocked_outcome, free_outcome) = tokio::join!(locker.try_acquire(&blocked), locker.try_acquire(&free));

    match blocked_outcome.expect("Redis answers") {
        LockAttempt::Contended(user) => assert_eq!(user.as_str(), "held"),
        LockAttempt::Granted(grant) => panic!("granted a held lock: {grant:?}"),
    }
    let grant = granted(free_outcome);
    assert_eq!(grant.fences.len(), 1);
    assert_eq!(fixture.holder("held").await.as_deref(), Some("another-worker"), "the holder keeps it");
    assert!(fixture.holder("other").await.is_none(), "all or nothing: nothing taken for the blocked batch");
    locker.release(grant).await;
    fixture.cleanup().await;
}
