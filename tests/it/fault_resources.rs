//! Resources and load (R) and process lifecycle (L): per-address and
//! connection limits, running out of file descriptors, CPU when idle or
//! when the upstream is down, memory ceilings, SIGTERM with work in flight,
//! clients vanishing mid-write, upstream specs refused at start.
//!
//! Test names start with the case's label (R1, …, L1, …): the labels only
//! number the cases of this module, so that a comment or a commit can
//! name one.

use std::io::Write;
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::client::udp_bulk;
use crate::util::dns::{frame, Message, RCODE_NOERROR, RCODE_SERVFAIL};
use crate::util::net::{reset, set_rcvbuf};
use crate::util::wire::{query_opt, OptSpec, RCODE_REFUSED};
use crate::util::{
    dead_port, deadline_ms, observed_over, query, quiescent, quiescent_idle, run_to_exit, tcp_exchange, udp_exchange,
    udp_exchange_on, udp_recv, udp_socket, wait_until, Script, Setup, TcpClient, TcpEvent, TestCa, NAME,
};

/// R1: one address floods a slow upstream; `--max-inflight-per-ip 50`
/// holds it to 50 in flight, the rest get REFUSED at once (no bigger than
/// the query); a client on 127.0.0.2 is answered meanwhile;
/// memory stays bounded.
#[test]
fn r1_per_address_in_flight_cap() {
    let (s, fds) = Setup::observed(
        Script::delayed(Duration::from_millis(300)),
        2000,
        // Loopback is exempt from per-address limits by default; this is
        // the per-address cap itself.
        &["--max-inflight-per-ip", "50", "--per-ip-exempt", "none"],
    );
    let qs: Vec<_> = (0..5000u16)
        .map(|i| query_opt(i, &format!("f{i}.example"), OptSpec::new(1232)))
        .collect();
    let other = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let addr = s.proxy.udp_addr();
    let t0 = Instant::now();
    let (flood, other_answer) = std::thread::scope(|sc| {
        let h = sc.spawn(|| udp_bulk(addr, &qs, 5000, None, deadline_ms(5000)));
        // The flood has reached the cap: 127.0.0.1 is being refused.
        let (_, capped) = s.proxy.wait_metrics(deadline_ms(3000), |m| m.rejected("busy") >= 1.0);
        assert!(capped, "the flood never reached the cap of 50");
        let r = udp_exchange_on(&other, addr, &query(0x0202, "other.example"), deadline_ms(2000));
        (h.join().unwrap(), r)
    });
    assert_default_answer(&other_answer.expect("second address starved"), 0x0202, "other.example");
    let (mut ok, mut refused) = (0, 0);
    for (i, a) in flood.answers.iter().enumerate() {
        let Some(a) = a else { continue };
        let m = Message::must(a);
        match m.rcode {
            RCODE_NOERROR => ok += 1,
            RCODE_REFUSED => {
                refused += 1;
                // No amplification: the EDE "busy" is only added when it
                // fits within the query's size (see the test below).
                assert!(
                    a.len() <= qs[i].len(),
                    "REFUSED of {} bytes to a {}-byte query",
                    a.len(),
                    qs[i].len()
                );
            }
            rc => panic!("query {i}: rcode {rc}"),
        }
    }
    eprintln!("r1: {ok} answered, {refused} refused of 5000 in {:?}", t0.elapsed());
    assert!((50..=500).contains(&ok), "{ok} answered with a cap of 50 in flight");
    assert!(refused >= 4000, "{refused} refused");
    assert!(
        flood.answered() >= 4900,
        "only {} of 5000 got any reply",
        flood.answered()
    );
    let m = s.proxy.metrics();
    assert!(m.rejected("busy") >= refused as f64);
    let hwm = s.proxy.vm_hwm_kb();
    assert!(hwm < 64 * 1024, "VmHWM {hwm} kB");
    quiescent(&s.proxy, fds);
}

/// R1, amplification (README "Security and limits": REFUSED "no bigger
/// than the query"): the busy REFUSED to an EDNS query without options
/// must not outgrow it (drop the EDE text, or the EDE, when it would).
#[test]
fn r1_busy_refused_no_bigger_than_the_query() {
    let (s, fds) = Setup::observed(
        Script::silent(),
        1000,
        &["--max-inflight-per-ip", "1", "--per-ip-exempt", "none"],
    );
    let sock = udp_socket();
    sock.send_to(&query(1, "hold.example"), s.proxy.udp_addr()).unwrap();
    let q = query_opt(2, "b.example", OptSpec::new(1232));
    let r = udp_exchange_on(&sock, s.proxy.udp_addr(), &q, deadline_ms(2000)).expect("no REFUSED");
    assert_eq!(Message::must(&r).rcode, RCODE_REFUSED);
    assert!(
        r.len() <= q.len(),
        "REFUSED of {} bytes to a {}-byte query",
        r.len(),
        q.len()
    );
    quiescent_idle(&s.proxy, fds);
}

