//! Malformed input: short datagrams and responses are dropped, QDCOUNT != 1
//! is FORMERR, opcode != QUERY is NOTIMP, broken TCP framing harms nothing;
//! after each, a good query is answered.

use std::net::UdpSocket;

use crate::it::basic::assert_default_answer;
use crate::util::dns::{self, Message, QueryBuilder, RCODE_FORMERR, RCODE_NOTIMP};
use crate::util::{
    deadline_ms, query, tcp_exchange, udp_exchange, udp_recv, udp_socket, Script, Setup, TcpClient, TcpEvent,
};

/// Sends `bad`, then a good query (ID 0x600D) on the same socket; the first
/// datagram back must be the good answer (a reply to `bad` would come first,
/// since it needs no upstream round trip), and nothing else may follow.
fn assert_dropped_then_good(s: &Setup, sock: &UdpSocket, bad: &[u8], what: &str) {
    sock.send_to(bad, s.proxy.udp_addr()).unwrap();
    sock.send_to(&query(0x600D, "good.example"), s.proxy.udp_addr())
        .unwrap();
    let r = udp_recv(sock, deadline_ms(5000)).unwrap_or_else(|| panic!("{what}: no answer"));
    let m = Message::must(&r);
    assert_eq!(m.id, 0x600D, "{what}: got a reply to the malformed datagram");
    assert_default_answer(&r, 0x600D, "good.example");
    assert!(udp_recv(sock, deadline_ms(100)).is_none(), "{what}: stray datagram");
}

