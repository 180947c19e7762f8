//! Looking at a running proxy from outside: its Prometheus endpoint
//! (`--metrics 127.0.0.1:0`), its CPU time and memory in /proc, and the
//! quiescence check every fault test ends with.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::client::{deadline_ms, udp_exchange, wait_until};
use super::dns::{self, Message};
use super::proxy::TestProxy;

/// One scrape of `/metrics`: every sample as (name, labels, value).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    #[allow(clippy::type_complexity)]
    pub samples: Vec<(String, Vec<(String, String)>, f64)>,
}

impl Metrics {
    /// Parses the Prometheus text format (comments skipped; label values
    /// without escaped quotes, which is all dotproxy writes).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match key.split_once('{') {
                None => (key.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let inner = rest.trim_end_matches('}');
                    let labels = inner
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            Some((k.to_string(), v.trim_matches('"').to_string()))
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// Whether a sample with this name exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// Sum of every sample of `name` (0 if absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples.iter().filter(|(n, _, _)| n == name).map(|s| s.2).sum()
    }

    /// Sum of the samples of `name` whose label `key` is `value`.
    pub fn labeled(&self, name: &str, key: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && l.iter().any(|(k, v)| k == key && v == value))
            .map(|s| s.2)
            .sum()
    }

    /// `dotproxy_upstream_answers_dropped_total{reason=...}`.
    pub fn upstream_dropped(&self, reason: &str) -> f64 {
        self.labeled("dotproxy_upstream_answers_dropped_total", "reason", reason)
    }

    /// `dotproxy_dropped_total{reason=...}`.
    pub fn dropped(&self, reason: &str) -> f64 {
        self.labeled("dotproxy_dropped_total", "reason", reason)
    }

    /// `dotproxy_rejected_total{reason=...}`.
    pub fn rejected(&self, reason: &str) -> f64 {
        self.labeled("dotproxy_rejected_total", "reason", reason)
    }

    /// `dotproxy_answers_total{rcode=...}`.
    pub fn answers(&self, rcode: &str) -> f64 {
        self.labeled("dotproxy_answers_total", "rcode", rcode)
    }

    pub fn inflight(&self) -> f64 {
        self.sum("dotproxy_inflight")
    }

    pub fn tcp_clients(&self) -> f64 {
        self.sum("dotproxy_tcp_clients")
    }

    pub fn upstream_inflight(&self) -> f64 {
        self.sum("dotproxy_upstream_inflight")
    }

    pub fn upstream_connections(&self) -> f64 {
        self.sum("dotproxy_upstream_connections")
    }
}

/// A raw HTTP exchange's result.
#[derive(Clone, Debug)]
pub struct HttpReply {
    /// 0 when no status line came back.
    pub status: u16,
    pub head: String,
    pub body: String,
    /// How long until the server closed (or the deadline).
    pub elapsed: Duration,
    /// The server closed the connection before the deadline.
    pub closed: bool,
}

/// Sends `request` as is to `addr` and reads until the server closes or
/// `deadline`.
pub fn http_raw(addr: SocketAddr, request: &[u8], deadline: Instant) -> HttpReply {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to metrics");
    s.set_write_timeout(Some(Duration::from_secs(2))).ok();
    // The server may answer (431) and close before reading all of a big
    // request; a failed write is then fine.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut closed = false;
    // Bounded by the deadline.
    while Instant::now() < deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).ok();
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    HttpReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
        elapsed: t0.elapsed(),
        closed,
    }
}

