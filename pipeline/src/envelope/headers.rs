//! The sluice header schema, documented once here and in `docs/headers.md`.
//!
//! Every sluice header name starts with [`PREFIX`]. A hop (to a retry tier or
//! to the dead-letter topic) drops all headers with that prefix from the
//! source record and writes a fresh set, so each copy carries exactly one of
//! each. Other headers (user headers, `traceparent`, `tracestate`) pass
//! through byte for byte and in their original order.

use std::fmt;

/// Shared prefix of every sluice header.
pub const PREFIX: &str = "sluice-";
/// Schema version of the headers below; bumped on incompatible changes.
pub const SCHEMA_VERSION: &str = "1";

pub const VERSION: &str = "sluice-v";
pub const JOB_ID: &str = "sluice-job-id";
pub const ATTEMPT: &str = "sluice-attempt";
pub const TIER: &str = "sluice-tier";
pub const DUE_MS: &str = "sluice-due-ms";
pub const ERROR_CLASS: &str = "sluice-error-class";
pub const ERROR_MESSAGE: &str = "sluice-error";
pub const ORIGIN_TOPIC: &str = "sluice-origin-topic";
pub const ORIGIN_PARTITION: &str = "sluice-origin-partition";
pub const ORIGIN_OFFSET: &str = "sluice-origin-offset";
pub const ORIGIN_TIMESTAMP_MS: &str = "sluice-origin-timestamp-ms";
pub const REPLAY_SOURCE: &str = "sluice-replay-source";
pub const REPLAY_GENERATION: &str = "sluice-replay-generation";
pub const REDRIVE_SOURCE: &str = "sluice-redrive-source";
pub const REDRIVE_COUNT: &str = "sluice-redrive-count";

/// Error messages are cut to this many bytes (at a character boundary) so a
/// runaway handler message cannot bloat every retry copy.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// Ordered header list of one record: names with optional values, as Kafka
/// allows a header without a value.
pub type HeaderList = Vec<(String, Option<Vec<u8>>)>;

/// Where a record first sat on the main topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp in milliseconds since the Unix epoch, if it had one.
    pub timestamp_ms: Option<i64>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// The sluice headers of one record, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SluiceHeaders {
    pub job_id: Option<String>,
    /// Attempt number this copy runs as (1 on the main topic). On a dead
    /// letter it is the last attempt that ran.
    pub attempt: Option<u32>,
    /// Tier name the copy was written for, or `dlq`.
    pub tier: Option<String>,
    /// Earliest time the copy may run, in milliseconds since the Unix epoch.
    pub due_ms: Option<i64>,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub origin: Option<Origin>,
    /// Where and how a job was brought back; kept on every later hop.
    pub lineage: Lineage,
}

/// How a job was brought back by an operator. Every hop keeps it, so a dead
/// letter shows its history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// `topic/partition@offset` of the record a replay copied.
    pub replay_source: Option<String>,
    /// Set by `replay --dedupe bypass`: part of the dedupe key, so a job
    /// already done runs again once per replay.
    pub replay_generation: Option<String>,
    /// `topic/partition@offset` of the dead letter a redrive copied.
    pub redrive_source: Option<String>,
    /// How many times the job was redriven from the dead-letter topic.
    pub redrive_count: Option<u32>,
}

/// A sluice header that is present but cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid header {name}: {reason}")]
pub struct HeaderError {
    pub name: &'static str,
    pub reason: String,
}

fn text<'a>(name: &'static str, value: &'a [u8]) -> Result<&'a str, HeaderError> {
    std::str::from_utf8(value).map_err(|_| HeaderError {
        name,
        reason: "not valid UTF-8".to_owned(),
    })
}

fn number<T: std::str::FromStr>(name: &'static str, value: &[u8]) -> Result<T, HeaderError> {
    let raw = text(name, value)?;
    raw.parse().map_err(|_| HeaderError {
        name,
        reason: format!("{raw:?} is not a number"),
    })
}

