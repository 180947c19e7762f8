//! EDNS: the UDP size budget (512 without EDNS, else the client's size
//! clamped to [512, 1232]) and truncation at its exact edges, padding and
//! keepalive options on the way up and down, extended RCODEs, Extended DNS
//! Errors (RFC 8914).
//!
//! Test names start with the case's label (E1, E2, …): the labels only
//! number the cases of this module, so that a comment or a commit can
//! name one.

use std::process::Command;
use std::time::Duration;

use crate::it::basic::assert_default_answer;
use crate::util::dns::{Message, RCODE_NOERROR, RCODE_SERVFAIL};
use crate::util::upstream::first_label_starts_with;
use crate::util::wire::{
    self, ede_of, opt_of, option_codes, query_opt, OptSpec, Resp, OPT_EDE, OPT_KEEPALIVE, OPT_PADDING, RCODE_NXDOMAIN,
};
use crate::util::{deadline_ms, query, quiescent, tcp_exchange, udp_exchange, Action, CloseKind, Script, Setup};

/// First label `sNNNN` (e.g. `s1232.example`): an answer of exactly NNNN
/// bytes, with an OPT (no options) when the query the upstream got has one
/// and the label ends in `o` (`s1232o`), without one otherwise.
fn sized_upstream() -> Script {
    Script::default().with_hook(|ctx| {
        let q = ctx.query;
        let label_len = *q.get(12)? as usize;
        let label = std::str::from_utf8(q.get(13..13 + label_len)?).ok()?;
        let spec = label.strip_prefix('s')?;
        let (digits, with_opt) = match spec.strip_suffix('o') {
            Some(d) => (d, true),
            None => (spec, false),
        };
        let total: usize = digits.parse().ok()?;
        let mut r = Resp::to(q);
        if with_opt {
            r = r.opt(OptSpec::new(1232));
        }
        Some(vec![Action::Send(r.sized(total).build())])
    })
}

fn udp(s: &Setup, q: &[u8]) -> (Message, Vec<u8>) {
    let r = udp_exchange(s.proxy.udp_addr(), q, deadline_ms(3000)).expect("no UDP answer");
    (Message::must(&r), r)
}

/// `size` fits the client (full answer of exactly that size) and
/// `size + 1` does not (minimal TC answer within the budget: the header
/// with the client's ID and RCODE, the question, no records, and an OPT
/// exactly when the client sent one).
fn edge(s: &Setup, id: u16, make: impl Fn(u16, &str) -> Vec<u8>, size: usize, with_opt: bool, what: &str) {
    let suffix = if with_opt { "o" } else { "" };
    let q = make(id, &format!("s{size}{suffix}.example"));
    let client_opt = Message::must(&q).opt.is_some();
    let (m, r) = udp(s, &q);
    assert_eq!(m.id, id, "{what}: ID");
    assert!(!m.tc, "{what}: a {size}-byte answer was truncated");
    assert_eq!(r.len(), size, "{what}: answer size");
    assert_eq!(
        m.opt.is_some(),
        client_opt,
        "{what}: OPT presence must mirror the query's"
    );
    let over = size + 1;
    let name = format!("s{over}{suffix}.example");
    let q = make(id + 1, &name);
    let (m, r) = udp(s, &q);
    assert!(m.tc, "{what}: a {over}-byte answer was not truncated");
    assert!(r.len() <= size, "{what}: TC answer of {} bytes", r.len());
    assert_eq!(
        (m.id, m.qr, m.rcode),
        (id + 1, true, RCODE_NOERROR),
        "{what}: TC header"
    );
    assert_eq!((m.ancount, m.nscount), (0, 0), "{what}: records in a TC answer");
    assert_eq!(m.qdcount, 1, "{what}: question missing");
    assert_eq!(m.qname(), name, "{what}: question");
    assert_eq!(
        m.opt.is_some(),
        client_opt,
        "{what}: OPT presence must mirror the query's"
    );
}

