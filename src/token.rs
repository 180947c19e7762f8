//! The one mapping between `mio::Token` and what a readiness event is for.
//!
//! The low two bits say which kind of object the rest indexes: fixed
//! sockets (signals, listeners, the metrics listener), TCP clients,
//! upstream connections, HTTP connections. Slab keys are reused, so the
//! owners check generations before acting on one; an unknown token is
//! logged and ignored, never unwrapped.

use mio::Token;

const TAG_FIXED: usize = 0;
const TAG_CLIENT: usize = 1;
const TAG_UPSTREAM: usize = 2;
const TAG_HTTP: usize = 3;
const SIGNALS: usize = 0;
const UDP_BASE: usize = 1;
const METRICS: usize = 1 << 15;
const TCP_BASE: usize = 1 << 16;
/// Listeners per kind; far more than anyone configures.
pub const MAX_LISTENERS: usize = METRICS - UDP_BASE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Signals,
    Udp(usize),
    TcpListener(usize),
    Metrics,
    Client(usize),
    Upstream(usize),
    Http(usize),
}

impl Source {
    pub fn token(self) -> Token {
        let (tag, index) = match self {
            Source::Signals => (TAG_FIXED, SIGNALS),
            Source::Udp(i) => (TAG_FIXED, UDP_BASE + i),
            Source::Metrics => (TAG_FIXED, METRICS),
            Source::TcpListener(i) => (TAG_FIXED, TCP_BASE + i),
            Source::Client(k) => (TAG_CLIENT, k),
            Source::Upstream(k) => (TAG_UPSTREAM, k),
            Source::Http(k) => (TAG_HTTP, k),
        };
        Token((index << 2) | tag)
    }

    pub fn decode(token: Token) -> Option<Source> {
        let index = token.0 >> 2;
        Some(match token.0 & 3 {
            TAG_CLIENT => Source::Client(index),
            TAG_UPSTREAM => Source::Upstream(index),
            TAG_HTTP => Source::Http(index),
            _ => match index {
                SIGNALS => Source::Signals,
                METRICS => Source::Metrics,
                i if i >= TCP_BASE => Source::TcpListener(i - TCP_BASE),
                i if (UDP_BASE..METRICS).contains(&i) => Source::Udp(i - UDP_BASE),
                _ => return None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_round_trips() {
        for s in [
            Source::Signals,
            Source::Metrics,
            Source::Udp(0),
            Source::Udp(MAX_LISTENERS - 1),
            Source::TcpListener(0),
            Source::TcpListener(7),
            Source::Client(0),
            Source::Client(123_456),
            Source::Upstream(3),
            Source::Http(15),
        ] {
            assert_eq!(Source::decode(s.token()), Some(s), "{s:?}");
        }
    }
}
