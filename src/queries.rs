//! The in-flight table: every client query between admission and its
//! answer, with the counts that admission is checked against, the merging
//! of identical questions and each query's deadline.
//!
//! Invariants, kept here and nowhere else:
//! - a [`QueryRef`] names one query for its whole life; once the query is
//!   settled its slot may be reused, and the generation tells the new
//!   query from the old, so a late answer or timer is dropped, never
//!   misdelivered;
//! - the per-address count of an address is the number of its queries in
//!   the table (admit adds one, settle removes one);
//! - a question has at most one leader in flight; the followers merged
//!   behind it are answered with its answer, or fail with it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use slab::Slab;

use crate::timers::{Timer, Timers};
use crate::wire::Query;

/// Which pending query something belongs to: a slab key plus the
/// generation that slot had when the query was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueryRef {
    pub key: u32,
    pub gen: u32,
}

/// Where an answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Udp {
        listener: usize,
        peer: SocketAddr,
    },
    Tcp {
        key: usize,
        gen: u32,
    },
    /// The proxy's own refresh of a cache entry: the answer goes to the
    /// cache (and to identical queries merged behind it) only.
    Prefetch,
}

/// Where and when a query was last sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub upstream: usize,
    pub conn: usize,
    pub conn_gen: u32,
    pub id: u16,
    pub at: Instant,
}

/// A query waiting for its answer.
pub struct Pending {
    gen: u32,
    origin: Origin,
    /// The key its per-address count is kept under (`None`: exempt).
    client: Option<IpAddr>,
    query: Query,
    /// The query as sent upstream (padded), with the client's ID: re-sent
    /// as is.
    msg: Vec<u8>,
    /// The size of the query as the client sent it: what answers of our
    /// own over UDP must not exceed.
    client_len: usize,
    deadline: Instant,
    attempts: u8,
    sent: Option<Sent>,
    /// The upstream of the last attempt, avoided on a re-send.
    last_upstream: Option<usize>,
    /// The key identical questions meet under, when merging is on.
    key: Option<Box<[u8]>>,
    followers: Vec<QueryRef>,
    /// Its client already got a stale answer; the real one only refreshes
    /// the cache.
    stale_served: bool,
}

impl Pending {
    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn query(&self) -> &Query {
        &self.query
    }

    pub fn msg(&self) -> &[u8] {
        &self.msg
    }

    pub fn client_len(&self) -> usize {
        self.client_len
    }

    pub fn attempts(&self) -> u8 {
        self.attempts
    }

    pub fn sent(&self) -> Option<Sent> {
        self.sent
    }

    pub fn last_upstream(&self) -> Option<usize> {
        self.last_upstream
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// Record one send attempt.
    pub fn sent_on(&mut self, sent: Sent) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_upstream = Some(sent.upstream);
        self.sent = Some(sent);
    }

    /// The connection it was on closed without answering. When that
    /// connection answered later queries, it was not this query that broke
    /// it: the re-send is free (the deadline still bounds it).
    pub fn orphaned(&mut self, conn_answered_at: Option<Instant>) {
        if self.sent.is_some_and(|s| conn_answered_at.is_some_and(|t| t >= s.at)) {
            self.attempts = self.attempts.saturating_sub(1);
        }
        self.sent = None;
    }

    pub fn stale_served(&self) -> bool {
        self.stale_served
    }

    pub fn serve_stale(&mut self) {
        self.stale_served = true;
    }

    /// Take the followers (for answering or failing them with this one).
    pub fn take_followers(&mut self) -> Vec<QueryRef> {
        std::mem::take(&mut self.followers)
    }

    /// Give back the message buffer, for reuse.
    pub fn into_msg(self) -> Vec<u8> {
        self.msg
    }
}

/// A query to admit.
pub struct NewQuery {
    pub origin: Origin,
    /// The query's size as the client sent it (before padding).
    pub client_len: usize,
    /// The per-address key of its client (`config::PerAddress::key`);
    /// `None` when exempt from the per-address limit.
    pub client: Option<IpAddr>,
    pub query: Query,
    pub msg: Vec<u8>,
    /// The merge key, `None` when merging is off.
    pub key: Option<Box<[u8]>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A new query: send it.
    Queued(QueryRef),
    /// The same question is already on its way: this one waits for that
    /// answer instead of asking again.
    Merged(QueryRef),
}

pub struct Queries {
    slab: Slab<Pending>,
    next_gen: u32,
    per_client: HashMap<IpAddr, u32>,
    leaders: HashMap<Box<[u8]>, QueryRef>,
    max_inflight: usize,
    max_per_client: u32,
    /// Prefetches in flight.
    prefetches: usize,
}

impl Queries {
    pub fn new(max_inflight: usize, max_per_client: u32) -> Queries {
        Queries {
            slab: Slab::new(),
            next_gen: 0,
            per_client: HashMap::new(),
            leaders: HashMap::new(),
            max_inflight,
            max_per_client,
            prefetches: 0,
        }
    }

