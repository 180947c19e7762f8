//! Hardening, upstreams, answers and reloads: one slow answer is not an
//! outage (a silent connection is replaced, the upstream fails only after
//! a streak of them), the cache and merge keys (no client subnet sent on,
//! RD in the key), merged followers get well-formed answers, the answers
//! the proxy builds itself over UDP are never larger than the query,
//! reloads apply what they say (CA files, the access list, retired
//! upstreams, options that need a restart), and a pin-only upstream on
//! port 53 is refused.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::dns::{encode_name, Message, QueryBuilder, RCODE_NOERROR, RCODE_NOTIMP, RCODE_SERVFAIL};
use crate::util::net::tcp_connect_from;
use crate::util::upstream::first_label_starts_with;
use crate::util::wire::{
    assert_servfail_ede, ede_of, option_codes, query_opt, query_opts, rr_header, OptSpec, Resp, RCODE_NXDOMAIN,
    RCODE_REFUSED,
};
use crate::util::{
    dead_port, deadline_ms, query, quiescent, quiescent_idle, run_to_exit, udp_exchange, udp_recv, udp_socket,
    wait_until, Action, CloseKind, Metrics, Script, Setup, TcpClient, TcpEvent, TestCa, TestProxy, TestUpstream, NAME,
};

/// EDNS Client Subnet (RFC 7871).
const OPT_CLIENT_SUBNET: u16 = 8;
const TYPE_SOA: u16 = 6;
const TYPE_AXFR: u16 = 252;

/// One UDP exchange from a fresh socket: the parsed answer and the time
/// it took (panics when nothing comes within 5 s).
fn ask(p: &TestProxy, q: &[u8]) -> (Message, Duration) {
    let (r, t) = ask_raw(p, q);
    (Message::must(&r), t)
}

fn ask_raw(p: &TestProxy, q: &[u8]) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    let r = udp_exchange(p.udp_addr(), q, deadline_ms(5000))
        .unwrap_or_else(|| panic!("no answer to {:?}", Message::parse(q).map(|m| m.qname().to_string())));
    (r, t.elapsed())
}

fn failures(m: &Metrics) -> f64 {
    m.sum("dotproxy_upstream_failures_total")
}

fn up(m: &Metrics) -> f64 {
    m.sum("dotproxy_upstream_up")
}

// ------------------------------------------------- 7: slow is not down ----

/// One slow answer is not an outage. The upstream answers the very first
/// query of its first connection only after 1500 ms (`--timeout 800`),
/// everything else at once: that client gets SERVFAIL (EDE 22) at its
/// deadline and the silent connection is replaced, but the upstream is not
/// marked down: the next queries are answered normally on a new
/// connection (not SERVFAIL + EDE 23 at once), no failure is counted, no
/// "down" warning, `dotproxy_upstream_up` stays 1.
#[test]
fn one_slow_answer_on_a_fresh_connection_is_not_an_outage() {
    let script = Script::default().with_hook(|ctx| {
        (ctx.conn == 1 && ctx.index == 0).then(|| vec![Action::Delay(Duration::from_millis(1500)), Action::Answer])
    });
    let (s, fds) = Setup::observed(script, 800, &[]);
    let (m, took) = ask(&s.proxy, &query_opt(0x7000, "slow-first.example", OptSpec::stub()));
    assert_servfail_ede(&m, 0x7000, &[22], "the slow first query");
    assert!(
        took >= Duration::from_millis(700),
        "SERVFAIL after {took:?}, deadline 800 ms"
    );
    for i in 1..=3u16 {
        let name = format!("next{i}.example");
        let (r, took) = ask_raw(&s.proxy, &query_opt(0x7000 + i, &name, OptSpec::stub()));
        let m = Message::must(&r);
        assert_eq!(
            (m.rcode, ede_of(&m)),
            (RCODE_NOERROR, vec![]),
            "{name}: the upstream was treated as down after one slow answer (after {took:?})"
        );
        assert_eq!(m.id, 0x7000 + i);
        assert!(took < Duration::from_millis(500), "{name} answered after {took:?}");
    }
    assert_eq!(s.upstream.accepts(), 2, "the silent connection was not replaced once");
    let m = s.proxy.metrics();
    assert_eq!(failures(&m), 0.0, "dotproxy_upstream_failures_total");
    assert_eq!(up(&m), 1.0, "dotproxy_upstream_up");
    assert_eq!(s.proxy.count_log(" down: "), 0, "{}", s.proxy.log_text());
    quiescent(&s.proxy, fds);
}

