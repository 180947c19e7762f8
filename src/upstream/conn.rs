//! One connection to an upstream resolver: a transport (a non-blocking
//! TCP socket in the proxy, an in-memory pipe in tests), a session over it
//! (a `rustls::ClientConnection` for DNS over TLS, or nothing for a plain
//! DNS server in a `--forward` zone), the frames read from it and the
//! table of the queries sent on it under rewritten IDs.
//!
//! The connection moves bytes and tracks its own life; choosing
//! connections, retrying queries and answering clients belong to the pool
//! and the loop. Every method returns an outcome instead of failing the
//! loop: a broken connection reports a [`CloseReason`] and is closed by the
//! pool's reap step, which re-sends what was in flight.
//!
//! The read cycle follows rustls' own advice: `read_tls`, one
//! `process_new_packets`, drain the plaintext, repeat until the socket
//! says `WouldBlock` (edge-triggered readiness is not re-armed otherwise).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use super::ids::{IdRng, IdTable, Lookup, QueryRef};
use crate::framing::{FrameDecoder, FrameTooShort};

/// Where a connection is in its life. Queries may be queued from
/// `Connecting` on: rustls holds them until the handshake is done, so no
/// DNS byte ever leaves before the server is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Handshaking,
    Ready,
}

impl std::fmt::Display for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnState::Connecting => "connecting",
            ConnState::Handshaking => "handshaking",
            ConnState::Ready => "ready",
        })
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub enum CloseReason {
    Connect(io::Error),
    Io(io::Error),
    Tls(rustls::Error),
    /// The server closed; `clean` when it sent close_notify first.
    Eof {
        clean: bool,
    },
    BadFrame(FrameTooShort),
    HandshakeTimeout,
    /// Queries timed out while the server sent nothing at all.
    Stalled,
    /// Nothing in flight for the idle period; ours, not a failure.
    Idle,
    /// Too many late answers expected; recycled, not a failure.
    Recycled,
    /// The server answered the first of several queries and then went
    /// silent: it does not pipeline. Its queries are re-sent one at a time.
    NotPipelining,
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Connect(e) => write!(f, "connect failed: {e}"),
            CloseReason::Io(e) => write!(f, "I/O error: {e}"),
            CloseReason::Tls(e) => write!(f, "TLS error: {e}"),
            CloseReason::Eof { clean: true } => f.write_str("closed by server"),
            CloseReason::Eof { clean: false } => f.write_str("closed by server without close_notify"),
            CloseReason::BadFrame(e) => write!(f, "bad frame: {e}"),
            CloseReason::HandshakeTimeout => f.write_str("TLS handshake timed out"),
            CloseReason::Stalled => f.write_str("server stopped answering"),
            CloseReason::Idle => f.write_str("idle"),
            CloseReason::Recycled => f.write_str("recycled"),
            CloseReason::NotPipelining => f.write_str("server does not pipeline"),
            CloseReason::Shutdown => f.write_str("shutting down"),
        }
    }
}

impl CloseReason {
    /// Out of descriptors (EMFILE, ENFILE) or memory on our side: nothing
    /// the upstream did.
    pub fn is_local_exhaustion(&self) -> bool {
        match self {
            CloseReason::Connect(e) | CloseReason::Io(e) => {
                matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                )
            }
            _ => false,
        }
    }

    /// Ours, and nothing is wrong: the server gets a close_notify.
    pub fn is_polite(&self) -> bool {
        matches!(
            self,
            CloseReason::Idle | CloseReason::Recycled | CloseReason::NotPipelining | CloseReason::Shutdown
        )
    }

    /// Whether the upstream should be treated as broken: the connection
    /// never became usable, or the server authenticated itself wrongly or
    /// stopped talking. A server closing a used connection is normal
    /// (RFC 7858 §3.4) and only costs a reconnect.
    /// `answered` says whether any query was ever answered on it: a server
    /// that accepts queries and closes without answering any is broken
    /// (and must not be reconnected to at full speed).
    pub fn is_failure(&self, was_ready: bool, answered: bool, in_flight: bool) -> bool {
        match self {
            CloseReason::Idle | CloseReason::Recycled | CloseReason::NotPipelining | CloseReason::Shutdown => false,
            CloseReason::Tls(_) | CloseReason::BadFrame(_) => true,
            // One slow answer on a connection that has been answering is
            // not an outage: replace the connection, keep the upstream.
            CloseReason::Stalled => !answered,
            _ => !was_ready || (in_flight && !answered),
        }
    }
}

