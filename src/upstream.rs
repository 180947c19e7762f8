//! One DNS-over-TLS connection to an upstream resolver: a non-blocking TCP
//! socket, a `rustls::ClientConnection`, the frames read from it and the
//! in-flight table of the queries sent on it.
//!
//! The connection moves bytes and tracks its own life cycle; choosing
//! connections, retrying queries and answering clients is the proxy's job.
//! Every method returns an outcome instead of failing the loop: a broken
//! connection is reported as [`CloseReason`] and reaped by the proxy.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use crate::framing::{FrameDecoder, FrameTooShort};
use crate::id_table::IdTable;

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
            CloseReason::Shutdown => f.write_str("shutting down"),
        }
    }
}

impl CloseReason {
    /// Whether the upstream should be treated as broken: the connection
    /// never became usable, or the server authenticated itself wrongly or
    /// stopped talking. A server closing a used connection is normal
    /// (RFC 7858 §3.4) and only costs a reconnect.
    /// `answered` says whether any query was ever answered on it: a server
    /// that accepts queries and closes without answering any is broken
    /// (and must not be reconnected to at full speed).
    pub fn is_failure(&self, was_ready: bool, answered: bool, in_flight: bool) -> bool {
        match self {
            CloseReason::Idle | CloseReason::Recycled | CloseReason::Shutdown => false,
            CloseReason::Tls(_) | CloseReason::BadFrame(_) => true,
            // One slow answer on a connection that has been answering is
            // not an outage: replace the connection, keep the upstream.
            CloseReason::Stalled => !answered,
            _ => !was_ready || (in_flight && !answered),
        }
    }
}

/// How much the socket read loop pulls in one `read` call: big enough
/// that a burst of answers costs few syscalls.
const READ_CHUNK: usize = 64 * 1024;

pub struct UpstreamConn {
    /// Index of the configured upstream this connection belongs to.
    pub upstream: usize,
    /// Generation: tells this connection from a later one in the same slot.
    pub gen: u32,
    pub state: ConnState,
    sock: TcpStream,
    tls: ClientConnection,
    /// Frames of plaintext answers not yet handed to the proxy.
    pub decoder: FrameDecoder,
    /// Framed queries written this turn; encrypted together at the flush,
    /// so a burst becomes a few TLS records and one socket write.
    out: Vec<u8>,
    pub ids: IdTable,
    pub last_read: Instant,
    pub last_active: Instant,
    /// When an answer last matched a query on this connection.
    pub last_answer: Option<Instant>,
    pub was_ready: bool,
    /// Queued on the proxy's flush list this turn.
    pub dirty: bool,
    /// Close after this long with nothing in flight: our default, or less
    /// when the server announces a shorter edns-tcp-keepalive timeout.
    pub idle: Duration,
    /// When the one idle timer of this connection is due, if armed.
    pub idle_at: Option<Instant>,
    /// Queries sent on this connection so far.
    pub sent: u64,
    /// Takes no new queries and closes once the last answer is in: rotated,
    /// retired by a reload, told by keepalive 0, or too many late answers.
    /// A flag beside the state, since a connection may drain before its
    /// handshake is done.
    pub draining: bool,
}

