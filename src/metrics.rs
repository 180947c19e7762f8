//! The Prometheus text exposition (format 0.0.4) of `/metrics`, rendered
//! from a read-only view of the rooms: rendering never changes state.

use std::fmt::Write as _;
use std::time::Instant;

use crate::cache::Cache;
use crate::upstream::pool::{Pool, LATENCY_BUCKETS};
use crate::wire::Rcode;

/// Counters of the query pipeline, logged at exit and exported.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub queries_udp: u64,
    pub queries_tcp: u64,
    /// Of `queries_tcp`, those that came over TLS (`--listen-tls`).
    pub queries_tls: u64,
    pub answers: u64,
    pub servfail: u64,
    pub timeouts: u64,
    pub rejected: u64,
    /// Client messages dropped without an answer.
    pub dropped: Dropped,
    pub truncated: u64,
    pub retried: u64,
    /// Upstream answers that matched no query.
    pub upstream_dropped: UpstreamDropped,
    pub merged: u64,
    pub refused_busy: u64,
    pub tcp_refused: u64,
    /// DNS-over-TLS client handshakes: (completed, failed).
    pub tls_handshakes: (u64, u64),
    /// TCP clients closed by the proxy for what they did, by reason.
    pub tcp_closed: TcpClosed,
    /// Answers sent to clients, by 4-bit RCODE.
    pub rcodes: [u64; 16],
}

#[derive(Debug, Default, Clone)]
pub struct Dropped {
    pub malformed: u64,
    pub access_list: u64,
    pub udp_send_queue_full: u64,
}

#[derive(Debug, Default, Clone)]
pub struct TcpClosed {
    /// No query completed and nothing pending for --tcp-idle-timeout (a
    /// slow or abandoned query included).
    pub idle: u64,
    /// Idle, to admit a newcomer at a connection limit.
    pub evicted: u64,
    /// Pending answers made no progress for the idle time.
    pub stopped_reading: u64,
    /// Unread answers over the per-connection or total bound.
    pub too_slow: u64,
}

#[derive(Debug, Default, Clone)]
pub struct UpstreamDropped {
    pub unknown_id: u64,
    pub wrong_question: u64,
    pub late: u64,
}

/// What the metrics are rendered from.
pub struct View<'a> {
    pub stats: &'a Stats,
    pub pool: &'a Pool,
    pub cache: Option<&'a Cache>,
    pub inflight: usize,
    pub tcp_clients: usize,
    pub now: Instant,
}

/// Prometheus text exposition helpers (format 0.0.4).
pub struct Exposition(pub String);

