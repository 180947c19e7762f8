//! The answer cache (off unless `--cache-size N`).
//!
//! Keyed on [`Query::key_into`]: the canonical question plus the bits that
//! change the answer. An entry lives for the TTL [`ttl::cache_ttl`] gives,
//! clamped by the [`Policy`]; TTLs are aged on the way out. Past its TTL an
//! entry is kept for `stale_max_age` more, to answer when the upstreams
//! cannot (RFC 8767: TTL 30, Extended DNS Error 3). Memory is bounded by a
//! count and by the bytes held; eviction is CLOCK (second chance), which
//! approximates least-recently-used without touching the order on a hit.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::wire::build::add_ede;
use crate::wire::response::restore_for_client;
use crate::wire::{Ede, EdeCode, Query};

pub mod ttl;

/// Answers larger than this are not kept: they are rare, and one entry
/// cannot take a large share of the byte budget.
pub const MAX_ENTRY: usize = 4096;
/// The TTL of an answer served stale (RFC 8767 §4: 30 s).
pub const STALE_TTL: u32 = 30;
/// Bytes an entry costs besides its key and answer: the map slot, the
/// entry, the clock slot (measured sizes, rounded up).
const ENTRY_OVERHEAD: usize = 96;

/// What the cache may keep, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub max_negative_ttl: u32,
    /// How long past its TTL an entry may still answer (0: never).
    pub stale_max_age: u32,
}

struct Entry {
    answer: Box<[u8]>,
    ttl_offsets: Box<[u16]>,
    stored: Instant,
    ttl: u32,
    /// Looked up since the clock hand last passed: spared once.
    used: bool,
}

impl Entry {
    fn bytes(&self, key: &[u8]) -> usize {
        // The key is held twice: by the map and by the clock.
        2 * key.len() + self.answer.len() + 2 * self.ttl_offsets.len() + ENTRY_OVERHEAD
    }
}

/// The outcome of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A fresh answer is in the output buffer; `refresh` when less than a
    /// tenth of its TTL is left (prefetch it, so popular names never miss).
    Fresh {
        refresh: bool,
    },
    /// Only an expired one, within the stale window: forward the query, and
    /// answer from [`Cache::stale`] if the upstreams cannot in time.
    Stale,
    Miss,
}

/// Counters, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub stale_served: u64,
    pub prefetches: u64,
    pub evictions: u64,
}

pub struct Cache {
    map: HashMap<Box<[u8]>, Entry>,
    /// The clock: keys in insertion order, re-queued when spared.
    clock: VecDeque<Box<[u8]>>,
    policy: Policy,
    bytes: usize,
    scratch: Vec<u16>,
    stats: CacheStats,
}

