//! The metrics endpoint under normal and hostile use: counters, health,
//! wrong paths and methods, oversized and silent requests, too many
//! scrapers at once.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use crate::util::metrics::http_raw;
use crate::util::{deadline_ms, query, quiescent, quiescent_idle, tcp_exchange, udp_exchange, Script, Setup};

#[test]
fn metrics_endpoint_serves_counters_and_gauges() {
    let (s, fds) = Setup::observed(Script::default(), 1000, &[]);
    for i in 0..5u16 {
        let r = udp_exchange(
            s.proxy.udp_addr(),
            &query(i, &format!("m{i}.example")),
            deadline_ms(5000),
        );
        assert!(r.is_some(), "udp query {i} unanswered");
    }
    for i in 0..3u16 {
        let r = tcp_exchange(
            s.proxy.tcp_addr(),
            &query(i, &format!("t{i}.example")),
            deadline_ms(5000),
        );
        assert!(r.is_some(), "tcp query {i} unanswered");
    }
    let r = s.proxy.http_get("/metrics");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head.to_ascii_lowercase().contains("content-type: text/plain"),
        "{}",
        r.head
    );
    assert!(r.closed, "connection not closed after the response");
    let m = crate::util::Metrics::parse(&r.body);
    for name in [
        "dotproxy_queries_total",
        "dotproxy_answers_total",
        "dotproxy_truncated_total",
        "dotproxy_timeouts_total",
        "dotproxy_retries_total",
        "dotproxy_dropped_total",
        "dotproxy_rejected_total",
        "dotproxy_upstream_answers_dropped_total",
        "dotproxy_inflight",
        "dotproxy_tcp_clients",
        "dotproxy_upstream_up",
        "dotproxy_upstream_connections",
        "dotproxy_upstream_connects_total",
        "dotproxy_upstream_failures_total",
        "dotproxy_upstream_inflight",
        "dotproxy_upstream_latency_seconds_count",
    ] {
        assert!(m.has(name), "{name} missing from /metrics:\n{}", r.body);
    }
    assert_eq!(m.labeled("dotproxy_queries_total", "transport", "udp"), 5.0);
    assert_eq!(m.labeled("dotproxy_queries_total", "transport", "tcp"), 3.0);
    assert_eq!(m.answers("NOERROR"), 8.0);
    assert_eq!(m.sum("dotproxy_upstream_up"), 1.0);
    assert!(m.sum("dotproxy_upstream_latency_seconds_count") >= 8.0);
    for reason in ["unknown_id", "wrong_question", "late"] {
        assert_eq!(m.upstream_dropped(reason), 0.0, "{reason}");
    }
    // HEAD: headers only.
    let h = http_raw(
        s.proxy.metrics_addr(),
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        deadline_ms(3000),
    );
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty(), "HEAD got a body of {} bytes", h.body.len());
    quiescent(&s.proxy, fds);
}

#[test]
fn healthz_200_then_503_when_the_only_upstream_is_down() {
    let (mut s, fds) = Setup::observed(Script::default(), 500, &[]);
    let r = s.proxy.http_get("/healthz");
    assert_eq!(r.status, 200, "healthz before any traffic: {}", r.head);
    assert!(udp_exchange(s.proxy.udp_addr(), &query(1, "h.example"), deadline_ms(5000)).is_some());
    assert_eq!(s.proxy.http_get("/healthz").status, 200);
    s.upstream.stop();
    // The next query finds the port closed: SERVFAIL, upstream down.
    let r = udp_exchange(s.proxy.udp_addr(), &query(2, "h2.example"), deadline_ms(5000));
    let m = crate::util::Message::must(&r.expect("an answer with the upstream gone"));
    assert_eq!(m.rcode, crate::util::dns::RCODE_SERVFAIL);
    let r = s.proxy.http_get("/healthz");
    assert_eq!(
        r.status, 503,
        "healthz with the only upstream down: {}\n{}",
        r.head, r.body
    );
    let m = s.proxy.metrics();
    assert_eq!(m.sum("dotproxy_upstream_up"), 0.0);
    assert!(m.sum("dotproxy_upstream_failures_total") >= 1.0);
    quiescent_idle(&s.proxy, fds);
}

