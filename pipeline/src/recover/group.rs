//! Moving a consumer group's committed offsets.
//!
//! Kafka keeps the offsets of a group with active members under their
//! control: a write from outside would be overwritten by their next commit,
//! or worse, mix with it. So a reset refuses while the group has members and
//! names them.

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaSettings;
use crate::kafka::{reader_config, REQUEST_TIMEOUT};
use crate::recover::{RecoverError, TopicReader};

/// Where to move the committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// This offset, clamped into the log.
    Offset(i64),
    /// The first record at or after this time (ms since the epoch), or the
    /// log end when every record is older.
    Time(i64),
    Earliest,
    Latest,
}

/// Current and new committed offset of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResetPlan {
    pub partition: i32,
    pub log_start: i64,
    pub log_end: i64,
    /// `None` when the group never committed for this partition.
    pub current: Option<i64>,
    pub new: i64,
}

/// An active member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
}

fn group_consumer(kafka: &KafkaSettings, group: &str) -> Result<BaseConsumer, RecoverError> {
    let mut config = reader_config(kafka);
    config.set("group.id", group);
    config.create().map_err(RecoverError::Client)
}

/// Active members of `group`. Blocking.
pub fn members(kafka: &KafkaSettings, group: &str) -> Result<Vec<Member>, RecoverError> {
    let consumer = group_consumer(kafka, group)?;
    let groups = consumer
        .fetch_group_list(Some(group), REQUEST_TIMEOUT)
        .map_err(|source| RecoverError::Request {
            operation: "describe the consumer group",
            topic: group.to_owned(),
            brokers: kafka.brokers.clone(),
            source,
        })?;
    Ok(groups
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| Member {
            id: m.id().to_owned(),
            client_id: m.client_id().to_owned(),
            host: m.client_host().to_owned(),
        })
        .collect())
}

/// Fails with the member list when `group` has active members.
pub fn ensure_idle(kafka: &KafkaSettings, group: &str) -> Result<(), RecoverError> {
    let members = members(kafka, group)?;
    if members.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = members
        .iter()
        .map(|m| format!("{} ({} on {})", m.id, m.client_id, m.host))
        .collect();
    Err(RecoverError::GroupActive {
        group: group.to_owned(),
        count: members.len(),
        members: names.join(", "),
    })
}

/// Resolves the new offset of each selected partition. Blocking.
pub fn plan(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    to: ResetTo,
    partitions: Option<&[i32]>,
) -> Result<Vec<ResetPlan>, RecoverError> {
    let reader = TopicReader::new(kafka, topic)?;
    let selected = reader.select(partitions)?;
    let consumer = group_consumer(kafka, group)?;
    let mut list = TopicPartitionList::new();
    for partition in &selected {
        list.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(list, REQUEST_TIMEOUT)
        .map_err(|source| RecoverError::Request {
            operation: "read committed offsets",
            topic: topic.to_owned(),
            brokers: kafka.brokers.clone(),
            source,
        })?;

    let mut plans = Vec::new();
    for partition in selected {
        let (log_start, log_end) = reader.watermarks(partition)?;
        let current = match committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(offset)) => Some(offset),
            _ => None,
        };
        let new = match to {
            ResetTo::Offset(offset) => offset.clamp(log_start, log_end),
            ResetTo::Time(time) => reader.offset_for_time(partition, time)?.unwrap_or(log_end),
            ResetTo::Earliest => log_start,
            ResetTo::Latest => log_end,
        };
        plans.push(ResetPlan {
            partition,
            log_start,
            log_end,
            current,
            new,
        });
    }
    Ok(plans)
}

/// Commits the planned offsets for `group`, after checking again that it
/// has no active members. Blocking.
pub fn apply(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    plans: &[ResetPlan],
) -> Result<(), RecoverError> {
    ensure_idle(kafka, group)?;
    let consumer = group_consumer(kafka, group)?;
    let mut list = TopicPartitionList::new();
    for plan in plans {
        list.add_partition_offset(topic, plan.partition, Offset::Offset(plan.new))
            .map_err(|source| RecoverError::Request {
                operation: "set offsets",
                topic: topic.to_owned(),
                brokers: kafka.brokers.clone(),
                source,
            })?;
    }
    consumer
        .commit(&list, CommitMode::Sync)
        .map_err(|source| RecoverError::Request {
            operation: "commit the new offsets",
            topic: topic.to_owned(),
            brokers: kafka.brokers.clone(),
            source,
        })
}
