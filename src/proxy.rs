//! The one event loop. `Proxy` owns every socket, every connection state
//! machine and every in-flight query; `run` is the only loop:
//!
//! 1. wait for readiness until the nearest deadline;
//! 2. handle each event (accept, read queries, read answers);
//! 3. expire queries and timers with the same `now`;
//! 4. flush every connection that has output (queries coalesce here);
//! 5. stop once a requested shutdown has drained.
//!
//! Queries live in a slab; each remembers where it came from, the bytes to
//! re-send if its connection dies, and where it was sent. Upstream
//! connections map rewritten IDs back to query keys. Every key that can
//! outlive its target carries a generation, so a late answer for a reused
//! slot is dropped, never misdelivered.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::cache::{self, Cache};
use crate::client::{Client, ReadOutcome, MAX_BUFFERED_OUT};
use crate::config::{Cidr, Config, Limits, Upstream as UpstreamConfig};
use crate::dns::{self, ede, rcode, BadResponse, QueryInfo, Reject};
use crate::http::{self, HttpConn, Route};
use crate::id_table::{IdRng, Lookup, QueryRef};
use crate::upstream::{CloseReason, ConnState, UpstreamConn};

/// Queries in flight on one upstream connection before another is opened.
const MAX_INFLIGHT_PER_CONN: usize = 1000;
/// Connections per upstream; more only when the others are full
/// (RFC 7766 §6.2.2 asks for few).
const MAX_CONNS_PER_UPSTREAM: usize = 4;
/// Timed-out IDs a connection may hold before it is drained and replaced.
const MAX_TOMBSTONES: usize = 256;
/// Upstream connections with nothing in flight close after this.
const UPSTREAM_IDLE: Duration = Duration::from_secs(20);
/// Metrics scrapes open at once, and how long one may take.
const MAX_HTTP: usize = 16;
const HTTP_DEADLINE: Duration = Duration::from_secs(2);
/// Upper bounds (seconds) of the upstream latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];
/// Datagrams read per listener per turn before other sockets get a go.
const UDP_BATCH: usize = 1024;
/// Answers kept for a UDP socket whose send buffer is full.
const UDP_BACKLOG: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Each query is sent at most this often (first try plus one re-send when
/// a connection dies under it).
const MAX_ATTEMPTS: u8 = 2;
const UDP_RCVBUF: libc::c_int = 4 << 20;

const SIGNALS: Token = Token(0);
const TAG_FIXED: usize = 0;
const TAG_CLIENT: usize = 1;
const TAG_CONN: usize = 2;
const TAG_HTTP: usize = 3;
const UDP_BASE: usize = 1;
const METRICS: usize = 1 << 15;
const TCP_BASE: usize = 1 << 16;

fn token(tag: usize, index: usize) -> Token {
    Token((index << 2) | tag)
}

/// Where an answer goes.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Udp { listener: usize, peer: SocketAddr },
    Tcp { key: usize, gen: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    conn: usize,
    conn_gen: u32,
    id: u16,
    at: Instant,
}

struct Pending {
    gen: u32,
    /// The upstream group that serves its name.
    group: usize,
    origin: Origin,
    /// The client's address, for the per-address in-flight count.
    ip: IpAddr,
    info: QueryInfo,
    /// The client's query, with the client's ID.
    msg: Vec<u8>,
    attempts: u8,
    sent: Option<Sent>,
    /// The upstream of the last attempt, avoided on a re-send.
    upstream: Option<usize>,
    /// With the cache on: the query's cache key, and the identical queries
    /// that arrived while this one was in flight and wait for its answer.
    cache_key: Option<Box<[u8]>>,
    followers: Vec<(usize, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Handshake { conn: usize, gen: u32 },
    ConnIdle { conn: usize, gen: u32 },
    ClientIdle { key: usize, gen: u32 },
    AcceptRetry { listener: usize },
    Http { key: usize, gen: u32 },
}

/// Limits whose hits are logged, each at most once per [`NOTICE_EVERY`].
#[derive(Debug, Clone, Copy)]
enum Notice {
    AccessList,
    Busy,
    TcpClients,
    UdpBacklog,
    SlowReader,
}

const NOTICE_EVERY: Duration = Duration::from_secs(10);

struct UdpListener {
    sock: UdpSocket,
    backlog: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Stopped before `WouldBlock` (batch limit): revisit next turn.
    more: bool,
}

struct Upstream {
    cfg: UpstreamConfig,
    /// Which names it serves: 0 for the default upstreams, else a zone.
    group: usize,
    /// Smoothed answer latency in seconds, learned from real traffic.
    srtt: Option<f64>,
    /// Shared by all upstreams, or this upstream's own when it has pins.
    tls: Arc<rustls::ClientConfig>,
    label: String,
    conns: Vec<usize>,
    failures: u32,
    down_until: Option<Instant>,
    down: bool,
    stats: UpstreamStats,
}

#[derive(Debug, Default, Clone)]
struct UpstreamStats {
    connects: u64,
    failures: u64,
    resumed: u64,
    answers: u64,
    latency_buckets: [u64; LATENCY_BUCKETS.len()],
    latency_sum: f64,
}

impl UpstreamStats {
    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        self.answers += 1;
        self.latency_sum += secs;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| secs <= le) {
            self.latency_buckets[i] += 1;
        }
    }
}

fn rcode_name(rc: usize) -> &'static str {
    const NAMES: [&str; 16] = [
        "NOERROR",
        "FORMERR",
        "SERVFAIL",
        "NXDOMAIN",
        "NOTIMP",
        "REFUSED",
        "YXDOMAIN",
        "YXRRSET",
        "NXRRSET",
        "NOTAUTH",
        "NOTZONE",
        "DSOTYPENI",
        "RCODE12",
        "RCODE13",
        "RCODE14",
        "RCODE15",
    ];
    NAMES.get(rc).copied().unwrap_or("OTHER")
}

impl Upstream {
    /// Learn from one answer (or, with the deadline, one timeout).
    fn observe(&mut self, d: Duration) {
        self.stats.observe(d);
        let sample = d.as_secs_f64();
        self.srtt = Some(self.srtt.map_or(sample, |s| 0.8 * s + 0.2 * sample));
    }

    fn usable(&self, now: Instant) -> bool {
        self.down_until.is_none_or(|t| t <= now)
    }
}

/// Counters, logged at exit (and the base for metrics).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub queries_udp: u64,
    pub queries_tcp: u64,
    pub answers: u64,
    pub servfail: u64,
    pub timeouts: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub truncated: u64,
    pub retried: u64,
    pub late_answers: u64,
    pub unknown_ids: u64,
    pub mismatched: u64,
    pub udp_send_dropped: u64,
    pub refused_acl: u64,
    pub merged: u64,
    pub refused_busy: u64,
    pub tcp_refused: u64,
    /// Answers sent to clients, by RCODE.
    pub rcodes: [u64; 16],
}

