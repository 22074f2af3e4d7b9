//! Reconnect pacing: exponential backoff with full-range jitter, as a plain value.
//!
//! Invariant: every delay lies in `[initial·(1−jitter), max]` and, before jitter, doubles (by
//! `multiplier`) per failed attempt up to `max`; the schedule is a pure function of the attempt
//! number and a random draw in `[0, 1)`, so it is testable without a clock.

use std::time::Duration;

/// How a worker paces reconnect attempts after its session to the coordinator breaks.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Growth factor per failed attempt (at least 1).
    pub multiplier: f64,
    /// Fraction of the delay that is randomised: 0 means deterministic, 0.5 means the delay is
    /// drawn uniformly from `[d/2, d]`. Spreads the reconnect storm of many workers.
    pub jitter: f64,
    /// Give up after this many consecutive failed attempts; `None` retries forever (a daemon's
    /// default: the coordinator may be down for a long maintenance).
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: None,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (0 = first retry), given a uniform draw `u` in
    /// `[0, 1)`.
    pub fn delay_with(&self, attempt: u32, u: f64) -> Duration {
        let growth = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let base = self.initial.as_secs_f64() * growth;
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let u = u.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped * (1.0 - jitter * u))
    }

    /// The delay before retry number `attempt`, with a fresh random draw.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// Whether another attempt is allowed after `failed` consecutive failures.
    pub fn allows(&self, failed: u32) -> bool {
        self.max_attempts.is_none_or(|m| failed < m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_until_the_cap() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let ms: Vec<u128> = (0..8).map(|a| p.delay_with(a, 0.7).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_with(3, 0.0), Duration::from_millis(800));
        assert_eq!(p.delay_with(3, 1.0), Duration::from_millis(400));
        for _ in 0..100 {
            let d = p.delay(10);
            assert!(
                d >= Duration::from_millis(2500) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_with(u32::MAX, 0.0), p.max);
    }

    #[test]
    fn attempt_budget() {
        let p = RetryPolicy {
            max_attempts: Some(2),
            ..RetryPolicy::default()
        };
        assert!(p.allows(0) && p.allows(1) && !p.allows(2));
        assert!(RetryPolicy::default().allows(u32::MAX));
    }
}
