//! Authenticating the upstream and surviving what its TLS layer does:
//! chains with and without intermediates, wrong names, expired and not yet
//! valid certificates, unknown CAs, handshakes that never complete or are
//! refused, servers that answer the ClientHello with something else, a
//! TLS 1.1-only server, a certificate that changes under a live
//! connection, KeyUpdate. SPKI pins (A5) and session resumption (A10) are
//! tested in `features.rs`.
//!
//! Test names start with the case's label (A1, A2, …): the labels only
//! number the cases of this module, so that a comment or a commit can
//! name one.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::dns::{self, Message, RCODE_SERVFAIL};
use crate::util::net::RawServer;
use crate::util::wire::{assert_servfail_ede, ede_of, query_opt, OptSpec};
use crate::util::{
    dead_port, deadline_ms, observed_over, query, quiescent, quiescent_idle, tcp_exchange, udp_exchange, Action,
    CloseKind, Leaf, Script, TestCa, TestProxy, TestUpstream, NAME,
};

/// A proxy for one upstream `addr#NAME` trusting `ca`, with metrics.
fn proxy_for(ca: &TestCa, upstream: impl Into<String>, timeout_ms: u64) -> (TestProxy, usize) {
    observed_over(ca, &[upstream.into()], timeout_ms)
}

/// An EDNS query over UDP (or over a fresh TCP connection) must get
/// SERVFAIL with one of `edes` within `within`; returns the time it took.
fn servfail_ede_over(p: &TestProxy, tcp: bool, id: u16, edes: &[u16], within: Duration, what: &str) -> Duration {
    let t = Instant::now();
    let q = query_opt(id, &format!("q{id}.example"), OptSpec::stub());
    let r = if tcp {
        tcp_exchange(p.tcp_addr(), &q, deadline_ms(5000))
    } else {
        udp_exchange(p.udp_addr(), &q, deadline_ms(5000))
    };
    let r = r.unwrap_or_else(|| panic!("{what}: no answer"));
    let took = t.elapsed();
    assert_servfail_ede(&Message::must(&r), id, edes, what);
    assert!(took <= within, "{what}: SERVFAIL after {took:?}");
    took
}

/// [`servfail_ede_over`] UDP.
fn expect_servfail_ede(p: &TestProxy, id: u16, edes: &[u16], within: Duration, what: &str) -> Duration {
    servfail_ede_over(p, false, id, edes, within, what)
}

/// [`servfail_ede_over`] TCP.
fn expect_servfail_ede_tcp(p: &TestProxy, id: u16, edes: &[u16], within: Duration, what: &str) -> Duration {
    servfail_ede_over(p, true, id, edes, within, what)
}

/// The upstream presents `leaf`: the handshake fails, SERVFAIL + EDE 23
/// comes at once (long --timeout) over UDP and TCP, not one DNS byte
/// reaches the server, the failure is counted and the upstream shown down.
fn assert_auth_fails(ca: &TestCa, leaf: Leaf, what: &str) {
    let up = TestUpstream::start(leaf.server_config(), Script::default());
    let (p, fds) = proxy_for(ca, up.arg(NAME), 2500);
    expect_servfail_ede(&p, 0xA200, &[23], Duration::from_millis(1000), what);
    // During the back-off: still at once, over UDP and TCP.
    expect_servfail_ede(&p, 0xA201, &[23], Duration::from_millis(300), what);
    expect_servfail_ede_tcp(&p, 0xA202, &[23], Duration::from_millis(1000), &format!("{what}, TCP"));
    assert_eq!(up.handshakes(), 0, "{what}: handshake completed");
    assert_eq!(up.query_count(), 0, "{what}: DNS reached the server");
    assert!(
        up.wait_until(deadline_ms(2000), |s| !s.tls_errors.is_empty()),
        "{what}: server saw no TLS error"
    );
    let m = p.metrics();
    assert!(
        m.sum("dotproxy_upstream_failures_total") >= 1.0,
        "{what}: failure not counted"
    );
    assert_eq!(m.sum("dotproxy_upstream_up"), 0.0, "{what}: upstream shown up");
    quiescent_idle(&p, fds);
}

