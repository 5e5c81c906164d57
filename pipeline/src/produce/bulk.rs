//! A producer for large inputs: delivery reports are counted in librdkafka's
//! callback instead of one future per record, which is what `sluice produce`
//! needs to keep up with the raw client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::config::KafkaSettings;
use crate::kafka::{producer_config, to_kafka_headers};
use crate::produce::{job_id, OutgoingRecord, ProduceError};
use crate::telemetry::trace;

/// Delivery reports so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub delivered: u64,
    pub failed: u64,
    /// Tag of the first failed record and its error.
    pub first_failure: Option<(u64, String)>,
}

/// Counts delivery reports; runs on librdkafka's polling thread.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<(u64, String)>>,
}

impl ClientContext for Tally {}

impl ProducerContext for Tally {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_failure.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| (tag as u64, error.to_string()));
            }
        }
    }
}

/// An idempotent `acks=all` producer that tallies delivery reports. Sends
/// are blocking, so run it on a blocking thread.
pub struct BulkProducer {
    inner: ThreadedProducer<Tally>,
}

impl BulkProducer {
    pub fn new(kafka: &KafkaSettings) -> Result<Self, ProduceError> {
        let inner = producer_config(kafka)
            .create_with_context(Tally::default())
            .map_err(ProduceError::Create)?;
        Ok(BulkProducer { inner })
    }

    /// Hands `record` to librdkafka; `tag` (a line number, say) names it in
    /// [`Totals::first_failure`]. Waits while the local queue is full. An
    /// error here means librdkafka refused the record outright (too large,
    /// for example); delivery failures show up in [`BulkProducer::flush`].
    pub fn send(&self, record: &OutgoingRecord, tag: u64) -> Result<(), ProduceError> {
        let headers = if trace::enabled() {
            let span = trace::send_span(&record.topic, job_id(&record.headers));
            let mut headers = record.headers.clone();
            trace::inject(&span, &mut headers);
            to_kafka_headers(&headers)
        } else {
            to_kafka_headers(&record.headers)
        };
        let mut base: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&record.topic, tag as usize).headers(headers);
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(payload) = &record.payload {
            base = base.payload(payload.as_slice());
        }
        loop {
            match self.inner.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    base = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((source, _)) => {
                    return Err(ProduceError::Delivery {
                        topic: record.topic.clone(),
                        source,
                    })
                }
            }
        }
    }

    pub fn totals(&self) -> Totals {
        let tally = self.inner.context();
        Totals {
            delivered: tally.delivered.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            first_failure: tally
                .first_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Waits until every sent record has its delivery report and returns
    /// the totals.
    pub fn flush(&self, timeout: Duration) -> Result<Totals, ProduceError> {
        self.inner.flush(timeout).map_err(ProduceError::Flush)?;
        Ok(self.totals())
    }
}
