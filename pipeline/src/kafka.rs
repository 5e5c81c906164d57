//! librdkafka client settings and error classification shared by all clients.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

use crate::config::{ConfigError, KafkaSettings};
use crate::envelope::{HeaderList, Record};

/// librdkafka properties that sluice sets itself because its guarantees
/// depend on them. Setting one under `kafka.properties` is a config error.
pub const RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "isolation.level",
    "auto.commit.enable",
];

/// Rejects pass-through properties that would break commit or delivery
/// guarantees.
pub fn check_properties(kafka: &KafkaSettings) -> Result<(), ConfigError> {
    for key in kafka.properties.keys() {
        // librdkafka property names are lowercase; compare that way so that
        // a differently cased key is caught here, not at client creation.
        let name = key.trim().to_ascii_lowercase();
        let name = name.strip_prefix("topic.").unwrap_or(&name);
        if RESERVED_PROPERTIES.contains(&name) {
            return Err(ConfigError::Invalid {
                key: "kafka.properties",
                value: key.clone(),
                reason: "sluice sets this property itself because its delivery guarantees depend on it; remove it (use kafka.brokers for the bootstrap servers and worker.group_id for the group)".to_owned(),
            });
        }
    }
    Ok(())
}

/// Lets librdkafka check `kafka.properties` by creating (and dropping) a
/// producer and a consumer, so that `config check` reports an unknown or
/// invalid property as `sluice work` would.
pub fn check_client_properties(kafka: &KafkaSettings, group_id: &str) -> Result<(), ConfigError> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;

    let invalid = |error: KafkaError| ConfigError::Invalid {
        key: "kafka",
        value: format!("{kafka:?}"),
        reason: format!("librdkafka rejected the client settings: {error}"),
    };
    producer_config(kafka)
        .create::<BaseProducer>()
        .map_err(invalid)?;
    consumer_config(kafka, group_id)
        .create::<BaseConsumer>()
        .map_err(invalid)?;
    Ok(())
}

fn base(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    let security = [
        ("security.protocol", &kafka.security_protocol),
        ("sasl.mechanism", &kafka.sasl_mechanism),
        ("sasl.username", &kafka.sasl_username),
        ("sasl.password", &kafka.sasl_password),
        ("ssl.ca.location", &kafka.ssl_ca_location),
    ];
    for (key, value) in security {
        if let Some(value) = value {
            config.set(key, value);
        }
    }
    config
}

fn apply_properties(config: &mut ClientConfig, kafka: &KafkaSettings) {
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
}

/// Settings of every producer sluice runs: idempotent, `acks=all`, so a
/// delivery report means the copy is durable on all in-sync replicas.
pub fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("compression.type", "none");
    apply_properties(&mut config, kafka);
    config
}

/// Settings of a group member: no automatic commits or offset stores, since
/// the worker commits only contiguous terminal offsets itself.
pub fn consumer_config(kafka: &KafkaSettings, group_id: &str) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.wait.max.ms", "100")
        // Statistics feed the lag metric and readiness.
        .set("statistics.interval.ms", "5000");
    apply_properties(&mut config, kafka);
    config
}

/// Settings of a consumer that only reads assigned partitions and never joins
/// a group or commits (admin reads, dead-letter inspection).
pub fn reader_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", "sluice-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    apply_properties(&mut config, kafka);
    config
}

/// Context of readers that ask librdkafka for end-of-partition events: logs
/// client errors through `tracing`, except those expected events.
#[derive(Debug, Default)]
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            tracing::warn!(%error, reason, "librdkafka reported an error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// Timeout for one admin or metadata request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether retrying the failed operation can succeed without a change of
/// configuration. Unknown errors count as retryable so that a transient
/// broker problem never drops a job.
pub fn is_retryable(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let code = match error {
        KafkaError::MessageProduction(code)
        | KafkaError::ConsumerCommit(code)
        | KafkaError::MetadataFetch(code)
        | KafkaError::OffsetFetch(code)
        | KafkaError::Flush(code)
        | KafkaError::AdminOp(code) => *code,
        KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => return false,
        _ => return true,
    };
    !matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::UnsupportedVersion
            | C::InvalidConfig
            | C::InvalidRecord
            | C::UnknownTopic
            | C::InvalidTopic
    )
}

/// Copies a fetched message into an owned [`Record`].
pub fn record_of<M: Message>(message: &M) -> Record {
    Record {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: from_kafka_headers(message.headers()),
    }
}

/// Converts a sluice header list into librdkafka headers.
pub fn to_kafka_headers(headers: &HeaderList) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.len());
    for (key, value) in headers {
        out = out.insert(Header {
            key,
            value: value.as_deref(),
        });
    }
    out
}

/// Copies librdkafka headers into a sluice header list.
pub fn from_kafka_headers<H: Headers>(headers: Option<&H>) -> HeaderList {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec)))
        .collect()
}