/// E1: no OPT: 512 bytes fit, 513 are truncated (TC=1, no OPT, RCODE
/// copied); over TCP the whole answer comes; `dig` retries over TCP.
#[test]
fn e1_no_edns_budget_512_and_tc_keeps_rcode() {
    let script = Script::default().with_hook(|ctx| {
        if first_label_starts_with(ctx.query, "nx600") {
            return Some(vec![Action::Send(
                Resp::to(ctx.query).rcode(RCODE_NXDOMAIN).sized(600).build(),
            )]);
        }
        None
    });
    let hooked = Setup::observed(script, 2000, &[]);
    let (s, fds) = Setup::observed(sized_upstream(), 2000, &[]);
    edge(&s, 0xE100, query, 512, false, "no EDNS");
    let (m, r) = udp(&hooked.0, &query(0xE110, "nx600.example"));
    assert!(m.tc && m.opt.is_none(), "{m:?}");
    assert_eq!(m.rcode, RCODE_NXDOMAIN, "RCODE not copied into the TC answer");
    assert!(r.len() <= 512);
    let r = tcp_exchange(
        hooked.0.proxy.tcp_addr(),
        &query(0xE111, "nx600.example"),
        deadline_ms(3000),
    )
    .expect("TCP");
    assert_eq!(r.len(), 600, "TCP answer cut");
    // dig: truncated over UDP, retried over TCP, all records shown.
    let port = s.proxy.udp_addr().port().to_string();
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port,
            "+noedns",
            "+time=2",
            "+tries=1",
            "txt3.example",
            "TXT",
        ])
        .output()
        .unwrap_or_else(|e| panic!("e1 needs dig (Debian: dnsutils): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Truncated, retrying in TCP mode"),
        "dig did not see TC:\n{text}"
    );
    assert!(
        text.contains("ANSWER: 3"),
        "dig over TCP did not get the answer:\n{text}"
    );
    quiescent(&hooked.0.proxy, hooked.1);
    quiescent(&s.proxy, fds);
}

/// E2: OPT 1232 with DO: 1 232 bytes fit, 1 233 are truncated with an OPT
/// that echoes DO.
#[test]
fn e2_edns_1232_edge_and_do_echo() {
    let (s, fds) = Setup::observed(sized_upstream(), 2000, &[]);
    let make = |id: u16, name: &str| query_opt(id, name, OptSpec::new(1232).flags(0x8000));
    edge(&s, 0xE200, make, 1232, true, "EDNS 1232");
    let (m, _) = udp(&s, &make(0xE210, "s1500o.example"));
    assert!(m.tc);
    let opt = m.opt.expect("TC answer to an EDNS client without OPT");
    assert!(opt.do_bit, "DO not echoed");
    assert_eq!(m.arcount, 1, "only the OPT in the additional section");
    quiescent(&s.proxy, fds);
}

/// E3: OPT 4096: the budget is capped at 1 232.
#[test]
fn e3_edns_4096_capped_at_1232() {
    let (s, fds) = Setup::observed(sized_upstream(), 2000, &[]);
    edge(
        &s,
        0xE300,
        |id, n| query_opt(id, n, OptSpec::new(4096)),
        1232,
        true,
        "EDNS 4096",
    );
    quiescent(&s.proxy, fds);
}

/// E4: OPT 100: treated as 512.
#[test]
fn e4_edns_100_treated_as_512() {
    let (s, fds) = Setup::observed(sized_upstream(), 2000, &[]);
    edge(
        &s,
        0xE400,
        |id, n| query_opt(id, n, OptSpec::new(100)),
        512,
        true,
        "EDNS 100",
    );
    quiescent(&s.proxy, fds);
}

