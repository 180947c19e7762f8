//! Upstream failures seen from the client: a silent upstream (SERVFAIL at
//! the deadline, over UDP and TCP), a slow answer inside the deadline, and
//! an upstream that closes every connection after ten answers. Certificate
//! failures are in `fault_tls`; upstreams that are down, never complete the
//! handshake or fail over are in `fault_tls` and `fault_upstream`.

use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::client::{assert_bulk_ok, udp_bulk};
use crate::util::dns::{Message, RCODE_NOERROR, RCODE_SERVFAIL};
use crate::util::{deadline_ms, query, udp_exchange, CloseKind, Script, Setup, TcpClient};

fn assert_servfail(r: Option<Vec<u8>>, id: u16, what: &str) -> Message {
    let r = r.unwrap_or_else(|| panic!("{what}: no answer at all"));
    let m = Message::must(&r);
    assert_eq!(m.id, id, "{what}: ID not restored");
    assert!(m.qr, "{what}: QR not set");
    assert_eq!(m.rcode, RCODE_SERVFAIL, "{what}: expected SERVFAIL");
    m
}

/// A silent upstream: UDP and TCP queries (sent together, so that neither
/// sees an upstream already marked down) get SERVFAIL at the deadline.
#[test]
fn upstream_silent_servfail_at_deadline() {
    let s = Setup::with_timeout(Script::silent(), 500);
    let sock = crate::util::udp_socket();
    let mut tcp = TcpClient::connect(s.proxy.tcp_addr());
    let t0 = Instant::now();
    sock.send_to(&query(0x5F01, "a.example"), s.proxy.udp_addr()).unwrap();
    tcp.send(&query(0x5F02, "b.example"));
    let u = crate::util::udp_recv(&sock, deadline_ms(5000));
    let udp_t = t0.elapsed();
    assert_servfail(u, 0x5F01, "udp");
    let t = tcp.recv(deadline_ms(5000));
    let tcp_t = t0.elapsed();
    assert_servfail(t, 0x5F02, "tcp");
    for (what, t) in [("udp", udp_t), ("tcp", tcp_t)] {
        assert!(
            t >= Duration::from_millis(300) && t <= Duration::from_secs(2),
            "{what}: SERVFAIL after {t:?} with --timeout 500"
        );
    }
    assert!(s.upstream.query_count() >= 2);
}

/// An answer that comes late but inside the deadline is delivered.
#[test]
fn slow_answer_within_deadline_delivered() {
    let script = Script {
        slow_delay: Duration::from_millis(300),
        ..Script::default()
    };
    let s = Setup::with_timeout(script, 2000);
    let r = udp_exchange(s.proxy.udp_addr(), &query(3, "slow.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("answer"), 3, "slow.example");
}

/// The upstream closes every connection after 10 answers; 100 UDP
/// (windowed) and 100 TCP (pipelined) queries are all answered NOERROR.
fn closes_every_10(kind: CloseKind) {
    let s = Setup::with_timeout(Script::close_after(10, kind), 3000);
    let qs: Vec<_> = (0..100u16).map(|i| query(i, &format!("u{i}.example"))).collect();
    let r = udp_bulk(s.proxy.udp_addr(), &qs, 10, None, deadline_ms(20_000));
    assert_bulk_ok(&r, |i| format!("u{i}.example"), &format!("{kind:?}: UDP"));
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let qs: Vec<_> = (0..100u16).map(|i| query(i, &format!("t{i}.example"))).collect();
    c.send_many(&qs);
    let answers = c.recv_n(100, deadline_ms(20_000));
    assert_eq!(answers.len(), 100, "{kind:?}: TCP answers");
    let mut ids: Vec<u16> = answers
        .iter()
        .map(|a| {
            let m = Message::must(a);
            assert_eq!(m.rcode, RCODE_NOERROR, "{kind:?}: TCP {}: rcode", m.qname());
            assert_eq!(m.qname(), format!("t{}.example", m.id));
            m.id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    let closed = s.upstream.stats().closed_by_upstream;
    // 200 answers, a close every 10 per connection: at least 10 closes even
    // if the proxy spreads queries over several connections.
    assert!(closed >= 10, "{kind:?}: upstream closed only {closed} connections");
}

#[test]
fn upstream_closes_every_10_with_close_notify() {
    closes_every_10(CloseKind::CloseNotify);
}

#[test]
fn upstream_closes_every_10_with_fin() {
    closes_every_10(CloseKind::Fin);
}

#[test]
fn upstream_closes_every_10_with_rst() {
    closes_every_10(CloseKind::Rst);
}

/// TCP alone (no UDP traffic to wake anything up): SERVFAIL at the deadline.
#[test]
fn tcp_only_silent_upstream_servfail_at_deadline() {
    let s = Setup::with_timeout(Script::silent(), 500);
    let mut tcp = TcpClient::connect(s.proxy.tcp_addr());
    let t0 = Instant::now();
    let r = tcp.exchange(&query(0x5F03, "c.example"), deadline_ms(5000));
    let t = t0.elapsed();
    assert_servfail(r, 0x5F03, "tcp");
    assert!(
        t >= Duration::from_millis(300) && t <= Duration::from_secs(2),
        "SERVFAIL after {t:?} with --timeout 500"
    );
}
