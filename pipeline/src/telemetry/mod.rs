//! What a worker tells operators: a summary when it stops ([`Counters`]),
//! traces that follow one job across every hop ([`trace`]), Prometheus
//! metrics ([`metrics`]) and liveness and readiness ([`health`]).

pub mod health;
pub mod metrics;
pub mod trace;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Running totals of one worker, safe to bump from any task.
#[derive(Debug, Default)]
pub struct Counters {
    pub succeeded: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub dedupe_skipped: AtomicU64,
    pub undecodable: AtomicU64,
    pub abandoned: AtomicU64,
    pub redis_errors: AtomicU64,
    pub produce_errors: AtomicU64,
    pub commits: AtomicU64,
    /// Retry copies written per tier, in tier order.
    pub retried_by_tier: Vec<AtomicU64>,
}

impl Counters {
    pub fn new(tiers: usize) -> Self {
        Counters {
            retried_by_tier: (0..tiers).map(|_| AtomicU64::new(0)).collect(),
            ..Counters::default()
        }
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, tier_names: &[String]) -> Summary {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Summary {
            succeeded: read(&self.succeeded),
            retried: read(&self.retried),
            retried_by_tier: tier_names
                .iter()
                .cloned()
                .zip(self.retried_by_tier.iter().map(read))
                .collect(),
            dead_lettered: read(&self.dead_lettered),
            dedupe_skipped: read(&self.dedupe_skipped),
            undecodable: read(&self.undecodable),
            abandoned: read(&self.abandoned),
            redis_errors: read(&self.redis_errors),
            produce_errors: read(&self.produce_errors),
            commits: read(&self.commits),
        }
    }
}

/// What a worker did, printed as JSON when it stops.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Jobs whose handler succeeded.
    pub succeeded: u64,
    /// Retry copies written, all tiers.
    pub retried: u64,
    pub retried_by_tier: Vec<(String, u64)>,
    /// Dead-letter copies written, undecodable records included.
    pub dead_lettered: u64,
    /// Jobs skipped because a done marker showed they already succeeded.
    pub dedupe_skipped: u64,
    pub undecodable: u64,
    /// Fetched records given up at a revoke or stop before they were
    /// terminal; they stay uncommitted and run again on the next owner.
    pub abandoned: u64,
    pub redis_errors: u64,
    pub produce_errors: u64,
    pub commits: u64,
}