/// Why a connection takes no new queries and closes once its last answer
/// is in. Separate from [`ConnState`]: a connection may be told to drain
/// before its handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// `--max-upstream-conn-queries` reached.
    Rotated,
    /// Its upstream was removed (or changed) by a reload.
    Retired,
    /// The server announced edns-tcp-keepalive 0 (RFC 7828 §3.2.2).
    ServerAsked,
    /// Too many timed-out IDs would wait for late answers.
    LateAnswers,
}

impl std::fmt::Display for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Drain::Rotated => "query limit reached",
            Drain::Retired => "retired by a reload",
            Drain::ServerAsked => "server asked (keepalive 0)",
            Drain::LateAnswers => "too many late answers expected",
        })
    }
}

/// What a connection needs from the byte stream under TLS.
pub trait Transport: Read + Write {
    /// Whether a non-blocking connect has finished: `Ok(true)` connected,
    /// `Ok(false)` still under way.
    fn connected(&mut self) -> io::Result<bool>;
    /// After reading: a chance to acknowledge at once (see
    /// [`crate::listen::client::quick_ack`]).
    fn after_read(&self) {}
}

impl Transport for TcpStream {
    fn connected(&mut self) -> io::Result<bool> {
        // mio's recipe (TcpStream::connect docs): writable, then no
        // pending error, then a peer address.
        if let Some(e) = self.take_error()? {
            return Err(e);
        }
        match self.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn after_read(&self) {
        // A server that sends each answer in its own small write without
        // TCP_NODELAY waits for our ACK before the next one.
        crate::listen::client::quick_ack(self);
    }
}

/// One whole message read from the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The answer for a query in flight, taken out of the ID table.
    Live { id: u16, query: QueryRef },
    /// For a query that timed out; it goes nowhere.
    Late,
    /// An ID that was never given out on this connection.
    Unknown,
}

/// What the server has been doing.
struct Activity {
    /// The last read or write of queries.
    last_active: Instant,
    /// When a whole message last arrived: handshake bytes do not count, a
    /// server can finish TLS and then say nothing.
    last_answer: Option<Instant>,
    /// Queries sent on this connection so far.
    sent: u64,
    /// Since when the server may be stuck on a batch: it answered the
    /// oldest query outstanding and others remain. A server that answers a
    /// newer query while an older one waits reads them all: it pipelines.
    suspect: Option<Instant>,
    /// The pool's check timer for `suspect` is armed.
    check_armed: bool,
}

/// When a connection with nothing in flight closes.
struct Idle {
    /// Our default, or less when the server announces a shorter
    /// edns-tcp-keepalive timeout.
    after: Duration,
    /// When the one idle timer of this connection is due, if armed.
    armed: Option<Instant>,
}

/// How much the socket read loop pulls in one `read` call: big enough
/// that a burst of answers costs few syscalls.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one connection per readiness turn; the rest is read on
/// the next turn, after other sockets had theirs.
const READ_BUDGET: usize = 4 * READ_CHUNK;

/// What runs over the byte stream.
enum Session {
    Tls(Box<ClientConnection>),
    /// Plain DNS over TCP (RFC 7766): framed queries go to the socket as
    /// they are; `unsent` is what the socket did not take yet.
    Plain {
        unsent: Vec<u8>,
    },
}

impl Session {
    fn wants_write(&self) -> bool {
        match self {
            Session::Tls(tls) => tls.wants_write(),
            Session::Plain { unsent } => !unsent.is_empty(),
        }
    }

    fn is_handshaking(&self) -> bool {
        match self {
            Session::Tls(tls) => tls.is_handshaking(),
            Session::Plain { .. } => false,
        }
    }

    /// Take framed queries for sending.
    fn queue(&mut self, framed: &[u8]) -> io::Result<()> {
        match self {
            // With the buffer limit off, rustls takes everything at once.
            Session::Tls(tls) => tls.writer().write_all(framed),
            Session::Plain { unsent } => {
                unsent.extend_from_slice(framed);
                Ok(())
            }
        }
    }

