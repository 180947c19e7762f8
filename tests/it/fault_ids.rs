//! Rewritten transaction IDs: uniqueness on a connection, randomness,
//! tombstones for late answers, edge IDs, many clients with one question,
//! slot reuse, long runs.
//!
//! Test names start with the case's label (I1, I2, …): the labels only
//! number the cases of this module, so that a comment or a commit can
//! name one.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::client::{assert_bulk_ok, udp_bulk};
use crate::util::dns::{frame, Message, RCODE_NOERROR, RCODE_SERVFAIL};
use crate::util::upstream::first_label_starts_with;
use crate::util::wire::{self, question_bytes, OptSpec, Resp, OPT_KEEPALIVE};
use crate::util::{
    deadline_ms, query, quiescent, tcp_exchange, udp_exchange, udp_recv, udp_socket, Action, CloseKind, Script, Setup,
    TcpClient,
};

/// I1: 1 200 queries held by the upstream fill the first connection to its
/// cap (1 000 in flight); the rest go to a second connection; every ID in
/// flight on a connection is unique; all are answered.
#[test]
fn i1_connection_filled_to_its_cap() {
    let (s, fds) = Setup::observed(
        Script::delayed(Duration::from_millis(400)),
        3000,
        &["--max-inflight-per-ip", "5000"],
    );
    let qs: Vec<_> = (0..1200u16).map(|i| query(i, &format!("cap{i}.example"))).collect();
    let r = udp_bulk(s.proxy.udp_addr(), &qs, 1200, None, deadline_ms(5000));
    assert_bulk_ok(&r, |i| format!("cap{i}.example"), "cap");
    let st = s.upstream.stats();
    assert_eq!(
        st.duplicate_inflight, 0,
        "an upstream ID was reused while in flight: {:?}",
        st.duplicates
    );
    let max = st.max_inflight.values().copied().max().unwrap_or(0);
    assert!(max <= 1000, "{max} queries in flight on one connection");
    assert!(
        st.max_inflight.len() >= 2,
        "the excess did not go to another connection: {:?}",
        st.max_inflight
    );
    assert!(st.max_open <= 4, "{} connections", st.max_open);
    quiescent(&s.proxy, fds);
}

/// I2: over 10 000 queries the upstream IDs are not the client IDs, not
/// sequential, spread evenly over the 16-bit space, and never repeated
/// while in flight on a connection.
#[test]
fn i2_ten_thousand_ids_random_and_unique() {
    let (s, fds) = Setup::observed(Script::default(), 3000, &[]);
    let qs: Vec<_> = (0..10_000u16).map(|i| query(i, &format!("r{i}.example"))).collect();
    let r = udp_bulk(
        s.proxy.udp_addr(),
        &qs,
        200,
        Some(Duration::from_millis(1000)),
        deadline_ms(15_000),
    );
    assert_bulk_ok(&r, |i| format!("r{i}.example"), "r");
    let st = s.upstream.stats();
    assert_eq!(st.duplicate_inflight, 0, "{:?}", st.duplicates);
    let mut same = 0;
    let mut ids = Vec::with_capacity(st.queries.len());
    for q in &st.queries {
        let client: u16 = q
            .qname()
            .trim_start_matches('r')
            .trim_end_matches(".example")
            .parse()
            .unwrap();
        same += usize::from(q.id() == client);
        ids.push(q.id());
    }
    assert!(same <= 10, "{same} upstream IDs equal the client's");
    let sequential = ids.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
    assert!(sequential <= 20, "{sequential} consecutive IDs in a row");
    let mut buckets = [0usize; 16];
    for id in &ids {
        buckets[(id >> 12) as usize] += 1;
    }
    let expect = ids.len() / 16;
    for (b, &n) in buckets.iter().enumerate() {
        assert!(
            n.abs_diff(expect) <= 200,
            "bucket {b}: {n} of {} IDs (expected ~{expect})",
            ids.len()
        );
    }
    quiescent(&s.proxy, fds);
}

