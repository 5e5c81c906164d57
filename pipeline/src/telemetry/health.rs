//! Liveness and readiness of a worker, for Kubernetes probes.
//!
//! Live: the poll loop ran recently, so the member is not wedged. Ready: it
//! received an assignment from its group (possibly empty), reaches Kafka,
//! and reaches Redis when dedupe is on.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug)]
pub struct Health {
    last_poll_ms: AtomicI64,
    assigned: AtomicBool,
    kafka_up: AtomicBool,
    redis_up: AtomicBool,
    /// The poll loop counts as wedged after this long without a round. A
    /// revoke blocks the loop for up to the drain deadline, so this must
    /// exceed it.
    stall_after: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Health {
    /// With `dedupe`, readiness also requires a reachable Redis.
    pub fn new(stall_after: Duration, dedupe: bool) -> Self {
        Health {
            last_poll_ms: AtomicI64::new(now_ms()),
            assigned: AtomicBool::new(false),
            // Unknown until librdkafka's statistics or an assignment show a
            // reachable broker.
            kafka_up: AtomicBool::new(false),
            redis_up: AtomicBool::new(!dedupe),
            stall_after,
        }
    }

    pub fn polled(&self) {
        self.last_poll_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_assigned(&self, assigned: bool) {
        self.assigned.store(assigned, Ordering::Relaxed);
    }

    pub fn set_kafka_up(&self, up: bool) {
        self.kafka_up.store(up, Ordering::Relaxed);
    }

    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.store(up, Ordering::Relaxed);
    }

    /// `Ok` while the poll loop is alive, else the reason.
    pub fn live(&self) -> Result<(), String> {
        let idle = now_ms() - self.last_poll_ms.load(Ordering::Relaxed);
        if idle > self.stall_after.as_millis() as i64 {
            return Err(format!("the poll loop has not run for {idle} ms"));
        }
        Ok(())
    }

    /// `Ok` when the member can do work, else every reason it cannot.
    pub fn ready(&self) -> Result<(), Vec<&'static str>> {
        let mut reasons = Vec::new();
        if !self.assigned.load(Ordering::Relaxed) {
            reasons.push("no partition assignment from the group yet");
        }
        if !self.kafka_up.load(Ordering::Relaxed) {
            reasons.push("no Kafka broker reachable");
        }
        if !self.redis_up.load(Ordering::Relaxed) {
            reasons.push("Redis unreachable");
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_assignment_kafka_and_redis() {
        let health = Health::new(Duration::from_secs(60), true);
        assert_eq!(health.ready().unwrap_err().len(), 3);
        health.set_assigned(true);
        health.set_kafka_up(true);
        health.set_redis_up(true);
        assert!(health.ready().is_ok());
        health.set_kafka_up(false);
        assert_eq!(
            health.ready().unwrap_err(),
            vec!["no Kafka broker reachable"]
        );
    }

    #[test]
    fn stalled_poll_loop_is_not_live() {
        let health = Health::new(Duration::from_millis(0), false);
        health.last_poll_ms.store(now_ms() - 10, Ordering::Relaxed);
        assert!(health.live().is_err());
        let health = Health::new(Duration::from_secs(60), false);
        assert!(health.live().is_ok());
    }
}
