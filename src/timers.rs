//! One heap of timers for the whole loop: query deadlines, connection
//! handshakes and idle closes, client idle checks, HTTP deadlines, accept
//! retries. Rooms arm timers through it; the loop pops the due ones with
//! the turn's `now` and hands each to its owner, which checks the
//! generation in the timer before acting (a slot may have been reused).
//!
//! Timers are never cancelled: an owner that no longer needs one ignores it
//! when it fires. Each owner arms at most one timer per object and reason
//! at a time (or one per query), so the heap is bounded by the objects
//! alive plus the queries of one timeout period.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::queries::QueryRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A query's deadline.
    Deadline(QueryRef),
    /// A query with a stale answer in the cache has waited long enough for
    /// the upstream (RFC 8767's client response timer).
    StaleAnswer(QueryRef),
    Handshake {
        conn: usize,
        gen: u32,
    },
    ConnIdle {
        conn: usize,
        gen: u32,
    },
    /// Whether a connection that went quiet with queries outstanding does
    /// not pipeline.
    PipelineCheck {
        conn: usize,
        gen: u32,
    },
    ClientIdle {
        key: usize,
        gen: u32,
    },
    Http {
        key: usize,
        gen: u32,
    },
    AcceptRetry {
        listener: usize,
    },
    /// Look at the --config file for a change (--watch-config).
    ConfigWatch,
}

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    pub fn add(&mut self, at: Instant, timer: Timer) {
        self.heap.push(Reverse((at, timer)));
    }

    /// When the next timer is due, for `poll`'s timeout.
    pub fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// The next timer due at or before `now`, removed from the heap.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => self.heap.pop().map(|Reverse((_, timer))| timer),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Drop the timers `keep` says are stale. Timers are never cancelled,
    /// so one per answered query would otherwise stay until its deadline:
    /// at 100k queries/s and a 2.5 s timeout, a quarter million entries.
    /// The loop calls this when stale ones outnumber the live objects, which
    /// keeps the heap within twice what is alive at an amortised O(1) per
    /// timer.
    pub fn retain(&mut self, mut keep: impl FnMut(&Timer) -> bool) {
        self.heap.retain(|Reverse((_, t))| keep(t));
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// How long `poll` may sleep: until `next`, rounded up by a millisecond,
/// since waking a little early would only spin until the deadline.
pub fn poll_timeout(next: Option<Instant>, now: Instant) -> Option<Duration> {
    next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_in_time_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut timers = Timers::default();
        timers.add(t0 + ms(300), Timer::AcceptRetry { listener: 3 });
        timers.add(t0 + ms(100), Timer::AcceptRetry { listener: 1 });
        timers.add(t0 + ms(200), Timer::AcceptRetry { listener: 2 });
        assert_eq!(timers.next_at(), Some(t0 + ms(100)));
        assert_eq!(timers.pop_due(t0 + ms(99)), None);
        assert_eq!(timers.pop_due(t0 + ms(250)), Some(Timer::AcceptRetry { listener: 1 }));
        assert_eq!(timers.pop_due(t0 + ms(250)), Some(Timer::AcceptRetry { listener: 2 }));
        assert_eq!(timers.pop_due(t0 + ms(250)), None);
        assert_eq!(timers.len(), 1);
        assert_eq!(poll_timeout(timers.next_at(), t0 + ms(250)), Some(ms(51)));
        assert_eq!(poll_timeout(timers.next_at(), t0 + ms(400)), Some(ms(1)));
        assert_eq!(poll_timeout(None, t0), None);
    }

    #[test]
    fn stale_timers_can_be_dropped() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        for key in 0..10 {
            timers.add(t0, Timer::Deadline(QueryRef { key, gen: 1 }));
        }
        timers.add(t0, Timer::AcceptRetry { listener: 0 });
        timers.retain(|t| !matches!(t, Timer::Deadline(q) if q.key % 2 == 0));
        assert_eq!(timers.len(), 6);
        assert_eq!(timers.pop_due(t0).map(|_| ()), Some(()));
    }

    #[test]
    fn deadlines_of_different_lengths_fire_in_their_own_order() {
        // The reload defect: a FIFO of deadlines assumed one timeout for
        // all; a query admitted after a lowered timeout must fire first.
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let q = |key| QueryRef { key, gen: 1 };
        timers.add(t0 + Duration::from_millis(5000), Timer::Deadline(q(1)));
        timers.add(
            t0 + Duration::from_millis(10) + Duration::from_millis(200),
            Timer::Deadline(q(2)),
        );
        assert_eq!(
            timers.pop_due(t0 + Duration::from_millis(210)),
            Some(Timer::Deadline(q(2)))
        );
        assert_eq!(timers.pop_due(t0 + Duration::from_millis(4999)), None);
    }
}
