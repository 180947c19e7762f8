//! The upstreams: their connections, health, selection, back-off and
//! forwarding zones, and applying a reload to them.
//!
//! Invariants kept here:
//! - a query is routed by its name at every send (first or re-send) against
//!   the zones in force at that moment, so a reload can never send it to
//!   the resolver of a zone that was removed or renumbered;
//! - a connection is closed only in [`Pool::reap`], which hands back every
//!   query still waiting on it; everything else only marks it (`doom`), so
//!   no handler closes a connection under another one's feet;
//! - an upstream in back-off is never chosen; an upstream of another zone
//!   never either.

use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Interest, Registry};
use slab::Slab;

use super::conn::{Answer, CloseReason, Drain, UpstreamConn};
use super::ids::IdRng;
use crate::config::{Config, Upstream as UpstreamConfig};
use crate::queries::{QueryRef, Sent};
use crate::timers::{Timer, Timers};
use crate::token::Source;
use crate::wire::name::{in_zone, zone_wire};
use crate::wire::Name;

/// Queries in flight on one upstream connection before another is opened.
const MAX_INFLIGHT_PER_CONN: usize = 1000;
/// Connections per upstream; more only when the others are full
/// (RFC 7766 §6.2.2 asks for few).
pub const MAX_CONNS_PER_UPSTREAM: usize = 4;
/// Connections in a row that went silent (a query timed out with nothing
/// heard since it was sent) before the upstream counts as failed: one slow
/// answer is not an outage, silence across several queries is.
const STALL_AFTER: u32 = 3;
/// Timed-out IDs a connection may hold before it is drained and replaced.
const MAX_TOMBSTONES: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Upper bounds (seconds) of the upstream latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// Connections per upstream in one-at-a-time mode: each carries one query
/// at a time, so more of them are needed for the same load.
pub const MAX_SERIAL_CONNS: usize = 16;
/// How long one-at-a-time mode lasts before pipelining is tried again (a
/// server can be upgraded).
const REPROBE_PIPELINING: Duration = Duration::from_secs(600);
/// Silence with queries outstanding after an answer, before a connection
/// counts as not pipelining: at least this, at most a third of the
/// timeout, otherwise twenty times the upstream's smoothed latency (a
/// resolver recursing for a cache miss takes longer than one answering
/// from its cache).
const PIPELINE_CHECK_MIN: Duration = Duration::from_millis(400);

/// Which names an upstream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The default upstreams, for names in no forwarding zone.
    Default,
    /// The upstreams of one forwarding zone (an index into the zones of
    /// the configuration in force).
    Zone(usize),
    /// Removed by a reload: never chosen, kept until its connections drain.
    Retired,
}

/// What the pool knows about an upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nothing known to be wrong.
    Up,
    /// Failed `failures` times in a row; not tried again before `retry_at`,
    /// then probed by real queries until one connection works.
    Down { failures: u32, retry_at: Instant },
}

impl Health {
    fn usable(&self, now: Instant) -> bool {
        match self {
            Health::Up => true,
            Health::Down { retry_at, .. } => *retry_at <= now,
        }
    }
}

/// Whether an upstream's server handles several queries in flight on one
/// connection (RFC 7766 §6.2.1.1 asks it to; some servers do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipelining {
    Yes,
    /// Seen not to: one query per connection at a time, until `retry_at`.
    No {
        retry_at: Instant,
    },
}

/// Counters of one upstream, for metrics.
#[derive(Debug, Default, Clone)]
pub struct UpstreamStats {
    pub connects: u64,
    pub failures: u64,
    pub resumed: u64,
    pub answers: u64,
    pub latency_buckets: [u64; LATENCY_BUCKETS.len()],
    pub latency_sum: f64,
}

struct Upstream {
    cfg: UpstreamConfig,
    role: Role,
    /// Smoothed answer latency in seconds, learned from real traffic.
    srtt: Option<f64>,
    /// Shared by all upstreams, or this upstream's own when it has pins or
    /// its own CA.
    tls: Arc<rustls::ClientConfig>,
    /// A digest of what it trusts beyond its configuration: the contents
    /// of the CA file in force, so a reload sees a changed file.
    trust: u64,
    label: String,
    conns: Vec<usize>,
    health: Health,
    /// Connections that went silent since it last sent anything.
    stalls: u32,
    pipelining: Pipelining,
    stats: UpstreamStats,
}

impl Upstream {
    /// Whether its connections carry one query at a time now.
    fn serial(&self, now: Instant) -> bool {
        matches!(self.pipelining, Pipelining::No { retry_at } if retry_at > now)
    }
}

/// A read-only view of one upstream, for metrics.
pub struct UpstreamView<'a> {
    pub label: &'a str,
    pub up: bool,
    pub pipelining: bool,
    pub connections: usize,
    pub inflight: usize,
    pub stats: &'a UpstreamStats,
}