    /// New limits apply to admissions from now on.
    pub fn set_limits(&mut self, max_inflight: usize, max_per_client: u32) {
        self.max_inflight = max_inflight;
        self.max_per_client = max_per_client;
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn in_flight_from(&self, client: IpAddr) -> u32 {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    /// Admit `new` with its own `deadline` (each query keeps the timeout it
    /// was admitted under; a reload changes it for later queries only).
    /// Over `max_inflight` or the client's per-address cap the query is
    /// busy and comes back (`Err`), to be answered REFUSED.
    pub fn admit(&mut self, new: NewQuery, deadline: Instant, timers: &mut Timers) -> Result<Admit, Box<NewQuery>> {
        let over_per_client = new
            .client
            .is_some_and(|c| self.in_flight_from(c) >= self.max_per_client);
        if self.slab.len() >= self.max_inflight || over_per_client {
            return Err(Box::new(new));
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let leader = new
            .key
            .as_ref()
            .and_then(|k| self.leaders.get(k).copied())
            .filter(|&l| self.get(l).is_some());
        let client = new.client;
        let entry = self.slab.vacant_entry();
        let q = QueryRef {
            key: entry.key() as u32,
            gen,
        };
        let key = new.key;
        if leader.is_none() {
            if let Some(k) = &key {
                self.leaders.insert(k.clone(), q);
            }
        }
        entry.insert(Pending {
            gen,
            origin: new.origin,
            client,
            query: new.query,
            msg: new.msg,
            client_len: new.client_len,
            deadline,
            attempts: 0,
            sent: None,
            last_upstream: None,
            key,
            followers: Vec::new(),
            stale_served: false,
        });
        if let Some(c) = client {
            *self.per_client.entry(c).or_insert(0) += 1;
        }
        timers.add(deadline, Timer::Deadline(q));
        Ok(match leader {
            Some(l) => {
                if let Some(p) = self.get_mut(l) {
                    p.followers.push(q);
                }
                Admit::Merged(q)
            }
            None => Admit::Queued(q),
        })
    }

    pub fn get(&self, q: QueryRef) -> Option<&Pending> {
        self.slab.get(q.key as usize).filter(|p| p.gen == q.gen)
    }

    pub fn get_mut(&mut self, q: QueryRef) -> Option<&mut Pending> {
        self.slab.get_mut(q.key as usize).filter(|p| p.gen == q.gen)
    }

    /// Whether a query for `key` is in flight (a refresh would repeat it).
    pub fn in_flight_for(&self, key: &[u8]) -> bool {
        self.leaders.get(key).is_some_and(|&l| self.get(l).is_some())
    }

    /// Whether `q` is still waiting and its deadline has passed.
    pub fn is_due(&self, q: QueryRef, now: Instant) -> bool {
        self.get(q).is_some_and(|p| p.deadline <= now)
    }

    /// Remove a finished query and release what it counted against. Its
    /// followers stay in the table until the caller settles each of them.
    pub fn settle(&mut self, q: QueryRef) -> Option<Pending> {
        self.get(q)?;
        let p = self.slab.try_remove(q.key as usize)?;
        if p.origin == Origin::Prefetch {
            self.prefetches -= 1;
        }
        if let Some(k) = &p.key {
            if self.leaders.get(k) == Some(&q) {
                self.leaders.remove(k);
            }
        }
        if let Some(c) = p.client {
            if let Some(n) = self.per_client.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.per_client.remove(&c);
                }
            }
        }
        Some(p)
    }

    /// Every query in the table, for shutdown.
    pub fn all(&self) -> Vec<QueryRef> {
        self.slab
            .iter()
            .map(|(k, p)| QueryRef {
                key: k as u32,
                gen: p.gen,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn new_query(ip: [u8; 4], name: &str, merge: bool) -> NewQuery {
        let msg = crate::wire::tests::query(7, name, 1, None);
        let query = crate::wire::query::parse_query(&msg, 4096).unwrap();
        let key = merge.then(|| {
            let mut k = Vec::new();
            query.key_into(&mut k);
            k.into_boxed_slice()
        });
        NewQuery {
            client_len: msg.len(),
            origin: Origin::Udp {
                listener: 0,
                peer: SocketAddr::from((ip, 5353)),
            },
            client: Some(IpAddr::from(ip)),
            query,
            msg,
            key,
        }
    }

    fn admitted(r: Result<Admit, Box<NewQuery>>) -> Admit {
        r.ok().unwrap()
    }

    #[test]
    fn admission_counts_per_address_and_in_total() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut qs = Queries::new(3, 2);
        let a = [10, 0, 0, 1];
        let b = [10, 0, 0, 2];
        let dl = t0 + Duration::from_secs(1);
        let Admit::Queued(q1) = admitted(qs.admit(new_query(a, "a.test", false), dl, &mut timers)) else {
            panic!()
        };
        admitted(qs.admit(new_query(a, "b.test", false), dl, &mut timers));
        // The address is at its cap; another address is not.
        assert!(qs.admit(new_query(a, "c.test", false), dl, &mut timers).is_err());
        admitted(qs.admit(new_query(b, "c.test", false), dl, &mut timers));
        // The table is at its cap.
        assert!(qs.admit(new_query(b, "d.test", false), dl, &mut timers).is_err());
        assert_eq!(qs.in_flight_from(IpAddr::from(a)), 2);
        assert!(qs.settle(q1).is_some());
        assert_eq!(qs.in_flight_from(IpAddr::from(a)), 1);
        admitted(qs.admit(new_query(a, "e.test", false), dl, &mut timers));
        // Raised limits apply at once.
        qs.set_limits(10, 10);
        admitted(qs.admit(new_query(a, "f.test", false), dl, &mut timers));
        assert_eq!(qs.len(), 4);
    }

    #[test]
    fn identical_questions_merge_behind_one_leader() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut qs = Queries::new(100, 100);
        let dl = t0 + Duration::from_secs(1);
        let Admit::Queued(leader) = admitted(qs.admit(new_query([1, 1, 1, 1], "x.test", true), dl, &mut timers)) else {
            panic!()
        };
        // Another client, other letter case: the same question.
        let Admit::Merged(f) = admitted(qs.admit(new_query([2, 2, 2, 2], "X.Test", true), dl, &mut timers)) else {
            panic!()
        };
        // Merging off for this one: its own query.
        assert!(matches!(
            admitted(qs.admit(new_query([2, 2, 2, 2], "x.test", false), dl, &mut timers)),
            Admit::Queued(_)
        ));
        let mut p = qs.settle(leader).unwrap();
        assert_eq!(p.take_followers(), vec![f]);
        assert!(qs.get(f).is_some());
        // With the leader gone, the next identical question leads anew.
        assert!(matches!(
            admitted(qs.admit(new_query([3, 3, 3, 3], "x.test", true), dl, &mut timers)),
            Admit::Queued(_)
        ));
    }

    #[test]
    fn settled_slots_are_reused_under_a_new_generation() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut qs = Queries::new(100, 100);
        let dl = t0 + Duration::from_secs(1);
        let Admit::Queued(old) = admitted(qs.admit(new_query([1, 1, 1, 1], "x.test", false), dl, &mut timers)) else {
            panic!()
        };
        qs.settle(old).unwrap();
        let Admit::Queued(new) = admitted(qs.admit(new_query([1, 1, 1, 1], "y.test", false), dl, &mut timers)) else {
            panic!()
        };
        assert_eq!(old.key, new.key);
        assert!(qs.get(old).is_none());
        assert!(qs.settle(old).is_none());
        assert!(qs.get(new).is_some());
    }

    #[test]
    fn each_query_expires_at_its_own_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut timers = Timers::default();
        let mut qs = Queries::new(100, 100);
        let Admit::Queued(slow) =
            admitted(qs.admit(new_query([1, 1, 1, 1], "a.test", false), t0 + ms(5000), &mut timers))
        else {
            panic!()
        };
        // Admitted later under a lowered timeout: due first.
        let Admit::Queued(fast) =
            admitted(qs.admit(new_query([1, 1, 1, 1], "b.test", false), t0 + ms(10 + 200), &mut timers))
        else {
            panic!()
        };
        let now = t0 + ms(300);
        let mut due = Vec::new();
        while let Some(Timer::Deadline(q)) = timers.pop_due(now) {
            if qs.is_due(q, now) {
                due.push(q);
            }
        }
        assert_eq!(due, vec![fast]);
        assert!(!qs.is_due(slow, now));
        assert!(qs.is_due(slow, t0 + ms(5000)));
        // An answered query's timer fires into nothing.
        qs.settle(slow).unwrap();
        assert!(!qs.is_due(slow, t0 + ms(6000)));
    }

    #[test]
    fn a_resend_is_free_when_the_connection_answered_after_it_was_sent() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut qs = Queries::new(100, 100);
        let Admit::Queued(q) = admitted(qs.admit(
            new_query([1, 1, 1, 1], "a.test", false),
            t0 + Duration::from_secs(1),
            &mut timers,
        )) else {
            panic!()
        };
        let p = qs.get_mut(q).unwrap();
        let sent = Sent {
            upstream: 0,
            conn: 0,
            conn_gen: 1,
            id: 9,
            at: t0,
        };
        p.sent_on(sent);
        p.orphaned(Some(t0 + Duration::from_millis(5)));
        assert_eq!(p.attempts(), 0);
        p.sent_on(sent);
        p.orphaned(None);
        assert_eq!(p.attempts(), 1);
        assert_eq!(p.last_upstream(), Some(0));
        assert!(p.sent().is_none());
    }
}