/// A truly silent upstream (handshakes, then never answers) is still
/// counted as failed, after exactly three connections in a row went
/// silent: after the first and second stall the upstream is still up
/// (each silent connection replaced, no failure counted); the third marks
/// it down (`dotproxy_upstream_up` 0, one failure, a warning "upstream
/// ... down"), and the next client gets SERVFAIL + EDE 23 at once instead
/// of waiting for its deadline.
#[test]
fn a_silent_upstream_is_marked_down_after_three_silent_connections() {
    let (s, fds) = Setup::observed(Script::silent(), 300, &[]);
    for k in 1..=3usize {
        let id = 0x7100 + k as u16;
        let (m, took) = ask(&s.proxy, &query_opt(id, &format!("stall{k}.example"), OptSpec::stub()));
        assert_servfail_ede(&m, id, &[22], &format!("stall {k}"));
        assert!(took >= Duration::from_millis(250), "stall {k}: SERVFAIL after {took:?}");
        if k == 3 {
            break;
        }
        // The stalled connection is closed (and replaced by the next query).
        assert!(
            s.upstream
                .wait_until(deadline_ms(2000), |st| st.accepts == k && st.open == 0),
            "stall {k}: connection not closed: {:?} accepts, {} open",
            s.upstream.accepts(),
            s.upstream.open_connections()
        );
        let m = s.proxy.metrics();
        assert_eq!(failures(&m), 0.0, "stall {k}: failure counted before 3 stalls");
        assert_eq!(up(&m), 1.0, "stall {k}: marked down before 3 stalls");
    }
    // Right after the third stall (sent at once: its back-off is only
    // ~250 ms): down, so answered at once.
    let (m, took) = ask(&s.proxy, &query_opt(0x7104, "after.example", OptSpec::stub()));
    assert_servfail_ede(&m, 0x7104, &[23], "after three stalls");
    assert!(took < Duration::from_millis(150), "SERVFAIL after {took:?} while down");
    assert_eq!(s.upstream.accepts(), 3, "a connection was opened while down");
    let m = s.proxy.metrics();
    assert_eq!((failures(&m), up(&m)), (1.0, 0.0), "failures, up after three stalls");
    assert_eq!(
        s.proxy.count_log(" down: "),
        1,
        "no 'upstream ... down' warning: {}",
        s.proxy.log_text()
    );
    quiescent_idle(&s.proxy, fds);
}

// ------------------------------------------- 9: cache and merge keys ----

/// Sends a query carrying an EDNS Client Subnet option through a proxy
/// started with `args` and checks what the upstream received: its OPT
/// record, without option 8; the client gets its answer. Returns the
/// option codes the upstream saw.
fn forwarded_options_of_an_ecs_query(args: &[&str]) -> Vec<u16> {
    // Family 1 (IPv4), source prefix 24, scope 0, 192.0.2.
    let ecs = [0, 1, 24, 0, 192, 0, 2];
    let s = Setup::with_args(Script::default(), 1000, args);
    let spec = OptSpec::new(1232).option(OPT_CLIENT_SUBNET, &ecs);
    let (m, _) = ask(&s.proxy, &query_opt(0x7200, "ecs.example", spec));
    assert_eq!((m.id, m.rcode), (0x7200, RCODE_NOERROR), "{args:?}");
    let got = s.upstream.queries();
    assert_eq!(got.len(), 1, "{args:?}");
    let sent = Message::must(&got[0].bytes);
    assert!(sent.opt.is_some(), "{args:?}: OPT dropped");
    let codes = option_codes(&sent);
    assert!(
        !codes.contains(&OPT_CLIENT_SUBNET),
        "{args:?}: the client's subnet was forwarded: options {codes:?}"
    );
    codes
}

