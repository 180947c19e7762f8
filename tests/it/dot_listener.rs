//! DNS over TLS to clients (`--listen-tls`, RFC 7858): pipelined framed
//! queries over rustls, mutual TLS with `--client-ca`, certificate
//! rotation on SIGHUP, and the plain-TCP limits over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;

use crate::it::basic::assert_default_answer;
use crate::util::certs::{provider, Leaf, TempDir};
use crate::util::tls_client::{client_config, TlsClient, TlsEvent};
use crate::util::{deadline_ms, query, run_to_exit, wait_until, Script, Setup, TestCa, TestProxy, TestUpstream, NAME};

/// The name the proxy's own certificate is issued for.
const LISTENER: &str = "dot.proxy.test";

struct Dot {
    proxy: TestProxy,
    _upstream: TestUpstream,
    /// Issues the proxy's certificate (and trusts the upstream's).
    ca: TestCa,
    dir: TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn tls_addr(proxy: &TestProxy) -> SocketAddr {
    // Logged just after the plain listeners the harness waits for.
    assert!(
        proxy.wait_for_log("listening on tls ", deadline_ms(3000)),
        "{}",
        proxy.log_text()
    );
    let line = proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("listening on tls "))
        .expect("a tls listener in the log");
    let addr = line.rsplit("listening on tls ").next().unwrap_or_default();
    addr.trim().parse().expect("tls listener address")
}

fn start(extra: &[&str]) -> Dot {
    let ca = TestCa::new();
    let upstream = TestUpstream::for_name(&ca, NAME, Script::default());
    let dir = TempDir::new("dot-listener");
    let (cert, key) = ca.leaf(&[LISTENER]).write_pem(dir.path());
    let mut args = vec![
        "--listen-tls",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap_or_default(),
        "--tls-key",
        key.to_str().unwrap_or_default(),
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let proxy = TestProxy::for_upstream(&ca, &upstream, NAME, 1000, &args);
    Dot {
        proxy,
        _upstream: upstream,
        ca,
        dir,
        cert,
        key,
    }
}

fn connect(d: &Dot, config: Arc<ClientConfig>) -> Result<TlsClient, String> {
    TlsClient::connect(tls_addr(&d.proxy), LISTENER, config, deadline_ms(3000))
}

fn trusting(ca: &TestCa) -> Arc<ClientConfig> {
    client_config(ca.root_store())
}

fn with_client_cert(ca: &TestCa, leaf: &Leaf) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(ca.root_store())
            .with_client_auth_cert(leaf.chain.clone(), leaf.key())
            .expect("client cert"),
    )
}

