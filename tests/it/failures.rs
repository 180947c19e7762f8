//! Upstream failures: silence, bad certificates, nothing listening, closed
//! connections, failover.

use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::client::udp_bulk;
use crate::util::dns::{Message, RCODE_NOERROR, RCODE_SERVFAIL};
use crate::util::{
    dead_port, deadline_ms, query, tcp_exchange, udp_exchange, CloseKind, Leaf, Script, Setup, TcpClient, TestCa,
    TestProxy, TestUpstream, NAME,
};

fn assert_servfail(r: Option<Vec<u8>>, id: u16, what: &str) -> Message {
    let r = r.unwrap_or_else(|| panic!("{what}: no answer at all"));
    let m = Message::must(&r);
    assert_eq!(m.id, id, "{what}: ID not restored");
    assert!(m.qr, "{what}: QR not set");
    assert_eq!(m.rcode, RCODE_SERVFAIL, "{what}: expected SERVFAIL");
    m
}

/// Time one UDP and one TCP exchange; both must be SERVFAIL.
fn servfail_times(proxy: &TestProxy) -> (Duration, Duration) {
    let t = Instant::now();
    let r = udp_exchange(proxy.udp_addr(), &query(0x5F01, "a.example"), deadline_ms(5000));
    assert_servfail(r, 0x5F01, "udp");
    let udp = t.elapsed();
    let t = Instant::now();
    let r = tcp_exchange(proxy.tcp_addr(), &query(0x5F02, "b.example"), deadline_ms(5000));
    assert_servfail(r, 0x5F02, "tcp");
    (udp, t.elapsed())
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

/// One never-answered query must not hold up the others on the same
/// upstream connection.
#[test]
fn silent_query_does_not_block_others() {
    let s = Setup::with_timeout(Script::default(), 800);
    let sock = crate::util::udp_socket();
    let t = Instant::now();
    sock.send_to(&query(1, "silent.example"), s.proxy.udp_addr()).unwrap();
    sock.send_to(&query(2, "fine.example"), s.proxy.udp_addr()).unwrap();
    let first = crate::util::udp_recv(&sock, deadline_ms(5000)).expect("an answer");
    assert_default_answer(&first, 2, "fine.example");
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    let second = crate::util::udp_recv(&sock, deadline_ms(5000));
    assert_servfail(second, 1, "silent.example");
    assert!(t.elapsed() >= Duration::from_millis(600), "{:?}", t.elapsed());
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

/// An upstream that accepts TCP but never does TLS: SERVFAIL by the deadline.
#[test]
fn upstream_never_handshakes_servfail() {
    let s = Setup::with_timeout(Script::no_handshake(), 500);
    let t = Instant::now();
    let r = udp_exchange(s.proxy.udp_addr(), &query(4, "a.example"), deadline_ms(5000));
    assert_servfail(r, 4, "no handshake");
    assert!(t.elapsed() <= Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(s.upstream.query_count(), 0);
}

/// The upstream presents `leaf`; the proxy trusts `ca` and expects
/// dns.test, with a long --timeout: SERVFAIL must come fast (< 1 s), and
/// not a single query may reach the upstream.
fn assert_cert_rejected(ca: &TestCa, leaf: Leaf, what: &str) {
    let up = TestUpstream::start(leaf.server_config(), Script::default());
    let proxy = TestProxy::for_upstream(ca, &up, NAME, 2500, &[]);
    let (udp, tcp) = servfail_times(&proxy);
    assert!(udp < Duration::from_secs(1), "{what}: udp SERVFAIL after {udp:?}");
    assert!(tcp < Duration::from_secs(1), "{what}: tcp SERVFAIL after {tcp:?}");
    assert_eq!(up.query_count(), 0, "{what}: a query reached the upstream");
    assert_eq!(up.handshakes(), 0, "{what}: handshake completed");
}

#[test]
fn wrong_cert_name_servfail_fast() {
    let ca = TestCa::new();
    assert_cert_rejected(&ca, ca.leaf(&["other.test"]), "wrong name");
}

#[test]
fn self_signed_cert_servfail_fast() {
    assert_cert_rejected(&TestCa::new(), Leaf::self_signed(&[NAME]), "self-signed");
}

#[test]
fn unknown_ca_cert_servfail_fast() {
    assert_cert_rejected(&TestCa::new(), Leaf::from_unknown_ca(&[NAME]), "unknown CA");
}

#[test]
fn expired_cert_servfail_fast() {
    let ca = TestCa::new();
    assert_cert_rejected(&ca, ca.expired_leaf(&[NAME]), "expired");
}

#[test]
fn not_yet_valid_cert_servfail_fast() {
    let ca = TestCa::new();
    assert_cert_rejected(&ca, ca.not_yet_valid_leaf(&[NAME]), "not yet valid");
}

#[test]
fn upstream_down_servfail_fast() {
    let ca = TestCa::new();
    let up = format!("127.0.0.1:{}#{NAME}", dead_port());
    let proxy = TestProxy::start(&["--upstream", &up, "--ca-file", ca.pem_path_str(), "--timeout", "2500"]);
    let (udp, tcp) = servfail_times(&proxy);
    assert!(udp < Duration::from_secs(1), "udp SERVFAIL after {udp:?}");
    assert!(tcp < Duration::from_secs(1), "tcp SERVFAIL after {tcp:?}");
    // And again (a reconnect attempt must not wedge anything).
    let (udp, tcp) = servfail_times(&proxy);
    assert!(udp < Duration::from_secs(1) && tcp < Duration::from_secs(1));
}

#[test]
fn second_upstream_used_when_first_down() {
    let ca = TestCa::new();
    let good = TestUpstream::for_name(&ca, NAME, Script::default());
    let down = format!("127.0.0.1:{}#{NAME}", dead_port());
    let good_arg = good.arg(NAME);
    let proxy = TestProxy::start(&[
        "--upstream",
        &down,
        "--upstream",
        &good_arg,
        "--ca-file",
        ca.pem_path_str(),
        "--timeout",
        "2000",
    ]);
    for i in 0..5u16 {
        let name = format!("fo{i}.example");
        let r = udp_exchange(proxy.udp_addr(), &query(i, &name), deadline_ms(5000));
        assert_default_answer(&r.expect("no answer"), i, &name);
    }
    let r = tcp_exchange(proxy.tcp_addr(), &query(9, "fo-tcp.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("no TCP answer"), 9, "fo-tcp.example");
    assert!(good.query_count() >= 6);
}

/// The upstream closes every connection after 10 answers; 100 UDP
/// (windowed) and 100 TCP (pipelined) queries are all answered NOERROR.
fn closes_every_10(kind: CloseKind) {
    let s = Setup::with_timeout(Script::close_after(10, kind), 3000);
    let qs: Vec<_> = (0..100u16).map(|i| query(i, &format!("u{i}.example"))).collect();
    let r = udp_bulk(s.proxy.udp_addr(), &qs, 10, None, deadline_ms(20_000));
    for (i, a) in r.answers.iter().enumerate() {
        let a = a
            .as_ref()
            .unwrap_or_else(|| panic!("{kind:?}: UDP query {i} unanswered ({} answered)", r.answered()));
        let m = Message::must(a);
        assert_eq!(m.rcode, RCODE_NOERROR, "{kind:?}: UDP query {i}: rcode");
        assert_eq!(m.qname(), format!("u{i}.example"));
    }
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