/// A client's EDNS Client Subnet option (code 8) is never forwarded
/// (privacy; it would also let subnet-specific answers into the shared
/// cache): with padding on (the default, 128) the query reaches the
/// upstream padded, with its OPT record, without option 8.
#[test]
fn client_subnet_is_not_forwarded_with_padding() {
    let codes = forwarded_options_of_an_ecs_query(&[]);
    assert!(codes.contains(&crate::util::wire::OPT_PADDING), "not padded: {codes:?}");
}

/// The same with `--padding 0`: the query is not rewritten for padding,
/// and still the upstream never sees option 8.
#[test]
fn client_subnet_is_not_forwarded_without_padding() {
    let codes = forwarded_options_of_an_ecs_query(&["--padding", "0"]);
    assert!(!codes.contains(&crate::util::wire::OPT_PADDING), "padded: {codes:?}");
}

/// An SOA record for `example` (TTL 60, MINIMUM 60): what makes an
/// NXDOMAIN cacheable (RFC 2308).
fn soa() -> Vec<u8> {
    let mut rdata = encode_name("ns.example");
    rdata.extend_from_slice(&encode_name("hostmaster.example"));
    for v in [1u32, 3600, 600, 86_400, 60] {
        rdata.extend_from_slice(&v.to_be_bytes());
    }
    let mut rr = rr_header(&encode_name("example"), TYPE_SOA, rdata.len() as u16);
    rr.extend_from_slice(&rdata);
    rr
}

/// A query's RD bit.
fn rd(q: &[u8]) -> bool {
    q.get(2).is_some_and(|b| b & 0x01 != 0)
}

/// RD is part of the cache key: with `--cache-size 100`, an upstream that
/// answers RD=0 queries with a cacheable NXDOMAIN (SOA in authority) and
/// RD=1 queries normally; an RD=0 query then an RD=1 query for the same
/// name: the RD=1 client gets NOERROR with the address, not the cached
/// NXDOMAIN of the RD=0 question, and both reached the upstream. The
/// RD=0 answer itself is cached for RD=0 (a repeat is not sent again).
#[test]
fn rd_is_part_of_the_cache_key() {
    let script = Script::default().with_hook(|ctx| {
        (!rd(ctx.query)).then(|| {
            let nx = Resp::to(ctx.query).rcode(RCODE_NXDOMAIN).raw_authority(soa()).build();
            vec![Action::Send(nx)]
        })
    });
    let s = Setup::with_args(script, 1000, &["--cache-size", "100"]);
    let norec = QueryBuilder::new(0x7300, "rd.example").rd(false).build();
    let (m, _) = ask(&s.proxy, &norec);
    assert_eq!((m.rcode, m.rd), (RCODE_NXDOMAIN, false), "RD=0 answer");
    let (r, _) = ask_raw(&s.proxy, &query(0x7301, "rd.example"));
    let m = assert_default_answer(&r, 0x7301, "rd.example");
    assert!(m.rd, "RD not echoed");
    let seen: Vec<bool> = s.upstream.queries().iter().map(|q| rd(&q.bytes)).collect();
    assert_eq!(seen, [false, true], "RD of the queries the upstream saw");
    // Each is cached under its own key.
    let (m, _) = ask(&s.proxy, &QueryBuilder::new(0x7302, "rd.example").rd(false).build());
    assert_eq!((m.id, m.rcode), (0x7302, RCODE_NXDOMAIN));
    let (r, _) = ask_raw(&s.proxy, &query(0x7303, "rd.example"));
    assert_default_answer(&r, 0x7303, "rd.example");
    assert_eq!(s.upstream.query_count(), 2, "cached answers were fetched again");
}

