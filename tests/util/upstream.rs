//! A scriptable DNS-over-TLS test upstream.
//!
//! A `TcpListener` on 127.0.0.1:0 accepts in a background thread; every
//! connection gets its own thread running a rustls `ServerConnection` over a
//! blocking socket whose read timeout is set, each turn, to the time until the
//! next scheduled action (1..20 ms), so one loop both reads queries and sends
//! answers on time. Queries are parsed out of the decrypted stream (2-byte
//! length framing, any number per TLS record, partial frames kept), each one
//! is turned into a list of timed `Action`s by the `Script`, and actions run
//! when due: answers may therefore overtake one another.
//!
//! Everything that happens is recorded in `Stats` for assertions.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::{HandshakeKind, ServerConfig, ServerConnection};

use super::certs::TestCa;
use super::dns::{self, msg_id};

/// How a connection is closed by the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseKind {
    /// TLS close_notify alert, then TCP FIN.
    CloseNotify,
    /// TCP FIN without close_notify (a truncation attack from TLS' view).
    Fin,
    /// TCP RST (SO_LINGER 0).
    Rst,
}

/// One step of the upstream's reaction to a query.
#[derive(Clone, Debug)]
pub enum Action {
    /// Whatever the script's rules would send for this query (default
    /// answer, `big` answer; nothing for `silent` names), without delays.
    Answer,
    /// Send a DNS message, framed (2-byte length added), through TLS.
    Send(Vec<u8>),
    /// Send raw plaintext bytes through TLS, no framing added.
    SendRaw(Vec<u8>),
    /// Write raw bytes straight onto the TCP socket, bypassing TLS (garbage).
    SendTcpRaw(Vec<u8>),
    /// Delay every following action of this list.
    Delay(Duration),
    /// Close the connection.
    Close(CloseKind),
    /// TLS 1.3 KeyUpdate (`refresh_traffic_keys`), sent with the next flush.
    KeyUpdate,
    /// Stop reading (and writing) on this connection for good: the socket
    /// stays open, its receive buffer fills, the peer's writes back up. The
    /// thread idles until the upstream stops.
    StopReading,
}

/// What a hook sees for each query.
pub struct HookCtx<'a> {
    /// The query, unframed.
    pub query: &'a [u8],
    /// Connection number (1-based, in accept order).
    pub conn: usize,
    /// Index of this query on its connection (0-based).
    pub index: usize,
    /// Index of this query over the whole upstream (0-based).
    pub global_index: usize,
}

/// The name of the last query of the quiescence check
/// (`metrics::assert_serving`): hooks never see it.
pub const QUIESCENCE_NAME: &str = "final.quiescence.example";

