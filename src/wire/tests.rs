//! Unit tests of the wire format over byte vectors; the fuzz targets
//! (fuzz/checks.rs) check the same functions against arbitrary bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::build::*;
use super::name::*;
use super::query::*;
use super::response::*;
use super::*;

fn pq(msg: &[u8]) -> Result<Query, Reject> {
    parse_query(msg, usize::MAX)
}

pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    if let Some(size) = edns {
        m.extend_from_slice(&[0, 0, 41]);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
    }
    m
}

#[test]
fn accepts_plain_and_edns_queries() {
    let q = query(7, "example.com", 1, None);
    let i = pq(&q).unwrap();
    assert_eq!(i.id, 7);
    assert_eq!(i.question_end, q.len());
    assert_eq!(i.udp_budget(1232), 512);
    let q = query(7, "Example.COM", 28, Some(4096));
    let i = pq(&q).unwrap();
    assert_eq!(i.qtype, 28);
    assert_eq!(i.udp_budget(1232), 1232);
    assert!(i.edns.unwrap().dnssec_ok);
    let q = query(7, "a", 1, Some(100));
    assert_eq!(pq(&q).unwrap().udp_budget(1232), 512);
}

#[test]
fn rejects_bad_queries() {
    assert!(matches!(pq(&[0; 11]), Err(Reject::Drop(_))));
    let mut q = query(1, "a.b", 1, None);
    q[2] |= 0x80;
    assert!(matches!(pq(&q), Err(Reject::Drop(_))));
    let mut q = query(1, "a.b", 1, None);
    q[5] = 0;
    assert!(matches!(
        pq(&q),
        Err(Reject::Answer {
            rcode: Rcode::FormErr,
            ..
        })
    ));
    let mut q = query(1, "a.b", 1, None);
    q[2] |= 2 << 3;
    assert!(matches!(
        pq(&q),
        Err(Reject::Answer {
            rcode: Rcode::NotImp,
            ..
        })
    ));
    let mut q = query(1, "a.b", 1, None);
    q.push(0);
    assert!(matches!(
        pq(&q),
        Err(Reject::Answer {
            rcode: Rcode::FormErr,
            ..
        })
    ));
    let q = query(1, "a.b", 1, None);
    assert!(matches!(
        pq(&q[..q.len() - 1]),
        Err(Reject::Answer {
            rcode: Rcode::FormErr,
            ..
        })
    ));
    let mut q = query(1, "a.b", 1, Some(1232));
    let n = q.len();
    q[n - 5] = 1; // EDNS version 1
    assert!(matches!(
        pq(&q),
        Err(Reject::Answer {
            rcode: Rcode::BadVers,
            ..
        })
    ));
    assert!(matches!(
        pq(&query(1, "a.b", TYPE_AXFR, None)),
        Err(Reject::Answer {
            rcode: Rcode::NotImp,
            ..
        })
    ));
}

#[test]
fn pointer_loops_terminate() {
    let mut m = vec![0u8; 12];
    m.extend_from_slice(&[0xc0, 12]);
    assert_eq!(read_name(&m, 12, true).err(), Some(WireError::BadPointer));
    let mut m = vec![0u8; 12];
    m.extend_from_slice(&[1, b'a', 0xc0, 12]);
    // A backward loop: stopped by the name length or the hop limit.
    assert!(read_name(&m, 14, true).is_err());
    let mut m = vec![0u8; 12];
    m.extend_from_slice(&[1, b'a', 0, 0xc0, 12]);
    let (n, end) = read_name(&m, 15, true).unwrap();
    assert_eq!(n.as_bytes(), &[1, b'a', 0]);
    assert_eq!(end, 17);
}

#[test]
fn name_length_is_limited() {
    let long = ["a".repeat(63).as_str(); 5].join(".");
    let q = query(1, &long, 1, None);
    assert!(matches!(
        pq(&q),
        Err(Reject::Answer {
            rcode: Rcode::FormErr,
            ..
        })
    ));
}

