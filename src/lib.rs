//! dotproxy: plain DNS over UDP and TCP in, DNS over TLS (RFC 7858) out.
//!
//! One single-threaded mio loop ([`proxy`]) owns every socket. Client
//! queries are checked ([`dns`]), given a fresh random ID on one of a few
//! persistent, pipelined TLS connections ([`upstream`], [`id_table`]), and
//! the answers are matched back by that ID and question, restored to the
//! client's ID and returned, truncated for UDP clients when they must be.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod client;
pub mod config;
pub mod dns;
pub mod framing;
pub mod http;
pub mod id_table;
pub mod proxy;
pub mod tls;
pub mod upstream;
