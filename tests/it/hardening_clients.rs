//! Hardening, clients: slow, silent, crowding and numerous clients.
//!
//! This module is the specification of the limits dotproxy keeps against
//! hostile TCP and UDP clients (README, "Security and limits"): each test's
//! `///` comment states one limit, the test checks it from outside.
//!
//! - Slow readers: a client's answer buffer frees written bytes as it goes
//!   (memory follows the backlog, not the traffic); at most 512 KiB of
//!   answers wait for one connection (over it: closed, `too_slow`).
//! - A client that stops reading is closed once its pending answers make
//!   no progress for `--tcp-idle-timeout` (`stopped_reading`).
//! - Crowded slots: at a connection limit the connection idle longest is
//!   evicted for a newcomer (`evicted`); a newcomer is refused only when
//!   every connection is busy.
//! - Per-address limits: loopback is exempt by default (`--per-ip-exempt`),
//!   `--max-inflight-per-ip` defaults to 5000, IPv6 is grouped by prefix.
//! - Descriptors: the soft RLIMIT_NOFILE is raised to the hard limit, and
//!   `--max-tcp-clients` lowered to leave room for listeners, upstream
//!   connections and the metrics server; running out of descriptors on an
//!   upstream connect is not the upstream's failure.
//!
//! Backlogs are measured where they live: on Linux the proxy's socket send
//! buffer autotunes to hold from a few hundred KiB up to 4 MiB of answers,
//! so a client's unread bytes are split between the kernel (the proxy's
//! send queue, the client's receive queue, both read from /proc/net/tcp)
//! and the proxy's own buffer, which is what these limits are about.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::client::udp_bulk;
use crate::util::dns::{frame, take_frames, Message, RCODE_NOERROR};
use crate::util::metrics::{http_raw, Metrics};
use crate::util::net::tcp_connect_from;
use crate::util::proxy::{count_fds, proxy_bin};
use crate::util::wire::RCODE_REFUSED;
use crate::util::{
    deadline_ms, query, quiescent, run_to_exit, tcp_exchange, udp_exchange, wait_until, Script, Setup, TcpClient,
    TcpEvent, TestCa, TestUpstream, NAME,
};

const CLOSED: &str = "dotproxy_tcp_connections_closed_total";

fn closed(m: &Metrics, reason: &str) -> f64 {
    m.labeled(CLOSED, "reason", reason)
}

fn refused_tcp(m: &Metrics) -> f64 {
    m.sum("dotproxy_tcp_connections_refused_total")
}

/// A TCP connection to `addr` with a fixed receive buffer (no autotuning)
/// and a small MSS, set before connecting: the proxy's send buffer towards
/// it then stays under a MiB, so backlogs build up in the proxy quickly.
fn connect_small(addr: SocketAddr, rcvbuf: usize, mss: u32) -> TcpClient {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    sock.set_mss(mss).expect("TCP_MAXSEG");
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("tcp connect to proxy");
    TcpClient::from_stream(sock.into())
}

/// The kernel's queues of the connection `me` -> `proxy`, both ends, from
/// /proc/net/tcp (IPv4; `None` if either socket is missing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Queues {
    /// The TCP state of the proxy's socket (1: established; a socket the
    /// proxy closed with answers still queued lingers in FIN_WAIT1, 4).
    proxy_state: u8,
    /// The proxy's send queue: answers written, not yet acknowledged.
    proxy_tx: u64,
    /// The proxy's receive queue: queries not yet read by the proxy.
    proxy_rx: u64,
    /// The client's send queue: queries not yet acknowledged.
    client_tx: u64,
    /// The client's receive queue: answers not yet read by the client.
    client_rx: u64,
}

impl Queues {
    fn of(proxy: SocketAddr, me: SocketAddr) -> Option<Queues> {
        let hex = |a: SocketAddr| match a {
            SocketAddr::V4(a) => format!("{:08X}:{:04X}", u32::from_le_bytes(a.ip().octets()), a.port()),
            SocketAddr::V6(_) => String::new(),
        };
        let (p, m) = (hex(proxy), hex(me));
        let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
        let (mut theirs, mut mine) = (None, None);
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(&local), Some(&remote), Some(st), Some(queues)) = (f.get(1), f.get(2), f.get(3), f.get(4)) else {
                continue;
            };
            let Some((tx, rx)) = queues.split_once(':') else {
                continue;
            };
            let q = (u64::from_str_radix(tx, 16).ok()?, u64::from_str_radix(rx, 16).ok()?);
            if local == p && remote == m {
                theirs = Some((q, u8::from_str_radix(st, 16).ok()?));
            } else if local == m && remote == p {
                mine = Some(q);
            }
        }
        let (((proxy_tx, proxy_rx), proxy_state), (client_tx, client_rx)) = (theirs?, mine?);
        Some(Queues {
            proxy_state,
            proxy_tx,
            proxy_rx,
            client_tx,
            client_rx,
        })
    }

    /// Bytes of answers the kernel holds.
    fn answers(&self) -> u64 {
        self.proxy_tx + self.client_rx
    }

    /// Every query sent has been read by the proxy.
    fn queries_read(&self) -> bool {
        self.proxy_rx == 0 && self.client_tx == 0
    }
}

/// Answer bytes requested on `c` but neither read nor in the kernel: what
/// waits in the proxy's own buffer (or is being answered right now).
fn proxy_backlog(c: &TcpClient, proxy: SocketAddr, requested: usize, read: usize) -> i64 {
    let me = c.stream.local_addr().expect("local addr");
    let kernel = Queues::of(proxy, me).expect("both sockets in /proc/net/tcp").answers();
    requested as i64 - read as i64 - kernel as i64
}