impl SluiceHeaders {
    /// Decodes the sluice headers out of `headers`, ignoring all others.
    ///
    /// A record produced by another client has none of them, and that is a
    /// valid job. A header of a newer schema version is still read field by
    /// field; unknown sluice headers are ignored.
    pub fn decode(headers: &HeaderList) -> Result<SluiceHeaders, HeaderError> {
        let mut decoded = SluiceHeaders::default();
        let mut origin_topic = None;
        let mut origin_partition = None;
        let mut origin_offset = None;
        let mut origin_timestamp = None;
        for (name, value) in headers {
            if !name.starts_with(PREFIX) {
                continue;
            }
            let Some(value) = value.as_deref() else {
                continue;
            };
            match name.as_str() {
                JOB_ID => {
                    let id = text(JOB_ID, value)?;
                    if id.is_empty() {
                        return Err(HeaderError {
                            name: JOB_ID,
                            reason: "empty; a job id needs at least one character".to_owned(),
                        });
                    }
                    decoded.job_id = Some(id.to_owned());
                }
                ATTEMPT => {
                    let attempt: u32 = number(ATTEMPT, value)?;
                    if attempt == 0 {
                        return Err(HeaderError {
                            name: ATTEMPT,
                            reason: "0; attempts are numbered from 1".to_owned(),
                        });
                    }
                    decoded.attempt = Some(attempt);
                }
                TIER => decoded.tier = Some(text(TIER, value)?.to_owned()),
                DUE_MS => decoded.due_ms = Some(number(DUE_MS, value)?),
                ERROR_CLASS => decoded.error_class = Some(text(ERROR_CLASS, value)?.to_owned()),
                ERROR_MESSAGE => {
                    decoded.error_message = Some(String::from_utf8_lossy(value).into_owned())
                }
                ORIGIN_TOPIC => origin_topic = Some(text(ORIGIN_TOPIC, value)?.to_owned()),
                ORIGIN_PARTITION => origin_partition = Some(number(ORIGIN_PARTITION, value)?),
                ORIGIN_OFFSET => origin_offset = Some(number(ORIGIN_OFFSET, value)?),
                ORIGIN_TIMESTAMP_MS => origin_timestamp = Some(number(ORIGIN_TIMESTAMP_MS, value)?),
                REPLAY_SOURCE => {
                    decoded.lineage.replay_source = Some(text(REPLAY_SOURCE, value)?.to_owned())
                }
                REPLAY_GENERATION => {
                    decoded.lineage.replay_generation =
                        Some(text(REPLAY_GENERATION, value)?.to_owned())
                }
                REDRIVE_SOURCE => {
                    decoded.lineage.redrive_source = Some(text(REDRIVE_SOURCE, value)?.to_owned())
                }
                REDRIVE_COUNT => {
                    decoded.lineage.redrive_count = Some(number(REDRIVE_COUNT, value)?)
                }
                _ => {}
            }
        }
        if let (Some(topic), Some(partition), Some(offset)) =
            (origin_topic, origin_partition, origin_offset)
        {
            decoded.origin = Some(Origin {
                topic,
                partition,
                offset,
                timestamp_ms: origin_timestamp,
            });
        }
        Ok(decoded)
    }

    /// Encodes these headers, `sluice-v` first, in a fixed order.
    pub fn encode(&self) -> HeaderList {
        let mut out: HeaderList = vec![(VERSION.to_owned(), Some(SCHEMA_VERSION.into()))];
        let mut put =
            |name: &str, value: String| out.push((name.to_owned(), Some(value.into_bytes())));
        if let Some(job_id) = &self.job_id {
            put(JOB_ID, job_id.clone());
        }
        if let Some(attempt) = self.attempt {
            put(ATTEMPT, attempt.to_string());
        }
        if let Some(tier) = &self.tier {
            put(TIER, tier.clone());
        }
        if let Some(due) = self.due_ms {
            put(DUE_MS, due.to_string());
        }
        if let Some(class) = &self.error_class {
            put(ERROR_CLASS, class.clone());
        }
        if let Some(message) = &self.error_message {
            put(
                ERROR_MESSAGE,
                truncate(message, MAX_ERROR_MESSAGE_BYTES).to_owned(),
            );
        }
        if let Some(origin) = &self.origin {
            put(ORIGIN_TOPIC, origin.topic.clone());
            put(ORIGIN_PARTITION, origin.partition.to_string());
            put(ORIGIN_OFFSET, origin.offset.to_string());
            if let Some(timestamp) = origin.timestamp_ms {
                put(ORIGIN_TIMESTAMP_MS, timestamp.to_string());
            }
        }
        let lineage = &self.lineage;
        if let Some(source) = &lineage.replay_source {
            put(REPLAY_SOURCE, source.clone());
        }
        if let Some(generation) = &lineage.replay_generation {
            put(REPLAY_GENERATION, generation.clone());
        }
        if let Some(source) = &lineage.redrive_source {
            put(REDRIVE_SOURCE, source.clone());
        }
        if let Some(count) = lineage.redrive_count {
            put(REDRIVE_COUNT, count.to_string());
        }
        out
    }
}

