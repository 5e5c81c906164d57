//! Records on the wire and the jobs decoded from them.
//!
//! A job is an ordinary Kafka record: key = partition key, value = payload,
//! headers = metadata. [`headers`] defines sluice's own headers; [`decode`]
//! turns a fetched [`Record`] into a [`Job`] or returns why it cannot be one.

pub mod headers;

use crate::config::PayloadFormat;
pub use headers::{HeaderList, Lineage, Origin, SluiceHeaders};

/// A record as fetched from Kafka, owned so it can outlive the poll call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch, if the record has a timestamp.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HeaderList,
}

impl Record {
    pub fn position(&self) -> Origin {
        Origin {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// One unit of work handed to a handler.
#[derive(Debug, Clone)]
pub struct Job {
    /// Stable across every hop; the dedupe key and the downstream
    /// idempotency key derive from it.
    pub id: String,
    /// Attempt number, 1 on the main topic.
    pub attempt: u32,
    /// Where the job first sat on the main topic.
    pub origin: Origin,
    /// Retry tier this copy was written for, `None` on the main topic.
    pub tier: Option<String>,
    /// Earliest start, in milliseconds since the Unix epoch (tier copies).
    pub due_ms: Option<i64>,
    /// Replay and redrive history, kept on every hop.
    pub lineage: Lineage,
    /// The record this copy was fetched from.
    pub record: Record,
}

impl Job {
    /// Returns the id its dedupe key is built from: the job id, plus the replay
    /// generation when a `--dedupe bypass` replay made this copy.
    pub fn dedupe_id(&self) -> std::borrow::Cow<'_, str> {
        match &self.lineage.replay_generation {
            Some(generation) => format!("{}#replay-{generation}", self.id).into(),
            None => self.id.as_str().into(),
        }
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.record.key.as_deref()
    }

    /// The payload bytes. A job always has a value: null values are dead
    /// letters before any handler sees them.
    pub fn payload(&self) -> &[u8] {
        self.record.value.as_deref().unwrap_or_default()
    }

    /// Headers other than sluice's own, in record order.
    pub fn user_headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.record
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with(headers::PREFIX))
            .map(|(name, value)| (name.as_str(), value.as_deref()))
    }

    /// Value of the first header named `name`, sluice headers included.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.record
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, value)| value.as_deref())
    }
}

/// Why a record cannot become a job. Each variant has a bounded error class
/// that the dead-letter copy carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("record has a null value")]
    NullValue,
    #[error("payload is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("record has {size} bytes (key, payload and headers), more than worker.max_record_bytes ({max})")]
    Oversized { size: usize, max: usize },
    #[error(transparent)]
    InvalidHeader(#[from] headers::HeaderError),
}

impl DecodeError {
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::NullValue => "null_value",
            DecodeError::InvalidUtf8(_) => "invalid_utf8",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::InvalidHeader(_) => "invalid_header",
        }
    }
}

/// What decoding needs to know about the deployment.
#[derive(Debug, Clone)]
pub struct DecodeRules {
    pub payload_format: PayloadFormat,
    pub max_record_bytes: usize,
    /// JSON pointer to the job id in the payload, when no header carries it.
    pub job_id_field: Option<String>,
}

/// A record's sluice headers and the identity of the job it carries, known
/// even when the payload is broken, so a dead letter keeps its job id.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub attempt: u32,
    pub origin: Origin,
    pub tier: Option<String>,
    pub due_ms: Option<i64>,
    pub lineage: Lineage,
}

/// Reads the identity of the job in `record` from its headers.
///
/// The job id is the `sluice-job-id` header, else the first position on the
/// main topic with its timestamp. [`decode`] may still replace that fallback with a payload field.
pub fn envelope(record: &Record) -> Result<Envelope, DecodeError> {
    let sluice = SluiceHeaders::decode(&record.headers)?;
    let origin = sluice.origin.unwrap_or_else(|| record.position());
    let id = sluice.job_id.unwrap_or_else(|| fallback_id(&origin));
    Ok(Envelope {
        id,
        attempt: sluice.attempt.unwrap_or(1).max(1),
        origin,
        tier: sluice.tier,
        due_ms: sluice.due_ms,
        lineage: sluice.lineage,
    })
}

/// The job id of a record that carries none: its first position, with its
/// timestamp so that a topic deleted and created again does not reuse the
/// ids (and done markers) of the old one.
fn fallback_id(origin: &Origin) -> String {
    match origin.timestamp_ms {
        Some(timestamp) => format!("{origin}:{timestamp}"),
        None => origin.to_string(),
    }
}

