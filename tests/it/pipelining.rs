//! Pipelining over TCP, out-of-order answers, many UDP clients sharing IDs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::client::udp_bulk;
use crate::util::dns::{Message, ANSWER_ADDR, RCODE_NOERROR};
use crate::util::{deadline_ms, query, Action, CloseKind, Script, Setup, TcpClient, NAME};

/// Distinct, scattered client IDs (7919 is odd, so i -> i*7919 is a bijection
/// mod 2^16).
fn scattered_id(i: usize) -> u16 {
    ((i as u32 * 7919) as u16) ^ 0x5a5a
}

/// Sends `n` queries (q0..q{n-1}.example) in ONE write on one connection and
/// checks every answer is there exactly once, matched by ID and qname.
fn pipelined_tcp(s: &Setup, n: usize) {
    let mut want: HashMap<u16, String> = HashMap::new();
    let mut msgs = Vec::new();
    for i in 0..n {
        let (id, name) = (scattered_id(i), format!("q{i}.example"));
        msgs.push(query(id, &name));
        want.insert(id, name);
    }
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&msgs);
    let answers = c.recv_n(n, deadline_ms(15_000));
    let mut seen: HashMap<u16, usize> = HashMap::new();
    let mut order = Vec::new();
    for a in &answers {
        let m = Message::must(a);
        let name = want
            .get(&m.id)
            .unwrap_or_else(|| panic!("answer with unknown ID {:#06x}", m.id));
        assert_eq!(m.qname(), name, "ID {:#06x} answered for the wrong name", m.id);
        assert_eq!(m.rcode, RCODE_NOERROR, "rcode for {name}");
        assert_eq!(m.a_records(), vec![ANSWER_ADDR], "answer for {name}");
        *seen.entry(m.id).or_default() += 1;
        order.push(m.id);
    }
    let missing: Vec<_> = want.keys().filter(|id| !seen.contains_key(id)).collect();
    assert!(
        missing.is_empty() && answers.len() == n,
        "{} of {n} answers; missing {} IDs",
        answers.len(),
        missing.len()
    );
    assert!(seen.values().all(|&c| c == 1), "duplicate answers");
    assert_eq!(
        s.upstream.duplicate_inflight_ids(),
        0,
        "proxy reused an in-flight upstream ID on one connection"
    );
}

#[test]
fn tcp_200_pipelined_in_one_write_reverse_batches() {
    let s = Setup::with_timeout(Script::reverse_batch(50), 5000);
    pipelined_tcp(&s, 200);
    assert!(s.upstream.query_count() >= 200);
}

#[test]
fn tcp_200_pipelined_in_one_write_random_delays() {
    let s = Setup::with_timeout(Script::default().with_jitter(Duration::from_millis(200)), 5000);
    pipelined_tcp(&s, 200);
}

#[test]
fn tcp_200_pipelined_reverse_batches_with_jitter() {
    let s = Setup::with_timeout(Script::reverse_batch(50).with_jitter(Duration::from_millis(30)), 5000);
    pipelined_tcp(&s, 200);
}

