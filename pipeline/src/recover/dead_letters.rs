//! Dead-letter inspection and redrive.
//!
//! A redrive republishes dead letters to the main topic, attempt reset, with
//! the dead letter's position in `sluice-redrive-source` and the job's
//! redrive count raised by one. A cursor keeps the same dead letter from
//! being redriven twice by accident: a consumer group of its own,
//! `sluice-redrive.<dead-letter topic>`, whose committed offset per
//! partition is the first dead letter not yet redriven. A filtered redrive
//! may redrive dead letters beyond a record it left out; those offsets are
//! stored in the commit's metadata until the cursor passes them. A running
//! redrive is a member of that group, so a second one refuses to start.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::KafkaSettings;
use crate::envelope::{headers, Lineage, Origin, Record, SluiceHeaders};
use crate::kafka::{reader_config, REQUEST_TIMEOUT};
use crate::produce::{JobProducer, OutgoingRecord};
use crate::recover::{format_time, RecoverError, TopicReader};

/// Kafka's default `offset.metadata.max.bytes`: the most the cursor can
/// store beside each committed offset.
const MAX_CURSOR_METADATA_BYTES: usize = 4096;

/// Returns the dead-letter topic of `topic`: `topic` itself when it already ends
/// in `.dlq`, else `<topic>.dlq`.
pub fn dlq_topic(topic: &str) -> String {
    if topic.ends_with(".dlq") {
        topic.to_owned()
    } else {
        format!("{topic}.dlq")
    }
}

/// Returns the consumer group that stores the redrive cursor of `dlq_topic`.
pub fn cursor_group(dlq_topic: &str) -> String {
    format!("sluice-redrive.{dlq_topic}")
}

/// One dead letter, decoded for display.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// When the dead letter was written.
    pub timestamp_ms: Option<i64>,
    pub job_id: Option<String>,
    pub key: Option<String>,
    pub attempt: Option<u32>,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// The job's first position on the main topic.
    pub origin: Option<String>,
    pub origin_timestamp_ms: Option<i64>,
    /// Times the job was redriven before it dead-lettered this time.
    pub redrive_count: u32,
    pub replay_source: Option<String>,
    #[serde(skip)]
    pub record: Record,
}

impl DeadLetter {
    pub fn from_record(record: Record) -> DeadLetter {
        let sluice = SluiceHeaders::decode(&record.headers).unwrap_or_default();
        let origin: Option<&Origin> = sluice.origin.as_ref();
        DeadLetter {
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            job_id: sluice.job_id.clone(),
            key: record
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            attempt: sluice.attempt,
            error_class: sluice.error_class.clone(),
            error_message: sluice.error_message.clone(),
            origin: origin.map(ToString::to_string),
            origin_timestamp_ms: origin.and_then(|o| o.timestamp_ms),
            redrive_count: sluice.lineage.redrive_count.unwrap_or(0),
            replay_source: sluice.lineage.replay_source.clone(),
            record,
        }
    }

    /// Payload as text when it is UTF-8.
    pub fn payload_text(&self) -> Option<String> {
        let value = self.record.value.as_deref()?;
        Some(String::from_utf8_lossy(value).into_owned())
    }

    pub fn time(&self) -> String {
        self.timestamp_ms.map(format_time).unwrap_or_default()
    }
}

/// Which dead letters an operation applies to. Empty fields match all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Dead letters written at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    pub error_class: Option<String>,
    pub job_id: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.since_ms.is_none() && self.error_class.is_none() && self.job_id.is_none()
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.since_ms
            .is_none_or(|since| letter.timestamp_ms.is_some_and(|t| t >= since))
            && self
                .error_class
                .as_ref()
                .is_none_or(|class| letter.error_class.as_ref() == Some(class))
            && self
                .job_id
                .as_ref()
                .is_none_or(|id| letter.job_id.as_ref() == Some(id))
    }
}

/// Lists matching dead letters in partition and offset order, up to
/// `limit`. Blocking.
pub fn list(
    kafka: &KafkaSettings,
    topic: &str,
    filter: &Filter,
    limit: Option<usize>,
) -> Result<Vec<DeadLetter>, RecoverError> {
    let reader = TopicReader::new(kafka, topic)?;
    let mut ranges = Vec::new();
    for partition in reader.partitions()? {
        let (low, high) = reader.watermarks(partition)?;
        let start = match filter.since_ms {
            Some(since) => reader.offset_for_time(partition, since)?.unwrap_or(high),
            None => low,
        };
        ranges.push((partition, start.max(low), high));
    }
    let mut out = Vec::new();
    reader.read_ranges(&ranges, |record| {
        let letter = DeadLetter::from_record(record);
        if filter.matches(&letter) {
            out.push(letter);
        }
        true
    })?;
    out.sort_by_key(|l| (l.partition, l.offset));
    if let Some(limit) = limit {
        out.truncate(limit);
    }
    Ok(out)
}

