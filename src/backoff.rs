//! Capped exponential backoff with full jitter.

use std::time::Duration;

/// Base delay of the first retry.
pub(crate) const BACKOFF_BASE_MS: u64 = 25;

/// A random delay in `[0, min(max_ms, base * 2^attempt)]` ("full jitter").
pub(crate) fn jittered_delay(attempt: u32, max_ms: u64) -> Duration {
    let ceiling = backoff_ceiling_ms(attempt, max_ms);
    Duration::from_millis(rand::random_range(0..=ceiling))
}

/// Sleeps [`jittered_delay`] unless `stop` is cancelled first.
pub(crate) async fn pause(stop: &tokio_util::sync::CancellationToken, attempt: u32, max_ms: u64) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(jittered_delay(attempt, max_ms)) => {}
    }
}

/// The upper bound of the delay before retry number `attempt` (0-based).
pub(crate) fn backoff_ceiling_ms(attempt: u32, max_ms: u64) -> u64 {
    BACKOFF_BASE_MS.saturating_mul(1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX)).min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_grows_then_caps() {
        assert_eq!(backoff_ceiling_ms(0, 2_000), 25);
        assert_eq!(backoff_ceiling_ms(3, 2_000), 200);
        assert_eq!(backoff_ceiling_ms(10, 2_000), 2_000);
        assert_eq!(backoff_ceiling_ms(u32::MAX, 2_000), 2_000);
        for attempt in 0..20 {
            assert!(jittered_delay(attempt, 500) <= Duration::from_millis(500));
        }
    }
}
