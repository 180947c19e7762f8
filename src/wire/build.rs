//! Messages dotproxy writes itself: its own answers (errors, truncation),
//! their Extended DNS Errors (RFC 8914), and the padded query it sends
//! upstream (RFC 8467).

use super::header::{CD, QR, RA, RD, TC};
use super::{
    field, hop_by_hop, options, put_u16, u16_at, Query, Rcode, MAX_UDP, OPT_CLIENT_SUBNET, OPT_EDE, OPT_PADDING,
    OPT_TCP_KEEPALIVE, TYPE_OPT,
};

/// The INFO-CODEs dotproxy attaches to its own answers (RFC 8914 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdeCode {
    Other,
    /// RFC 8914 §4.4: an answer served from expired data (RFC 8767).
    StaleAnswer,
    Prohibited,
    NotSupported,
    NoReachableAuthority,
    NetworkError,
}

impl From<EdeCode> for u16 {
    fn from(c: EdeCode) -> u16 {
        match c {
            EdeCode::Other => 0,
            EdeCode::StaleAnswer => 3,
            EdeCode::Prohibited => 18,
            EdeCode::NotSupported => 21,
            EdeCode::NoReachableAuthority => 22,
            EdeCode::NetworkError => 23,
        }
    }
}

/// One Extended DNS Error: a code and a short EXTRA-TEXT for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ede {
    pub code: EdeCode,
    pub text: &'static str,
}

impl Ede {
    pub const fn new(code: EdeCode, text: &'static str) -> Ede {
        Ede { code, text }
    }

    /// The same error without its text: the code alone still tells a
    /// resolver what happened, in 6 bytes instead of up to 70.
    pub const fn code_only(self) -> Ede {
        Ede {
            code: self.code,
            text: "",
        }
    }
}

/// Append an OPT record: our UDP size, version 0, the DO bit as given, and
/// optionally one EDE option (RFC 8914).
fn push_opt(out: &mut Vec<u8>, ext_rcode: u8, dnssec_ok: bool, ede: Option<Ede>) {
    out.push(0); // root name
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&MAX_UDP.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
    match ede {
        None => out.extend_from_slice(&[0, 0]),
        Some(Ede { code, text }) => {
            let text = text.as_bytes().get(..text.len().min(64)).unwrap_or_default();
            let optlen = 2 + text.len();
            out.extend_from_slice(&((4 + optlen) as u16).to_be_bytes());
            out.extend_from_slice(&OPT_EDE.to_be_bytes());
            out.extend_from_slice(&(optlen as u16).to_be_bytes());
            out.extend_from_slice(&u16::from(code).to_be_bytes());
            out.extend_from_slice(text);
        }
    }
}

