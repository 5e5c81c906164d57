//! Bookkeeping of the partitions a member owns: offset trackers, key lanes,
//! delayed (paused) tier partitions and backpressure.
//!
//! Everything here is plain data behind one mutex. The poll thread admits
//! records and runs housekeeping; lane tasks take records and report them
//! terminal. Methods return [`Effect`]s instead of calling Kafka, so the
//! rules are testable without a broker.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::consume::tracker::OffsetTracker;
use crate::envelope::{headers, Record};

/// Topic name and partition number.
pub type TopicPartition = (String, i32);

/// Records with the same key run one after the other, in offset order.
/// Records without a key promise no order, so each gets a lane of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LaneKey {
    Key(Vec<u8>),
    Unkeyed(i64),
}

impl LaneKey {
    fn of(record: &Record) -> LaneKey {
        match &record.key {
            Some(key) => LaneKey::Key(key.clone()),
            None => LaneKey::Unkeyed(record.offset),
        }
    }
}

/// What the poll thread must do after a state change.
#[derive(Debug)]
pub enum Effect {
    /// Start a task that runs the lane until it is empty.
    Spawn {
        partition: TopicPartition,
        lane: LaneKey,
        epoch: u64,
        cancel: CancellationToken,
    },
    Pause(TopicPartition),
    Resume(TopicPartition),
}

/// A tier partition held until its head record is due.
#[derive(Debug)]
struct Delay {
    due: Instant,
    /// The record that is not due yet, then any record fetched after it.
    held: VecDeque<Record>,
}

#[derive(Debug)]
struct PartitionState {
    /// Distinguishes this assignment from an earlier one of the same
    /// partition, so a late task of a revoked assignment changes nothing.
    epoch: u64,
    tracker: OffsetTracker,
    /// Lanes with a running task. A lane is removed by its task when empty.
    lanes: HashMap<LaneKey, VecDeque<Record>>,
    delay: Option<Delay>,
    backpressure: bool,
    paused: bool,
    /// Records of a retry tier wait for their due time; main-topic records
    /// run at once.
    is_tier: bool,
    /// Cancelled when the partition is revoked or the member stops.
    cancel: CancellationToken,
}

impl PartitionState {
    fn sync_pause(&mut self, partition: &TopicPartition, effects: &mut Vec<Effect>) {
        let want = self.delay.is_some() || self.backpressure;
        if want != self.paused {
            self.paused = want;
            effects.push(if want {
                Effect::Pause(partition.clone())
            } else {
                Effect::Resume(partition.clone())
            });
        }
    }
}

/// A partition's final commit at revoke, and what was given up.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub partition: TopicPartition,
    pub commit: Option<i64>,
    /// Fetched records that never became terminal; the next owner runs them.
    pub abandoned: usize,
}

/// State of all partitions this member owns.
#[derive(Debug)]
pub struct State {
    partitions: HashMap<TopicPartition, PartitionState>,
    next_epoch: u64,
    max_pending: usize,
}

/// Returns the due time of a tier record in milliseconds since the epoch.
/// A missing or unreadable header means due now; decoding reports the bad
/// header later.
fn due_ms(record: &Record) -> Option<i64> {
    let (_, value) = record
        .headers
        .iter()
        .find(|(name, _)| name == headers::DUE_MS)?;
    std::str::from_utf8(value.as_deref()?).ok()?.parse().ok()
}

impl State {
    /// `max_pending` records fetched and not terminal pause a partition; it
    /// resumes below half of that.
    pub fn new(max_pending: usize) -> Self {
        State {
            partitions: HashMap::new(),
            next_epoch: 1,
            max_pending,
        }
    }

