//! `--user`: started as root on ports below 1024, the proxy serves as
//! nobody with no capabilities; unknown users and switches that need root
//! are refused. These tests need root (CI runs as root): they fail, never
//! skip, without it.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use crate::it::basic::assert_default_answer;
use crate::util::proxy::proxy_bin;
use crate::util::{
    deadline_ms, query, run_to_exit, tcp_exchange, udp_exchange, wait_until, Script, TestCa, TestProxy, TestUpstream,
    NAME,
};

pub const NOBODY: u32 = 65534;

pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test binds ports below 1024 and switches users: run the suite as root (CI does)"
    );
}

/// A 127.0.0.1 port below 1024 free for both UDP and TCP right now. Each
/// call in this process tries different ports, so tests running in
/// parallel never pick the same one.
pub fn free_low_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    for _ in 0..200 {
        // 700-899: nothing on a test machine listens there.
        let port = 700 + NEXT.fetch_add(1, Ordering::Relaxed) % 200;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:700-899");
}

/// The `Uid:`/`Gid:`/`Groups:`/`Cap*:` fields of /proc/PID/status.
pub fn proc_status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Real, effective, saved and file-system IDs all `id`; supplementary
/// groups only `id`; no permitted, effective or ambient capabilities.
pub fn assert_unprivileged(pid: u32, id: u32) {
    let all = [id; 4].map(|i| i.to_string()).join(" ");
    assert_eq!(proc_status(pid, "Uid"), all, "Uid");
    assert_eq!(proc_status(pid, "Gid"), all, "Gid");
    assert_eq!(proc_status(pid, "Groups"), id.to_string(), "Groups");
    for cap in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(proc_status(pid, cap), "0000000000000000", "{cap}");
    }
}

fn assert_answers(proxy: &TestProxy, tag: &str) {
    let name = format!("udp-{tag}.example");
    let r = udp_exchange(proxy.udp_addr(), &query(1, &name), deadline_ms(5000));
    assert_default_answer(&r.unwrap_or_else(|| panic!("no UDP answer for {name}")), 1, &name);
    let name = format!("tcp-{tag}.example");
    let r = tcp_exchange(proxy.tcp_addr(), &query(2, &name), deadline_ms(5000));
    assert_default_answer(&r.unwrap_or_else(|| panic!("no TCP answer for {name}")), 2, &name);
}

#[test]
fn user_nobody_binds_low_ports_then_serves_unprivileged() {
    require_root();
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let (dns, metrics) = (free_low_port(), free_low_port());
    let listen = format!("127.0.0.1:{dns}");
    let metrics = format!("127.0.0.1:{metrics}");
    let upstream = up.arg(NAME);
    let mut proxy = TestProxy::start_exact(&[
        "--listen",
        &listen,
        "--metrics",
        &metrics,
        "--upstream",
        &upstream,
        "--ca-file",
        ca.pem_path_str(),
        "--user",
        "nobody",
        "--log-level",
        "debug",
    ]);
    assert_eq!(proxy.udp_addr().port(), dns);
    // The switch happens after the listening lines: wait for it.
    assert!(
        proxy.wait_for_log("running as uid 65534 gid 65534", deadline_ms(5000)),
        "{}",
        proxy.log_text()
    );
    assert_unprivileged(proxy.pid(), NOBODY);
    assert_answers(&proxy, "nobody");
    let r = proxy.http_get("/healthz");
    assert_eq!(r.status, 200, "/healthz on a port below 1024: {}", r.body);
    proxy.kill_term();
    let st = proxy.wait_exit(Duration::from_secs(5)).expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", proxy.log_text());
}

#[test]
fn user_unknown_is_refused_before_binding() {
    let out = run_to_exit(
        &["--user", "no-such-user-dotproxy", "--listen", "127.0.0.1:0"],
        Duration::from_secs(5),
    );
    let status = out.status.expect("did not exit within 5 s");
    assert_eq!(status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--user no-such-user-dotproxy: no such user"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("listening on"),
        "bound before refusing:\n{}",
        out.stderr
    );
    let out = run_to_exit(&["--user", "nobody:no-such-group-dotproxy"], Duration::from_secs(5));
    assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("no such group"), "{}", out.stderr);
    let out = run_to_exit(&["--user", "root"], Duration::from_secs(5));
    assert_eq!(out.status.and_then(|s| s.code()), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("that is root"), "{}", out.stderr);
}

/// Not root: another user is refused with a reason, the same user is fine
/// (the configuration can say `user nobody` in a container that already
/// runs as nobody).
#[test]
fn user_without_root_is_refused_unless_already_that_user() {
    require_root();
    let bin = std::path::Path::new(proxy_bin());
    let mut cmd = Command::new(bin);
    cmd.args(["--user", "daemon", "--listen", "127.0.0.1:0"])
        .uid(NOBODY)
        .gid(NOBODY);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "run {} as nobody: {e} (every directory on its path must be searchable by others)",
            bin.display()
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs root, and this runs as uid 65534"), "{stderr}");

    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--user",
        "nobody",
        "--upstream",
        &up.arg(NAME),
    ])
    .args(["--ca-file", ca.pem_path_str(), "--log-level", "debug"])
    .uid(NOBODY)
    .gid(NOBODY);
    let proxy = TestProxy::try_start_command(cmd).unwrap_or_else(|e| panic!("as nobody with --user nobody: {e}"));
    assert!(
        proxy.wait_for_log("--user nobody: already uid 65534", deadline_ms(3000)),
        "{}",
        proxy.log_text()
    );
    assert_answers(&proxy, "already");
}

/// A reload re-reads `--config` and the CA file as nobody: readable files
/// apply, an unreadable one is refused and the running configuration kept.
/// `user` is a config-file key like the others.
#[test]
fn user_nobody_reloads_what_nobody_can_read() {
    require_root();
    let ca = TestCa::new();
    let up = TestUpstream::for_name(&ca, NAME, Script::default());
    let conf = ca.dir().join("user.conf");
    let port = free_low_port();
    let write = |timeout: u32| {
        let text = format!(
            "listen 127.0.0.1:{port}\nupstream {}\nca-file {}\nuser nobody\nlog-level debug\ntimeout {timeout}\n",
            up.arg(NAME),
            ca.pem_path_str()
        );
        std::fs::write(&conf, text).expect("write config");
    };
    write(1000);
    let conf_arg = conf.to_str().expect("utf-8 path");
    let proxy = TestProxy::start_exact(&["--config", conf_arg]);
    assert!(
        proxy.wait_for_log("running as uid 65534", deadline_ms(5000)),
        "{}",
        proxy.log_text()
    );
    assert_unprivileged(proxy.pid(), NOBODY);

    write(1500);
    proxy.signal(libc::SIGHUP);
    assert!(
        wait_until(deadline_ms(3000), || proxy.count_log("configuration reloaded") == 1),
        "reload as nobody of a readable config:\n{}",
        proxy.log_text()
    );

    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    proxy.signal(libc::SIGHUP);
    assert!(
        wait_until(deadline_ms(3000), || proxy.count_log("reload failed") == 1),
        "reload of a config nobody cannot read:\n{}",
        proxy.log_text()
    );
    assert!(proxy.log_text().contains("Permission denied"), "{}", proxy.log_text());
    assert_answers(&proxy, "after-reloads");
}
