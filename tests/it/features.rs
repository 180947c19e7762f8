//! Features beyond plain forwarding: SPKI pinning, TLS session resumption,
//! padding off, split forwarding, latency-aware upstream choice, the
//! cache, reload on SIGHUP, SO_REUSEPORT and the per-option limits.

use std::time::Duration;

use crate::it::basic::assert_default_answer;
use crate::util::dns::{Message, RCODE_SERVFAIL};
use crate::util::{deadline_ms, query, udp_exchange, CloseKind, Leaf, Script, TestCa, TestProxy, TestUpstream, NAME};

/// The RFC 7469 pin of a leaf: base64(SHA-256(SubjectPublicKeyInfo)),
/// computed from the key independently of the proxy's own code.
fn pin_of(leaf: &Leaf) -> String {
    let key = rcgen::KeyPair::try_from(leaf.key_der.as_slice()).expect("leaf key");
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
    base64(digest.as_ref())
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pinned_proxy(ca: &TestCa, up: &TestUpstream, spec: &str) -> TestProxy {
    TestProxy::over(ca, &[format!("{}{spec}", up.addr())], 2000, &[])
}

fn ask(proxy: &TestProxy, id: u16, name: &str) -> Vec<u8> {
    udp_exchange(proxy.udp_addr(), &query(id, name), deadline_ms(5000)).expect("an answer")
}

fn rcode(r: &[u8]) -> u8 {
    Message::must(r).rcode
}

#[test]
fn pin_with_name_both_must_match() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&[NAME]);
    let up = TestUpstream::start(leaf.server_config(), Script::default());
    let good = pinned_proxy(&ca, &up, &format!("#{NAME}@pin={}", pin_of(&leaf)));
    assert_default_answer(&ask(&good, 1, "pin.example"), 1, "pin.example");

    let other = Leaf::self_signed(&["x.test"]);
    let wrong = pinned_proxy(&ca, &up, &format!("#{NAME}@pin={}", pin_of(&other)));
    assert_eq!(rcode(&ask(&wrong, 2, "pin2.example")), RCODE_SERVFAIL);
    assert!(
        wrong.wait_for_log("SPKI pin", deadline_ms(2000)),
        "{}",
        wrong.log_text()
    );

    // Right pin but the certificate does not carry the configured name.
    let named_wrong = pinned_proxy(&ca, &up, &format!("#other.test@pin={}", pin_of(&leaf)));
    assert_eq!(rcode(&ask(&named_wrong, 3, "pin3.example")), RCODE_SERVFAIL);
}

#[test]
fn pin_alone_authenticates_a_self_signed_server() {
    let ca = TestCa::new();
    let leaf = Leaf::self_signed(&["anything.test"]);
    let up = TestUpstream::start(leaf.server_config(), Script::default());
    let proxy = pinned_proxy(&ca, &up, &format!("@pin={}", pin_of(&leaf)));
    assert_default_answer(&ask(&proxy, 7, "self.example"), 7, "self.example");
    // Without the pin the same server is refused.
    let plain = pinned_proxy(&ca, &up, "#anything.test");
    assert_eq!(rcode(&ask(&plain, 8, "self2.example")), RCODE_SERVFAIL);
}

#[test]
fn reconnects_resume_the_tls_session() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::close_after(1, CloseKind::CloseNotify));
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &[]);
    for i in 0..4u16 {
        let name = format!("r{i}.example");
        assert_default_answer(&ask(&proxy, i, &name), i, &name);
    }
    // The server closing a used connection is normal, not an outage.
    assert_eq!(proxy.count_log("down"), 0, "{}", proxy.log_text());
    assert!(up.handshakes() >= 4, "handshakes {}", up.handshakes());
    assert!(
        up.resumed_handshakes() >= 3,
        "resumed {} of {}",
        up.resumed_handshakes(),
        up.handshakes()
    );
}

/// `--padding 0`: the query goes upstream as the client sent it (but for
/// the ID). Padding itself is checked in `fault_edns` (e6).
#[test]
fn padding_off_sends_queries_unchanged() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--padding", "0"]);
    let q = query(5, "plain.example");
    udp_exchange(proxy.udp_addr(), &q, deadline_ms(5000)).expect("answer");
    let seen = up.queries();
    assert_eq!(seen[0].bytes.len(), q.len());
    assert_eq!(&seen[0].bytes[2..], &q[2..]);
}

