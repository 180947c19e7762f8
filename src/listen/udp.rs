//! One UDP listener: datagrams in by the batch (`recvmmsg`) until
//! `WouldBlock` or a per-turn limit, so other sockets get their turn;
//! answers collected in an outbox and sent by the batch (`sendmmsg`) when
//! the loop flushes, or as soon as a batch is full.
//!
//! The batches exist because on a cache hit nearly all the time is spent in
//! the kernel, a good part of it entering and leaving it: one system call
//! for up to [`RX_SLOTS`] queries and one for up to [`TX_CHUNK`] answers
//! replaces one each per datagram.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use log::debug;
use mio::net::UdpSocket;

/// Datagrams read per listener per turn before other sockets get a go.
const BATCH: usize = 1024;
/// Answers kept for a socket whose send buffer is full.
const BACKLOG: usize = 4096;
/// Datagrams taken by one `recvmmsg`.
const RX_SLOTS: usize = 32;
/// The first bytes of each receive slot, packed together so a batch of
/// ordinary queries touches a few pages; the rest of each slot, for the
/// rare larger query, lies apart and is touched only when one comes.
const RX_HEAD: usize = 512;
/// The receive slots together stay under this, whatever --max-query-size.
const RX_BYTES: usize = 256 << 10;
/// Answers given to one `sendmmsg`; a full outbox is sent at once rather
/// than at the end of the turn, so a long turn delays no answer for long.
const TX_CHUNK: usize = 64;

pub struct UdpListener {
    sock: UdpSocket,
    rx: Inbox,
    tx: Outbox,
    /// Stopped at the batch limit before `WouldBlock`: revisit next turn.
    more: bool,
    /// Datagrams taken in the current batch.
    taken: usize,
    open: bool,
}

/// The outcome of one receive.
pub enum Recv {
    /// A datagram from this peer, appended to the caller's buffer.
    Datagram(SocketAddr),
    /// Nothing more now (`WouldBlock`).
    Empty,
    /// The batch limit: the socket may have more; come back next turn.
    Batch,
}

/// What became of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// In the outbox, or sent.
    Queued,
    /// The backlog is full: the answer is lost (the client will retry).
    Dropped,
}

/// Datagrams received by the last `recvmmsg`, handed out one by one.
struct Inbox {
    /// `slots` slot heads of [`RX_HEAD`] bytes, then `slots` slot tails of
    /// `slot - RX_HEAD` bytes. Allocated zeroed (fresh pages from the
    /// kernel), so the tails no datagram reaches are never touched.
    buf: Vec<u8>,
    /// One more than the largest query accepted, so that a datagram that
    /// was cut to fit arrives longer than the limit and gets FORMERR, as it
    /// would whole.
    slot: usize,
    slots: usize,
    got: [(usize, Option<SocketAddr>); RX_SLOTS],
    count: usize,
    next: usize,
}

impl Inbox {
    fn new(max_query: usize) -> Inbox {
        let mut i = Inbox {
            buf: Vec::new(),
            slot: 0,
            slots: 0,
            got: [(0, None); RX_SLOTS],
            count: 0,
            next: 0,
        };
        i.size_for(max_query);
        i
    }

    fn size_for(&mut self, max_query: usize) {
        self.slot = max_query + 1;
        self.slots = (RX_BYTES / self.slot).clamp(1, RX_SLOTS);
    }

    /// One `recvmmsg` of up to `want` datagrams.
    fn fill(&mut self, fd: libc::c_int, want: usize) -> io::Result<usize> {
        let n = want.min(self.slots);
        let (head, tail) = self.split();
        let need = (head + tail) * self.slots;
        if self.buf.len() != need {
            self.buf = vec![0; need];
        }
        let (heads, tails) = self.buf.split_at_mut(head * self.slots);
        // SAFETY: all-zero is a valid value for these C structs.
        let mut names: [libc::sockaddr_storage; RX_SLOTS] = unsafe { std::mem::zeroed() };
        let mut iovs: [[libc::iovec; 2]; RX_SLOTS] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; RX_SLOTS] = unsafe { std::mem::zeroed() };
        let mut tails = tails.chunks_exact_mut(tail.max(1));
        for (k, h) in heads.chunks_exact_mut(head).take(n).enumerate() {
            iovs[k][0].iov_base = h.as_mut_ptr().cast();
            iovs[k][0].iov_len = h.len();
            let mut parts = 1;
            if let Some(t) = tails.next().filter(|_| tail > 0) {
                iovs[k][1].iov_base = t.as_mut_ptr().cast();
                iovs[k][1].iov_len = t.len();
                parts = 2;
            }
            let m = &mut hdrs[k].msg_hdr;
            m.msg_name = (&mut names[k] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_iov = iovs[k].as_mut_ptr();
            m.msg_iovlen = parts;
        }
        // SAFETY: the first `n` headers point at live buffers of the stated
        // lengths (slots of `self.buf`, `names`), all outliving the call.
        let got = unsafe { libc::recvmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0, std::ptr::null_mut()) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = (got as usize).min(n);
        for k in 0..got {
            let len = (hdrs[k].msg_len as usize).min(self.slot);
            self.got[k] = (len, from_c(&names[k]));
        }
        self.count = got;
        self.next = 0;
        Ok(got)
    }

