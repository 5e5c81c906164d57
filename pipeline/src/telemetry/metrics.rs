//! Prometheus metrics of a worker.
//!
//! Every label comes from a fixed set or from the settings (topic and tier
//! names, partition numbers), never from job data, so the number of series
//! is bounded. Names follow the Prometheus conventions: a `sluice_` prefix,
//! the unit, and `_total` on counters. README lists every metric.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub topic: Arc<str>,
    /// `main` or the tier name.
    pub tier: Arc<str>,
    /// `success`, `retry`, `dead_letter` or `duplicate_skipped`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// Tier the job was sent to.
    pub tier: Arc<str>,
    pub error_class: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub error_class: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: Arc<str>,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PauseLabels {
    /// `delay` (a tier record not due yet) or `backpressure`.
    pub reason: &'static str,
}

/// All metrics of one worker and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub jobs_handled: Family<JobLabels, Counter>,
    pub handler_duration: Family<TierLabels, Histogram>,
    pub end_to_end_latency: Family<OutcomeLabels, Histogram>,
    pub retries: Family<RetryLabels, Counter>,
    pub dead_letters: Family<ClassLabels, Counter>,
    pub dedupe_hits: Counter,
    pub redis_errors: Family<KindLabels, Counter>,
    pub kafka_errors: Family<KindLabels, Counter>,
    pub jobs_in_flight: Gauge,
    pub paused_partitions: Family<PauseLabels, Gauge>,
    pub assigned_partitions: Gauge,
    pub committed_offset: Family<PartitionLabels, Gauge>,
    pub consumer_lag: Family<PartitionLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 33 s in 16 doubling buckets.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn latency_histogram() -> Histogram {
    // 5 ms to about 45 min in 20 doubling buckets: retries wait for minutes.
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let metrics = Metrics {
            jobs_handled: Family::default(),
            handler_duration: Family::new_with_constructor(seconds_histogram),
            end_to_end_latency: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            dead_letters: Family::default(),
            dedupe_hits: Counter::default(),
            redis_errors: Family::default(),
            kafka_errors: Family::default(),
            jobs_in_flight: Gauge::default(),
            paused_partitions: Family::default(),
            assigned_partitions: Gauge::default(),
            committed_offset: Family::default(),
            consumer_lag: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "jobs_handled",
            "Records that reached a terminal state, by topic, tier and outcome",
            metrics.jobs_handled.clone(),
        );
        registry.register_with_unit(
            "handler_duration",
            "Time a handler ran, by tier",
            prometheus_client::registry::Unit::Seconds,
            metrics.handler_duration.clone(),
        );
        registry.register_with_unit(
            "end_to_end_latency",
            "Time from the record timestamp on the main topic to the terminal state, by outcome",
            prometheus_client::registry::Unit::Seconds,
            metrics.end_to_end_latency.clone(),
        );
        registry.register(
            "retries",
            "Retry copies written, by tier and error class",
            metrics.retries.clone(),
        );
        registry.register(
            "dead_letters",
            "Dead-letter copies written, by error class",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "dedupe_hits",
            "Jobs skipped because their done marker showed they already succeeded",
            metrics.dedupe_hits.clone(),
        );
        registry.register(
            "redis_errors",
            "Failed Redis requests, by kind",
            metrics.redis_errors.clone(),
        );
        registry.register(
            "kafka_errors",
            "Kafka errors, by kind (poll, commit, produce)",
            metrics.kafka_errors.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Handlers running now",
            metrics.jobs_in_flight.clone(),
        );
        registry.register(
            "paused_partitions",
            "Assigned partitions paused now, by reason",
            metrics.paused_partitions.clone(),
        );
        registry.register(
            "assigned_partitions",
            "Partitions assigned to this member",
            metrics.assigned_partitions.clone(),
        );
        registry.register(
            "committed_offset",
            "Last offset this member committed, per partition",
            metrics.committed_offset.clone(),
        );
        registry.register(
            "consumer_lag",
            "Log end offset minus committed offset, per assigned partition; absent while either is unknown",
            metrics.consumer_lag.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Renders every metric in the OpenMetrics text format, which Prometheus
    /// scrapes natively.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Drops the per-partition series of a partition this member gave up.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let labels = PartitionLabels {
            topic: topic.into(),
            partition,
        };
        self.committed_offset.remove(&labels);
        self.consumer_lag.remove(&labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_units_and_totals() {
        let metrics = Metrics::new();
        metrics
            .jobs_handled
            .get_or_create(&JobLabels {
                topic: "jobs".into(),
                tier: "main".into(),
                outcome: "success",
            })
            .inc();
        metrics
            .handler_duration
            .get_or_create(&TierLabels {
                tier: "main".into(),
            })
            .observe(0.01);
        let text = metrics.render();
        assert!(
            text.contains(
                "sluice_jobs_handled_total{topic=\"jobs\",tier=\"main\",outcome=\"success\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("sluice_handler_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("sluice_dedupe_hits_total 0"), "{text}");
        // A family without series (no lag known yet) is left out entirely.
        assert!(!text.contains("sluice_consumer_lag"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn forgotten_partition_has_no_lag_series() {
        let metrics = Metrics::new();
        let labels = PartitionLabels {
            topic: "jobs".into(),
            partition: 3,
        };
        metrics.consumer_lag.get_or_create(&labels).set(5);
        assert!(metrics.render().contains("partition=\"3\""));
        metrics.forget_partition("jobs", 3);
        assert!(!metrics.render().contains("partition=\"3\""));
    }
}