/// A1: a valid chain for the configured name: answered; the server saw a
/// TLS record first, SNI = the name, ALPN "dot" offered.
#[test]
fn a1_valid_chain_sni_and_alpn() {
    let ca = TestCa::new();
    let cfg = ca
        .leaf(&[NAME])
        .server_config_with(|c| c.alpn_protocols = vec![b"dot".to_vec()]);
    let up = TestUpstream::start(cfg, Script::default());
    let (p, fds) = proxy_for(&ca, up.arg(NAME), 2000);
    let r = udp_exchange(p.udp_addr(), &query(0xA100, "a1.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("no answer"), 0xA100, "a1.example");
    let st = up.stats();
    assert_eq!(st.sni, vec![Some(NAME.to_string())], "SNI");
    assert_eq!(st.alpn, vec![Some(b"dot".to_vec())], "ALPN");
    assert_eq!(
        st.first_bytes.get(&1).and_then(|b| b.first()),
        Some(&0x16),
        "first byte not a handshake record"
    );
    quiescent(&p, fds);
}

/// A1 with an intermediate the server sends: the chain is built and
/// accepted; a TLS 1.2-only server works too.
#[test]
fn a1_intermediate_sent_and_tls12_only_server_accepted() {
    let ca = TestCa::new();
    let sub = ca.sub_ca();
    let mut leaf = sub.leaf(&[NAME]);
    leaf.chain.push(sub.der());
    let up = TestUpstream::start(leaf.server_config(), Script::default());
    let (p, fds) = proxy_for(&ca, up.arg(NAME), 2000);
    let r = udp_exchange(p.udp_addr(), &query(0xA110, "chain.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("chain via intermediate refused"), 0xA110, "chain.example");
    quiescent(&p, fds);

    let leaf = ca.leaf(&[NAME]);
    let cfg = rustls::ServerConfig::builder_with_provider(crate::util::certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("TLS 1.2")
        .with_no_client_auth()
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .expect("cert");
    let up12 = TestUpstream::start(Arc::new(cfg), Script::default());
    let (p, fds) = proxy_for(&ca, up12.arg(NAME), 2000);
    let r = udp_exchange(p.udp_addr(), &query(0xA111, "tls12.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("TLS 1.2 server refused"), 0xA111, "tls12.example");
    quiescent(&p, fds);
}

/// A2: a certificate for another name.
#[test]
fn a2_wrong_name() {
    let ca = TestCa::new();
    assert_auth_fails(&ca, ca.leaf(&["other.test"]), "wrong name");
}

/// A2, variant: the right name in the CN but not in the SANs (only the
/// SANs count: RFC 6125 §6.4.4).
#[test]
fn a2_name_in_cn_only() {
    let ca = TestCa::new();
    assert_auth_fails(&ca, ca.leaf_cn_san(NAME, &["other.test"]), "name in CN only");
}

/// A3: expired and not yet valid.
#[test]
fn a3_expired_and_not_yet_valid() {
    let ca = TestCa::new();
    assert_auth_fails(&ca, ca.expired_leaf(&[NAME]), "expired");
    assert_auth_fails(&ca, ca.not_yet_valid_leaf(&[NAME]), "not yet valid");
}

/// A4: self-signed, unknown CA, intermediate not sent.
#[test]
fn a4_self_signed_unknown_ca_missing_intermediate() {
    let ca = TestCa::new();
    assert_auth_fails(&ca, Leaf::self_signed(&[NAME]), "self-signed");
    assert_auth_fails(&ca, Leaf::from_unknown_ca(&[NAME]), "unknown CA");
    let sub = ca.sub_ca();
    assert_auth_fails(&ca, sub.leaf(&[NAME]), "intermediate not sent");
}

/// A6: the server accepts TCP and never answers the ClientHello: SERVFAIL
/// with an EDE by the deadline, then back-off: few connection attempts.
#[test]
fn a6_handshake_never_completes() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::no_handshake());
    let (p, fds) = proxy_for(&ca, up.arg(NAME), 500);
    let t0 = Instant::now();
    expect_servfail_ede(&p, 0xA600, &[22, 23], Duration::from_millis(900), "first query");
    // Keep asking for 1.5 s: each answer comes by the deadline, and the
    // server sees a reconnect only after each back-off.
    let mut n = 1u16;
    while t0.elapsed() < Duration::from_millis(1500) {
        expect_servfail_ede(&p, 0xA600 + n, &[22, 23], Duration::from_millis(900), "later query");
        n += 1;
        // The stimulus: a query every 50 ms, against which the number of
        // connection attempts is measured.
        std::thread::sleep(Duration::from_millis(50));
    }
    let accepts = up.accepts();
    assert!(
        accepts <= 4,
        "{accepts} connection attempts in {:?} ({n} queries)",
        t0.elapsed()
    );
    assert_eq!(up.query_count(), 0);
    assert!(p.metrics().sum("dotproxy_upstream_failures_total") >= 1.0);
    quiescent_idle(&p, fds);
}

/// A7: nothing listens: SERVFAIL + EDE 23 at once, connection attempts
/// bounded by the back-off, no CPU spin.
#[test]
fn a7_connection_refused() {
    let ca = TestCa::new();
    let up = format!("127.0.0.1:{}#{NAME}", dead_port());
    let (p, fds) = proxy_for(&ca, up, 2500);
    let cpu0 = p.cpu_ticks();
    let t0 = Instant::now();
    for i in 0..40u16 {
        expect_servfail_ede(&p, 0xA700 + i, &[23], Duration::from_millis(200), "refused");
        // The stimulus: a query every 25 ms, against which connection
        // attempts and CPU time are measured.
        std::thread::sleep(Duration::from_millis(25));
    }
    expect_servfail_ede_tcp(&p, 0xA7FF, &[23], Duration::from_millis(200), "refused, TCP");
    let elapsed = t0.elapsed();
    let m = p.metrics();
    let connects = m.sum("dotproxy_upstream_connects_total");
    // Back-off 250 ms doubling (jitter up to -25 %): about 3 tries a second.
    assert!(connects <= 6.0, "{connects} connects for 40 queries in {elapsed:?}");
    let cpu = p.cpu_ticks() - cpu0;
    assert!(cpu <= 25, "{cpu} ticks of CPU for 40 queries in {elapsed:?}");
    quiescent_idle(&p, fds);
}

/// A8: a server that answers the ClientHello with plaintext DNS, or with
/// garbage: the handshake fails, and no query ever went out in clear.
#[test]
fn a8_plaintext_or_garbage_instead_of_server_hello() {
    let ca = TestCa::new();
    let plain = dns::frame(&dns::default_answer(&query(0, "a8.example")).expect("answer"));
    for (what, reply) in [("plaintext DNS", plain), ("garbage", crate::util::wire::noise(8, 300))] {
        let server = RawServer::start(reply);
        let (p, fds) = proxy_for(&ca, format!("{}#{NAME}", server.addr()), 2500);
        let q = query_opt(0xA800, "secret-name.example", OptSpec::stub());
        let t = Instant::now();
        let r = udp_exchange(p.udp_addr(), &q, deadline_ms(5000)).unwrap_or_else(|| panic!("{what}: no answer"));
        let m = Message::must(&r);
        assert_eq!(m.rcode, RCODE_SERVFAIL, "{what}");
        assert!(ede_of(&m).iter().any(|(c, _)| *c == 23), "{what}: EDE {:?}", ede_of(&m));
        assert!(t.elapsed() < Duration::from_secs(1), "{what}: after {:?}", t.elapsed());
        let got = server.received();
        assert!(!got.is_empty(), "{what}: the proxy never connected");
        for bytes in &got {
            assert_eq!(
                bytes.first(),
                Some(&0x16),
                "{what}: first byte not a TLS handshake record"
            );
            assert!(
                !bytes.windows(11).any(|w| w == b"secret-name"),
                "{what}: the query name went out in clear"
            );
        }
        quiescent_idle(&p, fds);
    }
}

/// A9: a server offering only TLS 1.1 (openssl s_server) is refused.
/// Needs the openssl command line tool.
#[test]
fn a9_tls11_only_server_refused() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&[NAME]);
    let (cert, key) = leaf.write_pem(ca.dir());
    let port = dead_port();
    let spawned = Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-tls1_1"])
        .args(["-cipher", "DEFAULT:@SECLEVEL=0", "-quiet", "-naccept", "20"])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = spawned.unwrap_or_else(|e| panic!("a9 needs the openssl command (Debian: openssl): {e}"));
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Kill(child);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = crate::util::wait_until(deadline_ms(3000), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
    });
    assert!(up, "openssl s_server did not start (exit: {:?})", guard.0.try_wait());
    let (p, fds) = proxy_for(&ca, format!("{addr}#{NAME}"), 2500);
    expect_servfail_ede(&p, 0xA900, &[23], Duration::from_millis(1000), "TLS 1.1 server");
    assert!(p.metrics().sum("dotproxy_upstream_failures_total") >= 1.0);
    quiescent_idle(&p, fds);
}

/// A11: the server is "restarted" with a wrong certificate while an old
/// connection is healthy: the old one keeps serving until the server
/// closes it; the new connection then fails like A2.
#[test]
fn a11_certificate_changes_under_a_live_connection() {
    let ca = TestCa::new();
    let script = Script::default().with_hook(|ctx| {
        crate::util::upstream::first_label_starts_with(ctx.query, "last").then(|| {
            vec![
                Action::Answer,
                Action::Delay(Duration::from_millis(20)),
                Action::Close(CloseKind::CloseNotify),
            ]
        })
    });
    let up = TestUpstream::start(ca.leaf(&[NAME]).server_config(), script);
    let (p, fds) = proxy_for(&ca, up.arg(NAME), 2000);
    let ask = |id: u16, name: &str| udp_exchange(p.udp_addr(), &query(id, name), deadline_ms(3000));
    assert_default_answer(
        &ask(0xB100, "before.example").expect("answer"),
        0xB100,
        "before.example",
    );
    up.set_config(ca.leaf(&["other.test"]).server_config());
    for i in 1..5u16 {
        let name = format!("old{i}.example");
        assert_default_answer(&ask(0xB100 + i, &name).expect("old connection"), 0xB100 + i, &name);
    }
    assert_eq!(up.accepts(), 1, "the healthy connection was replaced");
    assert_default_answer(&ask(0xB110, "last.example").expect("answer"), 0xB110, "last.example");
    assert!(
        up.wait_until(deadline_ms(2000), |s| s.open == 0),
        "server did not close"
    );
    expect_servfail_ede(
        &p,
        0xB111,
        &[23],
        Duration::from_millis(1000),
        "new connection, wrong cert",
    );
    assert_eq!(up.accepts(), 2);
    assert_eq!(up.handshakes(), 1, "the wrong certificate was accepted");
    quiescent_idle(&p, fds);
}

/// A12: a TLS 1.3 KeyUpdate from the server mid-stream: traffic continues
/// on the same connection. (A TLS 1.2 renegotiation request cannot be made
/// with rustls as the server; not covered.)
#[test]
fn a12_key_update_mid_stream() {
    let ca = TestCa::new();
    let script = Script::default().with_hook(|ctx| (ctx.index == 2).then(|| vec![Action::KeyUpdate, Action::Answer]));
    let up = TestUpstream::for_name(&ca, NAME, script);
    let (p, fds) = proxy_for(&ca, up.arg(NAME), 2000);
    for i in 0..8u16 {
        let name = format!("ku{i}.example");
        let r = udp_exchange(p.udp_addr(), &query(0xC000 + i, &name), deadline_ms(3000));
        assert_default_answer(&r.unwrap_or_else(|| panic!("{name}: no answer")), 0xC000 + i, &name);
    }
    let st = up.stats();
    assert_eq!(st.key_updates, 1, "KeyUpdate not sent: {:?}", st.tls_errors);
    assert_eq!(st.accepts, 1, "connection replaced after KeyUpdate");
    assert!(st.tls_errors.is_empty(), "{:?}", st.tls_errors);
    quiescent(&p, fds);
}
