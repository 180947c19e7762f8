//! TCP client framing (RFC 7766) and connection management: pipelining,
//! split and malformed frames, slowloris, idle timeouts, clients that
//! never read, half-closes, resets, urgent data, big answers. The
//! connection limit is in `fault_resources` (r2).
//!
//! Test names start with the case's label (T1, T2, …): the labels only
//! number the cases of this module, so that a comment or a commit can
//! name one.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::dns::{frame, Message, RCODE_FORMERR, RCODE_NOERROR};
use crate::util::net::{reset, send_oob, set_rcvbuf};
use crate::util::wire::{self, option_codes, query_opt, OptSpec, Resp, OPT_KEEPALIVE, OPT_PADDING};
use crate::util::{
    deadline_ms, query, quiescent, tcp_exchange, udp_exchange, Action, Script, Setup, TcpClient, TcpEvent,
};

/// Waits for the proxy to close `c`: EOF or an error (RST) before
/// `deadline`; frames on the way are returned.
fn wait_closed(c: &mut TcpClient, deadline: Instant) -> (bool, Vec<Vec<u8>>) {
    let mut frames = Vec::new();
    // Bounded by the deadline.
    loop {
        match c.next_event(deadline) {
            TcpEvent::Frame(f) => frames.push(f),
            TcpEvent::Closed { .. } | TcpEvent::Error(_) => return (true, frames),
            TcpEvent::Timeout => return (false, frames),
        }
    }
}

