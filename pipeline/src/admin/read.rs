//! Reading a whole topic from outside any group, for inspection.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::admin::AdminError;
use crate::config::KafkaSettings;
use crate::envelope::Record;
use crate::kafka::{reader_config, record_of, ReaderContext, REQUEST_TIMEOUT};

/// Reads every record of `topic` from the log start up to the log end seen
/// when the call starts. Blocking; call it from `spawn_blocking` in async
/// code. `timeout` bounds the whole read.
pub fn read_topic(
    kafka: &KafkaSettings,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Record>, AdminError> {
    let consumer: BaseConsumer<ReaderContext> = reader_config(kafka)
        .create_with_context(ReaderContext)
        .map_err(AdminError::Client)?;
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
    let mut remaining = 0usize;
    let mut ends = Vec::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
            .map_err(|e| request_error("read watermarks", e))?;
        if high > low {
            list.add_partition_offset(topic, partition, Offset::Offset(low))
                .map_err(|e| request_error("assign partitions", e))?;
            remaining += 1;
            ends.push((partition, high));
        }
    }
    if remaining == 0 {
        return Ok(Vec::new());
    }
    consumer
        .assign(&list)
        .map_err(|e| request_error("assign partitions", e))?;

    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    let mut finished: Vec<i32> = Vec::new();
    while finished.len() < ends.len() {
        if Instant::now() >= deadline {
            return Err(request_error(
                "read the whole topic in time",
                KafkaError::Canceled,
            ));
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = match result {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(partition)) => {
                if !finished.contains(&partition) {
                    finished.push(partition);
                }
                continue;
            }
            Err(error) => return Err(request_error("read records", error)),
        };
        let end = ends
            .iter()
            .find(|(p, _)| *p == message.partition())
            .map(|(_, h)| *h);
        if end.is_some_and(|end| message.offset() < end) {
            records.push(record_of(&message));
        }
        if end.is_some_and(|end| message.offset() + 1 >= end)
            && !finished.contains(&message.partition())
        {
            finished.push(message.partition());
        }
    }
    Ok(records)
}
