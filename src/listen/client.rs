//! One DNS-over-TCP client connection (RFC 7766): framed queries in,
//! framed answers out, in any order and with partial reads and writes.
//!
//! The connection moves bytes and keeps its own counts (queries taken, in
//! flight, idle time); it says what should happen next ([`NextQuery`],
//! [`Delivered`]) and the client table acts on it. What a frame means is
//! the loop's business.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

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

pub struct Client {
    gen: u32,
    peer: SocketAddr,
    sock: TcpStream,
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
    pub fn new(sock: TcpStream, peer: SocketAddr, gen: u32, now: Instant) -> Self {
        let _ = sock.set_nodelay(true);
        Client {
            gen,
            peer,
            sock,
            decoder: FrameDecoder::default(),
            out: Vec::new(),
            written: 0,
            in_flight: 0,
            queries: 0,
            last_active: now,
            stalled_since: None,
            eof: false,
            paused: false,
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

    fn read_inner(&mut self, got_any: &mut bool) -> io::Result<ReadOutcome> {
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
        self.out.clear();
        self.written = 0;
        self.stalled_since = None;
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Nothing more will happen on this connection.
    pub fn finished(&self) -> bool {
        self.eof && self.in_flight == 0 && self.pending_out() == 0
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
