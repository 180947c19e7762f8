//! One DNS-over-TCP client connection (RFC 7766): framed queries in,
//! framed answers out, in any order and with partial reads and writes;
//! over TLS (RFC 7858) when it came in on a `--listen-tls` listener, with
//! the same framing, limits and idle rules.
//!
//! The connection moves bytes and keeps its own counts (queries taken, in
//! flight, idle time); it says what should happen next ([`NextQuery`],
//! [`Delivered`]) and the client table acts on it. What a frame means is
//! the loop's business.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use rustls::ServerConnection;

use crate::framing::FrameDecoder;

/// Stop reading from a client whose undecoded input reaches this: it is
/// sending faster than its answers come back.
const MAX_BUFFERED_IN: usize = 64 * 1024 + 2;
/// A client that does not read its answers loses its connection once this
/// much output is waiting (the kernel's send buffer holds more).
pub const MAX_BUFFERED_OUT: usize = 512 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Everything readable was read.
    Drained,
    /// Reading paused (input buffer full); resume when frames are consumed.
    Paused,
    /// The client half-closed: answer what is in flight, then close.
    Eof,
}

/// Acknowledge what was read at once. A client that writes small queries
/// without TCP_NODELAY (dnsperf does) holds its next ones back until the
/// last is acknowledged (Nagle); with delayed ACKs that costs up to 40 ms
/// per round. Linux turns quick ACKs off again by itself, hence per read.
pub fn quick_ack(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_quickack(true);
}

/// What became of a TLS client's handshake, reported once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    Done,
    Failed(String),
}

/// Bytes handed to rustls at a time: about one TLS record. The rest stays
/// in `out`, where the slow-reader limits count it.
const TLS_CHUNK: usize = 16 * 1024;

pub struct Client {
    gen: u32,
    peer: SocketAddr,
    sock: TcpStream,
    /// DNS over TLS: the session over the socket.
    tls: Option<Box<ServerConnection>>,
    /// The handshake's outcome, not yet taken by the table.
    handshake: Option<Handshake>,
    decoder: FrameDecoder,
    out: Vec<u8>,
    written: usize,
    in_flight: u32,
    /// Queries taken from this connection so far.
    queries: u64,
    last_active: Instant,
    /// Since when output has been waiting without any of it being written:
    /// a client that stops reading is closed after the idle time.
    stalled_since: Option<Instant>,
    /// The client half-closed, or used its quota: answer what is in
    /// flight, then close.
    eof: bool,
    /// Reading stopped because the input buffer is full.
    paused: bool,
    /// The TLS handshake finished (reported once).
    handshaken: bool,
    /// On the table's flush list this turn.
    dirty: bool,
}

/// What the next buffered frame of a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextQuery {
    /// A whole query is in the frame buffer.
    Query,
    /// Nothing to take now: no whole frame yet, or its pipeline is full.
    Wait,
    /// Done: close it (`true` when the stream lost its framing: a frame
    /// shorter than a header has no ID to answer and cannot be
    /// resynchronised, RFC 7766 §8).
    Close { bad_frame: bool },
}

/// What became of an answer given to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Queued; `resume` when the client was held at its pipeline cap or
    /// paused and may now have more queries to take.
    Queued { resume: bool },
    /// The client does not read its answers: close it.
    TooSlow,
}

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_pipeline: u32,
    /// 0 = no limit.
    pub max_queries: u64,
    pub idle: Duration,
}

impl Client {
    pub fn new(sock: TcpStream, peer: SocketAddr, gen: u32, tls: Option<ServerConnection>, now: Instant) -> Self {
        let _ = sock.set_nodelay(true);
        Client {
            gen,
            peer,
            sock,
            tls: tls.map(Box::new),
            handshake: None,
            decoder: FrameDecoder::default(),
            out: Vec::new(),
            written: 0,
            in_flight: 0,
            queries: 0,
            last_active: now,
            stalled_since: None,
            eof: false,
            paused: false,
            handshaken: false,
            dirty: false,
        }
    }