/// Turns a fetched record into a job, or explains why it is undecodable.
pub fn decode(record: Record, rules: &DecodeRules) -> Result<Job, (Record, DecodeError)> {
    let envelope = match envelope(&record) {
        Ok(envelope) => envelope,
        Err(error) => return Err((record, error)),
    };
    let has_id_header = record.headers.iter().any(|(n, _)| n == headers::JOB_ID);
    let payload_id = match check_payload(&record, rules) {
        Ok(payload_id) => payload_id,
        Err(error) => return Err((record, error)),
    };
    let id = match payload_id {
        Some(id) if !has_id_header => id,
        _ => envelope.id,
    };
    Ok(Job {
        id,
        attempt: envelope.attempt,
        origin: envelope.origin,
        tier: envelope.tier,
        due_ms: envelope.due_ms,
        lineage: envelope.lineage,
        record,
    })
}

/// Checks the payload against the rules and returns the job id found at the
/// configured JSON pointer, if any.
fn check_payload(record: &Record, rules: &DecodeRules) -> Result<Option<String>, DecodeError> {
    let Some(value) = record.value.as_deref() else {
        return Err(DecodeError::NullValue);
    };
    let size = record_size(record);
    if size > rules.max_record_bytes {
        return Err(DecodeError::Oversized {
            size,
            max: rules.max_record_bytes,
        });
    }
    if rules.payload_format == PayloadFormat::Bytes {
        return Ok(None);
    }
    let text = std::str::from_utf8(value).map_err(|e| DecodeError::InvalidUtf8(e.to_string()))?;
    let Some(pointer) = rules.job_id_field.as_deref() else {
        // Validation only: skipping the values costs far less than building
        // a tree of them.
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
        return Ok(None);
    };
    let parsed: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let id = parsed
        .pointer(pointer)
        .and_then(json_scalar_to_string)
        .filter(|id| !id.is_empty());
    Ok(id)
}

/// Bytes of a record's key, value and headers: what its copies must fit
/// into, before the sluice headers they add.
pub fn record_size(record: &Record) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.as_ref().map_or(0, Vec::len))
        .sum();
    record.key.as_ref().map_or(0, Vec::len) + record.value.as_ref().map_or(0, Vec::len) + headers
}

/// Renders a JSON string or number as a job id or key; other types have no
/// stable text form and yield `None`.
pub fn json_scalar_to_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(format: PayloadFormat) -> DecodeRules {
        DecodeRules {
            payload_format: format,
            max_record_bytes: 64,
            job_id_field: Some("/id".into()),
        }
    }

    fn record(value: Option<&[u8]>) -> Record {
        Record {
            topic: "jobs".into(),
            partition: 2,
            offset: 17,
            timestamp_ms: Some(5),
            key: Some(b"k".to_vec()),
            value: value.map(<[u8]>::to_vec),
            headers: vec![],
        }
    }

    #[test]
    fn job_id_comes_from_header_then_payload_then_position() {
        let job = decode(record(Some(br#"{"id":42}"#)), &rules(PayloadFormat::Json)).unwrap();
        assert_eq!(job.id, "42");
        assert_eq!(job.attempt, 1);

        let mut with_header = record(Some(br#"{"id":42}"#));
        with_header
            .headers
            .push((headers::JOB_ID.into(), Some(b"h-1".to_vec())));
        let job = decode(with_header, &rules(PayloadFormat::Json)).unwrap();
        assert_eq!(job.id, "h-1");

        let job = decode(record(Some(b"{}")), &rules(PayloadFormat::Json)).unwrap();
        assert_eq!(job.id, "jobs/2@17:5");
    }

    #[test]
    fn bad_payloads_get_their_class() {
        let json = rules(PayloadFormat::Json);
        let class = |value: Option<&[u8]>| decode(record(value), &json).unwrap_err().1.class();
        assert_eq!(class(None), "null_value");
        assert_eq!(class(Some(&[0xff, 0xfe])), "invalid_utf8");
        assert_eq!(class(Some(b"{not json")), "invalid_json");
        assert_eq!(class(Some(&[b' '; 65])), "oversized");
    }

    #[test]
    fn bytes_format_accepts_any_value_but_null() {
        let bytes = rules(PayloadFormat::Bytes);
        assert!(decode(record(Some(&[0xff])), &bytes).is_ok());
        assert_eq!(
            decode(record(None), &bytes).unwrap_err().1,
            DecodeError::NullValue
        );
    }

    #[test]
    fn undecodable_record_is_returned_whole() {
        let original = record(Some(b"{oops"));
        let (back, _) = decode(original.clone(), &rules(PayloadFormat::Json)).unwrap_err();
        assert_eq!(back, original);
    }
}
