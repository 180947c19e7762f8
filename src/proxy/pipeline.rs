//! The path of one query through the rooms: receive (UDP datagram or TCP
//! frame) → check → cache → admit → send → answer → deliver, or fail with
//! one [`Failure`]. Every step takes the turn's `now`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::debug;

use super::Proxy;
use crate::cache::Lookup;
use crate::failure::Failure;
use crate::listen::client::{Handshake, NextQuery};
use crate::listen::tcp::{Gone, Refusal};
use crate::listen::udp::{Recv, Send};
use crate::listen::Accept;
use crate::notice::Notice;
use crate::queries::{Admit, NewQuery, Origin, QueryRef};
use crate::timers::Timer;
use crate::upstream::pool::Outgoing;
use crate::upstream::Answer;
use crate::wire::build::{add_keepalive, build_error, build_truncated, pad_query};
use crate::wire::query::parse_query;
use crate::wire::response::{parse_response, restore_for_client, strip_answer, without_ede};
use crate::wire::{BadResponse, Ede, Header, Query, Rcode, Reject, MAX_UDP};

impl Proxy {
    // ---- receive ----

    pub(super) fn read_udp(&mut self, i: usize, now: Instant) {
        let Some(l) = self.listeners.udp(i) else { return };
        l.begin();
        loop {
            let Some(l) = self.listeners.udp(i) else { return };
            let mut msg = self.bufs.take();
            let peer = match l.recv(&mut msg) {
                Recv::Datagram(peer) => peer,
                Recv::Empty | Recv::Batch => {
                    self.bufs.put(msg);
                    return;
                }
            };
            self.stats.queries_udp += 1;
            if !self.settings.allowed(peer.ip()) {
                // Dropped, not REFUSED: an answer to a spoofed source would
                // make us a reflector.
                self.stats.dropped.access_list += 1;
                let ip = peer.ip();
                let what = format_args!("udp query from {ip} dropped: not in --allow");
                self.notices.warn(Notice::AccessList, now, what);
                self.bufs.put(msg);
                continue;
            }
            self.handle_query(msg, Origin::Udp { listener: i, peer }, peer.ip(), now);
        }
    }

    pub(super) fn accept(&mut self, i: usize, now: Instant) {
        loop {
            match self.listeners.accept(i) {
                Accept::Empty => return,
                Accept::Retry(e) => {
                    self.notices
                        .warn(Notice::Accept, now, format_args!("accept: {e}; retrying in 100 ms"));
                    if self.listeners.arm_retry(i) {
                        self.timers
                            .add(now + Duration::from_millis(100), Timer::AcceptRetry { listener: i });
                    }
                    return;
                }
                Accept::Conn(sock, peer) => {
                    if !self.settings.allowed(peer.ip()) {
                        self.stats.dropped.access_list += 1;
                        let ip = peer.ip();
                        let what = format_args!("tcp client {ip} closed: not in --allow");
                        self.notices.warn(Notice::AccessList, now, what);
                        continue;
                    }
                    let tls = if self.listeners.is_tls(i) {
                        match &self.tls_server {
                            Some(cfg) => Some(cfg),
                            None => continue,
                        }
                    } else {
                        None
                    };
                    match self
                        .clients
                        .admit(sock, peer, tls, now, self.poll.registry(), &mut self.timers)
                    {
                        Ok((key, evicted)) => {
                            if let Some(old) = evicted {
                                self.stats.tcp_closed.evicted += 1;
                                let what =
                                    format_args!("tcp client {old} closed: idle, to admit a new connection at a limit");
                                self.notices.warn(Notice::TcpClients, now, what);
                            }
                            self.client_queries_after_read(key, now);
                        }
                        Err(refusal) => {
                            self.stats.tcp_refused += 1;
                            let ip = peer.ip();
                            let what = match refusal {
                                Refusal::PerAddress(max) => {
                                    format!("tcp client {ip} refused: --max-tcp-clients-per-ip {max} reached")
                                }
                                Refusal::Total(max) => format!("tcp client refused: --max-tcp-clients {max} reached"),
                            };
                            self.notices.warn(Notice::TcpClients, now, format_args!("{what}"));
                        }
                    }
                }
            }
        }
    }

    pub(super) fn client_queries_after_read(&mut self, key: usize, now: Instant) {
        // Data may have arrived with the handshake; the edge for it was
        // before registration on some kernels.
        let handshake = self.clients.on_event(key, true, false, self.stopping.is_none());
        self.handshake(key, handshake, now);
        self.client_queries(key, now);
    }