/// R2: `--max-tcp-clients 20`: 30 idle connections at once. At the limit
/// each newcomer evicts the connection idle longest (RFC 7766 §6.2.3), so
/// the 20 newest are kept and the 10 oldest closed without an answer,
/// counted as evicted (none refused: an idle connection was always there
/// to make room); the 20 keep working; once they leave, 200 short-lived
/// clients x 4 queries from 4 threads are all answered.
#[test]
fn r2_many_tcp_clients() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--max-tcp-clients", "20"]);
    let mut conns: Vec<TcpClient> = Vec::new();
    for i in 0..30usize {
        conns.push(TcpClient::connect(s.proxy.tcp_addr()));
        // One at a time, so "idle longest" is their order.
        let (_, ok) = s.proxy.wait_metrics(deadline_ms(2000), |m| {
            m.tcp_clients() == (i + 1).min(20) as f64
                && m.labeled("dotproxy_tcp_connections_closed_total", "reason", "evicted")
                    == i.saturating_sub(19) as f64
        });
        assert!(ok, "connection {i} not admitted as expected");
    }
    let m = s.proxy.metrics();
    assert_eq!(m.sum("dotproxy_tcp_connections_refused_total"), 0.0);
    let (mut served, mut closed) = (Vec::new(), Vec::new());
    for (i, c) in conns.iter_mut().enumerate() {
        let _ = c.stream.write_all(&frame(&query(i as u16, "many.example")));
        match c.next_event(deadline_ms(1000)) {
            TcpEvent::Frame(f) => {
                assert_default_answer(&f, i as u16, "many.example");
                served.push(i);
            }
            TcpEvent::Closed { .. } | TcpEvent::Error(_) => closed.push(i),
            TcpEvent::Timeout => panic!("connection {i}: neither served nor closed"),
        }
    }
    assert_eq!(closed, (0..10).collect::<Vec<_>>(), "the oldest idle ones make room");
    assert_eq!(served.len(), 20);
    // The twenty keep working after the evictions.
    for &i in &served {
        let id = 0x100 + i as u16;
        let r = conns[i].exchange(&query(id, "again.example"), deadline_ms(2000));
        assert_default_answer(&r.expect("held client after the limit"), id, "again.example");
    }
    drop(conns);
    let (_, ok) = s.proxy.wait_metrics(deadline_ms(2000), |m| m.tcp_clients() == 0.0);
    assert!(ok);
    let addr = s.proxy.tcp_addr();
    std::thread::scope(|sc| {
        for t in 0..4u16 {
            sc.spawn(move || {
                for k in 0..50u16 {
                    let mut c = TcpClient::connect(addr);
                    let msgs: Vec<_> = (0..4u16)
                        .map(|j| query(t * 1000 + k * 4 + j, "short.example"))
                        .collect();
                    c.send_many(&msgs);
                    let got = c.recv_n(4, deadline_ms(2000));
                    assert_eq!(got.len(), 4, "thread {t} client {k}: {} answers", got.len());
                }
            });
        }
    });
    quiescent(&s.proxy, fds);
}