/// Sends `bad` and expects a reply with `rcode` and the client's ID, then a
/// good query is answered.
fn assert_rcode_then_good(s: &Setup, bad: &[u8], rcode: u8, what: &str) {
    let sock = udp_socket();
    sock.send_to(bad, s.proxy.udp_addr()).unwrap();
    let r = udp_recv(&sock, deadline_ms(5000)).unwrap_or_else(|| panic!("{what}: no reply"));
    let m = Message::must(&r);
    assert_eq!(m.id, dns::msg_id(bad).unwrap(), "{what}: ID");
    assert!(m.qr, "{what}: QR");
    assert_eq!(m.rcode, rcode, "{what}: rcode");
    let r = udp_exchange(s.proxy.udp_addr(), &query(0x600E, "next.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("good query after malformed"), 0x600E, "next.example");
}

#[test]
fn udp_short_datagrams_dropped() {
    let s = Setup::new(Script::default());
    let sock = udp_socket();
    let q = query(0xAAAA, "x.example");
    for len in [0, 1, 2, 11] {
        assert_dropped_then_good(&s, &sock, &q[..len], &format!("{len}-byte datagram"));
    }
}

#[test]
fn udp_response_bit_set_dropped() {
    let s = Setup::new(Script::default());
    let sock = udp_socket();
    let mut q = query(0xBBBB, "qr.example");
    q[2] |= 0x80;
    assert_dropped_then_good(&s, &sock, &q, "QR=1");
    // A full, valid-looking response too.
    let ans = dns::default_answer(&query(0xBBBC, "qr2.example")).unwrap();
    assert_dropped_then_good(&s, &sock, &ans, "response");
}

#[test]
fn udp_qdcount_zero_formerr() {
    let s = Setup::new(Script::default());
    let mut q = query(0xC0C0, "x.example");
    q.truncate(12);
    q[4..6].copy_from_slice(&0u16.to_be_bytes());
    assert_rcode_then_good(&s, &q, RCODE_FORMERR, "QDCOUNT=0");
}

#[test]
fn udp_qdcount_two_formerr() {
    let s = Setup::new(Script::default());
    let mut q = query(0xC0C1, "one.example");
    q[4..6].copy_from_slice(&2u16.to_be_bytes());
    q.extend_from_slice(&dns::encode_name("two.example"));
    q.extend_from_slice(&[0, 1, 0, 1]);
    assert!(Message::parse(&q).is_ok());
    assert_rcode_then_good(&s, &q, RCODE_FORMERR, "QDCOUNT=2");
}

#[test]
fn udp_opcode_not_query_notimp() {
    let s = Setup::new(Script::default());
    for opcode in [1u8, 2, 4, 5] {
        let q = QueryBuilder::new(0xD000 + opcode as u16, "op.example")
            .opcode(opcode)
            .build();
        assert_rcode_then_good(&s, &q, RCODE_NOTIMP, &format!("opcode {opcode}"));
    }
}

/// Deterministic garbage (some of it may even parse): the proxy survives and
/// answers the next good query.
#[test]
fn udp_garbage_burst_then_good_query() {
    let s = Setup::new(Script::default());
    let sock = udp_socket();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..100usize {
        let len = i % 40;
        let mut d = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            d.push(x as u8);
        }
        sock.send_to(&d, s.proxy.udp_addr()).unwrap();
    }
    let q = query(0x600F, "after-garbage.example");
    let r = crate::util::udp_exchange_on(&sock, s.proxy.udp_addr(), &q, deadline_ms(5000));
    assert_default_answer(&r.expect("no answer after garbage"), 0x600F, "after-garbage.example");
}

#[test]
fn tcp_formerr_and_notimp_then_good_on_same_connection() {
    let s = Setup::new(Script::default());
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let mut q0 = query(0xE000, "x.example");
    q0.truncate(12);
    q0[4..6].copy_from_slice(&0u16.to_be_bytes());
    let r = c.exchange(&q0, deadline_ms(5000)).expect("FORMERR over TCP");
    assert_eq!(Message::must(&r).rcode, RCODE_FORMERR);
    let q1 = QueryBuilder::new(0xE001, "op.example").opcode(2).build();
    let r = c.exchange(&q1, deadline_ms(5000)).expect("NOTIMP over TCP");
    assert_eq!(Message::must(&r).rcode, RCODE_NOTIMP);
    let r = c.exchange(&query(0xE002, "good.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("good query after malformed"), 0xE002, "good.example");
}

/// A length prefix promising more than is sent, then the client closes:
/// nothing breaks for other clients.
#[test]
fn tcp_truncated_frame_then_close_harmless() {
    let s = Setup::new(Script::default());
    let q = query(0xF000, "cut.example");
    // Prefix says 100 bytes, 20 follow; half a prefix; a prefix alone.
    let mut cut = 100u16.to_be_bytes().to_vec();
    cut.extend_from_slice(&q[..20]);
    for bytes in [cut, vec![0x00], vec![0x01, 0x00]] {
        let mut c = TcpClient::connect(s.proxy.tcp_addr());
        c.send_raw(&bytes);
        drop(c);
    }
    // Same, but the client half-closes and waits: the proxy must not answer
    // garbage, and must close (or at least not hang the others).
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    let mut cut = 100u16.to_be_bytes().to_vec();
    cut.extend_from_slice(&q[..20]);
    c.send_raw(&cut);
    c.shutdown_write();
    let ev = c.next_event(deadline_ms(1000));
    assert!(
        !matches!(ev, TcpEvent::Frame(_)),
        "proxy answered an incomplete frame: {ev:?}"
    );
    let r = tcp_exchange(s.proxy.tcp_addr(), &query(0xF001, "t.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("TCP after cut frames"), 0xF001, "t.example");
    let r = udp_exchange(s.proxy.udp_addr(), &query(0xF002, "u.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("UDP after cut frames"), 0xF002, "u.example");
}

/// A client that sends half a frame and stalls does not block another
/// client's queries.
#[test]
fn tcp_stalled_partial_frame_does_not_block_others() {
    let s = Setup::new(Script::default());
    let mut stalled = TcpClient::connect(s.proxy.tcp_addr());
    let f = dns::frame(&query(1, "stall.example"));
    stalled.send_raw(&f[..7]);
    let r = tcp_exchange(s.proxy.tcp_addr(), &query(2, "other.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("blocked by a stalled client"), 2, "other.example");
    // The stalled client finishes its frame and gets its answer.
    stalled.send_raw(&f[7..]);
    let r = stalled.recv(deadline_ms(5000));
    assert_default_answer(&r.expect("answer after completing the frame"), 1, "stall.example");
}
