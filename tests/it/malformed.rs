//! Malformed input that the per-case tests in `fault_client` (UDP) and
//! `fault_tcp` (TCP framing) do not cover: a burst of random datagrams,
//! FORMERR and NOTIMP on one TCP connection that then keeps working, cut
//! frames from clients that leave, and a stalled half frame that blocks
//! nobody.

use crate::it::basic::assert_default_answer;
use crate::util::dns::{self, Message, QueryBuilder, RCODE_FORMERR, RCODE_NOTIMP};
use crate::util::{deadline_ms, query, tcp_exchange, udp_exchange, udp_socket, Script, Setup, TcpClient, TcpEvent};

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
