//! The service manager's protocols, driven for real: sockets passed by
//! `systemd-socket-activate` (as a socket unit would), and sd_notify
//! messages to a socket the test binds. systemd-socket-activate comes with
//! Debian's `systemd` package (.ci/run installs it); without it these
//! tests fail, never skip.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::it::basic::assert_default_answer;
use crate::it::privileges::{assert_unprivileged, require_root, NOBODY};
use crate::util::certs::TempDir;
use crate::util::proxy::proxy_bin;
use crate::util::{deadline_ms, query, tcp_exchange, udp_exchange, Script, TestCa, TestProxy, TestUpstream, NAME};

const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

fn activate_bin() -> &'static str {
    assert!(
        std::path::Path::new(ACTIVATE).exists(),
        "{ACTIVATE} is missing: apt-get install systemd (CI's .ci/run installs it)"
    );
    ACTIVATE
}

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> u16 {
    for _ in 0..32 {
        let Ok(t) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = t.local_addr() else { continue };
        if UdpSocket::bind(addr).is_ok() {
            return addr.port();
        }
    }
    panic!("no free loopback port for UDP and TCP");
}

/// The proxy's arguments towards `up`, with a `--listen` that cannot be
/// bound (TEST-NET-1 is no local address): passed sockets must replace it.
fn proxy_args(ca: &TestCa, up: &TestUpstream) -> Vec<String> {
    [
        "--listen",
        "192.0.2.1:53",
        "--upstream",
        &up.arg(NAME),
        "--ca-file",
        ca.pem_path_str(),
        "--log-level",
        "debug",
    ]
    .map(String::from)
    .to_vec()
}

/// O_NONBLOCK and O_CLOEXEC of the proxy's descriptor `fd`.
fn fd_flags(pid: u32, fd: u32) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("read fdinfo");
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .expect("flags in fdinfo")
}

/// One UDP and one TCP socket on the same port, passed the way a socket
/// unit with ListenDatagram= and ListenStream= passes them: the outer
/// activator holds the UDP socket and, on the first datagram, execs the
/// inner one, which adds the TCP socket and execs the proxy (same pid
/// throughout). That first datagram, queued before the proxy existed, is
/// answered.
#[test]
fn socket_activation_serves_passed_udp_and_tcp_sockets() {
    let bin = activate_bin();
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(bin);
    cmd.args(["--datagram", "-l", &listen, "--fdname=dns-udp", "--", bin])
        .args(["-l", &listen, "--fdname=dns-udp:dns-tcp", "--", proxy_bin()])
        .args(proxy_args(&ca, &up));
    let (proxy, rx) = TestProxy::launch(cmd).expect("start systemd-socket-activate");
    assert!(
        proxy.wait_for_log(&format!("Listening on {listen} as 3"), deadline_ms(5000)),
        "activator not listening:\n{}",
        proxy.log_text()
    );
    let r = udp_exchange(addr, &query(7, "first.example"), deadline_ms(10_000));
    let first = r.unwrap_or_else(|| panic!("no answer to the activating datagram:\n{}", proxy.log_text()));
    assert_default_answer(&first, 7, "first.example");
    let mut proxy = proxy.await_listening(rx).expect("listening lines from passed sockets");
    assert_eq!((proxy.udp_addr(), proxy.tcp_addr()), (addr, addr));
    let log = proxy.log_text();
    assert!(
        log.contains("serving on the 2 sockets passed by systemd; --listen is not bound"),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on udp {addr} (passed by systemd, \"dns-udp\")")),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on tcp {addr} (passed by systemd, \"dns-tcp\")")),
        "{log}"
    );
    // The activators echo the command line; only the proxy's own lines count.
    let mut own = proxy.logs().into_iter().filter(|l| l.contains("[dotproxy"));
    assert!(!own.any(|l| l.contains("192.0.2.1")), "--listen was used:\n{log}");
    let r = tcp_exchange(addr, &query(8, "tcp.example"), deadline_ms(5000)).expect("TCP answer");
    assert_default_answer(&r, 8, "tcp.example");
    for fd in [3, 4] {
        let flags = fd_flags(proxy.pid(), fd);
        assert_ne!(flags & libc::O_NONBLOCK as u32, 0, "fd {fd} blocking: {flags:o}");
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "fd {fd} not CLOEXEC: {flags:o}");
    }
    proxy.kill_term();
    let st = proxy.wait_exit(Duration::from_secs(5)).expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", proxy.log_text());
}

