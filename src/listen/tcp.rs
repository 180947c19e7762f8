//! The TCP client table: admission against the connection limits, the
//! open connections (a slab, each with a generation), their idle timers,
//! and the lists of clients to flush, resume and close this turn.
//!
//! Invariants kept here: the per-address count of an address is the
//! number of its open connections; a client is closed only in
//! [`Clients::reap`] (deregistered and removed in the same step), so an
//! answer or timer for it in the same turn finds it or finds nothing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use log::debug;
use mio::net::TcpStream;
use mio::{Interest, Registry};
use slab::Slab;

use super::client::{Client, ClientLimits, Delivered, Handshake, IdleCheck, NextQuery};
use crate::config::PerAddress;
use crate::timers::{Timer, Timers};
use crate::token::Source;

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-tcp-clients` connections are open.
    Total(usize),
    /// `--max-tcp-clients-per-ip` connections are open from this address.
    PerAddress(u32),
}

/// Connection counts, in total and per client address (as the
/// per-address policy groups addresses: exempt ones are not counted per
/// address, IPv6 ones by prefix).
#[derive(Debug)]
pub struct Admission {
    per_ip: HashMap<IpAddr, u32>,
    total: usize,
    max_total: usize,
    max_per_ip: u32,
    policy: PerAddress,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: u32, policy: PerAddress) -> Admission {
        Admission {
            per_ip: HashMap::new(),
            total: 0,
            max_total,
            max_per_ip,
            policy,
        }
    }

    pub fn set_limits(&mut self, max_total: usize, max_per_ip: u32, policy: PerAddress) {
        self.max_total = max_total;
        self.max_per_ip = max_per_ip;
        self.policy = policy;
    }

    /// Count a new connection from `ip`, or say why not.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        let key = self.policy.key(ip);
        if let Some(k) = key {
            if self.per_ip.get(&k).copied().unwrap_or(0) >= self.max_per_ip {
                return Err(Refusal::PerAddress(self.max_per_ip));
            }
        }
        if self.total >= self.max_total {
            return Err(Refusal::Total(self.max_total));
        }
        if let Some(k) = key {
            *self.per_ip.entry(k).or_insert(0) += 1;
        }
        self.total += 1;
        Ok(())
    }

    /// Uncount a connection admitted from `ip`.
    pub fn release(&mut self, ip: IpAddr) {
        self.total = self.total.saturating_sub(1);
        let Some(k) = self.policy.key(ip) else { return };
        if let Some(n) = self.per_ip.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&k);
            }
        }
    }

    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.policy
            .key(ip)
            .and_then(|k| self.per_ip.get(&k).copied())
            .unwrap_or(0)
    }
}

/// Answers waiting in all client buffers together, at most: beyond it the
/// client with the largest backlog is closed. Far above what honest
/// clients hold (they read), far below the memory limits the shipped
/// systemd unit and DaemonSet set.
pub const MAX_TOTAL_OUT: usize = 16 << 20;

pub struct Clients {
    slab: Slab<Client>,
    next_gen: u32,
    admission: Admission,
    limits: ClientLimits,
    /// Answer bytes pending over all clients.
    pending_out: usize,
    dirty: Vec<usize>,
    resume: Vec<usize>,
    doomed: Vec<(usize, u32)>,
}

/// A client closed for what it did, for the loop to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It completed no query and had nothing pending for the idle time.
    Idle,
    /// Its pending answers made no progress for the idle time.
    StoppedReading(SocketAddr),
}

impl Clients {
    pub fn new(max_total: usize, max_per_ip: u32, policy: PerAddress, limits: ClientLimits) -> Clients {
        Clients {
            slab: Slab::new(),
            next_gen: 0,
            admission: Admission::new(max_total, max_per_ip, policy),
            limits,
            pending_out: 0,
            dirty: Vec::new(),
            resume: Vec::new(),
            doomed: Vec::new(),
        }
    }

    pub fn set_limits(&mut self, max_total: usize, max_per_ip: u32, policy: PerAddress, limits: ClientLimits) {
        self.admission.set_limits(max_total, max_per_ip, policy);
        self.limits = limits;
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Answer bytes waiting over all clients.
    pub fn pending_out(&self) -> usize {
        self.pending_out
    }

    fn doom(&mut self, key: usize) {
        if let Some(c) = self.slab.get(key) {
            self.doomed.push((key, c.gen()));
        }
    }

    fn is_doomed(&self, key: usize) -> bool {
        self.doomed.iter().any(|&(k, _)| k == key)
    }

    /// Close client `key` now (its own room's object, so no reap needed):
    /// deregistered, uncounted, removed.
    fn remove(&mut self, key: usize, registry: &Registry) {
        if let Some(mut c) = self.slab.try_remove(key) {
            c.close_notify();
            let _ = registry.deregister(c.source());
            self.admission.release(c.peer().ip());
            self.pending_out = self.pending_out.saturating_sub(c.pending_out());
            debug!("tcp client {} closed", c.peer());
        }
    }

    /// At a connection limit, the connection idle longest (no complete
    /// query in flight, no answer pending) among those `matching` makes
    /// room (RFC 7766 §6.2.3).
    fn evict_idlest(&mut self, matching: impl Fn(IpAddr) -> bool, registry: &Registry) -> Option<SocketAddr> {
        let victim = self
            .slab
            .iter()
            .filter(|(k, c)| c.is_idle() && matching(c.peer().ip()) && !self.is_doomed(*k))
            .min_by_key(|(_, c)| c.last_active())
            .map(|(k, c)| (k, c.peer()))?;
        self.remove(victim.0, registry);
        Some(victim.1)
    }

    /// Admit an accepted connection: counted, registered, idle timer armed;
    /// at a limit, an idle connection is evicted for it (returned, to be
    /// logged), and it is refused only when every one is busy. Returns its
    /// key; read it at once (data may have come with the handshake, before
    /// the registration's edge).
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        sock: TcpStream,
        peer: SocketAddr,
        tls: Option<&std::sync::Arc<rustls::ServerConfig>>,
        now: Instant,
        registry: &Registry,
        timers: &mut Timers,
    ) -> Result<(usize, Option<SocketAddr>), Refusal> {
        let session = match tls.map(|cfg| rustls::ServerConnection::new(std::sync::Arc::clone(cfg))) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                debug!("tls client {peer}: {e}");
                return Err(Refusal::Total(self.admission.max_total));
            }
        };
        let ip = peer.ip();
        let evicted = match self.admission.admit(ip) {
            Ok(()) => None,
            Err(refusal) => {
                let evicted = match refusal {
                    Refusal::PerAddress(_) => {
                        let policy = self.admission.policy.clone();
                        let key = policy.key(ip);
                        self.evict_idlest(move |other| policy.key(other) == key, registry)
                    }
                    Refusal::Total(_) => self.evict_idlest(|_| true, registry),
                };
                if evicted.is_none() {
                    return Err(refusal);
                }
                self.admission.admit(ip)?;
                evicted
            }
        };
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        let mut client = Client::new(sock, peer, gen, session, now);
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(client.source(), Source::Client(key).token(), interest) {
            debug!("register tcp client {peer}: {e}");
            self.admission.release(ip);
            // Not a refusal by limit: the socket is simply dropped.
            return Err(Refusal::Total(self.admission.max_total));
        }
        entry.insert(client);
        timers.add(now + self.limits.idle, Timer::ClientIdle { key, gen });
        Ok((key, evicted))
    }

    /// Whether client `key` speaks DNS over TLS.
    pub fn is_tls(&self, key: usize) -> bool {
        self.slab.get(key).is_some_and(Client::is_tls)
    }

    pub fn peer(&self, key: usize) -> Option<SocketAddr> {
        self.slab.get(key).map(Client::peer)
    }

    pub fn gen(&self, key: usize) -> Option<u32> {
        self.slab.get(key).map(Client::gen)
    }

    /// Readiness on client `key`: read what is there (unless `reading` is
    /// off, during shutdown) and note it for the flush when writable.
    /// Readiness of client `key`: read what came, queue what is due. A TLS
    /// client's handshake outcome comes back once, for the loop to count.
    pub fn on_event(&mut self, key: usize, readable: bool, writable: bool, reading: bool) -> Option<Handshake> {
        let c = self.slab.get_mut(key)?;
        if writable && c.mark_dirty() {
            self.dirty.push(key);
        }
        let mut failed = false;
        if readable && reading {
            if let Err(e) = c.read() {
                debug!("tcp client {}: {e}", c.peer());
                failed = true;
            }
        }
        // A handshake flight or an alert to send.
        if c.wants_write() && c.mark_dirty() {
            self.dirty.push(key);
        }
        let handshake = c.take_handshake();
        if failed {
            self.doom(key);
        }
        handshake
    }

    /// The next query of client `key` into `frame`, or what stops it; a
    /// client that is done is marked for closing.
    pub fn next_query(&mut self, key: usize, frame: &mut Vec<u8>, reading: bool, now: Instant) -> Option<NextQuery> {
        if self.is_doomed(key) {
            return None;
        }
        let c = self.slab.get_mut(key)?;
        let next = c.next_query(frame, &self.limits, reading, now);
        if let NextQuery::Close { bad_frame } = next {
            if bad_frame {
                debug!("tcp client {}: frame shorter than a header; closing", c.peer());
            }
            self.doom(key);
        }
        Some(next)
    }

    /// A taken query of client `key` went unanswered.
    pub fn dropped(&mut self, key: usize) {
        if let Some(c) = self.slab.get_mut(key) {
            c.dropped();
        }
    }

    /// Queue an answer for client `key` of generation `gen`.
    pub fn deliver(&mut self, key: usize, gen: u32, answer: &[u8], now: Instant) -> Result<(), Gone> {
        // A client being closed takes nothing more (and is counted once).
        if self.is_doomed(key) {
            return Err(Gone::Closed);
        }
        let Some(c) = self.slab.get_mut(key).filter(|c| c.gen() == gen) else {
            return Err(Gone::Closed);
        };
        match c.deliver(answer, self.limits.max_pipeline, now) {
            Delivered::TooSlow => {
                let peer = c.peer();
                self.doom(key);
                Err(Gone::TooSlow(peer))
            }
            Delivered::Queued { resume } => {
                self.pending_out += 2 + answer.len();
                if resume {
                    self.resume.push(key);
                }
                if c.mark_dirty() {
                    self.dirty.push(key);
                }
                if self.pending_out > MAX_TOTAL_OUT {
                    return self.shed_largest();
                }
                Ok(())
            }
        }
    }

    /// Over the bound of all buffers together: close the client with the
    /// largest backlog (the one not reading; honest clients drain theirs).
    /// Clients already being closed are counted out: their bytes leave the
    /// total when they are removed, once.
    fn shed_largest(&mut self) -> Result<(), Gone> {
        let closing: usize = self
            .doomed
            .iter()
            .filter_map(|&(k, g)| self.slab.get(k).filter(|c| c.gen() == g))
            .map(Client::pending_out)
            .sum();
        if self.pending_out.saturating_sub(closing) <= MAX_TOTAL_OUT {
            return Ok(());
        }
        let victim = self
            .slab
            .iter()
            .filter(|(k, _)| !self.is_doomed(*k))
            .max_by_key(|(_, c)| c.pending_out())
            .map(|(k, c)| (k, c.peer()));
        if let Some((k, peer)) = victim {
            self.doom(k);
            return Err(Gone::TooSlow(peer));
        }
        Ok(())
    }

    /// Clients that were held and got answers: look at their frames again.
    pub fn take_resumed(&mut self, out: &mut Vec<usize>) {
        out.clear();
        out.append(&mut self.resume);
    }

    pub fn has_resumed(&self) -> bool {
        !self.resume.is_empty()
    }

    /// Write what every client with output has; close the finished.
    pub fn flush(&mut self, now: Instant) {
        let mut keys = std::mem::take(&mut self.dirty);
        for &k in &keys {
            let Some(c) = self.slab.get_mut(k) else { continue };
            c.clear_dirty();
            match c.flush(now) {
                Err(e) => {
                    debug!("tcp client {}: {e}", c.peer());
                    self.doom(k);
                }
                Ok(written) => {
                    self.pending_out = self.pending_out.saturating_sub(written);
                    if c.finished() {
                        self.doom(k);
                    }
                }
            }
        }
        keys.clear();
        if self.dirty.is_empty() {
            self.dirty = keys;
        }
    }

    /// A client idle timer fired; a client closed for not reading comes
    /// back, to be logged.
    pub fn on_idle_timer(&mut self, key: usize, gen: u32, now: Instant, timers: &mut Timers) -> Option<Closed> {
        let c = self.slab.get(key).filter(|c| c.gen() == gen)?;
        match c.idle_check(self.limits.idle, now) {
            IdleCheck::Again(at) => {
                timers.add(at, Timer::ClientIdle { key, gen });
                None
            }
            IdleCheck::Idle => {
                debug!("tcp client {} idle; closing", c.peer());
                self.doom(key);
                Some(Closed::Idle)
            }
            IdleCheck::StoppedReading => {
                let peer = c.peer();
                self.doom(key);
                Some(Closed::StoppedReading(peer))
            }
        }
    }

    /// Close the clients no longer `allowed` (a reload narrowed the access
    /// list); returns how many.
    pub fn retain_allowed(&mut self, allowed: impl Fn(IpAddr) -> bool) -> usize {
        let gone: Vec<(usize, u32)> = self
            .slab
            .iter()
            .filter(|(_, c)| !allowed(c.peer().ip()))
            .map(|(k, c)| (k, c.gen()))
            .collect();
        let n = gone.len();
        self.doomed.extend(gone);
        n
    }

    /// Whether every client has written all it was given.
    pub fn all_flushed(&self) -> bool {
        self.pending_out == 0
    }

    /// Close the clients marked for closing.
    pub fn reap(&mut self, registry: &Registry) {
        for (key, gen) in std::mem::take(&mut self.doomed) {
            if self.slab.get(key).is_some_and(|c| c.gen() == gen) {
                self.remove(key, registry);
            }
        }
    }
}

/// Why an answer could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// The client closed (or its slot holds a newer client).
    Closed,
    /// Closed now: it does not read its answers.
    TooSlow(SocketAddr),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(exempt: &[&str], v6_prefix: u8) -> PerAddress {
        PerAddress {
            v6_prefix,
            exempt: exempt.iter().map(|c| crate::config::Cidr::parse(c).unwrap()).collect(),
        }
    }

    #[test]
    fn admission_holds_both_limits_and_releases() {
        let mut a = Admission::new(3, 2, policy(&[], 64));
        let x = IpAddr::from([127, 0, 0, 1]);
        let y = IpAddr::from([127, 0, 0, 2]);
        assert_eq!(a.admit(x), Ok(()));
        assert_eq!(a.admit(x), Ok(()));
        assert_eq!(a.admit(x), Err(Refusal::PerAddress(2)));
        assert_eq!(a.admit(y), Ok(()));
        assert_eq!(a.admit(y), Err(Refusal::Total(3)));
        a.release(x);
        assert_eq!(a.open_from(x), 1);
        assert_eq!(a.admit(y), Ok(()));
        a.set_limits(10, 10, policy(&[], 64));
        assert_eq!(a.admit(y), Ok(()));
    }

    #[test]
    fn exempt_addresses_count_only_in_total_and_ipv6_groups_by_prefix() {
        let mut a = Admission::new(4, 1, policy(&["127.0.0.0/8"], 64));
        let local = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(a.admit(local), Ok(()));
        assert_eq!(a.admit(local), Ok(()));
        assert_eq!(a.open_from(local), 0);
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(a.admit(v6a), Ok(()));
        // The same /64: the same client.
        assert_eq!(a.admit(v6b), Err(Refusal::PerAddress(1)));
        assert_eq!(a.admit(v6c), Ok(()));
        assert_eq!(a.admit(IpAddr::from([10, 0, 0, 1])), Err(Refusal::Total(4)));
        a.release(local);
        a.release(v6b);
        assert_eq!(a.admit(IpAddr::from([10, 0, 0, 1])), Ok(()));
    }
}
