//! Self-tests of the harness: a rustls client talks straight to the
//! TestUpstream, no proxy involved. These must pass whatever state src/ is in.

use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use rustls::HandshakeKind;

use crate::util::dns::{self, Message, QueryBuilder, ANSWER_ADDR};
use crate::util::tls_client::{client_config, TlsClient, TlsEvent};
use crate::util::upstream::{Action, CloseKind, Script, TestUpstream};
use crate::util::{dead_port, deadline_ms, query, Leaf, TestCa, NAME};

fn connect(ca: &TestCa, up: &TestUpstream) -> TlsClient {
    TlsClient::connect(up.addr(), NAME, client_config(ca.root_store()), deadline_ms(5000))
        .expect("TLS connect to test upstream")
}

#[test]
fn harness_upstream_answers_one_query() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let mut c = connect(&ca, &up);
    c.send(&[query(0xBEEF, "www.example")]).unwrap();
    let r = c.recv(deadline_ms(5000)).expect("answer");
    let m = Message::must(&r);
    assert_eq!(m.id, 0xBEEF);
    assert!(m.qr && m.ra && m.rd && !m.tc);
    assert_eq!(m.rcode, 0);
    assert_eq!((m.qdcount, m.ancount, m.nscount, m.arcount), (1, 1, 0, 0));
    assert_eq!(m.qname(), "www.example");
    assert_eq!(m.a_records(), vec![ANSWER_ADDR]);
    assert_eq!(m.answers[0].ttl, 60);
    assert!(m.opt.is_none());
    // Answer record uses the 0xC00C pointer.
    assert_eq!(&r[m.question_end..m.question_end + 2], &[0xC0, 0x0C]);

    let st = up.stats();
    assert_eq!(st.accepts, 1);
    assert_eq!(st.handshakes, 1);
    assert_eq!(st.queries.len(), 1);
    assert_eq!(st.queries[0].id(), 0xBEEF);
    assert_eq!(st.queries[0].qname(), "www.example");
    assert_eq!(st.queries[0].conn, 1);
    assert_eq!(st.open, 1);
    assert!(up.wait_until(deadline_ms(1000), |s| s.inflight[&1].is_empty()));
}

#[test]
fn harness_upstream_echoes_edns() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let mut c = connect(&ca, &up);
    let q = QueryBuilder::new(7, "e.example").edns(4096, true).build();
    let qm = Message::must(&q);
    assert_eq!(qm.opt.map(|o| (o.udp_size, o.do_bit)), Some((4096, true)));
    c.send(&[q]).unwrap();
    let m = Message::must(&c.recv(deadline_ms(5000)).expect("answer"));
    assert_eq!(m.arcount, 1);
    assert_eq!(m.opt.map(|o| o.udp_size), Some(1232));
    assert_eq!(m.a_records(), vec![ANSWER_ADDR]);
}

#[test]
fn harness_upstream_pipelined_one_record_reverse_batch() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::reverse_batch(5));
    let mut c = connect(&ca, &up);
    let qs: Vec<_> = (0..5u16).map(|i| query(100 + i, &format!("q{i}.example"))).collect();
    c.send(&qs).unwrap(); // one plaintext write: one TLS record
    let ids: Vec<u16> = (0..5)
        .map(|_| Message::must(&c.recv(deadline_ms(5000)).expect("answer")).id)
        .collect();
    assert_eq!(ids, vec![104, 103, 102, 101, 100]);
    assert_eq!(up.query_count(), 5);
}

#[test]
fn harness_upstream_partial_batch_released_after_timeout() {
    let ca = TestCa::new();
    let mut script = Script::reverse_batch(10);
    script.batch_timeout = Duration::from_millis(100);
    let up = TestUpstream::for_name(&ca, NAME, script);
    let mut c = connect(&ca, &up);
    let qs: Vec<_> = (0..3u16).map(|i| query(i, &format!("q{i}.example"))).collect();
    c.send(&qs).unwrap();
    let ids: Vec<u16> = (0..3)
        .map(|_| Message::must(&c.recv(deadline_ms(5000)).expect("answer")).id)
        .collect();
    assert_eq!(ids, vec![2, 1, 0]);
}