/// A query whose connection closed before it was answered.
#[derive(Debug, Clone, Copy)]
pub struct Orphan {
    pub query: QueryRef,
    /// When that connection last answered anything.
    pub answered_at: Option<Instant>,
}

/// A query to send.
pub struct Outgoing<'a> {
    /// Its name: the zone that serves it is looked up at every send.
    pub name: &'a Name,
    /// The upstream a re-sent query failed on: used only when nothing else
    /// is left.
    pub avoid: Option<usize>,
    pub query: QueryRef,
    pub msg: &'a [u8],
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub upstreams: usize,
    pub zones: usize,
}

pub struct Pool {
    /// A slab: keys stay put when a retired upstream is dropped.
    upstreams: Slab<Upstream>,
    conns: Slab<UpstreamConn>,
    /// Forwarding zones, canonical wire form; the index is the zone's role.
    zones: Vec<Vec<u8>>,
    rng: IdRng,
    next_gen: u32,
    /// The query timeout: also the bound on connect plus handshake.
    timeout: Duration,
    /// `--max-upstream-conn-queries`, 0 = no limit.
    max_conn_queries: u64,
    dirty: Vec<usize>,
    /// Connections whose read stopped at its budget: read again next turn.
    revisit: Vec<usize>,
    doomed: Vec<(usize, CloseReason)>,
    /// Failures to count once the orphans of a broken stream are re-sent.
    deferred: Vec<(usize, String)>,
}

impl Pool {
    pub fn new(cfg: &Config) -> Result<Pool, String> {
        let mut pool = Pool {
            upstreams: Slab::new(),
            conns: Slab::new(),
            zones: Vec::new(),
            rng: IdRng::default(),
            next_gen: 0,
            timeout: cfg.timeout,
            max_conn_queries: cfg.limits.max_upstream_conn_queries,
            dirty: Vec::new(),
            revisit: Vec::new(),
            doomed: Vec::new(),
            deferred: Vec::new(),
        };
        let (upstreams, zones) = build(cfg)?;
        for u in upstreams {
            match u.role {
                Role::Zone(z) => info!("upstream {} for {}", u.cfg, zone_label(zones.get(z))),
                _ => info!("upstream {}", u.cfg),
            }
            pool.upstreams.insert(u);
        }
        pool.zones = zones;
        Ok(pool)
    }

    /// The role that serves `name`: the longest forwarding zone that
    /// contains it, else the default upstreams.
    fn route(&self, name: &Name) -> Role {
        let name = name.as_bytes();
        let mut best: Option<(usize, usize)> = None;
        for (i, zone) in self.zones.iter().enumerate() {
            if in_zone(name, zone) && best.is_none_or(|(len, _)| zone.len() > len) {
                best = Some((zone.len(), i));
            }
        }
        best.map_or(Role::Default, |(_, i)| Role::Zone(i))
    }

    /// Send a query on the best connection for its name: `None` when no
    /// upstream of its zone can take it now (all in back-off, or
    /// saturated), and then it fails at once, not after the timeout
    /// (RFC 7858 §3.1).
    pub fn send(&mut self, out: Outgoing<'_>, now: Instant, registry: &Registry, timers: &mut Timers) -> Option<Sent> {
        let Outgoing {
            name,
            avoid,
            query: q,
            msg,
        } = out;
        let role = self.route(name);
        // Each round either sends or marks one upstream down, so this ends.
        for _ in 0..=self.upstreams.len() {
            let u = self.choose_upstream(role, avoid, now)?;
            let Some(ck) = self.choose_conn(u, now, registry, timers) else {
                continue;
            };
            let Some(conn) = self.conns.get_mut(ck) else {
                continue;
            };
            let Some(id) = conn.send(q, msg, &mut self.rng, now) else {
                continue;
            };
            if self.max_conn_queries > 0 && conn.sent() >= self.max_conn_queries {
                // Rotated: this one finishes what it has, new queries go to
                // a fresh connection.
                conn.drain(Drain::Rotated);
            }
            let sent = Sent {
                upstream: u,
                conn: ck,
                conn_gen: conn.gen(),
                id,
                at: now,
            };
            if conn.mark_dirty() {
                self.dirty.push(ck);
            }
            return Some(sent);
        }
        None
    }

