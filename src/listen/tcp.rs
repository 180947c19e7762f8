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

use super::client::{Client, ClientLimits, Delivered, NextQuery};
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

/// Connection counts, in total and per client address.
#[derive(Debug, Default)]
pub struct Admission {
    per_ip: HashMap<IpAddr, u32>,
    total: usize,
    max_total: usize,
    max_per_ip: u32,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: u32) -> Admission {
        Admission {
            max_total,
            max_per_ip,
            ..Admission::default()
        }
    }

    pub fn set_limits(&mut self, max_total: usize, max_per_ip: u32) {
        self.max_total = max_total;
        self.max_per_ip = max_per_ip;
    }

    /// Count a new connection from `ip`, or say why not.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.max_per_ip {
            return Err(Refusal::PerAddress(self.max_per_ip));
        }
        if self.total >= self.max_total {
            return Err(Refusal::Total(self.max_total));
        }
        *self.per_ip.entry(ip).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            self.total = self.total.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }
}

pub struct Clients {
    slab: Slab<Client>,
    next_gen: u32,
    admission: Admission,
    limits: ClientLimits,
    dirty: Vec<usize>,
    resume: Vec<usize>,
    doomed: Vec<usize>,
}

impl Clients {
    pub fn new(max_total: usize, max_per_ip: u32, limits: ClientLimits) -> Clients {
        Clients {
            slab: Slab::new(),
            next_gen: 0,
            admission: Admission::new(max_total, max_per_ip),
            limits,
            dirty: Vec::new(),
            resume: Vec::new(),
            doomed: Vec::new(),
        }
    }

    pub fn set_limits(&mut self, max_total: usize, max_per_ip: u32, limits: ClientLimits) {
        self.admission.set_limits(max_total, max_per_ip);
        self.limits = limits;
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Admit an accepted connection: counted, registered, idle timer armed.
    /// Returns its key; read it at once (data may have come with the
    /// handshake, before the registration's edge).
    pub fn admit(
        &mut self,
        sock: TcpStream,
        peer: SocketAddr,
        now: Instant,
        registry: &Registry,
        timers: &mut Timers,
    ) -> Result<usize, Refusal> {
        self.admission.admit(peer.ip())?;
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        let mut client = Client::new(sock, peer, gen, now);
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(client.source(), Source::Client(key).token(), interest) {
            debug!("register tcp client {peer}: {e}");
            self.admission.release(peer.ip());
            // Not a refusal by limit: the socket is simply dropped.
            return Err(Refusal::Total(self.admission.max_total));
        }
        entry.insert(client);
        timers.add(now + self.limits.idle, Timer::ClientIdle { key, gen });
        Ok(key)
    }

    pub fn peer(&self, key: usize) -> Option<SocketAddr> {
        self.slab.get(key).map(Client::peer)
    }

    pub fn gen(&self, key: usize) -> Option<u32> {
        self.slab.get(key).map(Client::gen)
    }

    /// Readiness on client `key`: read what is there (unless `reading` is
    /// off, during shutdown) and note it for the flush when writable.
    pub fn on_event(&mut self, key: usize, readable: bool, writable: bool, reading: bool) {
        let Some(c) = self.slab.get_mut(key) else { return };
        if writable && c.mark_dirty() {
            self.dirty.push(key);
        }
        if readable && reading {
            if let Err(e) = c.read() {
                debug!("tcp client {}: {e}", c.peer());
                self.doomed.push(key);
            }
        }
    }

    /// The next query of client `key` into `frame`; `false` when there is
    /// none to take now (and then the client may have been marked for
    /// closing). `bad_frames` counts streams that lost their framing.
    pub fn next_query(&mut self, key: usize, frame: &mut Vec<u8>, reading: bool, now: Instant) -> Option<NextQuery> {
        if self.doomed.contains(&key) {
            return None;
        }
        let c = self.slab.get_mut(key)?;
        let next = c.next_query(frame, &self.limits, reading, now);
        if let NextQuery::Close { bad_frame } = next {
            if bad_frame {
                debug!("tcp client {}: frame shorter than a header; closing", c.peer());
            }
            self.doomed.push(key);
        }
        Some(next)
    }

    /// A taken query of client `key` went unanswered.
    pub fn dropped(&mut self, key: usize) {
        if let Some(c) = self.slab.get_mut(key) {
            c.dropped();
        }
    }

    /// Queue an answer for client `key` of generation `gen`. `false` when
    /// the client is gone, or was closed now for not reading its answers.
    pub fn deliver(&mut self, key: usize, gen: u32, answer: &[u8]) -> Result<(), Gone> {
        let Some(c) = self.slab.get_mut(key).filter(|c| c.gen() == gen) else {
            return Err(Gone::Closed);
        };
        match c.deliver(answer, self.limits.max_pipeline) {
            Delivered::TooSlow => {
                self.doomed.push(key);
                Err(Gone::TooSlow(c.peer()))
            }
            Delivered::Queued { resume } => {
                if resume {
                    self.resume.push(key);
                }
                if c.mark_dirty() {
                    self.dirty.push(key);
                }
                Ok(())
            }
        }
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
                    self.doomed.push(k);
                }
                Ok(()) if c.finished() => self.doomed.push(k),
                Ok(()) => {}
            }
        }
        keys.clear();
        if self.dirty.is_empty() {
            self.dirty = keys;
        }
    }

    /// A client idle timer fired.
    pub fn on_idle_timer(&mut self, key: usize, gen: u32, now: Instant, timers: &mut Timers) {
        let Some(c) = self.slab.get(key).filter(|c| c.gen() == gen) else {
            return;
        };
        match c.idle_check(self.limits.idle, now) {
            None => {
                debug!("tcp client {} idle; closing", c.peer());
                self.doomed.push(key);
            }
            Some(at) => timers.add(at, Timer::ClientIdle { key, gen }),
        }
    }

    /// Whether every client has written all it was given.
    pub fn all_flushed(&self) -> bool {
        self.slab.iter().all(|(_, c)| c.pending_out() == 0)
    }

    /// Close the clients marked for closing.
    pub fn reap(&mut self, registry: &Registry) {
        for key in std::mem::take(&mut self.doomed) {
            if let Some(mut c) = self.slab.try_remove(key) {
                let _ = registry.deregister(c.source());
                self.admission.release(c.peer().ip());
                debug!("tcp client {} closed", c.peer());
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

    #[test]
    fn admission_holds_both_limits_and_releases() {
        let mut a = Admission::new(3, 2);
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
        // Releasing an address never seen changes nothing.
        a.release(IpAddr::from([10, 0, 0, 1]));
        assert_eq!(a.admit(y), Err(Refusal::PerAddress(2)));
        a.set_limits(10, 10);
        assert_eq!(a.admit(y), Ok(()));
    }
}
