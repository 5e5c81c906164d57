//! Records on the wire and the jobs decoded from them.
//!
//! A job is an ordinary Kafka record: key = partition key, value = payload,
//! headers = metadata. [`headers`] defines sluice's own headers; [`decode`]
//! turns a fetched [`Record`] into a [`Job`] or returns why it cannot be one.

pub mod headers;

use crate::config::PayloadFormat;
pub use headers::{HeaderList, Origin, SluiceHeaders};

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
    /// The record this copy was fetched from.
    pub record: Record,
}

impl Job {
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
    #[error("payload has {size} bytes, more than worker.max_payload_bytes ({max})")]
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
    pub max_payload_bytes: usize,
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
}

/// Reads the identity of the job in `record` from its headers.
///
/// The job id is the `sluice-job-id` header, else the position on the main
/// topic. [`decode`] may still replace that fallback with a payload field.
pub fn envelope(record: &Record) -> Result<Envelope, DecodeError> {
    let sluice = SluiceHeaders::decode(&record.headers)?;
    let origin = sluice.origin.unwrap_or_else(|| record.position());
    let id = sluice.job_id.unwrap_or_else(|| origin.to_string());
    Ok(Envelope {
        id,
        attempt: sluice.attempt.unwrap_or(1).max(1),
        origin,
        tier: sluice.tier,
        due_ms: sluice.due_ms,
    })
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
        record,
    })
}

/// Checks the payload against the rules and returns the job id found at the
/// configured JSON pointer, if any.
fn check_payload(record: &Record, rules: &DecodeRules) -> Result<Option<String>, DecodeError> {
    let Some(value) = record.value.as_deref() else {
        return Err(DecodeError::NullValue);
    };
    if value.len() > rules.max_payload_bytes {
        return Err(DecodeError::Oversized {
            size: value.len(),
            max: rules.max_payload_bytes,
        });
    }
    if rules.payload_format == PayloadFormat::Bytes {
        return Ok(None);
    }
    let text = std::str::from_utf8(value).map_err(|e| DecodeError::InvalidUtf8(e.to_string()))?;
    let parsed: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let id = rules
        .job_id_field
        .as_deref()
        .and_then(|pointer| parsed.pointer(pointer))
        .and_then(json_scalar_to_string);
    Ok(id)
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
            max_payload_bytes: 64,
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
        assert_eq!(job.id, "jobs/2@17");
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