/// `recv(2)` with MSG_DONTWAIT: whatever is there, without blocking.
fn recv_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv(2) on a valid fd into a live buffer of the given length.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// On a client that never reads: requests `name` (answers of `flen` bytes,
/// framed), at most 4 at a time, until at least `lo` bytes wait in the
/// proxy's own buffer. More are asked as soon as the proxy has read the
/// last ones and the kernel took their answers (a client left with nothing
/// pending for the idle time would be closed as merely idle); the backlog
/// counts once the proxy has read every query and it held for 20 ms with
/// the kernel's share unmoved. Returns the bytes requested, and whether the
/// proxy closed the connection on the way (its backlog stalled while other
/// clients filled theirs); `None` at the deadline.
fn fill_backlog(
    c: &mut TcpClient,
    proxy: SocketAddr,
    (name, flen): (&str, usize),
    lo: i64,
    deadline: Instant,
) -> Option<(usize, bool)> {
    let me = c.stream.local_addr().ok()?;
    let mut requested = 0usize;
    let mut id = 0u16;
    let mut held: Option<(u64, Instant)> = None;
    // Bounded by the deadline.
    while Instant::now() < deadline {
        let Some(q) = Queues::of(proxy, me) else {
            return Some((requested, true));
        };
        let backlog = requested as i64 - q.answers() as i64;
        if !q.queries_read() {
            held = None;
        } else if backlog >= lo {
            match held {
                Some((a, t)) if a == q.answers() => {
                    if t.elapsed() >= Duration::from_millis(20) {
                        return Some((requested, false));
                    }
                }
                _ => held = Some((q.answers(), Instant::now())),
            }
        } else {
            held = None;
            let n = ((lo - backlog) as usize / flen + 1).min(4);
            let mut bytes = Vec::new();
            for _ in 0..n {
                id = id.wrapping_add(1);
                bytes.extend_from_slice(&frame(&query(id, name)));
            }
            if c.stream.write_all(&bytes).is_err() {
                return Some((requested, true));
            }
            requested += n * flen;
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Waits for the proxy to close `c` (EOF or RST) before `deadline`,
/// reading what comes first.
fn closed_by_proxy(c: &mut TcpClient, deadline: Instant) -> bool {
    // Bounded by the deadline.
    loop {
        match c.next_event(deadline) {
            TcpEvent::Frame(_) => {}
            TcpEvent::Closed { .. } | TcpEvent::Error(_) => return true,
            TcpEvent::Timeout => return false,
        }
    }
}

/// Slow reader (buffer compaction): a client pipelines queries for ~3 KB
/// answers (`big.example`, cached) at about 500 a second for 5 s and reads
/// them, but slowly: it always leaves 100–400 KiB waiting in the proxy's
/// own buffer (beyond the ~1 MB the kernel holds). The proxy frees written
/// bytes as it goes, so its resident memory follows the backlog, not the
/// traffic: VmRSS stays within 3 MiB of where it started (before the
/// compaction the buffer only emptied when fully written, and grew by
/// everything sent: ~1.5 MB a second). Nothing is lost, nobody is closed.
#[test]
fn slow_reader_memory_follows_the_backlog() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--cache-size", "1000"]);
    let px = s.proxy.tcp_addr();
    let mut c = connect_small(px, 16 * 1024, 536);
    let warm = c
        .exchange(&query(1, "big.example"), deadline_ms(2000))
        .expect("warm-up answer");
    let flen = warm.len() + 2;
    // Refill the proxy's backlog up to HOLD; read only above KEEP.
    const HOLD: i64 = 250 * 1024;
    const KEEP: i64 = 100 * 1024;
    const RATE: f64 = 1.5e6; // bytes read per second once the backlog is there
    let rss0 = s.proxy.vm_rss_kb();
    let t0 = Instant::now();
    let mut steady: Option<Instant> = None;
    let (mut queries, mut requested, mut read, mut read_steady, mut frames) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut rss_max, mut next_rss) = (rss0, Instant::now());
    let mut backlogs: Vec<i64> = Vec::new();
    let mut inbuf = Vec::new();
    let mut buf = vec![0u8; 65536];
    // Bounded: 2 s to build the backlog, then 5 s of traffic.
    while steady.map_or(t0.elapsed() < Duration::from_secs(2), |t| {
        t.elapsed() < Duration::from_secs(5)
    }) {
        let backlog = proxy_backlog(&c, px, requested, read);
        if backlog < HOLD {
            let n = ((HOLD - backlog) as usize / flen + 1).min(40);
            let mut bytes = Vec::new();
            for _ in 0..n {
                queries += 1;
                bytes.extend_from_slice(&frame(&query(queries as u16, "big.example")));
            }
            c.send_raw(&bytes);
            requested += n * flen;
        }
        if steady.is_none() && backlog >= KEEP {
            steady = Some(Instant::now());
        }
        if let Some(t) = steady {
            if t.elapsed() > Duration::from_millis(500) {
                backlogs.push(backlog);
            }
            let budget = ((RATE * t.elapsed().as_secs_f64()) as usize).saturating_sub(read_steady);
            let mut left = budget.min((backlog - KEEP).max(0) as usize);
            while left > 0 {
                match recv_now(&c.stream, &mut buf[..left.min(65536)]) {
                    Ok(0) => panic!("the proxy closed the slow reader after {queries} queries"),
                    Ok(n) => {
                        read += n;
                        read_steady += n;
                        left -= n;
                        inbuf.extend_from_slice(&buf[..n]);
                        frames += take_frames(&mut inbuf).len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("slow reader: {e}"),
                }
            }
        }
        if Instant::now() >= next_rss {
            rss_max = rss_max.max(s.proxy.vm_rss_kb());
            next_rss = Instant::now() + Duration::from_millis(100);
        }
        // The stimulus: the client's pace, one round every 5 ms.
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        steady.is_some(),
        "no backlog in the proxy after 2 s ({requested} bytes asked, {read} read)"
    );
    rss_max = rss_max.max(s.proxy.vm_rss_kb());
    // Everything still comes, in full.
    c.stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = deadline_ms(3000);
    while frames < queries && Instant::now() < deadline {
        match c.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                inbuf.extend_from_slice(&buf[..n]);
                frames += take_frames(&mut inbuf).len();
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let growth = rss_max.saturating_sub(rss0);
    backlogs.sort_unstable();
    let pct = |p: usize| backlogs.get(backlogs.len() * p / 100).copied().unwrap_or(0) / 1024;
    let m = s.proxy.metrics();
    eprintln!(
        "slow reader: {queries} queries, {:.1} MB read in {:?}; proxy backlog p5/p50/p95 {}/{}/{} KiB; \
         VmRSS {rss0} kB -> max {rss_max} kB (+{growth} kB)",
        read as f64 / 1e6,
        t0.elapsed(),
        pct(5),
        pct(50),
        pct(95),
    );
    assert_eq!(frames, queries, "answers lost or connection closed");
    assert_eq!(closed(&m, "too_slow"), 0.0, "closed for a backlog under 512 KiB");
    assert_eq!(closed(&m, "stopped_reading"), 0.0, "closed although it reads");
    assert!(pct(50) >= 64, "the proxy held no real backlog (median {} KiB)", pct(50));
    assert!(
        growth < 3 * 1024,
        "VmRSS grew by {growth} kB while a slow reader kept a backlog of ~{} KiB",
        pct(50)
    );
    drop(c);
    quiescent(&s.proxy, fds);
}

/// The framed size of the `txt200.example` answer (~50 KB), now cached
/// (needs `--cache-size`).
fn warm_txt200(s: &Setup) -> usize {
    let mut w = TcpClient::connect(s.proxy.tcp_addr());
    let a = w
        .exchange(&query(1, "txt200.example"), deadline_ms(2000))
        .expect("warm-up answer");
    a.len() + 2
}

/// One client that never reads and keeps asking for ~50 KB answers, until
/// the proxy closes it (5 s at most); returns the bytes asked.
fn too_slow_client(s: &Setup, flen: usize) -> usize {
    let px = s.proxy.tcp_addr();
    let mut c = connect_small(px, 8192, 536);
    // A target the cap never lets it reach.
    let (asked, gone) = fill_backlog(&mut c, px, ("txt200.example", flen), 4 << 20, deadline_ms(5000))
        .expect("a client that never reads still open after 5 s");
    assert!(gone, "a backlog of 4 MiB in the proxy for one client");
    asked
}

/// Slow readers, per connection: at most 512 KiB of answers wait in the
/// proxy for one connection; the answer that would pass it closes the
/// client at once (`dotproxy_tcp_connections_closed_total{reason=
/// "too_slow"}`, warning "does not read its answers"), long before the
/// idle timeout (10 s): a client that never reads and keeps asking for
/// ~50 KB answers is closed within 5 s, as too slow, not as stopped.
#[test]
fn backlog_over_512_kib_closes_the_client() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--cache-size", "1000"]);
    let flen = warm_txt200(&s);
    let asked = too_slow_client(&s, flen);
    let (m, ok) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| closed(m, "too_slow") >= 1.0);
    eprintln!(
        "too slow: closed after {} KiB asked; too_slow {}",
        asked / 1024,
        closed(&m, "too_slow")
    );
    assert!(ok, "closed, but not as too slow");
    assert_eq!(closed(&m, "stopped_reading"), 0.0);
    assert_eq!(s.proxy.count_log("does not read its answers"), 1);
    quiescent(&s.proxy, fds);
}

/// Slow readers, per connection, counted once: one connection closed as
/// too slow counts 1 in `reason="too_slow"`, however many answers for it
/// arrive in the same turn of the loop.
#[test]
fn a_too_slow_close_counts_once() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--cache-size", "1000"]);
    let flen = warm_txt200(&s);
    too_slow_client(&s, flen);
    let (m, _) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| closed(m, "too_slow") >= 1.0);
    // Later answers for it, if any, come within the same turn.
    let m2 = s.proxy.metrics();
    assert_eq!(
        closed(&m2, "too_slow"),
        1.0,
        "one connection closed, counted {}",
        closed(&m2, "too_slow")
    );
    assert_eq!(m.tcp_clients(), 0.0);
    quiescent(&s.proxy, fds);
}