#[test]
fn harness_upstream_delays_let_later_answers_overtake() {
    let ca = TestCa::new();
    // First query waits 300 ms (slow rule), second is immediate.
    let script = Script {
        slow_delay: Duration::from_millis(300),
        ..Script::default()
    };
    let up = TestUpstream::for_name(&ca, NAME, script);
    let mut c = connect(&ca, &up);
    let t0 = Instant::now();
    c.send(&[query(1, "slow.example"), query(2, "fast.example")]).unwrap();
    let a = Message::must(&c.recv(deadline_ms(5000)).unwrap());
    let b = Message::must(&c.recv(deadline_ms(5000)).unwrap());
    assert_eq!((a.id, b.id), (2, 1));
    assert!(t0.elapsed() >= Duration::from_millis(290));
}

#[test]
fn harness_upstream_fixed_delay_and_jitter() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(
        &ca,
        NAME,
        Script::delayed(Duration::from_millis(100)).with_jitter(Duration::from_millis(50)),
    );
    let mut c = connect(&ca, &up);
    let t0 = Instant::now();
    let qs: Vec<_> = (0..20u16).map(|i| query(i, &format!("q{i}.example"))).collect();
    c.send(&qs).unwrap();
    let mut ids: Vec<u16> = (0..20)
        .map(|_| Message::must(&c.recv(deadline_ms(5000)).unwrap()).id)
        .collect();
    assert!(t0.elapsed() >= Duration::from_millis(95));
    ids.sort_unstable();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
}

#[test]
fn harness_upstream_big_txt_and_silent_names() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let mut c = connect(&ca, &up);
    c.send(&[
        query(1, "silent.example"),
        query(2, "big.example"),
        query(3, "txt2.example"),
    ])
    .unwrap();
    let big = Message::must(&c.recv(deadline_ms(5000)).unwrap());
    assert_eq!(big.id, 2);
    assert_eq!(big.ancount, 12);
    assert!(big.len > 2900 && big.len < 3300, "big answer is {} bytes", big.len);
    assert!(big.answers.iter().all(|r| r.rtype == dns::TYPE_TXT));
    let two = Message::must(&c.recv(deadline_ms(5000)).unwrap());
    assert_eq!((two.id, two.ancount), (3, 2));
    // The silent one never comes.
    assert!(c.recv(deadline_ms(200)).is_none());
    assert_eq!(up.query_count(), 3);
    assert_eq!(up.with_stats(|s| s.inflight[&1].clone()), [1].into());
}

#[test]
fn harness_upstream_silent_script_and_runtime_change() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::silent());
    let mut c = connect(&ca, &up);
    c.send(&[query(1, "a.example")]).unwrap();
    assert!(c.recv(deadline_ms(200)).is_none());
    up.set_script(Script::default());
    c.send(&[query(2, "b.example")]).unwrap();
    assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 2);
    up.update_script(|s| s.silent = true);
    c.send(&[query(3, "c.example")]).unwrap();
    assert!(c.recv(deadline_ms(200)).is_none());
    assert_eq!(up.query_count(), 3);
}

#[test]
fn harness_upstream_flags_duplicate_inflight_ids() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::silent());
    let mut c = connect(&ca, &up);
    c.send(&[query(9, "a.example"), query(9, "b.example"), query(10, "c.example")])
        .unwrap();
    assert!(up.wait_until(deadline_ms(5000), |s| s.queries.len() == 3));
    assert_eq!(up.duplicate_inflight_ids(), 1);
    assert_eq!(up.stats().duplicates, vec![(1, 9)]);
}

#[test]
fn harness_upstream_answered_id_is_no_longer_inflight() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let mut c = connect(&ca, &up);
    for _ in 0..3 {
        c.send(&[query(5, "a.example")]).unwrap();
        assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 5);
    }
    assert_eq!(up.duplicate_inflight_ids(), 0);
}

fn close_kind_seen(kind: CloseKind) -> (Vec<u16>, TlsEvent, usize) {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::close_after(2, kind));
    let mut c = connect(&ca, &up);
    c.send(&[query(1, "a.example"), query(2, "b.example"), query(3, "c.example")])
        .unwrap();
    let mut ids = Vec::new();
    let deadline = deadline_ms(5000);
    let ev = loop {
        match c.next_event(deadline) {
            TlsEvent::Frame(f) => ids.push(Message::must(&f).id),
            other => break other,
        }
    };
    drop(c);
    assert!(up.wait_until(deadline_ms(5000), |s| s.open == 0));
    (ids, ev, up.stats().closed_by_upstream)
}