    /// The next datagram of the batch, if any: (slot index, length, peer).
    fn pop(&mut self) -> Option<(usize, usize, Option<SocketAddr>)> {
        if self.next >= self.count {
            return None;
        }
        let k = self.next;
        self.next += 1;
        let (len, peer) = self.got[k];
        Some((k, len, peer))
    }

    /// The bytes of a slot in its head and in its tail.
    fn split(&self) -> (usize, usize) {
        let head = self.slot.min(RX_HEAD);
        (head, self.slot - head)
    }

    /// Datagram `k` of `len` bytes, appended to `out`.
    fn copy_into(&self, k: usize, len: usize, out: &mut Vec<u8>) {
        let (head, tail) = self.split();
        let first = len.min(head);
        out.extend_from_slice(self.buf.get(k * head..k * head + first).unwrap_or_default());
        if len > first {
            let at = head * self.slots + k * tail;
            out.extend_from_slice(self.buf.get(at..at + (len - first)).unwrap_or_default());
        }
    }

    fn clear(&mut self) {
        self.count = 0;
        self.next = 0;
    }
}

/// Answers waiting to be sent: their bytes one after another in `data`,
/// and where each one starts, ends and goes.
#[derive(Default)]
struct Outbox {
    data: Vec<u8>,
    items: VecDeque<(SocketAddr, usize, usize)>,
}

impl Outbox {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn push(&mut self, peer: SocketAddr, msg: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(msg);
        self.items.push_back((peer, start, self.data.len()));
    }

    /// Forget the first `n` answers (sent, or failed for good).
    fn consume(&mut self, n: usize) {
        self.items.drain(..n.min(self.items.len()));
        match self.items.front() {
            None => {
                self.data.clear();
                // A burst against a full send buffer may have grown it.
                if self.data.capacity() > 256 << 10 {
                    self.data = Vec::new();
                }
            }
            // Bytes in front of the first waiting answer are dead: drop
            // them once they are half of it, so a socket that never quite
            // empties cannot grow this for ever.
            Some(&(_, first, _)) if first > self.data.len() / 2 => {
                self.data.drain(..first);
                for item in &mut self.items {
                    item.1 -= first;
                    item.2 -= first;
                }
            }
            Some(_) => {}
        }
    }

