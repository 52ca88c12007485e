//! Which partition queue holds a user's requests: a fixed function of the user id.
//!
//! walletq computes it itself (the ingress router) instead of leaving it to a broker
//! plugin, because RabbitMQ's consistent-hash exchange rebuilds its ring in a different
//! order after a broker restart and moves most users to other queues (measured: 188 of 200
//! users on RabbitMQ 3.10.8), which would break per-user order across a restart.

/// FNV-1a, 64 bit, over `bytes`: stable across processes, versions and machines. Its low
/// bits mix poorly for short inputs, so callers finish it with an avalanche.
pub(crate) fn fnv1a_64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// FNV-1a 64 over the user id, finished with a 64-bit avalanche (murmur3's fmix64).
/// Stable across processes, versions and machines; producers may compute it too.
pub fn user_hash(user_id: &str) -> u64 {
    let mut hash = fnv1a_64(user_id.bytes());
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

/// The partition (`0..partitions`) of a user; `partitions` must be at least 1.
pub fn partition_of(user_id: &str, partitions: u16) -> u16 {
    let partitions = u64::from(partitions.max(1));
    // The remainder is below `partitions`, which fits a u16.
    u16::try_from(user_hash(user_id) % partitions).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_users_spread_evenly_over_16_partitions() {
        let mut counts = [0u32; 16];
        for user in 0..10_000 {
            counts[usize::from(partition_of(&format!("user-{user}"), 16))] += 1;
        }
        let mean = 10_000.0 / 16.0;
        for (partition, count) in counts.iter().enumerate() {
            let deviation = (f64::from(*count) - mean).abs() / mean;
            assert!(deviation <= 0.20, "partition {partition}: {count} users, {:.0}% off", deviation * 100.0);
        }
    }

    #[test]
    fn the_mapping_is_fixed() {
        // Pinned values: changing the function would move users between partitions.
        assert_eq!(user_hash("alice"), 0x3507_d047_a67c_08f4);
        assert_eq!(partition_of("alice", 16), 4);
        assert_eq!(partition_of("bob", 16), 0);
        assert_eq!(partition_of("u:1", 16), 8);
        assert_eq!(partition_of("anyone", 1), 0);
        assert_eq!(partition_of("anyone", 0), 0);
    }
}