impl Exposition {
    /// Counters without labels: a header and one sample each.
    pub fn counters(&mut self, list: &[(&str, &str, u64)]) {
        for &(name, help, n) in list {
            self.header(name, "counter", help);
            self.sample(name, &[], n);
        }
    }

    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// The whole exposition.
pub fn render(v: &View<'_>) -> String {
    let mut e = Exposition(String::with_capacity(8192));
    client_side(&mut e, v.stats);
    upstream_answers(&mut e, v.stats);
    if let Some(c) = v.cache {
        let s = c.stats();
        e.header("dotproxy_cache_lookups_total", "counter", "Cache lookups, by result.");
        e.sample("dotproxy_cache_lookups_total", &[("result", "hit")], s.hits);
        e.sample("dotproxy_cache_lookups_total", &[("result", "miss")], s.misses);
        e.header("dotproxy_cache_entries", "gauge", "Answers in the cache.");
        e.sample("dotproxy_cache_entries", &[], c.len());
        e.header(
            "dotproxy_cache_bytes",
            "gauge",
            "Bytes the cache holds (what --cache-memory bounds).",
        );
        e.sample("dotproxy_cache_bytes", &[], c.bytes());
        let counters: [(&str, &str, u64); 3] = [
            (
                "dotproxy_cache_stale_answers_total",
                "Expired answers served because no upstream answered in time (RFC 8767).",
                s.stale_served,
            ),
            (
                "dotproxy_cache_prefetches_total",
                "Entries refreshed upstream before they expired.",
                s.prefetches,
            ),
            (
                "dotproxy_cache_evictions_total",
                "Entries evicted to make room.",
                s.evictions,
            ),
        ];
        e.counters(&counters);
        e.header(
            "dotproxy_merged_total",
            "counter",
            "Queries answered by an identical query already in flight.",
        );
        e.sample("dotproxy_merged_total", &[], v.stats.merged);
    }
    e.header("dotproxy_inflight", "gauge", "Queries waiting for an answer.");
    e.sample("dotproxy_inflight", &[], v.inflight);
    e.header("dotproxy_tcp_clients", "gauge", "Open TCP client connections.");
    e.sample("dotproxy_tcp_clients", &[], v.tcp_clients);
    upstreams(&mut e, v.pool, v.now);
    e.0
}

fn client_side(e: &mut Exposition, s: &Stats) {
    e.header(
        "dotproxy_queries_total",
        "counter",
        "Queries received from clients, by transport.",
    );
    e.sample("dotproxy_queries_total", &[("transport", "udp")], s.queries_udp);
    e.sample(
        "dotproxy_queries_total",
        &[("transport", "tcp")],
        s.queries_tcp - s.queries_tls,
    );
    e.sample("dotproxy_queries_total", &[("transport", "tls")], s.queries_tls);
    e.header(
        "dotproxy_answers_total",
        "counter",
        "Answers sent to clients, by RCODE.",
    );
    for (rc, &n) in s.rcodes.iter().enumerate() {
        if n > 0 || rc <= 5 {
            e.sample("dotproxy_answers_total", &[("rcode", Rcode::from(rc as u16).name())], n);
        }
    }
    let simple: [(&str, &str, u64); 3] = [
        (
            "dotproxy_truncated_total",
            "UDP answers sent truncated (TC=1).",
            s.truncated,
        ),
        (
            "dotproxy_timeouts_total",
            "Queries that reached their deadline (answered SERVFAIL).",
            s.timeouts,
        ),
        (
            "dotproxy_retries_total",
            "Queries re-sent after their upstream connection closed.",
            s.retried,
        ),
    ];
    e.counters(&simple);
    let name = "dotproxy_dropped_total";
    e.header(name, "counter", "Client messages dropped without an answer, by reason.");
    e.sample(name, &[("reason", "malformed")], s.dropped.malformed);
    e.sample(name, &[("reason", "access_list")], s.dropped.access_list);
    e.sample(
        name,
        &[("reason", "udp_send_queue_full")],
        s.dropped.udp_send_queue_full,
    );
    let name = "dotproxy_rejected_total";
    e.header(
        name,
        "counter",
        "Queries answered locally without forwarding, by reason.",
    );
    e.sample(name, &[("reason", "invalid")], s.rejected);
    e.sample(name, &[("reason", "busy")], s.refused_busy);
    let name = "dotproxy_tcp_connections_refused_total";
    e.header(
        name,
        "counter",
        "TCP client connections closed at once (limit, none idle).",
    );
    e.sample(name, &[], s.tcp_refused);
    let name = "dotproxy_tcp_connections_closed_total";
    e.header(
        name,
        "counter",
        "TCP client connections closed by the proxy, by reason.",
    );
    e.sample(name, &[("reason", "idle")], s.tcp_closed.idle);
    e.sample(name, &[("reason", "evicted")], s.tcp_closed.evicted);
    e.sample(name, &[("reason", "stopped_reading")], s.tcp_closed.stopped_reading);
    e.sample(name, &[("reason", "too_slow")], s.tcp_closed.too_slow);
    let name = "dotproxy_tls_handshakes_total";
    e.header(
        name,
        "counter",
        "DNS-over-TLS client handshakes, by outcome (failed: no common version or cipher, no or a wrong client certificate with --client-ca, garbage).",
    );
    e.sample(name, &[("result", "ok")], s.tls_handshakes.0);
    e.sample(name, &[("result", "failed")], s.tls_handshakes.1);
}

fn upstream_answers(e: &mut Exposition, s: &Stats) {
    let name = "dotproxy_upstream_answers_dropped_total";
    e.header(name, "counter", "Upstream answers that matched no query, by reason.");
    let d = &s.upstream_dropped;
    e.sample(name, &[("reason", "unknown_id")], d.unknown_id);
    e.sample(name, &[("reason", "wrong_question")], d.wrong_question);
    e.sample(name, &[("reason", "late")], d.late);
}

fn upstreams(e: &mut Exposition, pool: &Pool, now: Instant) {
    type Get = fn(&crate::upstream::pool::UpstreamView<'_>) -> f64;
    let per_upstream: [(&str, &str, &str, Get); 7] = [
        (
            "dotproxy_upstream_up",
            "gauge",
            "1 unless the upstream is in back-off after a failure.",
            |u| f64::from(u8::from(u.up)),
        ),
        (
            "dotproxy_upstream_pipelining",
            "gauge",
            "1 unless the upstream is sent one query per connection (seen not to pipeline).",
            |u| f64::from(u8::from(u.pipelining)),
        ),
        (
            "dotproxy_upstream_connections",
            "gauge",
            "Open connections to the upstream.",
            |u| u.connections as f64,
        ),
        (
            "dotproxy_upstream_connects_total",
            "counter",
            "Connection attempts to the upstream.",
            |u| u.stats.connects as f64,
        ),
        (
            "dotproxy_upstream_failures_total",
            "counter",
            "Failed connections (connect, TLS, certificate, stall).",
            |u| u.stats.failures as f64,
        ),
        (
            "dotproxy_upstream_resumed_total",
            "counter",
            "TLS handshakes that resumed a session.",
            |u| u.stats.resumed as f64,
        ),
        (
            "dotproxy_upstream_inflight",
            "gauge",
            "Queries in flight to the upstream.",
            |u| u.inflight as f64,
        ),
    ];
    for (name, kind, help, get) in per_upstream {
        e.header(name, kind, help);
        for u in pool.upstreams(now) {
            e.sample(name, &[("upstream", u.label)], get(&u));
        }
    }
    let name = "dotproxy_upstream_latency_seconds";
    e.header(name, "histogram", "Time from sending a query upstream to its answer.");
    let (bucket, sum, count) = (format!("{name}_bucket"), format!("{name}_sum"), format!("{name}_count"));
    for u in pool.upstreams(now) {
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(u.stats.latency_buckets) {
            cumulative += n;
            e.sample(&bucket, &[("upstream", u.label), ("le", &le.to_string())], cumulative);
        }
        e.sample(&bucket, &[("upstream", u.label), ("le", "+Inf")], u.stats.answers);
        e.sample(&sum, &[("upstream", u.label)], u.stats.latency_sum);
        e.sample(&count, &[("upstream", u.label)], u.stats.answers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let mut e = Exposition(String::new());
        e.header("x_total", "counter", "Help.");
        e.sample("x_total", &[("a", "q\"u\\o")], 3);
        e.sample("x_total", &[], 1.5);
        assert_eq!(
            e.0,
            "# HELP x_total Help.\n# TYPE x_total counter\nx_total{a=\"q\\\"u\\\\o\"} 3\nx_total 1.5\n"
        );
    }
}
