//! Upstream connection faults (C) and upstream message faults (M):
//! upstreams that are down, come back, go silent, close in every way, stop
//! reading, announce keepalive timeouts, and send answers that are stray,
//! late, duplicated, malformed or hostile.
//!
//! Test names start with the case's label (C1, …, M1, …): the labels only
//! number the cases of this module, so that a comment or a commit can
//! name one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::client::udp_bulk;
use crate::util::dns::{self, frame, Message, RCODE_NOERROR, RCODE_SERVFAIL};
use crate::util::upstream::first_label_starts_with;
use crate::util::wire::{
    self, assert_servfail_ede, ede_of, option_codes, query_opt, OptSpec, Resp, OPT_COOKIE, OPT_KEEPALIVE, OPT_NSID,
    OPT_PADDING, RCODE_NXDOMAIN, RCODE_REFUSED,
};
use crate::util::{
    dead_port, deadline_ms, observed_over, query, quiescent, quiescent_idle, tcp_exchange, udp_exchange, udp_recv,
    udp_socket, Action, CloseKind, HookCtx, Script, Setup, TcpClient, TestCa, TestProxy, TestUpstream, NAME,
};

/// Sends `q` from a fresh socket and returns (parsed answer, time taken).
fn timed_udp(p: &TestProxy, q: &[u8]) -> (Option<Message>, Duration) {
    let (r, t) = timed_udp_raw(p, q);
    (r.map(|r| Message::must(&r)), t)
}

/// Same, with the answer's bytes.
fn timed_udp_raw(p: &TestProxy, q: &[u8]) -> (Option<Vec<u8>>, Duration) {
    let t = Instant::now();
    let r = udp_exchange(p.udp_addr(), q, deadline_ms(5000));
    (r, t.elapsed())
}

// ---------------------------------------------------------------- C ----

/// C1: the upstream is down when the proxy starts: SERVFAIL + EDE 23 at
/// once, reconnect attempts spaced by the back-off, no CPU spin; once the
/// upstream appears, service starts without a restart.
#[test]
fn c1_upstream_down_at_start_then_appears() {
    let ca = TestCa::new();
    let port = dead_port();
    let (p, fds) = observed_over(&ca, &[format!("127.0.0.1:{port}#{NAME}")], 1000);
    let cpu0 = p.cpu_ticks();
    let t0 = Instant::now();
    let mut n = 0u16;
    while t0.elapsed() < Duration::from_millis(1200) {
        let (m, took) = timed_udp(&p, &query_opt(0xC100 + n, "c1.example", OptSpec::stub()));
        assert_servfail_ede(&m.expect("no answer"), 0xC100 + n, &[23], "down at start");
        assert!(took < Duration::from_millis(200), "SERVFAIL after {took:?}");
        n += 1;
        // The stimulus: a query every 40 ms for 1.2 s, against which the
        // number of connection attempts is measured.
        std::thread::sleep(Duration::from_millis(40));
    }
    let connects = p.metrics().sum("dotproxy_upstream_connects_total");
    assert!(connects <= 5.0, "{connects} connects for {n} queries in 1.2 s");
    assert!(p.cpu_ticks() - cpu0 <= 20, "CPU while the upstream is down");
    let up = TestUpstream::start_on(
        format!("127.0.0.1:{port}").parse().unwrap(),
        ca.leaf(&[NAME]).server_config(),
        Script::default(),
    );
    let t1 = Instant::now();
    let ok = crate::util::wait_until(deadline_ms(4000), || {
        let (m, _) = timed_udp(&p, &query(0xC1FF, "c1-up.example"));
        m.is_some_and(|m| m.rcode == RCODE_NOERROR)
    });
    assert!(ok, "no recovery within 4 s of the upstream appearing");
    eprintln!("c1: recovered {:?} after the upstream appeared", t1.elapsed());
    assert_eq!(p.metrics().sum("dotproxy_upstream_up"), 1.0);
    quiescent(&p, fds);
    drop(up);
}

/// C2: the upstream goes away and comes back: recovery without restart,
/// and the back-off starts over after the first success (a second outage
/// of one failed attempt is retried after ~250 ms, not the 1 s+ the first
/// outage had grown to).
#[test]
fn c2_upstream_goes_away_and_returns_backoff_reset() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&[NAME]);
    let mut up = TestUpstream::start(leaf.server_config(), Script::default());
    let addr = up.addr();
    let (p, fds) = observed_over(&ca, &[up.arg(NAME)], 1000);
    let ok = |id: u16| {
        timed_udp(&p, &query(id, "c2.example"))
            .0
            .is_some_and(|m| m.rcode == RCODE_NOERROR)
    };
    assert!(ok(1));
    // Outage 1: queries (which make the proxy try again once its back-off
    // allows) until three attempts have failed: the back-off (250, 500,
    // 1000 ms) has then grown to about 1 s.
    up.stop();
    let outage1 = deadline_ms(5000);
    let mut failures1 = 0.0;
    // Bounded by the deadline.
    while failures1 < 3.0 {
        assert!(Instant::now() < outage1, "{failures1} failures in 5 s of outage 1");
        let (m, _) = timed_udp(&p, &query(2, "c2.example"));
        assert_eq!(m.expect("answer").rcode, RCODE_SERVFAIL);
        failures1 = p.metrics().sum("dotproxy_upstream_failures_total");
    }
    let up = TestUpstream::start_on(addr, leaf.server_config(), Script::default());
    assert!(
        crate::util::wait_until(deadline_ms(4000), || ok(3)),
        "no recovery from outage 1"
    );
    // Outage 2: one failed attempt, then the upstream is back at once.
    let mut up = up;
    up.stop();
    let (m, _) = timed_udp(&p, &query(4, "c2.example"));
    assert_eq!(m.expect("answer").rcode, RCODE_SERVFAIL);
    let t_fail = Instant::now();
    let up2 = TestUpstream::start_on(addr, leaf.server_config(), Script::default());
    assert!(
        crate::util::wait_until(deadline_ms(3000), || ok(5)),
        "no recovery from outage 2"
    );
    let took = t_fail.elapsed();
    assert!(
        took < Duration::from_millis(600),
        "back-off not reset: recovered after {took:?}"
    );
    quiescent(&p, fds);
    drop(up2);
}

