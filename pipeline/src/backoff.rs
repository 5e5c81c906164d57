//! The one retry delay policy: exponential backoff with full jitter.
//!
//! Every loop that waits for Kafka or Redis to come back uses this, so a
//! fleet of members that lost Redis at the same moment does not reconnect in
//! lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
            attempts: 0,
        }
    }

    /// Backoff for reconnecting to a service: 100 ms doubling up to 5 s.
    pub fn for_reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Returns the next delay, a random duration between half of the current
    /// step and the step, then doubles the step up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        self.attempts += 1;
        let low = step / 2;
        let spread = step.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(rand::rng().random_range(0..=spread))
    }

    /// Failures seen since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_bounds() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut steps = Vec::new();
        for _ in 0..8 {
            steps.push(backoff.next_delay());
        }
        assert!(steps[0] >= Duration::from_millis(50) && steps[0] <= Duration::from_millis(100));
        for delay in &steps[4..] {
            assert!(*delay >= Duration::from_millis(400) && *delay <= Duration::from_millis(800));
        }
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
