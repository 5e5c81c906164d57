//! `topics ensure`: create the main, retry-tier and dead-letter topics, and
//! report existing topics that differ from the settings instead of changing
//! them (a partition change reshuffles keys, so it is an operator's call).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use serde::Serialize;

use crate::admin::AdminError;
use crate::config::{KafkaSettings, PipelineSettings};
use crate::kafka::REQUEST_TIMEOUT;

/// The wanted shape of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub retention_ms: i64,
}

/// The main topic, one topic per retry tier, and the dead-letter topic.
pub fn specs(settings: &PipelineSettings) -> Vec<TopicSpec> {
    let topic = &settings.topic;
    let spec = |name: String, retention_ms| TopicSpec {
        name,
        partitions: topic.partitions,
        replication_factor: topic.replication_factor,
        retention_ms,
    };
    let mut out = vec![spec(topic.name.clone(), topic.retention_ms)];
    for tier in &settings.retry.tiers {
        out.push(spec(topic.tier_topic(tier), topic.retention_ms));
    }
    out.push(spec(topic.dlq_topic(), topic.dlq_retention_ms));
    out
}

/// What `ensure` found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Ensured {
    Created,
    /// The topic exists with the wanted shape.
    Matches,
    /// The topic exists but differs; each entry names the setting, the
    /// wanted value and the actual one.
    Mismatch {
        differences: Vec<String>,
    },
}

fn admin(kafka: &KafkaSettings) -> Result<AdminClient<DefaultClientContext>, AdminError> {
    crate::kafka::producer_config(kafka)
        .create()
        .map_err(AdminError::Client)
}

/// Creates missing topics and compares existing ones with `specs`.
pub async fn ensure(
    kafka: &KafkaSettings,
    specs: &[TopicSpec],
) -> Result<Vec<(TopicSpec, Ensured)>, AdminError> {
    let client = admin(kafka)?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let retention: Vec<String> = specs.iter().map(|s| s.retention_ms.to_string()).collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention)
        .map(|(spec, retention)| {
            NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(spec.replication_factor),
            )
            .set("retention.ms", retention)
        })
        .collect();
    let results = client
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| AdminError::Request {
            operation: "create topics",
            brokers: kafka.brokers.clone(),
            source,
        })?;

    let mut out = Vec::with_capacity(specs.len());
    for (spec, result) in specs.iter().zip(results) {
        let ensured = match result {
            Ok(_) => Ensured::Created,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => compare(&client, kafka, spec).await?,
            Err((topic, code)) => {
                return Err(AdminError::Topic {
                    operation: "create",
                    topic,
                    code,
                })
            }
        };
        out.push((spec.clone(), ensured));
    }
    Ok(out)
}

async fn compare(
    client: &AdminClient<DefaultClientContext>,
    kafka: &KafkaSettings,
    spec: &TopicSpec,
) -> Result<Ensured, AdminError> {
    let request_error = |operation, source| AdminError::Request {
        operation,
        brokers: kafka.brokers.clone(),
        source,
    };
    let metadata = client
        .inner()
        .fetch_metadata(Some(&spec.name), REQUEST_TIMEOUT)
        .map_err(|e| request_error("read topic metadata", e))?;
    let mut differences = Vec::new();
    if let Some(topic) = metadata.topics().first() {
        let partitions = topic.partitions().len() as i32;
        if partitions != spec.partitions {
            differences.push(format!(
                "partitions: wanted {}, actual {partitions}",
                spec.partitions
            ));
        }
        if let Some(first) = topic.partitions().first() {
            let replicas = first.replicas().len() as i32;
            if replicas != spec.replication_factor {
                differences.push(format!(
                    "replication_factor: wanted {}, actual {replicas}",
                    spec.replication_factor
                ));
            }
        }
    }
    let configs = client
        .describe_configs(
            &[ResourceSpecifier::Topic(&spec.name)],
            &AdminOptions::new(),
        )
        .await
        .map_err(|e| request_error("describe topic configs", e))?;
    if let Some(Ok(resource)) = configs.first() {
        let actual = resource
            .get("retention.ms")
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default();
        if actual != spec.retention_ms.to_string() {
            differences.push(format!(
                "retention.ms: wanted {}, actual {actual}",
                spec.retention_ms
            ));
        }
    }
    Ok(if differences.is_empty() {
        Ensured::Matches
    } else {
        Ensured::Mismatch { differences }
    })
}

/// Returns the partition count of `topic`, failing when it does not exist
/// or the brokers cannot be reached. Blocking.
pub fn partition_count(kafka: &KafkaSettings, topic: &str) -> Result<usize, AdminError> {
    let client = admin(kafka)?;
    let metadata = client
        .inner()
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|source| AdminError::Request {
            operation: "read topic metadata",
            brokers: kafka.brokers.clone(),
            source,
        })?;
    let count = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .sum();
    if count == 0 {
        return Err(AdminError::MissingTopic {
            topic: topic.to_owned(),
        });
    }
    Ok(count)
}

/// Deletes topics; used by tests to clean up after themselves.
pub async fn delete(kafka: &KafkaSettings, names: &[&str]) -> Result<(), AdminError> {
    let client = admin(kafka)?;
    client
        .delete_topics(names, &AdminOptions::new())
        .await
        .map_err(|source| AdminError::Request {
            operation: "delete topics",
            brokers: kafka.brokers.clone(),
            source,
        })?;
    Ok(())
}