    /// The usable upstream of `role` with the least expected wait: queries
    /// outstanding times smoothed latency, so a slow or loaded resolver
    /// gets less.
    fn choose_upstream(&mut self, role: Role, avoid: Option<usize>, now: Instant) -> Option<usize> {
        // An upstream without samples yet scores as the fastest, so it is
        // tried at once rather than starved.
        let chosen = self
            .upstreams
            .iter()
            .filter(|(_, u)| u.role == role && u.health.usable(now))
            .map(|(i, u)| {
                let score = (self.inflight(u) + 1) as f64 * u.srtt.unwrap_or(0.0).max(0.0001);
                (Some(i) == avoid, score, i)
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)))
            .map(|(_, _, i)| i)?;
        // What is not measured is forgotten slowly: the others' latency
        // decays, so a resolver that was slow gets a fresh sample now and
        // then (about one query in a few hundred) instead of never again.
        for (i, u) in self.upstreams.iter_mut() {
            if i != chosen && u.role == role {
                if let Some(s) = &mut u.srtt {
                    *s *= 0.98;
                }
            }
        }
        Some(chosen)
    }

    fn inflight(&self, u: &Upstream) -> usize {
        u.conns
            .iter()
            .filter_map(|&c| self.conns.get(c))
            .map(|c| c.live())
            .sum()
    }

    fn is_doomed(&self, key: usize) -> bool {
        self.doomed.iter().any(|(k, _)| *k == key)
    }

    /// A connection of upstream `u` with room, opening one when all are
    /// full. `None` when the upstream cannot take the query (and then it
    /// has been marked down, or it is saturated).
    fn choose_conn(&mut self, u: usize, now: Instant, registry: &Registry, timers: &mut Timers) -> Option<usize> {
        let up = self.upstreams.get(u)?;
        let serial = up.serial(now);
        let usable = |k: usize, c: &UpstreamConn| {
            c.accepts_queries() && c.live() < MAX_INFLIGHT_PER_CONN && !self.is_doomed(k) && c.is_serial() == serial
        };
        let best = up
            .conns
            .iter()
            .filter_map(|&k| self.conns.get(k).map(|c| (k, c)))
            .filter(|&(k, c)| usable(k, c))
            .min_by_key(|(_, c)| c.live())
            .map(|(k, c)| (k, c.live()));
        let cap = if serial {
            MAX_SERIAL_CONNS
        } else {
            MAX_CONNS_PER_UPSTREAM
        };
        match best {
            // One at a time: a free connection, else a new one while under
            // the cap, else wait in the least loaded one's queue.
            Some((k, live)) if !serial || live == 0 || up.conns.len() >= cap => Some(k),
            _ if up.conns.len() >= cap => None,
            _ => self.open(u, now, registry, timers),
        }
    }

    fn open(&mut self, u: usize, now: Instant, registry: &Registry, timers: &mut Timers) -> Option<usize> {
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let up = self.upstreams.get_mut(u)?;
        up.stats.connects += 1;
        let opened = if up.cfg.plain {
            UpstreamConn::connect_plain(u, gen, up.cfg.addr, now)
        } else {
            UpstreamConn::connect(u, gen, up.cfg.addr, &up.cfg.name, &up.tls, now)
        };
        let mut conn = match opened {
            Ok(c) => c,
            Err(reason) if reason.is_local_exhaustion() => {
                // Our descriptors ran out, not the server: no back-off,
                // the query fails now and the next one tries again.
                warn_exhausted(&reason);
                return None;
            }
            Err(reason) => {
                self.upstream_failed(u, &reason, now);
                return None;
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(conn.source(), Source::Upstream(key).token(), interest) {
            self.upstream_failed(u, &CloseReason::Connect(e), now);
            return None;
        }
        if up.serial(now) {
            conn.set_serial();
        } else if matches!(up.pipelining, Pipelining::No { .. }) {
            up.pipelining = Pipelining::Yes;
            info!("upstream {}: trying pipelining again", up.cfg);
        }
        entry.insert(conn);
        up.conns.push(key);
        timers.add(now + self.timeout, Timer::Handshake { conn: key, gen });
        debug!("upstream {}: connecting", up.cfg);
        Some(key)
    }

    fn upstream_failed(&mut self, u: usize, reason: &dyn Display, now: Instant) {
        let jitter = f64::from(self.rng.next_u16()) / 65536.0;
        let Some(up) = self.upstreams.get_mut(u) else { return };
        up.stats.failures += 1;
        let (failures, was_up) = match up.health {
            Health::Up => (1, true),
            Health::Down { failures, .. } => (failures.saturating_add(1), false),
        };
        let backoff = backoff(failures, jitter);
        up.health = Health::Down {
            failures,
            retry_at: now + backoff,
        };
        if was_up {
            warn!(
                "upstream {} down: {reason}; retrying in {} ms",
                up.cfg,
                backoff.as_millis()
            );
        } else {
            debug!("upstream {}: {reason}; retrying in {} ms", up.cfg, backoff.as_millis());
        }
    }

    /// Readiness on connection `key`: the handshake moves on, answers are
    /// read (take them with [`next_answer`](Self::next_answer)).
    pub fn conn_event(&mut self, key: usize, scratch: &mut [u8], now: Instant, timers: &mut Timers) {
        if self.is_doomed(key) {
            return;
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let result = conn.on_ready(scratch, now);
        if conn.has_more() && !self.revisit.contains(&key) {
            self.revisit.push(key);
        }
        match result {
            Ok(true) => {
                let (u, resumed) = (conn.upstream(), conn.resumed());
                let at = now + super::conn::IDLE;
                if conn.arm_idle(at) {
                    timers.add(
                        at,
                        Timer::ConnIdle {
                            conn: key,
                            gen: conn.gen(),
                        },
                    );
                }
                self.upstream_up(u, resumed);
            }
            Ok(false) => {}
            Err(reason) => self.doomed.push((key, reason)),
        }
    }

    fn upstream_up(&mut self, u: usize, resumed: bool) {
        let Some(up) = self.upstreams.get_mut(u) else { return };
        if matches!(up.health, Health::Down { .. }) {
            info!("upstream {} up", up.cfg);
        }
        debug!(
            "upstream {}: connected{}",
            up.cfg,
            if resumed { " (resumed)" } else { "" }
        );
        up.health = Health::Up;
        if resumed {
            up.stats.resumed += 1;
        }
    }

    /// The next whole message read on connection `key`, into `frame`.
    /// `None` when there is none; then a connection that has drained is
    /// marked for closing and one with output is put on the flush list.
    pub fn next_answer(
        &mut self,
        key: usize,
        frame: &mut Vec<u8>,
        now: Instant,
        timers: &mut Timers,
    ) -> Option<Answer> {
        let conn = self.conns.get_mut(key)?;
        match conn.next_answer(frame, now) {
            Some(Ok(answer)) => {
                // Any message, a late one too, shows the server alive.
                if let Some(up) = self.upstreams.get_mut(conn.upstream()) {
                    up.stalls = 0;
                    // It answered the oldest query and others remain: if
                    // it now falls silent, it may not pipeline.
                    if let Some(since) = conn.suspect() {
                        if conn.arm_check() {
                            let at = since + pipeline_check(up.srtt, self.timeout);
                            timers.add(
                                at,
                                Timer::PipelineCheck {
                                    conn: key,
                                    gen: conn.gen(),
                                },
                            );
                        }
                    }
                }
                return Some(answer);
            }
            Some(Err(reason)) => self.doomed.push((key, reason)),
            None if conn.drained() => self.doomed.push((key, CloseReason::Recycled)),
            None if conn.has_output() && conn.mark_dirty() => self.dirty.push(key),
            None => {}
        }
        None
    }

    /// An answer taken for `q` was not its answer after all.
    pub fn restore(&mut self, conn: usize, id: u16, q: QueryRef) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.restore(id, q);
        }
    }

    /// The server's edns-tcp-keepalive timeout, seen in an answer.
    pub fn keepalive(&mut self, key: usize, timeout: u16, timers: &mut Timers) {
        if let Some(c) = self.conns.get_mut(key) {
            c.keepalive(timeout);
            let at = c.idle_due();
            if c.arm_idle(at) {
                timers.add(
                    at,
                    Timer::ConnIdle {
                        conn: key,
                        gen: c.gen(),
                    },
                );
            }
        }
    }

    /// Learn from one answer's latency.
    pub fn observe(&mut self, u: usize, d: Duration) {
        let Some(up) = self.upstreams.get_mut(u) else { return };
        let secs = d.as_secs_f64();
        up.stats.answers += 1;
        up.stats.latency_sum += secs;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| secs <= le) {
            up.stats.latency_buckets[i] += 1;
        }
        up.srtt = Some(up.srtt.map_or(secs, |s| 0.8 * s + 0.2 * secs));
    }

    /// Query `q` reached its deadline. Its ID stays taken on the connection
    /// (a late answer must not match a newer query); a connection that has
    /// said nothing since the query went out has stalled and is replaced.
    pub fn timed_out(&mut self, last_upstream: Option<usize>, sent: Option<Sent>, q: QueryRef) {
        if let Some(up) = last_upstream.and_then(|u| self.upstreams.get_mut(u)) {
            // A timeout is the worst latency there is: steer traffic away.
            let srtt = up.srtt.unwrap_or(0.0);
            up.srtt = Some(0.8 * srtt + 0.2 * self.timeout.as_secs_f64());
        }
        let Some(sent) = sent else { return };
        let Some(conn) = self.conns.get_mut(sent.conn).filter(|c| c.gen() == sent.conn_gen) else {
            return;
        };
        conn.bury(sent.id, q);
        if conn.was_ready() && conn.last_answer().is_none_or(|t| t <= sent.at) {
            // Silent since the query went out: replace the connection now
            // and re-send the rest; whether the upstream failed is decided
            // at the close, by its streak of silent connections.
            self.doomed.push((sent.conn, CloseReason::Stalled));
        } else if conn.tombstones() > MAX_TOMBSTONES && conn.accepts_queries() {
            conn.drain(Drain::LateAnswers);
            if conn.drained() {
                self.doomed.push((sent.conn, CloseReason::Recycled));
            }
        }
    }

    /// A connection timer fired.
    pub fn on_timer(&mut self, timer: Timer, now: Instant, timers: &mut Timers) {
        match timer {
            Timer::PipelineCheck { conn, gen } => self.check_pipelining(conn, gen, now, timers),
            Timer::Handshake { conn, gen }
                if self.conns.get(conn).is_some_and(|c| c.gen() == gen && !c.was_ready()) =>
            {
                self.doomed.push((conn, CloseReason::HandshakeTimeout));
            }
            Timer::ConnIdle { conn, gen } => {
                let Some(c) = self.conns.get_mut(conn).filter(|c| c.gen() == gen) else {
                    return;
                };
                if !c.idle_fired(now) {
                    return;
                }
                let due = c.idle_due();
                if c.live() == 0 && due <= now {
                    self.doomed.push((conn, CloseReason::Idle));
                } else {
                    let at = due.max(now + Duration::from_millis(100));
                    if c.arm_idle(at) {
                        timers.add(at, timer);
                    }
                }
            }
            _ => {}
        }
    }

    /// A connection that answered while others were outstanding: still
    /// silent since, with queries outstanding, for the check period? Then
    /// its server does not pipeline (it handles one query at a time and
    /// dropped the rest): the connection is closed, its queries re-sent
    /// at once (in time for their clients), and the upstream used one
    /// query per connection until pipelining is tried again.
    fn check_pipelining(&mut self, key: usize, gen: u32, now: Instant, timers: &mut Timers) {
        let Some(c) = self.conns.get_mut(key).filter(|c| c.gen() == gen) else {
            return;
        };
        c.check_fired();
        let Some(up) = self.upstreams.get_mut(c.upstream()) else {
            return;
        };
        let Some(since) = c.suspect().filter(|_| c.outstanding() > 0) else {
            return;
        };
        match since + pipeline_check(up.srtt, self.timeout) {
            due if due > now => {
                if c.arm_check() {
                    timers.add(due, Timer::PipelineCheck { conn: key, gen });
                }
            }
            _ => {
                if !up.serial(now) {
                    warn!(
                        "upstream {}: answered one query and fell silent with {} outstanding: it does not pipeline; \
                         sending one query per connection for {} s",
                        up.cfg,
                        c.outstanding(),
                        REPROBE_PIPELINING.as_secs()
                    );
                }
                up.pipelining = Pipelining::No {
                    retry_at: now + REPROBE_PIPELINING,
                };
                self.doomed.push((key, CloseReason::NotPipelining));
            }
        }
    }

    /// Write what every connection with output has.
    pub fn flush(&mut self) {
        let mut keys = std::mem::take(&mut self.dirty);
        for &k in &keys {
            let Some(conn) = self.conns.get_mut(k) else { continue };
            conn.clear_dirty();
            if let Err(reason) = conn.flush() {
                self.doomed.push((k, reason));
            }
        }
        keys.clear();
        if self.dirty.is_empty() {
            self.dirty = keys;
        }
    }

    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty() || !self.doomed.is_empty() || !self.revisit.is_empty()
    }

    /// Connections to read again this turn (their last read was cut short).
    pub fn take_revisits(&mut self, out: &mut Vec<usize>) {
        out.clear();
        out.append(&mut self.revisit);
    }

    /// Close every connection marked for closing; their unanswered queries
    /// go to `orphans` for one re-send. Returns whether anything closed.
    pub fn reap(&mut self, now: Instant, registry: &Registry, orphans: &mut Vec<Orphan>) -> bool {
        let doomed = std::mem::take(&mut self.doomed);
        let any = !doomed.is_empty();
        let mut live = Vec::new();
        for (key, reason) in doomed {
            let Some(mut conn) = self.conns.try_remove(key) else {
                continue;
            };
            let in_flight = conn.live() > 0;
            conn.close(&reason, &mut live);
            let _ = registry.deregister(conn.source());
            let u = conn.upstream();
            if let Some(up) = self.upstreams.get_mut(u) {
                up.conns.retain(|&c| c != key);
            }
            let mut failed = reason.is_failure(conn.was_ready(), conn.last_answer().is_some(), in_flight);
            if matches!(reason, CloseReason::Stalled) {
                if let Some(up) = self.upstreams.get_mut(u) {
                    up.stalls += 1;
                    failed = up.stalls >= STALL_AFTER;
                }
            }
            // A stream that broke after a good handshake (a garbage frame
            // or record) is likely this connection's trouble: its queries
            // get their re-send even when this is the only upstream, and
            // the back-off starts after. A server that refuses, fails the
            // handshake or hangs up without answering gets the back-off
            // first, so retries do not hammer it.
            let resend_first =
                failed && conn.was_ready() && matches!(reason, CloseReason::BadFrame(_) | CloseReason::Tls(_));
            if resend_first {
                self.deferred.push((u, reason.to_string()));
            } else if failed {
                self.upstream_failed(u, &reason, now);
            } else if let Some(up) = self.upstreams.get(u) {
                debug!("upstream {}: connection closed: {reason}", up.cfg);
            }
            let answered_at = conn.last_answer();
            orphans.extend(live.drain(..).map(|query| Orphan { query, answered_at }));
        }
        if any {
            self.forget_retired();
        }
        any
    }

    /// Count the failures deferred by [`reap`](Self::reap), once the
    /// orphans have been re-sent.
    pub fn after_resend(&mut self, now: Instant) {
        for (u, why) in std::mem::take(&mut self.deferred) {
            self.upstream_failed(u, &why, now);
        }
        // Retired upstreams whose last connection drained are forgotten by
        // the metrics only at restart: their counters stay meaningful.
    }

    /// Mark every connection for closing (shutdown).
    pub fn close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.doomed.push((k, CloseReason::Shutdown));
        }
    }

    /// Healthy while some upstream has a working connection, or has not
    /// failed since its last success (nothing is known to be wrong yet).
    pub fn healthy(&self) -> bool {
        self.upstreams.iter().any(|(_, u)| {
            u.health == Health::Up
                || u.conns
                    .iter()
                    .filter_map(|&c| self.conns.get(c))
                    .any(|c| c.was_ready() && c.accepts_queries())
        })
    }

    pub fn upstreams(&self, now: Instant) -> impl Iterator<Item = UpstreamView<'_>> {
        self.upstreams.iter().map(move |(_, u)| UpstreamView {
            label: &u.label,
            up: u.health == Health::Up && u.health.usable(now),
            pipelining: !u.serial(now),
            connections: u.conns.len(),
            inflight: self.inflight(u),
            stats: &u.stats,
        })
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Apply a new configuration: unchanged upstreams (same address and
    /// authentication) keep their connections, health and counters; new
    /// ones are added; removed ones drain. Zones are replaced as a whole,
    /// and every later send routes by them.
    pub fn reload(&mut self, cfg: &Config) -> Result<Reloaded, String> {
        let (fresh, zones) = build(cfg)?;
        let mut kept: Vec<usize> = Vec::new();
        for new in fresh {
            // Same resolver, same name and pins, same CA path and same CA
            // file contents: keep the running one. Anything else about what
            // it trusts changed: a new upstream, so new handshakes use the
            // new trust and the old connections drain.
            let same = self
                .upstreams
                .iter()
                .find(|(i, u)| !kept.contains(i) && u.role != Role::Retired && u.cfg == new.cfg && u.trust == new.trust)
                .map(|(i, _)| i);
            match same {
                Some(i) => {
                    kept.push(i);
                    if let Some(u) = self.upstreams.get_mut(i) {
                        u.role = new.role;
                    }
                }
                None => {
                    match new.role {
                        Role::Zone(z) => info!("upstream {} for {} added", new.cfg, zone_label(zones.get(z))),
                        _ => info!("upstream {} added", new.cfg),
                    }
                    kept.push(self.upstreams.insert(new));
                }
            }
        }
        let retire: Vec<usize> = self
            .upstreams
            .iter()
            .map(|(i, _)| i)
            .filter(|i| !kept.contains(i))
            .collect();
        for i in retire {
            let Some(u) = self.upstreams.get_mut(i) else { continue };
            if u.role != Role::Retired {
                info!("upstream {} removed", u.cfg);
                u.role = Role::Retired;
            }
            for &c in &u.conns {
                if let Some(conn) = self.conns.get_mut(c) {
                    conn.drain(Drain::Retired);
                    if conn.drained() {
                        self.doomed.push((c, CloseReason::Recycled));
                    }
                }
            }
        }
        self.forget_retired();
        self.zones = zones;
        self.timeout = cfg.timeout;
        self.max_conn_queries = cfg.limits.max_upstream_conn_queries;
        Ok(Reloaded {
            upstreams: self.upstreams.iter().filter(|(_, u)| u.role != Role::Retired).count(),
            zones: self.zones.len(),
        })
    }

    /// Drop retired upstreams whose last connection has closed: alternating
    /// reloads must not grow the table (or the metrics) without bound.
    fn forget_retired(&mut self) {
        let gone: Vec<usize> = self
            .upstreams
            .iter()
            .filter(|(_, u)| u.role == Role::Retired && u.conns.is_empty())
            .map(|(i, _)| i)
            .collect();
        for i in gone {
            self.upstreams.remove(i);
        }
    }
}

