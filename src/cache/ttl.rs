//! The cache's TTL policy: how long an answer may be kept (RFC 2308 for
//! negative answers), where its TTL fields are, and ageing them on the way
//! out. The wire format only reads; deciding lifetimes is the cache's.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use crate::wire::name::{name_touches, read_name};
use crate::wire::query::walk;
use crate::wire::{u16_at, u32_at, Header, Rcode, HEADER_LEN, TYPE_OPT, TYPE_SOA};

/// Longest time an answer is cached, whatever its TTL says.
const MAX_CACHE_TTL: u32 = 86_400;

/// How long an answer may be cached, and where its TTL fields are (to age
/// them on the way out). `None` for answers that must not be cached:
/// truncated, SERVFAIL and other failures, or no TTL to go by.
/// Positive answers live for the smallest TTL of the answer section;
/// negative ones (NXDOMAIN, NODATA) for min(SOA TTL, SOA MINIMUM) of the
/// authority section's SOA (RFC 2308 §5).
pub fn cache_ttl(msg: &[u8], ttl_offsets: &mut Vec<u16>) -> Option<u32> {
    ttl_offsets.clear();
    let header = Header::new_checked(msg).ok()?;
    let rc = header.rcode();
    if header.truncated() || !matches!(rc, Rcode::NoError | Rcode::NxDomain) {
        return None;
    }
    let w = walk(msg).ok()?;
    if w.qdcount != 1 || w.opt.is_some_and(|o| o.ext_rcode != 0) {
        return None;
    }
    let (an, ns, ar) = (
        usize::from(header.ancount()),
        usize::from(header.nscount()),
        usize::from(header.arcount()),
    );
    let mut at = w.question_end;
    let (mut min_an, mut neg) = (None::<u32>, None::<u32>);
    let mut owners = [0usize; 64];
    let mut n_owners = 0;
    for i in 0..an + ns + ar {
        if let Some(slot) = owners.get_mut(n_owners) {
            *slot = at;
            n_owners += 1;
        } else {
            // More records than we check names for: not worth caching.
            return None;
        }
        let (_, end) = read_name(msg, at, true).ok()?;
        let rtype = u16_at(msg, end)?;
        let ttl = u32_at(msg, end + 4)?;
        let rdlen = u16_at(msg, end + 8)? as usize;
        if rtype != TYPE_OPT {
            ttl_offsets.push(u16::try_from(end + 4).ok()?);
        }
        if i < an {
            min_an = Some(min_an.map_or(ttl, |m| m.min(ttl)));
        } else if i < an + ns && rtype == TYPE_SOA {
            // MINIMUM is the last 4 bytes of the SOA RDATA.
            let minimum = u32_at(msg, end + 10 + rdlen.checked_sub(4)?)?;
            neg = Some(ttl.min(minimum));
        }
        at = end + 10 + rdlen;
    }
    let ttl = if an > 0 && rc == Rcode::NoError { min_an? } else { neg? };
    // Ageing rewrites TTL bytes: an answer whose names are compressed
    // against those bytes (no real server does that) would change its
    // names as it ages. Such answers are passed on but never stored.
    let starts = owners.get(..n_owners).unwrap_or_default();
    if std::iter::once(&HEADER_LEN)
        .chain(starts)
        .any(|&p| name_touches(msg, p, ttl_offsets))
    {
        return None;
    }
    (ttl > 0).then_some(ttl.min(MAX_CACHE_TTL))
}

/// Whether a cacheable answer is negative (RFC 2308: NXDOMAIN, or NODATA:
/// no answer records).
pub fn is_negative(msg: &[u8]) -> bool {
    Header::new_checked(msg).is_ok_and(|h| h.rcode() == Rcode::NxDomain || h.ancount() == 0)
}

/// Clamp every TTL at `offsets` into `min..=max`, so that ageing from the
/// stored values gives what the clamps promise.
pub fn clamp_ttls(msg: &mut [u8], offsets: &[u16], min: u32, max: u32) {
    for &off in offsets {
        let off = usize::from(off);
        if let Some(ttl) = u32_at(msg, off) {
            if let Some(b) = msg.get_mut(off..off + 4) {
                b.copy_from_slice(&ttl.clamp(min, max.max(min)).to_be_bytes());
            }
        }
    }
}

/// Set every TTL at `offsets` to `ttl` (a stale answer's, RFC 8767 §4).
pub fn set_ttls(msg: &mut [u8], offsets: &[u16], ttl: u32) {
    for &off in offsets {
        if let Some(b) = msg.get_mut(usize::from(off)..usize::from(off) + 4) {
            b.copy_from_slice(&ttl.to_be_bytes());
        }
    }
}

/// Subtract `elapsed` seconds from every TTL at `offsets`.
pub fn age_ttls(msg: &mut [u8], offsets: &[u16], elapsed: u32) {
    for &off in offsets {
        let off = usize::from(off);
        if let Some(ttl) = u32_at(msg, off) {
            if let Some(b) = msg.get_mut(off..off + 4) {
                b.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::wire::tests::query;

    fn answer_with(q: &[u8], an: &[(u16, u32, &[u8])], ns: &[(u16, u32, &[u8])]) -> Vec<u8> {
        let mut m = q.to_vec();
        m[2] |= 0x80;
        m[6..8].copy_from_slice(&(an.len() as u16).to_be_bytes());
        m[8..10].copy_from_slice(&(ns.len() as u16).to_be_bytes());
        for (rtype, ttl, rdata) in an.iter().chain(ns) {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&[0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    #[test]
    fn cache_lifetimes() {
        let q = query(1, "a.test", 1, None);
        let mut offs = Vec::new();
        let a = answer_with(&q, &[(1, 300, &[1, 2, 3, 4]), (1, 60, &[1, 2, 3, 5])], &[]);
        assert_eq!(cache_ttl(&a, &mut offs), Some(60));
        assert_eq!(offs.len(), 2);
        let mut aged = a.clone();
        age_ttls(&mut aged, &offs, 50);
        assert_eq!(u32_at(&aged, offs[0] as usize), Some(250));
        assert_eq!(u32_at(&aged, offs[1] as usize), Some(10));
        let mut soa = vec![0u8; 2 + 20];
        soa[..2].copy_from_slice(&[0xc0, 12]);
        soa.extend_from_slice(&30u32.to_be_bytes()); // MINIMUM
        let mut nx = answer_with(&q, &[], &[(TYPE_SOA, 900, &soa)]);
        nx[3] |= 3; // NXDOMAIN
        assert_eq!(cache_ttl(&nx, &mut offs), Some(30));
        let nodata = answer_with(&q, &[], &[]);
        assert_eq!(cache_ttl(&nodata, &mut offs), None);
        let mut fail = a.clone();
        fail[3] = (fail[3] & 0xf0) | 2; // SERVFAIL
        assert_eq!(cache_ttl(&fail, &mut offs), None);
        let mut tc = a.clone();
        tc[2] |= 0x02;
        assert_eq!(cache_ttl(&tc, &mut offs), None);
        let zero = answer_with(&q, &[(1, 0, &[1, 2, 3, 4])], &[]);
        assert_eq!(cache_ttl(&zero, &mut offs), None);
    }
}
