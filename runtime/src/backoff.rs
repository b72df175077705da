//! The one backoff type: jittered exponential delays between retries, with
//! bounds checked at construction and a reset that callers invoke only after
//! the retried thing stayed healthy.
//!
//! Not responsible for sleeping or deciding whether to retry: callers ask it
//! for the next delay and do the waiting themselves (under `tokio::time`).

use std::time::Duration;

/// Jittered exponential backoff ("full jitter" on the upper half: each delay
/// is drawn from `[d/2, d]` where `d` doubles from `min` up to `max`).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

/// Invalid backoff bounds.
#[derive(Debug, thiserror::Error)]
#[error("backoff bounds are invalid: min {min:?} must be above zero and not above max {max:?}")]
pub struct BackoffError {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Builds a backoff from `min` to `max`.
    ///
    /// # Errors
    /// Fails when `min` is zero or greater than `max`.
    pub fn try_new(min: Duration, max: Duration) -> Result<Self, BackoffError> {
        if min.is_zero() || min > max {
            return Err(BackoffError { min, max });
        }
        Ok(Self {
            min,
            max,
            current: min,
        })
    }

    /// Returns the next delay and grows the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        let jitter_nanos = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if jitter_nanos == 0 {
            0
        } else {
            rand::random_range(0..=jitter_nanos)
        };
        (half + Duration::from_nanos(jitter)).max(self.min.min(ceiling))
    }

    /// Returns the next delay, but never less than a delay the server asked
    /// for (`Retry-After`).
    pub fn next_delay_at_least(&mut self, floor: Option<Duration>) -> Duration {
        let delay = self.next_delay();
        floor.map_or(delay, |f| delay.max(f))
    }

    /// Starts again from `min`. Call only once the retried thing has worked
    /// for a while, so a flapping peer is not hammered.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_validated() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn delays_grow_stay_within_bounds_and_reset() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        let mut b = Backoff::try_new(min, max).unwrap();
        let mut ceiling = min;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= min.min(ceiling) && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            assert!(d >= ceiling / 2);
            ceiling = (ceiling * 2).min(max);
        }
        // After many steps the delay sits in the top band.
        assert!(b.next_delay() >= max / 2);
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn server_floor_wins() {
        let mut b = Backoff::try_new(Duration::from_millis(10), Duration::from_millis(20)).unwrap();
        assert_eq!(
            b.next_delay_at_least(Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
    }
}