    pub fn source(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub fn gen(&self) -> u32 {
        self.gen
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    pub fn clear_dirty(&mut self) {
        self.dirty = false;
    }

    pub fn read(&mut self) -> io::Result<ReadOutcome> {
        let mut got_any = false;
        let outcome = self.read_inner(&mut got_any);
        if got_any {
            quick_ack(&self.sock);
        }
        outcome
    }

    /// The handshake's outcome, once, when there is news of it.
    pub fn take_handshake(&mut self) -> Option<Handshake> {
        self.handshake.take()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// TLS records (a handshake flight, an alert) wait to be written.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    fn read_inner(&mut self, got_any: &mut bool) -> io::Result<ReadOutcome> {
        if self.tls.is_some() {
            return self.read_tls(got_any);
        }
        loop {
            if self.decoder.buffered() >= MAX_BUFFERED_IN {
                self.paused = true;
                return Ok(ReadOutcome::Paused);
            }
            let buf = self.decoder.spare(4096);
            let res = self.sock.read(buf);
            let got = *res.as_ref().unwrap_or(&0);
            self.decoder.commit(4096, got);
            match res {
                Ok(0) => {
                    self.eof = true;
                    return Ok(ReadOutcome::Eof);
                }
                // Bytes alone do not count as activity: a query trickled in
                // a byte at a time must still finish within the idle time.
                Ok(_) => *got_any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.paused = false;
                    return Ok(ReadOutcome::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn read_tls(&mut self, got_any: &mut bool) -> io::Result<ReadOutcome> {
        let mut buf = [0u8; 4096];
        loop {
            if self.decoder.buffered() >= MAX_BUFFERED_IN {
                self.paused = true;
                return Ok(ReadOutcome::Paused);
            }
            let n = match self.sock.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(ReadOutcome::Eof);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.paused = false;
                    return Ok(ReadOutcome::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            *got_any = true;
            let Some(tls) = self.tls.as_mut() else {
                return Ok(ReadOutcome::Drained);
            };
            let mut input = buf.get(..n).unwrap_or_default();
            while !input.is_empty() {
                tls.read_tls(&mut input)?;
                let state = match tls.process_new_packets() {
                    Ok(state) => state,
                    Err(e) => {
                        if tls.is_handshaking() {
                            self.handshake = Some(Handshake::Failed(e.to_string()));
                        }
                        // The alert rustls queued tells the client why.
                        let _ = tls.write_tls(&mut self.sock);
                        return Err(io::Error::other(format!("TLS: {e}")));
                    }
                };
                if self.handshake.is_none() && !tls.is_handshaking() && !self.handshaken {
                    self.handshaken = true;
                    self.handshake = Some(Handshake::Done);
                }
                let want = state.plaintext_bytes_to_read();
                if want > 0 {
                    self.decoder.read_from(&mut tls.reader(), want);
                }
                if state.peer_has_closed() {
                    self.eof = true;
                    return Ok(ReadOutcome::Eof);
                }
            }
        }
    }

    /// Move the next whole query into `frame`, if the client may send one
    /// now. Reading resumes here when it was paused for a full buffer.
    pub fn next_query(&mut self, frame: &mut Vec<u8>, limits: &ClientLimits, reading: bool, now: Instant) -> NextQuery {
        loop {
            if self.in_flight >= limits.max_pipeline {
                return NextQuery::Wait;
            }
            if limits.max_queries > 0 && self.queries >= limits.max_queries {
                // Its quota is used (a guard against endless connections,
                // CVE-2025-30193): answer what is in flight, take nothing
                // more, close.
                self.eof = true;
                return if self.finished() {
                    NextQuery::Close { bad_frame: false }
                } else {
                    NextQuery::Wait
                };
            }
            match self.decoder.next_into(frame) {
                Ok(true) => {
                    self.queries += 1;
                    self.in_flight += 1;
                    self.last_active = now;
                    return NextQuery::Query;
                }
                Ok(false) if self.paused && reading => match self.read() {
                    Ok(ReadOutcome::Drained | ReadOutcome::Eof) => {}
                    Ok(ReadOutcome::Paused) => return NextQuery::Wait,
                    Err(_) => return NextQuery::Close { bad_frame: false },
                },
                Ok(false) if self.finished() => return NextQuery::Close { bad_frame: false },
                Ok(false) => return NextQuery::Wait,
                Err(_) => return NextQuery::Close { bad_frame: true },
            }
        }
    }

    /// A query taken by [`next_query`](Self::next_query) goes unanswered
    /// (dropped as malformed): it no longer counts in flight.
    pub fn dropped(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Queue the answer to one query taken from this client (every query
    /// taken counts in flight until answered or dropped); `max_pipeline`
    /// tells whether the client was held at its cap.
    pub fn deliver(&mut self, msg: &[u8], max_pipeline: u32, now: Instant) -> Delivered {
        let held = self.in_flight >= max_pipeline || self.paused;
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.pending_out() + 2 + msg.len() > MAX_BUFFERED_OUT {
            return Delivered::TooSlow;
        }
        // Written bytes leave the buffer once they are half of it: the
        // buffer stays within twice what is pending, however long a slow
        // reader keeps a backlog (amortised, each byte moves once).
        if self.written > 0 && self.written * 2 >= self.out.len() {
            self.out.drain(..self.written);
            self.written = 0;
        }
        if self.pending_out() == 0 {
            self.stalled_since = Some(now);
        }
        crate::framing::push_frame(&mut self.out, msg);
        Delivered::Queued { resume: held }
    }

    pub fn pending_out(&self) -> usize {
        self.out.len() - self.written
    }

    /// Write what is queued until done or the socket is full; returns the
    /// bytes written.
    pub fn flush(&mut self, now: Instant) -> io::Result<usize> {
        let before = self.pending_out();
        self.write_out(now)?;
        Ok(before - self.pending_out())
    }

    fn write_out(&mut self, now: Instant) -> io::Result<()> {
        if self.tls.is_some() {
            return self.write_tls(now);
        }
        while self.written < self.out.len() {
            match self.sock.write(self.out.get(self.written..).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.last_active = now;
                    self.stalled_since = Some(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.all_written();
        Ok(())
    }

    fn all_written(&mut self) {
        self.out.clear();
        self.written = 0;
        self.stalled_since = None;
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
    }

    /// Encrypt what is queued a record at a time, each only once rustls
    /// has written the one before: what the socket does not take stays in
    /// `out`, counted against the slow-reader limits.
    fn write_tls(&mut self, now: Instant) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else { return Ok(()) };
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut self.sock) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => self.stalled_since = Some(now),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if self.written >= self.out.len() || tls.is_handshaking() {
                break;
            }
            let end = (self.written + TLS_CHUNK).min(self.out.len());
            tls.writer()
                .write_all(self.out.get(self.written..end).unwrap_or_default())?;
            self.written = end;
            self.last_active = now;
        }
        if self.written >= self.out.len() {
            self.all_written();
        }
        Ok(())
    }

    /// A polite end for a TLS client: close_notify, as far as the socket
    /// takes it now.
    pub fn close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            while tls.wants_write() {
                if tls.write_tls(&mut self.sock).is_err() {
                    break;
                }
            }
        }
    }

    /// Nothing more will happen on this connection.
    pub fn finished(&self) -> bool {
        self.eof && self.in_flight == 0 && self.pending_out() == 0 && !self.wants_write()
    }

    /// The idle check for `now`: close when it completed no query and had
    /// nothing in flight or pending for the idle time, or when its pending
    /// output made no progress for the idle time (it stopped reading);
    /// else when to look again.
    pub fn idle_check(&self, idle: Duration, now: Instant) -> IdleCheck {
        if let Some(since) = self.stalled_since.filter(|_| self.pending_out() > 0) {
            if since + idle <= now {
                return IdleCheck::StoppedReading;
            }
            return IdleCheck::Again((since + idle).max(now + Duration::from_millis(100)));
        }
        let due = self.last_active + idle;
        if self.in_flight == 0 && due <= now {
            return IdleCheck::Idle;
        }
        IdleCheck::Again(due.max(now + Duration::from_millis(100)))
    }

    /// Whether nothing is under way: no complete query in flight, no answer
    /// pending (a partial frame does not count). Such a connection may be
    /// evicted for a newcomer (RFC 7766 §6.2.3).
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.pending_out() == 0
    }

    pub fn last_active(&self) -> Instant {
        self.last_active
    }
}

/// What the idle timer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleCheck {
    Again(Instant),
    Idle,
    StoppedReading,
}
