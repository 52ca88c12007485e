//! Group commit: the batches that several partitions hand to the ledger at the same moment
//! are applied in one transaction, so one commit (one WAL flush) serves many partitions.
//!
//! Merging is safe because the batches' users are disjoint: each partition holds the Redis
//! locks of its batch's users while it waits, and one user's requests live in one partition.
//! That is checked anyway; batches sharing a user are applied one by one, in arrival order.
//! When a merged transaction fails, each batch is applied on its own, so one partition's
//! stale fence or poison message never fails another partition's batch; except when the
//! database did not answer in time, which fails every batch of the group at once.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Ledger, LedgerError};
use crate::domain::{Request, RequestResult, UserId};

/// Most requests in one merged transaction.
pub const GROUP_MAX_REQUESTS: usize = 4_096;
/// Most batches waiting for the committer; a partition hands over one batch at a time.
const QUEUED_BATCHES_MAX: usize = 1_024;

type Reply = oneshot::Sender<Result<Vec<RequestResult>, LedgerError>>;

struct Job {
    requests: Vec<Request>,
    fences: Vec<(UserId, i64)>,
    reply: Reply,
}

/// Hands batches to a task that merges those waiting together into one transaction.
#[derive(Clone)]
pub struct GroupCommitter {
    jobs: mpsc::Sender<Job>,
}

impl GroupCommitter {
    /// Starts the committer with at most `transactions_in_flight` transactions at once;
    /// batches arriving while all are busy wait and are merged. It stops when every handle
    /// is dropped.
    pub fn spawn(ledger: Ledger, transactions_in_flight: usize) -> Self {
        let (jobs, receiver) = mpsc::channel(QUEUED_BATCHES_MAX);
        tokio::spawn(run(ledger, receiver, transactions_in_flight.max(1)));
        GroupCommitter { jobs }
    }

    /// Applies one batch, as [`Ledger::apply_batch`] does, possibly in one transaction with
    /// other partitions' batches.
    pub async fn apply_batch(
        &self,
        requests: &[Request],
        fences: &[(UserId, i64)],
    ) -> Result<Vec<RequestResult>, LedgerError> {
        let (reply, result) = oneshot::channel();
        let job = Job { requests: requests.to_vec(), fences: fences.to_vec(), reply };
        if self.jobs.send(job).await.is_err() {
            return Err(LedgerError::Stopped);
        }
        result.await.unwrap_or(Err(LedgerError::Stopped))
    }
}

async fn run(ledger: Ledger, mut jobs: mpsc::Receiver<Job>, transactions_in_flight: usize) {
    let slots = Arc::new(Semaphore::new(transactions_in_flight));
    let mut carried: Option<Job> = None;
    loop {
        let Some(first) = carried_or_next(&mut carried, &mut jobs).await else {
            return;
        };
        // While every slot is busy, more batches queue up and join this group.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut size = first.requests.len();
        let mut group = vec![first];
        while let Ok(job) = jobs.try_recv() {
            if size + job.requests.len() > GROUP_MAX_REQUESTS {
                carried = Some(job);
                break;
            }
            size += job.requests.len();
            group.push(job);
        }
        metrics::histogram!("walletq_group_batches").record(group.len() as f64);
        let ledger = ledger.clone();
        tokio::spawn(async move {
            apply_group(&ledger, group).await;
            drop(slot);
        });
    }
}

/// The job held over from the last round, else the next one to arrive; `None` once every
/// sender is gone. Shared by the group committer and the group locker.
pub(crate) async fn carried_or_next<T>(carried: &mut Option<T>, jobs: &mut mpsc::Receiver<T>) -> Option<T> {
    match carried.take() {
        Some(job) => Some(job),
        None => jobs.recv().await,
    }
}

async fn apply_group(ledger: &Ledger, group: Vec<Job>) {
    if group.len() > 1 && users_disjoint(&group) {
        let requests: Vec<Request> = group.iter().flat_map(|job| job.requests.iter().cloned()).collect();
        let fences: Vec<(UserId, i64)> = group.iter().flat_map(|job| job.fences.iter().cloned()).collect();
        match ledger.apply_batch(&requests, &fences).await {
            Ok(results) if results.len() == requests.len() => {
                let mut results = results.into_iter();
                for job in group {
                    let own: Vec<RequestResult> = results.by_ref().take(job.requests.len()).collect();
                    let _ = job.reply.send(Ok(own));
                }
                return;
            }
            Ok(results) => {
                debug_assert_eq!(results.len(), requests.len(), "one result per request of a merged batch");
                tracing::error!(
                    requests = requests.len(),
                    results = results.len(),
                    "a merged batch returned the wrong number of results; applying its batches one by one"
                );
            }
            Err(error) if unanswered(&error).is_some() => {
                // The database did not answer in time: one by one, each batch would wait out
                // the bound again. They all fail now and come back through their queues.
                let copies: Vec<LedgerError> = group.iter().map_while(|_| unanswered(&error)).collect();
                for (job, copy) in group.into_iter().zip(copies) {
                    let _ = job.reply.send(Err(copy));
                }
                return;
            }
            Err(error) => {
                tracing::debug!(error = %error, batches = group.len(), "a merged batch failed; applying its batches one by one");
            }
        }
    }
    for job in group {
        let outcome = ledger.apply_batch(&job.requests, &job.fences).await;
        let _ = job.reply.send(outcome);
    }
}

/// A copy of `error` when it means the database did not answer in time (the transaction's
/// bound, or the pool's acquire timeout, which includes checking the connection); `None`
/// for the errors worth trying batch by batch.
fn unanswered(error: &LedgerError) -> Option<LedgerError> {
    match error {
        LedgerError::TimedOut { after_ms } => Some(LedgerError::TimedOut { after_ms: *after_ms }),
        LedgerError::Database(sqlx::Error::PoolTimedOut) => Some(LedgerError::Database(sqlx::Error::PoolTimedOut)),
        _ => None,
    }
}

fn users_disjoint(group: &[Job]) -> bool {
    let mut seen = HashSet::new();
    group.iter().all(|job| {
        let mut own: HashSet<&UserId> = job.requests.iter().map(|r| &r.user_id).collect();
        own.extend(job.fences.iter().map(|(user, _)| user));
        own.into_iter().all(|user| seen.insert(user))
    })
}
