//! The poll thread: fetching, pausing and resuming, committing, and the one
//! drain path shared by revokes and stops.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::consume::state::{Effect, TopicPartition};
use crate::consume::Shared;
use crate::handler::Handler;
use crate::kafka::record_of;
use crate::telemetry::metrics::{KindLabels, PartitionLabels, PauseLabels};
use crate::telemetry::Counters;

/// Maximum time between two rounds of housekeeping (due tier partitions,
/// backpressure). It bounds how late a retry tier fires after its due time.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(20);

/// Consumer context that routes rebalance callbacks into the drain path.
pub(crate) struct MemberContext<H> {
    shared: Arc<Shared<H>>,
}

impl<H> MemberContext<H> {
    pub(crate) fn new(shared: Arc<Shared<H>>) -> Self {
        MemberContext { shared }
    }
}

impl<H: Handler> ClientContext for MemberContext<H> {
    /// Runs on the poll thread every `statistics.interval.ms`: updates the lag
    /// of each assigned partition and whether a broker is reachable.
    fn stats(&self, statistics: Statistics) {
        let metrics = &self.shared.metrics;
        let any_broker_up = statistics
            .brokers
            .values()
            .any(|broker| broker.state == "UP");
        self.shared.health.set_kafka_up(any_broker_up);

        let assigned = self.shared.lock().assigned();
        for (topic, partition) in assigned {
            let labels = PartitionLabels {
                topic: topic.as_str().into(),
                partition,
            };
            let stats = statistics
                .topics
                .get(&topic)
                .and_then(|t| t.partitions.get(&partition));
            // librdkafka reports -1 (or -1001) for an offset it does not know
            // yet; such a lag is left out rather than reported as a number.
            match stats {
                Some(p) if p.hi_offset >= 0 && p.committed_offset >= 0 => {
                    metrics
                        .consumer_lag
                        .get_or_create(&labels)
                        .set((p.hi_offset - p.committed_offset).max(0));
                }
                _ => {
                    metrics.consumer_lag.remove(&labels);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.shared.health.set_kafka_up(false);
        }
        self.shared
            .metrics
            .kafka_errors
            .get_or_create(&KindLabels { kind: "client" })
            .inc();
        warn!(%error, reason, "librdkafka reported an error");
    }
}

impl<H: Handler> ConsumerContext for MemberContext<H> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list);
                let mut state = self.shared.lock();
                for partition in &partitions {
                    let is_tier = partition.0 != self.shared.main_topic;
                    state.assign(partition.clone(), is_tier);
                }
                let assigned = state.assigned().len();
                drop(state);
                self.shared.metrics.assigned_partitions.set(assigned as i64);
                self.shared.health.set_assigned(true);
                // An assignment comes from the group coordinator, a broker.
                self.shared.health.set_kafka_up(true);
                info!(partitions = ?partitions, "partitions assigned");
            }
            Rebalance::Revoke(list) => {
                let partitions = partitions_of(list);
                info!(partitions = ?partitions, "partitions revoked; draining");
                drain(consumer, &self.shared, &partitions);
                for (topic, partition) in &partitions {
                    self.shared.metrics.forget_partition(topic, *partition);
                }
                let assigned = self.shared.lock().assigned().len();
                self.shared.metrics.assigned_partitions.set(assigned as i64);
            }
            Rebalance::Error(error) => warn!(%error, "rebalance failed"),
        }
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|element| (element.topic().to_owned(), element.partition()))
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Polls until `shutdown` fires, then drains everything and closes the
/// consumer, which leaves the group.
pub(crate) fn run<H: Handler>(
    consumer: BaseConsumer<MemberContext<H>>,
    shared: &Arc<Shared<H>>,
    shutdown: &CancellationToken,
) {
    let mut effects = Vec::new();
    let mut last_housekeeping = Instant::now();
    let mut last_commit = Instant::now();
    let mut poll_errors = 0u64;

    while !shutdown.is_cancelled() {
        shared.health.polled();
        match consumer.poll(HOUSEKEEPING_INTERVAL) {
            Some(Ok(message)) => {
                let record = record_of(&message);
                drop(message);
                shared
                    .lock()
                    .admit(record, Instant::now(), now_ms(), &mut effects);
                apply(&consumer, shared, &mut effects);
            }
            Some(Err(error)) => {
                shared
                    .metrics
                    .kafka_errors
                    .get_or_create(&KindLabels { kind: "poll" })
                    .inc();
                poll_errors += 1;
                if poll_errors == 1 || poll_errors % 100 == 0 {
                    warn!(%error, count = poll_errors, "consumer error");
                }
            }
            None => {}
        }

        if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            last_housekeeping = Instant::now();
            let (delayed, pressed) = {
                let mut state = shared.lock();
                state.housekeeping(Instant::now(), now_ms(), &mut effects);
                state.paused_counts()
            };
            apply(&consumer, shared, &mut effects);
            let paused = &shared.metrics.paused_partitions;
            paused
                .get_or_create(&PauseLabels { reason: "delay" })
                .set(delayed as i64);
            paused
                .get_or_create(&PauseLabels {
                    reason: "backpressure",
                })
                .set(pressed as i64);
        }
        if last_commit.elapsed() >= shared.commit_interval {
            last_commit = Instant::now();
            let offsets = shared.lock().take_commits();
            commit(&consumer, shared, offsets);
        }
    }

    let assigned = shared.lock().assigned();
    info!(
        partitions = assigned.len(),
        "stopping; draining in-flight jobs"
    );
    drain(&consumer, shared, &assigned);
    // Dropping the consumer closes it: it leaves the group, and the revoke
    // callback finds nothing left to drain.
    drop(consumer);
    info!("left the consumer group");
}