    /// One write of what is due to the socket.
    fn write_to(&mut self, sock: &mut impl Write) -> io::Result<usize> {
        match self {
            Session::Tls(tls) => tls.write_tls(sock),
            Session::Plain { unsent } => {
                let n = sock.write(unsent)?;
                unsent.drain(..n.min(unsent.len()));
                if unsent.is_empty() && unsent.capacity() > READ_CHUNK {
                    *unsent = Vec::new();
                }
                Ok(n)
            }
        }
    }
}

pub struct UpstreamConn<S = TcpStream> {
    /// Index of the configured upstream this connection belongs to.
    upstream: usize,
    /// Tells this connection from a later one in the same slot.
    gen: u32,
    state: ConnState,
    sock: S,
    session: Session,
    /// Plaintext answers not yet handed out.
    decoder: FrameDecoder,
    /// Framed queries written this turn; encrypted together at the flush,
    /// so a burst becomes a few TLS records and one socket write.
    out: Vec<u8>,
    ids: IdTable,
    /// IDs in send order (pruned at the front), to tell a server answering
    /// in order from one that reorders; empty on serial connections.
    order: VecDeque<u16>,
    activity: Activity,
    was_ready: bool,
    /// The last read stopped at its budget with more to read: come back.
    read_more: bool,
    idle: Idle,
    /// One query at a time (a server that does not pipeline), and the
    /// framed queries waiting for the one in flight to be answered.
    serial: Option<VecDeque<Vec<u8>>>,
    drain: Option<Drain>,
    /// On the pool's flush list this turn.
    dirty: bool,
}

impl UpstreamConn<TcpStream> {
    /// Start a non-blocking connect; the handshake runs as readiness comes.
    pub fn connect(
        upstream: usize,
        gen: u32,
        addr: SocketAddr,
        name: &ServerName<'static>,
        config: &Arc<rustls::ClientConfig>,
        now: Instant,
    ) -> Result<Self, CloseReason> {
        UpstreamConn::new(Self::open(addr)?, upstream, gen, name, config, now)
    }

    /// Start a non-blocking connect to a plain DNS server (a `--forward`
    /// zone's `plain:` upstream): no TLS, the same framing and pipelining.
    pub fn connect_plain(upstream: usize, gen: u32, addr: SocketAddr, now: Instant) -> Result<Self, CloseReason> {
        Ok(UpstreamConn::plain(Self::open(addr)?, upstream, gen, now))
    }

    fn open(addr: SocketAddr) -> Result<TcpStream, CloseReason> {
        let sock = TcpStream::connect(addr).map_err(CloseReason::Connect)?;
        // Queries are small and latency matters more than segment count;
        // coalescing already happens in `out`.
        let _ = sock.set_nodelay(true);
        Ok(sock)
    }

    pub fn source(&mut self) -> &mut TcpStream {
        &mut self.sock
    }
}

impl<S: Transport> UpstreamConn<S> {
    pub fn new(
        sock: S,
        upstream: usize,
        gen: u32,
        name: &ServerName<'static>,
        config: &Arc<rustls::ClientConfig>,
        now: Instant,
    ) -> Result<Self, CloseReason> {
        let mut tls = ClientConnection::new(Arc::clone(config), name.clone()).map_err(CloseReason::Tls)?;
        // The proxy bounds what is queued (in-flight caps); a rustls limit
        // would instead cut a frame in half inside `write`.
        tls.set_buffer_limit(None);
        Ok(UpstreamConn::with_session(
            sock,
            Session::Tls(Box::new(tls)),
            upstream,
            gen,
            now,
        ))
    }

    /// A plain DNS connection over `sock`.
    pub fn plain(sock: S, upstream: usize, gen: u32, now: Instant) -> Self {
        UpstreamConn::with_session(sock, Session::Plain { unsent: Vec::new() }, upstream, gen, now)
    }

    fn with_session(sock: S, session: Session, upstream: usize, gen: u32, now: Instant) -> Self {
        UpstreamConn {
            upstream,
            gen,
            state: ConnState::Connecting,
            sock,
            session,
            decoder: FrameDecoder::default(),
            out: Vec::new(),
            ids: IdTable::default(),
            order: VecDeque::new(),
            activity: Activity {
                last_active: now,
                last_answer: None,
                sent: 0,
                suspect: None,
                check_armed: false,
            },
            was_ready: false,
            read_more: false,
            idle: Idle {
                after: IDLE,
                armed: None,
            },
            serial: None,
            drain: None,
            dirty: false,
        }
    }