/// R3: with RLIMIT_NOFILE lowered to 64 (prlimit, from util-linux) and 100 clients
/// connecting, accept fails with EMFILE: the loop must not spin (CPU over
/// 2 s ~ 0), UDP keeps working, and accepting resumes once clients leave.
#[test]
fn r3_out_of_file_descriptors_no_spin() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let pid = s.proxy.pid().to_string();
    let r = udp_exchange(s.proxy.udp_addr(), &query(1, "warm.example"), deadline_ms(2000));
    assert!(r.is_some());
    let st = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .unwrap_or_else(|e| panic!("r3 needs prlimit (Debian: util-linux): {e}"));
    assert!(st.success(), "prlimit --pid {pid} --nofile=64:64: {st}");
    let clients: Vec<TcpClient> = (0..100).map(|_| TcpClient::connect(s.proxy.tcp_addr())).collect();
    // EMFILE is "os error 24".
    assert!(
        s.proxy.wait_for_log("os error 24", deadline_ms(2000)),
        "no accept error logged with 100 clients and 64 fds"
    );
    let fds_now = s.proxy.open_fds();
    assert!(fds_now <= 66, "{fds_now} fds open with a limit of 64");
    let cpu0 = s.proxy.cpu_ticks();
    // The measurement window: CPU used over 2 s while accept keeps failing.
    std::thread::sleep(Duration::from_millis(2000));
    let cpu = s.proxy.cpu_ticks() - cpu0;
    assert!(cpu <= 20, "{cpu} ticks of CPU in 2 s while out of fds: a busy loop");
    let r = udp_exchange(s.proxy.udp_addr(), &query(2, "udp-still.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("UDP while out of fds"), 2, "udp-still.example");
    drop(clients);
    let ok = wait_until(deadline_ms(3000), || {
        tcp_exchange(s.proxy.tcp_addr(), &query(3, "after.example"), deadline_ms(500)).is_some()
    });
    assert!(ok, "accepting did not resume after the clients left");
    quiescent(&s.proxy, fds);
}

/// R6: CPU use ~0 while idle with a connection open, and while the only
/// upstream is down (no timer or reconnect spin).
#[test]
fn r6_idle_and_upstream_down_cpu_near_zero() {
    let (idle, idle_fds) = Setup::observed(Script::default(), 2000, &[]);
    assert!(udp_exchange(idle.proxy.udp_addr(), &query(1, "idle.example"), deadline_ms(2000)).is_some());
    let ca = TestCa::new();
    let (down, down_fds) = observed_over(&ca, &[format!("127.0.0.1:{}#{NAME}", dead_port())], 1000);
    let r = udp_exchange(down.udp_addr(), &query(2, "down.example"), deadline_ms(2000));
    assert_eq!(Message::must(&r.expect("down")).rcode, RCODE_SERVFAIL);
    let (a0, b0) = (idle.proxy.cpu_ticks(), down.cpu_ticks());
    // The measurement window: CPU used over 2 s of doing nothing.
    std::thread::sleep(Duration::from_millis(2000));
    let (a, b) = (idle.proxy.cpu_ticks() - a0, down.cpu_ticks() - b0);
    assert!(a <= 3, "idle proxy used {a} ticks in 2 s");
    assert!(b <= 3, "proxy with its upstream down used {b} ticks in 2 s");
    quiescent(&idle.proxy, idle_fds);
    quiescent_idle(&down, down_fds);
}

/// R7: 500 queries pile up against a stalled upstream (cap 100 per
/// address), then it dies: every query gets exactly one reply, the
/// SERVFAIL burst is bounded by the cap, no reply is bigger than its query.
#[test]
fn r7_stalled_upstream_dies_bounded_burst() {
    let (mut s, fds) = Setup::observed(
        Script::silent(),
        3000,
        &["--max-inflight-per-ip", "100", "--per-ip-exempt", "none"],
    );
    let qs: Vec<_> = (0..500u16).map(|i| query(i, &format!("pile{i}.example"))).collect();
    let addr = s.proxy.udp_addr();
    let sock = udp_socket();
    crate::util::net::set_udp_rcvbuf(&sock, 8 << 20);
    sock.connect(addr).unwrap();
    for q in &qs {
        sock.send(q).unwrap();
    }
    let (_, ok) = s.proxy.wait_metrics(deadline_ms(2000), |m| m.inflight() == 100.0);
    assert!(ok, "in flight never reached the cap of 100");
    s.upstream.stop();
    let mut rc = std::collections::HashMap::new();
    let mut got = vec![0u8; qs.len()];
    let mut buf = vec![0u8; 65536];
    let deadline = deadline_ms(4000);
    // Bounded by the deadline and 2 x 500 datagrams.
    for _ in 0..1000 {
        if got.iter().all(|&n| n == 1) || Instant::now() >= deadline {
            break;
        }
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let m = Message::must(&buf[..n]);
        let i = m.id as usize;
        assert!(n <= qs[i].len(), "reply of {n} bytes to a {}-byte query", qs[i].len());
        got[i] += 1;
        *rc.entry(m.rcode).or_insert(0) += 1;
    }
    assert!(
        got.iter().all(|&n| n == 1),
        "not exactly one reply each: {:?}",
        got.iter().filter(|&&n| n != 1).count()
    );
    assert_eq!(rc.get(&RCODE_REFUSED), Some(&400), "{rc:?}");
    assert_eq!(rc.get(&RCODE_SERVFAIL), Some(&100), "{rc:?}");
    quiescent_idle(&s.proxy, fds);
}

/// L1: SIGTERM with queries in flight: new work is refused, what is in
/// flight is answered (the upstream answers in 300 ms) or SERVFAIL, the
/// upstream sees close_notify, the exit status is 0.
#[test]
fn l1_sigterm_with_queries_in_flight() {
    let mut s = Setup::with_timeout(Script::delayed(Duration::from_millis(300)), 2000);
    let udp: Vec<_> = (0..10u16)
        .map(|i| {
            let sock = udp_socket();
            sock.send_to(&query(i, &format!("u{i}.example")), s.proxy.udp_addr())
                .unwrap();
            sock
        })
        .collect();
    let mut tcp = TcpClient::connect(s.proxy.tcp_addr());
    tcp.send_many(
        &(0..5u16)
            .map(|i| query(100 + i, &format!("t{i}.example")))
            .collect::<Vec<_>>(),
    );
    assert!(s.upstream.wait_until(deadline_ms(2000), |st| st.queries.len() >= 15));
    let t0 = Instant::now();
    s.proxy.kill_term();
    // The proxy logs this as it stops taking new work.
    assert!(
        s.proxy.wait_for_log("shutting down", deadline_ms(2000)),
        "no 'shutting down' line after SIGTERM"
    );
    // No new work: a new UDP query goes unanswered, a new TCP connection is
    // refused or closed.
    let late = udp_socket();
    late.send_to(&query(999, "late.example"), s.proxy.udp_addr()).unwrap();
    match std::net::TcpStream::connect_timeout(&s.proxy.tcp_addr(), Duration::from_millis(300)) {
        Err(_) => {}
        Ok(st) => {
            let mut c = TcpClient::from_stream(st);
            let _ = c.stream.write_all(&frame(&query(998, "late-tcp.example")));
            assert!(
                c.recv(deadline_ms(1000)).is_none(),
                "a new TCP query was answered after SIGTERM"
            );
        }
    }
    for (i, sock) in udp.iter().enumerate() {
        let r = udp_recv(sock, deadline_ms(3000)).unwrap_or_else(|| panic!("udp {i}: no reply after SIGTERM"));
        let m = Message::must(&r);
        assert_eq!(m.id, i as u16);
        assert!(
            matches!(m.rcode, RCODE_NOERROR | RCODE_SERVFAIL),
            "udp {i}: rcode {}",
            m.rcode
        );
    }
    let answers = tcp.recv_n(5, deadline_ms(3000));
    assert_eq!(answers.len(), 5, "TCP answers lost at shutdown");
    let st = s
        .proxy
        .wait_exit(Duration::from_secs(4))
        .expect("still running 4 s after SIGTERM");
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "drain took {:?}",
        t0.elapsed()
    );
    assert!(
        udp_recv(&late, deadline_ms(50)).is_none(),
        "a query sent after SIGTERM was answered"
    );
    assert!(
        s.upstream.wait_until(deadline_ms(2000), |st| st.peer_close_notify >= 1),
        "no close_notify at shutdown: {:?}",
        s.upstream.stats().peer_eof
    );
}

