//! Per-partition offset tracking for contiguous commits.
//!
//! Jobs of one partition finish in any order, but Kafka stores a single
//! committed offset per partition: the offset of the next record to read. The
//! tracker therefore commits only up to the lowest offset that is not yet
//! terminal, and never moves that offset backwards.

use std::collections::VecDeque;

/// Offsets of one partition that were fetched and not yet committed.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Tracked offsets in fetch order (ascending), with a terminal flag.
    pending: VecDeque<(i64, bool)>,
    /// Offset after the last tracked record, once any record was tracked.
    next_after_tracked: Option<i64>,
    /// Highest offset handed to Kafka as committed.
    committed: Option<i64>,
    /// Tracked offsets not yet terminal, kept as a count because the poll
    /// thread reads it on every fetched record.
    open: usize,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a fetched offset. Offsets must arrive in ascending
    /// order; an offset at or below one already tracked (a re-delivery) is
    /// ignored and `false` is returned.
    pub fn track(&mut self, offset: i64) -> bool {
        if self.next_after_tracked.is_some_and(|next| offset < next) {
            return false;
        }
        self.pending.push_back((offset, false));
        self.next_after_tracked = Some(offset + 1);
        self.open += 1;
        true
    }

    /// Marks a tracked offset terminal. Returns `false` for an offset that is
    /// not tracked (already committed, or never fetched by this member).
    pub fn complete(&mut self, offset: i64) -> bool {
        match self.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(index) => {
                if !self.pending[index].1 {
                    self.pending[index].1 = true;
                    self.open -= 1;
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The offset to commit: the lowest non-terminal offset, or the offset
    /// after the last tracked record when all are terminal. `None` when
    /// nothing was tracked yet.
    pub fn committable(&self) -> Option<i64> {
        match self.pending.iter().find(|(_, done)| !done) {
            Some((offset, _)) => Some(*offset),
            None => self.next_after_tracked,
        }
    }

    /// Returns the offset to commit if it is ahead of the last commit, and
    /// drops the terminal prefix it covers.
    pub fn take_commit(&mut self) -> Option<i64> {
        let candidate = self.committable()?;
        if self
            .committed
            .is_some_and(|committed| candidate <= committed)
        {
            return None;
        }
        while self
            .pending
            .front()
            .is_some_and(|(offset, done)| *done && *offset < candidate)
        {
            self.pending.pop_front();
        }
        self.committed = Some(candidate);
        Some(candidate)
    }

    /// Puts back a commit that Kafka rejected, so the next call retries it.
    pub fn commit_failed(&mut self, offset: i64) {
        if self.committed == Some(offset) {
            self.committed = None;
        }
    }

    /// Offsets fetched and not yet terminal.
    pub fn in_progress(&self) -> usize {
        self.open
    }

    pub fn last_committed(&self) -> Option<i64> {
        self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commits_only_contiguous_prefix() {
        let mut tracker = OffsetTracker::new();
        for offset in 10..15 {
            tracker.track(offset);
        }
        assert_eq!(tracker.take_commit(), Some(10));
        tracker.complete(12);
        tracker.complete(11);
        assert_eq!(tracker.take_commit(), None);
        tracker.complete(10);
        assert_eq!(tracker.take_commit(), Some(13));
        tracker.complete(14);
        tracker.complete(13);
        assert_eq!(tracker.take_commit(), Some(15));
        assert_eq!(tracker.in_progress(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_block() {
        let mut tracker = OffsetTracker::new();
        tracker.track(3);
        tracker.track(7);
        tracker.complete(7);
        tracker.complete(7);
        assert_eq!(
            tracker.in_progress(),
            1,
            "a repeated completion counts once"
        );
        assert_eq!(tracker.committable(), Some(3));
        tracker.complete(3);
        assert_eq!(tracker.committable(), Some(8));
    }

    #[test]
    fn redelivered_offset_is_ignored() {
        let mut tracker = OffsetTracker::new();
        assert!(tracker.track(5));
        assert!(!tracker.track(5));
        assert!(!tracker.track(4));
        assert!(!tracker.complete(4));
    }

    #[test]
    fn failed_commit_is_retried() {
        let mut tracker = OffsetTracker::new();
        tracker.track(0);
        tracker.complete(0);
        assert_eq!(tracker.take_commit(), Some(1));
        tracker.commit_failed(1);
        assert_eq!(tracker.take_commit(), Some(1));
        assert_eq!(tracker.take_commit(), None);
    }

    proptest! {
        #[test]
        fn any_completion_order_commits_contiguous_prefix(
            count in 1usize..60,
            seed in proptest::collection::vec(any::<u32>(), 60),
            gaps in proptest::collection::vec(1i64..3, 60),
        ) {
            let mut offsets = Vec::new();
            let mut next = 100;
            for gap in gaps.iter().take(count) {
                offsets.push(next);
                next += gap;
            }
            let mut tracker = OffsetTracker::new();
            for offset in &offsets {
                tracker.track(*offset);
            }
            let mut order: Vec<usize> = (0..offsets.len()).collect();
            order.sort_by_key(|i| seed[*i]);

            let mut done = vec![false; offsets.len()];
            let mut last = None;
            for index in order {
                done[index] = true;
                tracker.complete(offsets[index]);
                if let Some(commit) = tracker.take_commit() {
                    // Never backwards.
                    prop_assert!(last.is_none_or(|last| commit > last));
                    last = Some(commit);
                    // Everything below the commit is terminal; the commit is
                    // the first non-terminal offset or one past the end.
                    let first_open = done.iter().position(|d| !d);
                    let expected = first_open.map_or(offsets[offsets.len() - 1] + 1, |i| offsets[i]);
                    prop_assert_eq!(commit, expected);
                }
            }
            prop_assert_eq!(last, Some(offsets[offsets.len() - 1] + 1));
        }
    }
}