/// C3 + M4: one query slower than the deadline gets SERVFAIL + EDE 22 at
/// the deadline, not before; queries on the same connection are
/// unaffected; its late answer is dropped (tombstone) and counted, never
/// delivered; the connection stays.
#[test]
fn c3_m4_slow_query_times_out_late_answer_dropped() {
    let script = Script {
        slow_delay: Duration::from_millis(800),
        ..Script::default()
    };
    let (s, fds) = Setup::observed(script, 500, &[]);
    let slow = udp_socket();
    let t_slow = Instant::now();
    slow.send_to(&query_opt(0xC300, "slow.example", OptSpec::stub()), s.proxy.udp_addr())
        .unwrap();
    for i in 1..4u16 {
        let name = format!("fast{i}.example");
        let (m, took) = timed_udp(&s.proxy, &query(0xC300 + i, &name));
        assert_eq!(m.expect("fast query").rcode, RCODE_NOERROR);
        assert!(took < Duration::from_millis(200), "{name} delayed {took:?}");
    }
    let r = udp_recv(&slow, deadline_ms(2000)).expect("slow query: nothing");
    assert_servfail_ede(&Message::must(&r), 0xC300, &[22], "slow query");
    let took = t_slow.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "slow query: SERVFAIL after {took:?} with --timeout 500"
    );
    let (m, ok) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| m.upstream_dropped("late") >= 1.0);
    assert!(ok, "late answer not counted: {:?}", m.upstream_dropped("late"));
    assert!(udp_recv(&slow, deadline_ms(100)).is_none(), "late answer delivered");
    assert_eq!(m.sum("dotproxy_timeouts_total"), 1.0);
    assert_eq!(s.upstream.accepts(), 1, "connection replaced");
    quiescent(&s.proxy, fds);
}

/// C4 scenario. Upstreams in order [B, A]: B answers (`warm*` after
/// 50 ms, so its measured latency makes A preferred); A answers its first
/// query only when `warm_a`, then never again. Q1 goes to A at t=0, Q3 at
/// t=300 ms; with `--timeout 1000`, at Q1's deadline A's connection has
/// sent nothing since Q1 was sent: it must be declared dead and closed,
/// and Q3 re-sent to B and answered before its own deadline.
fn silent_connection(warm_a: bool) {
    let ca = TestCa::new();
    let a = TestUpstream::for_name(
        &ca,
        NAME,
        Script::default().with_hook(move |ctx| (!(warm_a && ctx.conn == 1 && ctx.index == 0)).then(Vec::new)),
    );
    let b = TestUpstream::for_name(
        &ca,
        NAME,
        Script::default().with_hook(|ctx| {
            first_label_starts_with(ctx.query, "warm")
                .then(|| vec![Action::Delay(Duration::from_millis(50)), Action::Answer])
        }),
    );
    let (p, fds) = observed_over(&ca, &[b.arg(NAME), a.arg(NAME)], 1000);
    let warm = |id: u16, name: &str| {
        let (m, _) = timed_udp(&p, &query(id, name));
        assert_eq!(m.expect("warm-up").rcode, RCODE_NOERROR, "{name}");
    };
    warm(0xC400, "warm-b.example");
    if warm_a {
        warm(0xC401, "warm-a.example");
        assert_eq!(a.query_count(), 1, "warm-up did not reach A");
    }
    let s1 = udp_socket();
    let s3 = udp_socket();
    let t0 = Instant::now();
    s1.send_to(&query_opt(0xC402, "first.example", OptSpec::stub()), p.udp_addr())
        .unwrap();
    // The stimulus: Q3 goes out 300 ms after Q1, well inside Q1's deadline,
    // so that when Q1's deadline comes the connection has been silent for
    // all of it while Q3 is still waiting.
    std::thread::sleep(Duration::from_millis(300));
    s3.send_to(&query(0xC403, "third.example"), p.udp_addr()).unwrap();
    let r1 = udp_recv(&s1, deadline_ms(3000)).expect("first: nothing");
    assert_servfail_ede(&Message::must(&r1), 0xC402, &[22], "first");
    let r3 = udp_recv(&s3, deadline_ms(3000)).expect("third: nothing");
    let t3 = t0.elapsed();
    let on_a: Vec<String> = a.queries().iter().map(|q| q.qname()).collect();
    assert!(
        on_a.contains(&"first.example".to_string()) && on_a.contains(&"third.example".to_string()),
        "precondition: both queries should have gone to A (balancer changed?): A saw {on_a:?}"
    );
    assert_default_answer(&r3, 0xC403, "third.example");
    assert!(t3 < Duration::from_millis(1250), "third answered after {t3:?}");
    assert!(
        b.queries().iter().any(|q| q.qname() == "third.example"),
        "third not re-sent to B"
    );
    assert!(
        a.wait_until(deadline_ms(2000), |s| s.open == 0),
        "dead connection not closed"
    );
    quiescent(&p, fds);
}

/// C4: a connection that answered once and then takes queries without
/// sending another byte is declared dead at the first deadline, closed,
/// and its other queries re-sent to the other upstream.
#[test]
fn c4_connection_gone_silent_declared_dead_others_resent() {
    silent_connection(true);
}

/// C4 on a fresh connection: the server completes the handshake and then
/// never sends a byte. The first query was queued while connecting; its
/// deadline must still find the connection dead (nothing read since the
/// query went out).
#[test]
fn c4_fresh_connection_never_answering_declared_dead_others_resent() {
    silent_connection(false);
}

