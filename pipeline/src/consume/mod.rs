//! The consumer runtime: a group member that runs jobs and commits only what
//! is terminal.
//!
//! ```text
//!  poll thread (owns the consumer)             worker pool (Tokio tasks)
//!  ─────────────────────────────              ─────────────────────────
//!  poll ─► admit record ─► key lane ─ready─►  claim ─► handler ─► done / copy
//!   │       (track offset, maybe pause)            │
//!   │                                              ▼
//!   ├─ housekeeping: resume due tier partitions,  mark offset terminal
//!   │  lift backpressure                           (OffsetTracker)
//!   ├─ commit the contiguous terminal prefix every commit interval
//!   └─ revoke / stop: cancel waits, drain running jobs until the deadline,
//!      commit, forget the partitions (one drain path for both)
//! ```
//!
//! The consumer lives on a dedicated thread because librdkafka runs rebalance
//! callbacks inside `poll`, and the revoke callback must block until running
//! jobs finish. Blocking a Tokio worker thread there could stall the very
//! tasks it waits for. The pool has `worker.max_in_flight` tasks, which take
//! ready lanes first in, first out.

mod job;
mod poll;
pub mod state;
pub mod tracker;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::PipelineSettings;
use crate::dedupe::{Dedupe, DedupeError};
use crate::envelope::DecodeRules;
use crate::handler::Handler;
use crate::kafka::{check_properties, consumer_config, REQUEST_TIMEOUT};
use crate::produce::{JobProducer, ProduceError};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{Counters, Summary};
use job::JobContext;
use poll::MemberContext;
use state::State;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("failed to create the Kafka consumer: {0}")]
    Consumer(#[source] KafkaError),
    #[error(transparent)]
    Producer(#[from] ProduceError),
    #[error(transparent)]
    Dedupe(#[from] DedupeError),
    #[error("failed to read metadata from the brokers at {brokers}: {source}; check kafka.brokers and that the brokers are up")]
    Metadata {
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} does not exist; create it with `sluice topics ensure --config FILE`")]
    MissingTopic { topic: String },
    #[error("failed to subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("the poll thread failed: {0}")]
    PollThread(String),
}

/// State shared by the poll thread and the lane tasks.
pub(crate) struct Shared<H> {
    state: Mutex<State>,
    /// Signalled whenever a lane task ends, for drains waiting on it.
    lane_ended: Condvar,
    ctx: JobContext<H>,
    /// Wakes an idle worker of the pool when a lane becomes ready.
    work: Notify,
    drain_deadline: Duration,
    commit_interval: Duration,
    main_topic: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl<H> Shared<H> {
    /// Locks the partition state. A panic never happens while the lock is
    /// held (handlers run outside it), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lane_finished(&self) {
        self.lane_ended.notify_all();
    }
}

/// A group member running `H` on the main topic and its retry tiers.
pub struct Worker<H: Handler> {
    settings: PipelineSettings,
    handler: H,
    member_id: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl<H: Handler> Worker<H> {
    pub fn new(settings: PipelineSettings, handler: H) -> Result<Self, WorkerError> {
        settings.validate()?;
        check_properties(&settings.kafka)?;
        let member_id = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice".to_owned()),
            std::process::id(),
            rand::random::<u32>()
        );
        // A revoke blocks the poll loop for up to the drain deadline; only a
        // loop idle well past that is wedged.
        let stall_after = settings.worker.drain_deadline() + Duration::from_secs(30);
        let health = Arc::new(Health::new(stall_after, settings.dedupe.enabled));
        Ok(Worker {
            settings,
            handler,
            member_id,
            metrics: Arc::new(Metrics::new()),
            health,
        })
    }

    /// Returns the worker's metrics, to serve while it runs.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Returns the worker's liveness and readiness, to serve while it runs.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` fires, then drains, commits and leaves the group.
    ///
    /// # Cancellation
    /// Stop the worker through `shutdown`, not by dropping this future:
    /// dropping it skips the drain, and jobs then run again on the next owner.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Summary, WorkerError> {
        let settings = self.settings;
        let group_id = settings.worker.group_id.clone();
        let max_in_flight = settings.worker.max_in_flight;
        let topics = subscribed_topics(&settings);
        let dedupe = if settings.dedupe.enabled {
            Some(Dedupe::connect(
                &settings.dedupe,
                &settings.worker.group_id,
                &self.member_id,
                self.health.clone(),
            )?)
        } else {
            None
        };
        let ctx = JobContext {
            handler: self.handler,
            dedupe,
            on_redis_unavailable: settings.dedupe.on_redis_unavailable,
            producer: JobProducer::new(&settings.kafka)?,
            rules: DecodeRules {
                payload_format: settings.worker.payload_format,
                max_record_bytes: settings.worker.max_record_bytes,
                job_id_field: settings.worker.job_id_field.clone(),
            },
            tiers: settings.retry.tiers.clone(),
            tier_topics: topics[1..].to_vec(),
            dlq_topic: settings.topic.dlq_topic(),
            handler_timeout: settings.worker.handler_timeout(),
            counters: Counters::new(settings.retry.tiers.len()),
            metrics: self.metrics.clone(),
            group_id: group_id.clone(),
            labels: metric_labels(&settings),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(settings.worker.max_pending_per_partition)),
            lane_ended: Condvar::new(),
            ctx,
            work: Notify::new(),
            drain_deadline: settings.worker.drain_deadline(),
            commit_interval: settings.worker.commit_interval(),
            main_topic: settings.topic.name.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
        });

        let consumer: BaseConsumer<MemberContext<H>> =
            consumer_config(&settings.kafka, &settings.worker.group_id)
                .set("client.id", &self.member_id)
                .create_with_context(MemberContext::new(shared.clone()))
                .map_err(WorkerError::Consumer)?;
        let consumer =
            tokio::task::spawn_blocking(move || check_topics(consumer, &settings, &topics))
                .await
                .map_err(|e| WorkerError::PollThread(e.to_string()))??;

        info!(member = %self.member_id, group = %group_id, topics = ?subscribed_topics_of(&shared), "worker started");
        let poll_shared = shared.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("sluice-poll".to_owned())
            .spawn(move || {
                poll::run(consumer, &poll_shared, &shutdown);
                let _ = done_tx.send(());
            })
            .map_err(|e| WorkerError::PollThread(e.to_string()))?;
        let pool_stop = CancellationToken::new();
        let pool: Vec<_> = (0..max_in_flight)
            .map(|_| tokio::spawn(job::run_worker(shared.clone(), pool_stop.clone())))
            .collect();
        let polled = done_rx.await;
        pool_stop.cancel();
        for worker in pool {
            let _ = worker.await;
        }
        polled.map_err(|_| WorkerError::PollThread("the poll thread panicked".to_owned()))?;

        let flush = shared.ctx.producer.clone();
        tokio::task::spawn_blocking(move || flush.flush(Duration::from_secs(10)))
            .await
            .map_err(|e| WorkerError::PollThread(e.to_string()))??;
        let tier_names: Vec<String> = shared.ctx.tiers.iter().map(|t| t.name.clone()).collect();
        Ok(shared.ctx.counters.snapshot(&tier_names))
    }
}

