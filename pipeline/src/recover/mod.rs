//! Recovery operations for a live cluster: replay a range of a topic,
//! inspect and redrive dead letters, and move a group's committed offsets.
//!
//! Every operation first resolves a plan (exact offsets per partition) that
//! the caller can show and confirm, then carries it out. Reads use an
//! assigned consumer that never joins a group and never commits, so running
//! them does not disturb the workers.

pub mod dead_letters;
pub mod group;
pub mod replay;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::envelope::Record;
use crate::kafka::{reader_config, record_of, ReaderContext, REQUEST_TIMEOUT};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    #[error("failed to create a Kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("failed to {operation} for topic {topic} at {brokers}: {source}; check the brokers and the topic name")]
    Request {
        operation: &'static str,
        topic: String,
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} does not exist; check the name (sluice topics ensure creates a pipeline's topics)")]
    MissingTopic { topic: String },
    #[error(
        "partition {partition} does not exist in topic {topic}, which has partitions 0 to {last}"
    )]
    MissingPartition {
        topic: String,
        partition: i32,
        last: i32,
    },
    #[error("consumer group {group} has {count} active member(s): {members}; stop them before moving its offsets")]
    GroupActive {
        group: String,
        count: usize,
        members: String,
    },
    #[error(transparent)]
    Produce(#[from] crate::produce::ProduceError),
    #[error("a background task failed: {0}")]
    Task(String),
    #[error("another redrive of {topic} is running ({holders}); wait for it to finish")]
    RedriveRunning { topic: String, holders: String },
    #[error("the redrive cursor of {topic} partition {partition} cannot store {count} redriven offsets beyond its position; redrive without filters to advance it")]
    CursorFull {
        topic: String,
        partition: i32,
        count: usize,
    },
}

/// A reader of one topic that never joins a group.
pub(crate) struct TopicReader {
    consumer: BaseConsumer<ReaderContext>,
    topic: String,
    brokers: String,
}

impl TopicReader {
    pub(crate) fn new(kafka: &KafkaSettings, topic: &str) -> Result<Self, RecoverError> {
        let consumer = reader_config(kafka)
            .create_with_context(ReaderContext)
            .map_err(RecoverError::Client)?;
        Ok(TopicReader {
            consumer,
            topic: topic.to_owned(),
            brokers: kafka.brokers.clone(),
        })
    }

    fn error(&self, operation: &'static str, source: KafkaError) -> RecoverError {
        RecoverError::Request {
            operation,
            topic: self.topic.clone(),
            brokers: self.brokers.clone(),
            source,
        }
    }

    /// Partition numbers of the topic, ascending.
    pub(crate) fn partitions(&self) -> Result<Vec<i32>, RecoverError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)
            .map_err(|e| self.error("read metadata", e))?;
        let mut partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(RecoverError::MissingTopic {
                topic: self.topic.clone(),
            });
        }
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Checks a user's partition selection against the topic.
    pub(crate) fn select(&self, wanted: Option<&[i32]>) -> Result<Vec<i32>, RecoverError> {
        let all = self.partitions()?;
        let Some(wanted) = wanted else {
            return Ok(all);
        };
        let last = *all.last().unwrap_or(&0);
        for partition in wanted {
            if !all.contains(partition) {
                return Err(RecoverError::MissingPartition {
                    topic: self.topic.clone(),
                    partition: *partition,
                    last,
                });
            }
        }
        let mut selected = wanted.to_vec();
        selected.sort_unstable();
        selected.dedup();
        Ok(selected)
    }

    /// Log start and log end offsets of a partition.
    pub(crate) fn watermarks(&self, partition: i32) -> Result<(i64, i64), RecoverError> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, REQUEST_TIMEOUT)
            .map_err(|e| self.error("read watermarks", e))
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`,
    /// by the broker's offset-for-time lookup, or `None` when every record
    /// is older.
    pub(crate) fn offset_for_time(
        &self,
        partition: i32,
        timestamp_ms: i64,
    ) -> Result<Option<i64>, RecoverError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, Offset::Offset(timestamp_ms))
            .map_err(|e| self.error("look up offsets for a time", e))?;
        let found = self
            .consumer
            .offsets_for_times(list, REQUEST_TIMEOUT)
            .map_err(|e| self.error("look up offsets for a time", e))?;
        let offset = found
            .find_partition(&self.topic, partition)
            .map(|element| element.offset());
        Ok(match offset {
            Some(Offset::Offset(offset)) if offset >= 0 => Some(offset),
            _ => None,
        })
    }

    /// Reads `[start, end)` of each listed partition and hands each record
    /// to `visit` in offset order per partition. Stops early when `visit`
    /// returns `false`.
    pub(crate) fn read_ranges(
        &self,
        ranges: &[(i32, i64, i64)],
        mut visit: impl FnMut(Record) -> bool,
    ) -> Result<(), RecoverError> {
        let mut list = TopicPartitionList::new();
        let mut open: Vec<(i32, i64)> = Vec::new();
        for (partition, start, end) in ranges {
            if end > start {
                list.add_partition_offset(&self.topic, *partition, Offset::Offset(*start))
                    .map_err(|e| self.error("assign partitions", e))?;
                open.push((*partition, *end));
            }
        }
        if open.is_empty() {
            return Ok(());
        }
        self.consumer
            .assign(&list)
            .map_err(|e| self.error("assign partitions", e))?;
        let mut idle = Duration::ZERO;
        while !open.is_empty() {
            let Some(result) = self.consumer.poll(Duration::from_millis(200)) else {
                idle += Duration::from_millis(200);
                if idle > Duration::from_secs(60) {
                    return Err(self.error("read records in time", KafkaError::Canceled));
                }
                continue;
            };
            idle = Duration::ZERO;
            let message = match result {
                Ok(message) => message,
                Err(KafkaError::PartitionEOF(partition)) => {
                    // The log ended before the planned end (records were
                    // transaction markers or compacted away).
                    open.retain(|(p, _)| *p != partition);
                    continue;
                }
                Err(error) => return Err(self.error("read records", error)),
            };
            let partition = message.partition();
            let Some(end) = open
                .iter()
                .find(|(p, _)| *p == partition)
                .map(|(_, end)| *end)
            else {
                continue;
            };
            if message.offset() >= end {
                open.retain(|(p, _)| *p != partition);
                continue;
            }
            let record = record_of(&message);
            let last = record.offset + 1 >= end;
            if !visit(record) {
                return Ok(());
            }
            if last {
                open.retain(|(p, _)| *p != partition);
            }
        }
        Ok(())
    }
}

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC.
pub fn format_time(timestamp_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(timestamp_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{timestamp_ms} ms"))
}

/// Parses an RFC 3339 time (`2026-12-04T20:00:00Z`, `...+01:00`) into
/// milliseconds since the Unix epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!("invalid time {text:?}: {e}; use RFC 3339 such as 2026-12-04T20:00:00Z")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_errors_show_the_format() {
        let ms = parse_time("2026-12-04T20:00:00.250+01:00").unwrap();
        assert_eq!(format_time(ms), "2026-12-04T19:00:00.250Z");
        let error = parse_time("yesterday").unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
    }
}
