//! One UDP listener: datagrams in until `WouldBlock` (or a batch limit, so
//! other sockets get their turn), answers out, and a bounded backlog for
//! answers the kernel's send buffer could not take.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use log::debug;
use mio::net::UdpSocket;

/// Datagrams read per listener per turn before other sockets get a go.
const BATCH: usize = 1024;
/// Answers kept for a socket whose send buffer is full.
const BACKLOG: usize = 4096;

pub struct UdpListener {
    sock: UdpSocket,
    backlog: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Stopped at the batch limit before `WouldBlock`: revisit next turn.
    more: bool,
    /// Datagrams read in the current batch.
    taken: usize,
    open: bool,
}

/// The outcome of one receive.
pub enum Recv {
    Datagram(usize, SocketAddr),
    /// Nothing more now (`WouldBlock`).
    Empty,
    /// The batch limit: the socket may have more; come back next turn.
    Batch,
}

/// What became of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    Sent,
    Queued,
    /// The backlog is full: the answer is lost (the client will retry).
    Dropped,
}

impl UdpListener {
    pub fn new(sock: UdpSocket) -> UdpListener {
        UdpListener {
            sock,
            backlog: VecDeque::new(),
            more: false,
            taken: 0,
            open: true,
        }
    }

    pub fn source(&mut self) -> &mut UdpSocket {
        &mut self.sock
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Whether a batch was cut short and the socket should be read again.
    pub fn has_more(&self) -> bool {
        self.more && self.open
    }

    /// Stop reading (shutdown); answers still go out.
    pub fn stop_reading(&mut self) {
        self.open = false;
        self.more = false;
    }

    /// Start a new batch of reads.
    pub fn begin(&mut self) {
        self.taken = 0;
    }

    /// Receive one datagram into `buf`.
    pub fn recv(&mut self, buf: &mut [u8]) -> Recv {
        if !self.open {
            return Recv::Empty;
        }
        loop {
            if self.taken >= BATCH {
                self.more = true;
                return Recv::Batch;
            }
            match self.sock.recv_from(buf) {
                Ok((n, peer)) => {
                    self.taken += 1;
                    return Recv::Datagram(n, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.more = false;
                    return Recv::Empty;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP errors from earlier sends surface here; they concern
                // one peer, not the socket.
                Err(e) => debug!("udp recv: {e}"),
            }
        }
    }

    pub fn send(&mut self, peer: SocketAddr, msg: &[u8]) -> Send {
        if self.backlog.is_empty() {
            match self.sock.send_to(msg, peer) {
                Ok(_) => return Send::Sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!("udp send to {peer}: {e}");
                    return Send::Sent;
                }
            }
        }
        if self.backlog.len() < BACKLOG {
            self.backlog.push_back((peer, msg.to_vec()));
            Send::Queued
        } else {
            Send::Dropped
        }
    }

    /// Send what waits in the backlog, until the socket is full again.
    pub fn flush(&mut self) {
        while let Some((peer, msg)) = self.backlog.front() {
            match self.sock.send_to(msg, *peer) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                _ => {
                    self.backlog.pop_front();
                }
            }
        }
    }
}