/// Fills `n` more clients that never read, one after the other, each to
/// 420–470 KiB waiting in the proxy (under its own 512 KiB).
fn slow_crowd(s: &Setup, flen: usize, n: usize, clients: &mut Vec<(TcpClient, usize)>) {
    let px = s.proxy.tcp_addr();
    for _ in 0..n {
        let mut c = connect_small(px, 8192, 536);
        let (asked, _) = fill_backlog(&mut c, px, ("txt200.example", flen), 420 * 1024, deadline_ms(3000))
            .unwrap_or_else(|| panic!("client {}: no backlog within 3 s", clients.len()));
        clients.push((c, asked));
    }
}

/// Of `clients`, how many the proxy still has open, and how many bytes of
/// answers they have waiting in the proxy (asked, minus what the kernel
/// holds).
fn still_waiting(s: &Setup, clients: &[(TcpClient, usize)]) -> (usize, i64) {
    let px = s.proxy.tcp_addr();
    let (mut open, mut waiting) = (0, 0i64);
    for (c, asked) in clients {
        let me = c.stream.local_addr().expect("local addr");
        if let Some(q) = Queues::of(px, me).filter(|q| q.proxy_state == 1) {
            open += 1;
            waiting += *asked as i64 - q.answers() as i64;
        }
    }
    (open, waiting)
}

