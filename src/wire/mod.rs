//! The DNS wire format, as far as a forwarder needs it (RFC 1035 §4.1).
//!
//! dotproxy never re-encodes a message: it checks a client query once
//! ([`query::parse_query`], giving a [`Query`] that every later stage
//! reads instead of the bytes), forwards its bytes unchanged except for the
//! ID and the OPT record, checks the upstream's answer
//! ([`response::parse_response`]) and, when it must, builds a short answer
//! of its own ([`build`]). Every accessor works on bytes a peer controls:
//! nothing indexes without a bound check, and every name walk has a hop
//! limit.
//!
//! - [`header`]: the checked [`Header`] view and [`Rcode`].
//! - [`name`]: names, canonical form, zones.
//! - [`query`]: one walk over a message; a client query checked once.
//! - [`response`]: an upstream answer checked against its query and made
//!   fit for the client.
//! - [`build`]: answers of our own, Extended DNS Errors, padding.
//!
//! What an answer may be cached for is the cache's policy
//! (`crate::cache::ttl`), not the wire format's.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

pub mod build;
pub mod header;
pub mod name;
pub mod query;
pub mod response;

#[cfg(test)]
pub(crate) mod tests;

pub use build::{Ede, EdeCode};
pub use header::{Header, Rcode};
pub use name::Name;
pub use query::{Edns, OptRecord, Query, Reject, Walk};
pub use response::{BadResponse, HopInfo};

pub const HEADER_LEN: usize = 12;
/// Largest name in wire form (RFC 1035 §2.3.4).
pub const MAX_NAME: usize = 255;
/// Pointer hops allowed while reading one name; a legitimate name never
/// needs more than one hop per label.
pub(crate) const MAX_HOPS: usize = 128;

pub const TYPE_SOA: u16 = 6;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;

/// EDNS option codes that describe one hop, not the answer.
pub const OPT_TCP_KEEPALIVE: u16 = 11;
pub const OPT_PADDING: u16 = 12;
pub const OPT_EDE: u16 = 15;
pub const OPT_COOKIE: u16 = 10;
/// EDNS Client Subnet (RFC 7871): the client's network, never forwarded
/// (privacy; and an answer for one subnet must not be cached for another).
pub const OPT_CLIENT_SUBNET: u16 = 8;

/// The UDP payload size dotproxy advertises in its own OPT records and the
/// largest UDP answer it sends (DNS Flag Day 2020).
pub const MAX_UDP: u16 = 1232;

/// Byte offsets of the header fields.
pub(crate) mod field {
    pub const ID: usize = 0;
    pub const FLAGS_HI: usize = 2;
    pub const FLAGS_LO: usize = 3;
    pub const QDCOUNT: usize = 4;
    pub const ANCOUNT: usize = 6;
    pub const NSCOUNT: usize = 8;
    pub const ARCOUNT: usize = 10;
}

pub(crate) fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    let b = msg.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(b.try_into().ok()?))
}

/// Overwrite a big-endian u16; a no-op out of bounds (callers only write
/// where they just wrote or checked).
pub(crate) fn put_u16(msg: &mut [u8], at: usize, v: u16) {
    if let Some(b) = msg.get_mut(at..at.saturating_add(2)) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

pub(crate) fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    let b = msg.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The message ID, or `None` for fewer than two bytes (a framed message
/// always has a header; this is for bytes of unknown length).
pub fn id(msg: &[u8]) -> Option<u16> {
    u16_at(msg, field::ID)
}

/// Why a name or message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The message ends before the structure does.
    Short,
    /// A label longer than 63, a name longer than 255, a reserved label type.
    BadName,
    /// A compression pointer that points forward or loops.
    BadPointer,
    /// More than one OPT, or an OPT that is not at the root.
    BadOpt,
    /// Bytes left after the last record.
    Trailing,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireError::Short => "message too short",
            WireError::BadName => "bad name",
            WireError::BadPointer => "bad compression pointer",
            WireError::BadOpt => "bad OPT record",
            WireError::Trailing => "trailing bytes",
        })
    }
}

/// Walk the options of an OPT record's RDATA: `(code, data)` pairs.
/// `Err` when an option runs past the record.
pub(crate) fn options(rdata: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), WireError>> {
    let mut rest = rdata;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let item = (|| {
            let code = u16_at(rest, 0).ok_or(WireError::Short)?;
            let len = u16_at(rest, 2).ok_or(WireError::Short)? as usize;
            let data = rest.get(4..4 + len).ok_or(WireError::Short)?;
            rest = rest.get(4 + len..).unwrap_or_default();
            Ok((code, data))
        })();
        if item.is_err() {
            rest = &[];
        }
        Some(item)
    })
}

/// Options that describe one hop (RFC 7828 §3.3.2, RFC 7830 §3): they are
/// never passed from one side of the proxy to the other. Cookies (RFC 7873)
/// are a contract between a client and the server it talks to; passed on,
/// the upstream's answer would carry one client's cookie to another
/// through the cache or a merged query.
pub fn hop_by_hop(code: u16) -> bool {
    code == OPT_PADDING || code == OPT_TCP_KEEPALIVE || code == OPT_COOKIE
}