/// E5: the upstream pads a 480-byte answer to 936 bytes: the padding is
/// removed before the size check, so a 512-byte client gets it whole.
#[test]
fn e5_upstream_padding_stripped_before_size_check() {
    let script = Script::default().with_hook(|ctx| {
        let body = Resp::to(ctx.query).sized(480 - 11); // + 11-byte OPT = 480
        let pad = 936 - 480 - 4;
        let r = body.opt(OptSpec::new(1232).option(OPT_PADDING, &vec![0; pad]));
        assert_eq!(r.len(), 936);
        Some(vec![Action::Send(r.build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    for (id, q) in [
        (0xE500u16, query_opt(0xE500, "padded.example", OptSpec::new(512))),
        (0xE501, query(0xE501, "padded.example")),
    ] {
        let (m, r) = udp(&s, &q);
        assert_eq!(m.id, id);
        assert!(!m.tc, "padded answer truncated ({} bytes)", r.len());
        assert!(!option_codes(&m).contains(&OPT_PADDING), "padding reached the client");
        assert!(r.len() <= 480, "{} bytes", r.len());
    }
    quiescent(&s.proxy, fds);
}

/// E6: with or without the client's own padding option, the upstream sees
/// exactly one padding option (zero bytes) and an empty edns-tcp-keepalive
/// option, and a length that is a multiple of 128, over UDP and TCP; the
/// answer carries an OPT exactly when the client sent one.
#[test]
fn e6_exactly_one_padding_option_upstream() {
    let (s, fds) = Setup::observed(Script::default(), 2000, &[]);
    let with_pad = |id| {
        query_opt(
            id,
            "pad-client.example",
            OptSpec::new(1232).option(OPT_PADDING, &[0; 37]),
        )
    };
    let long = format!("{}.{}.example", "x".repeat(63), "y".repeat(50));
    let answers = [
        (
            udp_exchange(s.proxy.udp_addr(), &with_pad(0xE600), deadline_ms(2000)),
            "pad-client.example",
            true,
        ),
        (
            tcp_exchange(s.proxy.tcp_addr(), &with_pad(0xE601), deadline_ms(2000)),
            "pad-client.example",
            true,
        ),
        (
            udp_exchange(s.proxy.udp_addr(), &query(0xE602, &long), deadline_ms(2000)),
            long.as_str(),
            false,
        ),
        (
            tcp_exchange(s.proxy.tcp_addr(), &query(0xE603, "nopad.example"), deadline_ms(2000)),
            "nopad.example",
            false,
        ),
    ];
    for (i, (r, name, edns)) in answers.iter().enumerate() {
        let id = 0xE600 + i as u16;
        let m = assert_default_answer(r.as_ref().unwrap_or_else(|| panic!("{name}: no answer")), id, name);
        assert_eq!(
            m.opt.is_some(),
            *edns,
            "{name}: OPT in the answer, client sent one: {edns}"
        );
    }
    let up = s.upstream.queries();
    assert_eq!(up.len(), 4);
    for q in &up {
        assert_eq!(q.bytes.len() % 128, 0, "{}: {} bytes", q.qname(), q.bytes.len());
        let (_, opts) = opt_of(&Message::must(&q.bytes)).expect("OPT upstream");
        let pads: Vec<_> = opts.iter().filter(|(c, _)| *c == OPT_PADDING).collect();
        assert_eq!(pads.len(), 1, "{}: {} padding options", q.qname(), pads.len());
        assert!(pads[0].1.iter().all(|&b| b == 0), "{}: padding not zero", q.qname());
        assert!(
            opts.iter().any(|(c, d)| *c == OPT_KEEPALIVE && d.is_empty()),
            "{}: no empty keepalive option: {opts:?}",
            q.qname()
        );
    }
    quiescent(&s.proxy, fds);
}

/// E7: an upstream answer with keepalive and padding options: neither
/// reaches a UDP client (with or without EDNS); other options stay.
#[test]
fn e7_hop_by_hop_options_never_reach_udp_clients() {
    let script = Script::default().with_hook(|ctx| {
        let o = OptSpec::new(1232)
            .option(OPT_KEEPALIVE, &wire::keepalive(300))
            .option(65001, b"e2e")
            .option(OPT_PADDING, &[0; 100]);
        Some(vec![Action::Send(Resp::to(ctx.query).a().opt(o).build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = udp(&s, &query_opt(0xE700, "hop.example", OptSpec::new(1232)));
    let codes = option_codes(&m);
    assert!(
        !codes.contains(&OPT_KEEPALIVE) && !codes.contains(&OPT_PADDING),
        "{codes:?}"
    );
    assert!(codes.contains(&65001), "end-to-end option lost: {codes:?}");
    let (m, _) = udp(&s, &query(0xE701, "hop.example"));
    assert!(m.opt.is_none(), "OPT to a client that sent none");
    assert_eq!(m.a_records(), vec![crate::util::dns::ANSWER_ADDR]);
    quiescent(&s.proxy, fds);
}

/// E8: a client without OPT; the upstream answers with an extended RCODE
/// (BADCOOKIE, 23): unrepresentable without OPT: SERVFAIL, no OPT.
#[test]
fn e8_extended_rcode_to_client_without_edns() {
    let script = Script::default().with_hook(|ctx| {
        let r = Resp::to(ctx.query)
            .rcode(23 & 0x0f)
            .opt(OptSpec::new(1232).ext_rcode(23 >> 4));
        Some(vec![Action::Send(r.build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = udp(&s, &query(0xE800, "badcookie.example"));
    assert_eq!(m.rcode, RCODE_SERVFAIL);
    assert!(m.opt.is_none(), "OPT to a client that sent none");
    // An EDNS client gets the real extended RCODE.
    let (m, _) = udp(&s, &query_opt(0xE801, "badcookie.example", OptSpec::new(1232)));
    let opt = m.opt.expect("OPT");
    assert_eq!((u16::from(opt.ext_rcode) << 4) | u16::from(m.rcode), 23);
    quiescent(&s.proxy, fds);
}

/// E9: an upstream EDE is passed on to EDNS clients; our own SERVFAIL
/// carries our EDE only for clients that sent an OPT.
#[test]
fn e9_upstream_ede_preserved_ours_only_with_opt() {
    let script = Script::default().with_hook(|ctx| {
        if first_label_starts_with(ctx.query, "silent") {
            return Some(vec![]);
        }
        let o = OptSpec::new(1232).option(OPT_EDE, &wire::ede(9, "DNSKEY missing"));
        Some(vec![Action::Send(
            Resp::to(ctx.query).rcode(RCODE_SERVFAIL).opt(o).build(),
        )])
    });
    let (s, fds) = Setup::observed(script, 400, &[]);
    let (m, _) = udp(&s, &query_opt(0xE900, "dnssec.example", OptSpec::stub()));
    assert_eq!(m.rcode, RCODE_SERVFAIL);
    assert_eq!(
        ede_of(&m),
        vec![(9, "DNSKEY missing".to_string())],
        "upstream EDE not preserved"
    );
    let (m, _) = udp(&s, &query(0xE901, "dnssec.example"));
    assert_eq!(m.rcode, RCODE_SERVFAIL);
    assert!(m.opt.is_none());
    let (m, _) = udp(&s, &query_opt(0xE902, "silent.example", OptSpec::stub()));
    assert_eq!(m.rcode, RCODE_SERVFAIL);
    assert!(ede_of(&m).iter().any(|(c, _)| *c == 22), "{:?}", ede_of(&m));
    let (m, _) = udp(&s, &query(0xE903, "silent2.example"));
    assert_eq!(m.rcode, RCODE_SERVFAIL);
    assert!(m.opt.is_none(), "our SERVFAIL carried an OPT to a client without EDNS");
    quiescent(&s.proxy, fds);
}

/// E10: the first query on every upstream connection carries an empty
/// edns-tcp-keepalive option.
#[test]
fn e10_first_query_per_connection_asks_keepalive() {
    let script = Script::default().with_hook(|ctx| {
        (ctx.index == 0).then(|| {
            vec![
                Action::Answer,
                Action::Delay(Duration::from_millis(20)),
                Action::Close(CloseKind::CloseNotify),
            ]
        })
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    for i in 0..3u16 {
        assert!(udp_exchange(s.proxy.udp_addr(), &query(0xEA00 + i, "ka.example"), deadline_ms(2000)).is_some());
        assert!(s.upstream.wait_until(deadline_ms(1000), |st| st.open == 0));
    }
    let up = s.upstream.queries();
    let firsts: Vec<_> = (1..=3).filter_map(|c| up.iter().find(|q| q.conn == c)).collect();
    assert_eq!(firsts.len(), 3, "expected three connections");
    for q in firsts {
        let (_, opts) = opt_of(&Message::must(&q.bytes)).expect("OPT");
        assert!(
            opts.iter().any(|(c, d)| *c == OPT_KEEPALIVE && d.is_empty()),
            "conn {}: no empty keepalive option",
            q.conn
        );
    }
    quiescent(&s.proxy, fds);
}

/// E11: a truncated answer never carries a partial RRset: answer,
/// authority and additional sections are empty (only our OPT).
#[test]
fn e11_tc_answer_has_empty_sections() {
    let script = Script::default().with_hook(|ctx| {
        let mut r = Resp::to(ctx.query);
        for _ in 0..3 {
            r = r.txt(200);
        }
        r = r
            .raw_authority(wire::txt_rr(100))
            .raw_authority(wire::txt_rr(100))
            .raw_additional(wire::txt_rr(100))
            .opt(OptSpec::new(1232));
        Some(vec![Action::Send(r.build())])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, _) = udp(&s, &query(0xEB00, "sections.example"));
    assert!(m.tc);
    assert_eq!((m.ancount, m.nscount, m.arcount), (0, 0, 0));
    let (m, _) = udp(&s, &query_opt(0xEB01, "sections.example", OptSpec::new(512)));
    assert!(m.tc);
    assert_eq!((m.ancount, m.nscount, m.arcount), (0, 0, 1));
    assert!(m.opt.is_some());
    quiescent(&s.proxy, fds);
}

/// E12 (RFC 8914 §3): a SERVFAIL whose EDE text makes it too big for the
/// client's UDP budget loses the EDE first; TC only if still too big.
#[test]
fn e12_long_ede_dropped_before_truncating() {
    let script = Script::default().with_hook(|ctx| {
        let o = OptSpec::new(1232).option(OPT_EDE, &wire::ede(0, &"x".repeat(1000)));
        Some(vec![Action::Send(
            Resp::to(ctx.query).rcode(RCODE_SERVFAIL).opt(o).build(),
        )])
    });
    let (s, fds) = Setup::observed(script, 2000, &[]);
    let (m, r) = udp(&s, &query_opt(0xEC00, "longede.example", OptSpec::new(512)));
    assert_eq!(m.rcode, RCODE_SERVFAIL);
    assert!(r.len() <= 512);
    assert!(!m.tc, "truncated instead of dropping the EDE");
    // Room for it: kept.
    let (m, _) = udp(&s, &query_opt(0xEC01, "longede.example", OptSpec::new(1232)));
    assert!(!m.tc);
    assert_eq!(ede_of(&m).len(), 1);
    quiescent(&s.proxy, fds);
}
