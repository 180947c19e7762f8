//! dotproxy: plain DNS over UDP and TCP in, DNS over TLS (RFC 7858) out.
//!
//! ```text
//!  client ──UDP──▶ listen::udp ─┐                         ┌─▶ upstream::conn ══TLS══▶ resolver
//!  client ══TCP══▶ listen::tcp ─┤                         │    (rustls, framing, IDs)
//!                               ▼                         │
//!                    wire::query::parse_query ──▶ cache ──┤ hit: answered at once
//!                               │ miss                    │
//!                               ▼                         │
//!                     queries (admit, merge) ──▶ upstream::pool (route by zone, pick, send)
//!                               ▲                         │
//!  client ◀── deliver ◀── wire::response (check, restore) ◀┘ answer by rewritten ID
//! ```
//!
//! One single-threaded mio loop ([`proxy`]) owns every socket and drives
//! the rooms below; each room owns its state privately and answers with
//! outcomes, never closing another room's objects:
//!
//! | room | owns |
//! |---|---|
//! | [`config`] | flags and the config file, parsed and checked |
//! | [`wire`] | the DNS format: checked views, one parse per query |
//! | [`framing`] | the 2-byte length framing of DNS over TCP and TLS |
//! | [`token`] | `mio::Token` ⇄ what an event is for |
//! | [`timers`] | one heap of deadlines for every room |
//! | [`listen`] | UDP and TCP listeners, TCP clients and their admission |
//! | [`upstream`] | DoT connections, the pool: health, selection, zones |
//! | [`queries`] | the in-flight table: admission, merging, deadlines |
//! | [`cache`] | answers and their TTL policy |
//! | [`failure`] | what each failure answers (RCODE, Extended DNS Error) |
//! | [`http`], [`metrics`] | `/metrics` and `/healthz` |
//! | [`notice`] | rate-limited warnings |
//! | [`privileges`] | `--user`: leaving root once bound |
//! | [`systemd`] | sockets passed at start, readiness told back |
//!
//! Invariants that hold across rooms:
//! - data flows one way: the loop calls rooms, rooms never call the loop;
//! - time is passed in: the loop reads the clock once per turn and every
//!   room works with that `now` (so rooms are unit-tested with synthetic
//!   instants);
//! - every reference that can outlive its target (a query's slot, a
//!   client's, a connection's) carries a generation, so a late answer or
//!   timer is dropped, never misdelivered;
//! - objects close in the loop's reap step only, after every handler of
//!   the turn has run, and a closed upstream connection's unanswered
//!   queries are re-sent once, routed anew by their names.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod config;
pub mod failure;
pub mod framing;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod notice;
pub mod privileges;
pub mod proxy;
pub mod queries;
pub mod systemd;
pub mod timers;
pub mod token;
pub mod upstream;
pub mod wire;
