//! Reconnect delays: exponential growth with full jitter.

use std::time::Duration;

use rand::Rng;

/// Reconnect delay settings: the n-th consecutive failure waits a uniformly random time in
/// `[0, min(max, min * factor^n)]` ("full jitter"), so a fleet of clients dropped at once
/// does not come back at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// The cap of the first delay.
    pub min: Duration,
    /// The largest cap.
    pub max: Duration,
    /// How much the cap grows per failure (at least 1).
    pub factor: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { min: Duration::from_millis(100), max: Duration::from_secs(10), factor: 2.0 }
    }
}

/// The state of one reconnect sequence.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    cfg: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(cfg: BackoffConfig) -> Self {
        Backoff { cfg, attempt: 0 }
    }

    /// The cap for the current attempt: `min(max, min * factor^attempt)`.
    pub(crate) fn cap(&self) -> Duration {
        let factor = if self.cfg.factor.is_finite() { self.cfg.factor.max(1.0) } else { 1.0 };
        let max = self.cfg.max.max(self.cfg.min).as_secs_f64();
        let cap = self.cfg.min.as_secs_f64() * factor.powi(self.attempt.min(64) as i32);
        Duration::from_secs_f64(if cap.is_finite() { cap.min(max) } else { max })
    }

    /// The delay before the next attempt, and one more failure counted.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Starts over after a connection that stayed up.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How long a connection must stay up before its loss starts a fresh sequence: a node
    /// that accepts and then drops every connection is still backed off.
    pub(crate) fn stable_after(&self) -> Duration {
        self.cfg.max
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn caps_grow_by_factor_up_to_max() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut rng = StdRng::seed_from_u64(7);
        let mut caps = Vec::new();
        for _ in 0..12 {
            caps.push(b.cap());
            let d = b.next_delay(&mut rng);
            assert!(d <= *caps.last().unwrap(), "{d:?} over its cap");
        }
        assert_eq!(caps[0], Duration::from_millis(100));
        assert_eq!(caps[1], Duration::from_millis(200));
        assert_eq!(caps[2], Duration::from_millis(400));
        assert_eq!(caps[6], Duration::from_millis(6400));
        assert_eq!(caps[7], Duration::from_secs(10));
        assert_eq!(caps[11], Duration::from_secs(10));
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(42);
        let cfg = BackoffConfig { min: Duration::from_secs(1), max: Duration::from_secs(1), factor: 2.0 };
        let mut b = Backoff::new(cfg);
        let ds: Vec<Duration> = (0..2000).map(|_| b.next_delay(&mut rng)).collect();
        assert!(ds.iter().all(|d| *d <= Duration::from_secs(1)));
        let low = ds.iter().filter(|d| **d < Duration::from_millis(250)).count();
        let high = ds.iter().filter(|d| **d > Duration::from_millis(750)).count();
        // Uniform: about a quarter each side.
        assert!((350..650).contains(&low), "low {low}");
        assert!((350..650).contains(&high), "high {high}");
    }

    #[test]
    fn odd_settings_do_not_panic() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(BackoffConfig {
            min: Duration::from_secs(5),
            max: Duration::from_millis(1),
            factor: f64::NAN,
        });
        for _ in 0..100 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(5));
        }
        let mut b = Backoff::new(BackoffConfig {
            min: Duration::from_millis(1),
            max: Duration::from_secs(3),
            factor: 1e300,
        });
        for _ in 0..100 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(3));
        }
    }
}