    /// Count a TLS client's handshake; a failure is logged (rate-limited:
    /// a scanner must not fill the log).
    pub(super) fn handshake(&mut self, key: usize, outcome: Option<Handshake>, now: Instant) {
        match outcome {
            None => {}
            Some(Handshake::Done) => self.stats.tls_handshakes.0 += 1,
            Some(Handshake::Failed(e)) => {
                self.stats.tls_handshakes.1 += 1;
                let peer = self.clients.peer(key).map_or_else(|| "?".into(), |p| p.to_string());
                let what = format_args!("tls client {peer}: handshake failed: {e}");
                self.notices.warn(Notice::TlsHandshake, now, what);
            }
        }
    }

    /// Take the client's buffered queries while it is under its caps.
    pub(super) fn client_queries(&mut self, key: usize, now: Instant) {
        let reading = self.stopping.is_none();
        let Some(gen) = self.clients.gen(key) else { return };
        let ip = self.clients.peer(key).map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        let tls = self.clients.is_tls(key);
        let mut frame = std::mem::take(&mut self.bufs.frame);
        loop {
            match self.clients.next_query(key, &mut frame, reading, now) {
                Some(NextQuery::Query) => {
                    self.stats.queries_tcp += 1;
                    self.stats.queries_tls += u64::from(tls);
                    // Copied, not swapped: `frame` grows to the largest
                    // answer seen and must not end up in the query pool.
                    let mut msg = self.bufs.take();
                    msg.extend_from_slice(&frame);
                    self.handle_query(msg, Origin::Tcp { key, gen }, ip, now);
                }
                Some(NextQuery::Close { bad_frame: true }) => {
                    self.stats.dropped.malformed += 1;
                    break;
                }
                _ => break,
            }
        }
        self.bufs.frame = frame;
    }

    // ---- check, cache, admit, send ----

    pub(super) fn handle_query(&mut self, msg: Vec<u8>, origin: Origin, ip: IpAddr, now: Instant) {
        match parse_query(&msg, self.settings.max_query_size) {
            Ok(query) => self.forward(query, msg, origin, ip, now),
            Err(Reject::Drop(why)) => {
                self.stats.dropped.malformed += 1;
                debug!("dropped query from {}: {why}", self.peer_of(origin));
                if let Origin::Tcp { key, .. } = origin {
                    self.clients.dropped(key);
                }
                self.bufs.put(msg);
            }
            Err(Reject::Answer { rcode, query, why, ede }) => {
                self.stats.rejected += 1;
                debug!(
                    "rejected query from {}: {why} (rcode {})",
                    self.peer_of(origin),
                    u16::from(rcode)
                );
                self.own_answer(origin, query.as_deref(), &msg, msg.len(), (rcode, ede), now);
                self.bufs.put(msg);
            }
        }
    }

    /// Answer with a message of our own. Over UDP it is never larger than
    /// the query (`client_len`): the EDE text goes first, then the EDE, so
    /// a spoofed source gets no amplification.
    fn own_answer(
        &mut self,
        origin: Origin,
        query: Option<&Query>,
        msg: &[u8],
        client_len: usize,
        (rcode, ede): (Rcode, Option<Ede>),
        now: Instant,
    ) {
        let mut reply = std::mem::take(&mut self.bufs.reply);
        build_error(&mut reply, msg, query, rcode, ede);
        if matches!(origin, Origin::Udp { .. }) {
            for smaller in [ede.map(Ede::code_only), None] {
                if reply.len() <= client_len {
                    break;
                }
                build_error(&mut reply, msg, query, rcode, smaller);
            }
        }
        self.deliver(origin, query, msg, &reply, now);
        self.bufs.reply = reply;
    }