/// Finds one dead letter by position. Blocking.
pub fn show(
    kafka: &KafkaSettings,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<DeadLetter>, RecoverError> {
    let reader = TopicReader::new(kafka, topic)?;
    reader.select(Some(&[partition]))?;
    let (low, high) = reader.watermarks(partition)?;
    if offset < low || offset >= high {
        return Ok(None);
    }
    let mut found = None;
    reader.read_ranges(&[(partition, offset, offset + 1)], |record| {
        found = Some(DeadLetter::from_record(record));
        false
    })?;
    Ok(found)
}

/// Builds the redrive copy of a dead letter: back to the main topic as a
/// fresh attempt, with its history.
pub fn redrive_copy(letter: &DeadLetter, dlq_topic: &str) -> OutgoingRecord {
    let record = &letter.record;
    let decoded = SluiceHeaders::decode(&record.headers).unwrap_or_default();
    let main_topic = decoded
        .origin
        .as_ref()
        .map(|o| o.topic.clone())
        .unwrap_or_else(|| dlq_topic.trim_end_matches(".dlq").to_owned());
    let sluice = SluiceHeaders {
        job_id: decoded.job_id.clone(),
        origin: decoded.origin.clone(),
        lineage: Lineage {
            redrive_source: Some(record.position().to_string()),
            redrive_count: Some(decoded.lineage.redrive_count.unwrap_or(0) + 1),
            ..decoded.lineage
        },
        ..SluiceHeaders::default()
    };
    OutgoingRecord {
        topic: main_topic,
        key: record.key.clone(),
        payload: record.value.clone(),
        headers: headers::replace_sluice_headers(&record.headers, &sluice),
    }
}

/// The cursor of one partition: everything below `next` is redriven or
/// was passed by an unfiltered redrive; `beyond` are redriven offsets at or
/// above it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub next: i64,
    pub beyond: BTreeSet<i64>,
}

impl Cursor {
    /// Marks `offset` redriven and moves `next` over the redriven prefix.
    pub fn redriven(&mut self, offset: i64) {
        self.beyond.insert(offset);
        self.advance();
    }

    /// Moves `next` past offsets that an unfiltered redrive examined.
    pub fn passed(&mut self, offset: i64) {
        if offset == self.next {
            self.next += 1;
            self.advance();
        }
    }

    fn advance(&mut self) {
        while self.beyond.remove(&self.next) {
            self.next += 1;
        }
        let next = self.next;
        self.beyond.retain(|o| *o >= next);
    }

    /// `a-b,c` ranges of the offsets beyond `next`.
    pub fn encode(&self) -> String {
        let mut parts = Vec::new();
        let mut iter = self.beyond.iter().copied().peekable();
        while let Some(first) = iter.next() {
            let mut last = first;
            while iter.peek() == Some(&(last + 1)) {
                last = iter.next().unwrap_or(last);
            }
            parts.push(if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            });
        }
        parts.join(",")
    }

    pub fn decode(next: i64, metadata: &str) -> Cursor {
        let mut beyond = BTreeSet::new();
        for part in metadata.split(',').filter(|p| !p.is_empty()) {
            let (first, last) = part.split_once('-').unwrap_or((part, part));
            if let (Ok(first), Ok(last)) = (first.parse::<i64>(), last.parse::<i64>()) {
                beyond.extend(first..=last);
            }
        }
        let mut cursor = Cursor { next, beyond };
        cursor.advance();
        cursor
    }
}

/// What a redrive did or would do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveSummary {
    pub dlq_topic: String,
    pub cursor_group: String,
    pub dry_run: bool,
    /// Dead letters examined (from the cursor to the log end).
    pub examined: u64,
    pub redriven: u64,
    /// Skipped because an earlier redrive already sent them.
    pub already_redriven: u64,
    /// Left out by the filters; a later redrive can still send them.
    pub not_matched: u64,
    pub redriven_job_ids: Vec<String>,
    pub elapsed_s: f64,
}

/// Membership of the cursor group for the length of one redrive. Holding it
/// makes a second redrive of the same topic refuse to start, and it commits
/// the cursor after every delivery, so a killed redrive repeats at most the
/// dead letter it was sending.
struct CursorLease {
    consumer: Arc<BaseConsumer>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
    topic: String,
    brokers: String,
}