/// Slow readers, all together: at most 16 MiB of answers wait in the proxy
/// over all connections; past it the client with the largest backlog is
/// closed (`reason="too_slow"`), the others kept. 34 clients that never
/// read leave 420–470 KiB each waiting (each under its own 512 KiB), under
/// 16 MiB together: none is closed. Ten more pass 16 MiB: some are closed
/// as too slow, the rest stay connected. Before, nothing bounded the total.
#[test]
fn past_16_mib_in_total_the_largest_backlog_is_closed() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--cache-size", "1000"]);
    let flen = warm_txt200(&s);
    let mut clients = Vec::new();
    slow_crowd(&s, flen, 34, &mut clients);
    let (open, waiting) = still_waiting(&s, &clients);
    let m = s.proxy.metrics();
    eprintln!("under the cap: {open} open, {} KiB waiting", waiting / 1024);
    assert_eq!(
        closed(&m, "too_slow"),
        0.0,
        "closed with {} KiB in total",
        waiting / 1024
    );
    assert_eq!((open, m.tcp_clients()), (34, 34.0));
    slow_crowd(&s, flen, 10, &mut clients);
    let (m, ok) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| closed(m, "too_slow") >= 1.0);
    let shed = closed(&m, "too_slow");
    let (open, waiting) = still_waiting(&s, &clients);
    eprintln!(
        "past the cap: {shed} of 44 closed as too slow; {open} open with {} KiB waiting; VmRSS {} kB",
        waiting / 1024,
        s.proxy.vm_rss_kb()
    );
    assert!(
        ok,
        "44 backlogs of 420+ KiB and none closed: tcp clients {}",
        m.tcp_clients()
    );
    assert!(shed <= 14.0, "{shed} closed as too slow");
    assert_eq!(
        (open as f64, m.tcp_clients()),
        (44.0 - shed, 44.0 - shed),
        "open clients"
    );
    assert_eq!(closed(&m, "stopped_reading"), 0.0);
    drop(clients);
    quiescent(&s.proxy, fds);
}

/// Slow readers, all together, after many sheds: the bound holds however
/// many clients were closed for it. 60 clients that never read, 420–470
/// KiB waiting each (~26 MB asked of the proxy): what the survivors have
/// waiting stays under 16 MiB.
#[test]
fn the_16_mib_bound_holds_after_many_sheds() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--cache-size", "1000"]);
    let flen = warm_txt200(&s);
    let mut clients = Vec::new();
    slow_crowd(&s, flen, 60, &mut clients);
    let (m, _) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| closed(m, "too_slow") >= 1.0);
    let (open, waiting) = still_waiting(&s, &clients);
    eprintln!(
        "after sheds: {} closed as too slow; {open} open with {} KiB waiting",
        closed(&m, "too_slow"),
        waiting / 1024
    );
    assert!(
        waiting <= 16 << 20,
        "{open} clients hold {} KiB in the proxy, over 16 MiB",
        waiting / 1024
    );
    drop(clients);
    quiescent(&s.proxy, fds);
}