/// Build dotproxy's own answer to `query` into `out`: the client's ID,
/// opcode, RD and CD; the question if `info` says it was readable; an OPT
/// only if the client sent one (then carrying `ede`, RFC 8914 §3).
pub fn build_error(out: &mut Vec<u8>, query: &[u8], info: Option<&Query>, rcode: Rcode, ede: Option<Ede>) {
    let rcode = u16::from(rcode);
    out.clear();
    let qflags = query.get(field::FLAGS_HI).copied().unwrap_or(0);
    let id = u16_at(query, 0).unwrap_or(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(QR | (qflags & (0x78 | RD)));
    let cd = query.get(field::FLAGS_LO).copied().unwrap_or(0) & CD;
    out.push(RA | cd | (rcode & 0x0f) as u8);
    let question = info.map_or(&[][..], |i| i.question(query));
    let qd = u16::from(!question.is_empty());
    let edns = info.and_then(|i| i.edns);
    let ar = u16::from(edns.is_some());
    for c in [qd, 0, 0, ar] {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out.extend_from_slice(question);
    if let Some(e) = edns {
        push_opt(out, (rcode >> 4) as u8, e.dnssec_ok, ede);
    }
}

/// Build the minimal TC=1 answer a UDP client gets when the real answer
/// does not fit its budget (RFC 7766 §5, RFC 6891 §7): the upstream's
/// header flags and RCODE, the client's question bytes, no records, and an
/// OPT only if the client sent one. Never a partly cut RRset.
pub fn build_truncated(out: &mut Vec<u8>, query: &[u8], info: &Query, answer: &[u8]) {
    out.clear();
    out.extend_from_slice(&info.id.to_be_bytes());
    let hi = answer.get(field::FLAGS_HI).copied().unwrap_or(QR);
    let lo = answer.get(field::FLAGS_LO).copied().unwrap_or(0);
    out.push(hi | QR | TC);
    out.push(lo);
    let ar = u16::from(info.edns.is_some());
    for c in [1, 0, 0, ar] {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out.extend_from_slice(info.question(query));
    if let Some(e) = info.edns {
        push_opt(out, 0, e.dnssec_ok, None);
    }
}

pub fn pad_query(out: &mut Vec<u8>, msg: &[u8], info: &Query, block: u16, keepalive: bool) {
    out.clear();
    // The OPT moves to the end: only safe when it is the last record
    // already (records after it, e.g. a TSIG, would shift under pointers
    // and break signatures). Such queries, and ones too big to pad, go as
    // they are.
    let opt_last = info.opt.is_none_or(|o| o.end == msg.len());
    if !opt_last || msg.len() + 11 + 8 + usize::from(block) > usize::from(u16::MAX) {
        out.extend_from_slice(msg);
        return;
    }
    let (before, after, ttl, udp, opts): (&[u8], &[u8], [u8; 4], u16, &[u8]) = match info.opt {
        Some(o) => (
            msg.get(..o.start).unwrap_or(msg),
            msg.get(o.end..).unwrap_or(&[]),
            // Our OPT, not the client's (RFC 6891 §6.1.4): version 0, no
            // extended RCODE, DO kept, unknown flag bits zeroed.
            [0, 0, if o.edns.dnssec_ok { 0x80 } else { 0 }, 0],
            o.edns.udp_size,
            msg.get(o.rdata..o.end).unwrap_or(&[]),
        ),
        None => (msg, &[], [0; 4], MAX_UDP, &[]),
    };
    out.extend_from_slice(before);
    out.extend_from_slice(after);
    if info.opt.is_none() {
        let ar = u16_at(out, field::ARCOUNT).unwrap_or(0).saturating_add(1);
        put_u16(out, field::ARCOUNT, ar);
    }
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&udp.to_be_bytes());
    out.extend_from_slice(&ttl);
    let rdlen_at = out.len();
    out.extend_from_slice(&[0, 0]);
    for (code, data) in options(opts).flatten() {
        if !hop_by_hop(code) && code != OPT_CLIENT_SUBNET {
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
    }
    if keepalive {
        out.extend_from_slice(&OPT_TCP_KEEPALIVE.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    if block > 0 {
        let block = usize::from(block);
        let pad = (block - (out.len() + 4) % block) % block;
        out.extend_from_slice(&OPT_PADDING.to_be_bytes());
        out.extend_from_slice(&(pad as u16).to_be_bytes());
        out.resize(out.len() + pad, 0);
    }
    let rdlen = (out.len() - rdlen_at - 2) as u16;
    put_u16(out, rdlen_at, rdlen);
}

/// Append an Extended DNS Error to an answer's OPT record. `false` (and
/// nothing changed) when the answer has no OPT, or records follow it
/// (cutting into them would shift names that pointers lead to).
pub fn add_ede(answer: &mut Vec<u8>, ede: Ede) -> bool {
    add_option(
        answer,
        OPT_EDE,
        &[&u16::from(ede.code).to_be_bytes(), ede.text.as_bytes()],
    )
}

/// Add edns-tcp-keepalive with this TIMEOUT (units of 100 ms, RFC 7828
/// §3.2.2) to an answer whose OPT is its last record.
pub fn add_keepalive(answer: &mut Vec<u8>, timeout: u16) -> bool {
    add_option(answer, super::OPT_TCP_KEEPALIVE, &[&timeout.to_be_bytes()])
}

/// Append one EDNS option, its data in `parts`, to the answer's OPT record
/// when that is the last record (as in every answer dotproxy sends on).
fn add_option(answer: &mut Vec<u8>, code: u16, parts: &[&[u8]]) -> bool {
    let Ok(w) = super::query::walk(answer) else {
        return false;
    };
    let Some(o) = w.opt.filter(|o| o.end == w.end && w.end == answer.len()) else {
        return false;
    };
    let Ok(optlen) = u16::try_from(parts.iter().map(|p| p.len()).sum::<usize>()) else {
        return false;
    };
    let Some(rdlen) = u16_at(answer, o.rdata - 2).and_then(|n| n.checked_add(optlen).and_then(|n| n.checked_add(4)))
    else {
        return false;
    };
    put_u16(answer, o.rdata - 2, rdlen);
    answer.extend_from_slice(&code.to_be_bytes());
    answer.extend_from_slice(&optlen.to_be_bytes());
    for p in parts {
        answer.extend_from_slice(p);
    }
    true
}
