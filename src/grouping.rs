//! Grouping: the one machine behind group commit (`ledger::group`) and group locking
//! (`worker::locking`). Partitions hand jobs to a task over a bounded queue; the task takes
//! the jobs that wait at the same moment as one group, up to a limit (the job that would
//! pass it is carried over to the next group), tries the group in one merged round trip when
//! the jobs' keys (users) are disjoint, and otherwise, or when the merged attempt declines,
//! answers each job on its own.
//!
//! Neutral: it knows jobs, keys and futures, nothing of Redis or PostgreSQL.

use std::collections::HashSet;
use std::hash::Hash;

use tokio::sync::mpsc;

/// Jobs waiting on a bounded queue, taken in groups.
pub(crate) struct Groups<J> {
    /// The queue the handles send to; its bound is the caller's (a partition has at most
    /// one job of each kind outstanding).
    jobs: mpsc::Receiver<J>,
    /// The job that did not fit in the last group: the first of the next one.
    carried: Option<J>,
}

impl<J> Groups<J> {
    /// Groups of the jobs arriving on `jobs`.
    pub(crate) fn new(jobs: mpsc::Receiver<J>) -> Self {
        Groups { jobs, carried: None }
    }

    /// The job carried over from the last group, else the next one to arrive; `None` once
    /// every sender is gone.
    pub(crate) async fn first(&mut self) -> Option<J> {
        match self.carried.take() {
            Some(job) => Some(job),
            None => self.jobs.recv().await,
        }
    }

    /// Adds to `group` the jobs already waiting, without waiting for more, while `fits`
    /// accepts them; the first one it refuses is carried over to the next group. Bounded:
    /// at most what the queue holds.
    pub(crate) fn gather(&mut self, group: &mut Vec<J>, mut fits: impl FnMut(&[J], &J) -> bool) {
        debug_assert!(self.carried.is_none(), "gather after first: nothing is carried");
        while let Ok(job) = self.jobs.try_recv() {
            if !group.is_empty() && !fits(group, &job) {
                self.carried = Some(job);
                return;
            }
            group.push(job);
        }
    }
}

/// True when no key appears in two jobs (a key may repeat within one job).
pub(crate) fn keys_disjoint<'a, J, K, I>(group: &'a [J], keys: impl Fn(&'a J) -> I) -> bool
where
    K: Eq + Hash + 'a,
    I: Iterator<Item = &'a K>,
{
    let mut seen = HashSet::new();
    group.iter().all(|job| {
        let own: HashSet<&K> = keys(job).collect();
        own.into_iter().all(|key| seen.insert(key))
    })
}

/// One answer per job of `group`: from one `merged` attempt when there are several jobs
/// and their keys are disjoint and it answers (`Some`, one answer per job in order), else
/// from `each`, which answers the jobs one by one.
pub(crate) async fn merged_or_each<J, R>(
    group: &[J],
    disjoint: bool,
    merged: impl AsyncFnOnce(&[J]) -> Option<Vec<R>>,
    each: impl AsyncFnOnce(&[J]) -> Vec<R>,
) -> Vec<R> {
    if group.len() > 1 && disjoint {
        if let Some(answers) = merged(group).await {
            debug_assert_eq!(answers.len(), group.len(), "a merged attempt answers every job");
            return answers;
        }
    }
    let answers = each(group).await;
    debug_assert_eq!(answers.len(), group.len(), "each job gets an answer");
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn groups_take_what_waits_and_carry_what_does_not_fit() {
        let (sender, receiver) = mpsc::channel(16);
        for n in [3, 4, 5, 1] {
            sender.send(n).await.expect("send");
        }
        let mut groups = Groups::new(receiver);
        let fits = |group: &[usize], next: &usize| group.iter().sum::<usize>() + next <= 8;
        let mut first = vec![groups.first().await.expect("a job")];
        groups.gather(&mut first, fits);
        assert_eq!(first, [3, 4]);
        let mut second = vec![groups.first().await.expect("the carried job")];
        groups.gather(&mut second, fits);
        assert_eq!(second, [5, 1]);
        drop(sender);
        assert_eq!(groups.first().await, None);
    }

    #[test]
    fn keys_are_disjoint_across_jobs_not_within_one() {
        let disjoint = [vec!["a", "a", "b"], vec!["c"]];
        assert!(keys_disjoint(&disjoint, |job| job.iter()));
        let shared = [vec!["a"], vec!["b", "a"]];
        assert!(!keys_disjoint(&shared, |job| job.iter()));
    }

    #[tokio::test]
    async fn a_declined_or_shared_merge_answers_each_job() {
        let group = [1, 2, 3];
        let each = async |jobs: &[i32]| jobs.iter().map(|j| -j).collect::<Vec<i32>>();
        let merged = async |jobs: &[i32]| Some(jobs.iter().map(|j| j * 10).collect::<Vec<i32>>());
        assert_eq!(merged_or_each(&group, true, merged, each).await, [10, 20, 30]);
        assert_eq!(merged_or_each(&group, false, merged, each).await, [-1, -2, -3]);
        let declined = async |_: &[i32]| None;
        assert_eq!(merged_or_each(&group, true, declined, each).await, [-1, -2, -3]);
        assert_eq!(merged_or_each(&group[..1], true, merged, each).await, [-1]);
    }
}