/// 20 UDP sockets x 100 queries, every socket using the SAME IDs 0..100;
/// each answer must reach the right socket with the right ID and qname.
#[test]
fn udp_2000_queries_20_sockets_same_ids() {
    const SOCKETS: usize = 20;
    const PER: usize = 100;
    const WINDOW: usize = 10;
    let s = Setup::with_timeout(Script::default(), 3000);
    let addr = s.proxy.udp_addr();
    let results: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..SOCKETS)
            .map(|k| {
                sc.spawn(move || {
                    let qs: Vec<_> = (0..PER)
                        .map(|i| query(i as u16, &format!("s{k}-q{i}.example")))
                        .collect();
                    let r = udp_bulk(
                        addr,
                        &qs,
                        WINDOW,
                        Some(Duration::from_millis(1500)),
                        deadline_ms(25_000),
                    );
                    (k, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut retransmits = 0;
    for (k, r) in &results {
        retransmits += r.retransmits;
        for (i, a) in r.answers.iter().enumerate() {
            let a = a
                .as_ref()
                .unwrap_or_else(|| panic!("socket {k}: query {i} unanswered ({} answered)", r.answered()));
            let m = Message::must(a);
            assert_eq!(m.id as usize, i);
            assert_eq!(
                m.qname(),
                format!("s{k}-q{i}.example"),
                "socket {k} ID {i}: answer for another client"
            );
            assert_eq!(m.rcode, RCODE_NOERROR, "socket {k} query {i}");
            assert_eq!(m.a_records(), vec![ANSWER_ADDR]);
        }
        for st in &r.stray {
            // Only duplicates of our own retransmitted queries are tolerated.
            let m = Message::must(st);
            assert_eq!(
                m.qname(),
                format!("s{k}-q{}.example", m.id),
                "socket {k}: stray answer for another client"
            );
        }
    }
    // UDP may lose a datagram now and then, but not systematically.
    assert!(
        retransmits <= 20,
        "{retransmits} retransmissions needed for 2000 queries"
    );
    assert_eq!(s.upstream.duplicate_inflight_ids(), 0);
}

/// A server that handles one query of a connection at a time, the way
/// dnsdist does with its default settings: a query that arrives while it
/// is still busy with the previous one (pipelined, in the same TLS record)
/// is never answered, and the connection is closed after a 2 s receive
/// timeout. Each answer takes `work`. Returns the script and a counter of
/// the queries it dropped.
fn one_at_a_time_server(work: Duration) -> (Script, Arc<AtomicUsize>) {
    let busy: Arc<Mutex<HashMap<usize, (Instant, bool)>>> = Arc::default();
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&dropped);
    let script = Script::default().with_hook(move |ctx| {
        let now = Instant::now();
        let mut busy = busy.lock().unwrap();
        let (until, closing) = busy.entry(ctx.conn).or_insert((now, false));
        if *until <= now {
            *until = now + work;
            return Some(vec![Action::Delay(work), Action::Answer]);
        }
        counter.fetch_add(1, Ordering::Relaxed);
        if std::mem::replace(closing, true) {
            Some(vec![])
        } else {
            Some(vec![
                Action::Delay(Duration::from_secs(2)),
                Action::Close(CloseKind::Fin),
            ])
        }
    });
    (script, dropped)
}

/// Through a server that does not pipeline, 200 queries pipelined on one
/// client TCP connection are all answered, none SERVFAIL: the proxy sees
/// the connection answer the first of several queries and fall silent,
/// re-sends the rest at once and from then on sends that upstream one
/// query per connection at a time (several connections).
#[test]
fn a_server_that_does_not_pipeline_loses_nothing_over_tcp() {
    let (script, dropped) = one_at_a_time_server(Duration::from_millis(2));
    let (s, _) = Setup::observed(script, 2500, &[]);
    let t0 = Instant::now();
    pipelined_tcp(&s, 200);
    let took = t0.elapsed();
    let m = s.proxy.metrics();
    assert_eq!(m.answers("SERVFAIL"), 0.0);
    assert_eq!(
        m.labeled("dotproxy_upstream_pipelining", "upstream", &s.upstream.arg(NAME)),
        0.0
    );
    assert!(
        dropped.load(Ordering::Relaxed) > 0,
        "the server never dropped a pipelined query"
    );
    let before = dropped.load(Ordering::Relaxed);
    // From now on nothing reaches it while it is busy: one at a time.
    let t1 = Instant::now();
    pipelined_tcp(&s, 200);
    let serial = t1.elapsed();
    assert_eq!(
        dropped.load(Ordering::Relaxed),
        before,
        "queries pipelined after the switch"
    );
    eprintln!(
        "no pipelining: first 200 in {took:?} (detection and re-send), next 200 one at a time in {serial:?} ({:.0} q/s)",
        200.0 / serial.as_secs_f64()
    );
    assert_eq!(s.proxy.count_log("it does not pipeline"), 1, "one warning");
}

/// The same server, 2,000 UDP queries from 20 sockets: every one answered,
/// none SERVFAIL or REFUSED.
#[test]
fn a_server_that_does_not_pipeline_loses_nothing_over_udp() {
    let (script, dropped) = one_at_a_time_server(Duration::from_millis(1));
    // 2,000 queries one at a time over 16 connections take a while on a
    // loaded machine: a timeout that leaves room for the queue.
    let (s, _) = Setup::observed(script, 5000, &[]);
    let addr = s.proxy.udp_addr();
    let t0 = Instant::now();
    let results: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..20u16)
            .map(|k| {
                sc.spawn(move || {
                    let qs: Vec<_> = (0..100u16)
                        .map(|i| query(k * 100 + i, &format!("u{k}-{i}.example")))
                        .collect();
                    udp_bulk(addr, &qs, 100, None, deadline_ms(10_000))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = t0.elapsed();
    let mut rcodes: HashMap<u8, usize> = HashMap::new();
    for r in &results {
        for a in r.answers.iter().flatten() {
            *rcodes.entry(Message::must(a).rcode).or_default() += 1;
        }
    }
    eprintln!(
        "no pipelining, 2000 udp queries from 20 sockets: {rcodes:?} in {took:?}; {} dropped by the server, {} received",
        dropped.load(Ordering::Relaxed),
        s.upstream.query_count()
    );
    assert_eq!(rcodes.get(&RCODE_NOERROR), Some(&2000), "{rcodes:?}");
}