    pub(super) fn forward(&mut self, query: Query, msg: Vec<u8>, origin: Origin, ip: IpAddr, now: Instant) {
        if log::log_enabled!(log::Level::Debug) {
            // The query log: names appear only when asked for.
            debug!(
                "query from {}: {} type {}",
                self.peer_of(origin),
                query.name(),
                query.qtype
            );
        }
        let mut stale = false;
        let key = match &mut self.cache {
            Some(cache) => {
                query.key_into(&mut self.bufs.key);
                let mut reply = std::mem::take(&mut self.bufs.reply);
                let found = cache.get(&self.bufs.key, &query, &msg, now, &mut reply);
                if let Lookup::Fresh { refresh } = found {
                    self.stats.answers += 1;
                    self.deliver(origin, Some(&query), &msg, &reply, now);
                    self.bufs.reply = reply;
                    if refresh && self.settings.prefetch {
                        self.prefetch(query, msg, now);
                    } else {
                        self.bufs.put(msg);
                    }
                    return;
                }
                self.bufs.reply = reply;
                stale = found == Lookup::Stale;
                Some(Box::<[u8]>::from(self.bufs.key.as_slice()))
            }
            None => None,
        };
        let client_len = msg.len();
        // Rewritten once, re-sent as is: padding hides the query's size on
        // the wire, keepalive asks for the server's idle timeout.
        // With padding off the query goes as the client sent it, but for
        // a client subnet option, which is never forwarded.
        let padding = self.settings.padding;
        let msg = if padding > 0 || query.client_subnet {
            let mut padded = self.bufs.take();
            pad_query(&mut padded, &msg, &query, padding, padding > 0);
            self.bufs.put(msg);
            padded
        } else {
            msg
        };
        let new = NewQuery {
            origin,
            client_len,
            client: self.settings.per_address.key(ip),
            query,
            msg,
            key,
        };
        let deadline = now + self.settings.timeout;
        let q = match self.queries.admit(new, deadline, &mut self.timers) {
            Ok(Admit::Queued(q)) => {
                self.send(q, now);
                q
            }
            Ok(Admit::Merged(q)) => {
                self.stats.merged += 1;
                q
            }
            Err(refused) => return self.refuse_busy(refused, client_len, now),
        };
        // An expired answer is there: if the upstreams cannot answer in
        // time, the client gets it (RFC 8767 §5's client response timer).
        if stale && self.queries.get(q).is_some() {
            self.timers.add(now + self.settings.stale_after, Timer::StaleAnswer(q));
        }
    }

    /// A hit late in its entry's life: refresh it upstream in the
    /// background, once per entry (a refresh in flight is the leader that
    /// identical queries merge behind), never in the room clients need.
    fn prefetch(&mut self, query: Query, mut msg: Vec<u8>, now: Instant) {
        if self.queries.in_flight_for(&self.bufs.key) {
            self.bufs.put(msg);
            return;
        }
        let client_len = msg.len();
        if self.settings.padding > 0 || query.client_subnet {
            let mut padded = self.bufs.take();
            let padding = self.settings.padding;
            pad_query(&mut padded, &msg, &query, padding, padding > 0);
            self.bufs.put(std::mem::replace(&mut msg, padded));
        }
        let new = NewQuery {
            origin: Origin::Prefetch,
            client_len,
            client: None,
            query,
            msg,
            key: Some(Box::from(self.bufs.key.as_slice())),
        };
        match self.queries.admit(new, now + self.settings.timeout, &mut self.timers) {
            Ok(Admit::Queued(q)) => {
                if let Some(c) = &mut self.cache {
                    c.note_prefetch();
                }
                self.send(q, now);
            }
            Ok(Admit::Merged(_)) => {}
            Err(refused) => self.bufs.put(refused.msg),
        }
    }

    /// The client response timer of a query with a stale answer available:
    /// still no answer from upstream, so the client gets the stale one and
    /// the query stays in flight to refresh the cache.
    pub(super) fn answer_stale(&mut self, q: QueryRef, now: Instant) {
        if self.queries.get(q).is_none_or(|p| p.stale_served()) {
            return;
        }
        if self.deliver_stale(q, now) {
            if let Some(p) = self.queries.get_mut(q) {
                p.serve_stale();
            }
        }
    }

    /// Deliver the cache's stale answer for query `q`, if there is one.
    fn deliver_stale(&mut self, q: QueryRef, now: Instant) -> bool {
        let (Some(cache), Some(p)) = (&mut self.cache, self.queries.get(q)) else {
            return false;
        };
        let Some(key) = p.key() else { return false };
        let mut reply = std::mem::take(&mut self.bufs.reply);
        let found = cache.stale(key, p.query(), p.msg(), now, &mut reply);
        if found {
            let (origin, query, msg) = (p.origin(), p.query().clone(), p.msg().to_vec());
            self.stats.answers += 1;
            self.deliver(origin, Some(&query), &msg, &reply, now);
        }
        self.bufs.reply = reply;
        found
    }