    pub fn upstream(&self) -> usize {
        self.upstream
    }

    pub fn gen(&self) -> u32 {
        self.gen
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn was_ready(&self) -> bool {
        self.was_ready
    }

    /// Queries waiting for an answer on this connection.
    pub fn live(&self) -> usize {
        self.ids.live()
    }

    pub fn tombstones(&self) -> usize {
        self.ids.tombstones()
    }

    pub fn last_answer(&self) -> Option<Instant> {
        self.activity.last_answer
    }

    /// Whether the last read stopped at its budget with more to read.
    pub fn has_more(&self) -> bool {
        self.read_more
    }

    pub fn sent(&self) -> u64 {
        self.activity.sent
    }

    /// See [`Activity::suspect`]: `None` unless the last answer was to the
    /// oldest query outstanding and others remain.
    pub fn suspect(&self) -> Option<Instant> {
        self.activity.suspect
    }

    /// Note the check timer armed; `false` when it already was.
    pub fn arm_check(&mut self) -> bool {
        !std::mem::replace(&mut self.activity.check_armed, true)
    }

    /// The check timer fired: it is no longer armed.
    pub fn check_fired(&mut self) {
        self.activity.check_armed = false;
    }

    /// Whether new queries may be given to this connection.
    pub fn accepts_queries(&self) -> bool {
        self.drain.is_none()
    }

    pub fn draining(&self) -> Option<Drain> {
        self.drain
    }

    /// Take no new queries; close once the last answer is in.
    pub fn drain(&mut self, why: Drain) {
        if self.drain.is_none() {
            log::debug!("upstream connection draining: {why}");
            self.drain = Some(why);
        }
    }

    /// Whether it should close now: draining with nothing left to wait for.
    pub fn drained(&self) -> bool {
        self.drain.is_some() && self.ids.live() == 0
    }

    /// Put it on the flush list; `true` when it was not on it yet.
    pub fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    pub fn clear_dirty(&mut self) {
        self.dirty = false;
    }

    /// Queue query `q` under a fresh random ID; `None` only when all
    /// 65,536 IDs are taken (the per-connection cap keeps that far away).
    pub fn send(&mut self, q: QueryRef, msg: &[u8], rng: &mut IdRng, now: Instant) -> Option<u16> {
        let busy = self.ids.live() > 0;
        let id = self.ids.insert(q, rng)?;
        let mut frame = Vec::new();
        let out = match &mut self.serial {
            // One at a time: it waits for the answer to the one in flight.
            Some(_) if busy => &mut frame,
            _ => &mut self.out,
        };
        let start = out.len();
        crate::framing::push_frame(out, msg);
        if let Some(b) = out.get_mut(start + 2..start + 4) {
            b.copy_from_slice(&id.to_be_bytes());
        }
        if let (Some(held), false) = (&mut self.serial, frame.is_empty()) {
            held.push_back(frame);
        }
        if self.serial.is_none() {
            self.order.push_back(id);
        }
        self.activity.sent += 1;
        self.activity.last_active = now;
        Some(id)
    }

    /// Send one query at a time on this connection (its server does not
    /// pipeline). Only for a fresh connection: set before any query.
    pub fn set_serial(&mut self) {
        self.serial = Some(VecDeque::new());
    }

    pub fn is_serial(&self) -> bool {
        self.serial.is_some()
    }

    /// Whether `id` is the oldest query still waiting, by send order;
    /// forgets answered and timed-out ones at the front on the way.
    fn is_oldest(&mut self, id: u16) -> bool {
        while let Some(&front) = self.order.front() {
            if front == id {
                self.order.pop_front();
                return true;
            }
            if matches!(self.ids.get(front), Lookup::Live(_)) {
                return false;
            }
            self.order.pop_front();
        }
        false
    }

    /// Queries written (or being written) and not yet answered: all of
    /// them, except those a serial connection still holds back.
    pub fn outstanding(&self) -> usize {
        self.ids.live() - self.serial.as_ref().map_or(0, VecDeque::len)
    }

    /// An answer taken for `q` turned out not to belong to it (wrong
    /// question): keep waiting for the real one.
    pub fn restore(&mut self, id: u16, q: QueryRef) {
        self.ids.restore(id, q);
    }

    /// Query `q` under `id` gave up waiting; its ID stays taken so a late
    /// answer can never match a newer query.
    pub fn bury(&mut self, id: u16, q: QueryRef) {
        self.ids.bury(id, q);
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || self.session.wants_write()
    }

    /// Hand queued queries to rustls and write what it has to the socket,
    /// until done or the socket is full (WRITABLE resumes it).
    pub fn flush(&mut self) -> Result<(), CloseReason> {
        if !self.out.is_empty() {
            self.session.queue(&self.out).map_err(CloseReason::Io)?;
            self.out.clear();
            if self.out.capacity() > READ_CHUNK {
                self.out = Vec::new();
            }
        }
        if self.state == ConnState::Connecting {
            return Ok(());
        }
        while self.session.wants_write() {
            match self.session.write_to(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CloseReason::Io(e)),
            }
        }
        Ok(())
    }