#[test]
fn response_must_match_question() {
    let q = pq(&query(9, "Www.Example.com", 1, None)).unwrap();
    let mut r = query(9, "www.example.COM", 1, None);
    r[2] |= 0x80;
    assert!(parse_response(&q, &r).is_ok());
    let mut other = query(9, "www.example.net", 1, None);
    other[2] |= 0x80;
    assert!(matches!(parse_response(&q, &other), Err(BadResponse::Mismatch(_))));
    let mut header_only = r[..12].to_vec();
    header_only[5] = 0;
    header_only[3] = 5; // REFUSED
    assert!(parse_response(&q, &header_only).is_ok());
    header_only[3] = 0; // NOERROR
    assert!(parse_response(&q, &header_only).is_err());
    let mut broken = r.clone();
    broken[7] = 1; // ANCOUNT 1, no record
    assert!(matches!(parse_response(&q, &broken), Err(BadResponse::Malformed(_))));
    let mut aaaa = query(9, "www.example.com", 28, None);
    aaaa[2] |= 0x80;
    assert!(matches!(parse_response(&q, &aaaa), Err(BadResponse::Mismatch(_))));
}

#[test]
fn answers_get_the_clients_id_rd_and_question_bytes() {
    let msg = query(0x0102, "WwW.ExAmple.com", 1, Some(1232));
    let mut q = pq(&msg).unwrap();
    let mut answer = query(0xbeef, "www.example.com", 1, Some(1232));
    answer[2] = 0x80; // QR, RD=0
    restore_for_client(&mut answer, &q, &msg);
    assert_eq!(&answer[..2], &[1, 2]);
    assert_eq!(answer[2] & 1, 1);
    assert_eq!(&answer[12..q.question_end], &msg[12..q.question_end]);
    q.recursion_desired = false;
    restore_for_client(&mut answer, &q, &msg);
    assert_eq!(answer[2] & 1, 0);
    // An answer without a question keeps its records: the client's question
    // bytes must not be written over them.
    let mut bare = vec![0xbe, 0xef, 0x80, 0x02, 0, 0, 0, 0, 0, 0, 0, 1];
    bare.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
    let before = bare.clone();
    restore_for_client(&mut bare, &q, &msg);
    assert_eq!(&bare[..2], &[1, 2]);
    assert_eq!(&bare[3..], &before[3..]);
    // Too short for a header: left alone.
    let mut short = vec![1, 2, 3];
    restore_for_client(&mut short, &q, &msg);
    assert_eq!(short, vec![1, 2, 3]);
}

#[test]
fn errors_echo_id_question_and_opt() {
    let q = query(0xbeef, "a.b", 1, Some(4096));
    let info = pq(&q).unwrap();
    let mut out = Vec::new();
    build_error(
        &mut out,
        &q,
        Some(&info),
        Rcode::ServFail,
        Some(Ede::new(EdeCode::NetworkError, "x")),
    );
    let w = walk(&out).unwrap();
    assert_eq!(id(&out), Some(0xbeef));
    assert_eq!(Header::new_checked(&out[..]).unwrap().rcode(), Rcode::ServFail);
    assert_eq!(&out[12..w.question_end], info.question(&q));
    assert!(w.opt.unwrap().edns.dnssec_ok);
    let q = query(3, "a.b", 1, None);
    let info = pq(&q).unwrap();
    build_error(
        &mut out,
        &q,
        Some(&info),
        Rcode::ServFail,
        Some(Ede::new(EdeCode::Other, "x")),
    );
    assert!(walk(&out).unwrap().opt.is_none());
    build_error(&mut out, &q, None, Rcode::FormErr, None);
    assert_eq!(out.len(), 12);
}

fn with_options(mut q: Vec<u8>, opts: &[(u16, &[u8])]) -> Vec<u8> {
    let mut rdata = Vec::new();
    for (code, data) in opts {
        rdata.extend_from_slice(&code.to_be_bytes());
        rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
        rdata.extend_from_slice(data);
    }
    let n = q.len();
    q[n - 2..].copy_from_slice(&(rdata.len() as u16).to_be_bytes());
    q.extend_from_slice(&rdata);
    q
}

fn option_codes(msg: &[u8]) -> Vec<u16> {
    let o = walk(msg).unwrap().opt.unwrap();
    options(&msg[o.rdata..o.end]).map(|r| r.unwrap().0).collect()
}

