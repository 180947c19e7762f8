//! Round trips through the proxy (UDP, TCP, EDNS) and resource hygiene.
//! Transaction ID rewriting is in `fault_ids` (i2 over UDP, i8 over TCP).

use crate::util::dns::{Message, ANSWER_ADDR, RCODE_NOERROR};
use crate::util::{deadline_ms, query, query_edns, tcp_exchange, udp_exchange, wait_until, Script, Setup, TcpClient};

/// A NOERROR answer to `qname` with the default A record and the given ID.
pub fn assert_default_answer(r: &[u8], id: u16, qname: &str) -> Message {
    let m = Message::must(r);
    assert_eq!(m.id, id, "ID not restored");
    assert!(m.qr, "QR not set");
    assert!(!m.tc, "unexpected TC");
    assert_eq!(m.rcode, RCODE_NOERROR, "rcode for {qname}");
    assert_eq!(m.qname(), qname);
    assert_eq!(m.a_records(), vec![ANSWER_ADDR], "answer for {qname}");
    m
}

#[test]
fn udp_round_trip() {
    let s = Setup::new(Script::default());
    let r = udp_exchange(s.proxy.udp_addr(), &query(0x1234, "www.example"), deadline_ms(5000)).expect("no UDP answer");
    let m = assert_default_answer(&r, 0x1234, "www.example");
    assert!(m.opt.is_none(), "OPT in answer to a query without one");
    assert!(s.upstream.queries().iter().any(|q| q.qname() == "www.example"));
}

#[test]
fn tcp_round_trip() {
    let s = Setup::new(Script::default());
    let r = tcp_exchange(s.proxy.tcp_addr(), &query(0x4321, "tcp.example"), deadline_ms(5000)).expect("no TCP answer");
    assert_default_answer(&r, 0x4321, "tcp.example");
}

#[test]
fn udp_round_trip_with_edns() {
    let s = Setup::new(Script::default());
    let r = udp_exchange(
        s.proxy.udp_addr(),
        &query_edns(0x2222, "edns.example", 1232),
        deadline_ms(5000),
    )
    .expect("no UDP answer");
    let m = assert_default_answer(&r, 0x2222, "edns.example");
    assert!(m.opt.is_some(), "EDNS query answered without OPT");
}

#[test]
fn tcp_several_queries_on_one_connection() {
    let s = Setup::new(Script::default());
    let mut c = TcpClient::connect(s.proxy.tcp_addr());
    for i in 0..10u16 {
        let name = format!("seq{i}.example");
        let r = c.exchange(&query(i, &name), deadline_ms(5000)).expect("answer");
        assert_default_answer(&r, i, &name);
    }
}

/// Clients that connect, ask and leave must not leak descriptors.
#[test]
fn tcp_clients_closing_do_not_leak_fds() {
    let s = Setup::new(Script::default());
    // Warm up: the upstream connection exists before the baseline.
    let r = tcp_exchange(s.proxy.tcp_addr(), &query(1, "warm.example"), deadline_ms(5000));
    assert!(r.is_some());
    let baseline = s.proxy.open_fds();
    for i in 0..40u16 {
        let name = format!("fd{i}.example");
        let r = tcp_exchange(s.proxy.tcp_addr(), &query(i, &name), deadline_ms(5000))
            .unwrap_or_else(|| panic!("no answer for {name}"));
        assert_default_answer(&r, i, &name);
    }
    // Also clients that leave without waiting for their answer.
    for i in 0..10u16 {
        let mut c = TcpClient::connect(s.proxy.tcp_addr());
        c.send(&query(i, "gone.example"));
    }
    let ok = wait_until(deadline_ms(3000), || s.proxy.open_fds() <= baseline + 2);
    assert!(
        ok,
        "fds: baseline {baseline}, now {} after 50 closed clients",
        s.proxy.open_fds()
    );
    // And the proxy still works.
    let r = udp_exchange(s.proxy.udp_addr(), &query(7, "after.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("answer after fd test"), 7, "after.example");
}