fn subscribed_topics_of<H>(shared: &Shared<H>) -> Vec<&str> {
    std::iter::once(shared.main_topic.as_str())
        .chain(shared.ctx.tier_topics.iter().map(String::as_str))
        .collect()
}

/// Metric labels (topic, tier) of every subscribed topic.
fn metric_labels(settings: &PipelineSettings) -> HashMap<String, (Arc<str>, Arc<str>)> {
    let mut labels = HashMap::new();
    let main: Arc<str> = settings.topic.name.as_str().into();
    labels.insert(settings.topic.name.clone(), (main, "main".into()));
    for tier in &settings.retry.tiers {
        let topic = settings.topic.tier_topic(tier);
        labels.insert(
            topic.clone(),
            (topic.as_str().into(), tier.name.as_str().into()),
        );
    }
    labels
}

/// The main topic followed by one topic per retry tier.
fn subscribed_topics(settings: &PipelineSettings) -> Vec<String> {
    let mut topics = vec![settings.topic.name.clone()];
    topics.extend(
        settings
            .retry
            .tiers
            .iter()
            .map(|tier| settings.topic.tier_topic(tier)),
    );
    topics
}

/// Fails early with a clear message when a topic is missing (the broker does
/// not create them), then subscribes.
fn check_topics<H: Handler>(
    consumer: BaseConsumer<MemberContext<H>>,
    settings: &PipelineSettings,
    topics: &[String],
) -> Result<BaseConsumer<MemberContext<H>>, WorkerError> {
    let metadata = consumer
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|source| WorkerError::Metadata {
            brokers: settings.kafka.brokers.clone(),
            source,
        })?;
    let dlq = settings.topic.dlq_topic();
    for topic in topics.iter().chain(std::iter::once(&dlq)) {
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(WorkerError::MissingTopic {
                topic: topic.clone(),
            });
        }
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|source| WorkerError::Subscribe {
            topics: topics.to_vec(),
            source,
        })?;
    Ok(consumer)
}
