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
//! deliver, or fail with one [`Failure`]; that path is in [`pipeline`].

mod pipeline;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Events, Interest, Poll};

use crate::cache::{Cache, Policy};
use crate::config::{Cidr, Config, Exit, PerAddress};
use crate::failure::Failure;
use crate::http::{HttpServer, Request, Route};
use crate::listen::client::ClientLimits;
use crate::listen::tcp::{Clients, Closed};
use crate::listen::Listeners;
use crate::metrics::{self, Stats, View};
use crate::notice::{Notice, Notices};
use crate::queries::{Queries, QueryRef};
use crate::systemd::{Notifier, PassedFd};
use crate::timers::{poll_timeout, Timer, Timers};
use crate::token::Source;
use crate::upstream::{Orphan, Pool};

/// Each query is sent at most this often (first try plus one re-send when
/// a connection dies under it).
pub(crate) const MAX_ATTEMPTS: u8 = 2;
/// Close-and-re-send rounds per turn; what is left waits for the next turn.
const REAP_ROUNDS: usize = 4;

/// What a reload may change while running.
struct Settings {
    timeout: Duration,
    padding: u16,
    allow: Vec<Cidr>,
    max_query_size: usize,
    per_address: PerAddress,
    /// The descriptor limit, raised at start.
    nofile: u64,
    stale_after: Duration,
    prefetch: bool,
    watch_config: Option<Duration>,
    /// --tcp-idle-timeout, told to clients that send edns-tcp-keepalive.
    tcp_idle: Duration,
}