/// RD is part of the merge key: two identical questions in flight at
/// once, one RD=0 and one RD=1, are not merged: both reach the upstream
/// and each client gets the answer to its own query (RD echoed).
#[test]
fn rd_is_part_of_the_merge_key() {
    let script = Script::delayed(Duration::from_millis(300));
    let (s, fds) = Setup::observed(script, 2000, &["--cache-size", "100"]);
    let a = udp_socket();
    let b = udp_socket();
    a.send_to(
        &QueryBuilder::new(0x7400, "merge-rd.example").rd(false).build(),
        s.proxy.udp_addr(),
    )
    .expect("send");
    assert!(s.upstream.wait_until(deadline_ms(2000), |st| st.queries.len() == 1));
    b.send_to(&query(0x7401, "merge-rd.example"), s.proxy.udp_addr())
        .expect("send");
    let ra = Message::must(&udp_recv(&a, deadline_ms(3000)).expect("RD=0 client: no answer"));
    let rb = Message::must(&udp_recv(&b, deadline_ms(3000)).expect("RD=1 client: no answer"));
    assert_eq!((ra.id, ra.rcode, ra.rd), (0x7400, RCODE_NOERROR, false), "RD=0 client");
    assert_eq!((rb.id, rb.rcode, rb.rd), (0x7401, RCODE_NOERROR, true), "RD=1 client");
    let seen: Vec<bool> = s.upstream.queries().iter().map(|q| rd(&q.bytes)).collect();
    assert_eq!(seen, [false, true], "RD=0 and RD=1 questions merged");
    assert_eq!(s.proxy.metrics().sum("dotproxy_merged_total"), 0.0);
    quiescent(&s.proxy, fds);
}

// ------------------------------------------- 10: merged answers ----

/// A merged follower never gets garbage. With `--cache-size 100`
/// (merging on), two EDNS clients ask the same question (the follower over
/// TCP, in other letter case) while the upstream holds it; the upstream
/// then answers with a header-only REFUSED that carries an OPT
/// (QDCOUNT=0, ARCOUNT=1). Both clients get a well-formed message with
/// their own ID, rcode REFUSED and the OPT record intact.
#[test]
fn a_merged_follower_gets_a_well_formed_header_only_answer() {
    let script = Script::default().with_hook(|ctx| {
        let refused = Resp::to(ctx.query)
            .no_question()
            .rcode(RCODE_REFUSED)
            .opt(OptSpec::new(1232))
            .build();
        Some(vec![Action::Delay(Duration::from_millis(400)), Action::Send(refused)])
    });
    let (s, fds) = Setup::observed(script, 2000, &["--cache-size", "100"]);
    let leader = udp_socket();
    leader
        .send_to(
            &query_opt(0x7500, "merged.example", OptSpec::stub()),
            s.proxy.udp_addr(),
        )
        .expect("send");
    assert!(s.upstream.wait_until(deadline_ms(2000), |st| st.queries.len() == 1));
    let mut follower = TcpClient::connect(s.proxy.tcp_addr());
    follower.send(&query_opt(0x7501, "MERGED.example", OptSpec::stub()));
    let (_, ok) = s
        .proxy
        .wait_metrics(deadline_ms(1000), |m| m.sum("dotproxy_merged_total") == 1.0);
    assert!(ok, "precondition: the second query was not merged");
    let answers = [
        (udp_recv(&leader, deadline_ms(3000)), 0x7500, "leader"),
        (follower.recv(deadline_ms(3000)), 0x7501, "follower"),
    ];
    for (r, id, who) in answers {
        let r = r.unwrap_or_else(|| panic!("{who}: no answer"));
        let m = Message::parse(&r).unwrap_or_else(|e| panic!("{who}: malformed answer ({e}): {r:02x?}"));
        assert_eq!(m.id, id, "{who}: ID");
        assert!(m.qr, "{who}: QR");
        assert_eq!(m.rcode, RCODE_REFUSED, "{who}: rcode");
        let opt = m.opt.unwrap_or_else(|| panic!("{who}: OPT lost: {r:02x?}"));
        assert_eq!((opt.version, opt.ext_rcode), (0, 0), "{who}: OPT");
        if let Some(q) = &m.question {
            assert_eq!(q.name, "merged.example", "{who}: question");
        }
    }
    assert_eq!(s.upstream.query_count(), 1);
    drop(follower);
    quiescent(&s.proxy, fds);
}

