//! Reloads keep their promises: what SIGHUP changes applies to the next
//! query at once, and never to the wrong resolver.

use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::util::{
    deadline_ms, query, udp_socket, Action, CloseKind, Message, Script, TestCa, TestProxy, TestUpstream, NAME,
};

fn write_config(path: &std::path::Path, ca: &TestCa, lines: &[String]) {
    let mut text = format!("ca-file {}\n", ca.pem_path_str());
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(path, text).expect("write config");
}

fn reload(proxy: &TestProxy) {
    let before = proxy.count_log("configuration reloaded");
    proxy.signal(libc::SIGHUP);
    assert!(
        crate::util::wait_until(deadline_ms(3000), || proxy.count_log("configuration reloaded") > before),
        "{}",
        proxy.log_text()
    );
}

/// A lowered `--timeout` applies to the next query at once, even while an
/// older query with the longer deadline is still waiting (a FIFO of
/// deadlines that assumed one timeout for all made the new query wait
/// behind the old one: SERVFAIL after seconds instead of 200 ms).
#[test]
fn lowered_timeout_applies_to_new_queries_at_once() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::silent());
    let conf = ca.dir().join("timeout.conf");
    write_config(
        &conf,
        &ca,
        &[format!("upstream {}", up.arg(NAME)), "timeout 3000".into()],
    );
    let proxy = TestProxy::start(&["--config", conf.to_str().expect("utf-8 path")]);
    let old = udp_socket();
    old.send_to(&query(1, "old.example"), proxy.udp_addr()).expect("send");
    assert!(up.wait_until(deadline_ms(2000), |s| s.queries.len() == 1));
    write_config(
        &conf,
        &ca,
        &[format!("upstream {}", up.arg(NAME)), "timeout 200".into()],
    );
    reload(&proxy);
    let new = udp_socket();
    let sent = Instant::now();
    new.send_to(&query(2, "new.example"), proxy.udp_addr()).expect("send");
    let r = crate::util::client::udp_recv(&new, deadline_ms(2500)).expect("SERVFAIL for the new query");
    let waited = sent.elapsed();
    let m = Message::must(&r);
    assert_eq!((m.id, m.rcode), (2, 2));
    assert!(
        waited < Duration::from_millis(1500),
        "new query answered after {waited:?}"
    );
    // The old query is answered too (the silent connection is replaced
    // once the new query times out on it, so it may come early).
    let r = crate::util::client::udp_recv(&old, deadline_ms(4000)).expect("SERVFAIL for the old query");
    assert_eq!(Message::must(&r).rcode, 2);
}

/// A query re-sent after a reload goes where its name belongs under the
/// new configuration. Here a reload removes the first of two forwarding
/// zones, which renumbers the second; the query for the removed zone is
/// still in flight on the removed zone's resolver, which then hangs up
/// without answering. The re-send must go to the default upstream (the
/// name's zone now), never to the other zone's resolver (before, a stored
/// zone index sent it there: an internal name leaked to the wrong server).
#[test]
fn a_resent_query_is_routed_by_its_name_after_a_reload() {
    let ca = TestCa::new();
    let public = TestUpstream::for_name(&ca, NAME, Script::default());
    let hangs_up = Script::default().with_hook(|_| {
        Some(vec![
            Action::Delay(Duration::from_millis(1000)),
            Action::Close(CloseKind::Fin),
        ])
    });
    let removed = TestUpstream::for_name(&ca, NAME, hangs_up);
    let other = TestUpstream::for_name(&ca, NAME, Script::default());
    let conf = ca.dir().join("zones.conf");
    let upstream = format!("upstream {}", public.arg(NAME));
    let fwd_removed = format!("forward a.example={}", removed.arg(NAME));
    let fwd_other = format!("forward b.example={}", other.arg(NAME));
    write_config(
        &conf,
        &ca,
        &[upstream.clone(), fwd_removed, fwd_other.clone(), "timeout 4000".into()],
    );
    let proxy = TestProxy::start(&["--config", conf.to_str().expect("utf-8 path")]);
    let sock = udp_socket();
    sock.send_to(&query(7, "www.a.example"), proxy.udp_addr())
        .expect("send");
    assert!(removed.wait_until(deadline_ms(2000), |s| s.queries.len() == 1));
    write_config(&conf, &ca, &[upstream, fwd_other, "timeout 4000".into()]);
    reload(&proxy);
    let r = crate::util::client::udp_recv(&sock, deadline_ms(4000)).expect("the re-sent query is answered");
    assert_default_answer(&r, 7, "www.a.example");
    assert_eq!(
        other.query_count(),
        0,
        "the removed zone's name reached another zone's resolver"
    );
    let to_public: Vec<String> = public
        .queries()
        .iter()
        .map(|q| Message::must(&q.bytes).question.expect("question").name.to_lowercase())
        .collect();
    assert_eq!(to_public, ["www.a.example"]);
    // And the remaining zone still routes to its own resolver.
    let r = crate::util::udp_exchange(proxy.udp_addr(), &query(8, "x.b.example"), deadline_ms(3000)).expect("answer");
    assert_default_answer(&r, 8, "x.b.example");
    assert_eq!(other.query_count(), 1);
}

/// `--watch-config`: a changed file is applied without a signal, the way a
/// Kubernetes ConfigMap update arrives (a new file swapped in under the
/// mounted name), and an unchanged one is not reloaded again.
#[test]
fn watched_config_file_is_reloaded_when_its_content_changes() {
    let ca = TestCa::new();
    let a = TestUpstream::for_name(&ca, NAME, Script::default());
    let b = TestUpstream::for_name(&ca, NAME, Script::default());
    let conf = ca.dir().join("watched.conf");
    write_config(&conf, &ca, &[format!("upstream {}", a.arg(NAME))]);
    let path = conf.to_str().expect("utf-8 path");
    let proxy = TestProxy::start(&["--config", path, "--watch-config", "1"]);
    let r = crate::util::udp_exchange(proxy.udp_addr(), &query(1, "before.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("answer"), 1, "before.example");
    assert_eq!(a.query_count(), 1);

    let next = ca.dir().join("watched.conf.new");
    write_config(&next, &ca, &[format!("upstream {}", b.arg(NAME))]);
    std::fs::rename(&next, &conf).expect("swap the file in");
    assert!(
        proxy.wait_for_log("configuration reloaded", deadline_ms(4000)),
        "{}",
        proxy.log_text()
    );
    let r = crate::util::udp_exchange(proxy.udp_addr(), &query(2, "after.example"), deadline_ms(3000));
    assert_default_answer(&r.expect("answer"), 2, "after.example");
    assert_eq!(b.query_count(), 1, "the new upstream answers");
    assert_eq!(a.query_count(), 1);
    // Two more looks at the unchanged file: no second reload.
    let looks = proxy.count_log("watched.conf: unchanged");
    assert!(
        crate::util::wait_until(deadline_ms(4000), || proxy.count_log("watched.conf: unchanged")
            >= looks + 2),
        "{}",
        proxy.log_text()
    );
    assert_eq!(proxy.count_log("configuration reloaded"), 1, "{}", proxy.log_text());
}

#[test]
fn watch_config_needs_a_config_file() {
    let out = crate::util::run_to_exit(&["--watch-config", "5"], Duration::from_secs(5));
    assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--watch-config needs --config"), "{}", out.stderr);
}