#[test]
fn queries_are_padded_to_the_block() {
    let mut out = Vec::new();
    for (q, had_opt) in [
        (query(1, "a.example", 1, None), false),
        (query(1, "www.example.com", 28, Some(4096)), true),
        (
            with_options(
                query(1, "x.test", 1, Some(1232)),
                &[(OPT_PADDING, &[0; 30]), (65001, &[1; 8])],
            ),
            true,
        ),
        (query(1, &["a".repeat(60).as_str(); 3].join("."), 16, None), false),
    ] {
        let info = pq(&q).unwrap();
        pad_query(&mut out, &q, &info, 128, false);
        assert_eq!(out.len() % 128, 0, "{}", out.len());
        let padded = pq(&out).unwrap();
        assert_eq!(info.question(&q), padded.question(&out));
        assert_eq!(&q[..4], &out[..4]);
        let codes = option_codes(&out);
        assert_eq!(codes.iter().filter(|&&c| c == OPT_PADDING).count(), 1);
        assert_eq!(*codes.last().unwrap(), OPT_PADDING);
        if had_opt {
            assert_eq!(padded.edns.unwrap().dnssec_ok, info.edns.unwrap().dnssec_ok);
        }
    }
    let q = with_options(query(1, "x.test", 1, Some(1232)), &[(65001, &[1; 8])]);
    pad_query(&mut out, &q, &pq(&q).unwrap(), 128, false);
    assert_eq!(option_codes(&out), vec![65001, OPT_PADDING]);
    pad_query(&mut out, &q, &pq(&q).unwrap(), 0, true);
    assert_eq!(option_codes(&out), vec![65001, OPT_TCP_KEEPALIVE]);
    assert_eq!(&out[out.len() - 4..], &[0, 11, 0, 0]);
}

#[test]
fn answers_lose_hop_options() {
    let mut a = with_options(
        query(1, "x.test", 1, Some(1232)),
        &[
            (OPT_PADDING, &[0; 400]),
            (OPT_EDE, &[0, 22]),
            (OPT_TCP_KEEPALIVE, &[0, 50]),
        ],
    );
    a[2] |= 0x80;
    let w = walk(&a).unwrap();
    let hop = strip_answer(&mut a, &w, true).unwrap();
    assert_eq!(hop.keepalive, Some(50));
    assert_eq!(option_codes(&a), vec![OPT_EDE]);
    assert!(a.len() < 60);
    let w = walk(&a).unwrap();
    strip_answer(&mut a, &w, false).unwrap();
    let w = walk(&a).unwrap();
    assert!(w.opt.is_none());
    assert_eq!(w.end, a.len());
    assert_eq!(u16_at(&a, 10), Some(0));
    let mut bad = with_options(query(1, "x.test", 1, Some(1232)), &[(OPT_PADDING, &[0; 4])]);
    let n = bad.len();
    bad[n - 6] = 9; // option length past the record
    let w = walk(&bad).unwrap();
    assert!(strip_answer(&mut bad, &w, true).is_err());
}

#[test]
fn zones_match_on_label_boundaries() {
    let (n, _) = read_name(&query(1, "WWW.Corp.Example", 1, None), 12, false).unwrap();
    let zone = |z: &str| {
        let q = query(1, z, 1, None);
        read_name(&q, 12, false).unwrap().0.as_bytes().to_vec()
    };
    assert!(in_zone(n.as_bytes(), &zone("corp.example")));
    assert!(in_zone(n.as_bytes(), &zone("www.corp.example")));
    assert!(in_zone(n.as_bytes(), &zone("example")));
    assert!(in_zone(n.as_bytes(), &[0]));
    assert!(!in_zone(n.as_bytes(), &zone("orp.example")));
    assert!(!in_zone(n.as_bytes(), &zone("other.example")));
}

#[test]
fn truncated_answer_is_minimal() {
    let q = query(5, "big.test", 16, Some(1232));
    let info = pq(&q).unwrap();
    let mut answer = q.clone();
    answer[2] |= 0x80;
    answer[3] |= 0x80;
    let mut out = Vec::new();
    build_truncated(&mut out, &q, &info, &answer);
    assert!(Header::new_checked(&out[..]).unwrap().truncated());
    let w = walk(&out).unwrap();
    assert!(w.opt.is_some());
    assert_eq!(out.len(), q.len());
}