/// A client that stops reading is closed: with `--tcp-idle-timeout 500`,
/// pending answers that make no progress for 500 ms close the connection
/// (`dotproxy_tcp_connections_closed_total{reason="stopped_reading"}`, one
/// rate-limited warning "stopped reading its answers"). Five clients fill
/// every slot of `--max-tcp-clients 5` and leave ~130 KiB each waiting in
/// the proxy (under the 512 KiB at which they would be closed as too
/// slow): all five are closed within 3 s, and a sixth client is then
/// served. Before, a client with
/// answers pending never counted as idle and held its slot forever.
#[test]
fn client_that_stops_reading_is_closed() {
    let (s, fds) = Setup::observed(
        Script::default(),
        2000,
        &[
            "--max-tcp-clients",
            "5",
            "--tcp-idle-timeout",
            "500",
            "--cache-size",
            "1000",
        ],
    );
    let px = s.proxy.tcp_addr();
    let flen = warm_txt200(&s);
    let (_, ok) = s.proxy.wait_metrics(deadline_ms(2000), |m| m.tcp_clients() == 0.0);
    assert!(ok, "warm-up client still counted");
    let mut filled: Vec<(TcpClient, (usize, bool))> = thread::scope(|sc| {
        let hs: Vec<_> = (0..5)
            .map(|i| {
                sc.spawn(move || {
                    let mut c = connect_small(px, 8192, 536);
                    let req = fill_backlog(&mut c, px, ("txt200.example", flen), 128 * 1024, deadline_ms(5000))
                        .unwrap_or_else(|| panic!("client {i}: no backlog in the proxy within 5 s"));
                    (c, req)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("filler")).collect()
    });
    let t = Instant::now();
    // Under load the kernel's send buffer may grow (autotuning) and take
    // a client's whole backlog, which then counts as idle: closed either
    // way, and mostly for not reading.
    let (m, ok) = s.proxy.wait_metrics(deadline_ms(3000), |m| {
        closed(m, "stopped_reading") + closed(m, "idle") == 5.0
            && closed(m, "stopped_reading") >= 1.0
            && m.tcp_clients() == 0.0
    });
    let took = t.elapsed();
    let asked: Vec<usize> = filled.iter().map(|f| f.1 .0 / 1024).collect();
    let early = filled.iter().filter(|f| f.1 .1).count();
    eprintln!(
        "stopped reading: KiB asked per client {asked:?} ({early} closed while the others filled); \
         all closed {took:?} after the last was filled"
    );
    assert!(
        ok,
        "clients that stopped reading still held 3 s later: stopped_reading {}, idle {}, too_slow {}, tcp clients {}",
        closed(&m, "stopped_reading"),
        closed(&m, "idle"),
        closed(&m, "too_slow"),
        m.tcp_clients()
    );
    assert_eq!(closed(&m, "too_slow"), 0.0);
    assert_eq!(
        s.proxy.count_log("stopped reading its answers"),
        1,
        "five closes, one (rate-limited) warning"
    );
    for (i, f) in filled.iter_mut().enumerate() {
        assert!(
            closed_by_proxy(&mut f.0, deadline_ms(2000)),
            "client {i}: socket still open"
        );
    }
    let r = tcp_exchange(px, &query(0x0606, "sixth.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("sixth client not served"), 0x0606, "sixth.example");
    drop(filled);
    quiescent(&s.proxy, fds);
}

/// Opens `n` connections, each sending one byte of a length prefix (a
/// partial frame: idle), one at a time, so that "idle longest" is their
/// order.
fn half_open(addr: SocketAddr, n: usize) -> Vec<TcpClient> {
    (0..n)
        .map(|_| {
            let mut c = TcpClient::connect(addr);
            c.send_raw(&[0]);
            c
        })
        .collect()
}

/// 300 half-open connections against a limit of 64, then an honest
/// query: each newcomer evicted a connection idle longest (connections
/// accepted in the same turn of the loop are equally idle), the honest one
/// is admitted the same way and answered within 500 ms; 237 of the 300
/// are closed, 63 kept.
fn crowded_then_honest(extra: &[&str], what: &str) {
    let (s, fds) = Setup::observed(Script::default(), 2000, extra);
    let addr = s.proxy.tcp_addr();
    let crowd = half_open(addr, 300);
    let (m, ok) = s.proxy.wait_metrics(deadline_ms(3000), |m| {
        closed(m, "evicted") == 236.0 && m.tcp_clients() == 64.0
    });
    assert!(
        ok,
        "{what}: 300 half-open connections: evicted {}, refused {}, open {}",
        closed(&m, "evicted"),
        refused_tcp(&m),
        m.tcp_clients()
    );
    let t = Instant::now();
    let r = tcp_exchange(addr, &query(0x0303, "honest.example"), deadline_ms(2000));
    let took = t.elapsed();
    assert_default_answer(
        &r.unwrap_or_else(|| panic!("{what}: honest client not answered among 300 half-open connections")),
        0x0303,
        "honest.example",
    );
    assert!(took < Duration::from_millis(500), "{what}: honest query took {took:?}");
    let m = s.proxy.metrics();
    assert_eq!(
        refused_tcp(&m),
        0.0,
        "{what}: refused while idle connections were there"
    );
    assert_eq!(
        closed(&m, "evicted"),
        237.0,
        "{what}: the honest client evicts one more"
    );
    // From the clients' side: 237 closed (EOF or RST), 63 still open.
    let mut gone = vec![false; crowd.len()];
    let settled = wait_until(deadline_ms(1000), || {
        for (c, g) in crowd.iter().zip(gone.iter_mut()) {
            *g = *g || !matches!(recv_now(&c.stream, &mut [0u8; 16]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        }
        gone.iter().filter(|&&g| g).count() >= 237
    });
    let n = gone.iter().filter(|&&g| g).count();
    assert!(
        settled && n == 237,
        "{what}: {n} half-open connections closed, 237 evicted"
    );
    drop(crowd);
    quiescent(&s.proxy, fds);
}

/// Crowded slots, per address: `--max-tcp-clients-per-ip 64
/// --per-ip-exempt none` (loopback is exempt by default): 300 half-open
/// connections from 127.0.0.1 (one byte of a length prefix each; a partial
/// frame counts as idle) and an honest TCP query from 127.0.0.1 after
/// them is answered promptly: at the limit the connection idle longest is
/// evicted (`reason="evicted"`) for the newcomer. Before, the 65th
/// connection and every later one were closed at once, honest or not.
#[test]
fn crowded_per_address_slots_evict_the_idlest() {
    crowded_then_honest(
        &["--max-tcp-clients-per-ip", "64", "--per-ip-exempt", "none"],
        "per address",
    );
}

/// Crowded slots, in total: default flags (loopback exempt from the
/// per-address limit) and `--max-tcp-clients 64`: 300 half-open
/// connections, then an honest query is answered promptly (eviction at the
/// global limit). Before, the honest client was closed at once.
#[test]
fn crowded_global_slots_evict_the_idlest() {
    crowded_then_honest(&["--max-tcp-clients", "64"], "in total");
}

/// Crowded slots, busy connections: only idle connections (no complete
/// query in flight, no answer pending) are evicted; a newcomer is refused
/// only when every connection is busy. `--max-tcp-clients 4`: one
/// connection holds a partial frame, three wait for slow answers; a fifth
/// evicts the partial one and asks too; a sixth finds all four busy and is
/// closed at once (`dotproxy_tcp_connections_refused_total`); the four
/// busy ones get their answers.
#[test]
fn busy_connections_are_never_evicted() {
    let script = Script {
        slow_delay: Duration::from_millis(1500),
        ..Script::default()
    };
    let (s, fds) = Setup::observed(script, 4000, &["--max-tcp-clients", "4"]);
    let addr = s.proxy.tcp_addr();
    let mut partial = half_open(addr, 1).pop().expect("one");
    let mut busy: Vec<TcpClient> = Vec::new();
    for i in 0..4u16 {
        if i == 3 {
            // The fifth connection: the partial one makes room.
            let (m, ok) = s.proxy.wait_metrics(deadline_ms(2000), |m| m.tcp_clients() == 4.0);
            assert!(ok, "four connections not admitted: {}", m.tcp_clients());
        }
        let mut c = TcpClient::connect(addr);
        c.send(&query(0x100 + i, &format!("slow{i}.example")));
        busy.push(c);
        let n = usize::from(i) + 1;
        assert!(
            s.upstream.wait_until(deadline_ms(2000), |st| st.queries.len() >= n),
            "busy query {i} never reached the upstream (connection not admitted?)"
        );
    }
    assert!(
        closed_by_proxy(&mut partial, deadline_ms(1000)),
        "the idle (partial) connection was kept"
    );
    let m = s.proxy.metrics();
    assert_eq!(closed(&m, "evicted"), 1.0);
    assert_eq!(refused_tcp(&m), 0.0);
    let mut sixth = TcpClient::connect(addr);
    sixth.send(&query(0x0606, "sixth.example"));
    let t = Instant::now();
    assert!(
        closed_by_proxy(&mut sixth, deadline_ms(1000)),
        "a sixth connection admitted over 4 busy ones"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "refused after {:?}",
        t.elapsed()
    );
    let (m, ok) = s.proxy.wait_metrics(deadline_ms(1000), |m| refused_tcp(m) == 1.0);
    assert!(ok, "refusal not counted: {}", refused_tcp(&m));
    assert_eq!(closed(&m, "evicted"), 1.0, "a busy connection was evicted");
    for (i, c) in busy.iter_mut().enumerate() {
        let name = format!("slow{i}.example");
        let r = c.recv(deadline_ms(3000));
        assert_default_answer(
            &r.unwrap_or_else(|| panic!("busy connection {i} lost its answer")),
            0x100 + i as u16,
            &name,
        );
    }
    drop((busy, sixth));
    quiescent(&s.proxy, fds);
}

/// A burst of `n` distinct UDP queries from one loopback socket against an
/// upstream that answers after 300 ms; returns (NOERROR, REFUSED, highest
/// `dotproxy_inflight` seen).
fn udp_burst(s: &Setup, n: u16) -> (usize, usize, f64) {
    let qs: Vec<_> = (0..n).map(|i| query(i, &format!("b{i}.example"))).collect();
    let addr = s.proxy.udp_addr();
    let (bulk, peak) = thread::scope(|sc| {
        let h = sc.spawn(|| udp_bulk(addr, &qs, qs.len(), None, deadline_ms(5000)));
        // Sampled for 1.5 s: the burst is sent in well under 300 ms.
        let peak = std::cell::Cell::new(0.0f64);
        s.proxy.wait_metrics(deadline_ms(1500), |m| {
            peak.set(peak.get().max(m.inflight()));
            false
        });
        (h.join().expect("burst"), peak.get())
    });
    let (mut ok, mut refused) = (0, 0);
    for (i, a) in bulk.answers.iter().enumerate() {
        let Some(a) = a else { continue };
        let m = Message::must(a);
        match m.rcode {
            RCODE_NOERROR => ok += 1,
            RCODE_REFUSED => refused += 1,
            rc => panic!("query {i}: rcode {rc}"),
        }
    }
    (ok, refused, peak)
}

/// Per-address defaults, loopback exempt: with default flags a burst of
/// 2 000 UDP queries from one 127.0.0.1 socket against a slow upstream
/// (300 ms) is all in flight at once and none is REFUSED: 127.0.0.0/8 and
/// ::1 are exempt from the per-address limits by default (only the totals
/// apply). Before, the per-address cap of 1 000 applied to loopback too
/// and refused about half of them.
#[test]
fn loopback_is_exempt_from_the_per_address_cap() {
    let (s, fds) = Setup::observed(Script::delayed(Duration::from_millis(300)), 3000, &[]);
    let (ok, refused, peak) = udp_burst(&s, 2000);
    eprintln!("loopback burst: {ok} NOERROR, {refused} REFUSED, peak in flight {peak}");
    assert_eq!(refused, 0, "loopback refused by a per-address cap ({ok} answered)");
    assert!(ok >= 1990, "only {ok} of 2000 answered");
    assert!(peak > 1000.0, "the burst never had more than {peak} in flight");
    quiescent(&s.proxy, fds);
}

/// Per-address defaults, the exemption is what lets loopback through:
/// with `--per-ip-exempt none --max-inflight-per-ip 100` the same burst of
/// 2 000 is held to 100 in flight, the rest REFUSED.
#[test]
fn without_the_exemption_loopback_is_capped() {
    let (s, fds) = Setup::observed(
        Script::delayed(Duration::from_millis(300)),
        3000,
        &["--per-ip-exempt", "none", "--max-inflight-per-ip", "100"],
    );
    let (ok, refused, peak) = udp_burst(&s, 2000);
    eprintln!("capped burst: {ok} NOERROR, {refused} REFUSED, peak in flight {peak}");
    assert!(refused >= 1500, "{refused} REFUSED with a cap of 100");
    assert!((100..=500).contains(&ok), "{ok} answered with a cap of 100 in flight");
    assert!(peak <= 100.0, "{peak} in flight with a cap of 100");
    quiescent(&s.proxy, fds);
}

/// Per-address defaults, `--max-inflight-per-ip` defaults to 5000: with
/// the exemption off (`--per-ip-exempt none`) the burst of 2 000 from one
/// address is still not REFUSED (the old default of 1 000 refused half).
#[test]
fn default_per_address_cap_is_above_two_thousand() {
    let (s, fds) = Setup::observed(
        Script::delayed(Duration::from_millis(300)),
        3000,
        &["--per-ip-exempt", "none"],
    );
    let (ok, refused, peak) = udp_burst(&s, 2000);
    eprintln!("default cap burst: {ok} NOERROR, {refused} REFUSED, peak in flight {peak}");
    assert_eq!(refused, 0, "REFUSED under the default per-address cap ({ok} answered)");
    assert!(ok >= 1990, "only {ok} of 2000 answered");
    quiescent(&s.proxy, fds);
}

/// Per-address options: `--per-ip-ipv6-prefix` takes 16 to 128 (IPv6
/// clients are counted by that prefix, 64 by default); out of range it is
/// refused at start with status 2 and a line naming it.
#[test]
fn ipv6_prefix_option_range() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let p = crate::util::TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--per-ip-ipv6-prefix", "56"]);
    let r = udp_exchange(p.udp_addr(), &query(0x5656, "v6prefix.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("no answer"), 0x5656, "v6prefix.example");
    for bad in ["8", "129"] {
        let out = run_to_exit(
            &["--listen", "127.0.0.1:0", "--per-ip-ipv6-prefix", bad],
            Duration::from_secs(5),
        );
        assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{bad}: {}", out.stderr);
        assert!(out.stderr.contains("--per-ip-ipv6-prefix"), "{bad}: {}", out.stderr);
    }
}

/// A bad `--per-ip-exempt` value is refused at start (status 2) with a
/// line naming `--per-ip-exempt`.
#[test]
fn bad_per_ip_exempt_names_its_option() {
    let out = run_to_exit(
        &["--listen", "127.0.0.1:0", "--per-ip-exempt", "300.1.1.1/8"],
        Duration::from_secs(5),
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--per-ip-exempt") && !out.stderr.contains("--allow"),
        "the error does not name the option given: {}",
        out.stderr
    );
}

/// The proxy run through `prlimit --nofile=SOFT:HARD --` (util-linux),
/// which sets the limits and execs it: the process starts under them.
/// `TestProxy` cannot wrap its command, hence this small runner (kills the
/// process on drop, prints its log if the test fails).
struct Limited {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    udp: SocketAddr,
    tcp: SocketAddr,
    metrics: SocketAddr,
}

impl Limited {
    fn start(nofile: &str, upstream: &TestUpstream, ca: &TestCa, extra: &[&str]) -> Limited {
        let ok = Command::new("prlimit")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "these tests need prlimit (Debian: util-linux)");
        let up = upstream.arg(NAME);
        let limit = format!("--nofile={nofile}");
        let mut args = vec![
            limit.as_str(),
            "--",
            proxy_bin(),
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "debug",
        ];
        args.extend_from_slice(&["--upstream", &up, "--ca-file", ca.pem_path_str(), "--timeout", "2000"]);
        args.extend_from_slice(&["--metrics", "127.0.0.1:0"]);
        args.extend_from_slice(extra);
        let mut child = Command::new("prlimit")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prlimit");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let l2 = logs.clone();
        thread::spawn(move || {
            // Ends at EOF, when the process is gone.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let find = |logs: &[String], key: &str| -> Option<SocketAddr> {
            logs.iter().find_map(|l| {
                let rest = &l[l.find(key)? + key.len()..];
                rest.split(|c: char| c.is_whitespace() || c == '/').next()?.parse().ok()
            })
        };
        let (mut udp, mut tcp, mut metrics): (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>) =
            (None, None, None);
        let up = wait_until(deadline_ms(10_000), || {
            let l = logs.lock().unwrap_or_else(|e| e.into_inner());
            udp = find(&l, "listening on udp ");
            tcp = find(&l, "listening on tcp ");
            metrics = find(&l, "metrics on http://");
            udp.is_some() && tcp.is_some() && metrics.is_some()
        });
        let mut p = Limited {
            child,
            logs,
            udp: "0.0.0.0:0".parse().unwrap(),
            tcp: "0.0.0.0:0".parse().unwrap(),
            metrics: "0.0.0.0:0".parse().unwrap(),
        };
        assert!(up, "proxy under prlimit did not start:\n{}", p.log_text());
        (p.udp, p.tcp, p.metrics) = (udp.unwrap(), tcp.unwrap(), metrics.unwrap());
        p
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    fn find_log(&self, needle: &str) -> Option<String> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter().find(|l| l.contains(needle)).cloned()
    }

    fn metrics(&self) -> Metrics {
        let r = http_raw(
            self.metrics,
            b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n",
            deadline_ms(3000),
        );
        assert_eq!(r.status, 200, "GET /metrics: {}", r.head);
        Metrics::parse(&r.body)
    }

    /// The soft and hard "Max open files" of /proc/PID/limits.
    fn nofile(&self) -> (String, String) {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).expect("limits");
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files line");
        let f: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
        (f[0].to_string(), f[1].to_string())
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let logs = self.log_text();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- dotproxy log (last 60 lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("----");
        }
    }
}

/// Descriptors, at start: the soft RLIMIT_NOFILE is raised to the hard
/// limit (started under `prlimit --nofile=256:4096`, the process runs with
/// 4096 open files allowed); `--max-tcp-clients` (1024) fits under 4096
/// and is not lowered.
#[test]
fn soft_descriptor_limit_raised_to_the_hard_one() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let p = Limited::start("256:4096", &up, &ca, &[]);
    assert_eq!(
        p.nofile(),
        ("4096".to_string(), "4096".to_string()),
        "Max open files (soft, hard)"
    );
    let r = udp_exchange(p.udp, &query(0x4096, "raised.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("no answer"), 0x4096, "raised.example");
    assert!(
        p.find_log("lowered to").is_none(),
        "--max-tcp-clients lowered under 4096 descriptors"
    );
}

/// Descriptors, clients capped under the limit: started under `prlimit
/// --nofile=128:128` with the default `--max-tcp-clients`, the proxy warns
/// "--max-tcp-clients 1024 lowered to N: the descriptor limit is 128" and
/// keeps at most N client connections (more idle ones are evicted, none
/// refused), so that upstream connections and the metrics server always
/// find descriptors: with 150 idle TCP clients connected (from 127.0.0.1,
/// .2 and .3) and
/// `--max-upstream-conn-queries 1` (a new upstream connection for every
/// query), 20 UDP queries are answered NOERROR and
/// `dotproxy_upstream_failures_total` stays 0. Before, clients took every
/// descriptor, the upstream connect failed with EMFILE, the upstream was
/// marked down and everyone got SERVFAIL.
#[test]
fn clients_capped_under_the_descriptor_limit() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let p = Limited::start("128:128", &up, &ca, &["--max-upstream-conn-queries", "1"]);
    let r = udp_exchange(p.udp, &query(1, "first.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("first query"), 1, "first.example");
    // From three addresses, 50 each: under any per-address limit, so that
    // only the total and the descriptors count.
    let crowd: Vec<TcpClient> = (0..150u8)
        .map(|i| {
            let src = std::net::IpAddr::from([127, 0, 0, 1 + i % 3]);
            TcpClient::from_stream(tcp_connect_from(src, p.tcp).expect("connect from 127.0.0.x"))
        })
        .collect();
    // Settled: evictions under way (new) or accept out of descriptors
    // (before); then the descriptor count stops moving.
    let settled = wait_until(deadline_ms(3000), || {
        p.find_log("to admit a new connection at a limit").is_some() || p.find_log("os error 24").is_some()
    });
    assert!(settled, "150 clients: neither evictions nor accept errors");
    let mut last = (count_fds(p.pid()), Instant::now());
    let stable = wait_until(deadline_ms(3000), || {
        let n = count_fds(p.pid());
        if n != last.0 {
            last = (n, Instant::now());
        }
        last.1.elapsed() >= Duration::from_millis(100)
    });
    assert!(stable, "descriptor count never settled");
    let fds = count_fds(p.pid());
    for i in 0..20u16 {
        let name = format!("fresh{i}.example");
        let r = udp_exchange(p.udp, &query(0x100 + i, &name), deadline_ms(2000))
            .unwrap_or_else(|| panic!("query {i}: no answer ({fds} fds open, limit 128)"));
        let m = Message::must(&r);
        assert_eq!(
            m.rcode, RCODE_NOERROR,
            "query {i}: rcode {} with {fds} fds open and 150 clients",
            m.rcode
        );
    }
    let m = p.metrics();
    assert_eq!(m.sum("dotproxy_upstream_failures_total"), 0.0, "upstream failures");
    assert!(
        m.sum("dotproxy_upstream_connects_total") >= 20.0,
        "{} upstream connects for 20 queries with --max-upstream-conn-queries 1",
        m.sum("dotproxy_upstream_connects_total")
    );
    let line = p
        .find_log("--max-tcp-clients 1024 lowered to ")
        .expect("no warning that --max-tcp-clients was lowered");
    assert!(line.contains("the descriptor limit is 128"), "{line}");
    let cap: f64 = line
        .split("lowered to ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in: {line}"));
    eprintln!("descriptor cap: {line}; {fds} fds open with 150 clients connected");
    assert!((1.0..=100.0).contains(&cap), "cap {cap} with 128 descriptors");
    assert_eq!(m.tcp_clients(), cap, "open clients vs the cap");
    assert_eq!(closed(&m, "evicted"), 150.0 - cap, "idle clients evicted for newcomers");
    assert_eq!(refused_tcp(&m), 0.0);
    assert!(fds <= 128, "{fds} fds");
    drop(crowd);
}

/// Descriptors, EMFILE on an upstream connect is ours, not the upstream's:
/// the limit of a running proxy is cut to 64 (`prlimit --pid`, so the
/// start-up cap of 1024 clients no longer fits) and 100 TCP clients take
/// every descriptor; with `--max-upstream-conn-queries 1` each query needs
/// a new upstream connection, which cannot be opened. The queries fail,
/// but `dotproxy_upstream_failures_total` stays 0, the upstream is never
/// logged down, and once the clients leave the next query is answered
/// NOERROR at once (no back-off). The accept error is logged once
/// (rate-limited, one retry timer per listener). Before, the EMFILE
/// counted as an upstream failure and put the upstream in back-off.
#[test]
fn out_of_descriptors_is_not_an_upstream_failure() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--max-upstream-conn-queries", "1"]);
    let r = udp_exchange(s.proxy.udp_addr(), &query(1, "warm.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("warm-up"), 1, "warm.example");
    let pid = s.proxy.pid().to_string();
    let st = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .unwrap_or_else(|e| panic!("this test needs prlimit (Debian: util-linux): {e}"));
    assert!(st.success(), "prlimit --pid {pid} --nofile=64:64: {st}");
    let crowd: Vec<TcpClient> = (0..100).map(|_| TcpClient::connect(s.proxy.tcp_addr())).collect();
    assert!(
        s.proxy.wait_for_log("os error 24", deadline_ms(2000)),
        "no accept error with 100 clients and 64 descriptors"
    );
    let mut rcodes = Vec::new();
    for i in 0..5u16 {
        let name = format!("starved{i}.example");
        if let Some(r) = udp_exchange(s.proxy.udp_addr(), &query(0x200 + i, &name), deadline_ms(3000)) {
            rcodes.push(Message::must(&r).rcode);
        }
    }
    assert_eq!(rcodes.len(), 5, "queries unanswered while out of descriptors");
    // The stimulus: a second of running out of descriptors, for the
    // accept warning's rate limit.
    thread::sleep(Duration::from_millis(1000));
    drop(crowd);
    let freed = wait_until(deadline_ms(3000), || s.proxy.open_fds() <= fds + 4);
    assert!(
        freed,
        "descriptors not released: {} (baseline {fds})",
        s.proxy.open_fds()
    );
    let r = udp_exchange(s.proxy.udp_addr(), &query(0x0300, "after.example"), deadline_ms(2000));
    let after = Message::must(&r.expect("no answer after the clients left")).rcode;
    let m = s.proxy.metrics();
    let accept_warnings = s.proxy.count_log("retrying in 100 ms");
    eprintln!(
        "out of fds: rcodes {rcodes:?}, then {after}; upstream failures {}, accept warnings {accept_warnings}",
        m.sum("dotproxy_upstream_failures_total")
    );
    assert_eq!(
        m.sum("dotproxy_upstream_failures_total"),
        0.0,
        "EMFILE counted as an upstream failure"
    );
    assert_eq!(
        s.proxy.count_log("down:"),
        0,
        "upstream logged down:\n{}",
        s.proxy.log_text()
    );
    assert_eq!(after, RCODE_NOERROR, "first query after the clients left");
    assert!(accept_warnings <= 1, "{accept_warnings} accept warnings in a second");
    quiescent(&s.proxy, fds);
}
