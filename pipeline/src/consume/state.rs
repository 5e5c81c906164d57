//! Bookkeeping of the partitions a member owns: offset trackers, key lanes,
//! delayed (paused) tier partitions and backpressure.
//!
//! Everything here is plain data behind one mutex. The poll thread admits
//! records and runs housekeeping; the worker pool takes records and reports
//! them terminal. Methods return [`Effect`]s instead of calling Kafka, so the
//! rules are testable without a broker.
//!
//! A lane with records is either in the ready queue or busy with one worker,
//! never both, so the records of one key run one at a time and in order.
//! The ready queue hands out the lane whose next record was fetched first,
//! so records start in fetch order even when a key has many of them, which
//! keeps the committable prefix moving.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::consume::tracker::OffsetTracker;
use crate::envelope::{headers, Record};

/// Topic name and partition number.
pub type TopicPartition = (String, i32);

/// Records with the same key run one after the other, in offset order.
/// Records without a key promise no order, so each gets a lane of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// A lane joined the ready queue: wake a worker.
    Ready,
    Pause(TopicPartition),
    Resume(TopicPartition),
}

/// One record handed to a worker, with what it needs to report back.
#[derive(Debug)]
pub struct Task {
    pub partition: TopicPartition,
    pub lane: LaneKey,
    pub epoch: u64,
    pub record: Record,
    /// Cancelled when the partition is revoked or the member stops.
    pub cancel: CancellationToken,
}

impl Task {
    /// Splits the task into its record, its cancel token, and what
    /// [`State::finish_task`] needs, so the record can move into the job.
    pub fn into_parts(self) -> (Record, CancellationToken, TaskDone) {
        let done = TaskDone {
            offset: self.record.offset,
            partition: self.partition,
            lane: self.lane,
            epoch: self.epoch,
        };
        (self.record, self.cancel, done)
    }
}

/// Identity of a finished task.
#[derive(Debug)]
pub struct TaskDone {
    pub partition: TopicPartition,
    pub lane: LaneKey,
    pub epoch: u64,
    pub offset: i64,
}

/// Lanes whose next record may start, the one fetched first on top.
#[derive(Debug, Default)]
struct ReadyQueue {
    /// (fetch sequence of the lane's next record, partition, lane, epoch)
    heap: BinaryHeap<Reverse<(u64, TopicPartition, LaneKey, u64)>>,
    next_seq: u64,
}

impl ReadyQueue {
    /// Returns the next fetch sequence number.
    fn stamp(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn push(&mut self, seq: u64, partition: TopicPartition, lane: LaneKey, epoch: u64) {
        self.heap.push(Reverse((seq, partition, lane, epoch)));
    }

    fn pop(&mut self) -> Option<(TopicPartition, LaneKey, u64)> {
        self.heap
            .pop()
            .map(|Reverse((_, partition, lane, epoch))| (partition, lane, epoch))
    }

    fn retain(&mut self, keep: impl Fn(&TopicPartition) -> bool) {
        self.heap
            .retain(|Reverse((_, partition, _, _))| keep(partition));
    }
}

/// Records of one key, waiting or running.
#[derive(Debug)]
struct Lane {
    /// Records with the fetch sequence number they were admitted with.
    queue: VecDeque<(u64, Record)>,
    /// A worker runs a record of this lane now.
    busy: bool,
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
    /// Lanes with records waiting or running; an idle empty lane is removed.
    lanes: HashMap<LaneKey, Lane>,
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
    ready: ReadyQueue,
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
            ready: ReadyQueue::default(),
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
        Self::route(
            &partition,
            state,
            record,
            now,
            now_ms,
            &mut self.ready,
            effects,
        );
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
        ready: &mut ReadyQueue,
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
        let key = LaneKey::of(&record);
        let seq = ready.stamp();
        match state.lanes.get_mut(&key) {
            Some(lane) => lane.queue.push_back((seq, record)),
            None => {
                let lane = Lane {
                    queue: VecDeque::from([(seq, record)]),
                    busy: false,
                };
                state.lanes.insert(key.clone(), lane);
                ready.push(seq, partition.clone(), key, state.epoch);
                effects.push(Effect::Ready);
            }
        }
    }

