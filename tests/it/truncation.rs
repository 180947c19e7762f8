//! UDP size limits: 512 without EDNS, else the client's EDNS size clamped to
//! [512, 1232]; bigger answers come back with TC=1, the question, no answer
//! records, and an OPT only if the client sent one. TCP gets everything.
//!
//! Upstream answer sizes (name rules): `big` ~3070 bytes (12 TXT records),
//! `txtN` = N records of 253 bytes + header/question (+ OPT).

use crate::util::dns::{Message, QueryBuilder, RCODE_NOERROR, TYPE_TXT};
use crate::util::{deadline_ms, query, tcp_exchange, udp_exchange, Script, Setup};

fn udp(s: &Setup, q: &[u8]) -> Message {
    let r = udp_exchange(s.proxy.udp_addr(), q, deadline_ms(5000)).expect("no UDP answer");
    Message::must(&r)
}

fn assert_truncated(m: &Message, id: u16, qname: &str, limit: usize, with_opt: bool) {
    assert_eq!(m.id, id);
    assert!(m.qr);
    assert!(m.tc, "TC not set on a {}-byte answer", m.len);
    assert!(m.len <= limit, "truncated answer is {} > {limit} bytes", m.len);
    assert_eq!(m.rcode, RCODE_NOERROR);
    assert_eq!(m.qdcount, 1, "question missing from truncated answer");
    assert_eq!(m.qname(), qname);
    assert_eq!(m.ancount, 0, "answer records left in truncated answer");
    assert_eq!(m.opt.is_some(), with_opt, "OPT presence must mirror the query's");
}

fn assert_full(m: &Message, id: u16, records: u16) {
    assert_eq!(m.id, id);
    assert!(!m.tc, "TC set on a {}-byte answer", m.len);
    assert_eq!(m.rcode, RCODE_NOERROR);
    assert_eq!(m.ancount, records);
    assert!(m.answers.iter().all(|r| r.rtype == TYPE_TXT));
}

#[test]
fn udp_big_answer_without_edns_truncated_to_512() {
    let s = Setup::new(Script::default());
    let m = udp(&s, &query(0x0B16, "big.example"));
    assert_truncated(&m, 0x0B16, "big.example", 512, false);
}

#[test]
fn udp_big_answer_with_edns_1232_truncated_with_opt() {
    let s = Setup::new(Script::default());
    let q = QueryBuilder::new(0x0B17, "big.example").edns(1232, false).build();
    let m = udp(&s, &q);
    assert_truncated(&m, 0x0B17, "big.example", 1232, true);
}

#[test]
fn udp_big_answer_with_edns_4096_still_truncated_budget_capped_at_1232() {
    let s = Setup::new(Script::default());
    let q = QueryBuilder::new(0x0B18, "big.example").edns(4096, true).build();
    let m = udp(&s, &q);
    assert_truncated(&m, 0x0B18, "big.example", 1232, true);
    // ~1560 bytes: fits 4096 but not the 1232 cap.
    let q = QueryBuilder::new(0x0B19, "txt6.example").edns(4096, false).build();
    let m = udp(&s, &q);
    assert_truncated(&m, 0x0B19, "txt6.example", 1232, true);
}

#[test]
fn tcp_big_answer_complete() {
    let s = Setup::new(Script::default());
    for (id, q) in [
        (0x0B20, query(0x0B20, "big.example")),
        (
            0x0B21,
            QueryBuilder::new(0x0B21, "big.example").edns(1232, false).build(),
        ),
    ] {
        let r = tcp_exchange(s.proxy.tcp_addr(), &q, deadline_ms(5000)).expect("no TCP answer");
        let m = Message::must(&r);
        assert_full(&m, id, 12);
        assert!(m.len > 2000, "TCP answer only {} bytes", m.len);
    }
}

/// ~1050 bytes: truncated without EDNS, complete with EDNS 1232.
#[test]
fn udp_medium_answer_fits_edns_1232_not_512() {
    let s = Setup::new(Script::default());
    let m = udp(&s, &query(0x0C01, "txt4.example"));
    assert_truncated(&m, 0x0C01, "txt4.example", 512, false);
    let q = QueryBuilder::new(0x0C02, "txt4.example").edns(1232, false).build();
    let m = udp(&s, &q);
    assert_full(&m, 0x0C02, 4);
    assert!(m.len > 1000 && m.len <= 1232);
}

/// An EDNS size below 512 counts as 512: a ~290-byte answer is not
/// truncated for a client advertising 256.
#[test]
fn udp_edns_size_below_512_is_clamped_up() {
    let s = Setup::new(Script::default());
    let q = QueryBuilder::new(0x0C03, "txt1.example").edns(256, false).build();
    let m = udp(&s, &q);
    assert_full(&m, 0x0C03, 1);
    assert!(m.len > 256 && m.len <= 512, "{} bytes", m.len);
    let m = udp(&s, &query(0x0C04, "txt1.example"));
    assert_full(&m, 0x0C04, 1);
}
