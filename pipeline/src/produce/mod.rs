//! Appending jobs to Kafka: the library producer and NDJSON input parsing.
//!
//! [`JobProducer`] is what Rust services use to enqueue jobs, and what the
//! worker uses for retry and dead-letter copies. It is idempotent with
//! `acks=all`, and a send completes only when the broker's delivery report
//! arrived, so a successful send means the record is durable.

pub mod bulk;
pub mod ndjson;

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::KafkaSettings;
use crate::envelope::{headers, HeaderList};
use crate::kafka::{producer_config, to_kafka_headers};
use crate::telemetry::trace;

pub(crate) fn job_id(headers: &HeaderList) -> Option<&str> {
    headers
        .iter()
        .find(|(name, _)| name == headers::JOB_ID)
        .and_then(|(_, value)| value.as_deref())
        .and_then(|value| std::str::from_utf8(value).ok())
}

/// A record to append.
#[derive(Debug, Clone, Default)]
pub struct OutgoingRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HeaderList,
}

impl OutgoingRecord {
    /// Builds a job for `topic` with its job id in the `sluice-job-id` header.
    pub fn job(topic: &str, job_id: Option<&str>, key: Option<Vec<u8>>, payload: Vec<u8>) -> Self {
        let mut headers = HeaderList::new();
        if let Some(id) = job_id {
            headers.push((
                headers::VERSION.to_owned(),
                Some(headers::SCHEMA_VERSION.into()),
            ));
            headers.push((headers::JOB_ID.to_owned(), Some(id.as_bytes().to_vec())));
        }
        OutgoingRecord {
            topic: topic.to_owned(),
            key,
            payload: Some(payload),
            headers,
        }
    }
}

/// Where a delivered record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProduceError {
    #[error("failed to create the Kafka producer: {0}")]
    Create(#[source] KafkaError),
    #[error("failed to deliver a record to topic {topic}: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("the producer was dropped before topic {topic} acknowledged the record")]
    Canceled { topic: String },
    #[error("failed to flush the producer: {0}")]
    Flush(#[source] KafkaError),
}

impl ProduceError {
    /// Returns whether sending the same record again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProduceError::Delivery { source, .. } => crate::kafka::is_retryable(source),
            ProduceError::Canceled { .. } | ProduceError::Flush(_) => true,
            ProduceError::Create(_) => false,
        }
    }
}

/// An idempotent producer of jobs; cheap to clone.
#[derive(Clone)]
pub struct JobProducer {
    inner: FutureProducer,
}

/// A record waiting for its delivery report.
pub struct PendingDelivery {
    topic: String,
    future: DeliveryFuture,
    /// The record's producer span, ended when the report arrives.
    span: Option<tracing::Span>,
}

impl PendingDelivery {
    /// Waits for the delivery report.
    ///
    /// # Cancellation
    /// Dropping the future does not recall the record; it may still be
    /// delivered.
    pub async fn wait(self) -> Result<Delivered, ProduceError> {
        let result = match self.future.await {
            Ok(Ok(delivery)) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Err((source, _))) => Err(ProduceError::Delivery {
                topic: self.topic,
                source,
            }),
            Err(_) => Err(ProduceError::Canceled { topic: self.topic }),
        };
        if let Some(span) = &self.span {
            match &result {
                Ok(delivered) => {
                    span.record("messaging.destination.partition.id", delivered.partition);
                    span.record("messaging.kafka.offset", delivered.offset);
                }
                Err(error) => trace::record_error(span, "produce_failed", &error.to_string()),
            }
        }
        result
    }
}

impl JobProducer {
    pub fn new(kafka: &KafkaSettings) -> Result<Self, ProduceError> {
        let inner = producer_config(kafka)
            .create()
            .map_err(ProduceError::Create)?;
        Ok(JobProducer { inner })
    }

    /// Hands a record to librdkafka and returns its pending delivery. When
    /// the local queue is full this waits for room rather than failing, so
    /// a fast reader applies backpressure instead of dropping records.
    ///
    /// With tracing enabled, each record gets a producer span (a child of the
    /// current span) whose context replaces the record's trace headers.
    pub async fn enqueue(&self, record: &OutgoingRecord) -> Result<PendingDelivery, ProduceError> {
        let span =
            trace::enabled().then(|| trace::send_span(&record.topic, job_id(&record.headers)));
        let kafka_headers = match &span {
            Some(span) => {
                let mut headers = record.headers.clone();
                trace::inject(span, &mut headers);
                to_kafka_headers(&headers)
            }
            None => to_kafka_headers(&record.headers),
        };
        loop {
            let mut future_record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&record.topic).headers(kafka_headers.clone());
            if let Some(key) = &record.key {
                future_record = future_record.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                future_record = future_record.payload(payload.as_slice());
            }
            match self.inner.send_result(future_record) {
                Ok(future) => {
                    return Ok(PendingDelivery {
                        topic: record.topic.clone(),
                        future,
                        span,
                    })
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => {
                    if let Some(span) = &span {
                        trace::record_error(span, "produce_failed", &source.to_string());
                    }
                    return Err(ProduceError::Delivery {
                        topic: record.topic.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Sends one record and waits until it is durable.
    pub async fn send(&self, record: &OutgoingRecord) -> Result<Delivered, ProduceError> {
        self.enqueue(record).await?.wait().await
    }

    /// Waits until every enqueued record got its delivery report.
    pub fn flush(&self, timeout: Duration) -> Result<(), ProduceError> {
        self.inner.flush(timeout).map_err(ProduceError::Flush)
    }
}