/// Returns `headers` without any sluice header, order kept.
pub fn user_headers(headers: &HeaderList) -> HeaderList {
    headers
        .iter()
        .filter(|(name, _)| !name.starts_with(PREFIX))
        .cloned()
        .collect()
}

/// Builds the header list of a copy: the user headers of `source`, unchanged
/// and in order, followed by one fresh set of sluice headers.
pub fn replace_sluice_headers(source: &HeaderList, sluice: &SluiceHeaders) -> HeaderList {
    let mut out = user_headers(source);
    out.extend(sluice.encode());
    out
}

/// Cuts `text` to at most `max` bytes without splitting a character.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full() -> SluiceHeaders {
        SluiceHeaders {
            job_id: Some("job-1".into()),
            attempt: Some(3),
            tier: Some("retry-5m".into()),
            due_ms: Some(1_700_000_000_123),
            error_class: Some("http_503".into()),
            error_message: Some("upstream said 503".into()),
            origin: Some(Origin {
                topic: "jobs".into(),
                partition: 4,
                offset: 99,
                timestamp_ms: Some(1_699_999_999_000),
            }),
            lineage: Lineage {
                replay_source: Some("jobs/1@7".into()),
                replay_generation: Some("g-1".into()),
                redrive_source: Some("jobs.dlq/0@3".into()),
                redrive_count: Some(2),
            },
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let headers = full();
        assert_eq!(SluiceHeaders::decode(&headers.encode()).unwrap(), headers);
    }

    #[test]
    fn record_without_sluice_headers_decodes_empty() {
        let headers = vec![("traceparent".to_owned(), Some(b"00-abc".to_vec()))];
        assert_eq!(
            SluiceHeaders::decode(&headers).unwrap(),
            SluiceHeaders::default()
        );
    }

    #[test]
    fn replacing_keeps_user_headers_and_one_of_each() {
        let source: HeaderList = vec![
            ("user-a".into(), Some(vec![0, 159, 146, 150])),
            (ATTEMPT.into(), Some(b"1".to_vec())),
            ("user-b".into(), None),
            (ATTEMPT.into(), Some(b"7".to_vec())),
        ];
        let copy = replace_sluice_headers(&source, &full());
        assert_eq!(copy[0], source[0]);
        assert_eq!(copy[1], source[2]);
        let attempts: Vec<_> = copy.iter().filter(|(n, _)| n == ATTEMPT).collect();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].1.as_deref(), Some(&b"3"[..]));
        let twice = replace_sluice_headers(&copy, &full());
        assert_eq!(twice, copy);
    }

    #[test]
    fn empty_job_id_and_attempt_zero_are_invalid() {
        let empty = vec![(JOB_ID.to_owned(), Some(Vec::new()))];
        assert_eq!(SluiceHeaders::decode(&empty).unwrap_err().name, JOB_ID);
        let zero = vec![(ATTEMPT.to_owned(), Some(b"0".to_vec()))];
        assert_eq!(SluiceHeaders::decode(&zero).unwrap_err().name, ATTEMPT);
    }

    #[test]
    fn invalid_attempt_names_the_header() {
        let headers = vec![(ATTEMPT.to_owned(), Some(b"two".to_vec()))];
        let error = SluiceHeaders::decode(&headers).unwrap_err();
        assert_eq!(error.name, ATTEMPT);
        assert!(error.reason.contains("\"two\""));
    }

    #[test]
    fn long_error_message_is_cut_at_a_char_boundary() {
        let mut headers = full();
        headers.error_message = Some("é".repeat(400));
        let encoded = headers.encode();
        let (_, value) = encoded.iter().find(|(n, _)| n == ERROR_MESSAGE).unwrap();
        let value = value.as_ref().unwrap();
        assert!(value.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(std::str::from_utf8(value).is_ok());
    }

    proptest! {
        #[test]
        fn any_headers_round_trip(
            job_id in proptest::option::of(".{1,40}"),
            attempt in proptest::option::of(1u32..1000),
            due in proptest::option::of(0i64..i64::MAX),
            partition in 0i32..1000,
            offset in 0i64..i64::MAX,
        ) {
            let headers = SluiceHeaders {
                job_id,
                attempt,
                due_ms: due,
                origin: Some(Origin { topic: "t".into(), partition, offset, timestamp_ms: None }),
                ..SluiceHeaders::default()
            };
            prop_assert_eq!(SluiceHeaders::decode(&headers.encode()).unwrap(), headers);
        }

        #[test]
        fn truncate_never_splits_chars(text in ".{0,300}", max in 0usize..600) {
            let cut = truncate(&text, max);
            prop_assert!(cut.len() <= max);
            prop_assert!(text.starts_with(cut));
        }
    }
}
