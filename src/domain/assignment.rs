//! Which worker serves which partition: balanced rendezvous hashing.
//!
//! Every live worker computes the same assignment from the same membership list.
//! Each partition prefers the workers in the order of a stable hash of (worker, partition);
//! capacities keep the load even: with P partitions and N workers, the first `P mod N`
//! workers (sorted by id) serve `⌈P/N⌉` and the others `⌊P/N⌋`. A membership change
//! moves few partitions, because preferences don't depend on the other workers.

use super::partitioning::fnv1a_64;

/// [`fnv1a_64`] of (worker, partition), finished with the first round of fmix64. Not the
/// full fmix64 of `partition_of`: changing it would move partitions between the workers of
/// a rolling upgrade, and some would be served by neither until it ends.
fn stable_hash(worker: &str, partition: u16) -> u64 {
    let mut hash = fnv1a_64(worker.bytes().chain([0xff]).chain(partition.to_le_bytes()));
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

/// The owner of every partition `0..partitions`, as an index into `workers` (deduplicated
/// and sorted by the function). Empty when there are no workers.
pub fn assign(partitions: u16, workers: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut workers: Vec<String> = workers.to_vec();
    workers.sort();
    workers.dedup();
    if workers.is_empty() {
        return (workers, Vec::new());
    }
    let count = workers.len();
    let base = usize::from(partitions) / count;
    let extra = usize::from(partitions) % count;
    let mut capacity: Vec<usize> = (0..count).map(|i| base + usize::from(i < extra)).collect();
    let mut owners = Vec::with_capacity(usize::from(partitions));
    for partition in 0..partitions {
        let mut ranked: Vec<usize> = (0..count).collect();
        ranked.sort_by_key(|&i| std::cmp::Reverse(stable_hash(&workers[i], partition)));
        // Capacities sum to `partitions`, so some worker always has room.
        let owner = ranked.into_iter().find(|&i| capacity[i] > 0).unwrap_or(0);
        capacity[owner] = capacity[owner].saturating_sub(1);
        owners.push(owner);
    }
    (workers, owners)
}

/// The partitions `worker` serves when `workers` are alive.
pub fn partitions_of(worker: &str, partitions: u16, workers: &[String]) -> Vec<u16> {
    let (sorted, owners) = assign(partitions, workers);
    let Some(me) = sorted.iter().position(|w| w == worker) else { return Vec::new() };
    (0..partitions).filter(|&p| owners[usize::from(p)] == me).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("host-{i}-{:08x}", i * 7919)).collect()
    }

    #[test]
    fn three_workers_get_five_or_six_of_sixteen() {
        let workers = names(3);
        let mut all: Vec<u16> = Vec::new();
        for worker in &workers {
            let mine = partitions_of(worker, 16, &workers);
            assert!((5..=6).contains(&mine.len()), "{worker} serves {}", mine.len());
            all.extend(mine);
        }
        all.sort();
        assert_eq!(all, (0..16).collect::<Vec<_>>(), "every partition has exactly one owner");
    }

    #[test]
    fn balanced_for_any_membership_size() {
        for n in 1..=20 {
            let workers = names(n);
            let (_, owners) = assign(16, &workers);
            let mut load = vec![0usize; n];
            for owner in owners {
                load[owner] += 1;
            }
            let (min, max) = (load.iter().min().copied(), load.iter().max().copied());
            assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1, "{n} workers: {load:?}");
        }
        assert!(assign(16, &[]).1.is_empty());
    }

    #[test]
    fn a_departure_moves_only_a_few_partitions() {
        let workers = names(4);
        let (_, before) = assign(16, &workers);
        let survivors: Vec<String> = workers[..3].to_vec();
        let (_, after) = assign(16, &survivors);
        let moved_between_survivors =
            (0..16).filter(|&p| before[p] != 3 && workers[before[p]] != survivors[after[p]]).count();
        assert!(moved_between_survivors <= 4, "{moved_between_survivors} partitions moved between survivors");
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let mut workers = names(5);
        let a = partitions_of(&workers[2].clone(), 16, &workers);
        workers.reverse();
        let b = partitions_of(&workers[2].clone(), 16, &workers);
        assert_eq!(a, b);
    }
}
