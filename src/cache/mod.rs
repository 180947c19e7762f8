//! An answer cache (off unless `--cache-size N`).
//!
//! Keyed on the question (name case-folded, type, class) plus the bits
//! that change the answer: DO and CD, and whether the client spoke EDNS
//! (the stored answer carries an OPT exactly when the client's did).
//! Entries live for the TTL [`ttl::cache_ttl`] allows and leave oldest
//! first when the cache is full; every TTL is aged on the way out.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::wire::response::restore_for_client;
use crate::wire::Query;

pub mod ttl;

/// Answers larger than this are not kept: they are rare, and the cache's
/// memory stays bounded by entries × this.
pub const MAX_ENTRY: usize = 4096;

struct Entry {
    answer: Box<[u8]>,
    ttl_offsets: Box<[u16]>,
    stored: Instant,
    ttl: u32,
    seq: u64,
}

pub struct Cache {
    map: HashMap<Box<[u8]>, Entry>,
    /// Insertion order, for eviction; `seq` tells a live entry from one
    /// replaced since.
    order: VecDeque<(Box<[u8]>, u64)>,
    capacity: usize,
    seq: u64,
    scratch: Vec<u16>,
    hits: u64,
    misses: u64,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            map: HashMap::with_capacity(capacity.min(65_536)),
            order: VecDeque::new(),
            capacity,
            seq: 0,
            scratch: Vec::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Copy a fresh answer for `key` into `out`, TTLs aged, the client's
    /// ID and question bytes (its own letter case, RFC 5452 / 0x20) put in.
    pub fn get(&mut self, key: &[u8], query: &Query, msg: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
        let Some(e) = self.map.get(key) else {
            self.misses += 1;
            return false;
        };
        let age = now.saturating_duration_since(e.stored).as_secs();
        if age >= u64::from(e.ttl) {
            self.map.remove(key);
            self.misses += 1;
            return false;
        }
        out.clear();
        out.extend_from_slice(&e.answer);
        ttl::age_ttls(out, &e.ttl_offsets, age as u32);
        restore_for_client(out, query, msg);
        self.hits += 1;
        true
    }

    /// Keep `answer` (already fit for the client: hop options stripped) if
    /// it may be cached.
    pub fn insert(&mut self, key: &[u8], answer: &[u8], now: Instant) {
        if self.capacity == 0 || answer.len() > MAX_ENTRY {
            return;
        }
        let Some(ttl) = ttl::cache_ttl(answer, &mut self.scratch) else {
            return;
        };
        while self.map.len() >= self.capacity {
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                self.map.remove(&old);
            }
        }
        self.seq += 1;
        let key: Box<[u8]> = key.into();
        self.order.push_back((key.clone(), self.seq));
        self.map.insert(
            key,
            Entry {
                answer: answer.into(),
                ttl_offsets: self.scratch.as_slice().into(),
                stored: now,
                ttl,
                seq: self.seq,
            },
        );
        // Replaced entries leave stale keys behind in `order`; drop them
        // before they outnumber the live ones.
        if self.order.len() > 2 * self.capacity + 64 {
            let map = &self.map;
            self.order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn q(id: u16, name: &str) -> Vec<u8> {
        crate::wire::tests::query(id, name, 1, None)
    }

    fn parsed(msg: &[u8]) -> (Query, Vec<u8>) {
        let query = crate::wire::query::parse_query(msg, 4096).unwrap();
        let mut key = Vec::new();
        query.key_into(&mut key);
        (query, key)
    }

    fn answer(query: &[u8], ttl: u32) -> Vec<u8> {
        let mut a = query.to_vec();
        a[2] |= 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        a.extend_from_slice(&ttl.to_be_bytes());
        a.extend_from_slice(&[0, 4, 192, 0, 2, 1]);
        a
    }

    #[test]
    fn hit_ages_ttl_and_restores_id_and_case() {
        let mut c = Cache::new(10);
        let q1 = q(1, "www.example");
        let (_, key) = parsed(&q1);
        let t0 = Instant::now();
        c.insert(&key, &answer(&q1, 100), t0);
        let q2 = q(2, "WWW.Example");
        let (i2, key2) = parsed(&q2);
        assert_eq!(key, key2);
        let mut out = Vec::new();
        assert!(c.get(&key2, &i2, &q2, t0 + Duration::from_secs(40), &mut out));
        assert_eq!(crate::wire::id(&out), Some(2));
        assert_eq!(&out[12..i2.question_end], &q2[12..i2.question_end]);
        assert_eq!(&out[out.len() - 10..out.len() - 6], &60u32.to_be_bytes());
        assert!(!c.get(&key2, &i2, &q2, t0 + Duration::from_secs(100), &mut out));
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_with_eviction() {
        let mut c = Cache::new(3);
        let t0 = Instant::now();
        for i in 0..10 {
            let qq = q(1, &format!("n{i}.example"));
            let (_, key) = parsed(&qq);
            c.insert(&key, &answer(&qq, 100), t0);
            c.insert(&key, &answer(&qq, 100), t0);
            assert!(c.len() <= 3);
            assert!(c.order.len() <= 2 * 3 + 64);
        }
        let qq = q(1, "n9.example");
        let (info, key) = parsed(&qq);
        assert!(c.get(&key, &info, &qq, t0, &mut Vec::new()));
        let qq = q(1, "n0.example");
        let (info, key) = parsed(&qq);
        assert!(!c.get(&key, &info, &qq, t0, &mut Vec::new()));
    }
}