// ------------------------------------------- 11: own answer sizes ----

/// A query the upstream never answers (`hold*` names).
fn holds_some() -> Script {
    Script::default().with_hook(|ctx| first_label_starts_with(ctx.query, "hold").then(Vec::new))
}

/// Answers the proxy builds itself over UDP are never larger than the
/// query (no amplification). With `--timeout 400` and an upstream that
/// holds `hold*` names: the SERVFAIL to a bare-OPT EDNS query (1232, no
/// options) is no larger than the query and carries no EDE; to a query
/// with a client cookie it carries EDE 22 as a code only (no text); over
/// TCP the same failure carries EDE 22 with its text "upstream timeout".
/// The NOTIMP for an AXFR over UDP is no larger than the query, with or
/// without EDNS options. (A normal query between the timeouts keeps the
/// upstream's streak of silent connections at zero.)
#[test]
fn own_answers_over_udp_are_never_larger_than_the_query() {
    let (s, fds) = Setup::observed(holds_some(), 400, &[]);
    let p = &s.proxy;
    let mut n = 0u16;
    let mut resets = || {
        n += 1;
        let name = format!("ok{n}.example");
        let (r, _) = ask_raw(p, &query(0x76f0 + n, &name));
        assert_default_answer(&r, 0x76f0 + n, &name);
    };

    let q = query_opt(0x7600, "hold-bare.example", OptSpec::new(1232));
    let (r, _) = ask_raw(p, &q);
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (0x7600, RCODE_SERVFAIL), "bare OPT over UDP");
    assert!(
        r.len() <= q.len(),
        "bare OPT: SERVFAIL {} bytes for a {}-byte query",
        r.len(),
        q.len()
    );
    assert_eq!(ede_of(&m), vec![], "bare OPT: an EDE does not fit");
    resets();

    let q = query_opt(0x7601, "hold-cookie.example", OptSpec::stub());
    let (r, _) = ask_raw(p, &q);
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (0x7601, RCODE_SERVFAIL), "cookie over UDP");
    assert!(
        r.len() <= q.len(),
        "cookie: SERVFAIL {} bytes for a {}-byte query",
        r.len(),
        q.len()
    );
    assert_eq!(ede_of(&m), vec![(22, String::new())], "cookie: EDE 22, code only");
    resets();

    let q = query_opt(0x7602, "hold-tcp.example", OptSpec::new(1232));
    let r = TcpClient::connect(p.tcp_addr())
        .exchange(&q, deadline_ms(3000))
        .expect("TCP: no answer");
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (0x7602, RCODE_SERVFAIL), "over TCP");
    assert_eq!(ede_of(&m), vec![(22, "upstream timeout".to_string())], "over TCP");
    resets();

    for (what, opts) in [
        ("no EDNS", vec![]),
        ("bare OPT", vec![OptSpec::new(1232)]),
        ("cookie", vec![OptSpec::stub()]),
    ] {
        let q = query_opts(0x7610, "zone.example", TYPE_AXFR, &opts);
        let (r, _) = ask_raw(p, &q);
        let m = Message::must(&r);
        assert_eq!((m.id, m.rcode), (0x7610, RCODE_NOTIMP), "AXFR, {what}");
        assert!(
            r.len() <= q.len(),
            "AXFR, {what}: NOTIMP {} bytes for a {}-byte query",
            r.len(),
            q.len()
        );
    }
    assert_eq!(
        s.upstream
            .with_stats(|st| st.queries.iter().filter(|q| q.qname() == "zone.example").count()),
        0
    );
    quiescent(p, fds);
}

// ------------------------------------------------- 12: reloads ----

