//! Replay: republish a range of a topic so workers run it again.
//!
//! The range is resolved per partition before anything is written: the
//! start is inclusive, the end exclusive. A start below the log start is
//! clamped to it (the records before were deleted by retention). A start
//! time after the last record of a partition replays nothing there, never
//! the whole log. The end defaults to the log end at planning time, so a
//! replay ends even while producers keep writing.
//!
//! Each copy keeps its key, payload and user headers byte for byte, keeps
//! its job id and first position, starts again at attempt 1, and records
//! where it came from in `sluice-replay-source`. With
//! [`DedupeMode::Bypass`] it also carries a fresh replay generation, which
//! is part of the dedupe key: jobs already done run again, once per replay.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::KafkaSettings;
use crate::envelope::{headers, Lineage, Record, SluiceHeaders};
use crate::produce::{JobProducer, OutgoingRecord};
use crate::recover::{RecoverError, TopicReader};

/// Where a replay starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Offset(i64),
    /// First record at or after this time (milliseconds since the epoch).
    Time(i64),
}

/// Where a replay stops (exclusive) in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Offset(i64),
    /// First record at or after this time is not replayed.
    Time(i64),
    /// The log end when the plan is made.
    LogEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupeMode {
    /// Keep job ids as they are: jobs already done are skipped by workers.
    Respect,
    /// Give the copies a new replay generation: workers run them again.
    Bypass,
}

#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub topic: String,
    /// `None` for every partition.
    pub partitions: Option<Vec<i32>>,
    pub start: Start,
    pub end: End,
    /// Target topic; `None` for the source topic itself.
    pub into: Option<String>,
    pub dedupe: DedupeMode,
    /// Records per second, `None` for as fast as the producer goes.
    pub rate: Option<u32>,
}

/// The resolved range of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionPlan {
    pub partition: i32,
    pub log_start: i64,
    pub log_end: i64,
    /// First offset replayed.
    pub start: i64,
    /// First offset not replayed.
    pub end: i64,
    /// Records the requested start asked for that retention deleted.
    pub lost_to_retention: i64,
    /// Why a partition replays nothing or less than asked, for the operator.
    pub note: Option<String>,
}

impl PartitionPlan {
    /// Offsets in the range; records can be fewer where the log holds
    /// transaction markers or was compacted.
    pub fn count(&self) -> i64 {
        (self.end - self.start).max(0)
    }
}

/// Resolves the range of `partition` from its watermarks and the broker's
/// offset-for-time lookups. Pure, so the rules are testable without Kafka.
pub fn resolve(
    partition: i32,
    (log_start, log_end): (i64, i64),
    start: Result<i64, &'static str>,
    end: i64,
) -> PartitionPlan {
    let mut plan = PartitionPlan {
        partition,
        log_start,
        log_end,
        start: log_end,
        end: log_end,
        lost_to_retention: 0,
        note: None,
    };
    if log_start >= log_end {
        plan.note = Some("empty partition: nothing to replay".to_owned());
        return plan;
    }
    let start = match start {
        Ok(start) => start,
        Err(reason) => {
            plan.note = Some(reason.to_owned());
            return plan;
        }
    };
    let mut first = start;
    if start < log_start {
        plan.lost_to_retention = log_start - start;
        plan.note = Some(format!(
            "start {start} is below the log start {log_start}: {} record(s) were deleted by retention; starting at {log_start}",
            log_start - start
        ));
        first = log_start;
    }
    let end = end.min(log_end);
    if first >= log_end {
        plan.note = Some(format!(
            "start {first} is at or past the log end {log_end}: nothing to replay"
        ));
        return plan;
    }
    if first >= end {
        plan.start = first;
        plan.end = first;
        plan.note = Some(format!(
            "the end {end} is at or before the start {first}: nothing to replay"
        ));
        return plan;
    }
    plan.start = first;
    plan.end = end;
    plan
}

