//! Group commit: the batches that several partitions hand to the ledger at the same moment
//! are applied in one transaction, so one commit (one WAL flush) serves many partitions.
//!
//! Merging is safe because the batches' users are disjoint: each partition holds the Redis
//! locks of its batch's users while it waits, and one user's requests live in one partition.
//! That is checked anyway; batches sharing a user are applied one by one, in arrival order.
//! When a merged transaction fails, each batch is applied on its own, so one partition's
//! stale fence or poison message never fails another partition's batch; except when the
//! database did not answer in time, which fails every batch of the group at once.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Ledger, LedgerError};
use crate::domain::{ForwardStamp, Request, RequestResult, UserId};
use crate::grouping::{Groups, keys_disjoint, merged_or_each};

/// Most requests in one merged transaction.
pub const GROUP_MAX_REQUESTS: usize = 4_096;
/// Most batches waiting for the committer; a partition hands over one batch at a time.
const QUEUED_BATCHES_MAX: usize = 1_024;

type Reply = oneshot::Sender<Result<Vec<RequestResult>, LedgerError>>;

struct Job {
    requests: Vec<Request>,
    fences: Vec<(UserId, i64)>,
    /// The batch's partition and where its cursor moves (`Ledger::apply_forwarded`).
    cursor: Option<(u16, ForwardStamp)>,
    reply: Reply,
}

/// Hands batches to a task that merges those waiting together into one transaction.
#[derive(Clone)]
pub struct GroupCommitter {
    jobs: mpsc::Sender<Job>,
    /// The ledger itself, for what is not a batch: reads and probes.
    ledger: Ledger,
}

impl GroupCommitter {
    /// Starts the committer with at most `transactions_in_flight` transactions at once;
    /// batches arriving while all are busy wait and are merged. It stops when every handle
    /// is dropped.
    pub fn spawn(ledger: Ledger, transactions_in_flight: usize) -> Self {
        let (jobs, receiver) = mpsc::channel(QUEUED_BATCHES_MAX);
        tokio::spawn(run(ledger.clone(), receiver, transactions_in_flight.max(1)));
        GroupCommitter { jobs, ledger }
    }

    /// The ledger underneath.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Applies one batch, as [`Ledger::apply_batch`] does, possibly in one transaction with
    /// other partitions' batches.
    pub async fn apply_batch(
        &self,
        requests: &[Request],
        fences: &[(UserId, i64)],
    ) -> Result<Vec<RequestResult>, LedgerError> {
        self.apply_forwarded(requests, fences, None).await
    }

    /// [`GroupCommitter::apply_batch`] that also moves a partition's cursor, in the same
    /// transaction ([`Ledger::apply_forwarded`]).
    pub async fn apply_forwarded(
        &self,
        requests: &[Request],
        fences: &[(UserId, i64)],
        cursor: Option<(u16, ForwardStamp)>,
    ) -> Result<Vec<RequestResult>, LedgerError> {
        let (reply, result) = oneshot::channel();
        let job = Job { requests: requests.to_vec(), fences: fences.to_vec(), cursor, reply };
        if self.jobs.send(job).await.is_err() {
            return Err(LedgerError::Stopped);
        }
        result.await.unwrap_or(Err(LedgerError::Stopped))
    }
}

async fn run(ledger: Ledger, jobs: mpsc::Receiver<Job>, transactions_in_flight: usize) {
    let slots = Arc::new(Semaphore::new(transactions_in_flight));
    let mut groups = Groups::new(jobs);
    loop {
        let Some(first) = groups.first().await else {
            return;
        };
        // While every slot is busy, more batches queue up and join this group.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        groups.gather(&mut group, |group, next| {
            group.iter().map(|job| job.requests.len()).sum::<usize>() + next.requests.len() <= GROUP_MAX_REQUESTS
        });
        metrics::histogram!("walletq_group_batches").record(group.len() as f64);
        let ledger = ledger.clone();
        tokio::spawn(async move {
            apply_group(&ledger, group).await;
            drop(slot);
        });
    }
}

async fn apply_group(ledger: &Ledger, group: Vec<Job>) {
    let disjoint = keys_disjoint(&group, |job| {
        job.requests.iter().map(|r| &r.user_id).chain(job.fences.iter().map(|(user, _)| user))
    });
    let merged = async |group: &[Job]| apply_merged(ledger, group).await;
    let each = async |group: &[Job]| apply_each(ledger, group).await;
    let answers = merged_or_each(&group, disjoint, merged, each).await;
    for (job, answer) in group.into_iter().zip(answers) {
        let _ = job.reply.send(answer);
    }
}

/// The group in one transaction: each batch's own results, or every batch failed when the
/// database did not answer in time (one by one, each would wait out the bound again; they
/// come back through their queues); `None` to try the batches one by one.
async fn apply_merged(ledger: &Ledger, group: &[Job]) -> Option<Vec<Result<Vec<RequestResult>, LedgerError>>> {
    let requests: Vec<Request> = group.iter().flat_map(|job| job.requests.iter().cloned()).collect();
    let fences: Vec<(UserId, i64)> = group.iter().flat_map(|job| job.fences.iter().cloned()).collect();
    let cursors: Vec<(u16, ForwardStamp)> = group.iter().filter_map(|job| job.cursor).collect();
    match ledger.apply_forwarded(&requests, &fences, &cursors).await {
        Ok(results) if results.len() == requests.len() => {
            let mut results = results.into_iter();
            Some(group.iter().map(|job| Ok(results.by_ref().take(job.requests.len()).collect())).collect())
        }
        Ok(results) => {
            debug_assert_eq!(results.len(), requests.len(), "one result per request of a merged batch");
            tracing::error!(
                requests = requests.len(),
                results = results.len(),
                "a merged batch returned the wrong number of results; applying its batches one by one"
            );
            None
        }
        Err(error) if unanswered(&error).is_some() => {
            Some(group.iter().map_while(|_| unanswered(&error)).map(Err).collect())
        }
        Err(error) => {
            tracing::debug!(error = %error, batches = group.len(), "a merged batch failed; applying its batches one by one");
            None
        }
    }
}

/// Each batch in a transaction of its own, one after the other (batches sharing a user in
/// arrival order).
async fn apply_each(ledger: &Ledger, group: &[Job]) -> Vec<Result<Vec<RequestResult>, LedgerError>> {
    let mut answers = Vec::with_capacity(group.len());
    for job in group {
        let cursors: Vec<(u16, ForwardStamp)> = job.cursor.into_iter().collect();
        answers.push(ledger.apply_forwarded(&job.requests, &job.fences, &cursors).await);
    }
    answers
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
