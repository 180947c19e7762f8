//! The upstream leg: DNS over TLS (RFC 7858) to the configured resolvers.
//!
//! - [`conn`]: one connection's state machine (TCP, rustls, framing, IDs).
//! - [`ids`]: the rewritten-ID table of one connection.
//! - [`pool`]: the upstreams, their health, selection, zones and reloads;
//!   owns the connections.
//! - [`tls`]: the rustls client configurations (roots, pins).

pub mod conn;
pub mod ids;
pub mod pool;
pub mod tls;

pub use conn::{Answer, CloseReason};
pub use pool::{Orphan, Pool};
