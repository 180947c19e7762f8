//! The cache that keeps a small network working: stale answers when the
//! upstreams cannot answer (RFC 8767), prefetch of popular entries, TTL
//! clamps, a byte bound.

use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::wire::{ede_of, query_opt, OptSpec};
use crate::util::{deadline_ms, query, udp_exchange, Action, Message, Script, Setup};

fn ttl_of(m: &Message) -> u32 {
    m.answers.first().expect("an answer record").ttl
}

/// Every upstream down: an entry expired at most `--stale-max-age` ago is
/// served at once with TTL 30 and EDE 3 (Stale Answer), not SERVFAIL.
#[test]
fn upstream_down_gets_a_stale_answer_with_ede_3() {
    let (mut s, _) = Setup::observed(
        Script::default(),
        1000,
        &["--cache-size", "100", "--cache-max-ttl", "1"],
    );
    let q = query_opt(1, "stale.example", OptSpec::new(1232));
    let r = udp_exchange(s.proxy.udp_addr(), &q, deadline_ms(2000)).expect("first answer");
    assert_eq!(Message::must(&r).rcode, 0);
    s.upstream.stop();
    // The stimulus: the entry's (clamped) TTL of 1 s runs out.
    std::thread::sleep(Duration::from_millis(1100));
    let t = Instant::now();
    let r = udp_exchange(
        s.proxy.udp_addr(),
        &query_opt(2, "stale.example", OptSpec::new(1232)),
        deadline_ms(2000),
    )
    .expect("stale answer");
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (2, 0), "a stale answer, not SERVFAIL");
    assert_eq!(ttl_of(&m), 30);
    assert!(ede_of(&m).iter().any(|(c, _)| *c == 3), "EDE 3: {:?}", ede_of(&m));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "stale answer after {:?}",
        t.elapsed()
    );
    let metrics = s.proxy.metrics();
    assert_eq!(metrics.sum("dotproxy_cache_stale_answers_total"), 1.0);
    // A name never cached still gets SERVFAIL.
    let r = udp_exchange(s.proxy.udp_addr(), &query(3, "never.example"), deadline_ms(2000)).expect("answer");
    assert_eq!(Message::must(&r).rcode, 2);
}

/// A slow upstream: the client gets the stale answer after
/// `--stale-answer-after`; the refresh goes on, and the next query gets the
/// fresh answer from the cache.
#[test]
fn slow_upstream_stale_after_the_timer_then_fresh() {
    let slow = Script::default().with_hook(|ctx| {
        (ctx.global_index > 0).then(|| vec![Action::Delay(Duration::from_millis(700)), Action::Answer])
    });
    let args = [
        "--cache-size",
        "100",
        "--cache-max-ttl",
        "1",
        "--stale-answer-after",
        "200",
    ];
    let (s, _) = Setup::observed(slow, 2000, &args);
    let r = udp_exchange(s.proxy.udp_addr(), &query(1, "slow-refresh.example"), deadline_ms(2000)).expect("first");
    assert_default_answer(&r, 1, "slow-refresh.example");
    std::thread::sleep(Duration::from_millis(1100)); // the TTL runs out
    let t = Instant::now();
    let r = udp_exchange(s.proxy.udp_addr(), &query(2, "slow-refresh.example"), deadline_ms(2000)).expect("stale");
    let took = t.elapsed();
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode, ttl_of(&m)), (2, 0, 30));
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(600),
        "stale answer after {took:?}"
    );
    // The refresh lands in the cache.
    assert!(s.upstream.wait_until(deadline_ms(2000), |st| st.queries.len() == 2));
    let (_, ok) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| m.sum("dotproxy_inflight") == 0.0);
    assert!(ok);
    let r = udp_exchange(s.proxy.udp_addr(), &query(3, "slow-refresh.example"), deadline_ms(2000)).expect("fresh");
    let m = assert_default_answer(&r, 3, "slow-refresh.example");
    assert!(ttl_of(&m) <= 1, "fresh answer has TTL {}", ttl_of(&m));
    assert_eq!(s.upstream.query_count(), 2, "the fresh answer came from the cache");
}

/// A hit in the last tenth of an entry's TTL refreshes it upstream before
/// it expires, once, so popular names never miss.
#[test]
fn prefetch_refreshes_before_expiry() {
    let args = ["--cache-size", "100", "--cache-min-ttl", "4", "--cache-max-ttl", "4"];
    let (s, _) = Setup::observed(Script::default(), 2000, &args);
    let t0 = Instant::now();
    let r = udp_exchange(s.proxy.udp_addr(), &query(1, "popular.example"), deadline_ms(2000)).expect("first");
    assert_default_answer(&r, 1, "popular.example");
    // Hits early in its life: no refresh.
    udp_exchange(s.proxy.udp_addr(), &query(2, "popular.example"), deadline_ms(2000)).expect("hit");
    assert_eq!(s.upstream.query_count(), 1);
    // The stimulus: into the last tenth of the 4 s TTL.
    std::thread::sleep(Duration::from_millis(3700).saturating_sub(t0.elapsed()));
    for id in 3..6 {
        let r = udp_exchange(s.proxy.udp_addr(), &query(id, "popular.example"), deadline_ms(2000)).expect("hit");
        assert_default_answer(&r, id, "popular.example");
    }
    assert!(
        s.upstream.wait_until(deadline_ms(1000), |st| st.queries.len() == 2),
        "no prefetch seen upstream"
    );
    assert!(t0.elapsed() < Duration::from_secs(4), "prefetched only after expiry");
    let (_, ok) = s
        .proxy
        .wait_metrics(deadline_ms(2000), |m| m.sum("dotproxy_cache_prefetches_total") == 1.0);
    assert!(ok, "exactly one prefetch counted");
    // After the old entry's expiry the refreshed one answers: no miss.
    std::thread::sleep(Duration::from_millis(4300).saturating_sub(t0.elapsed()));
    udp_exchange(s.proxy.udp_addr(), &query(9, "popular.example"), deadline_ms(2000)).expect("hit");
    assert_eq!(s.upstream.query_count(), 2, "a miss after the prefetch");
}

/// `--cache-memory`: large answers are evicted (least recently used first)
/// to keep the bytes held under the bound.
#[test]
fn byte_bound_holds_with_large_answers() {
    let args = ["--cache-size", "100000", "--cache-memory", "64K"];
    let (s, _) = Setup::observed(Script::default(), 2000, &args);
    for i in 0..200u16 {
        let name = format!("txt4.n{i}.example");
        let r = crate::util::tcp_exchange(s.proxy.tcp_addr(), &query(i, &name), deadline_ms(2000)).expect("answer");
        assert_eq!(Message::must(&r).rcode, 0);
    }
    let m = s.proxy.metrics();
    let bytes = m.sum("dotproxy_cache_bytes");
    let entries = m.sum("dotproxy_cache_entries");
    eprintln!(
        "cache: {entries} entries, {bytes} bytes, {} evictions",
        m.sum("dotproxy_cache_evictions_total")
    );
    assert!(bytes <= 64.0 * 1024.0, "{bytes} bytes held");
    assert!((20.0..200.0).contains(&entries), "{entries} entries");
    assert!(m.sum("dotproxy_cache_evictions_total") >= 100.0);
}