impl CursorLease {
    /// Joins the cursor group after checking that it has no other member.
    /// Blocking.
    fn acquire(kafka: &KafkaSettings, dlq_topic: &str) -> Result<CursorLease, RecoverError> {
        let group = cursor_group(dlq_topic);
        let holders = crate::recover::group::members(kafka, &group)?;
        if !holders.is_empty() {
            let names: Vec<String> = holders
                .iter()
                .map(|m| format!("{} on {}", m.client_id, m.host))
                .collect();
            return Err(RecoverError::RedriveRunning {
                topic: dlq_topic.to_owned(),
                holders: names.join(", "),
            });
        }
        let mut config = reader_config(kafka);
        config
            .set("group.id", &group)
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer = config.create().map_err(RecoverError::Client)?;
        let request_error = |operation, source| RecoverError::Request {
            operation,
            topic: dlq_topic.to_owned(),
            brokers: kafka.brokers.clone(),
            source,
        };
        consumer
            .subscribe(&[dlq_topic])
            .map_err(|e| request_error("join the redrive cursor group", e))?;
        // Poll until the group hands this member its partitions; records it
        // fetches are ignored (the redrive reads with its own reader).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let _ = consumer.poll(Duration::from_millis(100));
            let assigned = consumer
                .assignment()
                .map_err(|e| request_error("join the redrive cursor group", e))?;
            if assigned.count() > 0 {
                let _ = consumer.pause(&assigned);
                break;
            }
            if Instant::now() >= deadline {
                return Err(request_error(
                    "join the redrive cursor group in time",
                    rdkafka::error::KafkaError::Canceled,
                ));
            }
        }
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (consumer.clone(), stop.clone());
        // Polling keeps the membership alive while the redrive sends.
        let poller = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let _ = polled.poll(Duration::from_millis(100));
            }
        });
        Ok(CursorLease {
            consumer,
            stop,
            poller: Some(poller),
            topic: dlq_topic.to_owned(),
            brokers: kafka.brokers.clone(),
        })
    }

    /// Commits one partition's cursor. Blocking.
    fn commit(&self, partition: i32, cursor: &Cursor) -> Result<(), RecoverError> {
        let metadata = cursor.encode();
        if metadata.len() > MAX_CURSOR_METADATA_BYTES {
            return Err(RecoverError::CursorFull {
                topic: self.topic.clone(),
                partition,
                count: cursor.beyond.len(),
            });
        }
        let error = |source| RecoverError::Request {
            operation: "advance the redrive cursor",
            topic: self.topic.clone(),
            brokers: self.brokers.clone(),
            source,
        };
        let mut list = TopicPartitionList::new();
        let mut element = list.add_partition(&self.topic, partition);
        element
            .set_offset(Offset::Offset(cursor.next))
            .map_err(error)?;
        element.set_metadata(metadata);
        self.consumer.commit(&list, CommitMode::Sync).map_err(error)
    }
}

impl Drop for CursorLease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}

fn read_cursors(
    kafka: &KafkaSettings,
    dlq_topic: &str,
    partitions: &[(i32, i64)],
) -> Result<Vec<Cursor>, RecoverError> {
    let mut config = reader_config(kafka);
    config.set("group.id", cursor_group(dlq_topic));
    let consumer: BaseConsumer = config.create().map_err(RecoverError::Client)?;
    let mut list = TopicPartitionList::new();
    for (partition, _) in partitions {
        list.add_partition(dlq_topic, *partition);
    }
    let committed = consumer
        .committed_offsets(list, REQUEST_TIMEOUT)
        .map_err(|source| RecoverError::Request {
            operation: "read the redrive cursor",
            topic: dlq_topic.to_owned(),
            brokers: kafka.brokers.clone(),
            source,
        })?;
    Ok(partitions
        .iter()
        .map(|(partition, log_start)| {
            let element = committed.find_partition(dlq_topic, *partition);
            match element
                .as_ref()
                .map(|e| (e.offset(), e.metadata().to_owned()))
            {
                Some((Offset::Offset(next), metadata)) => {
                    Cursor::decode(next.max(*log_start), &metadata)
                }
                _ => Cursor {
                    next: *log_start,
                    beyond: BTreeSet::new(),
                },
            }
        })
        .collect())
}