/// Sends `n` queries in one write and collects the answers by ID.
fn ask_many(c: &mut TlsClient, n: u16, tag: &str) {
    let qs: Vec<Vec<u8>> = (0..n)
        .map(|i| query(1000 + i, &format!("q{i}.{tag}.example")))
        .collect();
    c.send(&qs).expect("send");
    let mut seen = vec![false; n as usize];
    let deadline = deadline_ms(5000);
    for _ in 0..n {
        match c.next_event(deadline) {
            TlsEvent::Frame(r) => {
                let id = crate::util::dns::msg_id(&r).expect("an id");
                let i = usize::from(id - 1000);
                assert_default_answer(&r, id, &format!("q{i}.{tag}.example"));
                seen[i] = true;
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn pipelined_queries_over_tls_are_answered_with_alpn_dot() {
    let d = start(&[]);
    let mut cfg = (*trusting(&d.ca)).clone();
    cfg.alpn_protocols = vec![b"dot".to_vec()];
    let mut c = connect(&d, Arc::new(cfg)).expect("handshake");
    ask_many(&mut c, 50, "pipe");
    // A client that offers no ALPN is served too.
    let mut plain = connect(&d, trusting(&d.ca)).expect("handshake without ALPN");
    ask_many(&mut plain, 3, "noalpn");
    let (m, ok) = d.proxy.wait_metrics(deadline_ms(2000), |m| {
        m.labeled("dotproxy_tls_handshakes_total", "result", "ok") >= 2.0
    });
    assert!(ok, "{:?}", m.samples);
    assert_eq!(m.labeled("dotproxy_queries_total", "transport", "tls"), 53.0);
    assert_eq!(m.labeled("dotproxy_queries_total", "transport", "tcp"), 0.0);
    c.send_close_notify().expect("close_notify");
    assert!(matches!(
        c.next_event(deadline_ms(2000)),
        TlsEvent::CloseNotify | TlsEvent::Eof
    ));
}

#[test]
fn with_client_ca_only_clients_with_a_certificate_from_it_are_served() {
    let clients = TestCa::new();
    let ca_path = clients.pem_path_str().to_string();
    let d = start(&["--client-ca", &ca_path]);

    let good = with_client_cert(&d.ca, &clients.client_leaf("app.cluster.test"));
    let mut c = connect(&d, good).expect("a client with a certificate from --client-ca");
    ask_many(&mut c, 5, "mtls");

    // No certificate, or one from another CA: no answer. With TLS 1.3 the
    // client learns it at its first read (the server's alert).
    let other = with_client_cert(&d.ca, &TestCa::new().client_leaf("intruder.test"));
    for cfg in [trusting(&d.ca), other] {
        if let Ok(mut c) = connect(&d, cfg) {
            let _ = c.send(&[query(7, "refused.example")]);
            match c.next_event(deadline_ms(3000)) {
                TlsEvent::Frame(r) => panic!("answered without a valid client certificate: {r:?}"),
                TlsEvent::Timeout => panic!("neither refused nor answered"),
                _ => {}
            }
        }
    }
    let (m, ok) = d.proxy.wait_metrics(deadline_ms(3000), |m| {
        m.labeled("dotproxy_tls_handshakes_total", "result", "failed") >= 2.0
    });
    assert!(ok, "{:?}", m.samples);
    assert_eq!(m.labeled("dotproxy_tls_handshakes_total", "result", "ok"), 1.0);
    assert_eq!(
        d.proxy.count_log("handshake failed"),
        1,
        "rate-limited: {}",
        d.proxy.log_text()
    );
}

fn served_cert(d: &Dot) -> CertificateDer<'static> {
    let addr = tls_addr(&d.proxy);
    let name = ServerName::try_from(LISTENER).expect("name");
    let mut conn = rustls::ClientConnection::new(trusting(&d.ca), name).expect("client");
    let mut sock = std::net::TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("handshake");
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .clone()
        .into_owned()
}

#[test]
fn sighup_rotates_the_certificate_and_keeps_open_connections() {
    let d = start(&[]);
    let mut open = connect(&d, trusting(&d.ca)).expect("handshake");
    let before = served_cert(&d);

    let next = d.ca.leaf(&[LISTENER]);
    let staged = TempDir::new("dot-next");
    let (c, k) = next.write_pem(staged.path());
    std::fs::rename(c, &d.cert).expect("swap cert");
    std::fs::rename(k, &d.key).expect("swap key");
    let reloaded = d.proxy.count_log("configuration reloaded");
    d.proxy.signal(libc::SIGHUP);
    assert!(wait_until(deadline_ms(3000), || d
        .proxy
        .count_log("configuration reloaded")
        > reloaded));
    let after = served_cert(&d);
    assert_ne!(before, after);
    assert_eq!(after, next.chain[0]);
    ask_many(&mut open, 2, "kept");

    // A broken key: one warning, the last good certificate stays.
    std::fs::write(&d.key, "not a key\n").expect("break key");
    d.proxy.signal(libc::SIGHUP);
    assert!(
        d.proxy
            .wait_for_log("keeping the TLS listener's certificate", deadline_ms(3000)),
        "{}",
        d.proxy.log_text()
    );
    assert_eq!(served_cert(&d), next.chain[0]);
    let _ = &d.dir;
}

#[test]
fn a_silent_or_trickling_tls_client_is_closed_at_the_idle_timeout() {
    let d = start(&["--tcp-idle-timeout", "500"]);
    let addr = tls_addr(&d.proxy);
    let t0 = Instant::now();
    let mut silent = std::net::TcpStream::connect(addr).expect("connect");
    let mut trickle = std::net::TcpStream::connect(addr).expect("connect");
    use std::io::{Read, Write};
    // The first bytes of a ClientHello, then nothing.
    trickle.write_all(&[0x16, 0x03, 0x01]).expect("write");
    for s in [&mut silent, &mut trickle] {
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        // Closed with at most an alert (close_notify, 7 bytes), no answer.
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.len() <= 7, "{got:?}");
    }
    assert!(t0.elapsed() < Duration::from_millis(2500), "{:?}", t0.elapsed());
    // And an honest client is still served.
    let mut c = connect(&d, trusting(&d.ca)).expect("handshake");
    ask_many(&mut c, 1, "after");
}

#[test]
fn tls_listener_options_go_together() {
    let ca = TestCa::new();
    let dir = TempDir::new("dot-opts");
    let (cert, _) = ca.leaf(&[LISTENER]).write_pem(dir.path());
    let cert = cert.to_str().unwrap_or_default();
    for args in [
        &["--listen-tls", "127.0.0.1:0"][..],
        &["--listen-tls", "127.0.0.1:0", "--tls-cert", cert][..],
        &["--tls-cert", cert, "--tls-key", cert][..],
        &["--listen-tls", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", cert][..],
    ] {
        let out = run_to_exit(args, Duration::from_secs(5));
        assert_ne!(out.status.and_then(|s| s.code()), Some(0), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("tls"), "{args:?}: {}", out.stderr);
    }
    let _ = Setup::new;
}

/// edns-tcp-keepalive (RFC 7828): a client that sends the option over TCP
/// or TLS learns the idle timeout (--tcp-idle-timeout 4000 = 40 units of
/// 100 ms); over UDP it is never sent (§3.2.1), and a client that did not
/// ask does not get it.
#[test]
fn edns_tcp_keepalive_is_answered_over_tcp_and_tls_only() {
    use crate::util::wire::{opt_of, query_opt, OptSpec};
    use crate::util::{tcp_exchange, udp_exchange, Message};
    let d = start(&["--tcp-idle-timeout", "4000"]);
    let ask = |id: u16, keepalive: bool| {
        let opt = OptSpec::new(1232);
        let opt = if keepalive { opt.option(11, &[]) } else { opt };
        query_opt(id, "keepalive.example", opt)
    };
    let keepalive_of = |r: &[u8]| {
        let (_, opts) = opt_of(&Message::must(r)).expect("an OPT in the answer");
        opts.into_iter().find(|(c, _)| *c == 11).map(|(_, v)| v)
    };
    let tcp = tcp_exchange(d.proxy.tcp_addr(), &ask(1, true), deadline_ms(3000)).expect("tcp answer");
    assert_eq!(keepalive_of(&tcp), Some(40u16.to_be_bytes().to_vec()));
    let mut c = connect(&d, trusting(&d.ca)).expect("handshake");
    c.send(&[ask(2, true)]).expect("send");
    let TlsEvent::Frame(tls) = c.next_event(deadline_ms(3000)) else {
        panic!("no tls answer")
    };
    assert_eq!(keepalive_of(&tls), Some(40u16.to_be_bytes().to_vec()));
    let udp = udp_exchange(d.proxy.udp_addr(), &ask(3, true), deadline_ms(3000)).expect("udp answer");
    assert_eq!(keepalive_of(&udp), None);
    let plain = tcp_exchange(d.proxy.tcp_addr(), &ask(4, false), deadline_ms(3000)).expect("tcp answer");
    assert_eq!(keepalive_of(&plain), None);
}