    /// Over an in-flight limit: REFUSED at once, never larger than the
    /// query (under a flood of maybe spoofed queries, no amplification).
    pub(super) fn refuse_busy(&mut self, refused: Box<NewQuery>, client_len: usize, now: Instant) {
        self.stats.refused_busy += 1;
        let what = match refused.client {
            Some(ip) => format!("query from {ip} refused: --max-inflight or --max-inflight-per-ip reached"),
            None => "query refused: --max-inflight reached".to_string(),
        };
        let what = format_args!("{what}");
        self.notices.warn(Notice::Busy, now, what);
        let (rcode, ede) = Failure::Busy.answer();
        let mut reply = std::mem::take(&mut self.bufs.reply);
        build_error(&mut reply, &refused.msg, Some(&refused.query), rcode, Some(ede));
        if reply.len() > client_len {
            build_error(&mut reply, &refused.msg, Some(&refused.query), rcode, None);
        }
        self.deliver(refused.origin, Some(&refused.query), &refused.msg, &reply, now);
        self.bufs.reply = reply;
        self.bufs.put(refused.msg);
    }

    /// Send query `q` upstream, routed by its name now; it fails at once
    /// when no upstream can take it.
    pub(super) fn send(&mut self, q: QueryRef, now: Instant) {
        let Some(p) = self.queries.get(q) else { return };
        let out = Outgoing {
            name: p.query().name(),
            avoid: p.last_upstream(),
            query: q,
            msg: p.msg(),
        };
        let sent = self.pool.send(out, now, self.poll.registry(), &mut self.timers);
        match sent {
            Some(sent) => {
                if let Some(p) = self.queries.get_mut(q) {
                    p.sent_on(sent);
                }
            }
            None => self.fail(q, Failure::Unreachable, now),
        }
    }

    // ---- answers ----

    pub(super) fn upstream_event(&mut self, key: usize, now: Instant) {
        self.pool.conn_event(key, &mut self.bufs.read, now, &mut self.timers);
        let mut frame = std::mem::take(&mut self.bufs.frame);
        while let Some(answer) = self.pool.next_answer(key, &mut frame, now, &mut self.timers) {
            match answer {
                Answer::Live { id, query } => self.on_answer(key, id, query, &mut frame, now),
                Answer::Late => self.stats.upstream_dropped.late += 1,
                Answer::Unknown => {
                    self.stats.upstream_dropped.unknown_id += 1;
                    debug!("upstream answer with unknown ID dropped");
                }
            }
        }
        self.bufs.frame = frame;
    }

    pub(super) fn on_answer(&mut self, conn: usize, id: u16, q: QueryRef, frame: &mut Vec<u8>, now: Instant) {
        let Some(p) = self.queries.get(q) else { return };
        match parse_response(p.query(), frame) {
            Ok(walk) => {
                frame.truncate(walk.end);
                let hop = match strip_answer(frame, &walk, p.query().edns.is_some()) {
                    Ok(hop) => hop,
                    Err(e) => {
                        debug!("upstream answer unusable: {e}");
                        self.fail(q, Failure::Invalid, now);
                        return;
                    }
                };
                if let Some(sent) = p.sent() {
                    self.pool.observe(sent.upstream, now.saturating_duration_since(sent.at));
                }
                if let Some(t) = hop.keepalive {
                    self.pool.keepalive(conn, t, &mut self.timers);
                }
                self.answer(q, frame, now);
            }
            Err(BadResponse::Mismatch(why)) => {
                // Not ours after all (RFC 7858 §3.3): keep waiting for the
                // real answer; the deadline still bounds the wait.
                self.stats.upstream_dropped.wrong_question += 1;
                debug!("upstream answer dropped: {why}");
                self.pool.restore(conn, id, q);
            }
            Err(BadResponse::Malformed(e)) => {
                debug!("upstream answer malformed: {e}");
                self.fail(q, Failure::Invalid, now);
            }
        }
    }

    /// Settle `q` and the queries merged behind it with `answer`.
    pub(super) fn answer(&mut self, q: QueryRef, answer: &mut [u8], now: Instant) {
        let Some(mut p) = self.queries.settle(q) else { return };
        restore_for_client(answer, p.query(), p.msg());
        if let (Some(cache), Some(key)) = (&mut self.cache, p.key()) {
            cache.insert(key, answer, now);
        }
        if !p.stale_served() && p.origin() != Origin::Prefetch {
            self.stats.answers += 1;
            self.deliver(p.origin(), Some(p.query()), p.msg(), answer, now);
        }
        for f in p.take_followers() {
            let Some(f) = self.queries.settle(f) else { continue };
            if f.stale_served() {
                continue;
            }
            restore_for_client(answer, f.query(), f.msg());
            self.stats.answers += 1;
            self.deliver(f.origin(), Some(f.query()), f.msg(), answer, now);
            self.bufs.put(f.into_msg());
        }
        self.bufs.put(p.into_msg());
    }

