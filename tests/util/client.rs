//! Plain DNS clients (UDP and framed TCP) with deadlines, to talk to the
//! proxy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use super::dns;

/// `Instant::now() + ms`.
pub fn deadline_ms(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// Polls `f` every 2 ms until it holds or the deadline passes.
pub fn wait_until(deadline: Instant, mut f: impl FnMut() -> bool) -> bool {
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Time left until `deadline`, at least 1 ms (a zero timeout is an error
/// for set_read_timeout).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A UDP socket on 127.0.0.1:0.
pub fn udp_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind udp client")
}

/// Receives one datagram before `deadline` (any sender).
pub fn udp_recv(sock: &UdpSocket, deadline: Instant) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // Bounded by the deadline: each turn waits at most the time left.
    loop {
        if Instant::now() >= deadline {
            return None;
        }
        sock.set_read_timeout(Some(left(deadline))).ok()?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return Some(buf[..n].to_vec()),
            Err(e) if is_timeout(&e) => continue,
            Err(_) => return None,
        }
    }
}

/// Sends `query` from a fresh socket and returns the first datagram whose
/// ID matches the query's, before `deadline`.
pub fn udp_exchange(addr: SocketAddr, query: &[u8], deadline: Instant) -> Option<Vec<u8>> {
    let sock = udp_socket();
    udp_exchange_on(&sock, addr, query, deadline)
}

/// Like `udp_exchange` on a given socket; datagrams with other IDs are
/// skipped.
pub fn udp_exchange_on(sock: &UdpSocket, addr: SocketAddr, query: &[u8], deadline: Instant) -> Option<Vec<u8>> {
    sock.send_to(query, addr).expect("udp send");
    let id = dns::msg_id(query);
    // Bounded: udp_recv returns None at the deadline.
    loop {
        let r = udp_recv(sock, deadline)?;
        if dns::msg_id(&r) == id {
            return Some(r);
        }
    }
}

/// TCP DNS client with 2-byte framing.
pub struct TcpClient {
    pub stream: TcpStream,
    inbuf: Vec<u8>,
    eof: bool,
}

/// What `TcpClient::next_event` saw.
#[derive(Debug, PartialEq, Eq)]
pub enum TcpEvent {
    Frame(Vec<u8>),
    Timeout,
    /// The proxy closed the connection (FIN); `leftover` unframed bytes.
    Closed {
        leftover: usize,
    },
    Error(String),
}

impl TcpClient {
    pub fn connect(addr: SocketAddr) -> TcpClient {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("tcp connect to proxy");
        TcpClient::from_stream(stream)
    }

    /// Wraps a connected stream (e.g. one bound to another source address).
    pub fn from_stream(stream: TcpStream) -> TcpClient {
        stream.set_nodelay(true).ok();
        stream.set_write_timeout(Some(Duration::from_secs(5))).ok();
        TcpClient {
            stream,
            inbuf: Vec::new(),
            eof: false,
        }
    }

    /// Sends one framed message.
    pub fn send(&mut self, msg: &[u8]) {
        self.send_raw(&dns::frame(msg));
    }

    /// Sends all messages framed, in ONE write call.
    pub fn send_many(&mut self, msgs: &[Vec<u8>]) {
        let mut buf = Vec::new();
        for m in msgs {
            buf.extend_from_slice(&dns::frame(m));
        }
        self.send_raw(&buf);
    }

    /// Writes raw bytes (write_all: partial writes are continued).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("tcp write to proxy");
    }

    /// Writes `bytes` in pieces split at the given offsets, pausing `pause`
    /// between pieces (to exercise partial reads in the proxy).
    pub fn send_split(&mut self, bytes: &[u8], cuts: &[usize], pause: Duration) {
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let c = c.clamp(start, bytes.len());
            if c > start {
                self.send_raw(&bytes[start..c]);
                thread::sleep(pause);
            }
            start = c;
        }
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// The next frame, or how the stream ended, before `deadline`.
    pub fn next_event(&mut self, deadline: Instant) -> TcpEvent {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(f) = take_one(&mut self.inbuf) {
                return TcpEvent::Frame(f);
            }
            if self.eof {
                return TcpEvent::Closed {
                    leftover: self.inbuf.len(),
                };
            }
            if Instant::now() >= deadline {
                return TcpEvent::Timeout;
            }
            if self.stream.set_read_timeout(Some(left(deadline))).is_err() {
                return TcpEvent::Error("set_read_timeout".into());
            }
            match self.stream.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) => return TcpEvent::Error(e.to_string()),
            }
        }
    }

    /// The next frame before `deadline`; `None` on timeout/close/error.
    pub fn recv(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        match self.next_event(deadline) {
            TcpEvent::Frame(f) => Some(f),
            _ => None,
        }
    }

    /// Up to `n` frames before `deadline` (fewer if it passes or the stream
    /// ends).
    pub fn recv_n(&mut self, n: usize, deadline: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.recv(deadline) {
                Some(f) => out.push(f),
                None => break,
            }
        }
        out
    }

    /// One framed query, one answer with the same ID.
    pub fn exchange(&mut self, msg: &[u8], deadline: Instant) -> Option<Vec<u8>> {
        self.send(msg);
        let id = dns::msg_id(msg);
        // Bounded: recv returns None at the deadline.
        loop {
            let r = self.recv(deadline)?;
            if dns::msg_id(&r) == id {
                return Some(r);
            }
        }
    }
}