/// Resolves the request into exact per-partition ranges. Blocking.
pub fn plan(
    kafka: &KafkaSettings,
    request: &ReplayRequest,
) -> Result<Vec<PartitionPlan>, RecoverError> {
    let reader = TopicReader::new(kafka, &request.topic)?;
    let mut plans = Vec::new();
    for partition in reader.select(request.partitions.as_deref())? {
        let watermarks = reader.watermarks(partition)?;
        let start = match request.start {
            Start::Offset(offset) => Ok(offset),
            Start::Time(time) => reader
                .offset_for_time(partition, time)?
                .ok_or("the start time is after the last record: nothing to replay"),
        };
        let end = match request.end {
            End::Offset(offset) => offset,
            End::LogEnd => watermarks.1,
            End::Time(time) => reader
                .offset_for_time(partition, time)?
                .unwrap_or(watermarks.1),
        };
        plans.push(resolve(partition, watermarks, start, end));
    }
    Ok(plans)
}

/// First and last record of a planned range, as a dry run shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RangeEnds {
    pub partition: i32,
    pub first_offset: Option<i64>,
    pub first_timestamp_ms: Option<i64>,
    pub last_offset: Option<i64>,
    pub last_timestamp_ms: Option<i64>,
}

/// Reads the first and last record of each planned range. Blocking.
pub fn range_ends(
    kafka: &KafkaSettings,
    topic: &str,
    plans: &[PartitionPlan],
) -> Result<Vec<RangeEnds>, RecoverError> {
    let mut out = Vec::new();
    for plan in plans {
        let mut ends = RangeEnds {
            partition: plan.partition,
            ..RangeEnds::default()
        };
        if plan.count() > 0 {
            for (offset, first) in [(plan.start, true), (plan.end - 1, false)] {
                let reader = TopicReader::new(kafka, topic)?;
                reader.read_ranges(&[(plan.partition, offset, plan.end)], |record| {
                    if first {
                        ends.first_offset = Some(record.offset);
                        ends.first_timestamp_ms = record.timestamp_ms;
                    } else {
                        ends.last_offset = Some(record.offset);
                        ends.last_timestamp_ms = record.timestamp_ms;
                    }
                    false
                })?;
            }
        }
        out.push(ends);
    }
    Ok(out)
}