/// C5-C7: the upstream answers five queries, holds three, then closes
/// (close_notify, FIN, RST): the three are re-sent on a new connection and
/// answered; nobody gets two answers; a used connection closing is not a
/// failure.
fn closes_with_three_unanswered(kind: CloseKind) {
    let script = Script::default().with_hook(move |ctx: &HookCtx<'_>| {
        if ctx.conn != 1 {
            return None;
        }
        if first_label_starts_with(ctx.query, "hold-close") {
            return Some(vec![Action::Delay(Duration::from_millis(60)), Action::Close(kind)]);
        }
        if first_label_starts_with(ctx.query, "hold") {
            return Some(vec![]);
        }
        None
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let names = [
        "keep0.example",
        "keep1.example",
        "keep2.example",
        "keep3.example",
        "keep4.example",
        "hold0.example",
        "hold1.example",
        "hold-close.example",
    ];
    let msgs: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| query(0xC500 + i as u16, n))
        .collect();
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&msgs);
    let answers = c.recv_n(8, deadline_ms(3000));
    assert_eq!(answers.len(), 8, "{kind:?}: {} answers", answers.len());
    let mut seen = HashMap::new();
    for a in &answers {
        let m = Message::must(a);
        let i = (m.id - 0xC500) as usize;
        assert_default_answer(a, m.id, names[i]);
        *seen.entry(m.id).or_insert(0) += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "{kind:?}: duplicate answers");
    assert!(c.recv(deadline_ms(200)).is_none(), "{kind:?}: extra frame");
    let on_conn2: Vec<String> = s
        .upstream
        .queries()
        .iter()
        .filter(|q| q.conn == 2)
        .map(|q| q.qname())
        .collect();
    for held in &names[5..] {
        assert!(
            on_conn2.iter().any(|n| n == held),
            "{kind:?}: {held} not re-sent: {on_conn2:?}"
        );
    }
    let m = s.proxy.metrics();
    assert!(m.sum("dotproxy_retries_total") >= 3.0, "{kind:?}: retries");
    assert_eq!(
        m.sum("dotproxy_upstream_failures_total"),
        0.0,
        "{kind:?}: counted as a failure"
    );
    drop(c);
    quiescent(&s.proxy, fds);
}

#[test]
fn c5_close_notify_with_three_unanswered() {
    closes_with_three_unanswered(CloseKind::CloseNotify);
}

#[test]
fn c6_fin_without_close_notify_with_three_unanswered() {
    closes_with_three_unanswered(CloseKind::Fin);
}

#[test]
fn c7_rst_with_three_unanswered() {
    closes_with_three_unanswered(CloseKind::Rst);
}

