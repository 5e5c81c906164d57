//! Log end offsets, committed group offsets and the lag between them.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::admin::AdminError;
use crate::config::KafkaSettings;
use crate::kafka::{reader_config, REQUEST_TIMEOUT};

/// Offsets of one partition as seen by one consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionOffsets {
    pub partition: i32,
    /// First offset still in the log.
    pub log_start: i64,
    /// Offset the next record will get.
    pub log_end: i64,
    /// Next offset the group will read, `None` when it never committed.
    pub committed: Option<i64>,
}

impl PartitionOffsets {
    /// Records the group has not committed yet. Without a commit, the group
    /// starts at the log start (`auto.offset.reset = earliest`).
    pub fn lag(&self) -> i64 {
        (self.log_end - self.committed.unwrap_or(self.log_start)).max(0)
    }
}

/// Reads watermarks and the group's committed offsets of every partition of
/// `topic`. Blocking; call it from `spawn_blocking` in async code.
pub fn group_offsets(
    kafka: &KafkaSettings,
    group_id: &str,
    topic: &str,
) -> Result<Vec<PartitionOffsets>, AdminError> {
    let mut config = reader_config(kafka);
    config.set("group.id", group_id);
    let consumer: BaseConsumer = config.create().map_err(AdminError::Client)?;
    let request_error = |operation, source| AdminError::Request {
        operation,
        brokers: kafka.brokers.clone(),
        source,
    };

    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| request_error("read topic metadata", e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(AdminError::MissingTopic {
            topic: topic.to_owned(),
        });
    }

    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(list, REQUEST_TIMEOUT)
        .map_err(|e| request_error("read committed offsets", e))?;

    let mut out = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let (log_start, log_end) = consumer
            .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
            .map_err(|e| request_error("read watermarks", e))?;
        let committed =
            committed
                .find_partition(topic, partition)
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                });
        out.push(PartitionOffsets {
            partition,
            log_start,
            log_end,
            committed,
        });
    }
    out.sort_by_key(|p| p.partition);
    Ok(out)
}