    /// Handle readiness: finish connecting, read and decrypt everything the
    /// transport has, move the handshake on, write what is due. Returns
    /// whether the handshake finished now. Answers land in the decoder,
    /// which the caller empties with [`next_answer`](Self::next_answer)
    /// even when this fails, so answers that came before a close are kept.
    pub fn on_ready(&mut self, scratch: &mut [u8], now: Instant) -> Result<bool, CloseReason> {
        if self.state == ConnState::Connecting {
            if !self.sock.connected().map_err(CloseReason::Connect)? {
                return Ok(false);
            }
            self.state = ConnState::Handshaking;
        }
        let result = self.read_all(scratch, now);
        let became_ready = self.state == ConnState::Handshaking && !self.session.is_handshaking();
        if became_ready {
            self.state = ConnState::Ready;
            self.was_ready = true;
        }
        result?;
        self.flush()?;
        Ok(became_ready)
    }

    fn read_all(&mut self, scratch: &mut [u8], now: Instant) -> Result<(), CloseReason> {
        let mut got_any = false;
        let result = self.read_loop(scratch, now, &mut got_any);
        if got_any {
            self.sock.after_read();
        }
        result
    }

    fn read_loop(&mut self, scratch: &mut [u8], now: Instant, got_any: &mut bool) -> Result<(), CloseReason> {
        self.read_more = false;
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                // A flooding server must not starve everyone else: the rest
                // waits for the next turn.
                self.read_more = true;
                return Ok(());
            }
            let n = match self.sock.read(scratch) {
                Ok(0) => {
                    let Session::Tls(tls) = &mut self.session else {
                        // Closing is how a plain DNS server ends a stream.
                        return Err(CloseReason::Eof { clean: true });
                    };
                    // Let rustls see the EOF: it tells a clean close_notify
                    // from a truncation attack.
                    let _ = tls.read_tls(&mut io::empty());
                    let clean = self.decrypt()?;
                    return Err(CloseReason::Eof { clean });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CloseReason::Io(e)),
            };
            self.activity.last_active = now;
            budget = budget.saturating_sub(n);
            *got_any = true;
            let mut input = scratch.get(..n).unwrap_or(&[]);
            if matches!(self.session, Session::Plain { .. }) {
                self.decoder.push(input);
                continue;
            }
            while !input.is_empty() {
                let Session::Tls(tls) = &mut self.session else { break };
                match tls.read_tls(&mut input) {
                    Ok(0) => return Err(CloseReason::Io(io::Error::other("TLS layer refused input"))),
                    Ok(_) => {}
                    Err(e) => return Err(CloseReason::Io(e)),
                }
                if self.decrypt()? {
                    return Err(CloseReason::Eof { clean: true });
                }
            }
        }
    }

    /// Process buffered TLS records and move the plaintext into the frame
    /// decoder. Returns true once the server has sent close_notify.
    fn decrypt(&mut self) -> Result<bool, CloseReason> {
        let Session::Tls(tls) = &mut self.session else {
            return Ok(false);
        };
        let state = match tls.process_new_packets() {
            Ok(state) => state,
            Err(e) => {
                // Last gasp: tell the server why (the alert rustls queued,
                // maybe behind other records), as far as the socket takes it.
                while tls.wants_write() {
                    if tls.write_tls(&mut self.sock).is_err() {
                        break;
                    }
                }
                return Err(CloseReason::Tls(e));
            }
        };
        let want = state.plaintext_bytes_to_read();
        if want > 0 {
            self.decoder.read_from(&mut tls.reader(), want);
        }
        Ok(state.peer_has_closed())
    }

    /// The next whole message into `frame`, looked up in the ID table.
    /// `None` when no whole message is buffered; `Err` when the stream
    /// lost its framing (the connection must close).
    pub fn next_answer(&mut self, frame: &mut Vec<u8>, now: Instant) -> Option<Result<Answer, CloseReason>> {
        match self.decoder.next_into(frame) {
            Ok(true) => {}
            Ok(false) => {
                self.decoder.shrink();
                return None;
            }
            Err(e) => return Some(Err(CloseReason::BadFrame(e))),
        }
        self.activity.last_answer = Some(now);
        let id = crate::wire::id(frame).unwrap_or(0);
        if self.serial.is_none() && matches!(self.ids.get(id), Lookup::Live(_)) {
            let oldest = self.is_oldest(id);
            // Outstanding besides this one (it is still in the table).
            self.activity.suspect = (oldest && self.ids.live() > 1).then_some(now);
        }
        let answer = match self.ids.take(id) {
            Lookup::Live(query) => Answer::Live { id, query },
            Lookup::Late => Answer::Late,
            Lookup::Unknown => Answer::Unknown,
        };
        // The one in flight is done (answered, or given up on earlier): the
        // next held query may go.
        if answer != Answer::Unknown {
            if let Some(next) = self.serial.as_mut().and_then(VecDeque::pop_front) {
                self.out.extend_from_slice(&next);
            }
        }
        Some(Ok(answer))
    }

    /// Honour the server's edns-tcp-keepalive TIMEOUT (RFC 7828 §3.2.2):
    /// close before it expires; 0 means send nothing more on this
    /// connection.
    pub fn keepalive(&mut self, timeout: u16) {
        if timeout == 0 {
            self.drain(Drain::ServerAsked);
        } else {
            // Leave a margin so our close_notify beats the server's close.
            let server = Duration::from_millis(u64::from(timeout) * 100);
            self.idle.after = self.idle.after.min(server.mul_f32(0.8));
        }
    }

    /// When it may close for idleness, if nothing else happens.
    pub fn idle_due(&self) -> Instant {
        self.activity.last_active + self.idle.after
    }

    /// Note an idle timer for `at`; `false` when one is due sooner already
    /// (one timer per connection, however many answers come: a timer per
    /// answer would grow the heap without bound).
    pub fn arm_idle(&mut self, at: Instant) -> bool {
        if self.idle.armed.is_none_or(|t| at < t) {
            self.idle.armed = Some(at);
            return true;
        }
        false
    }

    /// The idle timer for `now` fired: `true` when it is the armed one
    /// (not superseded by an earlier timer that already ran).
    pub fn idle_fired(&mut self, now: Instant) -> bool {
        if self.idle.armed.is_none_or(|t| t > now) {
            return false;
        }
        self.idle.armed = None;
        true
    }

    pub fn resumed(&self) -> bool {
        match &self.session {
            Session::Tls(tls) => tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            Session::Plain { .. } => false,
        }
    }

    /// End the connection: close_notify when the close is ours and polite,
    /// then hand back every query still waiting on it.
    pub fn close(&mut self, reason: &CloseReason, orphans: &mut Vec<QueryRef>) {
        // Queries still queued would be encrypted after the alert: they are
        // orphans (handed back below), not sent.
        self.out.clear();
        if let Some(held) = &mut self.serial {
            held.clear();
        }
        if reason.is_polite() && self.state != ConnState::Connecting {
            if let Session::Tls(tls) = &mut self.session {
                tls.send_close_notify();
            }
            let _ = self.flush();
        }
        self.ids.drain_live(orphans);
    }
}

/// Upstream connections with nothing in flight close after this.
pub const IDLE: Duration = Duration::from_secs(20);

#[cfg(test)]
#[path = "conn_tests.rs"]
mod conn_tests;