pub struct Proxy {
    poll: Poll,
    timeout: Duration,
    udp: Vec<UdpListener>,
    tcp: Vec<Option<TcpListener>>,
    clients: Slab<Client>,
    conns: Slab<UpstreamConn>,
    upstreams: Vec<Upstream>,
    queries: Slab<Pending>,
    /// Query deadlines in arrival order; all share one timeout, so the
    /// front is always the nearest. Entries of answered queries are skipped
    /// (their generation no longer matches) and compacted away.
    deadlines: VecDeque<(Instant, usize, u32)>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    rng: IdRng,
    next_gen: u32,
    dirty_conns: Vec<usize>,
    dirty_clients: Vec<usize>,
    resume_clients: Vec<usize>,
    frame: Vec<u8>,
    reply: Vec<u8>,
    truncated: Vec<u8>,
    read_buf: Box<[u8]>,
    retry: Vec<QueryRef>,
    free_bufs: Vec<Vec<u8>>,
    signals: signal_hook_mio::v1_0::Signals,
    stopping: Option<Instant>,
    local: Vec<(&'static str, SocketAddr)>,
    limits: Limits,
    allow: Vec<Cidr>,
    per_ip: HashMap<IpAddr, u32>,
    /// Open TCP client connections per client address.
    tcp_per_ip: HashMap<IpAddr, u32>,
    metrics: Option<TcpListener>,
    http: Slab<HttpConn>,
    padding: u16,
    /// Split-forwarding zones, lower-case wire form, with their group.
    zones: Vec<(Vec<u8>, usize)>,
    cache: Option<Cache>,
    /// Cache key → the query in flight for it (merging).
    leaders: HashMap<Box<[u8]>, (usize, u32)>,
    key_buf: Vec<u8>,
    /// When each kind of limit hit was last logged.
    noticed: [Option<Instant>; 5],
    /// What the configuration was parsed from, for reloads.
    args: Vec<std::ffi::OsString>,
    listen: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    pub stats: Stats,
}

/// `corp.example` → lower-case wire form.
fn zone_wire(zone: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for label in zone.split('.').filter(|l| !l.is_empty()) {
        w.push(label.len() as u8);
        w.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    w.push(0);
    w
}

/// The upstream table: group 0 is the default upstreams, each --forward
/// zone has its own group.
type Zones = Vec<(Vec<u8>, usize)>;

fn build_upstreams(cfg: &Config, tls: &Arc<rustls::ClientConfig>) -> Result<(Vec<Upstream>, Zones), String> {
    let mut zones: Zones = Vec::new();
    let mut members: Vec<(usize, &UpstreamConfig, Option<&str>)> = cfg.upstreams.iter().map(|u| (0, u, None)).collect();
    for (zone, u) in &cfg.forwards {
        let wire = zone_wire(zone);
        let group = match zones.iter().find(|(z, _)| *z == wire) {
            Some(&(_, g)) => g,
            None => {
                zones.push((wire, zones.len() + 1));
                zones.len()
            }
        };
        members.push((group, u, Some(zone.as_str())));
    }
    let mut upstreams = Vec::new();
    for (group, u, zone) in members {
        match zone {
            Some(zone) => info!("upstream {u} for {zone}"),
            None => info!("upstream {u}"),
        }
        upstreams.push(Upstream {
            group,
            srtt: None,
            cfg: u.clone(),
            tls: crate::tls::for_upstream(tls, cfg.ca_file.as_deref(), u)?,
            label: u.to_string(),
            conns: Vec::new(),
            failures: 0,
            down_until: None,
            down: false,
            stats: UpstreamStats::default(),
        });
    }
    Ok((upstreams, zones))
}

/// Group of retired upstreams: never chosen, kept only until their
/// connections have drained.
const RETIRED: usize = usize::MAX;

/// A non-blocking socket bound to `addr`. With `reuseport`, several
/// dotproxy processes can bind the same address and the kernel spreads
/// clients over them (SO_REUSEPORT): the way to use more than one core.
fn bind_socket(addr: SocketAddr, ty: socket2::Type, reuseport: bool) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    if ty == socket2::Type::STREAM {
        // Restarting must not wait for old connections in TIME_WAIT.
        s.set_reuse_address(true)?;
    }
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    // A burst of thousands of datagrams overflows the default ~208 KB
    // buffer before the loop can drain it. SO_RCVBUFFORCE passes
    // rmem_max when privileged; plain SO_RCVBUF is the fallback.
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket fd and a pointer to a live c_int of the
        // size passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Bind UDP and TCP on the same address; with port 0, on the same port.
fn bind_pair(addr: SocketAddr, reuseport: bool) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = bind_socket(addr, socket2::Type::DGRAM, reuseport)?;
        let udp = UdpSocket::from_std(udp.into());
        let bound = udp.local_addr()?;
        let tcp = bind_socket(bound, socket2::Type::STREAM, reuseport).and_then(|s| {
            s.listen(1024)?;
            Ok(TcpListener::from_std(s.into()))
        });
        match tcp {
            Ok(tcp) => return Ok((udp, tcp)),
            // The kernel's free UDP port may be a busy TCP port; with an
            // explicit port there is nothing to retry.
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()))
}

impl Proxy {
    /// Bind every listener and set up the loop; nothing is served until
    /// [`run`](Self::run).
    pub fn bind(cfg: &Config) -> Result<Proxy, String> {
        let tls = crate::tls::client_config(cfg.ca_file.as_deref())?;
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut local = Vec::new();
        for (i, &addr) in cfg.listen.iter().enumerate() {
            let (mut u, mut t) = bind_pair(addr, cfg.reuseport).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            set_rcvbuf(&u, UDP_RCVBUF);
            let reg = poll.registry();
            reg.register(
                &mut u,
                token(TAG_FIXED, UDP_BASE + i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .and_then(|_| reg.register(&mut t, token(TAG_FIXED, TCP_BASE + i), Interest::READABLE))
            .map_err(|e| format!("register {addr}: {e}"))?;
            let ua = u.local_addr().map_err(|e| e.to_string())?;
            let ta = t.local_addr().map_err(|e| e.to_string())?;
            info!("listening on udp {ua}");
            info!("listening on tcp {ta}");
            local.push(("udp", ua));
            local.push(("tcp", ta));
            udp.push(UdpListener {
                sock: u,
                backlog: VecDeque::new(),
                more: false,
            });
            tcp.push(Some(t));
        }
        let (upstreams, zones) = build_upstreams(cfg, &tls)?;
        let metrics = match cfg.metrics {
            None => None,
            Some(addr) => {
                let mut l = TcpListener::bind(addr).map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
                poll.registry()
                    .register(&mut l, token(TAG_FIXED, METRICS), Interest::READABLE)
                    .map_err(|e| format!("register metrics: {e}"))?;
                let a = l.local_addr().map_err(|e| e.to_string())?;
                info!("metrics on http://{a}/metrics");
                local.push(("http", a));
                Some(l)
            }
        };
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals =
            signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| format!("signals: {e}"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| format!("register signals: {e}"))?;
        Ok(Proxy {
            poll,
            timeout: cfg.timeout,
            udp,
            tcp,
            clients: Slab::new(),
            conns: Slab::new(),
            upstreams,
            queries: Slab::new(),
            deadlines: VecDeque::new(),
            timers: BinaryHeap::new(),
            rng: IdRng::default(),
            next_gen: 0,
            dirty_conns: Vec::new(),
            dirty_clients: Vec::new(),
            resume_clients: Vec::new(),
            frame: Vec::new(),
            reply: Vec::new(),
            truncated: Vec::new(),
            read_buf: vec![0; 65536].into_boxed_slice(),
            retry: Vec::new(),
            free_bufs: Vec::new(),
            signals,
            stopping: None,
            local,
            limits: cfg.limits.clone(),
            allow: cfg.allow.clone(),
            per_ip: HashMap::new(),
            tcp_per_ip: HashMap::new(),
            metrics,
            http: Slab::new(),
            padding: cfg.padding,
            zones,
            cache: (cfg.cache_size > 0).then(|| Cache::new(cfg.cache_size)),
            leaders: HashMap::new(),
            key_buf: Vec::new(),
            noticed: [None; 5],
            args: cfg.args.clone(),
            listen: cfg.listen.clone(),
            metrics_addr: cfg.metrics,
            stats: Stats::default(),
        })
    }

    /// The addresses actually bound, as ("udp" | "tcp", address).
    pub fn local_addrs(&self) -> &[(&'static str, SocketAddr)] {
        &self.local
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
            let now = Instant::now();
            for ev in events.iter() {
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let writable = ev.is_writable() || ev.is_write_closed();
                self.on_event(ev.token(), readable, writable, now);
            }
            for i in 0..self.udp.len() {
                if self.udp[i].more && self.stopping.is_none() {
                    self.read_udp(i, now);
                }
            }
            self.resume(now);
            // Expiry first: the SERVFAILs it writes go out in this turn's flush.
            self.expire(now);
            self.flush(now);
            if let Some(stop) = self.stopping {
                if self.drained() || now >= stop {
                    self.finish(now);
                    return Ok(());
                }
            }
        }
    }

    fn next_wakeup(&self, now: Instant) -> Option<Duration> {
        if self.udp.iter().any(|u| u.more) || !self.resume_clients.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = self.deadlines.front().map(|d| d.0);
        if let Some(Reverse((t, _))) = self.timers.peek() {
            next = Some(next.map_or(*t, |n| n.min(*t)));
        }
        if let Some(stop) = self.stopping {
            next = Some(next.map_or(stop, |n| n.min(stop)));
        }
        // Round up: waking a little early would only spin until the deadline.
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn on_event(&mut self, tok: Token, readable: bool, writable: bool, now: Instant) {
        let index = tok.0 >> 2;
        match tok.0 & 3 {
            TAG_CLIENT => self.client_event(index, readable, writable, now),
            TAG_CONN => self.conn_event(index, now),
            TAG_HTTP => self.http_event(index, now),
            TAG_FIXED if index == METRICS => self.accept_http(now),
            TAG_FIXED if tok == SIGNALS => {
                let got: Vec<i32> = self.signals.pending().collect();
                if got.contains(&signal_hook::consts::SIGHUP) {
                    self.reload(now);
                }
                if got.iter().any(|&s| s != signal_hook::consts::SIGHUP) {
                    self.start_stop(now);
                }
            }
            TAG_FIXED if index >= TCP_BASE => self.accept(index - TCP_BASE, now),
            TAG_FIXED if index >= UDP_BASE && index - UDP_BASE < self.udp.len() => {
                let i = index - UDP_BASE;
                if writable {
                    self.flush_udp_backlog(i);
                }
                if readable && self.stopping.is_none() {
                    self.read_udp(i, now);
                }
            }
            _ => debug!("event for unknown token {}", tok.0),
        }
    }

    /// Log that a limit was hit, once per kind per ten seconds: a flood
    /// must not turn into a flood of log lines.
    fn notice(&mut self, kind: Notice, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let last = &mut self.noticed[kind as usize];
        if last.is_none_or(|t| now.saturating_duration_since(t) >= NOTICE_EVERY) {
            *last = Some(now);
            warn!("{what} (logged at most every {} s)", NOTICE_EVERY.as_secs());
        }
    }

    fn gen(&mut self) -> u32 {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.next_gen
    }

    fn take_buf(&mut self) -> Vec<u8> {
        self.free_bufs.pop().unwrap_or_default()
    }

    fn put_buf(&mut self, mut buf: Vec<u8>) {
        // Keep a bounded pool of query-sized buffers: steady state
        // allocates nothing per query, and neither a burst nor a few big
        // messages can pin much memory.
        if self.free_bufs.len() < 2048 && buf.capacity() <= 512 {
            buf.clear();
            self.free_bufs.push(buf);
        }
    }

    // ---- client side: UDP ----

    fn read_udp(&mut self, i: usize, now: Instant) {
        for _ in 0..UDP_BATCH {
            let (n, peer) = match self.udp[i].sock.recv_from(&mut self.read_buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.udp[i].more = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from earlier sends surface here; they concern
                // one peer, not the socket.
                Err(e) => {
                    debug!("udp recv: {e}");
                    continue;
                }
            };
            self.stats.queries_udp += 1;
            if !self.allowed(peer.ip()) {
                // Dropped, not REFUSED: an answer to a spoofed source would
                // make us a reflector.
                self.stats.refused_acl += 1;
                self.notice(
                    Notice::AccessList,
                    format_args!("udp query from {} dropped: not in --allow", peer.ip()),
                );
                continue;
            }
            let mut msg = self.take_buf();
            msg.extend_from_slice(&self.read_buf[..n]);
            self.handle_query(msg, Origin::Udp { listener: i, peer }, now);
        }
        self.udp[i].more = true;
    }

    fn udp_send(&mut self, i: usize, peer: SocketAddr, msg: &[u8]) {
        let Some(l) = self.udp.get_mut(i) else { return };
        if l.backlog.is_empty() {
            match l.sock.send_to(msg, peer) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!("udp send to {peer}: {e}");
                    return;
                }
            }
        }
        if l.backlog.len() < UDP_BACKLOG {
            l.backlog.push_back((peer, msg.to_vec()));
        } else {
            self.stats.udp_send_dropped += 1;
            self.notice(
                Notice::UdpBacklog,
                format_args!("udp answers dropped: send buffer full"),
            );
        }
    }

    fn flush_udp_backlog(&mut self, i: usize) {
        let Some(l) = self.udp.get_mut(i) else { return };
        while let Some((peer, msg)) = l.backlog.front() {
            match l.sock.send_to(msg, *peer) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                _ => {
                    l.backlog.pop_front();
                }
            }
        }
    }