#[test]
fn split_forwarding_longest_zone_wins() {
    let ca = TestCa::new();
    let public = TestUpstream::for_name(&ca, NAME, Script::default());
    let corp = TestUpstream::for_name(&ca, NAME, Script::default());
    let lab = TestUpstream::for_name(&ca, NAME, Script::default());
    let (p, c, l) = (public.arg(NAME), corp.arg(NAME), lab.arg(NAME));
    let corp_fwd = format!("corp.example={c}");
    let lab_fwd = format!("lab.corp.example={l}@ca={}", ca.pem_path_str());
    let proxy = TestProxy::over(&ca, &[p], 2000, &["--forward", &corp_fwd, "--forward", &lab_fwd]);
    for (i, name) in [
        "www.example.com",
        "a.Corp.Example",
        "x.y.lab.corp.example",
        "corp.example.net",
        "lab.corp.example",
    ]
    .iter()
    .enumerate()
    {
        let m = Message::must(&ask(&proxy, i as u16, name));
        assert_eq!((m.id, m.rcode, m.ancount), (i as u16, 0, 1), "{name}");
    }
    let names = |u: &TestUpstream| -> Vec<String> {
        u.queries()
            .iter()
            .map(|q| Message::must(&q.bytes).question.unwrap().name.to_lowercase())
            .collect()
    };
    assert_eq!(names(&public), ["www.example.com", "corp.example.net"]);
    assert_eq!(names(&corp), ["a.corp.example"]);
    assert_eq!(names(&lab), ["x.y.lab.corp.example", "lab.corp.example"]);
}

/// Health learned from traffic: a resolver that answers slowly gets
/// fewer queries than a fast one; neither is starved of all traffic.
#[test]
fn slower_upstream_gets_less_traffic() {
    let ca = TestCa::new();
    let fast = TestUpstream::for_name(&ca, NAME, Script::default());
    let slow = TestUpstream::for_name(&ca, NAME, Script::delayed(Duration::from_millis(60)));
    let (f, s) = (fast.arg(NAME), slow.arg(NAME));
    let proxy = TestProxy::over(&ca, &[s, f], 2000, &[]);
    for i in 0..60u16 {
        let name = format!("h{i}.example");
        assert_default_answer(&ask(&proxy, i, &name), i, &name);
    }
    let (nf, ns) = (fast.query_count(), slow.query_count());
    assert_eq!(nf + ns, 60);
    assert!(ns >= 1, "the slow upstream was never tried");
    assert!(nf >= 4 * ns, "fast {nf}, slow {ns}");
}

fn ttl_of(r: &[u8]) -> u32 {
    Message::must(r).answers[0].ttl
}

#[test]
fn cache_answers_repeats_with_aged_ttl() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--cache-size", "100"]);
    let first = ask(&proxy, 1, "cached.example");
    assert_default_answer(&first, 1, "cached.example");
    assert_eq!(ttl_of(&first), 60);
    // The stimulus: over a second must pass for the cached TTL (whole
    // seconds) to age.
    std::thread::sleep(Duration::from_millis(1100));
    let q2 = query(2, "CACHED.example");
    let again = udp_exchange(proxy.udp_addr(), &q2, deadline_ms(5000)).expect("answer");
    let m = Message::must(&again);
    assert_eq!((m.id, m.rcode, m.ancount), (2, 0, 1));
    // The client's own letter case comes back (DNS 0x20 clients check it).
    assert_eq!(&again[12..q2.len()], &q2[12..]);
    assert!(ttl_of(&again) < 60, "TTL not aged: {}", ttl_of(&again));
    // The EDNS variant is a different entry (its answer carries an OPT).
    let e = udp_exchange(
        proxy.udp_addr(),
        &crate::util::query_edns(3, "cached.example", 1232),
        deadline_ms(5000),
    );
    assert!(Message::must(&e.expect("answer")).opt.is_some());
    assert_eq!(up.query_count(), 2, "upstream saw {} queries", up.query_count());
    // Off by default: every query goes upstream.
    let plain = TestProxy::for_upstream(&ca, &up, NAME, 2000, &[]);
    ask(&plain, 4, "x.example");
    ask(&plain, 5, "x.example");
    assert_eq!(up.query_count(), 4);
}

#[test]
fn identical_queries_in_flight_are_merged() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::delayed(Duration::from_millis(300)));
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--cache-size", "100"]);
    let socks: Vec<_> = (0..10).map(|_| crate::util::udp_socket()).collect();
    for (i, s) in socks.iter().enumerate() {
        s.send_to(&query(100 + i as u16, "merge.example"), proxy.udp_addr())
            .expect("send");
    }
    for (i, s) in socks.iter().enumerate() {
        let r = crate::util::client::udp_recv(s, deadline_ms(3000)).expect("answer");
        assert_default_answer(&r, 100 + i as u16, "merge.example");
    }
    assert_eq!(up.query_count(), 1);
}