    pub(super) fn time_out(&mut self, q: QueryRef, now: Instant) {
        self.stats.timeouts += 1;
        if let Some(p) = self.queries.get(q) {
            self.pool.timed_out(p.last_upstream(), p.sent(), q);
        }
        self.fail(q, Failure::Timeout, now);
    }

    /// End `q` (and the queries merged behind it, which share its fate)
    /// with an answer of our own.
    pub(super) fn fail(&mut self, q: QueryRef, failure: Failure, now: Instant) {
        let (rcode, ede) = failure.answer();
        let mut failing = std::mem::take(&mut self.bufs.failing);
        failing.clear();
        failing.push(q);
        while let Some(q) = failing.pop() {
            // A client that has (or can get) a stale answer gets that
            // instead of an error (RFC 8767 §5).
            // (A failed prefetch has no client: its entry stays as it is.)
            let prefetch = self.queries.get(q).is_some_and(|p| p.origin() == Origin::Prefetch);
            let served =
                !prefetch && (self.queries.get(q).is_some_and(|p| p.stale_served()) || self.deliver_stale(q, now));
            let Some(mut p) = self.queries.settle(q) else { continue };
            failing.extend(p.take_followers());
            if served || p.origin() == Origin::Prefetch {
                self.bufs.put(p.into_msg());
                continue;
            }
            if rcode == Rcode::ServFail {
                self.stats.servfail += 1;
            }
            let answer = (rcode, Some(ede));
            self.own_answer(p.origin(), Some(p.query()), p.msg(), p.client_len(), answer, now);
            self.bufs.put(p.into_msg());
        }
        self.bufs.failing = failing;
    }

    /// Send an answer to where its query came from: over UDP within the
    /// client's budget (RFC 6891 §7, TC=1 when it does not fit), over TCP
    /// queued on the client, out of order allowed.
    pub(super) fn deliver(&mut self, origin: Origin, query: Option<&Query>, msg: &[u8], answer: &[u8], now: Instant) {
        if let Ok(h) = Header::new_checked(answer) {
            let rc = usize::from(u16::from(h.rcode()));
            if let Some(n) = self.stats.rcodes.get_mut(rc) {
                *n += 1;
            }
        }
        match origin {
            Origin::Prefetch => {}
            Origin::Udp { listener, peer } => {
                let budget = query.map_or(512, |q| q.udp_budget(MAX_UDP));
                let mut t = std::mem::take(&mut self.bufs.truncated);
                let out = match query {
                    Some(q) if answer.len() > budget => {
                        // RFC 8914 §3: extended errors go first; truncate
                        // only if the answer is still too big without them.
                        if !(without_ede(&mut t, answer) && t.len() <= budget) {
                            self.stats.truncated += 1;
                            build_truncated(&mut t, msg, q, answer);
                        }
                        &t[..]
                    }
                    _ => answer,
                };
                let sent = self.listeners.udp(listener).map(|l| l.send(peer, out));
                self.bufs.truncated = t;
                if sent == Some(Send::Dropped) {
                    self.stats.dropped.udp_send_queue_full += 1;
                    let what = format_args!("udp answers dropped: send buffer full");
                    self.notices.warn(Notice::UdpBacklog, now, what);
                }
            }
            Origin::Tcp { key, gen } => {
                // RFC 7828 §3.3.2: a client that asked learns how long an
                // idle connection stays open.
                let mut t = std::mem::take(&mut self.bufs.truncated);
                let answer = match query.filter(|q| q.tcp_keepalive) {
                    Some(_) => {
                        t.clear();
                        t.extend_from_slice(answer);
                        let timeout = (self.settings.tcp_idle.as_millis() / 100).min(u128::from(u16::MAX)) as u16;
                        if add_keepalive(&mut t, timeout) {
                            &t[..]
                        } else {
                            answer
                        }
                    }
                    None => answer,
                };
                let delivered = self.clients.deliver(key, gen, answer, now);
                self.bufs.truncated = t;
                if let Err(Gone::TooSlow(peer)) = delivered {
                    self.stats.tcp_closed.too_slow += 1;
                    let what = format_args!("tcp client {peer} closed: does not read its answers");
                    self.notices.warn(Notice::SlowReader, now, what);
                }
            }
        }
    }

    pub(super) fn peer_of(&self, origin: Origin) -> String {
        match origin {
            Origin::Udp { peer, .. } => format!("udp {peer}"),
            Origin::Tcp { key, .. } => self
                .clients
                .peer(key)
                .map_or_else(|| "tcp ?".into(), |p| format!("tcp {p}")),
            Origin::Prefetch => "prefetch".into(),
        }
    }
}