/// Builds the replay copy of `record` for `target`.
pub fn replay_copy(record: &Record, target: &str, generation: Option<&str>) -> OutgoingRecord {
    let source = record.position();
    let headers = match SluiceHeaders::decode(&record.headers) {
        Ok(decoded) => {
            let sluice = SluiceHeaders {
                job_id: decoded.job_id,
                // Keeping the first position keeps the job id of a record
                // that had none: workers derive it from this position.
                origin: Some(decoded.origin.unwrap_or(source.clone())),
                lineage: Lineage {
                    replay_source: Some(source.to_string()),
                    replay_generation: generation.map(str::to_owned),
                    ..decoded.lineage
                },
                ..SluiceHeaders::default()
            };
            headers::replace_sluice_headers(&record.headers, &sluice)
        }
        // Unreadable sluice headers pass through as they are, so the worker
        // dead-letters the copy with the same reason as the original.
        Err(_) => {
            let mut headers = record.headers.clone();
            headers.push((
                headers::REPLAY_SOURCE.to_owned(),
                Some(source.to_string().into_bytes()),
            ));
            headers
        }
    };
    OutgoingRecord {
        topic: target.to_owned(),
        key: record.key.clone(),
        payload: record.value.clone(),
        headers,
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    pub target: String,
    pub replayed: u64,
    pub per_partition: Vec<(i32, u64)>,
    pub generation: Option<String>,
    pub elapsed_s: f64,
}

/// Replays the planned ranges into the target topic, waiting for every
/// delivery report. `progress` is called with the running count.
pub async fn execute(
    kafka: &KafkaSettings,
    request: &ReplayRequest,
    plans: &[PartitionPlan],
    progress: impl Fn(u64),
) -> Result<ReplaySummary, RecoverError> {
    let started = Instant::now();
    let target = request
        .into
        .clone()
        .unwrap_or_else(|| request.topic.clone());
    let generation = match request.dedupe {
        DedupeMode::Respect => None,
        DedupeMode::Bypass => Some(format!(
            "{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            rand::random::<u16>()
        )),
    };
    let producer = JobProducer::new(kafka)?;

    // A blocking thread reads; this task produces. The channel bounds what
    // is read ahead of the producer.
    let (sender, mut receiver) = mpsc::channel::<Record>(1024);
    let ranges: Vec<(i32, i64, i64)> = plans
        .iter()
        .map(|p| (p.partition, p.start, p.end))
        .collect();
    let (reader_kafka, topic) = (kafka.clone(), request.topic.clone());
    let reading = tokio::task::spawn_blocking(move || {
        let reader = TopicReader::new(&reader_kafka, &topic)?;
        reader.read_ranges(&ranges, |record| sender.blocking_send(record).is_ok())
    });

    let pause = request
        .rate
        .map(|rate| Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut next_send = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut per_partition: Vec<(i32, u64)> = plans.iter().map(|p| (p.partition, 0)).collect();
    let mut replayed = 0u64;
    while let Some(record) = receiver.recv().await {
        if let Some(pause) = pause {
            tokio::time::sleep_until(next_send.into()).await;
            next_send = next_send.max(Instant::now() - pause) + pause;
        }
        let copy = replay_copy(&record, &target, generation.as_deref());
        pending.push(producer.enqueue(&copy).await?.wait());
        if let Some(entry) = per_partition
            .iter_mut()
            .find(|(p, _)| *p == record.partition)
        {
            entry.1 += 1;
        }
        replayed += 1;
        if replayed % 1000 == 0 {
            progress(replayed);
        }
        while pending.len() >= 10_000 {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    reading
        .await
        .map_err(|e| RecoverError::Task(e.to_string()))??;
    progress(replayed);
    Ok(ReplaySummary {
        target,
        replayed,
        per_partition,
        generation,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_inclusive_end_exclusive() {
        let plan = resolve(0, (0, 100), Ok(10), 20);
        assert_eq!((plan.start, plan.end, plan.count()), (10, 20, 10));
        assert_eq!(plan.note, None);
    }

    #[test]
    fn end_is_capped_at_the_log_end() {
        let plan = resolve(0, (0, 15), Ok(10), 20);
        assert_eq!((plan.start, plan.end), (10, 15));
    }

    #[test]
    fn start_below_log_start_is_clamped_and_counted() {
        let plan = resolve(1, (40, 100), Ok(10), 100);
        assert_eq!((plan.start, plan.end), (40, 100));
        assert_eq!(plan.lost_to_retention, 30);
        assert!(plan.note.unwrap().contains("deleted by retention"));
    }

    #[test]
    fn time_after_last_record_replays_nothing() {
        let plan = resolve(
            2,
            (0, 100),
            Err("the start time is after the last record: nothing to replay"),
            100,
        );
        assert_eq!(plan.count(), 0);
        assert!(plan.note.unwrap().contains("after the last record"));
    }

    #[test]
    fn empty_partition_replays_nothing() {
        let plan = resolve(3, (7, 7), Ok(0), 7);
        assert_eq!(plan.count(), 0);
        assert!(plan.note.unwrap().contains("empty partition"));
    }

    #[test]
    fn start_past_end_replays_nothing() {
        let plan = resolve(0, (0, 100), Ok(50), 40);
        assert_eq!(plan.count(), 0);
    }

    #[test]
    fn copy_keeps_identity_and_resets_attempt() {
        let record = Record {
            topic: "jobs.retry-30s".into(),
            partition: 2,
            offset: 9,
            timestamp_ms: Some(5),
            key: Some(b"k".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: SluiceHeaders {
                job_id: Some("j-1".into()),
                attempt: Some(2),
                tier: Some("retry-30s".into()),
                due_ms: Some(99),
                origin: Some(crate::envelope::Origin {
                    topic: "jobs".into(),
                    partition: 1,
                    offset: 3,
                    timestamp_ms: Some(4),
                }),
                ..SluiceHeaders::default()
            }
            .encode()
            .into_iter()
            .chain([("user".to_owned(), Some(b"u".to_vec()))])
            .collect(),
        };
        let copy = replay_copy(&record, "jobs", Some("g1"));
        let decoded = SluiceHeaders::decode(&copy.headers).unwrap();
        assert_eq!(decoded.job_id.as_deref(), Some("j-1"));
        assert_eq!(decoded.attempt, None);
        assert_eq!(decoded.due_ms, None);
        assert_eq!(decoded.origin.unwrap().offset, 3);
        assert_eq!(
            decoded.lineage.replay_source.as_deref(),
            Some("jobs.retry-30s/2@9")
        );
        assert_eq!(decoded.lineage.replay_generation.as_deref(), Some("g1"));
        assert!(copy
            .headers
            .contains(&("user".to_owned(), Some(b"u".to_vec()))));
        assert_eq!(copy.key, record.key);
        assert_eq!(copy.payload, record.value);
    }
}