impl Settings {
    fn of(cfg: &Config, nofile: u64) -> Settings {
        Settings {
            timeout: cfg.timeout,
            padding: cfg.padding,
            allow: cfg.allow.clone(),
            max_query_size: cfg.limits.max_query_size,
            per_address: cfg.limits.per_address.clone(),
            nofile,
            stale_after: cfg.cache.stale_after,
            prefetch: cfg.cache.prefetch,
            watch_config: cfg.config_file.as_ref().and(cfg.watch_config),
            tcp_idle: cfg.limits.tcp_idle,
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
        if self.free.len() < 2048 && (1..=512).contains(&buf.capacity()) {
            buf.clear();
            self.free.push(buf);
        }
    }
}

/// Descriptors kept for everything but TCP clients: stdio, poll, signals
/// and slack (which also covers sockets passed by systemd in place of
/// --listen); both sockets of each listener, one per TLS listener; every
/// upstream's connections; the metrics server's.
fn reserved_fds(cfg: &Config) -> u64 {
    let upstreams = (cfg.upstreams.len() + cfg.forwards.len()) as u64;
    32 + 2 * cfg.listen.len() as u64
        + cfg.listen_tls.len() as u64
        + upstreams * crate::upstream::pool::MAX_CONNS_PER_UPSTREAM as u64
        + crate::http::MAX_CONNS as u64
}

/// `--max-tcp-clients`, lowered to fit under the descriptor limit so that
/// clients can never take the descriptors upstream connections need.
fn max_tcp_clients(cfg: &Config, nofile: u64) -> usize {
    let fits = crate::listen::socket::clients_under(nofile, reserved_fds(cfg));
    if fits < cfg.limits.max_tcp_clients {
        warn!(
            "--max-tcp-clients {} lowered to {fits}: the descriptor limit is {nofile}",
            cfg.limits.max_tcp_clients
        );
    }
    cfg.limits.max_tcp_clients.min(fits)
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
    /// The digest of the --config file's content as last applied, when
    /// --watch-config looks for changes.
    watched: Option<u64>,
    notify: Notifier,
    /// The DNS-over-TLS listener's configuration; replaced on reload.
    tls_server: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// A digest of the file's content; a file that cannot be read has none.
fn file_digest(path: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

impl Proxy {
    /// Bind every listener and set up the loop; nothing is served until
    /// [`run`](Self::run).
    pub fn bind(cfg: &Config) -> Result<Proxy, String> {
        Proxy::bind_with(cfg, None, Notifier::default())
    }

    /// Like [`bind`](Self::bind), on the sockets the service manager
    /// passed (`passed`, replacing `--listen`) when there are any, telling
    /// it about readiness, reloads and the drain through `notify`.
    pub fn bind_with(cfg: &Config, passed: Option<Vec<PassedFd>>, notify: Notifier) -> Result<Proxy, String> {
        let nofile = crate::listen::socket::raise_nofile();
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let max_query = cfg.limits.max_query_size;
        let mut listeners = match passed {
            Some(fds) => {
                info!(
                    "serving on the {} sockets passed by systemd; --listen is not bound",
                    fds.len()
                );
                Listeners::adopt(fds, max_query, poll.registry())?
            }
            None => Listeners::bind(&cfg.listen, cfg.reuseport, max_query, poll.registry())?,
        };
        let tls_server = cfg.tls.as_ref().map(crate::listen::tls::server_config).transpose()?;
        listeners.bind_tls(&cfg.listen_tls, cfg.reuseport, poll.registry())?;
        let pool = Pool::new(cfg)?;
        let (http, _) = HttpServer::bind(cfg.metrics, poll.registry())?;
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals =
            signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| format!("signals: {e}"))?;
        poll.registry()
            .register(&mut signals, Source::Signals.token(), Interest::READABLE)
            .map_err(|e| format!("register signals: {e}"))?;
        let l = &cfg.limits;
        let mut timers = Timers::default();
        let watched = match (&cfg.config_file, cfg.watch_config) {
            (Some(path), Some(every)) => {
                timers.add(Instant::now() + every, Timer::ConfigWatch);
                file_digest(path)
            }
            _ => None,
        };
        Ok(Proxy {
            poll,
            signals,
            listeners,
            clients: Clients::new(
                max_tcp_clients(cfg, nofile),
                l.max_tcp_clients_per_ip,
                l.per_address.clone(),
                client_limits(cfg),
            ),
            pool,
            queries: Queries::new(l.max_inflight, l.max_inflight_per_ip),
            timers,
            cache: (cfg.cache.size > 0).then(|| {
                Cache::new(Policy {
                    max_entries: cfg.cache.size,
                    max_bytes: cfg.cache.memory,
                    min_ttl: cfg.cache.min_ttl,
                    max_ttl: cfg.cache.max_ttl,
                    max_negative_ttl: cfg.cache.max_negative_ttl,
                    stale_max_age: cfg.cache.stale_max_age,
                })
            }),
            http,
            settings: Settings::of(cfg, nofile),
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
            watched,
            notify,
            tls_server,
        })
    }

    /// The addresses actually bound, as ("udp" | "tcp", address).
    pub fn local_addrs(&self) -> &[(&'static str, SocketAddr)] {
        self.listeners.bound()
    }

    /// Serve until SIGINT or SIGTERM, then drain and return.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        if self.notify.enabled() {
            self.notify.ready(&self.status());
        }
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
                let handshake = self.clients.on_event(key, readable, writable, reading);
                self.handshake(key, handshake, now);
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
        self.pool.take_revisits(&mut keys);
        for &key in &keys {
            self.upstream_event(key, now);
        }
        self.bufs.keys = keys;
    }

    fn expire(&mut self, now: Instant) {
        // Per-query timers of answered queries are dead weight: drop them
        // once they outnumber what is alive (see Timers::retain).
        let alive = self.queries.len() + self.clients.len() + self.pool.connections();
        if self.timers.len() > 2 * alive + 4096 {
            let queries = &self.queries;
            self.timers.retain(|t| match t {
                Timer::Deadline(q) | Timer::StaleAnswer(q) => queries.get(*q).is_some(),
                _ => true,
            });
        }
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Deadline(q) => {
                    if self.queries.is_due(q, now) {
                        self.time_out(q, now);
                    }
                }
                Timer::StaleAnswer(q) => self.answer_stale(q, now),
                Timer::Handshake { .. } | Timer::ConnIdle { .. } | Timer::PipelineCheck { .. } => {
                    self.pool.on_timer(timer, now, &mut self.timers)
                }
                Timer::ClientIdle { key, gen } => match self.clients.on_idle_timer(key, gen, now, &mut self.timers) {
                    Some(Closed::StoppedReading(peer)) => {
                        self.stats.tcp_closed.stopped_reading += 1;
                        let what = format_args!("tcp client {peer} closed: stopped reading its answers");
                        self.notices.warn(Notice::SlowReader, now, what);
                    }
                    Some(Closed::Idle) => self.stats.tcp_closed.idle += 1,
                    None => {}
                },
                Timer::Http { key, gen } => self.http.on_timer(key, gen),
                Timer::AcceptRetry { listener } => {
                    self.listeners.retry_fired(listener);
                    self.accept(listener, now);
                }
                Timer::ConfigWatch => self.watch_config(now),
            }
        }
    }

    fn flush(&mut self, now: Instant) {
        self.pool.flush();
        self.clients.flush(now);
        self.listeners.flush_udp();
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
        self.listeners.flush_udp();
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

    /// One line for `systemctl status`.
    fn status(&self) -> String {
        let listening: Vec<String> = self.listeners.bound().iter().map(|(p, a)| format!("{p} {a}")).collect();
        format!("serving on {}", listening.join(", "))
    }

    /// SIGHUP, told to the service manager as RELOADING=1 … READY=1, so it
    /// shows the reload while it lasts (and, with systemd 253's
    /// Type=notify-reload, `systemctl reload` waits for it to be over).
    fn reload(&mut self) {
        self.notify.reloading();
        self.apply_reload();
        self.notify.ready(&self.status());
    }

    /// Read the command line and --config file again and apply
    /// what can change while running. Queries in flight finish under the
    /// settings they were admitted with; unchanged upstreams keep their
    /// connections, health and counters.
    fn apply_reload(&mut self) {
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
        self.clients.set_limits(
            max_tcp_clients(&cfg, self.settings.nofile),
            l.max_tcp_clients_per_ip,
            l.per_address.clone(),
            client_limits(&cfg),
        );
        let watching = self.settings.watch_config.is_some();
        self.settings = Settings::of(&cfg, self.settings.nofile);
        // Certificate rotation: new connections get the files as they are
        // now; open ones keep their session. A broken file changes nothing.
        if let Some(t) = cfg.tls.as_ref().filter(|_| self.tls_server.is_some()) {
            match crate::listen::tls::server_config(t) {
                Ok(c) => {
                    self.tls_server = Some(c);
                    info!("reload: TLS listener certificate read again from {}", t.cert.display());
                }
                Err(e) => warn!("reload: keeping the TLS listener's certificate: {e}"),
            }
        }
        if let (false, Some(every)) = (watching, self.settings.watch_config) {
            // Added by this reload (a SIGHUP): start looking.
            self.watched = cfg.config_file.as_deref().and_then(file_digest);
            self.timers.add(Instant::now() + every, Timer::ConfigWatch);
        }
        self.listeners.set_max_query(self.settings.max_query_size);
        let settings = &self.settings;
        let closed = self.clients.retain_allowed(|ip| settings.allowed(ip));
        if closed > 0 {
            info!("reload: {closed} tcp clients closed, no longer in --allow");
        }
        info!(
            "configuration reloaded: {} upstreams, {} forwarding zones",
            reloaded.upstreams, reloaded.zones
        );
    }

    /// --watch-config: reload when the file's content changed (a
    /// ConfigMap update swaps the file under its mounted path), then look
    /// again later. A file that cannot be read is left for the next look,
    /// with the running configuration kept.
    fn watch_config(&mut self, now: Instant) {
        let (Some(path), Some(_)) = (self.started.config_file.clone(), self.settings.watch_config) else {
            return;
        };
        if let Some(digest) = file_digest(&path) {
            if self.watched != Some(digest) {
                info!("{}: changed, reloading", path.display());
                self.watched = Some(digest);
                self.reload();
            } else {
                debug!("{}: unchanged", path.display());
            }
        }
        // The reload may have changed the interval or ended the watch.
        if let Some(every) = self.settings.watch_config {
            self.timers.add(now + every, Timer::ConfigWatch);
        }
    }

    fn start_stop(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        info!("shutting down: {} queries in flight", self.queries.len());
        self.notify
            .stopping(&format!("draining {} queries in flight", self.queries.len()));
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
            s.queries_udp, s.queries_tcp, s.answers, s.servfail, s.timeouts, s.rejected, s.dropped.malformed, s.truncated
        );
        if s.upstream_dropped.unknown_id + s.upstream_dropped.wrong_question + s.upstream_dropped.late > 0 {
            info!(
                "upstream answers dropped: {} unknown ID, {} wrong question, {} late",
                s.upstream_dropped.unknown_id, s.upstream_dropped.wrong_question, s.upstream_dropped.late
            );
        }
    }
}