fn write_conf(path: &Path, lines: &[String]) {
    let mut text = String::from("# hardening_upstreams\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(path, text).expect("write config");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// SIGHUP, then wait (3 s) for the next "configuration reloaded".
fn reload(proxy: &TestProxy) {
    let before = proxy.count_log("configuration reloaded");
    proxy.signal(libc::SIGHUP);
    assert!(
        wait_until(deadline_ms(3000), || proxy.count_log("configuration reloaded") > before),
        "no reload: {}",
        proxy.log_text()
    );
}

/// After a reload that took the trust in the upstream's CA away: the
/// upstream's last connection is gone, so the next queries need a new
/// handshake, which must fail: SERVFAIL, the upstream hears a TLS alert,
/// and no query reaches it.
fn assert_no_longer_trusted(proxy: &TestProxy, up: &TestUpstream, what: &str) {
    let queries = up.query_count();
    let errors = up.tls_errors().len();
    for i in 0..3u16 {
        let name = format!("after{i}.example");
        let (m, _) = ask(proxy, &query(0x7700 + i, &name));
        assert_eq!(
            (m.id, m.rcode),
            (0x7700 + i, RCODE_SERVFAIL),
            "{what}: {name} answered by a server the new CA does not vouch for"
        );
    }
    assert_eq!(
        up.query_count(),
        queries,
        "{what}: a query reached the untrusted server"
    );
    assert!(
        up.wait_until(deadline_ms(2000), |st| st.tls_errors.len() > errors),
        "{what}: the server saw no failed handshake: {:?}",
        up.tls_errors()
    );
}

/// Served under the first CA, twice (the upstream closes after each
/// answer: two connections, two handshakes), then all connections gone.
fn served_twice_then_closed(proxy: &TestProxy, up: &TestUpstream) {
    for i in 0..2u16 {
        let name = format!("before{i}.example");
        let (r, _) = ask_raw(proxy, &query(0x7770 + i, &name));
        assert_default_answer(&r, 0x7770 + i, &name);
    }
    assert!(
        up.wait_until(deadline_ms(2000), |st| st.open == 0),
        "the upstream's connection did not close"
    );
}

/// A reload that switches `ca-file` from the upstream's issuer (CA1) to
/// another CA (CA2) applies to new handshakes: once the old connection is
/// gone (the upstream closes after each answer), queries get SERVFAIL and
/// nothing reaches the server CA2 does not vouch for.
#[test]
fn reload_of_ca_file_applies_to_new_handshakes() {
    let ca1 = TestCa::new();
    let ca2 = TestCa::new();
    let up = TestUpstream::for_name(&ca1, NAME, Script::close_after(1, CloseKind::CloseNotify));
    let conf = ca1.dir().join("ca-file.conf");
    let lines = |ca: &TestCa| {
        vec![
            format!("upstream {}", up.arg(NAME)),
            format!("ca-file {}", ca.pem_path_str()),
            "timeout 1000".to_string(),
        ]
    };
    write_conf(&conf, &lines(&ca1));
    let proxy = TestProxy::start(&["--config", path_str(&conf)]);
    served_twice_then_closed(&proxy, &up);
    write_conf(&conf, &lines(&ca2));
    reload(&proxy);
    assert_no_longer_trusted(&proxy, &up, "ca-file CA1 -> CA2");
}

/// The same for an upstream with its own `@ca=PATH`, whose file keeps its
/// path and gets other contents (CA2 instead of CA1): a reload re-reads
/// it, and new handshakes no longer trust CA1.
#[test]
fn reload_rereads_an_upstream_ca_file_changed_in_place() {
    let ca1 = TestCa::new();
    let ca2 = TestCa::new();
    let up = TestUpstream::for_name(&ca1, NAME, Script::close_after(1, CloseKind::CloseNotify));
    let own = ca1.dir().join("upstream-ca.pem");
    std::fs::write(&own, ca1.pem()).expect("write CA file");
    let conf = ca1.dir().join("at-ca.conf");
    write_conf(
        &conf,
        &[
            format!("upstream {}@ca={}", up.arg(NAME), path_str(&own)),
            "timeout 1000".to_string(),
        ],
    );
    let proxy = TestProxy::start(&["--config", path_str(&conf)]);
    served_twice_then_closed(&proxy, &up);
    std::fs::write(&own, ca2.pem()).expect("overwrite CA file");
    reload(&proxy);
    assert_no_longer_trusted(&proxy, &up, "@ca= file overwritten with CA2");
}

/// Narrowing `allow` applies to open connections too: a TCP client
/// connected from 127.0.0.2 under `allow 127.0.0.0/8` is closed by a
/// reload to `allow 127.0.0.1/32` (logged: "no longer in --allow"); a TCP
/// client from 127.0.0.1 connected before the reload keeps being served,
/// and so does UDP from 127.0.0.1.
#[test]
fn narrowing_allow_closes_open_connections_no_longer_allowed() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let conf = ca.dir().join("allow.conf");
    let lines = |allow: &str| {
        vec![
            format!("upstream {}", up.arg(NAME)),
            format!("ca-file {}", ca.pem_path_str()),
            format!("allow {allow}"),
            "timeout 1000".to_string(),
        ]
    };
    write_conf(&conf, &lines("127.0.0.0/8"));
    let proxy = TestProxy::start(&["--config", path_str(&conf)]);
    let from2 =
        tcp_connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), proxy.tcp_addr()).expect("connect from 127.0.0.2");
    let mut other = TcpClient::from_stream(from2);
    let r = other.exchange(&query(0x7800, "two.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("127.0.0.2 served under 127.0.0.0/8"), 0x7800, "two.example");
    let mut local = TcpClient::connect(proxy.tcp_addr());
    let r = local.exchange(&query(0x7801, "one.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("127.0.0.1 served"), 0x7801, "one.example");

    write_conf(&conf, &lines("127.0.0.1/32"));
    reload(&proxy);
    match other.next_event(deadline_ms(2000)) {
        TcpEvent::Closed { .. } | TcpEvent::Error(_) => {}
        e => panic!("the 127.0.0.2 connection was not closed: {e:?}"),
    }
    assert!(
        proxy.count_log("no longer in --allow") >= 1,
        "no log line: {}",
        proxy.log_text()
    );
    let r = local.exchange(&query(0x7802, "one-again.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("127.0.0.1 TCP after the reload"), 0x7802, "one-again.example");
    let (r, _) = ask_raw(&proxy, &query(0x7803, "udp.example"));
    assert_default_answer(&r, 0x7803, "udp.example");
}

/// Retired upstreams are dropped once drained: alternating the config
/// between upstream A and upstream B for 10 reloads (each with a query in
/// flight on the outgoing upstream, answered after the reload) leaves
/// exactly one `dotproxy_upstream_up` series, the current upstream's,
/// not eleven.
#[test]
fn retired_upstreams_are_dropped_once_drained() {
    let ca = TestCa::new();
    let a = TestUpstream::for_name(&ca, NAME, Script::delayed(Duration::from_millis(150)));
    let b = TestUpstream::for_name(&ca, NAME, Script::delayed(Duration::from_millis(150)));
    let conf = ca.dir().join("alternate.conf");
    let lines = |u: &TestUpstream| {
        vec![
            format!("upstream {}", u.arg(NAME)),
            format!("ca-file {}", ca.pem_path_str()),
            "timeout 2000".to_string(),
        ]
    };
    write_conf(&conf, &lines(&a));
    let proxy = TestProxy::start(&["--config", path_str(&conf), "--metrics", "127.0.0.1:0"]);
    let ups = [&a, &b];
    for i in 0..10usize {
        let (current, next) = (ups[i % 2], ups[(i + 1) % 2]);
        let sock = udp_socket();
        let id = 0x7900 + i as u16;
        let name = format!("alt{i}.example");
        let seen = current.query_count();
        sock.send_to(&query(id, &name), proxy.udp_addr()).expect("send");
        assert!(
            current.wait_until(deadline_ms(2000), |st| st.queries.len() > seen),
            "reload {i}: query did not reach the current upstream"
        );
        write_conf(&conf, &lines(next));
        reload(&proxy);
        let r = udp_recv(&sock, deadline_ms(3000)).unwrap_or_else(|| panic!("reload {i}: in-flight query lost"));
        assert_default_answer(&r, id, &name);
    }
    let (r, _) = ask_raw(&proxy, &query(0x79ff, "last.example"));
    assert_default_answer(&r, 0x79ff, "last.example");
    let series = |m: &Metrics| {
        m.samples
            .iter()
            .filter(|(n, _, _)| n == "dotproxy_upstream_up")
            .map(|(_, l, _)| l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
    };
    let (m, ok) = proxy.wait_metrics(deadline_ms(3000), |m| series(m).len() == 1);
    assert!(ok, "dotproxy_upstream_up series after 10 reloads: {:?}", series(&m));
    let label = &series(&m)[0];
    assert!(
        label.contains(&format!(":{}", a.port())),
        "the series is not the current upstream's: {label}"
    );
}

/// Options that cannot change while running (listen, metrics, cache-size,
/// log-level, reuseport) changed in the file: the reload applies the rest
/// and says so in one warning naming all five ("only change on restart").
#[test]
fn reload_warns_once_about_options_that_need_a_restart() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let conf = ca.dir().join("restart.conf");
    let base = vec![
        format!("upstream {}", up.arg(NAME)),
        format!("ca-file {}", ca.pem_path_str()),
        "timeout 1000".to_string(),
    ];
    let mut first = base.clone();
    first.extend(["listen 127.0.0.1:0".to_string(), "log-level debug".to_string()]);
    write_conf(&conf, &first);
    let proxy = TestProxy::start_exact(&["--config", path_str(&conf)]);
    let (r, _) = ask_raw(&proxy, &query(0x7a00, "before.example"));
    assert_default_answer(&r, 0x7a00, "before.example");
    let mut second = base;
    second.extend([
        format!("listen 127.0.0.1:{}", dead_port()),
        "log-level info".to_string(),
        format!("metrics 127.0.0.1:{}", dead_port()),
        "cache-size 100".to_string(),
        "reuseport".to_string(),
    ]);
    write_conf(&conf, &second);
    reload(&proxy);
    let lines: Vec<String> = proxy
        .logs()
        .into_iter()
        .filter(|l| l.contains("only change on restart"))
        .collect();
    assert_eq!(lines.len(), 1, "warnings: {lines:?}\n{}", proxy.log_text());
    let line = &lines[0];
    assert!(line.contains("WARN"), "not a warning: {line}");
    for opt in ["listen", "metrics", "cache-size", "log-level", "reuseport"] {
        assert!(line.contains(opt), "{opt} not named: {line}");
    }
    // Still listening where it was, and serving.
    let (r, _) = ask_raw(&proxy, &query(0x7a01, "after.example"));
    assert_default_answer(&r, 0x7a01, "after.example");
}

// ------------------------------------------------- 13: port 53 ----

/// A pin-only upstream on port 53 (`127.0.0.1:53@pin=...`) is refused at
/// start (RFC 7858 §3.1: DNS over TLS never uses port 53), exit code 2,
/// with a line that mentions port 53, like a named upstream on port 53.
#[test]
fn a_pin_only_upstream_on_port_53_is_refused() {
    let pin = format!("{}=", "A".repeat(43));
    let spec = format!("127.0.0.1:53@pin={pin}");
    let out = run_to_exit(
        &["--listen", "127.0.0.1:0", "--upstream", &spec],
        Duration::from_secs(3),
    );
    let status = out
        .status
        .unwrap_or_else(|| panic!("{spec} accepted: still running after 3 s; {}", out.stderr));
    assert_eq!(status.code(), Some(2), "{spec}: {status:?}\n{}", out.stderr);
    assert!(out.stderr.contains("port 53"), "{spec}: {}", out.stderr);
}