#[test]
fn sighup_reloads_upstreams_without_dropping_queries() {
    let ca = TestCa::new();
    let old = TestUpstream::for_name(&ca, NAME, Script::delayed(Duration::from_millis(400)));
    let new = TestUpstream::for_name(&ca, NAME, Script::default());
    let conf = ca.dir().join("dotproxy.conf");
    let write = |up: &TestUpstream, extra: &str| {
        let text = format!(
            "# test\nupstream {}\nca-file {}\ntimeout 3000\n{extra}",
            up.arg(NAME),
            ca.pem_path_str()
        );
        std::fs::write(&conf, text).expect("write config");
    };
    write(&old, "");
    let proxy = TestProxy::start(&["--config", conf.to_str().expect("utf-8 path")]);
    // A query in flight on the old upstream when the reload happens.
    let sock = crate::util::udp_socket();
    sock.send_to(&query(1, "before.example"), proxy.udp_addr())
        .expect("send");
    assert!(old.wait_until(deadline_ms(2000), |s| s.queries.len() == 1));
    write(&new, "");
    proxy.signal(libc::SIGHUP);
    assert!(
        proxy.wait_for_log("configuration reloaded", deadline_ms(2000)),
        "{}",
        proxy.log_text()
    );
    let r = crate::util::client::udp_recv(&sock, deadline_ms(3000)).expect("the in-flight query was answered");
    assert_default_answer(&r, 1, "before.example");
    assert_default_answer(&ask(&proxy, 2, "after.example"), 2, "after.example");
    assert_eq!(new.query_count(), 1);
    assert_eq!(old.query_count(), 1);
    // A broken file is refused and the running configuration stays.
    std::fs::write(&conf, "upstream 127.0.0.1\n").expect("write config");
    proxy.signal(libc::SIGHUP);
    assert!(
        proxy.wait_for_log("reload failed", deadline_ms(2000)),
        "{}",
        proxy.log_text()
    );
    assert_default_answer(&ask(&proxy, 3, "still.example"), 3, "still.example");
    assert_eq!(new.query_count(), 2);
}

/// Two processes share one address with --reuseport and both serve it;
/// without the flag the second cannot bind.
#[test]
fn reuseport_lets_processes_share_a_port() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let first = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--reuseport"]);
    let shared = first.udp_addr().to_string();
    let second = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--reuseport", "--listen", &shared]);
    for i in 0..40u16 {
        // A new socket each time: the kernel spreads by source port.
        let name = format!("rp{i}.example");
        let r = udp_exchange(first.udp_addr(), &query(i, &name), deadline_ms(5000)).expect("answer");
        assert_default_answer(&r, i, &name);
    }
    let count = || (first.count_log("query from udp"), second.count_log("query from udp"));
    // The log lines arrive through a pipe: give the reader a moment.
    crate::util::client::wait_until(deadline_ms(2000), || count().0 + count().1 >= 40);
    let (a, b) = count();
    assert_eq!(a + b, 40);
    assert!(a > 0 && b > 0, "first {a}, second {b}");
    let upstream = up.arg(NAME);
    let out = crate::util::proxy::run_to_exit(
        &[
            "--listen",
            &shared,
            "--upstream",
            &upstream,
            "--ca-file",
            ca.pem_path_str(),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("cannot listen"), "{}", out.stderr);
}

/// `--max-query-size`: a larger query gets FORMERR (over UDP and TCP, the
/// connection stays usable); raising the limit lets it through.
#[test]
fn oversized_queries_get_formerr() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let big = crate::util::wire::query_opt(
        0x7001,
        "big-query.example",
        crate::util::wire::OptSpec::new(1232).option(65001, &[7; 4500]),
    );
    assert!(big.len() > 4096);
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &[]);
    let r = udp_exchange(proxy.udp_addr(), &big, deadline_ms(3000)).expect("FORMERR over UDP");
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (0x7001, 1));
    assert!(r.len() < 100);
    let mut c = crate::util::TcpClient::connect(proxy.tcp_addr());
    let r = c.exchange(&big, deadline_ms(3000)).expect("FORMERR over TCP");
    assert_eq!(Message::must(&r).rcode, 1);
    let r = c
        .exchange(&query(0x7002, "after.example"), deadline_ms(3000))
        .expect("connection still usable");
    assert_default_answer(&r, 0x7002, "after.example");
    assert_eq!(up.query_count(), 1);
    let roomy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--max-query-size", "8192"]);
    let r = crate::util::tcp_exchange(roomy.tcp_addr(), &big, deadline_ms(3000)).expect("answer");
    assert_eq!(Message::must(&r).rcode, 0);
    assert_eq!(up.query_count(), 2);
}