/// I3: Q1 times out, 5 000 more queries churn the ID space, then Q1's
/// answer arrives: it reaches nobody, and its ID was never handed to
/// another query meanwhile (tombstone).
#[test]
fn i3_late_answer_after_churn_reaches_nobody() {
    let script = Script::default().with_hook(|ctx| {
        first_label_starts_with(ctx.query, "victim")
            .then(|| vec![Action::Delay(Duration::from_millis(1500)), Action::Answer])
    });
    let (s, fds) = Setup::observed(script, 400, &["--max-inflight-per-ip", "5000"]);
    // Warm: the connection exists and has answered.
    assert!(udp_exchange(s.proxy.udp_addr(), &query(1, "warm.example"), deadline_ms(2000)).is_some());
    let victim = udp_socket();
    victim
        .send_to(&query(0x3333, "victim.example"), s.proxy.udp_addr())
        .unwrap();
    // An answer after Q1 went out: the connection is alive, not stalled.
    assert!(udp_exchange(s.proxy.udp_addr(), &query(2, "alive.example"), deadline_ms(2000)).is_some());
    let r = udp_recv(&victim, deadline_ms(2000)).expect("victim: nothing");
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (0x3333, RCODE_SERVFAIL));
    let t_churn = Instant::now();
    let qs: Vec<_> = (0..5000u16).map(|i| query(i, &format!("c{i}.example"))).collect();
    let bulk = udp_bulk(
        s.proxy.udp_addr(),
        &qs,
        200,
        Some(Duration::from_millis(1000)),
        deadline_ms(10_000),
    );
    assert_bulk_ok(&bulk, |i| format!("c{i}.example"), "c");
    eprintln!("i3: churn took {:?}", t_churn.elapsed());
    let (m, ok) = s
        .proxy
        .wait_metrics(deadline_ms(3000), |m| m.upstream_dropped("late") >= 1.0);
    assert!(ok, "late answer never counted");
    assert_eq!(m.upstream_dropped("late"), 1.0);
    assert!(
        udp_recv(&victim, deadline_ms(100)).is_none(),
        "late answer delivered to its client"
    );
    // The victim's upstream ID stayed reserved until its answer came.
    let st = s.upstream.stats();
    let v = st
        .queries
        .iter()
        .find(|q| q.qname() == "victim.example")
        .expect("victim upstream");
    let reused: Vec<_> = st
        .queries
        .iter()
        .filter(|q| q.conn == v.conn && q.id() == v.id() && q.seq != v.seq && q.at < v.at + Duration::from_millis(1500))
        .map(|q| q.qname())
        .collect();
    assert!(reused.is_empty(), "tombstoned ID {:#06x} reused by {reused:?}", v.id());
    quiescent(&s.proxy, fds);
}

/// I4: client IDs 0 and 65 535 over UDP and TCP come back intact.
#[test]
fn i4_edge_client_ids() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    for id in [0u16, 0xFFFF] {
        let name = format!("id{id}.example");
        let r = udp_exchange(s.proxy.udp_addr(), &query(id, &name), deadline_ms(2000));
        assert_default_answer(&r.expect("udp"), id, &name);
        let r = tcp_exchange(s.proxy.tcp_addr(), &query(id, &name), deadline_ms(2000));
        assert_default_answer(&r.expect("tcp"), id, &name);
    }
    quiescent(&s.proxy, fds);
}

