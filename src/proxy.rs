//! The loop and the query pipeline. Everything else is a room that the
//! loop drives and that answers with outcomes; this file decides what a
//! query goes through and in which order things happen in one turn:
//!
//! 1. wait for readiness until the nearest timer; read `now` once;
//! 2. dispatch each event to its room (accept, read queries, read answers);
//! 3. revisit what was left over (UDP batches cut short, resumed clients);
//! 4. expire due timers and query deadlines, with the same `now`;
//! 5. flush connections with output (queries coalesce here), clients, UDP;
//! 6. reap: close what the outcomes marked, re-send the unanswered queries
//!    of closed connections once;
//! 7. stop once a requested shutdown has drained.
//!
//! The path of one query: receive → check (`wire::query`) → cache → admit
//! (`queries`) → send (`upstream::pool`) → answer (`wire::response`) →
//! deliver, or fail with one [`Failure`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Events, Interest, Poll};

use crate::cache::Cache;
use crate::config::{Cidr, Config, Exit};
use crate::failure::Failure;
use crate::http::{HttpServer, Request, Route};
use crate::listen::client::{ClientLimits, NextQuery};
use crate::listen::tcp::{Clients, Gone, Refusal};
use crate::listen::udp::{Recv, Send};
use crate::listen::{Accept, Listeners};
use crate::metrics::{self, Stats, View};
use crate::notice::{Notice, Notices};
use crate::queries::{Admit, NewQuery, Origin, Queries, QueryRef};
use crate::timers::{poll_timeout, Timer, Timers};
use crate::token::Source;
use crate::upstream::pool::Outgoing;
use crate::upstream::{Answer, Orphan, Pool};
use crate::wire::build::{build_error, build_truncated, pad_query};
use crate::wire::query::parse_query;
use crate::wire::response::{parse_response, restore_for_client, strip_answer, without_ede};
use crate::wire::{BadResponse, Header, Query, Rcode, Reject, MAX_UDP};

/// Each query is sent at most this often (first try plus one re-send when
/// a connection dies under it).
const MAX_ATTEMPTS: u8 = 2;
/// Close-and-re-send rounds per turn; what is left waits for the next turn.
const REAP_ROUNDS: usize = 4;

/// What a reload may change while running.
struct Settings {
    timeout: Duration,
    padding: u16,
    allow: Vec<Cidr>,
    max_query_size: usize,
}

impl Settings {
    fn of(cfg: &Config) -> Settings {
        Settings {
            timeout: cfg.timeout,
            padding: cfg.padding,
            allow: cfg.allow.clone(),
            max_query_size: cfg.limits.max_query_size,
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }
}

/// Scratch buffers, reused for the life of the loop: no allocation per
/// datagram or answer in steady state.
struct Buffers {
    read: Box<[u8]>,
    frame: Vec<u8>,
    reply: Vec<u8>,
    truncated: Vec<u8>,
    key: Vec<u8>,
    /// A bounded pool of query-sized buffers.
    free: Vec<Vec<u8>>,
    orphans: Vec<Orphan>,
    keys: Vec<usize>,
    failing: Vec<QueryRef>,
}

impl Buffers {
    fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_default()
    }

    fn put(&mut self, mut buf: Vec<u8>) {
        // Neither a burst nor a few big messages can pin much memory.
        if self.free.len() < 2048 && buf.capacity() <= 512 {
            buf.clear();
            self.free.push(buf);
        }
    }
}

fn client_limits(cfg: &Config) -> ClientLimits {
    ClientLimits {
        max_pipeline: cfg.limits.max_tcp_pipeline,
        max_queries: cfg.limits.max_tcp_queries,
        idle: cfg.limits.tcp_idle,
    }
}

pub struct Proxy {
    poll: Poll,
    signals: signal_hook_mio::v1_0::Signals,
    listeners: Listeners,
    clients: Clients,
    pool: Pool,
    queries: Queries,
    timers: Timers,
    cache: Option<Cache>,
    http: HttpServer,
    settings: Settings,
    /// The configuration as started: what a reload is parsed from and
    /// compared with.
    started: Config,
    bufs: Buffers,
    notices: Notices,
    stats: Stats,
    stopping: Option<Instant>,
}