#[test]
fn http_wrong_path_method_and_oversized_request() {
    let (s, fds) = Setup::observed(Script::default(), 1000, &[]);
    let addr = s.proxy.metrics_addr();
    let r = s.proxy.http_get("/nope");
    assert_eq!(r.status, 404, "{}", r.head);
    let r = http_raw(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        deadline_ms(3000),
    );
    assert_eq!(r.status, 405, "{}", r.head);
    assert!(r.head.contains("Allow:"), "405 without Allow: {}", r.head);
    // A 5 KB header: 431, and the connection is closed.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: ".to_vec();
    big.resize(5 * 1024, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    let r = http_raw(addr, &big, deadline_ms(3000));
    assert_eq!(r.status, 431, "{}", r.head);
    assert!(r.closed);
    // Garbage request line.
    let r = http_raw(addr, b"HELLO\r\n\r\n", deadline_ms(3000));
    assert_eq!(r.status, 400, "{}", r.head);
    // Still serving, DNS and HTTP.
    assert_eq!(s.proxy.http_get("/metrics").status, 200);
    quiescent(&s.proxy, fds);
}

/// A scraper that connects and sends nothing is closed after the 2 s
/// request deadline; meanwhile the endpoint and DNS keep working.
#[test]
fn http_silent_client_closed_within_about_2s() {
    let (s, fds) = Setup::observed(Script::default(), 1000, &[]);
    let addr = s.proxy.metrics_addr();
    let t = std::time::Instant::now();
    let mut silent = TcpStream::connect(addr).expect("connect");
    assert_eq!(s.proxy.http_get("/healthz").status, 200, "blocked by a silent client");
    assert!(udp_exchange(s.proxy.udp_addr(), &query(1, "x.example"), deadline_ms(3000)).is_some());
    silent.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf);
    let took = t.elapsed();
    assert!(
        matches!(n, Ok(0)) || n.is_err(),
        "silent client got {n:?} instead of a close"
    );
    assert!(
        took >= Duration::from_millis(1500) && took <= Duration::from_millis(3000),
        "silent client closed after {took:?}"
    );
    quiescent(&s.proxy, fds);
}

/// At most 16 scrapes at once: with 16 silent connections open, a 17th (a
/// readiness probe, say) is still served: the connection whose request has
/// been incomplete longest is closed to make room. DNS is unaffected.
#[test]
fn http_more_than_16_connections_closed_at_once() {
    let (s, fds) = Setup::observed(Script::default(), 1000, &[]);
    let addr = s.proxy.metrics_addr();
    let before = s.proxy.open_fds();
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..16 {
        held.push(TcpStream::connect(addr).expect("connect"));
        // One at a time, so the first is the oldest. (Not a scrape: that
        // would need one of the 16 places.)
        assert!(
            crate::util::wait_until(deadline_ms(2000), || s.proxy.open_fds() > before + i),
            "the proxy accepted only {i} of 16 scrapers"
        );
    }
    let r = http_raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n", deadline_ms(1500));
    assert_eq!(r.status, 200, "17th request not served: {}", r.head);
    held[0].set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut held[0], &mut buf);
    assert!(
        matches!(n, Ok(0)) || n.is_err(),
        "the oldest idle scraper was not closed: {n:?}"
    );
    assert!(udp_exchange(s.proxy.udp_addr(), &query(1, "x.example"), deadline_ms(3000)).is_some());
    drop(held);
    let ok = crate::util::wait_until(deadline_ms(2000), || {
        http_raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n", deadline_ms(1000)).status == 200
    });
    assert!(ok, "scraping did not recover after the 16 left");
    quiescent(&s.proxy, fds);
}