impl Cache {
    pub fn new(policy: Policy) -> Cache {
        Cache {
            // Grown as entries come: a capacity sized by --cache-size would be
            // resident memory for entries that may never exist.
            map: HashMap::new(),
            clock: VecDeque::new(),
            policy,
            bytes: 0,
            scratch: Vec::new(),
            stats: CacheStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held, by the accounting that the byte cap bounds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// A prefetch was sent.
    pub fn note_prefetch(&mut self) {
        self.stats.prefetches += 1;
    }

    /// Look `key` up for `query` (bytes `msg`): a fresh answer is written
    /// to `out` with TTLs aged and the client's ID, RD and question bytes
    /// put in (its own letter case, RFC 5452 / 0x20).
    pub fn get(&mut self, key: &[u8], query: &Query, msg: &[u8], now: Instant, out: &mut Vec<u8>) -> Lookup {
        let Some(e) = self.map.get_mut(key) else {
            self.stats.misses += 1;
            return Lookup::Miss;
        };
        let age = now.saturating_duration_since(e.stored).as_secs();
        if age >= u64::from(e.ttl) {
            self.stats.misses += 1;
            if age < u64::from(e.ttl) + u64::from(self.policy.stale_max_age) {
                return Lookup::Stale;
            }
            self.remove(key);
            return Lookup::Miss;
        }
        e.used = true;
        out.clear();
        out.extend_from_slice(&e.answer);
        ttl::age_ttls(out, &e.ttl_offsets, age as u32);
        restore_for_client(out, query, msg);
        self.stats.hits += 1;
        let ttl = std::time::Duration::from_secs(u64::from(e.ttl));
        let left = ttl.saturating_sub(now.saturating_duration_since(e.stored));
        Lookup::Fresh {
            refresh: left * 10 < ttl,
        }
    }

    /// An expired answer for `key` within the stale window, written to
    /// `out` for `query`: TTLs 30, EDE 3 (Stale Answer) where the client
    /// speaks EDNS (RFC 8767 §4, RFC 8914 §4.4). `false` when there is none.
    pub fn stale(&mut self, key: &[u8], query: &Query, msg: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
        let Some(e) = self.map.get(key) else { return false };
        let age = now.saturating_duration_since(e.stored).as_secs();
        if self.policy.stale_max_age == 0 || age >= u64::from(e.ttl) + u64::from(self.policy.stale_max_age) {
            return false;
        }
        out.clear();
        out.extend_from_slice(&e.answer);
        ttl::set_ttls(out, &e.ttl_offsets, STALE_TTL);
        restore_for_client(out, query, msg);
        if query.edns.is_some() {
            add_ede(out, Ede::new(EdeCode::StaleAnswer, "stale answer"));
        }
        self.stats.stale_served += 1;
        true
    }

    /// Keep `answer` (already fit for the client: hop options stripped) if
    /// it may be cached, with its TTLs clamped by the policy.
    pub fn insert(&mut self, key: &[u8], answer: &[u8], now: Instant) {
        if self.policy.max_entries == 0 || answer.len() > MAX_ENTRY {
            return;
        }
        let Some(ttl) = ttl::cache_ttl(answer, &mut self.scratch) else {
            return;
        };
        let p = self.policy;
        let max = if ttl::is_negative(answer) {
            p.max_negative_ttl.min(p.max_ttl)
        } else {
            p.max_ttl
        };
        let ttl = ttl.clamp(p.min_ttl.min(max), max);
        let mut stored: Box<[u8]> = answer.into();
        ttl::clamp_ttls(&mut stored, &self.scratch, p.min_ttl.min(max), max);
        let entry = Entry {
            answer: stored,
            ttl_offsets: self.scratch.as_slice().into(),
            stored: now,
            ttl,
            used: false,
        };
        let cost = entry.bytes(key);
        if cost > p.max_bytes {
            return;
        }
        // A replaced entry keeps its place on the clock.
        let replaced = self.remove(key);
        while self.map.len() >= p.max_entries || self.bytes + cost > p.max_bytes {
            if !self.evict_one() {
                break;
            }
        }
        self.bytes += cost;
        let key: Box<[u8]> = key.into();
        if !replaced {
            self.clock.push_back(key.clone());
        }
        self.map.insert(key, entry);
        if self.clock.len() > 2 * self.map.len() + 64 {
            self.compact_clock();
        }
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove(key) {
            Some(e) => {
                self.bytes = self.bytes.saturating_sub(e.bytes(key));
                true
            }
            None => false,
        }
    }

    /// Drop clock slots of removed entries and repeated keys (an expired
    /// entry's slot stays until the hand passes; its key may come back).
    fn compact_clock(&mut self) {
        let mut seen = std::collections::HashSet::new();
        let map = &self.map;
        self.clock.retain(|k| map.contains_key(k) && seen.insert(k.clone()));
    }

    /// Advance the clock hand to a victim and evict it; entries looked up
    /// since the last pass are spared once. Keys of entries already
    /// removed (replaced or expired) are dropped from the clock on the way.
    fn evict_one(&mut self) -> bool {
        // Each key is spared at most once per pass: bounded by twice the
        // clock's length.
        for _ in 0..2 * self.clock.len() + 1 {
            let Some(key) = self.clock.pop_front() else {
                return false;
            };
            match self.map.get_mut(&key) {
                None => {}
                Some(e) if e.used => {
                    e.used = false;
                    self.clock.push_back(key);
                }
                Some(_) => {
                    self.remove(&key);
                    self.stats.evictions += 1;
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> Policy {
        Policy {
            max_entries: 10,
            max_bytes: 1 << 20,
            min_ttl: 0,
            max_ttl: 86_400,
            max_negative_ttl: 3600,
            stale_max_age: 3600,
        }
    }

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

    fn ttl_of(a: &[u8]) -> u32 {
        u32::from_be_bytes(a[a.len() - 10..a.len() - 6].try_into().unwrap())
    }

    #[test]
    fn hit_ages_ttl_and_restores_id_and_case() {
        let mut c = Cache::new(policy());
        let q1 = q(1, "www.example");
        let (_, key) = parsed(&q1);
        let t0 = Instant::now();
        c.insert(&key, &answer(&q1, 100), t0);
        let q2 = q(2, "WWW.Example");
        let (i2, key2) = parsed(&q2);
        assert_eq!(key, key2);
        let mut out = Vec::new();
        let got = c.get(&key2, &i2, &q2, t0 + Duration::from_secs(40), &mut out);
        assert_eq!(got, Lookup::Fresh { refresh: false });
        assert_eq!(crate::wire::id(&out), Some(2));
        assert_eq!(&out[12..i2.question_end], &q2[12..i2.question_end]);
        assert_eq!(ttl_of(&out), 60);
        // The last tenth of the TTL: still an answer, and time to refresh.
        let got = c.get(&key2, &i2, &q2, t0 + Duration::from_secs(95), &mut out);
        assert_eq!(got, Lookup::Fresh { refresh: true });
        // Expired: stale within the window, gone after it.
        assert_eq!(
            c.get(&key2, &i2, &q2, t0 + Duration::from_secs(100), &mut out),
            Lookup::Stale
        );
        assert!(c.stale(&key2, &i2, &q2, t0 + Duration::from_secs(100), &mut out));
        assert_eq!(ttl_of(&out), STALE_TTL);
        assert_eq!(crate::wire::id(&out), Some(2));
        assert_eq!(c.stats().stale_served, 1);
        let past = t0 + Duration::from_secs(100 + 3600);
        assert!(!c.stale(&key2, &i2, &q2, past, &mut out));
        assert_eq!(c.get(&key2, &i2, &q2, past, &mut out), Lookup::Miss);
        assert!(c.is_empty());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn stale_answers_carry_ede_3_for_edns_clients() {
        let mut c = Cache::new(policy());
        let q1 = crate::wire::tests::query(1, "s.example", 1, Some(1232));
        let (i1, key) = parsed(&q1);
        let t0 = Instant::now();
        let mut a = q1.clone();
        a[2] |= 0x80;
        c.insert(&key, &answer_with_opt(&q1), t0);
        let mut out = Vec::new();
        assert!(c.stale(&key, &i1, &q1, t0 + Duration::from_secs(400), &mut out));
        let w = crate::wire::query::walk(&out).unwrap();
        let o = w.opt.unwrap();
        let rdata = &out[o.rdata..o.end];
        assert_eq!(&rdata[..6], &[0, 15, 0, 14, 0, 3]);
        assert_eq!(&rdata[6..], b"stale answer");
    }

    /// An answer to `query` (which has an OPT as its last record) with one
    /// A record of TTL 300 before the OPT.
    fn answer_with_opt(query: &[u8]) -> Vec<u8> {
        let opt_at = query.len() - 11;
        let mut a = query[..opt_at].to_vec();
        a[2] |= 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        a.extend_from_slice(&300u32.to_be_bytes());
        a.extend_from_slice(&[0, 4, 192, 0, 2, 1]);
        a.extend_from_slice(&query[opt_at..]);
        a
    }

    #[test]
    fn ttls_are_clamped_negative_ones_more() {
        let mut p = policy();
        p.min_ttl = 60;
        p.max_ttl = 600;
        p.max_negative_ttl = 10;
        let mut c = Cache::new(p);
        let t0 = Instant::now();
        let mut out = Vec::new();
        for (name, ttl, want) in [("low.example", 5, 60), ("high.example", 99_999, 600)] {
            let m = q(1, name);
            let (i, key) = parsed(&m);
            c.insert(&key, &answer(&m, ttl), t0);
            assert!(matches!(c.get(&key, &i, &m, t0, &mut out), Lookup::Fresh { .. }));
            assert_eq!(ttl_of(&out), want, "{name}");
        }
        // NODATA with an SOA of TTL 900 and MINIMUM 300: capped at 10 (the
        // negative cap wins over the minimum).
        let m = q(1, "nodata.example");
        let (i, key) = parsed(&m);
        let mut a = m.clone();
        a[2] |= 0x80;
        a[9] = 1;
        let mut soa = vec![0xc0, 12, 0, 6, 0, 1];
        soa.extend_from_slice(&900u32.to_be_bytes());
        soa.extend_from_slice(&[0, 22, 0, 0]);
        soa.extend_from_slice(&[0; 16]);
        soa.extend_from_slice(&300u32.to_be_bytes());
        a.extend_from_slice(&soa);
        c.insert(&key, &a, t0);
        assert!(matches!(c.get(&key, &i, &m, t0, &mut out), Lookup::Fresh { .. }));
        assert_eq!(
            c.get(&key, &i, &m, t0 + Duration::from_secs(10), &mut out),
            Lookup::Stale
        );
    }

    #[test]
    fn bounded_by_count_with_second_chance() {
        let mut c = Cache::new(Policy {
            max_entries: 3,
            ..policy()
        });
        let t0 = Instant::now();
        let mut out = Vec::new();
        let entry = |i: u32| {
            let m = q(1, &format!("n{i}.example"));
            let (info, key) = parsed(&m);
            (m, info, key)
        };
        for i in 0..3 {
            let (m, _, key) = entry(i);
            c.insert(&key, &answer(&m, 100), t0);
        }
        // n0 is used: the next insert evicts n1, the oldest not used.
        let (m0, i0, k0) = entry(0);
        assert!(matches!(c.get(&k0, &i0, &m0, t0, &mut out), Lookup::Fresh { .. }));
        let (m3, _, k3) = entry(3);
        c.insert(&k3, &answer(&m3, 100), t0);
        assert_eq!(c.len(), 3);
        let (m1, i1, k1) = entry(1);
        assert_eq!(c.get(&k1, &i1, &m1, t0, &mut out), Lookup::Miss);
        assert!(matches!(c.get(&k0, &i0, &m0, t0, &mut out), Lookup::Fresh { .. }));
        assert_eq!(c.stats().evictions, 1);
        // Replacing entries never leaves the clock growing without bound.
        for _ in 0..100 {
            c.insert(&k3, &answer(&m3, 100), t0);
        }
        assert!(c.clock.len() <= 2 * 3 + 64);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn bounded_by_bytes() {
        let cap = 8 * 1024;
        let mut c = Cache::new(Policy {
            max_entries: 1000,
            max_bytes: cap,
            ..policy()
        });
        let t0 = Instant::now();
        for i in 0..500 {
            let m = q(1, &format!("big{i}.example"));
            let (_, key) = parsed(&m);
            let mut a = answer(&m, 100);
            // Pad with a TXT-like tail of 1 KiB in the additional section.
            a[11] = 1;
            a.extend_from_slice(&[0, 0, 16, 0, 1, 0, 0, 0, 60, 4, 0]);
            a.extend_from_slice(&[7u8; 1024]);
            c.insert(&key, &a, t0);
            assert!(c.bytes() <= cap, "{} bytes held", c.bytes());
        }
        assert!(c.len() >= 5, "{} entries", c.len());
        assert!(c.stats().evictions >= 490);
    }
}