    // ---- client side: TCP ----

    fn accept(&mut self, i: usize, now: Instant) {
        loop {
            let Some(Some(listener)) = self.tcp.get(i) else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => {
                    if !self.allowed(peer.ip()) {
                        self.stats.refused_acl += 1;
                        self.notice(
                            Notice::AccessList,
                            format_args!("tcp client {} closed: not in --allow", peer.ip()),
                        );
                        debug!("tcp client {peer} not in the access list; closed");
                        continue;
                    }
                    let from_ip = self.tcp_per_ip.get(&peer.ip()).copied().unwrap_or(0);
                    if from_ip >= self.limits.max_tcp_clients_per_ip {
                        self.stats.tcp_refused += 1;
                        let max = self.limits.max_tcp_clients_per_ip;
                        self.notice(
                            Notice::TcpClients,
                            format_args!(
                                "tcp client {} refused: --max-tcp-clients-per-ip {max} reached",
                                peer.ip()
                            ),
                        );
                        continue;
                    }
                    if self.clients.len() >= self.limits.max_tcp_clients {
                        self.stats.tcp_refused += 1;
                        let max = self.limits.max_tcp_clients;
                        self.notice(
                            Notice::TcpClients,
                            format_args!("tcp client refused: --max-tcp-clients {max} reached"),
                        );
                        debug!(
                            "tcp client {peer} refused: {} clients connected",
                            self.limits.max_tcp_clients
                        );
                        continue;
                    }
                    let gen = self.gen();
                    let entry = self.clients.vacant_entry();
                    let key = entry.key();
                    let mut client = Client::new(sock, peer, gen, now);
                    if let Err(e) = self.poll.registry().register(
                        client.source(),
                        token(TAG_CLIENT, key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!("register tcp client: {e}");
                        continue;
                    }
                    entry.insert(client);
                    *self.tcp_per_ip.entry(peer.ip()).or_insert(0) += 1;
                    self.timers
                        .push(Reverse((now + self.limits.tcp_idle, Timer::ClientIdle { key, gen })));
                    // Data may have arrived with the handshake; the edge
                    // for it was before registration on some kernels.
                    self.client_event(key, true, false, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors: the pending connection stays
                    // queued and the edge will not fire again, so retry on a
                    // timer instead of spinning.
                    warn!("accept: {e}; retrying in 100 ms");
                    self.timers.push(Reverse((
                        now + Duration::from_millis(100),
                        Timer::AcceptRetry { listener: i },
                    )));
                    return;
                }
            }
        }
    }

    fn client_event(&mut self, key: usize, readable: bool, writable: bool, now: Instant) {
        if writable {
            self.mark_client_dirty(key);
        }
        let Some(c) = self.clients.get_mut(key) else {
            return;
        };
        if readable && self.stopping.is_none() {
            if let Err(e) = c.read() {
                debug!("tcp client {}: {e}", c.peer);
                self.close_client(key);
                return;
            }
        }
        self.client_frames(key, now);
    }

    /// Turn buffered frames into queries while the client is under its
    /// in-flight cap; read more if reading was paused.
    fn client_frames(&mut self, key: usize, now: Instant) {
        loop {
            let Some(c) = self.clients.get_mut(key) else {
                return;
            };
            if c.in_flight >= self.limits.max_tcp_pipeline {
                return;
            }
            let cap = self.limits.max_tcp_queries;
            if cap > 0 && c.queries >= cap {
                // Its quota is used (a guard against endless connections,
                // CVE-2025-30193): answer what is in flight, take nothing
                // more, close.
                c.eof = true;
                if c.finished() {
                    self.close_client(key);
                }
                return;
            }
            match c.decoder.next_into(&mut self.frame) {
                Ok(true) => {
                    let gen = c.gen;
                    c.queries += 1;
                    c.last_active = now;
                    self.stats.queries_tcp += 1;
                    // Copied, not swapped: `frame` grows to the largest
                    // answer seen and must not end up in the query pool.
                    let mut msg = self.take_buf();
                    msg.extend_from_slice(&self.frame);
                    self.handle_query(msg, Origin::Tcp { key, gen }, now);
                }
                Ok(false) => {
                    if c.paused && self.stopping.is_none() {
                        match c.read() {
                            Ok(ReadOutcome::Drained | ReadOutcome::Eof) => {}
                            Ok(ReadOutcome::Paused) => return,
                            Err(_) => {
                                self.close_client(key);
                                return;
                            }
                        }
                        continue;
                    }
                    if c.finished() {
                        self.close_client(key);
                    }
                    return;
                }
                Err(e) => {
                    // A frame shorter than a header: no ID to answer to and
                    // the stream cannot be resynchronised (RFC 7766 §8).
                    debug!("tcp client {}: {e}; closing", c.peer);
                    self.stats.dropped += 1;
                    self.close_client(key);
                    return;
                }
            }
        }
    }

    fn mark_client_dirty(&mut self, key: usize) {
        if let Some(c) = self.clients.get_mut(key) {
            if !c.dirty {
                c.dirty = true;
                self.dirty_clients.push(key);
            }
        }
    }

    fn close_client(&mut self, key: usize) {
        if let Some(mut c) = self.clients.try_remove(key) {
            let _ = self.poll.registry().deregister(c.source());
            let ip = c.peer.ip();
            if let Some(n) = self.tcp_per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.tcp_per_ip.remove(&ip);
                }
            }
            debug!("tcp client {} closed", c.peer);
        }
    }

    /// Clients that were held at their in-flight cap and got answers.
    fn resume(&mut self, now: Instant) {
        let keys = std::mem::take(&mut self.resume_clients);
        for &key in &keys {
            self.client_frames(key, now);
        }
        let mut keys = keys;
        keys.clear();
        if self.resume_clients.is_empty() {
            self.resume_clients = keys;
        }
    }

    // ---- queries ----

    fn handle_query(&mut self, msg: Vec<u8>, origin: Origin, now: Instant) {
        let is_answer = msg.get(2).is_some_and(|b| b & 0x80 != 0);
        let checked = if msg.len() > self.limits.max_query_size && msg.len() >= dns::HEADER_LEN && !is_answer {
            // Real queries are a few hundred bytes; a huge one is not worth
            // parsing or forwarding. The header can still be answered.
            Err(Reject::Answer {
                rcode: u16::from(rcode::FORMERR),
                info: None,
                why: "query larger than --max-query-size",
                ede: None,
            })
        } else {
            dns::parse_query(&msg)
        };
        match checked {
            Err(Reject::Drop(why)) => {
                self.stats.dropped += 1;
                debug!("dropped query from {}: {why}", self.peer_of(origin));
                self.put_buf(msg);
            }
            Err(Reject::Answer { rcode, info, why, ede }) => {
                self.stats.rejected += 1;
                debug!("rejected query from {}: {why} (rcode {rcode})", self.peer_of(origin));
                let mut reply = std::mem::take(&mut self.reply);
                dns::build_error(&mut reply, &msg, info.as_ref(), rcode, ede);
                self.deliver(origin, &msg, info.as_ref(), &reply, false);
                self.reply = reply;
                self.put_buf(msg);
            }
            Ok(info) => {
                if log::log_enabled!(log::Level::Debug) {
                    // The query log: names appear only when asked for.
                    if let Ok((name, _)) = dns::read_name(&msg, dns::HEADER_LEN, false) {
                        debug!("query from {}: {name} type {}", self.peer_of(origin), info.qtype);
                    }
                }
                let mut cache_key = None;
                if let Some(cache) = &mut self.cache {
                    if cache::key_of(&mut self.key_buf, &msg, &info).is_some() {
                        let mut reply = std::mem::take(&mut self.reply);
                        if cache.get(&self.key_buf, &msg, &info, now, &mut reply) {
                            self.stats.answers += 1;
                            self.deliver(origin, &msg, Some(&info), &reply, false);
                            self.reply = reply;
                            self.put_buf(msg);
                            return;
                        }
                        self.reply = reply;
                        cache_key = Some(Box::<[u8]>::from(self.key_buf.as_slice()));
                    }
                }
                let ip = match origin {
                    Origin::Udp { peer, .. } => peer.ip(),
                    Origin::Tcp { key, .. } => self
                        .clients
                        .get(key)
                        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.peer.ip()),
                };
                let per_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
                if self.queries.len() >= self.limits.max_inflight || per_ip >= self.limits.max_inflight_per_ip {
                    // Overload: a small, immediate answer keeps clients from
                    // retrying into the queue, and is no bigger than the
                    // query, so it cannot amplify.
                    self.stats.refused_busy += 1;
                    let (max, max_ip) = (self.limits.max_inflight, self.limits.max_inflight_per_ip);
                    self.notice(
                        Notice::Busy,
                        format_args!(
                            "query from {ip} refused: --max-inflight {max} or --max-inflight-per-ip {max_ip} reached"
                        ),
                    );
                    let mut reply = std::mem::take(&mut self.reply);
                    dns::build_error(
                        &mut reply,
                        &msg,
                        Some(&info),
                        rcode::REFUSED as u16,
                        Some((ede::OTHER, "busy")),
                    );
                    if reply.len() > msg.len() {
                        // Under a flood of (maybe spoofed) queries, never
                        // answer with more bytes than were sent: drop the EDE.
                        dns::build_error(&mut reply, &msg, Some(&info), rcode::REFUSED as u16, None);
                    }
                    self.deliver(origin, &msg, Some(&info), &reply, false);
                    self.reply = reply;
                    self.put_buf(msg);
                    return;
                }
                // Rewritten once, re-sent as is: padding hides the query's
                // size on the wire, keepalive asks for the server's timeout.
                let mut msg = msg;
                if self.padding > 0 {
                    let mut padded = self.take_buf();
                    dns::pad_query(&mut padded, &msg, &info, self.padding, true);
                    self.put_buf(std::mem::replace(&mut msg, padded));
                }
                *self.per_ip.entry(ip).or_insert(0) += 1;
                if let Origin::Tcp { key, .. } = origin {
                    if let Some(c) = self.clients.get_mut(key) {
                        c.in_flight += 1;
                    }
                }
                let gen = self.gen();
                let group = self.group_of(&msg);
                let leader = cache_key
                    .as_ref()
                    .and_then(|k| self.leaders.get(k).copied())
                    .filter(|&(k, g)| self.queries.get(k).is_some_and(|p| p.gen == g));
                let key = self.queries.insert(Pending {
                    cache_key,
                    followers: Vec::new(),
                    gen,
                    group,
                    origin,
                    ip,
                    info,
                    msg,
                    attempts: 0,
                    sent: None,
                    upstream: None,
                });
                self.deadlines.push_back((now + self.timeout, key, gen));
                match leader {
                    // The same question is already on its way: wait for
                    // that answer instead of asking again.
                    Some((lk, _)) => {
                        self.stats.merged += 1;
                        if let Some(l) = self.queries.get_mut(lk) {
                            l.followers.push((key, gen));
                        }
                    }
                    None => {
                        if let Some(k) = self.queries.get(key).and_then(|p| p.cache_key.clone()) {
                            self.leaders.insert(k, (key, gen));
                        }
                        self.dispatch(key, now);
                    }
                }
            }
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }

    /// Remove a finished query and release what it counted against.
    fn settle(&mut self, key: usize) -> Option<Pending> {
        let p = self.queries.try_remove(key)?;
        if let Some(k) = &p.cache_key {
            if self.leaders.get(k) == Some(&(key, p.gen)) {
                self.leaders.remove(k);
            }
        }
        if let Some(n) = self.per_ip.get_mut(&p.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&p.ip);
            }
        }
        Some(p)
    }

    fn peer_of(&self, origin: Origin) -> String {
        match origin {
            Origin::Udp { peer, .. } => format!("udp {peer}"),
            Origin::Tcp { key, .. } => self
                .clients
                .get(key)
                .map_or_else(|| "tcp ?".into(), |c| format!("tcp {}", c.peer)),
        }
    }

    /// Send query `key` on the best connection, or fail it at once when no
    /// upstream can take it (all in back-off: fail fast, RFC 7858 §3.1).
    fn dispatch(&mut self, key: usize, now: Instant) {
        let Some(p) = self.queries.get(key) else { return };
        let (avoid, group) = (p.upstream, p.group);
        // Each round either sends or marks one upstream down, so this ends.
        for _ in 0..=self.upstreams.len() {
            let Some(u) = self.choose_upstream(now, avoid, group) else {
                break;
            };
            let Some(ck) = self.choose_conn(u, now) else {
                continue;
            };
            let Some(p) = self.queries.get_mut(key) else {
                return;
            };
            let Some(conn) = self.conns.get_mut(ck) else {
                continue;
            };
            let qref = QueryRef {
                key: key as u32,
                gen: p.gen,
            };
            let Some(id) = conn.ids.insert(qref, &mut self.rng) else {
                continue;
            };
            conn.queue(&p.msg, id, now);
            conn.sent += 1;
            let cap = self.limits.max_upstream_conn_queries;
            if cap > 0 && conn.sent >= cap && !conn.draining {
                // Rotated: this one finishes what it has, new queries go
                // to a fresh connection.
                conn.draining = true;
            }
            p.attempts += 1;
            p.upstream = Some(u);
            p.sent = Some(Sent {
                conn: ck,
                conn_gen: conn.gen,
                id,
                at: now,
            });
            if !conn.dirty {
                conn.dirty = true;
                self.dirty_conns.push(ck);
            }
            return;
        }
        self.fail(key, rcode::SERVFAIL, Some((ede::NETWORK_ERROR, "upstream unreachable")));
    }

    /// The usable upstream of `group` with the least expected wait:
    /// queries outstanding times smoothed latency, so a slow or loaded
    /// resolver gets less. `avoid` (the one a re-sent query failed on) only
    /// when nothing else is left; upstreams in back-off never.
    fn choose_upstream(&mut self, now: Instant, avoid: Option<usize>, group: usize) -> Option<usize> {
        // An upstream without samples yet scores as the fastest, so it is
        // tried at once rather than starved.
        let chosen = self
            .upstreams
            .iter()
            .enumerate()
            .filter(|(_, u)| u.group == group && u.usable(now))
            .map(|(i, u)| {
                let score = (self.upstream_inflight(u) + 1) as f64 * u.srtt.unwrap_or(0.0).max(0.0001);
                (Some(i) == avoid, score, i)
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)))
            .map(|(_, _, i)| i)?;
        // What is not measured is forgotten slowly: the others' latency
        // decays, so a resolver that was slow gets a fresh sample now and
        // then (about one query in a few hundred) instead of never again.
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            if i != chosen && u.group == group {
                if let Some(s) = &mut u.srtt {
                    *s *= 0.98;
                }
            }
        }
        Some(chosen)
    }

    /// The upstream group for a query: the longest --forward zone that
    /// contains its name, else the default upstreams.
    fn group_of(&self, msg: &[u8]) -> usize {
        if self.zones.is_empty() {
            return 0;
        }
        let Ok((name, _)) = dns::read_name(msg, dns::HEADER_LEN, false) else {
            return 0;
        };
        let name = name.as_bytes();
        let mut best: Option<(usize, usize)> = None;
        for (zone, group) in &self.zones {
            if dns::in_zone(name, zone) && best.is_none_or(|(len, _)| zone.len() > len) {
                best = Some((zone.len(), *group));
            }
        }
        best.map_or(0, |(_, g)| g)
    }

    /// A connection of upstream `u` with room, opening one when all are
    /// full. `None` when the upstream cannot take the query (and then it
    /// has been marked down, or it is saturated).
    fn choose_conn(&mut self, u: usize, now: Instant) -> Option<usize> {
        let up = &self.upstreams[u];
        let best = up
            .conns
            .iter()
            .filter_map(|&k| self.conns.get(k).map(|c| (k, c)))
            .filter(|(_, c)| c.accepts_queries() && c.ids.live() < MAX_INFLIGHT_PER_CONN)
            .min_by_key(|(_, c)| c.ids.live())
            .map(|(k, _)| k);
        if best.is_some() {
            return best;
        }
        if up.conns.len() >= MAX_CONNS_PER_UPSTREAM {
            return None;
        }
        self.open_conn(u, now)
    }

    fn open_conn(&mut self, u: usize, now: Instant) -> Option<usize> {
        let gen = self.gen();
        self.upstreams[u].stats.connects += 1;
        let cfg = &self.upstreams[u].cfg;
        let mut conn =
            match UpstreamConn::connect(u, gen, cfg.addr, &cfg.name, &self.upstreams[u].tls, UPSTREAM_IDLE, now) {
                Ok(c) => c,
                Err(reason) => {
                    self.upstream_failed(u, &reason, now);
                    return None;
                }
            };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            conn.source(),
            token(TAG_CONN, key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.upstream_failed(u, &CloseReason::Connect(e), now);
            return None;
        }
        entry.insert(conn);
        self.upstreams[u].conns.push(key);
        self.timers
            .push(Reverse((now + self.timeout, Timer::Handshake { conn: key, gen })));
        debug!("upstream {}: connecting", self.upstreams[u].cfg);
        Some(key)
    }

    // ---- upstream side ----

    fn conn_event(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let before = conn.state;
        let result = conn.on_ready(&mut self.read_buf, now);
        let (u, state, resumed) = (conn.upstream, conn.state, conn.resumed());
        if before != ConnState::Ready && state == ConnState::Ready {
            self.upstream_up(u, key, resumed, now);
        }
        self.take_answers(key, now);
        match result {
            Err(reason) => self.close_conn(key, reason, now),
            Ok(()) => {
                if let Some(conn) = self.conns.get_mut(key) {
                    if conn.has_output() && !conn.dirty {
                        conn.dirty = true;
                        self.dirty_conns.push(key);
                    }
                }
            }
        }
    }

    fn upstream_up(&mut self, u: usize, conn: usize, resumed: bool, now: Instant) {
        let up = &mut self.upstreams[u];
        if up.down {
            info!("upstream {} up", up.cfg);
        }
        debug!(
            "upstream {}: connected{}",
            up.cfg,
            if resumed { " (resumed)" } else { "" }
        );
        up.down = false;
        up.failures = 0;
        up.down_until = None;
        if resumed {
            up.stats.resumed += 1;
        }
        if let Some(c) = self.conns.get(conn) {
            self.arm_idle(conn, now + c.idle);
        }
    }

    /// Arm the idle timer of connection `conn` for `at`, unless one is due
    /// sooner already: one timer per connection, however many answers
    /// come (a timer per answer would grow the heap without bound).
    fn arm_idle(&mut self, conn: usize, at: Instant) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.idle_at.is_none_or(|t| at < t) {
            c.idle_at = Some(at);
            self.timers.push(Reverse((at, Timer::ConnIdle { conn, gen: c.gen })));
        }
    }

    fn upstream_failed(&mut self, u: usize, reason: &CloseReason, now: Instant) {
        let jitter = self.rng.next_u16() as u32;
        let up = &mut self.upstreams[u];
        up.stats.failures += 1;
        up.failures = up.failures.saturating_add(1);
        let exp = BACKOFF_MIN.saturating_mul(1 << up.failures.saturating_sub(1).min(16));
        // Up to a quarter less, so upstreams that failed together do not
        // come back in lockstep.
        let backoff = exp.min(BACKOFF_MAX).mul_f64(1.0 - f64::from(jitter) / 65536.0 / 4.0);
        up.down_until = Some(now + backoff);
        if up.down {
            debug!("upstream {}: {reason}; retrying in {} ms", up.cfg, backoff.as_millis());
        } else {
            up.down = true;
            warn!(
                "upstream {} down: {reason}; retrying in {} ms",
                up.cfg,
                backoff.as_millis()
            );
        }
    }

    /// Hand every complete answer on connection `key` to its query.
    fn take_answers(&mut self, key: usize, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            match conn.decoder.next_into(&mut self.frame) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.close_conn(key, CloseReason::BadFrame(e), now);
                    return;
                }
            }
            let id = dns::id(&self.frame).unwrap_or(0);
            // Any whole message shows the server is alive (handshake bytes
            // do not: a server can finish TLS and then say nothing).
            conn.last_answer = Some(now);
            match conn.ids.take(id) {
                Lookup::Live(q) => self.on_answer(key, id, q, now),
                Lookup::Late => self.stats.late_answers += 1,
                Lookup::Unknown => {
                    self.stats.unknown_ids += 1;
                    debug!(
                        "upstream {}: answer with unknown ID dropped",
                        self.upstreams[conn.upstream].cfg
                    );
                }
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.decoder.shrink();
            if conn.draining && conn.ids.live() == 0 {
                self.close_conn(key, CloseReason::Recycled, now);
            }
        }
    }

    fn on_answer(&mut self, conn: usize, id: u16, q: QueryRef, now: Instant) {
        let key = q.key as usize;
        let Some(p) = self.queries.get(key).filter(|p| p.gen == q.gen) else {
            return;
        };
        match dns::parse_response(&p.msg, &self.frame) {
            Ok(walk) => {
                self.frame.truncate(walk.end);
                // The same question, maybe in other letter case: the client
                // gets its own bytes back (DNS 0x20 clients compare them).
                if walk.question_end == p.info.question_end {
                    let question = p.info.question(&p.msg);
                    if let Some(dst) = self.frame.get_mut(dns::HEADER_LEN..walk.question_end) {
                        dst.copy_from_slice(question);
                    }
                }
                let hop = match dns::strip_answer(&mut self.frame, &walk, p.info.edns.is_some()) {
                    Ok(hop) => hop,
                    Err(e) => {
                        debug!("upstream answer unusable: {e}");
                        self.fail(key, rcode::SERVFAIL, Some((ede::OTHER, "invalid upstream response")));
                        return;
                    }
                };
                if let (Some(t), Some(c)) = (hop.keepalive, self.conns.get_mut(conn)) {
                    c.keepalive(t);
                    let at = c.last_active + c.idle;
                    self.arm_idle(conn, at);
                }
                let Some(p) = self.queries.get(key) else { return };
                dns::set_id(&mut self.frame, p.info.id);
                if let (Some(sent), Some(u)) = (p.sent, p.upstream) {
                    self.upstreams[u].observe(now.saturating_duration_since(sent.at));
                }

                let Some(mut p) = self.settle(key) else { return };
                self.stats.answers += 1;
                let mut answer = std::mem::take(&mut self.frame);
                if let (Some(cache), Some(k)) = (&mut self.cache, &p.cache_key) {
                    cache.insert(k, &answer, now);
                }
                self.deliver(p.origin, &p.msg, Some(&p.info), &answer, true);
                for (fk, fgen) in std::mem::take(&mut p.followers) {
                    if self.queries.get(fk).is_none_or(|f| f.gen != fgen) {
                        continue;
                    }
                    let Some(f) = self.settle(fk) else { continue };
                    dns::set_id(&mut answer, f.info.id);
                    dns::copy_rd(&mut answer, &f.msg);
                    // Same question, possibly in other letter case: give
                    // each client its own bytes back.
                    let question = f.info.question(&f.msg);
                    if let Some(dst) = answer.get_mut(dns::HEADER_LEN..dns::HEADER_LEN + question.len()) {
                        dst.copy_from_slice(question);
                    }
                    self.stats.answers += 1;
                    self.deliver(f.origin, &f.msg, Some(&f.info), &answer, true);
                    self.put_buf(f.msg);
                }
                self.frame = answer;
                self.put_buf(p.msg);
            }
            Err(BadResponse::Mismatch(why)) => {
                // Not ours after all (RFC 7858 §3.3): keep waiting for the
                // real answer; the deadline still bounds the wait.
                self.stats.mismatched += 1;
                debug!("upstream answer dropped: {why}");
                if let Some(c) = self.conns.get_mut(conn) {
                    c.ids.restore(id, q);
                }
            }
            Err(BadResponse::Malformed(e)) => {
                debug!("upstream answer malformed: {e}");
                self.fail(key, rcode::SERVFAIL, Some((ede::OTHER, "invalid upstream response")));
            }
        }
    }

    /// End query `key` with an answer of our own.
    fn fail(&mut self, key: usize, rc: u8, why: Option<(u16, &str)>) {
        let Some(mut p) = self.settle(key) else { return };
        // Merged queries share their leader's fate.
        for (fk, fgen) in std::mem::take(&mut p.followers) {
            if self.queries.get(fk).is_some_and(|f| f.gen == fgen) {
                self.fail(fk, rc, why);
            }
        }
        if rc == rcode::SERVFAIL {
            self.stats.servfail += 1;
        }
        let mut reply = std::mem::take(&mut self.reply);
        dns::build_error(&mut reply, &p.msg, Some(&p.info), rc as u16, why);
        self.deliver(p.origin, &p.msg, Some(&p.info), &reply, true);
        self.reply = reply;
        self.put_buf(p.msg);
    }

    /// Send an answer to where its query came from. `settles` says that it
    /// ends a query counted in the TCP client's in-flight total.
    fn deliver(&mut self, origin: Origin, query: &[u8], info: Option<&QueryInfo>, answer: &[u8], settles: bool) {
        self.stats.rcodes[usize::from(dns::rcode_of(answer))] += 1;
        match origin {
            Origin::Udp { listener, peer } => {
                let budget = info.map_or(512, |i| i.udp_budget(dns::MAX_UDP));
                match info {
                    Some(info) if answer.len() > budget => {
                        let mut t = std::mem::take(&mut self.truncated);
                        // RFC 8914 §3: extended errors go first; truncate
                        // only if the answer is still too big without them.
                        let fits = dns::without_ede(&mut t, answer) && t.len() <= budget;
                        if !fits {
                            self.stats.truncated += 1;
                            dns::build_truncated(&mut t, query, info, answer);
                        }
                        self.udp_send(listener, peer, &t);
                        self.truncated = t;
                    }
                    _ => self.udp_send(listener, peer, answer),
                }
            }
            Origin::Tcp { key, gen } => {
                let Some(c) = self.clients.get_mut(key).filter(|c| c.gen == gen) else {
                    return;
                };
                let held = c.in_flight >= self.limits.max_tcp_pipeline || c.paused;
                if settles {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                if c.pending_out() > MAX_BUFFERED_OUT {
                    let peer = c.peer;
                    self.close_client(key);
                    self.notice(
                        Notice::SlowReader,
                        format_args!("tcp client {peer} closed: does not read its answers"),
                    );
                    return;
                }
                c.push_answer(answer);
                if held {
                    self.resume_clients.push(key);
                }
                self.mark_client_dirty(key);
            }
        }
    }

    /// Close connection `key` and re-send what was in flight on it.
    fn close_conn(&mut self, key: usize, reason: CloseReason, now: Instant) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if matches!(
            reason,
            CloseReason::Idle | CloseReason::Recycled | CloseReason::Shutdown
        ) {
            conn.close_notify();
        }
        let _ = self.poll.registry().deregister(conn.source());
        let u = conn.upstream;
        self.upstreams[u].conns.retain(|&c| c != key);
        let failed = reason.is_failure(conn.was_ready, conn.last_answer.is_some(), conn.ids.live() > 0);
        // A stream that broke after a good handshake (a garbage frame or
        // record) is likely this connection's trouble: its queries get their
        // re-send even when this is the only upstream, and the back-off
        // starts after. A server that refuses, fails the handshake or hangs
        // up without answering gets the back-off first, so retries do not
        // hammer it.
        let resend_first = failed && conn.was_ready && matches!(reason, CloseReason::BadFrame(_) | CloseReason::Tls(_));
        if failed && !resend_first {
            self.upstream_failed(u, &reason, now);
        } else if !failed {
            debug!("upstream {}: connection closed: {reason}", self.upstreams[u].cfg);
        }
        let mut retry = std::mem::take(&mut self.retry);
        conn.ids.drain_live(&mut retry);
        for q in retry.drain(..) {
            let k = q.key as usize;
            let Some(p) = self.queries.get_mut(k).filter(|p| p.gen == q.gen) else {
                continue;
            };
            // A connection that answered later queries was not killed by
            // this one: its re-send is free (the deadline still bounds it).
            if p.sent.is_some_and(|s| conn.last_answer.is_some_and(|t| t >= s.at)) {
                p.attempts = p.attempts.saturating_sub(1);
            }
            p.sent = None;
            if p.attempts < MAX_ATTEMPTS && self.stopping.is_none() {
                self.stats.retried += 1;
                self.dispatch(k, now);
            } else {
                self.fail(
                    k,
                    rcode::SERVFAIL,
                    Some((ede::NETWORK_ERROR, "upstream connection lost")),
                );
            }
        }
        self.retry = retry;
        if resend_first {
            self.upstream_failed(u, &reason, now);
        }
    }

    // ---- end of turn ----

    fn flush(&mut self, now: Instant) {
        // Closing a connection can re-send its queries on another one,
        // which lands on the dirty list again; a few rounds settle it.
        for _ in 0..4 {
            if self.dirty_conns.is_empty() {
                break;
            }
            let keys = std::mem::take(&mut self.dirty_conns);
            for &k in &keys {
                let Some(conn) = self.conns.get_mut(k) else {
                    continue;
                };
                conn.dirty = false;
                if let Err(reason) = conn.flush() {
                    self.close_conn(k, reason, now);
                }
            }
            let mut keys = keys;
            keys.clear();
            if self.dirty_conns.is_empty() {
                self.dirty_conns = keys;
            }
        }
        let keys = std::mem::take(&mut self.dirty_clients);
        for &k in &keys {
            let Some(c) = self.clients.get_mut(k) else {
                continue;
            };
            c.dirty = false;
            match c.flush(now) {
                Err(e) => {
                    debug!("tcp client {}: {e}", c.peer);
                    self.close_client(k);
                }
                Ok(()) if c.finished() => self.close_client(k),
                Ok(()) => {}
            }
        }
        let mut keys = keys;
        keys.clear();
        if self.dirty_clients.is_empty() {
            self.dirty_clients = keys;
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, key, gen)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self.queries.get(key).is_some_and(|p| p.gen == gen) {
                self.time_out(key, now);
            }
        }
        if self.deadlines.len() > 2 * self.queries.len() + 1024 {
            let queries = &self.queries;
            self.deadlines
                .retain(|&(_, k, g)| queries.get(k).is_some_and(|p| p.gen == g));
        }
        while let Some(Reverse((t, timer))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            self.on_timer(timer, now);
        }
    }

    fn time_out(&mut self, key: usize, now: Instant) {
        self.stats.timeouts += 1;
        let Some(p) = self.queries.get(key) else { return };
        if let Some(u) = p.upstream {
            // A timeout is the worst latency there is: steer traffic away.
            let srtt = self.upstreams[u].srtt.unwrap_or(0.0);
            self.upstreams[u].srtt = Some(0.8 * srtt + 0.2 * self.timeout.as_secs_f64());
        }
        let q = QueryRef {
            key: key as u32,
            gen: p.gen,
        };
        let mut stalled = None;
        if let Some(sent) = p.sent {
            if let Some(conn) = self.conns.get_mut(sent.conn).filter(|c| c.gen == sent.conn_gen) {
                conn.ids.bury(sent.id, q);
                if conn.was_ready && conn.last_answer.is_none_or(|t| t <= sent.at) {
                    stalled = Some(sent.conn);
                } else if conn.ids.tombstones() > MAX_TOMBSTONES && !conn.draining {
                    debug!(
                        "upstream {}: too many late answers; replacing the connection",
                        self.upstreams[conn.upstream].cfg
                    );
                    conn.draining = true;
                    if conn.ids.live() == 0 {
                        stalled = None;
                        self.close_conn(sent.conn, CloseReason::Recycled, now);
                    }
                }
            }
        }
        self.fail(
            key,
            rcode::SERVFAIL,
            Some((ede::NO_REACHABLE_AUTHORITY, "upstream timeout")),
        );
        if let Some(ck) = stalled {
            self.close_conn(ck, CloseReason::Stalled, now);
        }
    }

    fn on_timer(&mut self, timer: Timer, now: Instant) {
        match timer {
            Timer::Handshake { conn, gen } => {
                if self.conns.get(conn).is_some_and(|c| c.gen == gen && !c.was_ready) {
                    self.close_conn(conn, CloseReason::HandshakeTimeout, now);
                }
            }
            Timer::ConnIdle { conn, gen } => {
                let Some(c) = self.conns.get_mut(conn).filter(|c| c.gen == gen) else {
                    return;
                };
                // Superseded by an earlier timer that already ran.
                if c.idle_at.is_none_or(|t| t > now) {
                    return;
                }
                c.idle_at = None;
                let due = c.last_active + c.idle;
                if c.ids.live() == 0 && due <= now {
                    self.close_conn(conn, CloseReason::Idle, now);
                } else {
                    self.arm_idle(conn, due.max(now + Duration::from_millis(100)));
                }
            }
            Timer::ClientIdle { key, gen } => {
                let Some(c) = self.clients.get(key).filter(|c| c.gen == gen) else {
                    return;
                };
                let due = c.last_active + self.limits.tcp_idle;
                if c.in_flight == 0 && c.pending_out() == 0 && due <= now {
                    debug!("tcp client {} idle; closing", c.peer);
                    self.close_client(key);
                } else {
                    self.timers
                        .push(Reverse((due.max(now + Duration::from_millis(100)), timer)));
                }
            }
            Timer::AcceptRetry { listener } => self.accept(listener, now),
            Timer::Http { key, gen } => {
                if self.http.get(key).is_some_and(|h| h.gen == gen) {
                    self.close_http(key);
                }
            }
        }
    }

    // ---- metrics ----

    fn accept_http(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.metrics else { return };
            match listener.accept() {
                Ok((sock, _)) => {
                    if self.http.len() >= MAX_HTTP {
                        continue;
                    }
                    let gen = self.gen();
                    let entry = self.http.vacant_entry();
                    let key = entry.key();
                    let mut h = HttpConn::new(sock, gen, now);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if self
                        .poll
                        .registry()
                        .register(h.source(), token(TAG_HTTP, key), interest)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(h);
                    self.timers
                        .push(Reverse((now + HTTP_DEADLINE, Timer::Http { key, gen })));
                    self.http_event(key, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            }
        }
    }

    fn http_event(&mut self, key: usize, now: Instant) {
        let Some(h) = self.http.get_mut(key) else { return };
        if !h.answered {
            let alive = h.read();
            let Some(route) = http::route(&h.inbuf) else {
                if !alive {
                    self.close_http(key);
                }
                return;
            };
            let head_only = h.inbuf.starts_with(b"HEAD ");
            let (status, body) = match route {
                Route::Metrics => ("200 OK", self.render_metrics(now)),
                Route::Health if self.healthy() => ("200 OK", "ok\n".to_string()),
                Route::Health => ("503 Service Unavailable", "no usable upstream\n".to_string()),
                Route::NotFound => ("404 Not Found", "not found\n".to_string()),
                Route::MethodNotAllowed => ("405 Method Not Allowed", "method not allowed\n".to_string()),
                Route::TooLarge => ("431 Request Header Fields Too Large", "request too large\n".to_string()),
                Route::BadRequest => ("400 Bad Request", "bad request\n".to_string()),
            };
            let ctype = if route == Route::Metrics {
                "text/plain; version=0.0.4; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            };
            let Some(h) = self.http.get_mut(key) else { return };
            http::respond(&mut h.out, status, ctype, body.as_bytes(), head_only);
            h.answered = true;
        }
        let Some(h) = self.http.get_mut(key) else { return };
        if h.flush() {
            self.close_http(key);
        }
    }

    fn close_http(&mut self, key: usize) {
        if let Some(mut h) = self.http.try_remove(key) {
            let _ = self.poll.registry().deregister(h.source());
        }
    }

    /// Healthy while some upstream has a working connection, or has not
    /// failed since its last success (nothing is known to be wrong yet).
    fn healthy(&self) -> bool {
        self.upstreams.iter().any(|u| {
            !u.down
                || u.conns
                    .iter()
                    .filter_map(|&c| self.conns.get(c))
                    .any(|c| c.was_ready && c.accepts_queries())
        })
    }

    fn upstream_inflight(&self, u: &Upstream) -> usize {
        u.conns
            .iter()
            .filter_map(|&c| self.conns.get(c))
            .map(|c| c.ids.live())
            .sum()
    }

    fn render_metrics(&self, now: Instant) -> String {
        let s = &self.stats;
        let mut e = http::Exposition(String::with_capacity(8192));
        e.header(
            "dotproxy_queries_total",
            "counter",
            "Queries received from clients, by transport.",
        );
        e.sample("dotproxy_queries_total", &[("transport", "udp")], s.queries_udp);
        e.sample("dotproxy_queries_total", &[("transport", "tcp")], s.queries_tcp);
        e.header(
            "dotproxy_answers_total",
            "counter",
            "Answers sent to clients, by RCODE.",
        );
        for (rc, &n) in s.rcodes.iter().enumerate() {
            if n > 0 || rc <= 5 {
                e.sample("dotproxy_answers_total", &[("rcode", rcode_name(rc))], n);
            }
        }
        e.header(
            "dotproxy_truncated_total",
            "counter",
            "UDP answers sent truncated (TC=1).",
        );
        e.sample("dotproxy_truncated_total", &[], s.truncated);
        e.header(
            "dotproxy_timeouts_total",
            "counter",
            "Queries that reached their deadline (answered SERVFAIL).",
        );
        e.sample("dotproxy_timeouts_total", &[], s.timeouts);
        e.header(
            "dotproxy_retries_total",
            "counter",
            "Queries re-sent after their upstream connection closed.",
        );
        e.sample("dotproxy_retries_total", &[], s.retried);
        e.header(
            "dotproxy_dropped_total",
            "counter",
            "Client messages dropped without an answer, by reason.",
        );
        e.sample("dotproxy_dropped_total", &[("reason", "malformed")], s.dropped);
        e.sample("dotproxy_dropped_total", &[("reason", "access_list")], s.refused_acl);
        e.sample(
            "dotproxy_dropped_total",
            &[("reason", "udp_send_queue_full")],
            s.udp_send_dropped,
        );
        e.header(
            "dotproxy_rejected_total",
            "counter",
            "Queries answered locally without forwarding, by reason.",
        );
        e.sample("dotproxy_rejected_total", &[("reason", "invalid")], s.rejected);
        e.sample("dotproxy_rejected_total", &[("reason", "busy")], s.refused_busy);
        e.header(
            "dotproxy_tcp_connections_refused_total",
            "counter",
            "TCP client connections closed at once (limit).",
        );
        e.sample("dotproxy_tcp_connections_refused_total", &[], s.tcp_refused);
        e.header(
            "dotproxy_upstream_answers_dropped_total",
            "counter",
            "Upstream answers that matched no query, by reason.",
        );
        e.sample(
            "dotproxy_upstream_answers_dropped_total",
            &[("reason", "unknown_id")],
            s.unknown_ids,
        );
        e.sample(
            "dotproxy_upstream_answers_dropped_total",
            &[("reason", "wrong_question")],
            s.mismatched,
        );
        e.sample(
            "dotproxy_upstream_answers_dropped_total",
            &[("reason", "late")],
            s.late_answers,
        );
        if let Some(c) = &self.cache {
            e.header("dotproxy_cache_lookups_total", "counter", "Cache lookups, by result.");
            e.sample("dotproxy_cache_lookups_total", &[("result", "hit")], c.hits);
            e.sample("dotproxy_cache_lookups_total", &[("result", "miss")], c.misses);
            e.header("dotproxy_cache_entries", "gauge", "Answers in the cache.");
            e.sample("dotproxy_cache_entries", &[], c.len());
            e.header(
                "dotproxy_merged_total",
                "counter",
                "Queries answered by an identical query already in flight.",
            );
            e.sample("dotproxy_merged_total", &[], s.merged);
        }
        e.header("dotproxy_inflight", "gauge", "Queries waiting for an answer.");
        e.sample("dotproxy_inflight", &[], self.queries.len());
        e.header("dotproxy_tcp_clients", "gauge", "Open TCP client connections.");
        e.sample("dotproxy_tcp_clients", &[], self.clients.len());
        type Get = fn(&Proxy, &Upstream, Instant) -> f64;
        let per_upstream: [(&str, &str, &str, Get); 6] = [
            (
                "dotproxy_upstream_up",
                "gauge",
                "1 unless the upstream is in back-off after a failure.",
                |_, u, now| f64::from(u8::from(u.usable(now) && !u.down)),
            ),
            (
                "dotproxy_upstream_connections",
                "gauge",
                "Open connections to the upstream.",
                |_, u, _| u.conns.len() as f64,
            ),
            (
                "dotproxy_upstream_connects_total",
                "counter",
                "Connection attempts to the upstream.",
                |_, u, _| u.stats.connects as f64,
            ),
            (
                "dotproxy_upstream_failures_total",
                "counter",
                "Failed connections (connect, TLS, certificate, stall).",
                |_, u, _| u.stats.failures as f64,
            ),
            (
                "dotproxy_upstream_resumed_total",
                "counter",
                "TLS handshakes that resumed a session.",
                |_, u, _| u.stats.resumed as f64,
            ),
            (
                "dotproxy_upstream_inflight",
                "gauge",
                "Queries in flight to the upstream.",
                |p, u, _| p.upstream_inflight(u) as f64,
            ),
        ];
        for (name, kind, help, get) in per_upstream {
            e.header(name, kind, help);
            for u in &self.upstreams {
                e.sample(name, &[("upstream", &u.label)], get(self, u, now));
            }
        }
        let name = "dotproxy_upstream_latency_seconds";
        e.header(name, "histogram", "Time from sending a query upstream to its answer.");
        for u in &self.upstreams {
            let mut cumulative = 0;
            for (le, n) in LATENCY_BUCKETS.iter().zip(u.stats.latency_buckets) {
                cumulative += n;
                e.sample(
                    &format!("{name}_bucket"),
                    &[("upstream", &u.label), ("le", &le.to_string())],
                    cumulative,
                );
            }
            e.sample(
                &format!("{name}_bucket"),
                &[("upstream", &u.label), ("le", "+Inf")],
                u.stats.answers,
            );
            e.sample(&format!("{name}_sum"), &[("upstream", &u.label)], u.stats.latency_sum);
            e.sample(&format!("{name}_count"), &[("upstream", &u.label)], u.stats.answers);
        }
        e.0
    }

    // ---- reload ----

    /// SIGHUP: read the command line and --config file again and apply the
    /// upstreams, forwarding rules, access list, padding, timeout and
    /// limits. Queries in flight finish on the connections they are on;
    /// unchanged upstreams keep their connections, health and counters.
    fn reload(&mut self, now: Instant) {
        let cfg = match crate::config::parse(self.args.clone()) {
            Ok(cfg) => cfg,
            Err(crate::config::Exit::Usage(msg)) => {
                warn!("reload failed, keeping the running configuration: {msg}");
                return;
            }
            Err(_) => return,
        };
        let result = crate::tls::client_config(cfg.ca_file.as_deref()).and_then(|tls| build_upstreams(&cfg, &tls));
        let (fresh, zones) = match result {
            Ok(built) => built,
            Err(msg) => {
                warn!("reload failed, keeping the running configuration: {msg}");
                return;
            }
        };
        if cfg.listen != self.listen || cfg.metrics != self.metrics_addr {
            warn!("reload: listen and metrics addresses only change on restart");
        }
        let mut kept = vec![false; self.upstreams.len()];
        for new in fresh {
            // Same resolver, same authentication: keep the running one.
            let same = (0..self.upstreams.len())
                .find(|&i| !kept[i] && self.upstreams[i].group != RETIRED && self.upstreams[i].cfg == new.cfg);
            match same {
                Some(i) => {
                    kept[i] = true;
                    self.upstreams[i].group = new.group;
                }
                None => {
                    kept.push(true);
                    self.upstreams.push(new);
                }
            }
        }
        for (i, keep) in kept.iter().enumerate() {
            if *keep {
                continue;
            }
            let u = &mut self.upstreams[i];
            if u.group != RETIRED {
                info!("upstream {} removed", u.cfg);
                u.group = RETIRED;
            }
            for &c in &u.conns {
                if let Some(conn) = self.conns.get_mut(c) {
                    conn.draining = true;
                }
            }
        }
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.draining && c.ids.live() == 0)
            .map(|(k, _)| k)
            .collect();
        for k in idle {
            self.close_conn(k, CloseReason::Recycled, now);
        }
        self.zones = zones;
        self.allow = cfg.allow;
        self.padding = cfg.padding;
        self.timeout = cfg.timeout;
        self.limits = cfg.limits;
        let active = self.upstreams.iter().filter(|u| u.group != RETIRED).count();
        info!(
            "configuration reloaded: {active} upstreams, {} forwarding zones",
            self.zones.len()
        );
    }

    // ---- shutdown ----

    fn start_stop(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        info!("shutting down: {} queries in flight", self.queries.len());
        // Stop taking work; UDP sockets stay open to send the last answers.
        for u in &mut self.udp {
            let _ = self.poll.registry().deregister(&mut u.sock);
            u.more = false;
        }
        for t in &mut self.tcp {
            if let Some(mut l) = t.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
        if let Some(mut l) = self.metrics.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.stopping = Some(now + self.timeout + Duration::from_millis(100));
    }

    fn drained(&self) -> bool {
        self.queries.is_empty() && self.clients.iter().all(|(_, c)| c.pending_out() == 0)
    }

    fn finish(&mut self, now: Instant) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.close_conn(k, CloseReason::Shutdown, now);
        }
        let keys: Vec<usize> = self.queries.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.fail(k, rcode::SERVFAIL, Some((ede::OTHER, "shutting down")));
        }
        for i in 0..self.udp.len() {
            self.flush_udp_backlog(i);
        }
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