    /// One `sendmmsg` of up to [`TX_CHUNK`] answers from the front.
    fn send(&self, fd: libc::c_int) -> io::Result<usize> {
        // SAFETY: all-zero is a valid value for these C structs.
        let mut names: [libc::sockaddr_storage; TX_CHUNK] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; TX_CHUNK] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; TX_CHUNK] = unsafe { std::mem::zeroed() };
        let n = self.items.len().min(TX_CHUNK);
        for (k, &(peer, start, end)) in self.items.iter().take(n).enumerate() {
            let msg = self.data.get(start..end).unwrap_or_default();
            iovs[k].iov_base = msg.as_ptr() as *mut libc::c_void;
            iovs[k].iov_len = msg.len();
            let h = &mut hdrs[k].msg_hdr;
            h.msg_namelen = to_c(peer, &mut names[k]);
            h.msg_name = (&mut names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
        }
        // The system call itself: musl's sendmmsg() on 64-bit targets is a
        // loop of sendmsg() (its msghdr differs from the kernel's in
        // padding, which is zero here, so the kernel reads it right).
        // SAFETY: the first `n` headers point at live buffers of the stated
        // lengths, which the kernel only reads.
        let sent = unsafe { libc::syscall(libc::SYS_sendmmsg, fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((sent as usize).min(n))
    }
}

impl UdpListener {
    pub fn new(sock: UdpSocket, max_query: usize) -> UdpListener {
        UdpListener {
            sock,
            rx: Inbox::new(max_query),
            tx: Outbox::default(),
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

    /// --max-query-size changed (reload): size the receive slots for it
    /// from the next batch on.
    pub fn set_max_query(&mut self, max_query: usize) {
        self.rx.size_for(max_query);
    }

    /// Whether a batch was cut short and the socket should be read again.
    pub fn has_more(&self) -> bool {
        self.more && self.open
    }

    /// Stop reading (shutdown); answers still go out.
    pub fn stop_reading(&mut self) {
        self.open = false;
        self.more = false;
        self.rx.clear();
    }

    /// Start a new batch of reads.
    pub fn begin(&mut self) {
        self.taken = 0;
    }

    /// Receive one datagram, appended to `out`.
    pub fn recv(&mut self, out: &mut Vec<u8>) -> Recv {
        if !self.open {
            return Recv::Empty;
        }
        loop {
            if let Some((k, len, peer)) = self.rx.pop() {
                // A sender the kernel names in a family we do not speak
                // cannot be answered.
                let Some(peer) = peer else { continue };
                self.rx.copy_into(k, len, out);
                return Recv::Datagram(peer);
            }
            if self.taken >= BATCH {
                self.more = true;
                return Recv::Batch;
            }
            match self.rx.fill(self.sock.as_raw_fd(), BATCH - self.taken) {
                Ok(0) => {
                    self.more = false;
                    return Recv::Empty;
                }
                Ok(n) => self.taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.more = false;
                    return Recv::Empty;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP errors from earlier sends surface here; they concern
                // one peer, not the socket. Counted against the batch so a
                // socket that keeps failing cannot hold the loop.
                Err(e) => {
                    debug!("udp recv: {e}");
                    self.taken += 1;
                }
            }
        }
    }

    /// Queue an answer; it goes out at the next [`flush`](Self::flush), or
    /// now if the outbox holds a full batch.
    pub fn send(&mut self, peer: SocketAddr, msg: &[u8]) -> Send {
        if self.tx.len() >= BACKLOG {
            return Send::Dropped;
        }
        self.tx.push(peer, msg);
        if self.tx.len() >= TX_CHUNK {
            self.flush();
        }
        Send::Queued
    }

    /// Answers waiting in the outbox.
    pub fn pending(&self) -> usize {
        self.tx.len()
    }

    /// Send what waits in the outbox, until the socket is full again.
    pub fn flush(&mut self) {
        let fd = self.sock.as_raw_fd();
        while self.tx.len() > 0 {
            match self.tx.send(fd) {
                Ok(n) => self.tx.consume(n.max(1)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The error is the first answer's (an address the kernel
                // will not send to): that one is lost, the rest go on.
                Err(e) => {
                    debug!("udp send: {e}");
                    self.tx.consume(1);
                }
            }
        }
    }
}

fn from_c(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in,
            // which is smaller than sockaddr_storage and less aligned.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_c(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // socket address; all-zero bytes are a valid sockaddr_in.
            let s = unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let s = unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdp;
    use std::time::{Duration, Instant};

    fn pair() -> (UdpListener, StdUdp) {
        let std = StdUdp::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let sock = UdpSocket::from_std(std);
        // The tests send whole bursts before reading any of it.
        crate::listen::socket::set_rcvbuf(&sock, crate::listen::socket::UDP_RCVBUF);
        let l = UdpListener::new(sock, 4096);
        let peer = StdUdp::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        peer.connect(l.local_addr().unwrap()).unwrap();
        (l, peer)
    }

    /// Receive until `n` datagrams arrived or two seconds passed.
    fn take(l: &mut UdpListener, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let until = Instant::now() + Duration::from_secs(2);
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < until {
            l.begin();
            let mut buf = Vec::new();
            while let Recv::Datagram(peer) = l.recv(&mut buf) {
                got.push((std::mem::take(&mut buf), peer));
            }
        }
        got
    }

    #[test]
    fn datagrams_arrive_whole_in_order_with_their_sender() {
        let (mut l, peer) = pair();
        let me = peer.local_addr().unwrap();
        // More than one recvmmsg batch, sizes from empty to the limit.
        let sent: Vec<Vec<u8>> = (0..100u32).map(|i| vec![i as u8; (i as usize * 41) % 4097]).collect();
        for m in &sent {
            peer.send(m).unwrap();
        }
        let got = take(&mut l, sent.len());
        assert_eq!(got.len(), sent.len());
        for (g, s) in got.iter().zip(&sent) {
            assert_eq!(&g.0, s);
            assert_eq!(g.1, me);
        }
    }

    #[test]
    fn a_datagram_over_the_limit_arrives_longer_than_the_limit() {
        let (mut l, peer) = pair();
        peer.send(&[7u8; 6000]).unwrap();
        let got = take(&mut l, 1);
        assert_eq!(got.len(), 1);
        // Cut to the slot, one byte over --max-query-size: still FORMERR.
        assert_eq!(got[0].0.len(), 4097);
    }

    #[test]
    fn a_raised_limit_takes_larger_datagrams_whole() {
        let (mut l, peer) = pair();
        l.set_max_query(65_535);
        peer.send(&[9u8; 20_000]).unwrap();
        let got = take(&mut l, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.len(), 20_000);
    }

    #[test]
    fn at_the_smallest_limit_a_slot_is_its_head_and_one_byte() {
        let (mut l, peer) = pair();
        l.set_max_query(512);
        peer.send(&[1u8; 512]).unwrap();
        peer.send(&[2u8; 600]).unwrap();
        let got = take(&mut l, 2);
        assert_eq!(got[0].0, vec![1u8; 512]);
        assert_eq!(got[1].0, vec![2u8; 513]);
    }

    #[test]
    fn the_batch_limit_stops_a_turn_and_asks_for_another() {
        let (mut l, peer) = pair();
        for i in 0..(BATCH + 10) {
            peer.send(&(i as u32).to_be_bytes()).unwrap();
        }
        // Wait until the kernel holds them all, then read one turn.
        let mut n = 0;
        l.begin();
        let mut buf = Vec::new();
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            match l.recv(&mut buf) {
                Recv::Datagram(_) => n += 1,
                Recv::Batch => break,
                Recv::Empty if Instant::now() < until => l.begin(),
                Recv::Empty => panic!("only {n} datagrams"),
            }
        }
        assert!(l.has_more());
        assert!(n >= BATCH);
        let rest = take(&mut l, BATCH + 10 - n);
        assert_eq!(n + rest.len(), BATCH + 10);
        assert!(!l.has_more());
    }

    #[test]
    fn answers_wait_for_the_flush_and_then_all_arrive_in_order() {
        let (mut l, peer) = pair();
        let to = peer.local_addr().unwrap();
        for i in 0..10u8 {
            assert_eq!(l.send(to, &[i; 3]), Send::Queued);
        }
        assert_eq!(l.pending(), 10);
        l.flush();
        assert_eq!(l.pending(), 0);
        let mut buf = [0u8; 16];
        for i in 0..10u8 {
            let n = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 3]);
        }
    }

    #[test]
    fn a_full_batch_goes_out_without_waiting_for_the_flush() {
        let (mut l, peer) = pair();
        let to = peer.local_addr().unwrap();
        for i in 0..TX_CHUNK {
            l.send(to, &(i as u16).to_be_bytes());
        }
        assert_eq!(l.pending(), 0);
        let mut buf = [0u8; 4];
        assert_eq!(peer.recv(&mut buf).unwrap(), 2);
    }

    #[test]
    fn an_unsendable_answer_is_dropped_and_the_rest_go_out() {
        let (mut l, peer) = pair();
        let to = peer.local_addr().unwrap();
        // An IPv6 destination on an IPv4 socket: EAFNOSUPPORT or EINVAL.
        l.send("[::1]:53".parse().unwrap(), b"lost");
        l.send(to, b"kept");
        l.flush();
        assert_eq!(l.pending(), 0);
        let mut buf = [0u8; 8];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"kept");
    }

    #[test]
    fn a_full_backlog_drops_and_the_outbox_memory_stays_bounded() {
        let mut o = Outbox::default();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // A socket that takes one answer in two: the bytes in front of the
        // first waiting answer are reclaimed as it goes.
        for round in 0..10_000 {
            o.push(to, &[1u8; 100]);
            o.push(to, &[2u8; 100]);
            o.consume(1);
            assert!(o.data.len() <= 2 * 100 * (o.len() + 1), "round {round}");
        }
        assert_eq!(o.len(), 10_000);
        let (_, s, e) = o.items[0];
        assert_eq!(e - s, 100);
        o.consume(o.len());
        assert!(o.data.is_empty());
    }

    #[test]
    fn addresses_survive_the_c_round_trip() {
        for a in [
            "127.0.0.1:53",
            "10.1.2.3:65535",
            "[::1]:853",
            "[fe80::1%2]:5353",
            "[::ffff:1.2.3.4]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            to_c(a, &mut ss);
            assert_eq!(from_c(&ss), Some(a));
        }
    }
}