/// Carries out the effects of a state change: spawns lane tasks and pauses
/// or resumes partitions.
fn apply<H: Handler>(
    consumer: &BaseConsumer<MemberContext<H>>,
    shared: &Arc<Shared<H>>,
    effects: &mut Vec<Effect>,
) {
    for effect in effects.drain(..) {
        match effect {
            Effect::Ready => shared.work.notify_one(),
            Effect::Pause(partition) => {
                debug!(
                    topic = partition.0,
                    partition = partition.1,
                    "pausing partition"
                );
                if let Err(error) = consumer.pause(&single(&partition)) {
                    warn!(topic = partition.0, partition = partition.1, %error, "failed to pause partition");
                }
            }
            Effect::Resume(partition) => {
                debug!(
                    topic = partition.0,
                    partition = partition.1,
                    "resuming partition"
                );
                if let Err(error) = consumer.resume(&single(&partition)) {
                    warn!(topic = partition.0, partition = partition.1, %error, "failed to resume partition");
                }
            }
        }
    }
}

fn single(partition: &TopicPartition) -> TopicPartitionList {
    let mut list = TopicPartitionList::with_capacity(1);
    list.add_partition(&partition.0, partition.1);
    list
}

/// Commits offsets synchronously and puts back the ones Kafka rejected.
fn commit<H: Handler>(
    consumer: &BaseConsumer<MemberContext<H>>,
    shared: &Shared<H>,
    offsets: Vec<(TopicPartition, i64)>,
) -> bool {
    if offsets.is_empty() {
        return true;
    }
    let mut list = TopicPartitionList::with_capacity(offsets.len());
    for ((topic, partition), offset) in &offsets {
        if let Err(error) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            error!(topic, partition, offset, %error, "invalid offset to commit");
        }
    }
    match consumer.commit(&list, CommitMode::Sync) {
        Ok(()) => {
            Counters::bump(&shared.ctx.counters.commits);
            for ((topic, partition), offset) in &offsets {
                shared
                    .metrics
                    .committed_offset
                    .get_or_create(&PartitionLabels {
                        topic: topic.as_str().into(),
                        partition: *partition,
                    })
                    .set(*offset);
            }
            debug!(offsets = ?offsets, "committed");
            true
        }
        Err(error) => {
            shared
                .metrics
                .kafka_errors
                .get_or_create(&KindLabels { kind: "commit" })
                .inc();
            warn!(%error, offsets = ?offsets, "commit failed; retrying on the next round");
            let mut state = shared.lock();
            for (partition, offset) in &offsets {
                state.commit_failed(partition, *offset);
            }
            false
        }
    }
}

/// The drain path for revokes and stops: stop starting jobs of
/// `partitions`, wait for running ones until the drain deadline, commit the
/// contiguous terminal prefix, and forget the partitions. Jobs still running
/// after the deadline stay uncommitted and run again on the next owner.
fn drain<H: Handler>(
    consumer: &BaseConsumer<MemberContext<H>>,
    shared: &Shared<H>,
    partitions: &[TopicPartition],
) {
    if partitions.is_empty() {
        return;
    }
    let deadline = Instant::now() + shared.drain_deadline;
    let mut state = shared.lock();
    state.revoke(partitions);
    loop {
        let running = state.running_lanes(partitions);
        if running == 0 {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            warn!(
                running,
                deadline_ms = shared.drain_deadline.as_millis() as u64,
                "drain deadline passed with jobs still running; they stay uncommitted"
            );
            break;
        }
        state = shared
            .lane_ended
            .wait_timeout(state, deadline - now)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner().0);
    }
    let released = state.remove(partitions);
    drop(state);

    let abandoned: usize = released.iter().map(|r| r.abandoned).sum();
    shared
        .ctx
        .counters
        .abandoned
        .fetch_add(abandoned as u64, std::sync::atomic::Ordering::Relaxed);
    let offsets: Vec<_> = released
        .into_iter()
        .filter_map(|r| Some((r.partition, r.commit?)))
        .collect();
    let committed = commit(consumer, shared, offsets.clone());
    info!(
        partitions = partitions.len(),
        abandoned,
        committed = ?offsets,
        ok = committed,
        "drained"
    );
}