#[test]
fn harness_upstream_close_after_close_notify() {
    let (ids, ev, closed) = close_kind_seen(CloseKind::CloseNotify);
    assert_eq!(ids, vec![1, 2]);
    assert!(matches!(ev, TlsEvent::CloseNotify), "{ev:?}");
    assert_eq!(closed, 1);
}

#[test]
fn harness_upstream_close_after_fin() {
    let (ids, ev, _) = close_kind_seen(CloseKind::Fin);
    assert_eq!(ids, vec![1, 2]);
    assert!(matches!(ev, TlsEvent::Eof), "{ev:?}");
}

#[test]
fn harness_upstream_close_after_rst() {
    let (ids, ev, _) = close_kind_seen(CloseKind::Rst);
    // The answers may or may not beat the RST; the close is a reset.
    assert!(ids.len() <= 2, "{ids:?}");
    assert!(matches!(ev, TlsEvent::Reset), "{ev:?}");
}

#[test]
fn harness_upstream_no_handshake() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::no_handshake());
    let r = TlsClient::connect(up.addr(), NAME, client_config(ca.root_store()), deadline_ms(300));
    assert!(r.is_err());
    assert!(up.wait_until(deadline_ms(2000), |s| s.accepts == 1));
    assert_eq!(up.handshakes(), 0);
}

#[test]
fn harness_upstream_hook_actions() {
    let ca = TestCa::new();
    let script = Script::default().with_hook(|ctx| {
        let ans = dns::default_answer(ctx.query)?;
        match ctx.index {
            // Split frame: length + half now, the rest 50 ms later.
            0 => {
                let f = dns::frame(&ans);
                let (a, b) = f.split_at(5);
                Some(vec![
                    Action::SendRaw(a.to_vec()),
                    Action::Delay(Duration::from_millis(50)),
                    Action::SendRaw(b.to_vec()),
                ])
            }
            // Wrong ID, then the right answer.
            1 => {
                let mut bad = ans.clone();
                dns::set_msg_id(&mut bad, 0xFFFF);
                Some(vec![Action::Send(bad), Action::Answer])
            }
            // Garbage straight on the TCP stream: the client's TLS fails.
            _ => Some(vec![Action::SendTcpRaw(b"garbage!".to_vec())]),
        }
    });
    let up = TestUpstream::for_name(&ca, NAME, script);
    let mut c = connect(&ca, &up);
    c.send(&[query(1, "a.example")]).unwrap();
    assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 1);
    c.send(&[query(2, "b.example")]).unwrap();
    assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 0xFFFF);
    assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 2);
    c.send(&[query(3, "c.example")]).unwrap();
    let ev = c.next_event(deadline_ms(5000));
    assert!(matches!(ev, TlsEvent::Error(_)), "{ev:?}");
}

#[test]
fn harness_upstream_hook_close_action() {
    let ca = TestCa::new();
    let script =
        Script::default().with_hook(|ctx| (ctx.index == 1).then(|| vec![Action::Close(CloseKind::CloseNotify)]));
    let up = TestUpstream::for_name(&ca, NAME, script);
    let mut c = connect(&ca, &up);
    c.send(&[query(1, "a.example"), query(2, "b.example")]).unwrap();
    assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 1);
    let ev = c.next_event(deadline_ms(5000));
    assert!(matches!(ev, TlsEvent::CloseNotify), "{ev:?}");
}

#[test]
fn harness_upstream_partial_query_frames() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let mut c = connect(&ca, &up);
    let f = dns::frame(&query(77, "split.example"));
    for piece in [&f[..1], &f[1..3], &f[3..10], &f[10..]] {
        c.send_raw(piece).unwrap();
        // The stimulus: pieces written apart, so they arrive apart.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(Message::must(&c.recv(deadline_ms(5000)).unwrap()).id, 77);
}

