//! The in-flight table of one upstream connection: rewritten 16-bit ID →
//! the query waiting for it.
//!
//! IDs are drawn from a CSPRNG (RFC 5452 §9.2; they also keep client IDs
//! from reaching the upstream) and are never reused while in flight
//! (RFC 7766 §6.2.1). A query that timed out leaves a *tombstone*: its ID
//! stays taken until the late answer arrives or the connection closes, so a
//! late answer can never be matched to a newer query.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub use crate::queries::QueryRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Live(QueryRef),
    Tomb,
}

/// What an answer's ID turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Live(QueryRef),
    /// The query timed out earlier; the answer is late and goes nowhere.
    Late,
    Unknown,
}

/// IDs are random already, so hashing only has to spread the bits over
/// the whole word for hashbrown's control bytes (Fibonacci hashing).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n);
    }
}

/// Random 16-bit IDs from the TLS provider's CSPRNG, fetched in batches so
/// the hot path is a copy, not a syscall.
pub struct IdRng {
    buf: [u8; 512],
    pos: usize,
}

impl Default for IdRng {
    fn default() -> Self {
        IdRng {
            buf: [0; 512],
            pos: 512,
        }
    }
}

impl IdRng {
    pub fn next_u16(&mut self) -> u16 {
        if self.pos + 2 > self.buf.len() {
            let rng = rustls::crypto::ring::default_provider().secure_random;
            if rng.fill(&mut self.buf).is_err() {
                // Never seen in practice (getrandom does not fail on Linux
                // after boot). Uniqueness, which correctness rests on, is
                // still guaranteed by the table; only unpredictability is
                // weakened, and TLS already authenticates every answer.
                log::error!("CSPRNG failed; transaction IDs fall back to a counter");
                for (i, b) in self.buf.iter_mut().enumerate() {
                    *b = b.wrapping_add(i as u8 ^ 0x5a);
                }
            }
            self.pos = 0;
        }
        let v = u16::from_be_bytes([self.buf[self.pos], self.buf[self.pos + 1]]);
        self.pos += 2;
        v
    }
}

#[derive(Default)]
pub struct IdTable {
    slots: HashMap<u16, Slot, BuildHasherDefault<IdHasher>>,
    live: usize,
}

impl IdTable {
    pub fn live(&self) -> usize {
        self.live
    }

    pub fn tombstones(&self) -> usize {
        self.slots.len() - self.live
    }

    /// Take a free ID for `q`. `None` only when all 65,536 are taken, which
    /// the per-connection in-flight cap keeps far away.
    pub fn insert(&mut self, q: QueryRef, rng: &mut IdRng) -> Option<u16> {
        let mut id = rng.next_u16();
        // While the table is sparse a random draw almost always hits a free
        // ID; the bounded walk below keeps the worst case finite.
        let mut tries = 0;
        while self.slots.contains_key(&id) {
            tries += 1;
            if tries > 8 {
                let start = id;
                loop {
                    id = id.wrapping_add(1);
                    if !self.slots.contains_key(&id) {
                        break;
                    }
                    if id == start {
                        return None;
                    }
                }
                break;
            }
            id = rng.next_u16();
        }
        self.slots.insert(id, Slot::Live(q));
        self.live += 1;
        Some(id)
    }

    /// Settle an answer's ID: the live query is removed, a tombstone is
    /// cleared (its late answer has now arrived).
    pub fn take(&mut self, id: u16) -> Lookup {
        match self.slots.remove(&id) {
            Some(Slot::Live(q)) => {
                self.live -= 1;
                Lookup::Live(q)
            }
            Some(Slot::Tomb) => Lookup::Late,
            None => Lookup::Unknown,
        }
    }

    /// Look without settling.
    pub fn get(&self, id: u16) -> Lookup {
        match self.slots.get(&id) {
            Some(Slot::Live(q)) => Lookup::Live(*q),
            Some(Slot::Tomb) => Lookup::Late,
            None => Lookup::Unknown,
        }
    }

    /// Put back a query taken by [`take`](Self::take) whose answer was
    /// rejected as not belonging to it.
    pub fn restore(&mut self, id: u16, q: QueryRef) {
        if !matches!(self.slots.insert(id, Slot::Live(q)), Some(Slot::Live(_))) {
            self.live += 1;
        }
    }

    /// The query `q` under `id` gave up waiting; keep the ID taken.
    pub fn bury(&mut self, id: u16, q: QueryRef) {
        if let Some(slot) = self.slots.get_mut(&id) {
            if *slot == Slot::Live(q) {
                *slot = Slot::Tomb;
                self.live -= 1;
            }
        }
    }

    /// Every live query, for re-sending when the connection dies; the table
    /// is empty afterwards.
    pub fn drain_live(&mut self, out: &mut Vec<QueryRef>) {
        out.extend(self.slots.values().filter_map(|s| match s {
            Slot::Live(q) => Some(*q),
            Slot::Tomb => None,
        }));
        self.slots.clear();
        self.live = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(key: u32) -> QueryRef {
        QueryRef { key, gen: key }
    }

    #[test]
    fn fills_all_ids_uniquely_three_times() {
        let mut rng = IdRng::default();
        for _ in 0..3 {
            let mut t = IdTable::default();
            let mut seen = vec![false; 65536];
            for k in 0..65536u32 {
                let id = t.insert(q(k), &mut rng).expect("free id");
                assert!(!seen[id as usize]);
                seen[id as usize] = true;
            }
            assert_eq!(t.insert(q(1), &mut rng), None);
            assert_eq!(t.live(), 65536);
        }
    }

    #[test]
    fn late_answers_never_match_new_queries() {
        let mut rng = IdRng::default();
        let mut t = IdTable::default();
        let id = t.insert(q(1), &mut rng).unwrap();
        t.bury(id, q(1));
        assert_eq!(t.live(), 0);
        assert_eq!(t.tombstones(), 1);
        for k in 2..5000 {
            let other = t.insert(q(k), &mut rng).unwrap();
            assert_ne!(other, id);
            assert_eq!(t.take(other), Lookup::Live(q(k)));
        }
        assert_eq!(t.take(id), Lookup::Late);
        assert_eq!(t.take(id), Lookup::Unknown);
    }

    #[test]
    fn drain_returns_live_only() {
        let mut rng = IdRng::default();
        let mut t = IdTable::default();
        let a = t.insert(q(1), &mut rng).unwrap();
        t.insert(q(2), &mut rng).unwrap();
        t.bury(a, q(1));
        let mut out = Vec::new();
        t.drain_live(&mut out);
        assert_eq!(out, vec![q(2)]);
        assert_eq!(t.live(), 0);
        assert_eq!(t.tombstones(), 0);
    }
}
