//! Retry schedule for durable job retries: exponential with full jitter,
//! capped. Full jitter (a uniform pick in `[0, min(cap, base·2ⁿ⁻¹)]`) spreads
//! retries of jobs that failed together (a provider outage) instead of
//! sending them back in one wave.
//!
//! This is a formula, not a retry loop: the delay is written to the job's
//! `next_run_at`, so `backon` (which drives in-process retries) does not fit.

use std::time::Duration;

/// The longest a provider's retry-after hint can delay a job.
pub const MAX_HINT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The largest delay attempt `attempt` (1-based, the one that just
    /// failed) can get.
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(0)
            .min(32);
        self.base
            .checked_mul(1u32 << exponent.min(31))
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// Delay before the next attempt. A provider's own hint (`retry_after`)
    /// is a floor, even above the cap (retrying earlier is refused anyway),
    /// but never beyond [`MAX_HINT`], so a bogus header cannot park a job
    /// for a day.
    pub fn delay(&self, attempt: i32, retry_after: Option<Duration>) -> Duration {
        let jittered = self.ceiling(attempt).mul_f64(fastrand::f64());
        match retry_after {
            Some(hint) => jittered.max(hint.min(MAX_HINT)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base: Duration::from_secs(10),
        cap: Duration::from_secs(3600),
    };

    #[test]
    fn ceiling_doubles_until_the_cap() {
        let ceilings: Vec<u64> = (1..=12).map(|a| B.ceiling(a).as_secs()).collect();
        assert_eq!(
            ceilings,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600, 3600]
        );
        assert_eq!(B.ceiling(1000), B.cap);
        assert_eq!(B.ceiling(0), B.base);
    }

    #[test]
    fn delays_stay_within_the_window() {
        for attempt in 1..=40 {
            for _ in 0..200 {
                let d = B.delay(attempt, None);
                assert!(d <= B.ceiling(attempt), "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let distinct: std::collections::HashSet<_> =
            (0..50).map(|_| B.delay(5, None).as_millis()).collect();
        assert!(distinct.len() > 40, "full jitter should rarely repeat");
    }

    #[test]
    fn retry_after_is_a_floor_bounded_by_max_hint() {
        let small = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(300),
        };
        for _ in 0..100 {
            assert!(B.delay(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
            assert!(small.delay(3, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        }
        assert_eq!(B.delay(1, Some(Duration::from_secs(86_400))), MAX_HINT);
    }
}