#[test]
fn harness_upstream_counts_resumed_handshakes() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let cfg = client_config(ca.root_store());
    let mut a = TlsClient::connect(up.addr(), NAME, cfg.clone(), deadline_ms(5000)).unwrap();
    // Read the answer so the session ticket is processed too.
    a.send(&[query(1, "a.example")]).unwrap();
    a.recv(deadline_ms(5000)).unwrap();
    let mut b = TlsClient::connect(up.addr(), NAME, cfg, deadline_ms(5000)).unwrap();
    b.send(&[query(2, "b.example")]).unwrap();
    b.recv(deadline_ms(5000)).unwrap();
    assert_eq!(b.handshake_kind(), Some(HandshakeKind::Resumed));
    assert!(up.wait_until(deadline_ms(2000), |s| s.handshakes == 2));
    assert_eq!(up.resumed_handshakes(), 1);
    assert_eq!(up.max_open_connections(), 2);
}

#[test]
fn harness_upstream_stop_closes_port() {
    let ca = TestCa::new();
    let mut up = TestUpstream::for_name(&ca, NAME, Script::default());
    let addr = up.addr();
    let _c = connect(&ca, &up);
    up.stop();
    let r = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
    assert!(r.is_err(), "port still accepts after stop");
    assert_eq!(up.open_connections(), 0);
}

#[test]
fn harness_dead_port_refuses() {
    let port = dead_port();
    let r = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(500));
    assert!(r.is_err());
}

/// The certificate factory: only the valid leaf for the right name passes
/// a client trusting the test CA.
#[test]
fn harness_cert_variants() {
    let ca = TestCa::new();
    assert!(std::fs::read_to_string(ca.pem_path())
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let cases: Vec<(&str, Leaf, bool)> = vec![
        ("valid", ca.leaf(&[NAME, "alt.test"]), true),
        ("wrong name", ca.leaf(&["other.test"]), false),
        ("expired", ca.expired_leaf(&[NAME]), false),
        ("not yet valid", ca.not_yet_valid_leaf(&[NAME]), false),
        ("self-signed", Leaf::self_signed(&[NAME]), false),
        ("unknown CA", Leaf::from_unknown_ca(&[NAME]), false),
    ];
    let cfg = client_config(ca.root_store());
    for (what, leaf, ok) in cases {
        let up = TestUpstream::start(leaf.server_config(), Script::default());
        let r = TlsClient::connect(up.addr(), NAME, cfg.clone(), deadline_ms(5000));
        assert_eq!(r.is_ok(), ok, "{what}: {:?}", r.as_ref().err());
        if !ok {
            let e = r.err().unwrap();
            assert!(e.to_lowercase().contains("certificate"), "{what}: unexpected error {e}");
            assert!(up.wait_until(deadline_ms(2000), |s| !s.tls_errors.is_empty()));
            assert_eq!(up.handshakes(), 0, "{what}");
        }
    }
}

#[test]
fn harness_leaf_with_ip_san_and_pem_files() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["127.0.0.1"]);
    let (c, k) = leaf.write_pem(ca.dir());
    assert!(c.exists() && k.exists());
    let up = TestUpstream::start(leaf.server_config(), Script::default());
    let r = TlsClient::connect(
        up.addr(),
        "127.0.0.1",
        client_config(ca.root_store()),
        deadline_ms(5000),
    );
    assert!(r.is_ok(), "{:?}", r.err());
}

#[test]
fn harness_dns_builder_and_parser() {
    let q = QueryBuilder::new(0x0102, "A.Example.")
        .qtype(dns::TYPE_AAAA)
        .opcode(2)
        .rd(false)
        .edns(1232, false)
        .build();
    let m = Message::must(&q);
    assert_eq!(m.id, 0x0102);
    assert!(!m.qr && !m.rd);
    assert_eq!(m.opcode, 2);
    assert_eq!(m.qname(), "a.example");
    assert_eq!(m.question.as_ref().unwrap().qtype, dns::TYPE_AAAA);
    assert_eq!(m.opt.unwrap().udp_size, 1232);
    assert!(Message::parse(&q[..q.len() - 1]).is_err());
    assert!(Message::parse(&q[..11]).is_err());
    let mut buf = [dns::frame(&q), dns::frame(&q)].concat();
    buf.push(0);
    let frames = dns::take_frames(&mut buf);
    assert_eq!(frames.len(), 2);
    assert_eq!(buf, vec![0]);
}