/// I5: 100 clients ask the same question at once, each in its own case
/// and with its own ID: each gets its own ID and its own question bytes.
#[test]
fn i5_hundred_clients_same_question() {
    let (s, fds) = Setup::observed(Script::delayed(Duration::from_millis(100)), 2000, &[]);
    let base = "same.question.example";
    let socks: Vec<_> = (0..100).map(|_| udp_socket()).collect();
    let mut sent = Vec::new();
    for (i, sock) in socks.iter().enumerate() {
        // A distinct case pattern per client (bits of i over the letters).
        let name: String = base
            .chars()
            .enumerate()
            .map(|(k, c)| {
                if (i >> (k % 7)) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        let id = 0x5000 + i as u16 * 3;
        let q = query(id, &name);
        sock.send_to(&q, s.proxy.udp_addr()).unwrap();
        sent.push((id, q));
    }
    for (i, sock) in socks.iter().enumerate() {
        let (id, q) = &sent[i];
        let r = udp_recv(sock, deadline_ms(3000)).unwrap_or_else(|| panic!("client {i}: nothing"));
        let m = Message::must(&r);
        assert_eq!(m.id, *id, "client {i}: ID");
        assert_eq!(m.rcode, RCODE_NOERROR, "client {i}");
        assert_eq!(question_bytes(&r), question_bytes(q), "client {i}: question bytes");
        assert!(udp_recv(sock, deadline_ms(5)).is_none(), "client {i}: two answers");
    }
    quiescent(&s.proxy, fds);
}

/// I6: a TCP client leaves with a query in flight and a new client takes
/// its place at once, with the same ID: the old answer never reaches the
/// new client.
#[test]
fn i6_late_answer_never_reaches_the_next_tcp_client() {
    let (s, fds) = Setup::observed(Script::delayed(Duration::from_millis(50)), 2000, &[]);
    for round in 0..10u16 {
        let old_name = format!("old{round}.example");
        let new_name = format!("new{round}.example");
        let mut old = TcpClient::connect(s.proxy.tcp_addr());
        old.send(&query(0x6666, &old_name));
        // In flight: the upstream has it (and answers 50 ms later).
        assert!(
            s.upstream
                .wait_until(deadline_ms(2000), |st| st.queries.iter().any(|q| q.qname() == old_name)),
            "round {round}: the old client's query never reached the upstream"
        );
        drop(old);
        let mut new = TcpClient::connect(s.proxy.tcp_addr());
        new.send(&query(0x6666, &new_name));
        let r = new
            .recv(deadline_ms(2000))
            .unwrap_or_else(|| panic!("round {round}: nothing"));
        let m = Message::must(&r);
        assert_eq!(
            m.qname(),
            new_name,
            "round {round}: the old client's answer reached the new one"
        );
        assert!(new.recv(deadline_ms(30)).is_none(), "round {round}: extra frame");
    }
    quiescent(&s.proxy, fds);
}

/// I7 (smoke; the generation checks themselves are unit-tested): a
/// connection with a short keepalive idle timer is closed by the server
/// and replaced in the same slot; the old timers firing later do not
/// disturb the new connection.
#[test]
fn i7_replaced_connection_not_disturbed_by_old_timers() {
    let script = Script::default().with_hook(|ctx| {
        (ctx.conn == 1).then(|| {
            let ans = Resp::to(ctx.query)
                .a()
                .opt(OptSpec::new(1232).option(OPT_KEEPALIVE, &wire::keepalive(5)))
                .build();
            vec![
                Action::Send(ans),
                Action::Delay(Duration::from_millis(30)),
                Action::Close(CloseKind::CloseNotify),
            ]
        })
    });
    let (s, fds) = Setup::observed(script, 500, &[]);
    let ask = |id: u16, name: &str| {
        let r = udp_exchange(s.proxy.udp_addr(), &query(id, name), deadline_ms(2000));
        assert_default_answer(&r.unwrap_or_else(|| panic!("{name}")), id, name);
    };
    ask(1, "one.example");
    assert!(s.upstream.wait_until(deadline_ms(1000), |st| st.open == 0));
    ask(2, "two.example");
    // The stimulus is time itself: let the old connection's idle (400 ms)
    // and handshake (500 ms) timers come due. A stale timer that is rightly
    // ignored leaves nothing to observe, so this is a plain sleep.
    std::thread::sleep(Duration::from_millis(700));
    ask(3, "three.example");
    let st = s.upstream.stats();
    assert_eq!(st.accepts, 2, "the second connection was replaced");
    assert_eq!(st.open, 1);
    assert_eq!(
        st.peer_close_notify + st.peer_eof,
        0,
        "the proxy closed the new connection"
    );
    quiescent(&s.proxy, fds);
}

/// I8: 200 000 queries on one TCP client connection and one upstream
/// connection (256 in flight at a time): the ID space wraps three times;
/// every answer matches its query; the upstream IDs are not the client's.
#[test]
fn i8_two_hundred_thousand_queries_on_one_connection() {
    const N: u32 = 200_000;
    const WINDOW: u32 = 256;
    let (s, fds) = Setup::observed(Script::default(), 5000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let name = |i: u32| format!("i{i}.example");
    let mut batch = Vec::new();
    for i in 0..WINDOW {
        batch.extend_from_slice(&frame(&query(i as u16, &name(i))));
    }
    c.stream.write_all(&batch).unwrap();
    batch.clear();
    let (mut next, mut done) = (WINDOW, 0u32);
    let t0 = Instant::now();
    let deadline = deadline_ms(30_000);
    let mut seen = HashSet::new();
    // Bounded: N answers or the deadline.
    while done < N {
        let f = c
            .recv(deadline)
            .unwrap_or_else(|| panic!("stalled after {done} answers"));
        let m = Message::must(&f);
        let i: u32 = m
            .qname()
            .trim_start_matches('i')
            .trim_end_matches(".example")
            .parse()
            .expect("our name");
        assert_eq!(m.id, i as u16, "answer {i}: ID");
        assert_eq!(m.rcode, RCODE_NOERROR, "answer {i}");
        assert!(seen.insert(i), "answer {i} twice");
        done += 1;
        if next < N {
            batch.extend_from_slice(&frame(&query(next as u16, &name(next))));
            next += 1;
        }
        // Refill 32 at a time: fewer, bigger writes.
        if batch.len() >= 32 * 20 || (next == N && !batch.is_empty()) {
            c.stream.write_all(&batch).unwrap();
            batch.clear();
        }
    }
    eprintln!("i8: {N} queries in {:?}", t0.elapsed());
    assert_eq!(s.upstream.accepts(), 1, "more than one upstream connection");
    assert_eq!(s.upstream.duplicate_inflight_ids(), 0);
    assert_eq!(s.upstream.query_count(), N as usize);
    // Rewritten on the way up, as over UDP (i2): a random ID equals the
    // client's about once in 65 536.
    let same = s.upstream.with_stats(|st| {
        st.queries
            .iter()
            .filter(|q| {
                let name = q.qname();
                let i: u32 = name
                    .trim_start_matches('i')
                    .trim_end_matches(".example")
                    .parse()
                    .unwrap_or_else(|_| panic!("upstream got {name}"));
                q.id() == i as u16
            })
            .count()
    });
    assert!(
        same <= N as usize / 1000,
        "{same} of {N} upstream IDs equal the client's"
    );
    drop(c);
    quiescent(&s.proxy, fds);
}
