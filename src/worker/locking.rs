//! Shared Redis round trips: the lock requests of the partitions that wait at the same
//! moment are taken with one lock script, and the releases waiting with one release script,
//! as the group commit shares one transaction.
//!
//! A merged request is all or nothing like any other, so it is tried only for batches whose
//! users are disjoint (the normal case: one user lives in one partition). When it meets a
//! held lock or an error, each batch asks again on its own, so a contended user holds up only
//! its own partition. Releases queued before a partition's next lock request are sent before
//! it: one channel carries both, and a round releases first.

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::domain::UserId;
use crate::grouping::{Groups, keys_disjoint, merged_or_each};
use crate::lock::{LockAttempt, LockGrant, UserLocks};

/// Most users asked for in one merged lock request; more wait for the next round.
pub(super) const LOCK_GROUP_MAX_USERS: usize = 4_096;
/// Most lock requests and releases waiting for the locker; a partition has at most one of
/// each outstanding.
const QUEUED_JOBS_MAX: usize = 1_024;

enum Job {
    Acquire { users: Vec<UserId>, reply: oneshot::Sender<anyhow::Result<LockAttempt>> },
    Release(LockGrant),
}

/// Hands lock requests and releases to a task that merges those waiting together.
#[derive(Clone)]
pub struct GroupLocker {
    jobs: mpsc::Sender<Job>,
    /// The locks themselves, for what is not merged: extending a batch's locks, probes.
    locks: UserLocks,
}

impl GroupLocker {
    /// Starts the locker; it stops when every handle is dropped.
    pub fn spawn(locks: UserLocks) -> Self {
        let (jobs, receiver) = mpsc::channel(QUEUED_JOBS_MAX);
        tokio::spawn(run(locks.clone(), receiver));
        GroupLocker { jobs, locks }
    }

    /// The per-user locks underneath.
    pub fn locks(&self) -> &UserLocks {
        &self.locks
    }

    /// Tries once to lock all `users` (distinct), as [`UserLocks::try_acquire`] does, possibly
    /// in one round trip with other partitions' requests.
    pub async fn try_acquire(&self, users: &[UserId]) -> anyhow::Result<LockAttempt> {
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .send(Job::Acquire { users: users.to_vec(), reply })
            .await
            .map_err(|_| anyhow::anyhow!("the locker has stopped"))?;
        outcome.await.unwrap_or_else(|_| Err(anyhow::anyhow!("the locker has stopped")))
    }

    /// Queues the release of `grant`'s locks. A release that fails is logged; the locks then
    /// expire with their TTL, and fencing keeps a late holder harmless.
    pub async fn release(&self, grant: LockGrant) {
        if self.jobs.send(Job::Release(grant)).await.is_err() {
            tracing::warn!("the locker has stopped; user locks will expire");
        }
    }
}

/// A partition's request for its batch's user locks, waiting to be merged with others.
struct LockRequest {
    /// The batch's users, each once.
    users: Vec<UserId>,
    reply: oneshot::Sender<anyhow::Result<LockAttempt>>,
}

async fn run(locks: UserLocks, jobs: mpsc::Receiver<Job>) {
    let mut groups = Groups::new(jobs);
    loop {
        let Some(first) = groups.first().await else {
            return;
        };
        let mut round = vec![first];
        groups.gather(&mut round, |round, next| match next {
            Job::Release(_) => true,
            Job::Acquire { users, .. } => asked_users(round) + users.len() <= LOCK_GROUP_MAX_USERS,
        });
        let mut releases = Vec::new();
        let mut requests = Vec::new();
        for job in round {
            match job {
                Job::Release(grant) => releases.push(grant),
                Job::Acquire { users, reply } => requests.push(LockRequest { users, reply }),
            }
        }
        // Releases first: a partition's next request never meets its own previous locks.
        if !releases.is_empty() {
            if let Err(error) = locks.release_all(&releases).await {
                tracing::warn!(error = %format!("{error:#}"), "could not release user locks; they will expire");
            }
        }
        if !requests.is_empty() {
            metrics::histogram!("walletq_lock_group_requests").record(requests.len() as f64);
            acquire_group(&locks, requests).await;
        }
    }
}

/// Users asked for by the lock requests of `round`.
fn asked_users(round: &[Job]) -> usize {
    round.iter().map(|job| if let Job::Acquire { users, .. } = job { users.len() } else { 0 }).sum()
}

async fn acquire_group(locks: &UserLocks, requests: Vec<LockRequest>) {
    let disjoint = keys_disjoint(&requests, |request| request.users.iter());
    let merged = async |requests: &[LockRequest]| {
        let grants = acquire_merged(locks, requests).await?;
        Some(grants.into_iter().map(|grant| Ok(LockAttempt::Granted(grant))).collect())
    };
    // One at a time in effect: each request on its own, all sent at once.
    let each = async |requests: &[LockRequest]| join_all(requests.iter().map(|r| locks.try_acquire(&r.users))).await;
    let outcomes = merged_or_each(&requests, disjoint, merged, each).await;
    for (request, outcome) in requests.into_iter().zip(outcomes) {
        let _ = request.reply.send(outcome);
    }
}

/// One lock script for every request; `None` when it did not grant them all.
async fn acquire_merged(locks: &UserLocks, requests: &[LockRequest]) -> Option<Vec<LockGrant>> {
    let all: Vec<UserId> = requests.iter().flat_map(|request| request.users.iter().cloned()).collect();
    match locks.try_acquire(&all).await {
        Ok(LockAttempt::Granted(grant)) => {
            let sizes: Vec<usize> = requests.iter().map(|request| request.users.len()).collect();
            debug_assert_eq!(grant.fences.len(), all.len(), "the lock script grants every key asked for");
            match grant.split(&sizes) {
                Ok(grants) => Some(grants),
                Err(grant) => {
                    // Cannot happen (asserted above); give the locks back and ask one by one.
                    let _ = locks.release(&grant).await;
                    None
                }
            }
        }
        Ok(LockAttempt::Contended(user)) => {
            tracing::debug!(%user, "a merged lock request met a held lock; asking batch by batch");
            None
        }
        Err(error) => {
            tracing::debug!(error = %format!("{error:#}"), "a merged lock request failed; asking batch by batch");
            None
        }
    }
}
