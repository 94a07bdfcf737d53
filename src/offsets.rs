//! Per-partition offset tracking for at-least-once delivery (pure, no Kafka types).
//!
//! `begin` when a message is taken from the consumer, `done` once its effect is durable
//! (appended to a pending window in Redis, or its dead-letter publish acknowledged). The
//! committable position is the contiguous-prefix rule: the lowest offset still in flight, or one
//! past the highest offset taken when none is. Offsets that were never taken (compaction gaps,
//! transaction markers) do not block progress: the consumer never delivers them. Completion may
//! happen out of order; the position only moves past an offset once it and everything taken
//! before it are done. One tracker serves one topic.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct PartitionState {
    /// Taken but not yet durable.
    outstanding: BTreeSet<i64>,
    /// One past the highest offset taken.
    next: Option<i64>,
    /// Last committed position (or the first offset taken, which is the consumer's starting
    /// position): `committable` only reports progress beyond it.
    committed: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        self.outstanding.first().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<i32, PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A message at `offset` was taken from `partition`.
    pub fn begin(&mut self, partition: i32, offset: i64) {
        let p = self.parts.entry(partition).or_default();
        p.outstanding.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        p.committed.get_or_insert(offset);
    }

    /// The effect of the message at `offset` is durable. Returns false when the offset was not
    /// in flight (unknown, already done, or its partition was revoked meanwhile).
    pub fn done(&mut self, partition: i32, offset: i64) -> bool {
        self.parts.get_mut(&partition).is_some_and(|p| p.outstanding.remove(&offset))
    }

    /// The contiguous-prefix position (what a commit would store), progress or not.
    pub fn position(&self, partition: i32) -> Option<i64> {
        self.parts.get(&partition).and_then(PartitionState::position)
    }

    /// The position to commit, if it moved past the last committed one.
    pub fn committable(&self, partition: i32) -> Option<i64> {
        let p = self.parts.get(&partition)?;
        let pos = p.position()?;
        (Some(pos) > p.committed).then_some(pos)
    }

    /// All partitions with progress to commit, sorted by partition.
    pub fn committable_all(&self) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> =
            self.parts.keys().filter_map(|&part| self.committable(part).map(|o| (part, o))).collect();
        out.sort_unstable();
        out
    }

    /// Record a successful commit (call after the broker acknowledged it).
    pub fn mark_committed(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// The partition was revoked: forget it and return its final committable position, which
    /// the caller commits synchronously before the rebalance completes. Late `done` calls for it
    /// are ignored (the new owner re-reads those messages; effects are idempotent).
    pub fn revoke(&mut self, partition: i32) -> Option<i64> {
        let p = self.parts.remove(&partition)?;
        let pos = p.position()?;
        (Some(pos) > p.committed).then_some(pos)
    }

    /// Messages taken but not yet durable on `partition`.
    pub fn outstanding(&self, partition: i32) -> usize {
        self.parts.get(&partition).map_or(0, |p| p.outstanding.len())
    }

    /// Messages in flight across all partitions (for draining on shutdown).
    pub fn total_outstanding(&self) -> usize {
        self.parts.values().map(|p| p.outstanding.len()).sum()
    }

    pub fn partitions(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.parts.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_taken_nothing_to_commit() {
        let t = OffsetTracker::new();
        assert_eq!(t.committable(0), None);
        assert_eq!(t.position(0), None);
        assert!(t.committable_all().is_empty());
    }

    #[test]
    fn in_order_completion() {
        let mut t = OffsetTracker::new();
        t.begin(0, 10);
        // Taken but not done: position is the starting point, no progress to commit.
        assert_eq!(t.position(0), Some(10));
        assert_eq!(t.committable(0), None);
        assert!(t.done(0, 10));
        assert_eq!(t.committable(0), Some(11));
        t.begin(0, 11);
        t.begin(0, 12);
        assert!(t.done(0, 11));
        assert_eq!(t.committable(0), Some(12));
        assert!(t.done(0, 12));
        assert_eq!(t.committable(0), Some(13));
    }

    #[test]
    fn out_of_order_completion_waits_for_the_prefix() {
        let mut t = OffsetTracker::new();
        for o in 0..5 {
            t.begin(3, o);
        }
        assert!(t.done(3, 2));
        assert!(t.done(3, 4));
        assert_eq!(t.committable(3), None, "offset 0 still in flight");
        assert!(t.done(3, 0));
        assert_eq!(t.committable(3), Some(1), "offset 1 still in flight");
        assert!(t.done(3, 1));
        assert_eq!(t.committable(3), Some(3), "offset 3 still in flight");
        assert!(t.done(3, 3));
        assert_eq!(t.committable(3), Some(5));
        assert_eq!(t.outstanding(3), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_block() {
        let mut t = OffsetTracker::new();
        for o in [5, 7, 10] {
            t.begin(1, o);
        }
        assert!(t.done(1, 7));
        assert_eq!(t.committable(1), None);
        assert!(t.done(1, 5));
        assert_eq!(t.committable(1), Some(10));
        assert!(t.done(1, 10));
        assert_eq!(t.committable(1), Some(11));
    }

    #[test]
    fn done_twice_or_unknown_is_ignored() {
        let mut t = OffsetTracker::new();
        t.begin(0, 1);
        assert!(t.done(0, 1));
        assert!(!t.done(0, 1));
        assert!(!t.done(0, 99));
        assert!(!t.done(7, 1));
        assert_eq!(t.committable(0), Some(2));
    }

    #[test]
    fn mark_committed_suppresses_repeat_commits() {
        let mut t = OffsetTracker::new();
        t.begin(0, 0);
        t.begin(2, 100);
        t.done(0, 0);
        t.done(2, 100);
        assert_eq!(t.committable_all(), [(0, 1), (2, 101)]);
        t.mark_committed(0, 1);
        assert_eq!(t.committable_all(), [(2, 101)]);
        // A stale acknowledgement never moves the mark backwards.
        t.mark_committed(2, 101);
        t.mark_committed(2, 50);
        assert!(t.committable_all().is_empty());
        t.begin(0, 1);
        t.done(0, 1);
        assert_eq!(t.committable(0), Some(2));
    }

    #[test]
    fn revoke_returns_final_position_and_forgets() {
        let mut t = OffsetTracker::new();
        for o in 20..24 {
            t.begin(4, o);
        }
        t.done(4, 20);
        t.done(4, 21);
        t.done(4, 23);
        assert_eq!(t.total_outstanding(), 1);
        assert_eq!(t.revoke(4), Some(22));
        assert_eq!(t.partitions(), Vec::<i32>::new());
        // Completion arriving after the revoke is ignored.
        assert!(!t.done(4, 22));
        assert_eq!(t.committable(4), None);
        // Revoke without progress has nothing to commit.
        t.begin(5, 0);
        assert_eq!(t.revoke(5), None);
        assert_eq!(t.revoke(6), None);
    }

    #[test]
    fn rewind_after_seek_does_not_commit_backwards() {
        let mut t = OffsetTracker::new();
        t.begin(0, 10);
        t.done(0, 10);
        t.mark_committed(0, 11);
        // Redelivery of an earlier offset (e.g. after a seek): position 5 < committed 11.
        t.begin(0, 5);
        assert_eq!(t.position(0), Some(5));
        assert_eq!(t.committable(0), None);
        t.done(0, 5);
        assert_eq!(t.position(0), Some(11));
        assert_eq!(t.committable(0), None);
    }
}