/// Redrives matching dead letters from the cursor to the log end. With
/// `dry_run` it only counts and writes nothing.
pub async fn redrive(
    kafka: &KafkaSettings,
    topic: &str,
    filter: &Filter,
    rate: Option<u32>,
    dry_run: bool,
) -> Result<RedriveSummary, RecoverError> {
    let started = Instant::now();
    let dlq = dlq_topic(topic);

    let lease = if dry_run {
        None
    } else {
        let (lease_kafka, lease_topic) = (kafka.clone(), dlq.clone());
        let lease =
            tokio::task::spawn_blocking(move || CursorLease::acquire(&lease_kafka, &lease_topic))
                .await
                .map_err(|e| RecoverError::Task(e.to_string()))??;
        Some(Arc::new(lease))
    };

    let (plan_kafka, plan_topic) = (kafka.clone(), dlq.clone());
    let (mut cursors, letters) = tokio::task::spawn_blocking(move || -> Result<_, RecoverError> {
        let reader = TopicReader::new(&plan_kafka, &plan_topic)?;
        let mut partitions = Vec::new();
        for partition in reader.partitions()? {
            partitions.push((partition, reader.watermarks(partition)?));
        }
        let starts: Vec<(i32, i64)> = partitions.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let cursors = read_cursors(&plan_kafka, &plan_topic, &starts)?;
        let ranges: Vec<(i32, i64, i64)> = partitions
            .iter()
            .zip(&cursors)
            .map(|((p, (_, high)), cursor)| (*p, cursor.next, *high))
            .collect();
        let mut letters = Vec::new();
        reader.read_ranges(&ranges, |record| {
            letters.push(DeadLetter::from_record(record));
            true
        })?;
        let cursors: Vec<(i32, Cursor)> = partitions.iter().map(|(p, _)| *p).zip(cursors).collect();
        Ok((cursors, letters))
    })
    .await
    .map_err(|e| RecoverError::Task(e.to_string()))??;

    let mut summary = RedriveSummary {
        dlq_topic: dlq.clone(),
        cursor_group: cursor_group(&dlq),
        dry_run,
        ..RedriveSummary::default()
    };
    let producer = if dry_run {
        None
    } else {
        Some(JobProducer::new(kafka)?)
    };
    let pause = rate.map(|rate| Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut next_send = Instant::now();
    for letter in &letters {
        summary.examined += 1;
        let Some((partition, cursor)) = cursors.iter_mut().find(|(p, _)| *p == letter.partition)
        else {
            continue;
        };
        if letter.offset < cursor.next || cursor.beyond.contains(&letter.offset) {
            summary.already_redriven += 1;
            continue;
        }
        if !filter.matches(letter) {
            summary.not_matched += 1;
            continue;
        }
        summary.redriven += 1;
        summary
            .redriven_job_ids
            .push(letter.job_id.clone().unwrap_or_default());
        let (Some(producer), Some(lease)) = (&producer, &lease) else {
            continue;
        };
        if let Some(pause) = pause {
            tokio::time::sleep_until(next_send.into()).await;
            next_send = next_send.max(Instant::now() - pause) + pause;
        }
        // One at a time, and the cursor moves past each copy once it is
        // durable.
        producer.send(&redrive_copy(letter, &dlq)).await?;
        cursor.redriven(letter.offset);
        let (lease, partition, snapshot) = (lease.clone(), *partition, cursor.clone());
        tokio::task::spawn_blocking(move || lease.commit(partition, &snapshot))
            .await
            .map_err(|e| RecoverError::Task(e.to_string()))??;
    }
    if let Some(lease) = lease {
        tokio::task::spawn_blocking(move || drop(lease))
            .await
            .map_err(|e| RecoverError::Task(e.to_string()))?;
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_advances_over_redriven_prefix_only() {
        let mut cursor = Cursor {
            next: 10,
            beyond: BTreeSet::new(),
        };
        cursor.redriven(12);
        cursor.redriven(13);
        assert_eq!(cursor.next, 10);
        assert_eq!(cursor.encode(), "12-13");
        cursor.redriven(10);
        assert_eq!(cursor.next, 11);
        cursor.passed(11);
        assert_eq!(cursor.next, 14);
        assert_eq!(cursor.encode(), "");
    }

    #[test]
    fn cursor_metadata_round_trips() {
        let cursor = Cursor::decode(5, "7-9,12");
        assert_eq!(cursor.beyond, BTreeSet::from([7, 8, 9, 12]));
        assert_eq!(Cursor::decode(5, &cursor.encode()), cursor);
        // Offsets the cursor passed are dropped from the metadata.
        assert_eq!(Cursor::decode(8, "7-9").next, 10);
    }

    #[test]
    fn dlq_topic_accepts_main_or_dlq_name() {
        assert_eq!(dlq_topic("jobs"), "jobs.dlq");
        assert_eq!(dlq_topic("jobs.dlq"), "jobs.dlq");
    }
}