    /// Takes the next record of the oldest ready lane and marks the lane
    /// busy. Returns `None` when no lane is ready.
    pub fn next_task(&mut self) -> Option<Task> {
        while let Some((partition, key, epoch)) = self.ready.pop() {
            // Entries of a revoked assignment are stale; skip them.
            let Some(state) = self
                .partitions
                .get_mut(&partition)
                .filter(|s| s.epoch == epoch)
            else {
                continue;
            };
            let Some(lane) = state.lanes.get_mut(&key) else {
                continue;
            };
            let Some((_, record)) = lane.queue.pop_front() else {
                state.lanes.remove(&key);
                continue;
            };
            lane.busy = true;
            return Some(Task {
                partition,
                lane: key,
                epoch,
                record,
                cancel: state.cancel.clone(),
            });
        }
        None
    }

    /// Reports a task done. A terminal record's offset is marked for commit;
    /// an abandoned one stays uncommitted. The lane goes back to the ready
    /// queue when it has more records (returns `true`: wake a worker), or is
    /// removed. Ignored for an earlier assignment.
    pub fn finish_task(&mut self, task: &TaskDone, terminal: bool) -> bool {
        let Some(state) = self
            .partitions
            .get_mut(&task.partition)
            .filter(|s| s.epoch == task.epoch)
        else {
            return false;
        };
        if terminal {
            state.tracker.complete(task.offset);
        }
        let Some(lane) = state.lanes.get_mut(&task.lane) else {
            return false;
        };
        lane.busy = false;
        if lane.queue.is_empty() || state.cancel.is_cancelled() {
            state.lanes.remove(&task.lane);
            return false;
        }
        let next_seq = lane.queue.front().map_or(0, |(seq, _)| *seq);
        self.ready.push(
            next_seq,
            task.partition.clone(),
            task.lane.clone(),
            task.epoch,
        );
        true
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
                    Self::route(
                        partition,
                        state,
                        record,
                        now,
                        now_ms,
                        &mut self.ready,
                        effects,
                    );
                }
            }
            if state.backpressure && state.tracker.in_progress() <= resume_below {
                state.backpressure = false;
            }
            state.sync_pause(partition, effects);
        }
    }

    /// Returns the earliest time a delayed partition becomes due.
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
                state.lanes.retain(|_, lane| lane.busy);
                for lane in state.lanes.values_mut() {
                    lane.queue.clear();
                }
            }
        }
        self.ready
            .retain(|partition| !partitions.contains(partition));
    }

    /// Lanes of `partitions` with a record running now.
    pub fn running_lanes(&self, partitions: &[TopicPartition]) -> usize {
        partitions
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(|state| state.lanes.values().filter(|lane| lane.busy).count())
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

    fn ready(effects: &[Effect]) -> usize {
        effects.iter().filter(|e| **e == Effect::Ready).count()
    }

    #[test]
    fn same_key_records_run_one_at_a_time_in_order() {
        let mut state = State::new(100);
        state.assign(("main".to_owned(), 0), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        state.admit(record("main", 0, Some("a"), None), now, 0, &mut effects);
        state.admit(record("main", 1, Some("b"), None), now, 0, &mut effects);
        state.admit(record("main", 2, Some("a"), None), now, 0, &mut effects);
        assert_eq!(ready(&effects), 2);

        let first = state.next_task().unwrap().into_parts().2;
        let second = state.next_task().unwrap().into_parts().2;
        assert_eq!((first.offset, second.offset), (0, 1));
        assert!(
            state.next_task().is_none(),
            "offset 2 waits for offset 0 of its key"
        );

        assert!(state.finish_task(&first, true), "lane a has more");
        assert_eq!(state.next_task().unwrap().record.offset, 2);
        assert!(!state.finish_task(&second, true), "lane b is empty");
    }

    #[test]
    fn records_start_in_admission_order() {
        let mut state = State::new(100);
        state.assign(("main".to_owned(), 0), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        for offset in 0..50 {
            let key = format!("k{offset}");
            state.admit(
                record("main", offset, Some(&key), None),
                now,
                0,
                &mut effects,
            );
        }
        let order: Vec<i64> = std::iter::from_fn(|| state.next_task())
            .map(|t| t.record.offset)
            .collect();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn busy_key_keeps_its_place_in_fetch_order() {
        let mut state = State::new(100);
        state.assign(("main".to_owned(), 0), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        state.admit(record("main", 0, Some("hot"), None), now, 0, &mut effects);
        state.admit(record("main", 1, Some("hot"), None), now, 0, &mut effects);
        for offset in 2..20 {
            let key = format!("k{offset}");
            state.admit(
                record("main", offset, Some(&key), None),
                now,
                0,
                &mut effects,
            );
        }
        let first = state.next_task().unwrap().into_parts().2;
        state.finish_task(&first, true);
        // Offset 1 of the busy key was fetched before offsets 2 to 19.
        assert_eq!(state.next_task().unwrap().record.offset, 1);
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
        assert!(state.next_task().is_none());

        effects.clear();
        state.housekeeping(now + Duration::from_millis(499), 10_499, &mut effects);
        assert!(effects.is_empty());

        state.housekeeping(now + Duration::from_millis(500), 10_500, &mut effects);
        assert_eq!(ready(&effects), 2);
        assert!(matches!(effects.last(), Some(Effect::Resume(_))));
        assert_eq!(state.next_due(), None);
        assert_eq!(state.next_task().unwrap().record.offset, 5);
    }

    #[test]
    fn backpressure_pauses_then_resumes_below_half() {
        let mut state = State::new(4);
        state.assign(("main".to_owned(), 0), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        for offset in 0..4 {
            state.admit(record("main", offset, None, None), now, 0, &mut effects);
        }
        assert!(matches!(effects.last(), Some(Effect::Pause(_))));
        let first = state.next_task().unwrap().into_parts().2;
        state.finish_task(&first, true);
        effects.clear();
        state.housekeeping(now, 0, &mut effects);
        assert!(effects.is_empty(), "3 of 4 still pending");
        let second = state.next_task().unwrap().into_parts().2;
        state.finish_task(&second, true);
        state.housekeeping(now, 0, &mut effects);
        assert!(matches!(effects.as_slice(), [Effect::Resume(_)]));
    }

    #[test]
    fn revoke_drops_waiting_records_and_commits_prefix() {
        let mut state = State::new(100);
        let partition = ("main".to_owned(), 3);
        state.assign(partition.clone(), false);
        let now = Instant::now();
        let mut effects = Vec::new();
        for offset in 10..14 {
            let mut r = record(
                "main",
                offset,
                Some(if offset == 13 { "other" } else { "k" }),
                None,
            );
            r.partition = 3;
            state.admit(r, now, 0, &mut effects);
        }
        let first = state.next_task().unwrap().into_parts().2;
        assert!(state.finish_task(&first, true), "lane k has more");
        let (record, cancel, running) = state.next_task().unwrap().into_parts();
        assert_eq!(
            record.offset, 11,
            "fetched before offset 13 of the other key"
        );
        let other = state.next_task().unwrap().into_parts().2;
        assert_eq!(other.offset, 13);
        assert!(!state.finish_task(&other, true));

        state.revoke(std::slice::from_ref(&partition));
        assert!(cancel.is_cancelled());
        assert!(state.next_task().is_none(), "waiting records are dropped");
        assert_eq!(state.running_lanes(std::slice::from_ref(&partition)), 1);
        assert!(!state.finish_task(&running, false));
        assert_eq!(state.running_lanes(std::slice::from_ref(&partition)), 0);

        let released = state.remove(std::slice::from_ref(&partition));
        assert_eq!(
            released,
            vec![Released {
                partition: partition.clone(),
                commit: Some(11),
                abandoned: 2,
            }]
        );
        // A late report of the old assignment changes nothing.
        state.assign(partition.clone(), false);
        state.finish_task(&running, true);
        assert!(state.take_commits().is_empty());
    }
}