    pub fn assign(&mut self, partition: TopicPartition, is_tier: bool) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.partitions
            .entry(partition)
            .or_insert_with(|| PartitionState {
                epoch,
                tracker: OffsetTracker::new(),
                lanes: HashMap::new(),
                delay: None,
                backpressure: false,
                paused: false,
                is_tier,
                cancel: CancellationToken::new(),
            });
    }

    pub fn assigned(&self) -> Vec<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }

    /// Takes a fetched record into its partition. Records of partitions this
    /// member does not own, and offsets it already tracks, are ignored.
    pub fn admit(&mut self, record: Record, now: Instant, now_ms: i64, effects: &mut Vec<Effect>) {
        let partition = (record.topic.clone(), record.partition);
        let max_pending = self.max_pending;
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        if state.cancel.is_cancelled() || !state.tracker.track(record.offset) {
            return;
        }
        Self::route(&partition, state, record, now, now_ms, effects);
        if state.tracker.in_progress() >= max_pending {
            state.backpressure = true;
        }
        state.sync_pause(&partition, effects);
    }

    fn route(
        partition: &TopicPartition,
        state: &mut PartitionState,
        record: Record,
        now: Instant,
        now_ms: i64,
        effects: &mut Vec<Effect>,
    ) {
        if let Some(delay) = &mut state.delay {
            delay.held.push_back(record);
            return;
        }
        if state.is_tier {
            if let Some(due) = due_ms(&record).filter(|due| *due > now_ms) {
                let wait = Duration::from_millis((due - now_ms) as u64);
                state.delay = Some(Delay {
                    due: now + wait,
                    held: VecDeque::from([record]),
                });
                return;
            }
        }
        let lane = LaneKey::of(&record);
        match state.lanes.get_mut(&lane) {
            Some(queue) => queue.push_back(record),
            None => {
                state.lanes.insert(lane.clone(), VecDeque::from([record]));
                effects.push(Effect::Spawn {
                    partition: partition.clone(),
                    lane,
                    epoch: state.epoch,
                    cancel: state.cancel.clone(),
                });
            }
        }
    }

    /// Takes the next record of a lane, or removes the lane when it is empty
    /// (then the lane's task ends). Returns `None` as well when the
    /// partition was revoked since the task started.
    pub fn next_record(
        &mut self,
        partition: &TopicPartition,
        lane: &LaneKey,
        epoch: u64,
    ) -> Option<Record> {
        let state = self
            .partitions
            .get_mut(partition)
            .filter(|s| s.epoch == epoch)?;
        let queue = state.lanes.get_mut(lane)?;
        match queue.pop_front() {
            Some(record) => Some(record),
            None => {
                state.lanes.remove(lane);
                None
            }
        }
    }

    /// Removes an empty lane whose task stopped early (cancelled).
    pub fn end_lane(&mut self, partition: &TopicPartition, lane: &LaneKey, epoch: u64) {
        if let Some(state) = self
            .partitions
            .get_mut(partition)
            .filter(|s| s.epoch == epoch)
        {
            state.lanes.remove(lane);
        }
    }

    /// Marks an offset terminal. Ignored for an earlier assignment.
    pub fn complete(&mut self, partition: &TopicPartition, epoch: u64, offset: i64) {
        if let Some(state) = self
            .partitions
            .get_mut(partition)
            .filter(|s| s.epoch == epoch)
        {
            state.tracker.complete(offset);
        }
    }

    /// Releases tier partitions whose head record is due and resumes
    /// partitions that drained below the backpressure mark.
    pub fn housekeeping(&mut self, now: Instant, now_ms: i64, effects: &mut Vec<Effect>) {
        let resume_below = self.max_pending / 2;
        for (partition, state) in &mut self.partitions {
            if state.cancel.is_cancelled() {
                continue;
            }
            if state.delay.as_ref().is_some_and(|delay| delay.due <= now) {
                let held = state.delay.take().map(|d| d.held).unwrap_or_default();
                for record in held {
                    Self::route(partition, state, record, now, now_ms, effects);
                }
            }
            if state.backpressure && state.tracker.in_progress() <= resume_below {
                state.backpressure = false;
            }
            state.sync_pause(partition, effects);
        }
    }

    /// The earliest time a delayed partition becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.partitions
            .values()
            .filter_map(|state| state.delay.as_ref().map(|delay| delay.due))
            .min()
    }

    /// Starts giving up `partitions`: cancels their tasks' waits and drops
    /// records that have not started. Running handlers may still finish.
    pub fn revoke(&mut self, partitions: &[TopicPartition]) {
        for partition in partitions {
            if let Some(state) = self.partitions.get_mut(partition) {
                state.cancel.cancel();
                state.delay = None;
                for queue in state.lanes.values_mut() {
                    queue.clear();
                }
            }
        }
    }

    /// Lanes of `partitions` whose task still runs.
    pub fn running_lanes(&self, partitions: &[TopicPartition]) -> usize {
        partitions
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(|state| state.lanes.len())
            .sum()
    }

    /// Forgets `partitions` and returns what to commit for each.
    pub fn remove(&mut self, partitions: &[TopicPartition]) -> Vec<Released> {
        partitions
            .iter()
            .filter_map(|partition| {
                let mut state = self.partitions.remove(partition)?;
                state.cancel.cancel();
                Some(Released {
                    partition: partition.clone(),
                    commit: state.tracker.take_commit(),
                    abandoned: state.tracker.in_progress(),
                })
            })
            .collect()
    }

    /// Offsets that moved since the last commit, per partition.
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter_mut()
            .filter_map(|(partition, state)| {
                Some((partition.clone(), state.tracker.take_commit()?))
            })
            .collect()
    }

    /// Puts back a commit that Kafka rejected, so the next round retries it.
    pub fn commit_failed(&mut self, partition: &TopicPartition, offset: i64) {
        if let Some(state) = self.partitions.get_mut(partition) {
            state.tracker.commit_failed(offset);
        }
    }

    /// Paused partitions: (waiting for a due time, under backpressure).
    pub fn paused_counts(&self) -> (usize, usize) {
        let delayed = self
            .partitions
            .values()
            .filter(|s| s.delay.is_some())
            .count();
        let pressed = self
            .partitions
            .values()
            .filter(|s| s.delay.is_none() && s.backpressure)
            .count();
        (delayed, pressed)
    }

    /// Fetched records not yet terminal, all partitions.
    pub fn in_progress(&self) -> usize {
        self.partitions
            .values()
            .map(|s| s.tracker.in_progress())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, offset: i64, key: Option<&str>, due: Option<i64>) -> Record {
        let mut headers = Vec::new();
        if let Some(due) = due {
            headers.push((
                headers::DUE_MS.to_owned(),
                Some(due.to_string().into_bytes()),
            ));
        }
        Record {
            topic: topic.into(),
            partition: 0,
            offset,
            timestamp_ms: None,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(b"{}".to_vec()),
            headers,
        }
    }

    fn spawned(effects: &[Effect]) -> usize {
        effects
            .iter()
            .filter(|e| matches!(e, Effect::Spawn { .. }))
            .count()
    }

    #[test]
    fn same_key_records_share_a_lane_in_offset_order() {
        let mut state = State::new(100);
        let partition = ("main".to_owned(), 0);
        state.assign(partition.clone(), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        state.admit(record("main", 0, Some("a"), None), now, 0, &mut effects);
        state.admit(record("main", 1, Some("b"), None), now, 0, &mut effects);
        state.admit(record("main", 2, Some("a"), None), now, 0, &mut effects);
        assert_eq!(spawned(&effects), 2);

        let lane = LaneKey::Key(b"a".to_vec());
        let epoch = match &effects[0] {
            Effect::Spawn { epoch, .. } => *epoch,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            state.next_record(&partition, &lane, epoch).unwrap().offset,
            0
        );
        assert_eq!(
            state.next_record(&partition, &lane, epoch).unwrap().offset,
            2
        );
        assert!(state.next_record(&partition, &lane, epoch).is_none());
        assert_eq!(state.running_lanes(std::slice::from_ref(&partition)), 1);
    }

    #[test]
    fn tier_record_not_due_pauses_until_due() {
        let mut state = State::new(100);
        let partition = ("main.retry-30s".to_owned(), 0);
        state.assign(partition.clone(), true);
        let now = Instant::now();
        let mut effects = Vec::new();
        state.admit(
            record(&partition.0, 5, Some("a"), Some(10_500)),
            now,
            10_000,
            &mut effects,
        );
        state.admit(
            record(&partition.0, 6, Some("b"), Some(10_100)),
            now,
            10_000,
            &mut effects,
        );
        assert!(matches!(effects.as_slice(), [Effect::Pause(_)]));
        assert_eq!(state.next_due(), Some(now + Duration::from_millis(500)));

        effects.clear();
        state.housekeeping(now + Duration::from_millis(499), 10_499, &mut effects);
        assert!(effects.is_empty());

        state.housekeeping(now + Duration::from_millis(500), 10_500, &mut effects);
        assert_eq!(spawned(&effects), 2);
        assert!(matches!(effects.last(), Some(Effect::Resume(_))));
        assert_eq!(state.next_due(), None);
    }

    #[test]
    fn backpressure_pauses_then_resumes_below_half() {
        let mut state = State::new(4);
        let partition = ("main".to_owned(), 0);
        state.assign(partition.clone(), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        for offset in 0..4 {
            state.admit(record("main", offset, None, None), now, 0, &mut effects);
        }
        assert!(matches!(effects.last(), Some(Effect::Pause(_))));
        let epoch = 1;
        state.complete(&partition, epoch, 0);
        effects.clear();
        state.housekeeping(now, 0, &mut effects);
        assert!(effects.is_empty(), "3 of 4 still pending");
        state.complete(&partition, epoch, 1);
        state.housekeeping(now, 0, &mut effects);
        assert!(matches!(effects.as_slice(), [Effect::Resume(_)]));
    }

    #[test]
    fn revoke_drops_queued_records_and_commits_prefix() {
        let mut state = State::new(100);
        let partition = ("main".to_owned(), 3);
        state.assign(partition.clone(), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        for offset in 10..13 {
            let mut r = record("main", offset, Some("k"), None);
            r.partition = 3;
            state.admit(r, now, 0, &mut effects);
        }
        let lane = LaneKey::Key(b"k".to_vec());
        let first = state.next_record(&partition, &lane, 1).unwrap();
        state.complete(&partition, 1, first.offset);
        state.revoke(std::slice::from_ref(&partition));
        assert!(state.next_record(&partition, &lane, 1).is_none());
        let released = state.remove(std::slice::from_ref(&partition));
        assert_eq!(
            released,
            vec![Released {
                partition: partition.clone(),
                commit: Some(11),
                abandoned: 2
            }]
        );
        // A late completion of the old assignment changes nothing.
        state.assign(partition.clone(), false);
        state.complete(&partition, 1, 11);
        assert!(state.take_commits().is_empty());
    }
}