/// T15: `--max-tcp-queries 5`: the first five queries of a connection are
/// answered, then it is closed cleanly; the rest are not taken.
#[test]
fn tcp_query_quota_per_connection() {
    use crate::util::client::TcpEvent;
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--max-tcp-queries", "5"]);
    let mut c = crate::util::TcpClient::connect(proxy.tcp_addr());
    let qs: Vec<_> = (0..8u16).map(|i| query(i, &format!("q{i}.example"))).collect();
    c.send_many(&qs);
    let answers = c.recv_n(5, deadline_ms(3000));
    assert_eq!(answers.len(), 5);
    for a in &answers {
        let id = Message::must(a).id;
        assert!(id < 5, "query {id} was beyond the quota");
    }
    assert!(matches!(c.next_event(deadline_ms(3000)), TcpEvent::Closed { .. }));
    assert_eq!(up.query_count(), 5);
}

/// T16: `--max-tcp-clients-per-ip 3` (loopback counted, not exempt): with
/// three connections from one address each waiting for an answer, a fourth
/// from that address is closed at once while another address is served;
/// once the three are idle, a newcomer evicts the one idle longest instead
/// of being refused (RFC 7766 §6.2.3).
#[test]
fn tcp_connections_limited_per_address() {
    use crate::util::client::TcpEvent;
    let ca = TestCa::new();
    let hold = Script::default().with_hook(|ctx| {
        crate::util::upstream::first_label_starts_with(ctx.query, "hold").then(|| {
            vec![
                crate::util::Action::Delay(Duration::from_millis(700)),
                crate::util::Action::Answer,
            ]
        })
    });
    let up = TestUpstream::for_name(&ca, NAME, hold);
    let args = ["--max-tcp-clients-per-ip", "3", "--per-ip-exempt", "none"];
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &args);
    let mut held: Vec<_> = (0..3)
        .map(|_| crate::util::TcpClient::connect(proxy.tcp_addr()))
        .collect();
    for (i, c) in held.iter_mut().enumerate() {
        c.send(&query(i as u16, "hold.example"));
    }
    assert!(up.wait_until(deadline_ms(2000), |s| s.queries.len() == 3));
    let mut extra = crate::util::TcpClient::connect(proxy.tcp_addr());
    extra.send(&query(9, "extra.example"));
    assert!(
        matches!(
            extra.next_event(deadline_ms(3000)),
            TcpEvent::Closed { .. } | TcpEvent::Error(_)
        ),
        "a fourth connection was admitted while the three were busy"
    );
    let other = crate::util::net::tcp_connect_from("127.0.0.2".parse().unwrap(), proxy.tcp_addr()).expect("connect");
    let mut other = crate::util::TcpClient::from_stream(other);
    let r = other.exchange(&query(10, "other.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("another address served"), 10, "other.example");
    // The three get their answers and are idle from then on; held[0]
    // answered first, so it has been idle longest.
    for (i, c) in held.iter_mut().enumerate() {
        match c.next_event(deadline_ms(3000)) {
            TcpEvent::Frame(f) => {
                assert_default_answer(&f, i as u16, "hold.example");
            }
            e => panic!("held {i}: {e:?}"),
        }
    }
    let mut newcomer = crate::util::TcpClient::connect(proxy.tcp_addr());
    let r = newcomer.exchange(&query(11, "again.example"), deadline_ms(3000));
    assert_default_answer(
        &r.expect("newcomer served by evicting an idle one"),
        11,
        "again.example",
    );
    let mut evicted = 0;
    for c in held.iter_mut() {
        if matches!(
            c.next_event(deadline_ms(500)),
            TcpEvent::Closed { .. } | TcpEvent::Error(_)
        ) {
            evicted += 1;
        }
    }
    assert_eq!(evicted, 1, "exactly one idle connection makes room");
}

/// C14: `--max-upstream-conn-queries 10`: connections are rotated after ten
/// queries; every query is answered and no connection carries more.
#[test]
fn upstream_connections_rotated_after_n_queries() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let proxy = TestProxy::for_upstream(&ca, &up, NAME, 2000, &["--max-upstream-conn-queries", "10"]);
    for i in 0..35u16 {
        let name = format!("rot{i}.example");
        assert_default_answer(&ask(&proxy, i, &name), i, &name);
    }
    let mut per_conn = std::collections::HashMap::new();
    for q in up.queries() {
        *per_conn.entry(q.conn).or_insert(0) += 1;
    }
    assert!(per_conn.len() >= 4, "{per_conn:?}");
    assert!(per_conn.values().all(|&n| n <= 10), "{per_conn:?}");
    assert_eq!(proxy.count_log("down"), 0, "{}", proxy.log_text());
}