/// A per-query hook: `Some(actions)` replaces the script's behaviour for this
/// query (an empty list means "never answer"), `None` falls back to it.
/// Queries for [`QUIESCENCE_NAME`] bypass the hook.
pub type Hook = Arc<dyn Fn(&HookCtx<'_>) -> Option<Vec<Action>> + Send + Sync>;

/// Behaviour of the upstream. Changes take effect for the next query (and,
/// for `no_handshake`, the next accepted connection).
#[derive(Clone)]
pub struct Script {
    /// Fixed delay before each answer (each query scheduled independently).
    pub delay: Duration,
    /// Extra pseudo-random delay in [0, jitter) per answer (seeded, so runs
    /// repeat).
    pub jitter: Duration,
    /// Seed of the jitter generator.
    pub seed: u64,
    /// 0 or 1: off. N > 1: hold answers until N are collected on a
    /// connection, then send them in reverse order.
    pub reverse_batch: usize,
    /// A partial batch is released (reversed) after this long, so a proxy
    /// that spreads queries over several connections cannot wedge a test.
    pub batch_timeout: Duration,
    /// Read queries, never answer.
    pub silent: bool,
    /// After sending this many answers on a connection, close it.
    pub close_after: Option<usize>,
    /// How `close_after` closes.
    pub close_kind: CloseKind,
    /// Accept TCP, never do the TLS handshake (bytes read and dropped).
    pub no_handshake: bool,
    /// Per-name rules on the first label of the qname: `slow*` gets
    /// `slow_delay` more, `big*` gets a big TXT answer, `txtN` (e.g.
    /// `txt4.example`, N <= 258) gets N 253-byte TXT records, `silent*` is
    /// never answered.
    pub name_rules: bool,
    pub slow_delay: Duration,
    /// Number of 253-byte TXT records in a `big` answer (12: ~3070 bytes).
    pub big_records: usize,
    pub hook: Option<Hook>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 0x05ee_dd07_u64,
            reverse_batch: 0,
            batch_timeout: Duration::from_millis(300),
            silent: false,
            close_after: None,
            close_kind: CloseKind::CloseNotify,
            no_handshake: false,
            name_rules: true,
            slow_delay: Duration::from_millis(800),
            big_records: 12,
            hook: None,
        }
    }
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("delay", &self.delay)
            .field("jitter", &self.jitter)
            .field("reverse_batch", &self.reverse_batch)
            .field("silent", &self.silent)
            .field("close_after", &self.close_after)
            .field("close_kind", &self.close_kind)
            .field("no_handshake", &self.no_handshake)
            .field("name_rules", &self.name_rules)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Script {
    /// Answer immediately (the default).
    pub fn immediate() -> Script {
        Script::default()
    }

    pub fn silent() -> Script {
        Script {
            silent: true,
            ..Script::default()
        }
    }

    pub fn delayed(delay: Duration) -> Script {
        Script {
            delay,
            ..Script::default()
        }
    }

    pub fn reverse_batch(n: usize) -> Script {
        Script {
            reverse_batch: n,
            ..Script::default()
        }
    }

    pub fn close_after(n: usize, kind: CloseKind) -> Script {
        Script {
            close_after: Some(n),
            close_kind: kind,
            ..Script::default()
        }
    }

    pub fn no_handshake() -> Script {
        Script {
            no_handshake: true,
            ..Script::default()
        }
    }

    pub fn with_jitter(mut self, jitter: Duration) -> Script {
        self.jitter = jitter;
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Script {
        self.delay = delay;
        self
    }

    pub fn with_hook(mut self, hook: impl Fn(&HookCtx<'_>) -> Option<Vec<Action>> + Send + Sync + 'static) -> Script {
        self.hook = Some(Arc::new(hook));
        self
    }
}

/// A query as received by the upstream.
#[derive(Clone, Debug)]
pub struct RecordedQuery {
    /// Connection number (1-based).
    pub conn: usize,
    /// Index over the whole upstream (0-based).
    pub seq: usize,
    pub at: Instant,
    /// The unframed message.
    pub bytes: Vec<u8>,
}

impl RecordedQuery {
    pub fn id(&self) -> u16 {
        msg_id(&self.bytes).unwrap_or(0)
    }

    /// Lower-case qname, "" if unparsable.
    pub fn qname(&self) -> String {
        dns::Message::parse(&self.bytes)
            .map(|m| m.qname().to_string())
            .unwrap_or_default()
    }
}

/// Everything the upstream recorded.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// TCP connections accepted.
    pub accepts: usize,
    /// TLS handshakes completed.
    pub handshakes: usize,
    /// ... of which resumed.
    pub resumed: usize,
    /// TLS errors (handshake failures, alerts received, ...).
    pub tls_errors: Vec<String>,
    /// Every query, in arrival order.
    pub queries: Vec<RecordedQuery>,
    /// Connections currently open.
    pub open: usize,
    /// Highest number of connections open at once.
    pub max_open: usize,
    /// In-flight (received, not yet answered) upstream IDs per connection.
    pub inflight: HashMap<usize, HashSet<u16>>,
    /// Queries that arrived with an ID already in flight on their connection.
    pub duplicate_inflight: usize,
    /// (conn, id) of each such duplicate.
    pub duplicates: Vec<(usize, u16)>,
    /// Frames (answers) sent.
    pub answers_sent: usize,
    /// Connections the upstream closed on purpose (script/hook).
    pub closed_by_upstream: usize,
    /// Connections the peer closed with close_notify.
    pub peer_close_notify: usize,
    /// Connections the peer closed without close_notify (FIN or error).
    pub peer_eof: usize,
    /// SNI sent by the client, per completed handshake (in order).
    pub sni: Vec<Option<String>>,
    /// ALPN protocol negotiated, per completed handshake (only set when the
    /// server config lists protocols, e.g. `dot`).
    pub alpn: Vec<Option<Vec<u8>>>,
    /// The first bytes (up to 16) each connection received, by connection
    /// number: a TLS client starts with a handshake record (0x16).
    pub first_bytes: HashMap<usize, Vec<u8>>,
    /// Highest number of queries in flight at once, by connection number.
    pub max_inflight: HashMap<usize, usize>,
    /// KeyUpdate messages sent (Action::KeyUpdate).
    pub key_updates: usize,
}

struct Shared {
    script: Mutex<Script>,
    /// TLS config for connections accepted from now on.
    config: Mutex<Arc<ServerConfig>>,
    stats: Mutex<Stats>,
    stop: AtomicBool,
    conns: AtomicUsize,
    queries: AtomicUsize,
    rng: AtomicU64,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not hide the real failure.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The test upstream. `stop()` or drop closes the listener (the port then
/// refuses connections) and ends every connection.
pub struct TestUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestUpstream {
    /// Starts on 127.0.0.1:0 with the given TLS config and script.
    pub fn start(config: Arc<ServerConfig>, script: Script) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test upstream");
        TestUpstream::with_listener(listener, config, script)
    }

    /// Starts on a given address (e.g. the port of an upstream that was
    /// stopped, to bring it back). Retries `AddrInUse` for up to 2 s.
    pub fn start_on(addr: SocketAddr, config: Arc<ServerConfig>, script: Script) -> TestUpstream {
        let deadline = Instant::now() + Duration::from_secs(2);
        // Bounded by the deadline.
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("bind test upstream on {addr}: {e}"),
            }
        };
        TestUpstream::with_listener(listener, config, script)
    }

    fn with_listener(listener: TcpListener, config: Arc<ServerConfig>, script: Script) -> TestUpstream {
        let addr = listener.local_addr().expect("upstream addr");
        let seed = script.seed;
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            script: Mutex::new(script),
            stats: Mutex::new(Stats::default()),
            stop: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            queries: AtomicUsize::new(0),
            rng: AtomicU64::new(seed | 1),
            handles: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("upstream-accept-{}", addr.port()))
            .spawn(move || accept_loop(listener, sh))
            .expect("spawn acceptor");
        TestUpstream {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Starts with a fresh valid leaf for `name` issued by `ca`.
    pub fn for_name(ca: &TestCa, name: &str, script: Script) -> TestUpstream {
        TestUpstream::start(ca.leaf(&[name]).server_config(), script)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The proxy's `--upstream` value: "127.0.0.1:PORT#name".
    pub fn arg(&self, name: &str) -> String {
        format!("{}#{}", self.addr, name)
    }

    pub fn script(&self) -> Script {
        lock(&self.shared.script).clone()
    }

    pub fn set_script(&self, script: Script) {
        *lock(&self.shared.script) = script;
    }

    pub fn update_script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut lock(&self.shared.script));
    }

    /// Replaces the TLS config (certificate) for connections accepted from
    /// now on; open connections keep theirs.
    pub fn set_config(&self, config: Arc<ServerConfig>) {
        *lock(&self.shared.config) = config;
    }

    /// A snapshot of everything recorded.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Runs `f` on the live stats (no clone).
    pub fn with_stats<R>(&self, f: impl FnOnce(&Stats) -> R) -> R {
        f(&lock(&self.shared.stats))
    }

    pub fn accepts(&self) -> usize {
        self.with_stats(|s| s.accepts)
    }

    pub fn handshakes(&self) -> usize {
        self.with_stats(|s| s.handshakes)
    }

    pub fn resumed_handshakes(&self) -> usize {
        self.with_stats(|s| s.resumed)
    }

    pub fn tls_errors(&self) -> Vec<String> {
        self.with_stats(|s| s.tls_errors.clone())
    }

    pub fn queries(&self) -> Vec<RecordedQuery> {
        self.with_stats(|s| s.queries.clone())
    }

    pub fn query_count(&self) -> usize {
        self.with_stats(|s| s.queries.len())
    }

    pub fn open_connections(&self) -> usize {
        self.with_stats(|s| s.open)
    }

    pub fn max_open_connections(&self) -> usize {
        self.with_stats(|s| s.max_open)
    }

    pub fn duplicate_inflight_ids(&self) -> usize {
        self.with_stats(|s| s.duplicate_inflight)
    }

    pub fn answers_sent(&self) -> usize {
        self.with_stats(|s| s.answers_sent)
    }

    /// Polls (every 2 ms) until `f` holds or the deadline passes.
    pub fn wait_until(&self, deadline: Instant, f: impl Fn(&Stats) -> bool) -> bool {
        loop {
            if self.with_stats(&f) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops accepting, closes the listener and every connection, joins all
    /// threads. Idempotent.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            // Wake the blocking accept().
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
            let _ = h.join();
        }
        let handles: Vec<_> = lock(&self.shared.handles).drain(..).collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Bounded by the stop flag: stop() wakes accept() with a connection.
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let (sock, _) = match accepted {
            Ok(x) => x,
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let conn = shared.conns.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut st = lock(&shared.stats);
            st.accepts += 1;
            st.open += 1;
            st.max_open = st.max_open.max(st.open);
        }
        let no_handshake = lock(&shared.script).no_handshake;
        let sh = shared.clone();
        let cfg = lock(&shared.config).clone();
        let h = thread::Builder::new()
            .name(format!("upstream-conn-{conn}"))
            .spawn(move || {
                if no_handshake {
                    hold_without_handshake(&sh, sock);
                } else {
                    Conn::new(sh.clone(), sock, conn, cfg).run();
                }
                let mut st = lock(&sh.stats);
                st.open -= 1;
                st.inflight.remove(&conn);
            })
            .expect("spawn conn thread");
        lock(&shared.handles).push(h);
    }
    // listener dropped here: the port refuses from now on.
}

