//! Test harness for dotproxy's black-box integration tests.
//!
//! - `certs`: throw-away CA and leaves (rcgen), rustls server configs.
//! - `upstream`: scriptable DNS-over-TLS upstream with recording.
//! - `proxy`: runs the real binary, parses its listening addresses.
//! - `client`: UDP / framed TCP DNS clients with deadlines.
//! - `tls_client`: a DoT client, to self-test the upstream.
//! - `dns`: query builder, message parser, canned answers.
//! - `wire`: hand-built queries/answers (OPT options, exact sizes, EDE).
//! - `metrics`: /metrics scraping, /proc CPU and memory, quiescence check.
//! - `net`: source-bound connects, RST, urgent data, a raw TCP server.
//! - `plain`: a plain DNS-over-TCP server, for `--forward ZONE=plain:`.

// Not every helper is used by every test (the harness is meant to grow).
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod client;
pub mod dns;
pub mod metrics;
pub mod net;
pub mod plain;
pub mod proxy;
pub mod tls_client;
pub mod upstream;
pub mod wire;

pub use certs::{Leaf, TestCa, Validity};
pub use client::{
    deadline_ms, tcp_exchange, udp_exchange, udp_exchange_on, udp_recv, udp_socket, wait_until, TcpClient, TcpEvent,
};
pub use dns::{query, query_edns, Message, QueryBuilder};
pub use metrics::{assert_serving, quiescent, quiescent_idle, Metrics};
pub use proxy::{run_to_exit, RunOutput, TestProxy};
pub use upstream::{Action, CloseKind, HookCtx, Script, Stats, TestUpstream};

/// The name every standard upstream certificate is issued for.
pub const NAME: &str = "dns.test";

/// A CA, one upstream with a valid `dns.test` leaf and a proxy pointed at
/// it. Fields drop in order: proxy first, then upstream, then the CA files.
pub struct Setup {
    pub proxy: TestProxy,
    pub upstream: TestUpstream,
    pub ca: TestCa,
}

impl Setup {
    /// `--timeout 1000`.
    pub fn new(script: Script) -> Setup {
        Setup::with_timeout(script, 1000)
    }

    pub fn with_timeout(script: Script, timeout_ms: u64) -> Setup {
        Setup::with_args(script, timeout_ms, &[])
    }

    pub fn with_args(script: Script, timeout_ms: u64, extra: &[&str]) -> Setup {
        let ca = TestCa::new();
        let upstream = TestUpstream::for_name(&ca, NAME, script);
        let proxy = TestProxy::for_upstream(&ca, &upstream, NAME, timeout_ms, extra);
        Setup { proxy, upstream, ca }
    }

    /// Like `with_args`, plus `--metrics 127.0.0.1:0`; returns the setup
    /// and the proxy's fd baseline for [`quiescent`].
    pub fn observed(script: Script, timeout_ms: u64, extra: &[&str]) -> (Setup, usize) {
        let mut args = vec!["--metrics", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let s = Setup::with_args(script, timeout_ms, &args);
        let fds = s.proxy.baseline_fds();
        (s, fds)
    }
}

/// [`TestProxy::over`] plus `--metrics 127.0.0.1:0`; returns the proxy and
/// its fd baseline for [`quiescent`].
pub fn observed_over(ca: &TestCa, upstreams: &[String], timeout_ms: u64) -> (TestProxy, usize) {
    let p = TestProxy::over(ca, upstreams, timeout_ms, &["--metrics", "127.0.0.1:0"]);
    let fds = p.baseline_fds();
    (p, fds)
}

/// A 127.0.0.1 port with nothing listening (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}
