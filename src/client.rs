//! One DNS-over-TCP client connection (RFC 7766): framed queries in,
//! framed answers out, in any order and with partial reads and writes.
//!
//! The connection only moves bytes. The proxy decides what a frame means,
//! when a client has too much in flight, and when it is closed.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::framing::FrameDecoder;

/// Stop reading from a client whose undecoded input reaches this: it is
/// sending faster than its answers come back.
const MAX_BUFFERED_IN: usize = 64 * 1024 + 2;
/// A client that does not read its answers loses its connection once this
/// much output is waiting.
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
    pub gen: u32,
    pub peer: SocketAddr,
    sock: TcpStream,
    pub decoder: FrameDecoder,
    out: Vec<u8>,
    written: usize,
    pub in_flight: u32,
    /// Queries taken from this connection so far.
    pub queries: u64,
    pub last_active: Instant,
    pub eof: bool,
    pub paused: bool,
    pub dirty: bool,
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
            eof: false,
            paused: false,
            dirty: false,
        }
    }

    pub fn source(&mut self) -> &mut TcpStream {
        &mut self.sock
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

    pub fn push_answer(&mut self, msg: &[u8]) {
        crate::framing::push_frame(&mut self.out, msg);
    }

    pub fn pending_out(&self) -> usize {
        self.out.len() - self.written
    }

    /// Write what is queued until done or the socket is full.
    pub fn flush(&mut self, now: Instant) -> io::Result<()> {
        while self.written < self.out.len() {
            match self.sock.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.last_active = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Nothing more will happen on this connection.
    pub fn finished(&self) -> bool {
        self.eof && self.in_flight == 0 && self.pending_out() == 0
    }
}
