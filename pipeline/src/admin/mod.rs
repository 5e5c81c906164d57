//! Operations on topics and group offsets, for the `sluice` subcommands and
//! for tests.

pub mod offsets;
pub mod read;
pub mod topics;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("failed to create a Kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("failed to {operation} at {brokers}: {source}; check kafka.brokers and that the brokers are up")]
    Request {
        operation: &'static str,
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("failed to {operation} topic {topic}: {code}")]
    Topic {
        operation: &'static str,
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("topic {topic} does not exist; create it with `sluice topics ensure --config FILE`")]
    MissingTopic { topic: String },
}