/// C8: the connection closes in the middle of an answer frame: the partial
/// frame is never delivered, the query is re-sent and answered.
#[test]
fn c8_close_mid_frame() {
    let script = Script::default().with_hook(|ctx| {
        if ctx.conn != 1 || !first_label_starts_with(ctx.query, "cut") {
            return None;
        }
        let ans = frame(&dns::default_answer(ctx.query).unwrap());
        Some(vec![
            Action::SendRaw(ans[..ans.len() / 2].to_vec()),
            Action::Delay(Duration::from_millis(50)),
            Action::Close(CloseKind::Fin),
        ])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    // A first answer on the connection: it was working when it broke.
    let r = c.exchange(&query(0xC800, "ok.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("first"), 0xC800, "ok.example");
    let r = c.exchange(&query(0xC801, "cut.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("cut answer not re-sent"), 0xC801, "cut.example");
    assert!(c.recv(deadline_ms(200)).is_none(), "extra frame");
    assert!(s
        .upstream
        .queries()
        .iter()
        .any(|q| q.conn == 2 && q.qname() == "cut.example"));
    drop(c);
    quiescent(&s.proxy, fds);
}

/// C9: every connection is closed as soon as a query arrives, unanswered:
/// each query is tried at most twice, then SERVFAIL; reconnects are spaced
/// by the back-off.
#[test]
fn c9_every_connection_closed_unanswered() {
    let script = Script::default().with_hook(|_| Some(vec![Action::Close(CloseKind::Fin)]));
    let (s, fds) = Setup::observed(script, 1000, &[]);
    let t0 = Instant::now();
    for i in 0..20u16 {
        let (m, took) = timed_udp(&s.proxy, &query(0xC900 + i, &format!("n{i}.example")));
        let m = m.unwrap_or_else(|| panic!("query {i}: no answer"));
        assert_eq!(m.rcode, RCODE_SERVFAIL, "query {i}");
        assert!(took < Duration::from_millis(1100), "query {i}: {took:?}");
        // The stimulus: queries 60 ms apart, against which the number of
        // reconnects is measured.
        std::thread::sleep(Duration::from_millis(60));
    }
    let mut per_name: HashMap<String, usize> = HashMap::new();
    for q in s.upstream.queries() {
        *per_name.entry(q.qname()).or_default() += 1;
    }
    assert!(
        per_name.values().all(|&n| n <= 2),
        "a query was sent more than twice: {per_name:?}"
    );
    let accepts = s.upstream.accepts();
    assert!(accepts <= 6, "{accepts} connections in {:?}", t0.elapsed());
    quiescent_idle(&s.proxy, fds);
}

/// An answer to `q` carrying an edns-tcp-keepalive TIMEOUT.
fn keepalive_answer(q: &[u8], timeout: u16) -> Vec<u8> {
    Resp::to(q)
        .a()
        .opt(OptSpec::new(1232).option(OPT_KEEPALIVE, &wire::keepalive(timeout)))
        .build()
}

/// C10: an answer announces keepalive TIMEOUT 0: no new query goes on that
/// connection, the outstanding one is still answered there, the connection
/// is then closed politely.
#[test]
fn c10_keepalive_zero_drains_connection() {
    let script = Script::default().with_hook(|ctx| {
        if ctx.conn == 1 && first_label_starts_with(ctx.query, "ka0") {
            return Some(vec![Action::Send(keepalive_answer(ctx.query, 0))]);
        }
        if first_label_starts_with(ctx.query, "pending") {
            return Some(vec![Action::Delay(Duration::from_millis(300)), Action::Answer]);
        }
        None
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let pending = udp_socket();
    pending
        .send_to(&query(0xCA00, "pending.example"), s.proxy.udp_addr())
        .unwrap();
    assert!(
        s.upstream.wait_until(deadline_ms(2000), |st| st
            .queries
            .iter()
            .any(|q| q.qname() == "pending.example")),
        "pending query never reached the upstream"
    );
    let (m, _) = timed_udp(&s.proxy, &query(0xCA01, "ka0.example"));
    assert_eq!(m.expect("ka0").rcode, RCODE_NOERROR);
    let (m, _) = timed_udp(&s.proxy, &query(0xCA02, "new.example"));
    assert_eq!(m.expect("new").rcode, RCODE_NOERROR);
    let r = udp_recv(&pending, deadline_ms(2000)).expect("outstanding query not answered");
    assert_default_answer(&r, 0xCA00, "pending.example");
    let qs = s.upstream.queries();
    let conn_of = |n: &str| qs.iter().find(|q| q.qname() == n).map(|q| q.conn);
    assert_eq!(conn_of("pending.example"), Some(1));
    assert_eq!(
        conn_of("new.example"),
        Some(2),
        "new query sent on a draining connection"
    );
    assert!(
        s.upstream.wait_until(deadline_ms(2000), |st| st.peer_close_notify >= 1),
        "drained connection not closed with close_notify"
    );
    assert_eq!(s.proxy.metrics().sum("dotproxy_upstream_failures_total"), 0.0);
    quiescent(&s.proxy, fds);
}

/// C11: keepalive TIMEOUT 1 s: the proxy closes the idle connection itself,
/// before the server would, with close_notify; no back-off penalty.
#[test]
fn c11_keepalive_one_second_closed_before_server_does() {
    let script = Script::default().with_hook(|ctx| Some(vec![Action::Send(keepalive_answer(ctx.query, 10))]));
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query(0xCB00, "ka10.example"));
    assert_eq!(m.expect("answer").rcode, RCODE_NOERROR);
    let t = Instant::now();
    assert!(
        s.upstream.wait_until(deadline_ms(2000), |st| st.peer_close_notify >= 1),
        "idle connection not closed"
    );
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "closed after {took:?}, the server's timeout is 1 s"
    );
    let (m, took) = timed_udp(&s.proxy, &query(0xCB01, "again.example"));
    assert_eq!(m.expect("answer").rcode, RCODE_NOERROR);
    assert!(took < Duration::from_millis(200), "{took:?}");
    let m = s.proxy.metrics();
    assert_eq!(m.sum("dotproxy_upstream_failures_total"), 0.0);
    assert_eq!(m.sum("dotproxy_upstream_up"), 1.0);
    quiescent(&s.proxy, fds);
}

/// C12: the server closes an idle connection: not a failure; the next
/// query reconnects (resuming the TLS session).
#[test]
fn c12_server_closes_idle_connection() {
    let script = Script::default().with_hook(|ctx| {
        (ctx.conn == 1).then(|| {
            vec![
                Action::Answer,
                Action::Delay(Duration::from_millis(30)),
                Action::Close(CloseKind::CloseNotify),
            ]
        })
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query(0xCC00, "one.example"));
    assert_eq!(m.expect("one").rcode, RCODE_NOERROR);
    assert!(s.upstream.wait_until(deadline_ms(2000), |st| st.open == 0));
    // The proxy has taken the close in (no connection left on its side).
    let (m, ok) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| m.upstream_connections() == 0.0);
    assert!(
        ok,
        "proxy still counts {} upstream connections",
        m.upstream_connections()
    );
    let (m, took) = timed_udp(&s.proxy, &query(0xCC01, "two.example"));
    assert_eq!(m.expect("two").rcode, RCODE_NOERROR);
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert_eq!(s.upstream.resumed_handshakes(), 1, "reconnect did not resume");
    let m = s.proxy.metrics();
    assert_eq!(m.sum("dotproxy_upstream_failures_total"), 0.0);
    assert_eq!(m.sum("dotproxy_upstream_resumed_total"), 1.0);
    quiescent(&s.proxy, fds);
}

/// C13: the server stops reading. The connection's queue is bounded by the
/// per-connection cap (1 000); the excess goes to a new connection and is
/// answered; at the first deadline the stuck connection counts as stalled
/// and its queries are re-sent once (a single stalled connection does not
/// mark the upstream down), so they are answered if their deadlines allow,
/// else SERVFAIL; memory stays bounded and every query gets exactly one
/// answer.
#[test]
fn c13_server_stops_reading() {
    let script =
        Script::default().with_hook(|ctx| (ctx.conn == 1 && ctx.index == 0).then(|| vec![Action::StopReading]));
    let (s, fds) = Setup::observed(script, 1000, &["--max-inflight-per-ip", "5000"]);
    let qs: Vec<_> = (0..1500u16).map(|i| query(i, &format!("s{i}.example"))).collect();
    let r = udp_bulk(s.proxy.udp_addr(), &qs, 1500, None, deadline_ms(6000));
    let mut rc: HashMap<u8, usize> = HashMap::new();
    for (i, a) in r.answers.iter().enumerate() {
        let a = a
            .as_ref()
            .unwrap_or_else(|| panic!("query {i} unanswered ({} answered)", r.answered()));
        let m = Message::must(a);
        assert_eq!(m.qname(), format!("s{i}.example"));
        *rc.entry(m.rcode).or_default() += 1;
    }
    assert!(r.stray.is_empty(), "{} duplicate/stray answers", r.stray.len());
    let st = s.upstream.stats();
    // The server may have read a first batch before it stopped; it never
    // holds more than the per-connection cap.
    let max1 = st.max_inflight.get(&1).copied().unwrap_or(0);
    assert!(max1 <= 1000, "{max1} queries in flight on the stuck connection");
    assert!(st.accepts >= 2, "no second connection took the excess");
    assert!(
        rc.get(&RCODE_NOERROR).copied().unwrap_or(0) >= 400,
        "failover answered too few: {rc:?}"
    );
    let servfail = rc.get(&RCODE_SERVFAIL).copied().unwrap_or(0);
    assert!(servfail >= 1, "the first stuck query reaches its deadline: {rc:?}");
    assert_eq!(rc.get(&RCODE_NOERROR).copied().unwrap_or(0) + servfail, 1500, "{rc:?}");
    let hwm = s.proxy.vm_hwm_kb();
    assert!(hwm < 64 * 1024, "VmHWM {hwm} kB");
    quiescent(&s.proxy, fds);
}

/// C15: two upstreams, the first down: everything is answered by the
/// second; the first is retried after its back-off (a few connects, not
/// one per query) and used again once it is back.
#[test]
fn c15_first_of_two_down_retried_and_used_again() {
    let ca = TestCa::new();
    let port = dead_port();
    let first = format!("127.0.0.1:{port}#{NAME}");
    let second = TestUpstream::for_name(&ca, NAME, Script::default());
    let (p, fds) = observed_over(&ca, &[first.clone(), second.arg(NAME)], 1000);
    let t0 = Instant::now();
    let mut n = 0u16;
    while t0.elapsed() < Duration::from_millis(1200) {
        let name = format!("c15-{n}.example");
        let (r, took) = timed_udp_raw(&p, &query(n, &name));
        assert_default_answer(&r.expect("answer"), n, &name);
        assert!(took < Duration::from_millis(300), "{took:?}");
        n += 1;
        // The stimulus: a query every 30 ms for 1.2 s, against which the
        // first upstream's connection attempts are measured.
        std::thread::sleep(Duration::from_millis(30));
    }
    // TCP clients are served by the second upstream too.
    let r = tcp_exchange(p.tcp_addr(), &query(0xCF10, "c15-tcp.example"), deadline_ms(3000));
    assert_default_answer(
        &r.expect("TCP query while the first is down"),
        0xCF10,
        "c15-tcp.example",
    );
    let m = p.metrics();
    let label = format!("127.0.0.1:{port}#{NAME}");
    let connects = m.labeled("dotproxy_upstream_connects_total", "upstream", &label);
    assert!(
        (2.0..=5.0).contains(&connects),
        "first upstream: {connects} connects for {n} queries"
    );
    let back = TestUpstream::start_on(
        format!("127.0.0.1:{port}").parse().unwrap(),
        ca.leaf(&[NAME]).server_config(),
        Script::default(),
    );
    let ok = crate::util::wait_until(deadline_ms(4000), || {
        let _ = timed_udp(&p, &query(0xCF00, "c15-back.example"));
        back.query_count() > 0
    });
    assert!(ok, "first upstream never used again");
    quiescent(&p, fds);
}

/// C16: two clients on two upstream connections; one connection dies: the
/// other client's queries are never delayed, and the dead connection's
/// query is re-sent and answered.
#[test]
fn c16_one_connection_dies_other_client_unaffected() {
    let ca = TestCa::new();
    let a = TestUpstream::for_name(
        &ca,
        NAME,
        Script::default().with_hook(|ctx| {
            first_label_starts_with(ctx.query, "x")
                .then(|| vec![Action::Delay(Duration::from_millis(100)), Action::Close(CloseKind::Rst)])
        }),
    );
    let b = TestUpstream::for_name(&ca, NAME, Script::default());
    let (p, fds) = observed_over(&ca, &[a.arg(NAME), b.arg(NAME)], 2000);
    let x = udp_socket();
    x.send_to(&query(0xD000, "x1.example"), p.udp_addr()).unwrap();
    let has_x1 = |u: &TestUpstream| u.queries().iter().any(|q| q.qname() == "x1.example");
    assert!(
        crate::util::wait_until(deadline_ms(2000), || has_x1(&a) || has_x1(&b)),
        "x1 never reached an upstream"
    );
    let mut y = TcpClient::connect(p.tcp_addr());
    let t0 = Instant::now();
    let mut i = 0u16;
    while t0.elapsed() < Duration::from_millis(400) {
        let name = format!("y{i}.example");
        let t = Instant::now();
        let r = y.exchange(&query(0xD100 + i, &name), deadline_ms(2000));
        assert_default_answer(&r.expect("y"), 0xD100 + i, &name);
        // Normal is a few ms; waiting on the dying connection would mean
        // its 100 ms plus a re-send, or the 2 s deadline.
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{name} took {:?}",
            t.elapsed()
        );
        i += 1;
        // The stimulus: y keeps asking, every 20 ms, while x1's connection
        // dies (100 ms after x1 reached it).
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = udp_recv(&x, deadline_ms(2000)).expect("x1: nothing");
    assert_default_answer(&r, 0xD000, "x1.example");
    assert!(
        b.queries().iter().any(|q| q.qname() == "x1.example"),
        "x1 not re-sent to B"
    );
    drop(y);
    quiescent(&p, fds);
}

// ---------------------------------------------------------------- M ----

/// M1: an answer with an ID not in flight is dropped and counted; the query
/// ends at its deadline; the connection stays (it is talking).
#[test]
fn m1_unknown_id_dropped_query_times_out() {
    let script = Script::default().with_hook(|ctx| {
        first_label_starts_with(ctx.query, "stray").then(|| {
            let id = u16::from_be_bytes([ctx.query[0], ctx.query[1]]) ^ 0x2a;
            vec![Action::Send(Resp::to(ctx.query).id(id).a().build())]
        })
    });
    let (s, fds) = Setup::observed(script, 500, &[]);
    let (m, took) = timed_udp(&s.proxy, &query_opt(0xE100, "stray.example", OptSpec::stub()));
    assert_servfail_ede(&m.expect("nothing"), 0xE100, &[22], "stray");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    let m = s.proxy.metrics();
    assert_eq!(m.upstream_dropped("unknown_id"), 1.0);
    assert_eq!(s.upstream.accepts(), 1);
    quiescent(&s.proxy, fds);
}

/// M2: the right ID with another question is dropped (RFC 7858 §3.3); the
/// real answer after it is still delivered; alone, the query times out.
#[test]
fn m2_wrong_question_dropped() {
    let script = Script::default().with_hook(|ctx| {
        let wrong = Resp::to(ctx.query).question("other.example", dns::TYPE_A).a().build();
        if first_label_starts_with(ctx.query, "then-right") {
            return Some(vec![
                Action::Send(wrong),
                Action::Delay(Duration::from_millis(30)),
                Action::Answer,
            ]);
        }
        first_label_starts_with(ctx.query, "only-wrong").then(|| vec![Action::Send(wrong)])
    });
    let (s, fds) = Setup::observed(script, 500, &[]);
    let (r, _) = timed_udp_raw(&s.proxy, &query(0xE200, "then-right.example"));
    assert_default_answer(&r.expect("nothing"), 0xE200, "then-right.example");
    let (m, _) = timed_udp(&s.proxy, &query_opt(0xE201, "only-wrong.example", OptSpec::stub()));
    assert_servfail_ede(&m.expect("nothing"), 0xE201, &[22], "only wrong");
    let m = s.proxy.metrics();
    assert_eq!(m.upstream_dropped("wrong_question"), 2.0);
    quiescent(&s.proxy, fds);
}

/// M3: the same answer twice: the client gets exactly one.
#[test]
fn m3_duplicate_answer_delivered_once() {
    let script = Script::default().with_hook(|_| Some(vec![Action::Answer, Action::Answer]));
    let (s, fds) = Setup::observed(script, 1000, &[]);
    let sock = udp_socket();
    sock.send_to(&query(0xE300, "twice.example"), s.proxy.udp_addr())
        .unwrap();
    let r = udp_recv(&sock, deadline_ms(2000)).expect("nothing");
    assert_default_answer(&r, 0xE300, "twice.example");
    assert!(udp_recv(&sock, deadline_ms(200)).is_none(), "second copy delivered");
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let r = c.exchange(&query(0xE301, "twice-tcp.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("nothing"), 0xE301, "twice-tcp.example");
    assert!(c.recv(deadline_ms(200)).is_none(), "second copy delivered over TCP");
    assert_eq!(s.proxy.metrics().upstream_dropped("unknown_id"), 2.0);
    drop(c);
    quiescent(&s.proxy, fds);
}

/// M5: malformed answer bodies (bad label type, RR past the end): SERVFAIL
/// + EDE 0 at once; the framing is intact so the connection is kept.
#[test]
fn m5_malformed_body_servfail_connection_kept() {
    let script = Script::default().with_hook(|ctx| {
        let resp = if first_label_starts_with(ctx.query, "badlabel") {
            let mut rr = vec![0x40, b'x', 0];
            rr.extend_from_slice(&wire::rr_header(&[], dns::TYPE_A, 4)[..]);
            rr.extend_from_slice(&[192, 0, 2, 1]);
            Resp::to(ctx.query).raw_answer(rr).build()
        } else if first_label_starts_with(ctx.query, "pastend") {
            let mut m = Resp::to(ctx.query).a().build();
            m[7] = 2; // ANCOUNT 2, one record
            m
        } else {
            return None;
        };
        Some(vec![Action::Send(resp)])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    for (i, name) in ["badlabel.example", "pastend.example"].into_iter().enumerate() {
        let id = 0xE500 + i as u16;
        let (m, took) = timed_udp(&s.proxy, &query_opt(id, name, OptSpec::stub()));
        assert_servfail_ede(&m.expect("nothing"), id, &[0], name);
        assert!(took < Duration::from_millis(300), "{name}: {took:?}");
    }
    let (m, _) = timed_udp(&s.proxy, &query(0xE510, "fine.example"));
    assert_eq!(m.expect("fine").rcode, RCODE_NOERROR);
    assert_eq!(s.upstream.accepts(), 1, "connection replaced after a malformed body");
    quiescent(&s.proxy, fds);
}

/// A bad frame or TLS record on upstream A (`bad*` queries); B answers.
fn broken_then_elsewhere(action: fn(&[u8]) -> Vec<Action>, what: &str) {
    let ca = TestCa::new();
    let a = TestUpstream::for_name(
        &ca,
        NAME,
        Script::default().with_hook(move |ctx| first_label_starts_with(ctx.query, "bad").then(|| action(ctx.query))),
    );
    let b = TestUpstream::for_name(&ca, NAME, Script::default());
    let (p, fds) = observed_over(&ca, &[a.arg(NAME), b.arg(NAME)], 2000);
    let (r, took) = timed_udp_raw(&p, &query(0xE600, "bad.example"));
    assert_default_answer(&r.expect("nothing"), 0xE600, "bad.example");
    assert!(took < Duration::from_millis(500), "{what}: {took:?}");
    assert!(
        b.queries().iter().any(|q| q.qname() == "bad.example"),
        "{what}: not re-sent to B"
    );
    assert!(
        a.wait_until(deadline_ms(2000), |s| s.open == 0),
        "{what}: connection to A not closed"
    );
    quiescent(&p, fds);
}

/// M6: a frame shorter than a header closes the connection; its query is
/// re-sent elsewhere.
#[test]
fn m6_short_frame_closes_connection_query_resent() {
    broken_then_elsewhere(|_| vec![Action::SendRaw(vec![0, 5, 1, 2, 3, 4, 5])], "5-byte frame");
}

/// M7: a frame of length 0: as M6.
#[test]
fn m7_zero_length_frame_closes_connection_query_resent() {
    broken_then_elsewhere(|_| vec![Action::SendRaw(vec![0, 0])], "0-byte frame");
}

/// M15: a garbage TLS record after the handshake: the TLS layer fails, the
/// connection is closed, its query re-sent elsewhere.
#[test]
fn m15_garbage_tls_record_query_resent() {
    broken_then_elsewhere(
        |_| {
            let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x30];
            rec.extend_from_slice(&wire::noise(15, 0x30));
            vec![Action::SendTcpRaw(rec)]
        },
        "garbage TLS record",
    );
}

/// M6/M7/M15 with a single upstream: the broken connection's query is
/// re-sent on a new connection to the same upstream and answered (the
/// README: "a connection that closes re-sends its unanswered queries on
/// another connection").
#[test]
fn m6_m7_m15_single_upstream_query_resent_on_new_connection() {
    let script = Script::default().with_hook(|ctx| {
        if ctx.conn != 1 {
            return None;
        }
        if first_label_starts_with(ctx.query, "short") {
            return Some(vec![Action::SendRaw(vec![0, 5, 1, 2, 3, 4, 5])]);
        }
        None
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query(0xE700, "short.example"));
    let m = m.expect("nothing");
    assert_eq!(m.rcode, RCODE_NOERROR, "EDE {:?}", ede_of(&m));
    quiescent(&s.proxy, fds);
}

/// M8: a QR=0 message from the upstream is not an answer: dropped; the real
/// answer after it is delivered.
#[test]
fn m8_qr0_message_dropped() {
    let script = Script::default().with_hook(|ctx| {
        Some(vec![
            Action::Send(Resp::to(ctx.query).qr0().a().build()),
            Action::Delay(Duration::from_millis(30)),
            Action::Answer,
        ])
    });
    let (s, fds) = Setup::observed(script, 1000, &[]);
    let sock = udp_socket();
    sock.send_to(&query(0xE800, "qr0.example"), s.proxy.udp_addr()).unwrap();
    let r = udp_recv(&sock, deadline_ms(2000)).expect("nothing");
    assert_default_answer(&r, 0xE800, "qr0.example");
    assert!(udp_recv(&sock, deadline_ms(100)).is_none());
    let m = s.proxy.metrics();
    assert_eq!(
        m.upstream_dropped("wrong_question") + m.upstream_dropped("unknown_id"),
        1.0,
        "QR=0 message not counted"
    );
    quiescent(&s.proxy, fds);
}

/// M9: TC=1 in a DoT answer is passed on as is (UDP and TCP clients).
#[test]
fn m9_tc_in_dot_answer_forwarded() {
    let script = Script::default().with_hook(|ctx| Some(vec![Action::Send(Resp::to(ctx.query).tc().build())]));
    let (s, fds) = Setup::observed(script, 1000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query(0xE900, "tc.example"));
    let m = m.expect("nothing");
    assert!(m.tc && m.rcode == RCODE_NOERROR && m.qname() == "tc.example", "{m:?}");
    let r = crate::util::tcp_exchange(s.proxy.tcp_addr(), &query(0xE901, "tc.example"), deadline_ms(2000));
    assert!(Message::must(&r.expect("nothing")).tc, "TC lost over TCP");
    quiescent(&s.proxy, fds);
}

/// Wire bytes of an answer to `q` with a second RR whose owner name is
/// made by `owner(offset_of_rdata_of_first_rr) -> (txt_rdata, owner_bytes)`.
fn crafted_names(q: &[u8], build: impl Fn(usize) -> (Vec<u8>, Vec<u8>)) -> Vec<u8> {
    let base = Resp::to(q).build();
    // First RR: TXT (pointer owner) whose RDATA starts 12 bytes in.
    let rdata_at = base.len() + 12;
    let (rdata, owner) = build(rdata_at);
    let mut rr1 = wire::rr_header(&[0xC0, 0x0C], dns::TYPE_TXT, rdata.len() as u16);
    rr1.extend_from_slice(&rdata);
    let mut rr2 = owner;
    rr2.extend_from_slice(&wire::rr_header(&[], dns::TYPE_A, 4));
    rr2.extend_from_slice(&[192, 0, 2, 1]);
    Resp::to(q).raw_answer(rr1).raw_answer(rr2).build()
}

fn ptr(at: usize) -> [u8; 2] {
    [0xC0 | (at >> 8) as u8, at as u8]
}

/// M10: a compression pointer to itself, a chain of 200 pointers, a name
/// over 255 bytes built from pointers: the parse stops at once, SERVFAIL.
#[test]
fn m10_compression_loops_chains_and_long_names() {
    let script = Script::default().with_hook(|ctx| {
        let q = ctx.query;
        let msg = if first_label_starts_with(q, "selfptr") {
            let base = Resp::to(q).build();
            let mut rr = ptr(base.len()).to_vec();
            rr.extend_from_slice(&wire::rr_header(&[], dns::TYPE_A, 4));
            rr.extend_from_slice(&[192, 0, 2, 1]);
            Resp::to(q).raw_answer(rr).build()
        } else if first_label_starts_with(q, "chain") {
            crafted_names(q, |at| {
                let mut rdata = vec![0u8]; // a root name at `at`
                for k in 0..200 {
                    rdata.extend_from_slice(&ptr(at + if k == 0 { 0 } else { 1 + 2 * (k - 1) }));
                }
                let last = at + 1 + 2 * 199;
                (rdata, ptr(last).to_vec())
            })
        } else if first_label_starts_with(q, "longname") {
            crafted_names(q, |at| {
                let mut rdata = Vec::new();
                let mut prev = None;
                for k in 0..5 {
                    let start = at + rdata.len();
                    rdata.push(63);
                    rdata.resize(rdata.len() + 63, b'a' + k as u8);
                    match prev {
                        None => rdata.push(0),
                        Some(p) => rdata.extend_from_slice(&ptr(p)),
                    }
                    prev = Some(start);
                }
                (rdata, ptr(prev.unwrap()).to_vec())
            })
        } else {
            return None;
        };
        Some(vec![Action::Send(msg)])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    for (i, name) in ["selfptr.example", "chain.example", "longname.example"]
        .into_iter()
        .enumerate()
    {
        let id = 0xEA00 + i as u16;
        let (m, took) = timed_udp(&s.proxy, &query_opt(id, name, OptSpec::stub()));
        assert_servfail_ede(&m.expect("nothing"), id, &[0], name);
        assert!(took < Duration::from_millis(300), "{name}: {took:?}");
    }
    quiescent(&s.proxy, fds);
}

/// M11: two OPTs in an answer: SERVFAIL; 5 000 empty padding options with
/// duplicated NSID: answered fast with the padding stripped and the NSIDs
/// kept.
#[test]
fn m11_opt_abuse_in_answers() {
    let script = Script::default().with_hook(|ctx| {
        let q = ctx.query;
        let msg = if first_label_starts_with(q, "twoopt") {
            Resp::to(q)
                .a()
                .opt(OptSpec::new(1232))
                .another_opt(OptSpec::new(1232))
                .build()
        } else if first_label_starts_with(q, "manyopt") {
            let mut o = OptSpec::new(1232).option(OPT_NSID, b"ns1").option(OPT_NSID, b"ns2");
            for _ in 0..5000 {
                o.options.push((OPT_PADDING, Vec::new()));
            }
            Resp::to(q).a().opt(o).build()
        } else {
            return None;
        };
        Some(vec![Action::Send(msg)])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query_opt(0xEB00, "twoopt.example", OptSpec::stub()));
    assert_servfail_ede(&m.expect("nothing"), 0xEB00, &[0], "two OPTs");
    let (m, took) = timed_udp(&s.proxy, &query_opt(0xEB01, "manyopt.example", OptSpec::stub()));
    let m = m.expect("nothing");
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert_eq!(m.rcode, RCODE_NOERROR);
    let codes = option_codes(&m);
    assert!(!codes.contains(&OPT_PADDING), "padding reached the client");
    assert_eq!(codes.iter().filter(|&&c| c == OPT_NSID).count(), 2, "{codes:?}");
    assert_eq!(m.a_records(), vec![dns::ANSWER_ADDR]);
    quiescent(&s.proxy, fds);
}

/// A DNS cookie (RFC 7873) belongs to one client-server pair, so it is
/// hop-by-hop like padding and keepalive: the upstream's server cookie is
/// not passed to the client.
#[test]
fn m11_upstream_cookie_not_passed_to_client() {
    let script = Script::default().with_hook(|ctx| {
        let o = OptSpec::new(1232).option(OPT_COOKIE, &[7; 24]);
        Some(vec![Action::Send(Resp::to(ctx.query).a().opt(o).build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query_opt(0xEB10, "cookie.example", OptSpec::new(1232)));
    let codes = option_codes(&m.expect("nothing"));
    assert!(
        !codes.contains(&OPT_COOKIE),
        "upstream cookie passed to the client: {codes:?}"
    );
    quiescent(&s.proxy, fds);
}

/// M12: a 65 535-byte answer to a UDP client with a 512 budget: the minimal
/// TC answer, at most 512 bytes.
#[test]
fn m12_max_size_answer_to_512_udp_client() {
    let script = Script::default().with_hook(|ctx| {
        Some(vec![Action::Send(
            Resp::to(ctx.query).opt(OptSpec::new(1232)).sized(65535).build(),
        )])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = timed_udp(&s.proxy, &query(0xEC00, "huge.example"));
    let m = m.expect("nothing");
    assert!(m.tc, "no TC");
    assert!(m.len <= 512, "{} bytes", m.len);
    assert_eq!((m.ancount, m.nscount, m.arcount), (0, 0, 0));
    assert_eq!(m.qname(), "huge.example");
    let r = crate::util::tcp_exchange(s.proxy.tcp_addr(), &query(0xEC01, "huge.example"), deadline_ms(3000));
    let r = r.expect("TCP");
    assert_eq!(Message::must(&r).ancount, 1);
    assert!(r.len() > 65000, "TCP answer {} bytes", r.len());
    quiescent(&s.proxy, fds);
}

/// M13: trailing garbage after the last RR never reaches the client.
#[test]
fn m13_trailing_garbage_after_answer_stripped() {
    let script = Script::default().with_hook(|ctx| {
        let r = Resp::to(ctx.query)
            .a()
            .opt(OptSpec::new(1232))
            .trailing(b"\xde\xad\xbe\xef garbage");
        Some(vec![Action::Send(r.build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let q = query_opt(0xED00, "trailing.example", OptSpec::new(1232));
    let r = udp_exchange(s.proxy.udp_addr(), &q, deadline_ms(3000)).expect("nothing");
    let m = Message::must(&r);
    if m.rcode == RCODE_NOERROR {
        let upq = s.upstream.queries()[0].bytes.clone();
        let clean = Resp::to(&upq).a().opt(OptSpec::new(1232)).build();
        assert_eq!(r.len(), clean.len(), "trailing bytes forwarded");
        assert_eq!(&r[2..], &clean[2..]);
    } else {
        assert_eq!(m.rcode, RCODE_SERVFAIL);
    }
    quiescent(&s.proxy, fds);
}

/// M14: a header-only REFUSED or SERVFAIL is passed on with the client's
/// ID; a header-only NOERROR or NXDOMAIN could answer anything: dropped,
/// the query times out.
#[test]
fn m14_header_only_answers() {
    let script = Script::default().with_hook(|ctx| {
        let q = ctx.query;
        let rc = if first_label_starts_with(q, "refused") {
            RCODE_REFUSED
        } else if first_label_starts_with(q, "servfail") {
            RCODE_SERVFAIL
        } else if first_label_starts_with(q, "noerror") {
            RCODE_NOERROR
        } else if first_label_starts_with(q, "nxdomain") {
            RCODE_NXDOMAIN
        } else {
            return None;
        };
        Some(vec![Action::Send(Resp::to(q).no_question().rcode(rc).build())])
    });
    let (s, fds) = Setup::observed(script, 500, &[]);
    for (id, name, rc) in [
        (0xEE00u16, "refused.example", RCODE_REFUSED),
        (0xEE01, "servfail.example", RCODE_SERVFAIL),
    ] {
        let (m, took) = timed_udp(&s.proxy, &query(id, name));
        let m = m.expect("nothing");
        assert_eq!((m.id, m.rcode), (id, rc), "{name}");
        assert!(took < Duration::from_millis(300), "{name}: {took:?}");
    }
    for (id, name) in [(0xEE02u16, "noerror.example"), (0xEE03, "nxdomain.example")] {
        let (m, took) = timed_udp(&s.proxy, &query_opt(id, name, OptSpec::stub()));
        assert_servfail_ede(&m.expect("nothing"), id, &[22], name);
        assert!(took >= Duration::from_millis(400), "{name}: {took:?}");
    }
    assert_eq!(s.proxy.metrics().upstream_dropped("wrong_question"), 2.0);
    quiescent(&s.proxy, fds);
}