impl Proxy {
    /// Bind every listener and set up the loop; nothing is served until
    /// [`run`](Self::run).
    pub fn bind(cfg: &Config) -> Result<Proxy, String> {
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let listeners = Listeners::bind(&cfg.listen, cfg.reuseport, poll.registry())?;
        let pool = Pool::new(cfg)?;
        let (http, _) = HttpServer::bind(cfg.metrics, poll.registry())?;
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals =
            signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| format!("signals: {e}"))?;
        poll.registry()
            .register(&mut signals, Source::Signals.token(), Interest::READABLE)
            .map_err(|e| format!("register signals: {e}"))?;
        let l = &cfg.limits;
        Ok(Proxy {
            poll,
            signals,
            listeners,
            clients: Clients::new(l.max_tcp_clients, l.max_tcp_clients_per_ip, client_limits(cfg)),
            pool,
            queries: Queries::new(l.max_inflight, l.max_inflight_per_ip),
            timers: Timers::default(),
            cache: (cfg.cache_size > 0).then(|| Cache::new(cfg.cache_size)),
            http,
            settings: Settings::of(cfg),
            started: cfg.clone(),
            bufs: Buffers {
                read: vec![0; 65536].into_boxed_slice(),
                frame: Vec::new(),
                reply: Vec::new(),
                truncated: Vec::new(),
                key: Vec::new(),
                free: Vec::new(),
                orphans: Vec::new(),
                keys: Vec::new(),
                failing: Vec::new(),
            },
            notices: Notices::default(),
            stats: Stats::default(),
            stopping: None,
        })
    }

    /// The addresses actually bound, as ("udp" | "tcp", address).
    pub fn local_addrs(&self) -> &[(&'static str, SocketAddr)] {
        self.listeners.bound()
    }

    /// Serve until SIGINT or SIGTERM, then drain and return.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_wakeup(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // The one clock read of a turn: every room below gets this.
            let now = Instant::now();
            for ev in events.iter() {
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let writable = ev.is_writable() || ev.is_write_closed();
                match Source::decode(ev.token()) {
                    Some(source) => self.dispatch(source, readable, writable, now),
                    None => debug!("event for unknown token {}", ev.token().0),
                }
            }
            self.revisit(now);
            // Expiry before the flush: the SERVFAILs it writes go out now.
            self.expire(now);
            self.flush(now);
            self.reap(now);
            if let Some(stop) = self.stopping {
                if self.drained() || now >= stop {
                    self.finish(now);
                    return Ok(());
                }
            }
        }
    }

    fn next_wakeup(&self, now: Instant) -> Option<Duration> {
        if self.listeners.any_udp_more() || self.clients.has_resumed() || self.pool.has_work() {
            return Some(Duration::ZERO);
        }
        let next = match (self.timers.next_at(), self.stopping) {
            (Some(t), Some(s)) => Some(t.min(s)),
            (t, s) => t.or(s),
        };
        poll_timeout(next, now)
    }

    fn dispatch(&mut self, source: Source, readable: bool, writable: bool, now: Instant) {
        match source {
            Source::Signals => {
                let got: Vec<i32> = self.signals.pending().collect();
                if got.contains(&signal_hook::consts::SIGHUP) {
                    self.reload();
                }
                if got.iter().any(|&s| s != signal_hook::consts::SIGHUP) {
                    self.start_stop(now);
                }
            }
            Source::Udp(i) => {
                if writable {
                    if let Some(l) = self.listeners.udp(i) {
                        l.flush();
                    }
                }
                if readable {
                    self.read_udp(i, now);
                }
            }
            Source::TcpListener(i) => self.accept(i, now),
            Source::Client(key) => {
                let reading = self.stopping.is_none();
                self.clients.on_event(key, readable, writable, reading);
                self.client_queries(key, now);
            }
            Source::Upstream(key) => self.upstream_event(key, now),
            Source::Metrics => {
                let mut fresh = std::mem::take(&mut self.bufs.keys);
                fresh.clear();
                self.http
                    .accept(now, self.poll.registry(), &mut self.timers, &mut fresh);
                for &key in &fresh {
                    self.http_event(key, now);
                }
                self.bufs.keys = fresh;
            }
            Source::Http(key) => self.http_event(key, now),
        }
    }

    fn revisit(&mut self, now: Instant) {
        for i in 0..self.listeners.udp_count() {
            if self.listeners.udp(i).is_some_and(|l| l.has_more()) {
                self.read_udp(i, now);
            }
        }
        let mut keys = std::mem::take(&mut self.bufs.keys);
        self.clients.take_resumed(&mut keys);
        for &key in &keys {
            self.client_queries(key, now);
        }
        self.bufs.keys = keys;
    }

    fn expire(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Deadline(q) => {
                    if self.queries.is_due(q, now) {
                        self.time_out(q, now);
                    }
                }
                Timer::Handshake { .. } | Timer::ConnIdle { .. } => self.pool.on_timer(timer, now, &mut self.timers),
                Timer::ClientIdle { key, gen } => self.clients.on_idle_timer(key, gen, now, &mut self.timers),
                Timer::Http { key, gen } => self.http.on_timer(key, gen),
                Timer::AcceptRetry { listener } => {
                    self.listeners.retry_fired(listener);
                    self.accept(listener, now);
                }
            }
        }
    }

    fn flush(&mut self, now: Instant) {
        self.pool.flush();
        self.clients.flush(now);
    }

    /// Close what was marked for closing. The unanswered queries of a
    /// closed upstream connection are re-sent once, which may open or
    /// break other connections: a few rounds settle it.
    fn reap(&mut self, now: Instant) {
        for _ in 0..REAP_ROUNDS {
            let mut orphans = std::mem::take(&mut self.bufs.orphans);
            orphans.clear();
            let closed = self.pool.reap(now, self.poll.registry(), &mut orphans);
            for &o in &orphans {
                self.resend(o, now);
            }
            self.bufs.orphans = orphans;
            self.pool.after_resend(now);
            self.pool.flush();
            if !closed {
                break;
            }
        }
        // Answers from this turn's re-sends and failures, before closing.
        self.clients.flush(now);
        self.clients.reap(self.poll.registry());
        self.http.reap(self.poll.registry());
    }

    fn resend(&mut self, o: Orphan, now: Instant) {
        let Some(p) = self.queries.get_mut(o.query) else { return };
        p.orphaned(o.answered_at);
        if p.attempts() < MAX_ATTEMPTS && self.stopping.is_none() {
            self.stats.retried += 1;
            self.send(o.query, now);
        } else {
            self.fail(o.query, Failure::ConnLost, now);
        }
    }

    // ---- receive ----

    fn read_udp(&mut self, i: usize, now: Instant) {
        let Some(l) = self.listeners.udp(i) else { return };
        l.begin();
        loop {
            let Some(l) = self.listeners.udp(i) else { return };
            let (n, peer) = match l.recv(&mut self.bufs.read) {
                Recv::Datagram(n, peer) => (n, peer),
                Recv::Empty | Recv::Batch => return,
            };
            self.stats.queries_udp += 1;
            if !self.settings.allowed(peer.ip()) {
                // Dropped, not REFUSED: an answer to a spoofed source would
                // make us a reflector.
                self.stats.refused_acl += 1;
                let ip = peer.ip();
                let what = format_args!("udp query from {ip} dropped: not in --allow");
                self.notices.warn(Notice::AccessList, now, what);
                continue;
            }
            let mut msg = self.bufs.take();
            msg.extend_from_slice(self.bufs.read.get(..n).unwrap_or_default());
            self.handle_query(msg, Origin::Udp { listener: i, peer }, peer.ip(), now);
        }
    }

    fn accept(&mut self, i: usize, now: Instant) {
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
                        self.stats.refused_acl += 1;
                        let ip = peer.ip();
                        let what = format_args!("tcp client {ip} closed: not in --allow");
                        self.notices.warn(Notice::AccessList, now, what);
                        continue;
                    }
                    match self
                        .clients
                        .admit(sock, peer, now, self.poll.registry(), &mut self.timers)
                    {
                        Ok(key) => self.client_queries_after_read(key, now),
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

    fn client_queries_after_read(&mut self, key: usize, now: Instant) {
        // Data may have arrived with the handshake; the edge for it was
        // before registration on some kernels.
        self.clients.on_event(key, true, false, self.stopping.is_none());
        self.client_queries(key, now);
    }

    /// Take the client's buffered queries while it is under its caps.
    fn client_queries(&mut self, key: usize, now: Instant) {
        let reading = self.stopping.is_none();
        let Some(gen) = self.clients.gen(key) else { return };
        let ip = self.clients.peer(key).map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        let mut frame = std::mem::take(&mut self.bufs.frame);
        loop {
            match self.clients.next_query(key, &mut frame, reading, now) {
                Some(NextQuery::Query) => {
                    self.stats.queries_tcp += 1;
                    // Copied, not swapped: `frame` grows to the largest
                    // answer seen and must not end up in the query pool.
                    let mut msg = self.bufs.take();
                    msg.extend_from_slice(&frame);
                    self.handle_query(msg, Origin::Tcp { key, gen }, ip, now);
                }
                Some(NextQuery::Close { bad_frame: true }) => {
                    self.stats.dropped += 1;
                    break;
                }
                _ => break,
            }
        }
        self.bufs.frame = frame;
    }

    // ---- check, cache, admit, send ----

    fn handle_query(&mut self, msg: Vec<u8>, origin: Origin, ip: IpAddr, now: Instant) {
        match parse_query(&msg, self.settings.max_query_size) {
            Ok(query) => self.forward(query, msg, origin, ip, now),
            Err(Reject::Drop(why)) => {
                self.stats.dropped += 1;
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
                let mut reply = std::mem::take(&mut self.bufs.reply);
                build_error(&mut reply, &msg, query.as_deref(), rcode, ede);
                self.deliver(origin, query.as_deref(), &msg, &reply, now);
                self.bufs.reply = reply;
                self.bufs.put(msg);
            }
        }
    }

    fn forward(&mut self, query: Query, msg: Vec<u8>, origin: Origin, ip: IpAddr, now: Instant) {
        if log::log_enabled!(log::Level::Debug) {
            // The query log: names appear only when asked for.
            debug!(
                "query from {}: {} type {}",
                self.peer_of(origin),
                query.name(),
                query.qtype
            );
        }
        let key = match &mut self.cache {
            Some(cache) => {
                query.key_into(&mut self.bufs.key);
                let mut reply = std::mem::take(&mut self.bufs.reply);
                let hit = cache.get(&self.bufs.key, &query, &msg, now, &mut reply);
                if hit {
                    self.stats.answers += 1;
                    self.deliver(origin, Some(&query), &msg, &reply, now);
                }
                self.bufs.reply = reply;
                if hit {
                    self.bufs.put(msg);
                    return;
                }
                Some(Box::<[u8]>::from(self.bufs.key.as_slice()))
            }
            None => None,
        };
        let client_len = msg.len();
        // Rewritten once, re-sent as is: padding hides the query's size on
        // the wire, keepalive asks for the server's idle timeout.
        let msg = if self.settings.padding > 0 {
            let mut padded = self.bufs.take();
            pad_query(&mut padded, &msg, &query, self.settings.padding, true);
            self.bufs.put(msg);
            padded
        } else {
            msg
        };
        let new = NewQuery {
            origin,
            client: ip,
            query,
            msg,
            key,
        };
        let deadline = now + self.settings.timeout;
        match self.queries.admit(new, deadline, &mut self.timers) {
            Ok(Admit::Queued(q)) => self.send(q, now),
            Ok(Admit::Merged(_)) => self.stats.merged += 1,
            Err(refused) => self.refuse_busy(refused, client_len, now),
        }
    }

    /// Over an in-flight limit: REFUSED at once, never larger than the
    /// query (under a flood of maybe spoofed queries, no amplification).
    fn refuse_busy(&mut self, refused: Box<NewQuery>, client_len: usize, now: Instant) {
        self.stats.refused_busy += 1;
        let ip = refused.client;
        let what = format_args!("query from {ip} refused: --max-inflight or --max-inflight-per-ip reached");
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
    fn send(&mut self, q: QueryRef, now: Instant) {
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

    fn upstream_event(&mut self, key: usize, now: Instant) {
        self.pool.conn_event(key, &mut self.bufs.read, now, &mut self.timers);
        let mut frame = std::mem::take(&mut self.bufs.frame);
        while let Some(answer) = self.pool.next_answer(key, &mut frame, now) {
            match answer {
                Answer::Live { id, query } => self.on_answer(key, id, query, &mut frame, now),
                Answer::Late => self.stats.late_answers += 1,
                Answer::Unknown => {
                    self.stats.unknown_ids += 1;
                    debug!("upstream answer with unknown ID dropped");
                }
            }
        }
        self.bufs.frame = frame;
    }

    fn on_answer(&mut self, conn: usize, id: u16, q: QueryRef, frame: &mut Vec<u8>, now: Instant) {
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
                self.stats.mismatched += 1;
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
    fn answer(&mut self, q: QueryRef, answer: &mut [u8], now: Instant) {
        let Some(mut p) = self.queries.settle(q) else { return };
        restore_for_client(answer, p.query(), p.msg());
        if let (Some(cache), Some(key)) = (&mut self.cache, p.key()) {
            cache.insert(key, answer, now);
        }
        self.stats.answers += 1;
        self.deliver(p.origin(), Some(p.query()), p.msg(), answer, now);
        for f in p.take_followers() {
            let Some(f) = self.queries.settle(f) else { continue };
            restore_for_client(answer, f.query(), f.msg());
            self.stats.answers += 1;
            self.deliver(f.origin(), Some(f.query()), f.msg(), answer, now);
            self.bufs.put(f.into_msg());
        }
        self.bufs.put(p.into_msg());
    }

    fn time_out(&mut self, q: QueryRef, now: Instant) {
        self.stats.timeouts += 1;
        if let Some(p) = self.queries.get(q) {
            self.pool.timed_out(p.last_upstream(), p.sent(), q);
        }
        self.fail(q, Failure::Timeout, now);
    }

    /// End `q` (and the queries merged behind it, which share its fate)
    /// with an answer of our own.
    fn fail(&mut self, q: QueryRef, failure: Failure, now: Instant) {
        let (rcode, ede) = failure.answer();
        let mut failing = std::mem::take(&mut self.bufs.failing);
        failing.clear();
        failing.push(q);
        while let Some(q) = failing.pop() {
            let Some(mut p) = self.queries.settle(q) else { continue };
            failing.extend(p.take_followers());
            if rcode == Rcode::ServFail {
                self.stats.servfail += 1;
            }
            let mut reply = std::mem::take(&mut self.bufs.reply);
            build_error(&mut reply, p.msg(), Some(p.query()), rcode, Some(ede));
            self.deliver(p.origin(), Some(p.query()), p.msg(), &reply, now);
            self.bufs.reply = reply;
            self.bufs.put(p.into_msg());
        }
        self.bufs.failing = failing;
    }

    /// Send an answer to where its query came from: over UDP within the
    /// client's budget (RFC 6891 §7, TC=1 when it does not fit), over TCP
    /// queued on the client, out of order allowed.
    fn deliver(&mut self, origin: Origin, query: Option<&Query>, msg: &[u8], answer: &[u8], now: Instant) {
        if let Ok(h) = Header::new_checked(answer) {
            let rc = usize::from(u16::from(h.rcode()));
            if let Some(n) = self.stats.rcodes.get_mut(rc) {
                *n += 1;
            }
        }
        match origin {
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
                    self.stats.udp_send_dropped += 1;
                    let what = format_args!("udp answers dropped: send buffer full");
                    self.notices.warn(Notice::UdpBacklog, now, what);
                }
            }
            Origin::Tcp { key, gen } => {
                if let Err(Gone::TooSlow(peer)) = self.clients.deliver(key, gen, answer) {
                    let what = format_args!("tcp client {peer} closed: does not read its answers");
                    self.notices.warn(Notice::SlowReader, now, what);
                }
            }
        }
    }

    fn peer_of(&self, origin: Origin) -> String {
        match origin {
            Origin::Udp { peer, .. } => format!("udp {peer}"),
            Origin::Tcp { key, .. } => self
                .clients
                .peer(key)
                .map_or_else(|| "tcp ?".into(), |p| format!("tcp {p}")),
        }
    }

    // ---- metrics ----

    fn http_event(&mut self, key: usize, now: Instant) {
        let Some(req) = self.http.on_event(key) else { return };
        self.respond(req, now);
    }

    fn respond(&mut self, req: Request, now: Instant) {
        let (status, body) = match req.route {
            Route::Metrics => ("200 OK", self.render_metrics(now)),
            Route::Health if self.pool.healthy() => ("200 OK", "ok\n".to_string()),
            Route::Health => ("503 Service Unavailable", "no usable upstream\n".to_string()),
            Route::NotFound => ("404 Not Found", "not found\n".to_string()),
            Route::MethodNotAllowed => ("405 Method Not Allowed", "method not allowed\n".to_string()),
            Route::TooLarge => ("431 Request Header Fields Too Large", "request too large\n".to_string()),
            Route::BadRequest => ("400 Bad Request", "bad request\n".to_string()),
        };
        let ctype = if req.route == Route::Metrics {
            "text/plain; version=0.0.4; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        };
        self.http.respond(req, status, ctype, body.as_bytes());
    }

    fn render_metrics(&self, now: Instant) -> String {
        metrics::render(&View {
            stats: &self.stats,
            pool: &self.pool,
            cache: self.cache.as_ref(),
            inflight: self.queries.len(),
            tcp_clients: self.clients.len(),
            now,
        })
    }

    // ---- reload and shutdown ----

    /// SIGHUP: read the command line and --config file again and apply
    /// what can change while running. Queries in flight finish under the
    /// settings they were admitted with; unchanged upstreams keep their
    /// connections, health and counters.
    fn reload(&mut self) {
        let cfg = match crate::config::parse(self.started.args.clone()) {
            Ok(cfg) => cfg,
            Err(Exit::Usage(msg)) => {
                warn!("reload failed, keeping the running configuration: {msg}");
                return;
            }
            Err(_) => return,
        };
        let reloaded = match self.pool.reload(&cfg) {
            Ok(r) => r,
            Err(msg) => {
                warn!("reload failed, keeping the running configuration: {msg}");
                return;
            }
        };
        let restart = self.started.restart_only_changes(&cfg);
        if !restart.is_empty() {
            warn!("reload: {} only change on restart", restart.join(", "));
        }
        let l = &cfg.limits;
        self.queries.set_limits(l.max_inflight, l.max_inflight_per_ip);
        self.clients
            .set_limits(l.max_tcp_clients, l.max_tcp_clients_per_ip, client_limits(&cfg));
        self.settings = Settings::of(&cfg);
        info!(
            "configuration reloaded: {} upstreams, {} forwarding zones",
            reloaded.upstreams, reloaded.zones
        );
    }

    fn start_stop(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        info!("shutting down: {} queries in flight", self.queries.len());
        self.listeners.stop(self.poll.registry());
        self.http.stop(self.poll.registry());
        self.stopping = Some(now + self.settings.timeout + Duration::from_millis(100));
    }

    fn drained(&self) -> bool {
        self.queries.is_empty() && self.clients.all_flushed()
    }

    fn finish(&mut self, now: Instant) {
        self.pool.close_all();
        self.reap(now);
        for q in self.queries.all() {
            self.fail(q, Failure::ShuttingDown, now);
        }
        self.listeners.flush_udp();
        self.flush(now);
        let s = &self.stats;
        info!(
            "stopped: {} udp + {} tcp queries, {} answers, {} servfail ({} timeouts), {} rejected, {} dropped, {} truncated",
            s.queries_udp, s.queries_tcp, s.answers, s.servfail, s.timeouts, s.rejected, s.dropped, s.truncated
        );
        if s.unknown_ids + s.mismatched + s.late_answers > 0 {
            info!(
                "upstream answers dropped: {} unknown ID, {} wrong question, {} late",
                s.unknown_ids, s.mismatched, s.late_answers
            );
        }
    }
}