/// `/proc/PID/stat` utime + stime, in clock ticks (usually 10 ms).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 overall, i.e. 12 and 13 after the ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// A field of /proc/PID/status in kB (e.g. "VmHWM", "VmRSS").
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl TestProxy {
    /// The metrics address from the log line `metrics on http://ADDR/metrics`
    /// (waits up to 5 s for it). Panics if the proxy runs without
    /// `--metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        // Cached by pid: the log can grow long.
        // Keyed by pid and DNS address, so a recycled pid cannot alias.
        static CACHE: std::sync::Mutex<Vec<((u32, SocketAddr), SocketAddr)>> = std::sync::Mutex::new(Vec::new());
        let pid = (self.pid(), self.udp_addr());
        if let Some(&(_, a)) = CACHE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(p, _)| *p == pid)
        {
            return a;
        }
        let mut found = None;
        wait_until(deadline_ms(5000), || {
            found = self.logs().iter().find_map(|l| {
                let rest = &l[l.find("metrics on http://")? + "metrics on http://".len()..];
                rest.split('/').next()?.parse::<SocketAddr>().ok()
            });
            found.is_some()
        });
        let a = found.unwrap_or_else(|| panic!("no 'metrics on http://' line; log:\n{}", self.log_text()));
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 256 {
            cache.clear();
        }
        cache.push((pid, a));
        a
    }

    /// `GET path` on the metrics endpoint.
    pub fn http_get(&self, path: &str) -> HttpReply {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        http_raw(self.metrics_addr(), req.as_bytes(), deadline_ms(3000))
    }

    /// One scrape of `/metrics` (panics unless it is a 200).
    pub fn metrics(&self) -> Metrics {
        let r = self.http_get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}\n{}", r.head, r.body);
        Metrics::parse(&r.body)
    }

    /// Polls `/metrics` (every 20 ms) until `f` holds or the deadline passes;
    /// returns the last scrape and whether `f` held.
    pub fn wait_metrics(&self, deadline: Instant, f: impl Fn(&Metrics) -> bool) -> (Metrics, bool) {
        // Bounded by the deadline.
        loop {
            let m = self.metrics();
            if f(&m) {
                return (m, true);
            }
            if Instant::now() >= deadline {
                return (m, false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time used so far (utime + stime), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }

    /// Peak resident set (VmHWM) in kB.
    pub fn vm_hwm_kb(&self) -> u64 {
        status_kb(self.pid(), "VmHWM")
    }

    /// Current resident set (VmRSS) in kB.
    pub fn vm_rss_kb(&self) -> u64 {
        status_kb(self.pid(), "VmRSS")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// The fd count once the loop is known to be running (after a first
    /// scrape): the baseline for [`quiescent`].
    pub fn baseline_fds(&self) -> usize {
        let _ = self.metrics();
        self.open_fds()
    }
}

/// The check every fault test ends with: within 3 s, nothing in
/// flight (`dotproxy_inflight`, per-upstream in-flight), no TCP client left,
/// open fds back to `baseline_fds` plus the upstream connections the proxy
/// reports plus 2; then a last UDP query is answered NOERROR.
pub fn quiescent(proxy: &TestProxy, baseline_fds: usize) {
    quiescent_idle(proxy, baseline_fds);
    assert_serving(proxy);
}

/// [`quiescent`] without the final query (for a proxy whose upstream is
/// meant to be down).
pub fn quiescent_idle(proxy: &TestProxy, baseline_fds: usize) {
    let mut last = String::new();
    let ok = wait_until(deadline_ms(3000), || {
        let m = proxy.metrics();
        let fds = proxy.open_fds();
        let allowed = baseline_fds + m.upstream_connections() as usize + 2;
        last = format!(
            "inflight {}, upstream inflight {}, tcp clients {}, fds {fds} (baseline {baseline_fds}, allowed {allowed})",
            m.inflight(),
            m.upstream_inflight(),
            m.tcp_clients()
        );
        m.inflight() == 0.0 && m.upstream_inflight() == 0.0 && m.tcp_clients() == 0.0 && fds <= allowed
    });
    assert!(ok, "not quiescent after 3 s: {last}");
}

/// A fresh UDP query is answered NOERROR with its own ID and name. A
/// fault test may leave the upstream in its first back-off (250 ms), so a
/// SERVFAIL is retried every 100 ms for up to 3 s.
pub fn assert_serving(proxy: &TestProxy) {
    static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let name = super::upstream::QUIESCENCE_NAME;
    let deadline = deadline_ms(3000);
    // Bounded by the deadline (and 30 tries).
    for _ in 0..30 {
        let id = 0x7100 + N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 0x100;
        let r = udp_exchange(proxy.udp_addr(), &dns::query(id, name), deadline_ms(5000))
            .unwrap_or_else(|| panic!("final query: no answer; log tail:\n{}", log_tail(proxy)));
        let m = Message::must(&r);
        assert_eq!(m.id, id, "final query: ID");
        assert_eq!(m.qname(), name, "final query: name");
        if m.rcode == dns::RCODE_SERVFAIL && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert_eq!(
            m.rcode,
            dns::RCODE_NOERROR,
            "final query: rcode; log tail:\n{}",
            log_tail(proxy)
        );
        return;
    }
    panic!("final query: SERVFAIL for 3 s; log tail:\n{}", log_tail(proxy));
}

fn log_tail(proxy: &TestProxy) -> String {
    let logs = proxy.logs();
    logs[logs.len().saturating_sub(30)..].join("\n")
}
