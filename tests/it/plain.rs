//! Plain DNS upstreams for a `--forward` zone (`ZONE=plain:IP:PORT`), the
//! node-local case: cluster names to the cluster's DNS service over plain
//! TCP, everything else over TLS.

use std::time::Duration;

use crate::it::basic::assert_default_answer;
use crate::util::dns::{Message, RCODE_SERVFAIL};
use crate::util::plain::{PlainMode, PlainUpstream};
use crate::util::{
    deadline_ms, query, run_to_exit, tcp_exchange, udp_exchange, wait_until, Script, TestCa, TestProxy, TestUpstream,
    NAME,
};

fn split(plain: &PlainUpstream, extra: &[&str]) -> (TestCa, TestUpstream, TestProxy) {
    let ca = TestCa::new();
    let dot = TestUpstream::for_name(&ca, NAME, Script::default());
    let fwd = format!("cluster.local=plain:{}", plain.addr());
    let mut args = vec!["--forward", fwd.as_str(), "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proxy = TestProxy::over(&ca, &[dot.arg(NAME)], 1000, &args);
    (ca, dot, proxy)
}

#[test]
fn cluster_names_go_plain_and_the_rest_over_tls() {
    let plain = PlainUpstream::start(PlainMode::Answer);
    let (_ca, dot, proxy) = split(&plain, &[]);
    let r = udp_exchange(
        proxy.udp_addr(),
        &query(11, "kube-dns.kube-system.svc.cluster.local"),
        deadline_ms(3000),
    )
    .expect("udp answer for a cluster name");
    assert_default_answer(&r, 11, "kube-dns.kube-system.svc.cluster.local");
    let r = tcp_exchange(
        proxy.tcp_addr(),
        &query(12, "web.default.svc.cluster.local"),
        deadline_ms(3000),
    )
    .expect("tcp answer for a cluster name");
    assert_default_answer(&r, 12, "web.default.svc.cluster.local");
    let r = udp_exchange(proxy.udp_addr(), &query(13, "example.com"), deadline_ms(3000)).expect("udp answer");
    assert_default_answer(&r, 13, "example.com");

    let seen: Vec<String> = plain.queries().into_iter().map(|(_, n)| n).collect();
    assert_eq!(seen.len(), 2, "plain upstream saw {seen:?}");
    assert!(seen.iter().all(|n| n.ends_with("cluster.local")), "{seen:?}");
    let over_tls: Vec<String> = dot.queries().iter().map(|q| q.qname()).collect();
    assert!(
        over_tls.iter().all(|n| !n.contains("cluster.local")),
        "cluster name leaked to DoT: {over_tls:?}"
    );
    assert!(over_tls.iter().any(|n| n.starts_with("example.com")), "{over_tls:?}");

    // Its own upstream series, labelled so it cannot pass for DoT.
    let label = format!("plain:{}", plain.addr());
    let m = proxy.metrics();
    assert_eq!(
        m.labeled("dotproxy_upstream_up", "upstream", &label),
        1.0,
        "{:?}",
        m.samples
    );
    assert!(m.labeled("dotproxy_upstream_connects_total", "upstream", &label) >= 1.0);
}

#[test]
fn plain_queries_are_pipelined_on_one_connection_under_fresh_ids() {
    let plain = PlainUpstream::start(PlainMode::Answer);
    let (_ca, _dot, proxy) = split(&plain, &[]);
    // Warm the connection, then a burst from many sockets at once.
    udp_exchange(proxy.udp_addr(), &query(1, "warm.cluster.local"), deadline_ms(3000)).expect("warm-up answer");
    let socks: Vec<std::net::UdpSocket> = (0..50).map(|_| crate::util::udp_socket()).collect();
    for (i, s) in socks.iter().enumerate() {
        s.send_to(&query(100 + i as u16, &format!("n{i}.cluster.local")), proxy.udp_addr())
            .expect("send");
    }
    for (i, s) in socks.iter().enumerate() {
        let r = crate::util::udp_recv(s, deadline_ms(3000)).expect("answer");
        assert_default_answer(&r, 100 + i as u16, &format!("n{i}.cluster.local"));
    }
    assert_eq!(plain.accepts(), 1, "one connection carries them all");
    let ids: Vec<u16> = plain.queries().iter().skip(1).map(|q| q.0).collect();
    assert_eq!(ids.len(), 50);
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 50, "IDs in flight must be unique: {ids:?}");
    let same = ids.iter().enumerate().filter(|(i, &id)| id == 100 + *i as u16).count();
    assert!(same <= 2, "IDs were not rewritten: {ids:?}");
}

#[test]
fn a_silent_plain_server_gets_servfail_at_the_deadline_and_tls_names_still_work() {
    let plain = PlainUpstream::start(PlainMode::Silent);
    let (_ca, _dot, proxy) = split(&plain, &[]);
    let t0 = std::time::Instant::now();
    let r = udp_exchange(proxy.udp_addr(), &query(21, "slow.cluster.local"), deadline_ms(4000)).expect("an answer");
    assert_eq!(Message::must(&r).rcode, RCODE_SERVFAIL);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let r = udp_exchange(proxy.udp_addr(), &query(22, "example.org"), deadline_ms(3000)).expect("an answer");
    assert_default_answer(&r, 22, "example.org");
}

#[test]
fn a_server_that_closes_after_each_answer_still_answers_every_query() {
    let plain = PlainUpstream::start(PlainMode::OnePerConnection);
    let (_ca, _dot, proxy) = split(&plain, &[]);
    for i in 0..5u16 {
        let name = format!("c{i}.cluster.local");
        let r = udp_exchange(proxy.udp_addr(), &query(30 + i, &name), deadline_ms(3000)).expect("an answer");
        assert_default_answer(&r, 30 + i, &name);
    }
    assert!(
        wait_until(deadline_ms(2000), || plain.accepts() >= 5),
        "{}",
        plain.accepts()
    );
}

#[test]
fn a_refused_plain_server_fails_fast_and_is_marked_down() {
    let dead = crate::util::dead_port();
    let ca = TestCa::new();
    let dot = TestUpstream::for_name(&ca, NAME, Script::default());
    let fwd = format!("cluster.local=plain:127.0.0.1:{dead}");
    let proxy = TestProxy::over(
        &ca,
        &[dot.arg(NAME)],
        2000,
        &["--forward", &fwd, "--metrics", "127.0.0.1:0"],
    );
    let t0 = std::time::Instant::now();
    let r = udp_exchange(proxy.udp_addr(), &query(41, "x.cluster.local"), deadline_ms(4000)).expect("an answer");
    assert_eq!(Message::must(&r).rcode, RCODE_SERVFAIL);
    assert!(t0.elapsed() < Duration::from_millis(1500), "{:?}", t0.elapsed());
    let label = format!("plain:127.0.0.1:{dead}");
    let (m, ok) = proxy.wait_metrics(deadline_ms(2000), |m| {
        m.labeled("dotproxy_upstream_failures_total", "upstream", &label) >= 1.0
    });
    assert!(ok, "{:?}", m.samples);
}

#[test]
fn plain_is_refused_where_it_would_carry_every_name_or_claim_authentication() {
    for args in [
        &["--upstream", "plain:10.96.0.10:53"][..],
        &["--forward", "cluster.local=plain:10.96.0.10:53#kube-dns.test"][..],
        &["--forward", "cluster.local=plain:10.96.0.10@pin=AAAA"][..],
        &["--forward", "cluster.local=plain:not-an-ip"][..],
    ] {
        let out = run_to_exit(args, Duration::from_secs(5));
        assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("plain"), "{args:?}: {}", out.stderr);
    }
}