fn warn_exhausted(reason: &CloseReason) {
    // Rare and loud by nature: the accept side (the usual culprit) is
    // already capped below the descriptor limit; debug keeps a flood quiet.
    debug!("upstream connect: {reason} (local resources exhausted; not an upstream failure)");
}

/// The silence after an answer, with queries outstanding, that marks a
/// server that does not pipeline.
fn pipeline_check(srtt: Option<f64>, timeout: Duration) -> Duration {
    let adaptive = Duration::from_secs_f64(srtt.unwrap_or(0.0).max(0.0) * 20.0);
    adaptive.max(PIPELINE_CHECK_MIN).min(timeout / 3)
}

/// Capped exponential back-off for the `failures`-th failure in a row, up
/// to a quarter less by `jitter` in [0, 1), so upstreams that failed
/// together do not come back in lockstep.
fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exp.min(BACKOFF_MAX).mul_f64(1.0 - jitter / 4.0)
}

fn zone_label(wire: Option<&Vec<u8>>) -> String {
    let mut out = String::new();
    let mut rest = wire.map_or(&[][..], |w| w.as_slice());
    while let Some((&len, tail)) = rest.split_first() {
        if len == 0 {
            break;
        }
        let label = tail.get(..usize::from(len)).unwrap_or(tail);
        out.push_str(&String::from_utf8_lossy(label));
        out.push('.');
        rest = tail.get(usize::from(len)..).unwrap_or(&[]);
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// A digest of the CA file's contents (0 for the built-in roots).
fn trust_digest(ca: Option<&std::path::Path>) -> u64 {
    use std::hash::{Hash, Hasher};
    let Some(path) = ca else { return 0 };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    // Unreadable now: build() has just read it, so this only races an
    // edit; a different digest makes the next reload rebuild, no harm.
    std::fs::read(path).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// The upstreams of a configuration, and its zones.
fn build(cfg: &Config) -> Result<(Vec<Upstream>, Vec<Vec<u8>>), String> {
    let shared = super::tls::client_config(cfg.ca_file.as_deref())?;
    let mut zones: Vec<Vec<u8>> = Vec::new();
    let mut members: Vec<(Role, &UpstreamConfig)> = cfg.upstreams.iter().map(|u| (Role::Default, u)).collect();
    for (zone, u) in &cfg.forwards {
        let wire = zone_wire(zone);
        let z = match zones.iter().position(|z| *z == wire) {
            Some(z) => z,
            None => {
                zones.push(wire);
                zones.len() - 1
            }
        };
        members.push((Role::Zone(z), u));
    }
    let mut upstreams = Vec::new();
    for (role, u) in members {
        upstreams.push(Upstream {
            role,
            srtt: None,
            cfg: u.clone(),
            tls: if u.plain {
                Arc::clone(&shared)
            } else {
                super::tls::for_upstream(&shared, cfg.ca_file.as_deref(), u)?
            },
            trust: trust_digest(u.ca_file.as_deref().or(cfg.ca_file.as_deref())),
            label: u.to_string(),
            conns: Vec::new(),
            health: Health::Up,
            stalls: 0,
            pipelining: Pipelining::Yes,
            stats: UpstreamStats::default(),
        });
    }
    Ok((upstreams, zones))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let args = args.iter().map(std::ffi::OsString::from).collect();
        match crate::config::parse(args) {
            Ok(c) => c,
            Err(_) => panic!("bad test configuration"),
        }
    }

    fn name(s: &str) -> Name {
        let msg = crate::wire::tests::query(1, s, 1, None);
        crate::wire::name::read_name(&msg, 12, false).unwrap().0
    }

    fn pool(args: &[&str]) -> Pool {
        Pool::new(&config(args)).unwrap()
    }

    #[test]
    fn names_route_to_the_longest_zone_at_every_send() {
        let mut p = pool(&[
            "--upstream",
            "192.0.2.1#dns.test",
            "--forward",
            "corp.example=192.0.2.2#corp.test",
            "--forward",
            "eu.corp.example=192.0.2.3#eu.test",
        ]);
        assert_eq!(p.route(&name("www.example")), Role::Default);
        assert_eq!(p.route(&name("a.corp.example")), Role::Zone(0));
        assert_eq!(p.route(&name("A.EU.corp.example")), Role::Zone(1));
        assert_eq!(p.route(&name("xcorp.example")), Role::Default);
        // A reload that removes the first zone renumbers the other: routing
        // follows the names, not a remembered index.
        p.reload(&config(&[
            "--upstream",
            "192.0.2.1#dns.test",
            "--forward",
            "eu.corp.example=192.0.2.3#eu.test",
        ]))
        .unwrap();
        assert_eq!(p.route(&name("a.corp.example")), Role::Default);
        assert_eq!(p.route(&name("a.eu.corp.example")), Role::Zone(0));
        let eu = p.choose_upstream(Role::Zone(0), None, Instant::now()).unwrap();
        assert_eq!(p.upstreams[eu].cfg.addr.to_string(), "192.0.2.3:853");
        // The removed zone's upstream had no connection left: forgotten.
        assert!(!p
            .upstreams
            .iter()
            .any(|(_, u)| u.cfg.addr.to_string() == "192.0.2.2:853"));
    }

    #[test]
    fn selection_prefers_the_fast_and_skips_the_failed_and_the_avoided() {
        let t0 = Instant::now();
        let mut p = pool(&["--upstream", "192.0.2.1#a.test", "--upstream", "192.0.2.2#b.test"]);
        // Unmeasured: the first wins ties.
        assert_eq!(p.choose_upstream(Role::Default, None, t0), Some(0));
        p.observe(0, Duration::from_millis(50));
        p.observe(1, Duration::from_millis(5));
        assert_eq!(p.choose_upstream(Role::Default, None, t0), Some(1));
        // The one a re-send failed on, only when nothing else is left.
        assert_eq!(p.choose_upstream(Role::Default, Some(1), t0), Some(0));
        p.upstream_failed(0, &"test", t0);
        assert_eq!(p.choose_upstream(Role::Default, Some(1), t0), Some(1));
        p.upstream_failed(1, &"test", t0);
        assert_eq!(p.choose_upstream(Role::Default, None, t0), None);
        // Back in play once the back-off has passed.
        assert_eq!(p.choose_upstream(Role::Default, None, t0 + BACKOFF_MIN), Some(1));
        assert!(!p.healthy());
    }

    #[test]
    fn back_off_doubles_up_to_its_cap_and_recovery_resets_it() {
        assert_eq!(backoff(1, 0.0), BACKOFF_MIN);
        assert_eq!(backoff(2, 0.0), BACKOFF_MIN * 2);
        assert_eq!(backoff(5, 0.0), BACKOFF_MIN * 16);
        assert_eq!(backoff(40, 0.0), BACKOFF_MAX);
        assert_eq!(backoff(1, 0.999_9).as_millis(), 187);
        let t0 = Instant::now();
        let mut p = pool(&["--upstream", "192.0.2.1#a.test"]);
        for _ in 0..3 {
            p.upstream_failed(0, &"test", t0);
        }
        let Health::Down { failures, retry_at } = p.upstreams[0].health else {
            panic!()
        };
        assert_eq!(failures, 3);
        assert!(retry_at >= t0 + BACKOFF_MIN * 3 && retry_at <= t0 + BACKOFF_MIN * 4);
        p.upstream_up(0, false);
        assert_eq!(p.upstreams[0].health, Health::Up);
        assert!(p.healthy());
        p.upstream_failed(0, &"test", t0);
        assert!(matches!(p.upstreams[0].health, Health::Down { failures: 1, .. }));
    }

    #[test]
    fn a_reload_keeps_unchanged_upstreams_and_their_state() {
        let t0 = Instant::now();
        let mut p = pool(&["--upstream", "192.0.2.1#a.test", "--upstream", "192.0.2.2#b.test"]);
        p.observe(1, Duration::from_millis(7));
        p.upstream_failed(0, &"test", t0);
        let r = p
            .reload(&config(&[
                "--upstream",
                "192.0.2.2#b.test",
                "--upstream",
                "192.0.2.9#c.test",
            ]))
            .unwrap();
        assert_eq!(r, Reloaded { upstreams: 2, zones: 0 });
        // The removed one had no connections: gone at once.
        assert_eq!(p.upstreams.len(), 2);
        assert!(!p.upstreams.contains(0));
        assert_eq!(p.upstreams[1].stats.answers, 1);
        assert_eq!(p.upstreams[2].cfg.addr.to_string(), "192.0.2.9:853");
        // The retired one is never chosen, even when it is the only healthy one.
        p.upstream_failed(1, &"test", t0);
        p.upstream_failed(2, &"test", t0);
        assert_eq!(p.choose_upstream(Role::Default, None, t0), None);
    }

    #[test]
    fn a_changed_ca_file_replaces_the_upstream() {
        let dir = std::env::temp_dir().join(format!("dotproxy-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let pem = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap().pem()
        };
        std::fs::write(&ca, pem()).unwrap();
        let args = ["--upstream", "192.0.2.1#a.test", "--ca-file", ca.to_str().unwrap()];
        let mut p = pool(&args);
        p.observe(0, Duration::from_millis(3));
        // Same file: the running upstream stays, counters and all.
        p.reload(&config(&args)).unwrap();
        assert_eq!(p.upstreams.iter().map(|(i, _)| i).collect::<Vec<_>>(), vec![0]);
        // Same path, other contents (an operator removed a CA): a new
        // upstream with the new trust; the old one, with no connections, is
        // gone.
        std::fs::write(&ca, pem()).unwrap();
        p.reload(&config(&args)).unwrap();
        let keys: Vec<usize> = p.upstreams.iter().map(|(i, _)| i).collect();
        assert_eq!(keys, vec![1]);
        assert_eq!(p.upstreams[1].stats.answers, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zone_labels_read_back() {
        assert_eq!(zone_label(Some(&zone_wire("Corp.Example."))), "corp.example.");
        assert_eq!(zone_label(Some(&zone_wire("."))), ".");
    }
}