/// T1: five pipelined queries, the first slow upstream: answers 2-5 come
/// before answer 1, every ID right (RFC 7766 §7).
#[test]
fn t1_pipelined_answers_out_of_order() {
    let script = Script {
        slow_delay: Duration::from_millis(300),
        ..Script::default()
    };
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let names = ["slow.example", "q1.example", "q2.example", "q3.example", "q4.example"];
    let msgs: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| query(0x100 + i as u16, n))
        .collect();
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&msgs);
    let answers = c.recv_n(5, deadline_ms(3000));
    assert_eq!(answers.len(), 5);
    for (k, a) in answers.iter().enumerate() {
        let m = Message::must(a);
        let i = (m.id - 0x100) as usize;
        assert_default_answer(a, m.id, names[i]);
        if k < 4 {
            assert_ne!(i, 0, "the slow answer came before a fast one");
        }
    }
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T2: 100 queries in one write, 100 answers, upstream connections within
/// the cap (4 per upstream).
#[test]
fn t2_hundred_queries_in_one_write() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let msgs: Vec<_> = (0..100u16).map(|i| query(i, &format!("h{i}.example"))).collect();
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&msgs);
    let answers = c.recv_n(100, deadline_ms(5000));
    assert_eq!(answers.len(), 100);
    let ids: HashSet<u16> = answers
        .iter()
        .map(|a| {
            let m = Message::must(a);
            assert_default_answer(a, m.id, &format!("h{}.example", m.id));
            m.id
        })
        .collect();
    assert_eq!(ids.len(), 100);
    assert!(
        s.upstream.max_open_connections() <= 4,
        "{}",
        s.upstream.max_open_connections()
    );
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T3: the length prefix one byte at a time, the body in three pieces; then
/// a whole query one byte at a time; then five queries cut at awkward
/// places (inside a length prefix, inside a message, across frames).
#[test]
fn t3_query_trickled_in_pieces() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let f = frame(&query(0x0303, "pieces.example"));
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let third = (f.len() - 2) / 3;
    c.send_split(&f, &[1, 2, 2 + third, 2 + 2 * third], Duration::from_millis(50));
    let r = c.recv(deadline_ms(3000)).expect("pieces: no answer");
    assert_default_answer(&r, 0x0303, "pieces.example");
    let f = frame(&query(0x0304, "bytes.example"));
    let cuts: Vec<usize> = (1..f.len()).collect();
    c.send_split(&f, &cuts, Duration::from_millis(3));
    let r = c.recv(deadline_ms(3000)).expect("byte by byte: no answer");
    assert_default_answer(&r, 0x0304, "bytes.example");
    let mut bytes = Vec::new();
    for i in 0..5u16 {
        bytes.extend_from_slice(&frame(&query(i, &format!("s{i}.example"))));
    }
    // Cuts inside the first prefix (1), inside messages (9, and mid-frame),
    // at a frame's end (fl), inside a later prefix (fl + 1, 3 fl + 1), and
    // one write carrying the end of the second frame and the start of the
    // third.
    let fl = bytes.len() / 5;
    let cuts = [
        1,
        2,
        9,
        fl,
        fl + 1,
        fl + fl / 2,
        2 * fl + fl / 2,
        3 * fl + 1,
        bytes.len() - 1,
    ];
    c.send_split(&bytes, &cuts, Duration::from_millis(5));
    let answers = c.recv_n(5, deadline_ms(3000));
    let mut ids: Vec<u16> = answers
        .iter()
        .map(|a| {
            let m = Message::must(a);
            assert_default_answer(a, m.id, &format!("s{}.example", m.id));
            m.id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3, 4], "split frames");
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T4: three queries and half a fourth in one segment: three answers come
/// at once, the fourth once its frame is complete.
#[test]
fn t4_three_and_a_half_queries() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let mut bytes = Vec::new();
    for i in 0..4u16 {
        bytes.extend_from_slice(&frame(&query(i, &format!("f{i}.example"))));
    }
    let fourth = frame(&query(3, "f3.example")).len();
    let cut = bytes.len() - fourth / 2;
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_raw(&bytes[..cut]);
    let first = c.recv_n(3, deadline_ms(3000));
    assert_eq!(first.len(), 3, "the three complete queries were not answered at once");
    let ids: HashSet<u16> = first.iter().map(|a| Message::must(a).id).collect();
    assert_eq!(ids, HashSet::from([0, 1, 2]));
    assert!(c.recv(deadline_ms(100)).is_none(), "the half query was answered");
    c.send_raw(&bytes[cut..]);
    let r = c.recv(deadline_ms(3000)).expect("fourth unanswered");
    assert_default_answer(&r, 3, "f3.example");
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T5: a frame of length 0 closes the connection; the answer still pending
/// for it is dropped (never written to anybody).
#[test]
fn t5_zero_length_frame_closes_pending_dropped() {
    let script = Script {
        slow_delay: Duration::from_millis(300),
        ..Script::default()
    };
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let mut bytes = frame(&query(0x0505, "slow.example"));
    bytes.extend_from_slice(&[0, 0]);
    c.send_raw(&bytes);
    let t = Instant::now();
    let (closed, frames) = wait_closed(&mut c, deadline_ms(2000));
    assert!(closed, "not closed after a zero-length frame");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "closed after {:?}",
        t.elapsed()
    );
    assert!(frames.is_empty(), "got {} frames", frames.len());
    let (m, ok) = s.proxy.wait_metrics(deadline_ms(2000), |m| m.inflight() == 0.0);
    assert!(ok, "slow query still in flight: {}", m.inflight());
    assert!(s.proxy.metrics().dropped("malformed") >= 1.0);
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T6: frames of length 1 and 11 (shorter than a header) close the
/// connection.
#[test]
fn t6_frames_shorter_than_a_header_close() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    for len in [1usize, 11] {
        let mut c = TcpClient::connect(s.proxy.tcp_addr());
        let mut bytes = (len as u16).to_be_bytes().to_vec();
        bytes.extend_from_slice(&query(0x0606, "short.example")[..len]);
        c.send_raw(&bytes);
        let (closed, frames) = wait_closed(&mut c, deadline_ms(1000));
        assert!(
            closed && frames.is_empty(),
            "length {len}: closed {closed}, {} frames",
            frames.len()
        );
    }
    assert_eq!(s.upstream.query_count(), 0);
    quiescent(&s.proxy, fds);
}