fn hold_without_handshake(shared: &Shared, mut sock: TcpStream) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Sets SO_LINGER {on, 0} so that close() sends RST.
pub fn set_linger_zero(sock: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd owned by `sock`, pointer/length of a live linger struct.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER): {}", io::Error::last_os_error());
}

/// A scheduled action, ordered by (due, seq).
struct Pending {
    due: Instant,
    seq: u64,
    /// ID of the query this action answers (for in-flight bookkeeping).
    qid: Option<u16>,
    action: Action,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap, we want the earliest first.
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

enum Flow {
    Continue,
    Closed,
    /// StopReading: idle until the upstream stops.
    Hold,
}

struct Conn {
    shared: Arc<Shared>,
    sock: TcpStream,
    tls: ServerConnection,
    id: usize,
    inbuf: Vec<u8>,
    pending: BinaryHeap<Pending>,
    seq: u64,
    /// Held answers for reverse_batch: (qid, answer, extra delay).
    batch: Vec<(u16, Vec<u8>, Duration)>,
    batch_started: Option<Instant>,
    queries_on_conn: usize,
    answered: usize,
    handshake_seen: bool,
    /// The first bytes received on the socket (up to 16).
    first_bytes: Vec<u8>,
}

impl Conn {
    fn new(shared: Arc<Shared>, sock: TcpStream, id: usize, cfg: Arc<ServerConfig>) -> Conn {
        let mut tls = ServerConnection::new(cfg).expect("ServerConnection");
        tls.set_buffer_limit(None);
        let _ = sock.set_nodelay(true);
        let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
        Conn {
            shared,
            sock,
            tls,
            id,
            inbuf: Vec::new(),
            pending: BinaryHeap::new(),
            seq: 0,
            batch: Vec::new(),
            batch_started: None,
            queries_on_conn: 0,
            answered: 0,
            handshake_seen: false,
            first_bytes: Vec::new(),
        }
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn run(mut self) {
        let mut rbuf = vec![0u8; 65536];
        while !self.stopping() {
            if self.flush().is_err() {
                return;
            }
            match self.run_due() {
                Flow::Closed => return,
                Flow::Hold => {
                    // Bounded by the stop flag (stop() joins this thread).
                    while !self.stopping() {
                        thread::sleep(Duration::from_millis(10));
                    }
                    return;
                }
                Flow::Continue => {}
            }
            self.maybe_release_batch(false);
            let now = Instant::now();
            let mut wait = Duration::from_millis(20);
            if let Some(p) = self.pending.peek() {
                wait = wait.min(p.due.saturating_duration_since(now));
            }
            if let Some(t) = self.batch_started {
                let due = t + lock(&self.shared.script).batch_timeout;
                wait = wait.min(due.saturating_duration_since(now));
            }
            let wait = wait.max(Duration::from_millis(1));
            let _ = self.sock.set_read_timeout(Some(wait));
            let mut rec = Recording {
                sock: &mut self.sock,
                first: &mut self.first_bytes,
            };
            let eof = match self.tls.read_tls(&mut rec) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => {
                    self.note_peer_eof(format!("conn {}: read error: {e}", self.id));
                    return;
                }
            };
            let state = match self.tls.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    lock(&self.shared.stats)
                        .tls_errors
                        .push(format!("conn {}: {e}", self.id));
                    let _ = self.flush(); // send our alert, if any
                    return;
                }
            };
            if !self.handshake_seen && !self.tls.is_handshaking() {
                self.handshake_seen = true;
                let mut st = lock(&self.shared.stats);
                st.handshakes += 1;
                st.sni.push(self.tls.server_name().map(str::to_string));
                st.alpn.push(self.tls.alpn_protocol().map(<[u8]>::to_vec));
                st.first_bytes.insert(self.id, self.first_bytes.clone());
                if self.tls.handshake_kind() == Some(HandshakeKind::Resumed) {
                    st.resumed += 1;
                }
            }
            let mut peer_closed = state.peer_has_closed();
            if state.plaintext_bytes_to_read() > 0 {
                loop {
                    match self.tls.reader().read(&mut rbuf) {
                        Ok(0) => {
                            peer_closed = true;
                            break;
                        }
                        Ok(n) => self.inbuf.extend_from_slice(&rbuf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            peer_closed = true;
                            break;
                        }
                    }
                }
            }
            for q in dns::take_frames(&mut self.inbuf) {
                self.on_query(q);
            }
            if state.peer_has_closed() {
                lock(&self.shared.stats).peer_close_notify += 1;
                self.tls.send_close_notify();
                let _ = self.flush();
                return;
            }
            if eof || peer_closed {
                self.note_peer_eof(String::new());
                return;
            }
        }
    }

    fn note_peer_eof(&self, err: String) {
        let mut st = lock(&self.shared.stats);
        st.first_bytes
            .entry(self.id)
            .or_insert_with(|| self.first_bytes.clone());
        st.peer_eof += 1;
        if !err.is_empty() && !self.handshake_seen {
            st.tls_errors.push(err);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Bounded: each write_tls either progresses or times out (2 s).
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn next_rand(&self) -> u64 {
        // xorshift64*, shared by all connections of one upstream.
        let mut x = self.shared.rng.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .shared
                .rng
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545_F491_4F6C_DD1D),
                Err(cur) => x = cur,
            }
        }
    }

    fn schedule(&mut self, due: Instant, qid: Option<u16>, action: Action) {
        self.seq += 1;
        self.pending.push(Pending {
            due,
            seq: self.seq,
            qid,
            action,
        });
    }

    fn on_query(&mut self, q: Vec<u8>) {
        let now = Instant::now();
        let global = self.shared.queries.fetch_add(1, Ordering::SeqCst);
        let index = self.queries_on_conn;
        self.queries_on_conn += 1;
        let qid = msg_id(&q);
        {
            let mut st = lock(&self.shared.stats);
            st.queries.push(RecordedQuery {
                conn: self.id,
                seq: global,
                at: now,
                bytes: q.clone(),
            });
            if let Some(id) = qid {
                let set = st.inflight.entry(self.id).or_default();
                let fresh = set.insert(id);
                let now_inflight = set.len();
                let max = st.max_inflight.entry(self.id).or_default();
                *max = (*max).max(now_inflight);
                if !fresh {
                    st.duplicate_inflight += 1;
                    st.duplicates.push((self.id, id));
                }
            }
        }
        let script = lock(&self.shared.script).clone();
        // The quiescence check's last query always gets the plain answer,
        // whatever the test's hook does with other names.
        let probe =
            first_label_starts_with(&q, "final") && dns::Message::parse(&q).is_ok_and(|m| m.qname() == QUIESCENCE_NAME);
        if let Some(hook) = script.hook.as_ref().filter(|_| !probe) {
            let ctx = HookCtx {
                query: &q,
                conn: self.id,
                index,
                global_index: global,
            };
            if let Some(actions) = hook(&ctx) {
                let mut due = now;
                for a in actions {
                    match a {
                        Action::Delay(d) => due += d,
                        Action::Answer => {
                            if let Some(ans) = rule_answer(&script, &q) {
                                self.schedule(due, qid, Action::Send(ans));
                            }
                        }
                        other => self.schedule(due, qid, other),
                    }
                }
                return;
            }
        }
        if script.silent {
            return;
        }
        let Some(ans) = rule_answer(&script, &q) else {
            return;
        };
        let mut delay = script.delay;
        if script.jitter > Duration::ZERO {
            let nanos = script.jitter.as_nanos() as u64;
            delay += Duration::from_nanos(self.next_rand() % nanos.max(1));
        }
        if script.name_rules && first_label_starts_with(&q, "slow") {
            delay += script.slow_delay;
        }
        let id = qid.unwrap_or(0);
        if script.reverse_batch > 1 {
            self.batch.push((id, ans, delay));
            self.batch_started.get_or_insert(now);
            if self.batch.len() >= script.reverse_batch {
                self.maybe_release_batch(true);
            }
        } else {
            self.schedule(now + delay, qid, Action::Send(ans));
        }
    }

    fn maybe_release_batch(&mut self, force: bool) {
        let Some(started) = self.batch_started else {
            return;
        };
        let timeout = lock(&self.shared.script).batch_timeout;
        if !force && started.elapsed() < timeout {
            return;
        }
        self.batch_started = None;
        let now = Instant::now();
        let batch: Vec<_> = self.batch.drain(..).rev().collect();
        for (id, ans, delay) in batch {
            self.schedule(now + delay, Some(id), Action::Send(ans));
        }
    }

    /// Runs every due action; all frames due now go out in one flush.
    fn run_due(&mut self) -> Flow {
        let now = Instant::now();
        let mut sent_any = false;
        while self.pending.peek().is_some_and(|p| p.due <= now) {
            let p = self.pending.pop().expect("peeked");
            match p.action {
                Action::Send(msg) => {
                    let _ = self.tls.writer().write_all(&dns::frame(&msg));
                    sent_any = true;
                    let mut st = lock(&self.shared.stats);
                    st.answers_sent += 1;
                    if let Some(qid) = p.qid {
                        if msg_id(&msg) == Some(qid) {
                            if let Some(set) = st.inflight.get_mut(&self.id) {
                                set.remove(&qid);
                            }
                        }
                        drop(st);
                        self.answered += 1;
                        let close_after = lock(&self.shared.script).close_after;
                        if let Some(n) = close_after {
                            if self.answered >= n {
                                let kind = lock(&self.shared.script).close_kind;
                                self.close(kind);
                                return Flow::Closed;
                            }
                        }
                    }
                }
                Action::SendRaw(bytes) => {
                    let _ = self.tls.writer().write_all(&bytes);
                    sent_any = true;
                }
                Action::SendTcpRaw(bytes) => {
                    if self.flush().is_err() {
                        return Flow::Closed;
                    }
                    if self.sock.write_all(&bytes).is_err() {
                        return Flow::Closed;
                    }
                }
                Action::Close(kind) => {
                    self.close(kind);
                    return Flow::Closed;
                }
                Action::KeyUpdate => {
                    // Sent before anything written after it.
                    if sent_any && self.flush().is_err() {
                        return Flow::Closed;
                    }
                    match self.tls.refresh_traffic_keys() {
                        Ok(()) => lock(&self.shared.stats).key_updates += 1,
                        Err(e) => lock(&self.shared.stats)
                            .tls_errors
                            .push(format!("conn {}: refresh_traffic_keys: {e}", self.id)),
                    }
                    sent_any = true;
                }
                Action::StopReading => {
                    let _ = self.flush();
                    return Flow::Hold;
                }
                // Expanded when scheduling; never queued.
                Action::Delay(_) | Action::Answer => {}
            }
        }
        if sent_any && self.flush().is_err() {
            return Flow::Closed;
        }
        Flow::Continue
    }

    fn close(&mut self, kind: CloseKind) {
        lock(&self.shared.stats).closed_by_upstream += 1;
        match kind {
            CloseKind::Rst => {
                let _ = self.flush();
                set_linger_zero(&self.sock);
                // Dropping the socket (with the Conn) sends RST.
            }
            CloseKind::CloseNotify | CloseKind::Fin => {
                if kind == CloseKind::CloseNotify {
                    self.tls.send_close_notify();
                }
                let _ = self.flush();
                let _ = self.sock.shutdown(Shutdown::Write);
                // Drain whatever the peer still sends so that close() does not
                // turn into a RST because of unread data; bounded to 2 s.
                let deadline = Instant::now() + Duration::from_secs(2);
                let _ = self.sock.set_read_timeout(Some(Duration::from_millis(10)));
                let mut buf = [0u8; 4096];
                while Instant::now() < deadline && !self.stopping() {
                    match self.sock.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if is_timeout(&e) => {}
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// The answer the script's rules give (no delays): `big` (script.big_records
/// TXT records), `txtN` (N TXT records of 253 bytes each, N <= 258) or the
/// default answer; `None` for `silent` names. A query without a question gets FORMERR.
pub fn rule_answer(script: &Script, q: &[u8]) -> Option<Vec<u8>> {
    if script.name_rules {
        if first_label_starts_with(q, "silent") {
            return None;
        }
        if first_label_starts_with(q, "big") {
            return dns::big_answer(q, script.big_records);
        }
        if let Some(n) = txt_count(q) {
            return dns::big_answer(q, n);
        }
    }
    dns::default_answer(q).or_else(|| formerr_header(q))
}

fn formerr_header(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut m = q[..12].to_vec();
    m[2] = 0x80 | (q[2] & 0x79);
    m[3] = 0x80 | dns::RCODE_FORMERR;
    m[4..12].fill(0);
    Some(m)
}

/// Does the first label of the query's qname start with `prefix`?
pub fn first_label_starts_with(q: &[u8], prefix: &str) -> bool {
    let Some(&len) = q.get(12) else {
        return false;
    };
    let len = len as usize;
    if len == 0 || len > 63 {
        return false;
    }
    q.get(13..13 + len)
        .is_some_and(|l| l.len() >= prefix.len() && l[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
}

/// N from a first label `txtN` (1..=258; 258 records make an answer of
/// about 65 300 bytes, just under the 65 535 a frame can carry).
fn txt_count(q: &[u8]) -> Option<usize> {
    let len = *q.get(12)? as usize;
    let label = q.get(13..13 + len)?;
    let digits = label.strip_prefix(b"txt")?;
    let n: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (1..=258).contains(&n).then_some(n)
}

/// A socket reader that keeps the first 16 bytes it ever returned.
struct Recording<'a> {
    sock: &'a mut TcpStream,
    first: &'a mut Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        if self.first.len() < 16 {
            let take = (16 - self.first.len()).min(n);
            self.first.extend_from_slice(&buf[..take]);
        }
        Ok(n)
    }
}