/// A passed socket the proxy cannot serve (here a unix stream socket) stops
/// it with a reason; a misconfigured socket unit must not be half served.
#[test]
fn socket_activation_refuses_a_socket_it_cannot_serve() {
    let bin = activate_bin();
    let dir = TempDir::new("activate");
    let path = dir.path().join("dns.sock");
    let path_str = path.to_str().expect("utf-8 path");
    let mut cmd = Command::new(bin);
    cmd.args(["-l", path_str, "--", proxy_bin(), "--listen", "127.0.0.1:0"]);
    let (mut proxy, _rx) = TestProxy::launch(cmd).expect("start systemd-socket-activate");
    assert!(
        proxy.wait_for_log("Listening on", deadline_ms(5000)),
        "{}",
        proxy.log_text()
    );
    let _conn = std::os::unix::net::UnixStream::connect(&path).expect("connect to the activator");
    let st = proxy.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(st.code(), Some(1), "{}", proxy.log_text());
    let log = proxy.log_text();
    assert!(
        log.contains("LISTEN_FDS: descriptor 3: not an IPv4 or IPv6 socket"),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");
}

/// Variables left by some other process's activation (LISTEN_PID not ours)
/// are ignored: the proxy binds --listen.
#[test]
fn listen_fds_for_another_pid_are_ignored() {
    let mut cmd = Command::new(proxy_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1#x.test"])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "2");
    let proxy = TestProxy::try_start_command(cmd).expect("binds --listen");
    assert!(!proxy.log_text().contains("passed by systemd"), "{}", proxy.log_text());
}

/// Reads notifications until one starts with `prefix` (others, like a
/// READY=1 before it, are collected too).
fn recv_until(sock: &UnixDatagram, prefix: &str, seen: &mut Vec<String>, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
        let Ok(n) = sock.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.starts_with(prefix) {
            return Some(msg);
        }
    }
    None
}

fn notify_proxy(ca: &TestCa, up: &TestUpstream, notify_socket: &str, extra: &[&str]) -> TestProxy {
    let mut cmd = Command::new(proxy_bin());
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up.arg(NAME),
        "--ca-file",
        ca.pem_path_str(),
    ])
    .args(["--log-level", "debug"])
    .args(extra)
    .env("NOTIFY_SOCKET", notify_socket);
    TestProxy::try_start_command(cmd).unwrap_or_else(|e| panic!("proxy did not start: {e}"))
}

/// READY=1 comes once the listeners answer (so `systemctl start` returns
/// to a working resolver), RELOADING=1 … READY=1 around SIGHUP, STOPPING=1
/// when SIGTERM starts the drain. The socket is an abstract one (`@name`),
/// as systemd's own is in some setups.
#[test]
fn notify_ready_reloading_and_stopping() {
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let name = format!("dotproxy-test-notify-{}-{}", std::process::id(), free_port());
    let sock = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        UnixDatagram::bind_addr(&addr).expect("bind notify socket")
    };
    let mut proxy = notify_proxy(&ca, &up, &format!("@{name}"), &[]);
    let mut seen = Vec::new();
    let ready = recv_until(&sock, "READY=1", &mut seen, Duration::from_secs(5));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1; got {seen:?}\n{}", proxy.log_text()));
    assert_eq!(seen.len(), 1, "before READY=1: {seen:?}");
    let udp = proxy.udp_addr();
    assert!(
        ready.contains(&format!("STATUS=serving on udp {udp}, tcp {}", proxy.tcp_addr())),
        "{ready}"
    );
    // Ready means ready: answered at once, nothing waited for.
    let r = udp_exchange(udp, &query(1, "ready.example"), deadline_ms(5000)).expect("UDP answer after READY=1");
    assert_default_answer(&r, 1, "ready.example");
    let r = tcp_exchange(proxy.tcp_addr(), &query(2, "ready.example"), deadline_ms(5000)).expect("TCP answer");
    assert_default_answer(&r, 2, "ready.example");

    proxy.signal(libc::SIGHUP);
    let reloading = recv_until(&sock, "RELOADING=1", &mut seen, Duration::from_secs(5));
    let reloading = reloading.unwrap_or_else(|| panic!("no RELOADING=1; got {seen:?}"));
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "{reloading:?}");
    assert!(
        recv_until(&sock, "READY=1", &mut seen, Duration::from_secs(5)).is_some(),
        "{seen:?}"
    );

    proxy.kill_term();
    let stopping = recv_until(&sock, "STOPPING=1", &mut seen, Duration::from_secs(5));
    assert!(stopping.is_some(), "no STOPPING=1; got {seen:?}");
    let st = proxy.wait_exit(Duration::from_secs(5)).expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", proxy.log_text());
}

/// The notify socket is connected before `--user` drops root, so a socket
/// only root may write to (as /run/systemd/notify can be) still hears
/// READY=1 and STOPPING=1 from nobody.
#[test]
fn notify_still_reaches_a_root_only_socket_after_user_nobody() {
    require_root();
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let dir = TempDir::new("notify");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    let mut proxy = notify_proxy(&ca, &up, path.to_str().expect("utf-8 path"), &["--user", "nobody"]);
    let mut seen = Vec::new();
    let ready = recv_until(&sock, "READY=1", &mut seen, Duration::from_secs(5));
    assert!(ready.is_some(), "no READY=1; got {seen:?}\n{}", proxy.log_text());
    assert_unprivileged(proxy.pid(), NOBODY);
    proxy.kill_term();
    let stopping = recv_until(&sock, "STOPPING=1", &mut seen, Duration::from_secs(5));
    assert!(stopping.is_some(), "no STOPPING=1; got {seen:?}\n{}", proxy.log_text());
    let st = proxy.wait_exit(Duration::from_secs(5)).expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", proxy.log_text());
}