/// T7: 512 bytes announced, 20 sent, then silence: closed at the message
/// deadline (`--tcp-idle-timeout 500`); another client is served meanwhile.
#[test]
fn t7_incomplete_frame_closed_at_deadline() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--tcp-idle-timeout", "500"]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let t = Instant::now();
    let mut bytes = 512u16.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0x42; 20]);
    c.send_raw(&bytes);
    let r = tcp_exchange(s.proxy.tcp_addr(), &query(0x0707, "other.example"), deadline_ms(1000));
    assert_default_answer(&r.expect("other client not served"), 0x0707, "other.example");
    let (closed, _) = wait_closed(&mut c, deadline_ms(2500));
    let took = t.elapsed();
    assert!(closed, "stalled frame not closed");
    assert!(
        took >= Duration::from_millis(400) && took <= Duration::from_millis(1200),
        "closed after {took:?} with a 500 ms idle timeout"
    );
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T8: a length prefix shorter than the message cuts it: the cut message is
/// FORMERR (or the stream is closed), nothing misparsed goes upstream, and
/// the connection ends by the deadline at the latest.
#[test]
fn t8_prefix_shorter_than_message() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--tcp-idle-timeout", "500"]);
    let q = query(0x0808, "prefix-cuts-the-message.example");
    let mut bytes = 20u16.to_be_bytes().to_vec();
    bytes.extend_from_slice(&q);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_raw(&bytes);
    let (closed, frames) = wait_closed(&mut c, deadline_ms(2000));
    assert!(closed, "connection left open past the deadline");
    eprintln!("t8: {} frames before the close", frames.len());
    for f in &frames {
        let m = Message::must(f);
        assert_eq!(m.id, 0x0808);
        assert_eq!(m.rcode, RCODE_FORMERR, "cut message answered with rcode {}", m.rcode);
    }
    assert_eq!(s.upstream.query_count(), 0, "a cut message went upstream");
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T9: garbage frames of 1 024 and 65 533 bytes, then a valid query on the
/// same connection: the query is answered, the garbage never forwarded. A
/// 1-byte frame is shorter than a header and closes the connection.
#[test]
fn t9_garbage_frames_then_valid_query() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    for (k, len) in [1024usize, 65533].into_iter().enumerate() {
        let mut g = wire::noise(len as u64, len);
        g[0..2].copy_from_slice(&(0xEE00 + k as u16).to_be_bytes());
        g[2] &= 0x01; // QR=0, opcode QUERY, TC=0: the parser has to look
        g[4..6].copy_from_slice(&[0, 1]);
        let mut c = TcpClient::connect(s.proxy.tcp_addr());
        let mut bytes = frame(&g);
        bytes.extend_from_slice(&frame(&query(0x0909, "after-garbage.example")));
        c.send_raw(&bytes);
        let mut got_answer = false;
        // Bounded: at most 2 frames (garbage reply, answer).
        for _ in 0..2 {
            let Some(f) = c.recv(deadline_ms(3000)) else { break };
            let m = Message::must(&f);
            if m.id == 0x0909 {
                assert_default_answer(&f, 0x0909, "after-garbage.example");
                got_answer = true;
                break;
            }
            assert_ne!(m.rcode, RCODE_NOERROR, "garbage of {len} answered NOERROR");
        }
        assert!(got_answer, "{len} bytes of garbage: valid query unanswered");
    }
    assert_eq!(s.upstream.query_count(), 2, "garbage went upstream");
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_raw(&[0, 1, 0x42]);
    let (closed, _) = wait_closed(&mut c, deadline_ms(1000));
    assert!(closed, "1-byte frame did not close the connection");
    quiescent(&s.proxy, fds);
}