/// L2: clients reset their connections while the proxy is writing big
/// answers to them: no death by SIGPIPE, nothing leaked, still serving.
#[test]
fn l2_client_reset_mid_write() {
    let (mut s, fds) = Setup::observed(Script::default(), 2000, &[]);
    for round in 0..5u16 {
        let c = TcpClient::connect(s.proxy.tcp_addr());
        set_rcvbuf(&c.stream, 4096);
        // Eight 50 KB answers: 400 KB, under the 512 KiB of unread answers
        // at which the proxy closes the client itself, so that it is still
        // writing when the reset comes.
        let mut buf = Vec::new();
        for i in 0..8u16 {
            buf.extend_from_slice(&frame(&query(round * 100 + i, "txt200.example")));
        }
        let mut c = c;
        c.stream.write_all(&buf).unwrap();
        // Mid-write: the first bytes of a 50 KB answer have come, and the
        // 4 KB receive buffer cannot hold the rest.
        c.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let got = c.stream.peek(&mut [0u8; 1]);
        assert!(
            matches!(got, Ok(n) if n > 0),
            "round {round}: the proxy never started writing: {got:?}"
        );
        reset(c.stream);
    }
    // The proxy has seen every reset (or died of one).
    let gone = wait_until(deadline_ms(3000), || {
        !s.proxy.alive() || s.proxy.metrics().tcp_clients() == 0.0
    });
    assert!(s.proxy.alive(), "proxy died (SIGPIPE?)");
    assert!(gone, "the reset clients are still counted");
    quiescent(&s.proxy, fds);
}

/// L3: an upstream on port 53 (plain DNS) or without a name is refused at
/// start with status 2 and one line that names the upstream and the fault.
#[test]
fn l3_refuses_port_53_and_unnamed_upstreams() {
    for (spec, needle) in [("127.0.0.1:53#dns.test", "53"), ("127.0.0.1:853", "#NAME")] {
        let out = run_to_exit(&["--listen", "127.0.0.1:0", "--upstream", spec], Duration::from_secs(5));
        let st = out.status.expect("did not exit within 5 s");
        assert_eq!(st.code(), Some(2), "{spec}: {st:?}; stderr: {}", out.stderr);
        let lines: Vec<_> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{spec}: expected one stderr line, got {lines:?}");
        assert!(lines[0].contains(needle), "{spec}: {}", lines[0]);
        assert!(
            lines[0].contains(spec) || lines[0].to_lowercase().contains("upstream"),
            "{spec}: the line does not say which option is wrong: {}",
            lines[0]
        );
    }
}