fn take_one(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    if buf.len() < 2 {
        return None;
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if buf.len() < 2 + len {
        return None;
    }
    let f = buf[2..2 + len].to_vec();
    buf.drain(..2 + len);
    Some(f)
}

/// One query over a fresh TCP connection.
pub fn tcp_exchange(addr: SocketAddr, msg: &[u8], deadline: Instant) -> Option<Vec<u8>> {
    TcpClient::connect(addr).exchange(msg, deadline)
}

/// Result of `udp_bulk`.
#[derive(Debug, Default)]
pub struct UdpBulk {
    /// Answer per query (same index), `None` if none came.
    pub answers: Vec<Option<Vec<u8>>>,
    /// Queries sent again because no answer came in time.
    pub retransmits: usize,
    /// Datagrams matching no outstanding query (unknown ID, duplicates).
    pub stray: Vec<Vec<u8>>,
}

impl UdpBulk {
    pub fn answered(&self) -> usize {
        self.answers.iter().filter(|a| a.is_some()).count()
    }
}

/// Every query of a bulk run was answered NOERROR for its own name
/// (`name(i)` is query i's), and no datagram came that matched no
/// outstanding query (a second answer, or one for another client).
pub fn assert_bulk_ok(r: &UdpBulk, name: impl Fn(usize) -> String, what: &str) {
    for (i, a) in r.answers.iter().enumerate() {
        let a = a
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: query {i} unanswered ({} answered)", r.answered()));
        let m = dns::Message::must(a);
        assert_eq!(m.rcode, dns::RCODE_NOERROR, "{what}: query {i}: rcode");
        assert_eq!(m.qname(), name(i), "{what}: query {i}: answer for another name");
    }
    assert!(r.stray.is_empty(), "{what}: {} stray answers", r.stray.len());
}

/// Sends `queries` (IDs must be distinct) from one socket to `addr`, with at
/// most `window` outstanding; an unanswered query is sent again after
/// `retransmit_after` (at most 3 times) if given. Returns when all are
/// answered or at `deadline`.
pub fn udp_bulk(
    addr: SocketAddr,
    queries: &[Vec<u8>],
    window: usize,
    retransmit_after: Option<Duration>,
    deadline: Instant,
) -> UdpBulk {
    let sock = udp_socket();
    super::net::set_udp_rcvbuf(&sock, 8 << 20);
    sock.connect(addr).expect("udp connect");
    let mut index = std::collections::HashMap::new();
    for (i, q) in queries.iter().enumerate() {
        let id = dns::msg_id(q).expect("query has an ID");
        assert!(index.insert(id, i).is_none(), "duplicate query ID {id}");
    }
    let mut out = UdpBulk {
        answers: vec![None; queries.len()],
        ..UdpBulk::default()
    };
    let mut sent_at: Vec<Option<Instant>> = vec![None; queries.len()];
    let mut tries = vec![0u32; queries.len()];
    let (mut next, mut outstanding, mut done) = (0usize, 0usize, 0usize);
    let mut buf = vec![0u8; 65536];
    // Bounded by the deadline.
    while done < queries.len() && Instant::now() < deadline {
        while outstanding < window.max(1) && next < queries.len() {
            // A full socket buffer (ENOBUFS/EAGAIN) counts as a loss.
            let _ = sock.send(&queries[next]);
            sent_at[next] = Some(Instant::now());
            tries[next] = 1;
            next += 1;
            outstanding += 1;
        }
        let wait = left(deadline).min(Duration::from_millis(100));
        sock.set_read_timeout(Some(wait)).expect("set_read_timeout");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let r = buf[..n].to_vec();
                match dns::msg_id(&r).and_then(|id| index.get(&id).copied()) {
                    Some(i) if sent_at[i].is_some() && out.answers[i].is_none() => {
                        out.answers[i] = Some(r);
                        done += 1;
                        outstanding -= 1;
                    }
                    _ => out.stray.push(r),
                }
            }
            Err(e) if is_timeout(&e) => {}
            // e.g. ECONNREFUSED from an ICMP error: keep going until deadline.
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
        if let Some(after) = retransmit_after {
            let now = Instant::now();
            for i in 0..next {
                if out.answers[i].is_none()
                    && tries[i] < 4
                    && sent_at[i].is_some_and(|t| now.duration_since(t) >= after)
                {
                    let _ = sock.send(&queries[i]);
                    sent_at[i] = Some(now);
                    tries[i] += 1;
                    out.retransmits += 1;
                }
            }
        }
    }
    out
}