/// T10: trailing garbage inside a frame: FORMERR for it, the following
/// queries on the connection answered.
#[test]
fn t10_trailing_garbage_inside_frame() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let mut bad = query(0x1010, "trailing.example");
    bad.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&[bad, query(0x1011, "next1.example"), query(0x1012, "next2.example")]);
    let answers = c.recv_n(3, deadline_ms(3000));
    assert_eq!(answers.len(), 3);
    for a in &answers {
        let m = Message::must(a);
        match m.id {
            0x1010 => assert_eq!(m.rcode, RCODE_FORMERR),
            0x1011 => {
                assert_default_answer(a, 0x1011, "next1.example");
            }
            0x1012 => {
                assert_default_answer(a, 0x1012, "next2.example");
            }
            id => panic!("unexpected ID {id:#x}"),
        }
    }
    assert_eq!(s.upstream.query_count(), 2);
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T11: 10 000 pipelined queries, then the client closes: everything
/// pending is cancelled, memory comes back down, a new connection works.
#[test]
fn t11_ten_thousand_pipelined_then_close() {
    let (s, fds) = Setup::observed(Script::delayed(Duration::from_millis(200)), 2000, &[]);
    let rss0 = s.proxy.vm_rss_kb();
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.stream.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let mut bytes = Vec::new();
    for i in 0..10_000u32 {
        bytes.extend_from_slice(&frame(&query(i as u16, &format!("p{i}.example"))));
    }
    // The proxy may stop reading (pipeline cap, 64 KiB of input): a write
    // that times out is fine, the point is what happens at close.
    let _ = c.stream.write_all(&bytes);
    let (m, _) = s.proxy.wait_metrics(deadline_ms(1000), |m| m.inflight() > 0.0);
    assert!(
        m.inflight() <= 256.0,
        "{} in flight for one connection (pipeline cap 256)",
        m.inflight()
    );
    reset(c.stream);
    quiescent(&s.proxy, fds);
    let rss = s.proxy.vm_rss_kb();
    assert!(rss <= rss0 + 20 * 1024, "RSS {rss0} kB -> {rss} kB");
    let r = tcp_exchange(s.proxy.tcp_addr(), &query(0x1111, "new.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("new connection"), 0x1111, "new.example");
}

/// T12: a client floods queries for 50 KB answers and never reads: the
/// proxy closes it once its output backlog passes the cap; memory stays
/// bounded; other clients are served throughout.
#[test]
fn t12_client_that_never_reads_is_closed() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    set_rcvbuf(&c.stream, 4096);
    // Accepted and working before the flood.
    let r = c.exchange(&query(0x1200, "first.example"), deadline_ms(2000));
    assert_default_answer(&r.expect("first query"), 0x1200, "first.example");
    c.stream.set_write_timeout(Some(Duration::from_millis(200))).ok();
    let t0 = Instant::now();
    let mut sent = 0u32;
    let mut closed = false;
    // Bounded: 60 batches of 10 queries, or 5 s.
    for batch in 0..60u32 {
        let msgs: Vec<_> = (0..10)
            .map(|i| query((batch * 10 + i) as u16, "txt200.example"))
            .collect();
        let mut buf = Vec::new();
        for m in &msgs {
            buf.extend_from_slice(&frame(m));
        }
        if c.stream.write_all(&buf).is_err() {
            break;
        }
        sent += 10;
        if batch % 5 == 4 {
            if s.proxy.metrics().tcp_clients() == 0.0 {
                closed = true;
                break;
            }
            let r = udp_exchange(
                s.proxy.udp_addr(),
                &query(0x1212, "bystander.example"),
                deadline_ms(2000),
            );
            assert_default_answer(&r.expect("bystander starved"), 0x1212, "bystander.example");
        }
        if t0.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    if !closed {
        let (_, ok) = s.proxy.wait_metrics(deadline_ms(3000), |m| m.tcp_clients() == 0.0);
        closed = ok;
    }
    eprintln!("t12: closed {closed} after {sent} queries in {:?}", t0.elapsed());
    assert!(closed, "client that never reads still connected after {sent} queries");
    assert!(
        s.proxy.count_log("does not read its answers") >= 1,
        "closed, but not for its backlog:\n{}",
        s.proxy.log_text()
    );
    let hwm = s.proxy.vm_hwm_kb();
    assert!(hwm < 96 * 1024, "VmHWM {hwm} kB");
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T13 (slowloris): 65 535 bytes announced, one byte every 100 ms: closed
/// within about a second with `--tcp-idle-timeout 500`, others unaffected.
#[test]
fn t13_slowloris_disconnected() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--tcp-idle-timeout", "500"]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.stream.set_write_timeout(Some(Duration::from_millis(200))).ok();
    let t0 = Instant::now();
    let mut closed_at = None;
    let _ = c.stream.write_all(&[0xff, 0xff]);
    // Bounded: 25 bytes, 100 ms apart.
    for i in 0..25u8 {
        // The stimulus: the slowloris client itself, one byte per 100 ms.
        std::thread::sleep(Duration::from_millis(100));
        if c.stream.write_all(&[i]).is_err() {
            closed_at = Some(t0.elapsed());
            break;
        }
        if i % 3 == 0 {
            let t = Instant::now();
            let r = tcp_exchange(s.proxy.tcp_addr(), &query(0x1313, "other.example"), deadline_ms(1000));
            assert_default_answer(&r.expect("other client"), 0x1313, "other.example");
            assert!(
                t.elapsed() < Duration::from_millis(300),
                "other client waited {:?}",
                t.elapsed()
            );
        }
        if s.proxy.metrics().tcp_clients() == 0.0 {
            closed_at = Some(t0.elapsed());
            break;
        }
    }
    let took = closed_at.expect("slowloris connection never closed");
    assert!(took <= Duration::from_millis(1300), "closed after {took:?}");
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T14: with `--tcp-idle-timeout 500`, an idle connection is closed while
/// one that keeps asking (every 150 ms for 1.5 s) stays open.
#[test]
fn t14_idle_closed_busy_kept() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &["--tcp-idle-timeout", "500"]);
    let mut idle = TcpClient::connect(s.proxy.tcp_addr());
    let mut busy = TcpClient::connect(s.proxy.tcp_addr());
    let t0 = Instant::now();
    for i in 0..10u16 {
        let name = format!("busy{i}.example");
        let r = busy.exchange(&query(i, &name), deadline_ms(1000));
        assert_default_answer(
            &r.unwrap_or_else(|| panic!("busy connection dropped at {:?}", t0.elapsed())),
            i,
            &name,
        );
        // The stimulus: the busy client asks every 150 ms, inside the
        // 500 ms idle timeout.
        std::thread::sleep(Duration::from_millis(150));
    }
    let (closed, _) = wait_closed(&mut idle, deadline_ms(10));
    assert!(closed, "idle connection still open after {:?}", t0.elapsed());
    drop((idle, busy));
    quiescent(&s.proxy, fds);
}

/// T17: three queries, then the client half-closes. The proxy closes the
/// connection promptly (dotproxy answers what is in flight first, bounded
/// by the upstream's answer time) and leaves no CLOSE_WAIT socket behind.
#[test]
fn t17_half_close_closes_promptly() {
    let (s, fds) = Setup::observed(Script::delayed(Duration::from_millis(100)), 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&[query(1, "h1.example"), query(2, "h2.example"), query(3, "h3.example")]);
    c.shutdown_write();
    let t = Instant::now();
    let (closed, frames) = wait_closed(&mut c, deadline_ms(2000));
    assert!(closed, "half-closed connection never closed");
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "closed after {:?}",
        t.elapsed()
    );
    for f in &frames {
        let m = Message::must(f);
        assert_default_answer(f, m.id, &format!("h{}.example", m.id));
    }
    // The proxy's socket is gone (no CLOSE_WAIT): fds back while our end
    // is still open.
    let (_, ok) = s.proxy.wait_metrics(deadline_ms(1000), |m| m.tcp_clients() == 0.0);
    assert!(ok);
    assert!(
        s.proxy.open_fds() <= fds + 3,
        "fds {} (baseline {fds})",
        s.proxy.open_fds()
    );
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T18: a client resets its connection while answers are pending: no
/// crash, state freed.
#[test]
fn t18_reset_with_answers_pending() {
    let (mut s, fds) = Setup::observed(Script::delayed(Duration::from_millis(200)), 2000, &[]);
    for round in 0..5u16 {
        let mut c = TcpClient::connect(s.proxy.tcp_addr());
        let msgs: Vec<_> = (0..5).map(|i| query(round * 10 + i, "pending.example")).collect();
        c.send_many(&msgs);
        // Pending: the upstream has all five (and answers 200 ms later).
        let sent = (usize::from(round) + 1) * 5;
        assert!(
            s.upstream.wait_until(deadline_ms(2000), |st| st.queries.len() >= sent),
            "round {round}: the queries never reached the upstream"
        );
        reset(c.stream);
    }
    assert!(s.proxy.alive(), "proxy died");
    quiescent(&s.proxy, fds);
}

/// T19: TCP urgent data before and inside a query: answered or closed, the
/// process survives.
#[test]
fn t19_urgent_data() {
    let (mut s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    send_oob(&c.stream, b'!').expect("send MSG_OOB");
    let f = frame(&query(0x1919, "urgent.example"));
    c.send_raw(&f[..5]);
    send_oob(&c.stream, b'?').expect("send MSG_OOB");
    c.send_raw(&f[5..]);
    match c.next_event(deadline_ms(2000)) {
        TcpEvent::Frame(r) => {
            assert_default_answer(&r, 0x1919, "urgent.example");
        }
        TcpEvent::Closed { .. } | TcpEvent::Error(_) => {}
        TcpEvent::Timeout => panic!("neither answered nor closed"),
    }
    drop(c);
    assert!(s.proxy.alive(), "proxy died");
    quiescent(&s.proxy, fds);
}

/// T20: 16 KiB and ~64 KiB answers to a TCP client whose OPT says 512 are
/// delivered whole, without TC.
#[test]
fn t20_big_answers_over_tcp_whole() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    for (id, name, n) in [(0x2020u16, "txt65.example", 65u16), (0x2021, "txt258.example", 258)] {
        let q = query_opt(id, name, OptSpec::new(512));
        let r = c
            .exchange(&q, deadline_ms(3000))
            .unwrap_or_else(|| panic!("{name}: no answer"));
        let m = Message::must(&r);
        assert!(!m.tc, "{name}: TC over TCP");
        assert_eq!(m.ancount, n, "{name}");
        assert!(r.len() > usize::from(n) * 253, "{name}: {} bytes", r.len());
    }
    drop(c);
    quiescent(&s.proxy, fds);
}

/// T21: two queries in flight with the same ID on one connection are both
/// answered, each with that ID and its own question.
#[test]
fn t21_same_id_twice_on_one_connection() {
    let (s, fds) = Setup::observed(Script::delayed(Duration::from_millis(100)), 2000, &[]);
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    c.send_many(&[query(0x2121, "first.example"), query(0x2121, "second.example")]);
    let answers = c.recv_n(2, deadline_ms(3000));
    assert_eq!(answers.len(), 2);
    let names: HashSet<String> = answers
        .iter()
        .map(|a| {
            let m = Message::must(a);
            assert_default_answer(a, 0x2121, m.qname());
            m.qname().to_string()
        })
        .collect();
    assert_eq!(
        names,
        HashSet::from(["first.example".to_string(), "second.example".to_string()])
    );
    drop(c);
    quiescent(&s.proxy, fds);
}

/// --tcp-idle-timeout's default, in edns-tcp-keepalive's units of 100 ms.
const DEFAULT_IDLE_100MS: u16 = 100;

/// T22: a TCP client sending edns-tcp-keepalive is answered with the
/// proxy's own idle timeout; the upstream's keepalive (and padding) never
/// reach it.
#[test]
fn t22_client_keepalive_never_gets_upstreams() {
    let script = Script::default().with_hook(|ctx| {
        let r = Resp::to(ctx.query).a().opt(
            OptSpec::new(1232)
                .option(OPT_KEEPALIVE, &wire::keepalive(600))
                .option(OPT_PADDING, &[0; 40]),
        );
        Some(vec![Action::Send(r.build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let q = query_opt(0x2222, "ka.example", OptSpec::new(1232).option(OPT_KEEPALIVE, &[]));
    let r = tcp_exchange(s.proxy.tcp_addr(), &q, deadline_ms(3000)).expect("no answer");
    let m = Message::must(&r);
    assert_eq!(m.rcode, RCODE_NOERROR);
    let codes = option_codes(&m);
    // The proxy's own timeout (RFC 7828 §3.3.2: --tcp-idle-timeout, here
    // the default), once; never the upstream's 600.
    let (_, opts) = crate::util::wire::opt_of(&m).expect("an OPT");
    let ka: Vec<Vec<u8>> = opts
        .into_iter()
        .filter(|(c, _)| *c == OPT_KEEPALIVE)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(ka, vec![wire::keepalive(DEFAULT_IDLE_100MS)], "options {codes:?}");
    assert!(
        !codes.contains(&OPT_PADDING),
        "upstream padding passed to the client: {codes:?}"
    );
    quiescent(&s.proxy, fds);
}