impl UpstreamConn {
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        upstream: usize,
        gen: u32,
        addr: SocketAddr,
        name: &ServerName<'static>,
        config: &Arc<rustls::ClientConfig>,
        idle: Duration,
        now: Instant,
    ) -> Result<Self, CloseReason> {
        let mut tls = ClientConnection::new(Arc::clone(config), name.clone()).map_err(CloseReason::Tls)?;
        // The proxy bounds what is queued (in-flight caps); a rustls limit
        // would instead cut a frame in half inside `write`.
        tls.set_buffer_limit(None);
        let sock = TcpStream::connect(addr).map_err(CloseReason::Connect)?;
        // Queries are small and latency matters more than segment count;
        // coalescing already happens in `out`.
        let _ = sock.set_nodelay(true);
        Ok(UpstreamConn {
            upstream,
            gen,
            state: ConnState::Connecting,
            sock,
            tls,
            decoder: FrameDecoder::default(),
            out: Vec::new(),
            ids: IdTable::default(),
            last_read: now,
            last_active: now,
            last_answer: None,
            was_ready: false,
            dirty: false,
            idle,
            idle_at: None,
            sent: 0,
            draining: false,
        })
    }

    pub fn source(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Whether new queries may be given to this connection.
    pub fn accepts_queries(&self) -> bool {
        !self.draining
    }

    /// Queue one query under the upstream ID `id`.
    pub fn queue(&mut self, msg: &[u8], id: u16, now: Instant) {
        let start = self.out.len();
        crate::framing::push_frame(&mut self.out, msg);
        crate::dns::set_id(&mut self.out[start + 2..], id);
        self.last_active = now;
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || self.tls.wants_write()
    }

    /// Hand queued queries to rustls and write what it has to the socket,
    /// until done or the socket is full (WRITABLE resumes it).
    pub fn flush(&mut self) -> Result<(), CloseReason> {
        if !self.out.is_empty() {
            // With the buffer limit off, rustls takes everything at once.
            self.tls.writer().write_all(&self.out).map_err(CloseReason::Io)?;
            self.out.clear();
            if self.out.capacity() > READ_CHUNK {
                self.out = Vec::new();
            }
        }
        if self.state == ConnState::Connecting {
            return Ok(());
        }
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CloseReason::Io(e)),
            }
        }
        Ok(())
    }

    /// Handle readiness: finish connecting, read and decrypt everything the
    /// socket has, move the handshake on. Answers land in `decoder`, which
    /// the proxy empties even when this returns an error, so answers that
    /// arrived before a close are not lost.
    pub fn on_ready(&mut self, scratch: &mut [u8], now: Instant) -> Result<(), CloseReason> {
        if self.state == ConnState::Connecting {
            if let Some(e) = self.sock.take_error().map_err(CloseReason::Connect)? {
                return Err(CloseReason::Connect(e));
            }
            match self.sock.peer_addr() {
                Ok(_) => self.state = ConnState::Handshaking,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(CloseReason::Connect(e)),
            }
        }
        let result = self.read_all(scratch, now);
        if self.state == ConnState::Handshaking && !self.tls.is_handshaking() {
            self.state = ConnState::Ready;
            self.was_ready = true;
        }
        result?;
        self.flush()
    }

    fn read_all(&mut self, scratch: &mut [u8], now: Instant) -> Result<(), CloseReason> {
        let before = self.last_read;
        let result = self.read_loop(scratch, now);
        if self.last_read != before {
            // A server that sends each answer in its own small write
            // without TCP_NODELAY waits for our ACK before the next one.
            crate::client::quick_ack(&self.sock);
        }
        result
    }

    fn read_loop(&mut self, scratch: &mut [u8], now: Instant) -> Result<(), CloseReason> {
        loop {
            let n = match self.sock.read(scratch) {
                Ok(0) => {
                    // Let rustls see the EOF: it tells a clean close_notify
                    // from a truncation attack.
                    let _ = self.tls.read_tls(&mut io::empty());
                    let clean = self.decrypt()?;
                    return Err(CloseReason::Eof { clean });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CloseReason::Io(e)),
            };
            self.last_read = now;
            self.last_active = now;
            let mut input = scratch.get(..n).unwrap_or(&[]);
            while !input.is_empty() {
                match self.tls.read_tls(&mut input) {
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
        let state = match self.tls.process_new_packets() {
            Ok(state) => state,
            Err(e) => {
                // Last gasp: tell the server why (the alert rustls queued).
                let _ = self.tls.write_tls(&mut self.sock);
                return Err(CloseReason::Tls(e));
            }
        };
        let want = state.plaintext_bytes_to_read();
        if want > 0 {
            let buf = self.decoder.spare(want);
            let mut got = 0;
            while got < want {
                match self.tls.reader().read(buf.get_mut(got..).unwrap_or(&mut [])) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            self.decoder.commit(want, got);
        }
        Ok(state.peer_has_closed())
    }

    /// Close politely: close_notify, then a best-effort write.
    pub fn close_notify(&mut self) {
        if self.state != ConnState::Connecting {
            self.tls.send_close_notify();
            let _ = self.flush();
        }
    }

    /// Honour the server's edns-tcp-keepalive TIMEOUT (RFC 7828 §3.2.2):
    /// close before it expires; 0 means send nothing more on this
    /// connection.
    pub fn keepalive(&mut self, timeout: u16) {
        if timeout == 0 {
            self.draining = true;
        } else {
            // Leave a margin so our close_notify beats the server's close.
            let server = Duration::from_millis(u64::from(timeout) * 100);
            self.idle = self.idle.min(server.mul_f32(0.8));
        }
    }

    pub fn resumed(&self) -> bool {
        self.tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }
}
