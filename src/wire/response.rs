//! An upstream answer: checked against the query it claims to answer
//! (RFC 7858 §3.3), made fit for the client (hop-by-hop options out, OPT
//! only for EDNS clients), and given back the client's own ID, RD bit and
//! question bytes.

use super::header::Header;
use super::hop_by_hop;
use super::name::read_name;
use super::query::walk;
use super::{field, options, put_u16, u16_at, Query, Rcode, Walk, WireError, HEADER_LEN, OPT_EDE, OPT_TCP_KEEPALIVE};

/// Why an upstream answer cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadResponse {
    /// Not an answer to this query: drop it and keep waiting.
    Mismatch(&'static str),
    /// The answer to this query, but unusable: the client gets SERVFAIL.
    Malformed(WireError),
}

/// Check an upstream answer against the query it claims to answer
/// (RFC 7858 §3.3: same ID on the connection, same question). Returns the
/// walk of the answer, whose `end` drops any trailing bytes.
pub fn parse_response(query: &Query, resp: &[u8]) -> Result<Walk, BadResponse> {
    let header = Header::new_checked(resp).map_err(BadResponse::Malformed)?;
    if !header.is_response() {
        return Err(BadResponse::Mismatch("QR=0"));
    }
    match header.qdcount() {
        // A header-only answer can only be a refusal or failure; a NOERROR
        // without a question could be an answer to anything.
        0 if matches!(header.rcode(), Rcode::NoError | Rcode::NxDomain) => {
            return Err(BadResponse::Mismatch("header-only answer"))
        }
        0 => {}
        1 => {
            let (name, end) = read_name(resp, HEADER_LEN, true).map_err(BadResponse::Malformed)?;
            let (Some(qtype), Some(qclass)) = (u16_at(resp, end), u16_at(resp, end + 2)) else {
                return Err(BadResponse::Malformed(WireError::Short));
            };
            if name != *query.name() || qtype != query.qtype || qclass != query.qclass {
                return Err(BadResponse::Mismatch("question differs"));
            }
        }
        _ => return Err(BadResponse::Mismatch("QDCOUNT is not 1")),
    }
    walk(resp).map_err(BadResponse::Malformed)
}

/// Give an answer to `query` (whose bytes are `msg`) the client's own ID,
/// RD bit and question bytes: the same question, maybe in other letter
/// case, since DNS 0x20 clients compare the bytes (RFC 5452 §9.2). The
/// question is written only when the answer carries one of the same
/// length, which after [`parse_response`] (or for a cached answer to the
/// same key) means the same question: an answer without a question keeps
/// its records intact.
pub fn restore_for_client(answer: &mut [u8], query: &Query, msg: &[u8]) {
    let Ok(mut header) = Header::new_checked(&mut *answer) else {
        return;
    };
    header.set_id(query.id);
    header.set_recursion_desired(query.recursion_desired);
    let has_question = header.qdcount() == 1;
    let question = query.question(msg);
    if !has_question {
        return;
    }
    let same_span = read_name(answer, HEADER_LEN, true).is_ok_and(|(_, end)| end + 4 == query.question_end);
    if same_span {
        // Equal lengths unless `msg` is not the query's own bytes: then
        // nothing is written rather than a panic.
        if let Some(dst) = answer
            .get_mut(HEADER_LEN..query.question_end)
            .filter(|d| d.len() == question.len())
        {
            dst.copy_from_slice(question);
        }
    }
}

/// Copy `answer` into `out` without its Extended DNS Error options.
/// `false` (and `out` unspecified) when there is nothing to remove or the
/// OPT is not the last record.
pub fn without_ede(out: &mut Vec<u8>, answer: &[u8]) -> bool {
    out.clear();
    let Ok(w) = walk(answer) else { return false };
    let Some(o) = w.opt.filter(|o| o.end == w.end) else {
        return false;
    };
    let Some(rdata) = answer.get(o.rdata..o.end) else {
        return false;
    };
    if !options(rdata).any(|r| r.is_ok_and(|(code, _)| code == OPT_EDE)) {
        return false;
    }
    out.extend_from_slice(answer.get(..o.rdata).unwrap_or_default());
    for (code, data) in options(rdata).flatten() {
        if code != OPT_EDE {
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
    }
    let rdlen = out.len() - o.rdata;
    put_u16(out, o.rdata - 2, rdlen as u16);
    true
}

/// What the upstream said about its connection in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HopInfo {
    /// edns-tcp-keepalive TIMEOUT, in units of 100 ms (RFC 7828 §3.1).
    pub keepalive: Option<u16>,
}

/// Make an upstream answer fit for a plaintext client, in place: drop the
/// hop-by-hop options (padding, keepalive) before the size check, and drop
/// the OPT entirely when the client sent none (RFC 6891 §7). `Err` when the
/// answer cannot be represented to this client (an extended RCODE without
/// OPT) or its OPT is malformed.
pub fn strip_answer(answer: &mut Vec<u8>, walk: &Walk, client_opt: bool) -> Result<HopInfo, WireError> {
    let Some(o) = walk.opt else {
        return Ok(HopInfo::default());
    };
    if o.end != walk.end {
        // Records follow the OPT (a TSIG, say): cutting bytes out would
        // shift names that pointers lead to. Keep the answer whole for an
        // EDNS client; one without EDNS cannot be given an OPT.
        return if client_opt {
            Ok(HopInfo::default())
        } else {
            Err(WireError::BadOpt)
        };
    }
    let mut hop = HopInfo::default();
    let mut kept = 0usize;
    let mut drop = 0usize;
    for item in options(answer.get(o.rdata..o.end).unwrap_or(&[])) {
        let (code, data) = item?;
        if code == OPT_TCP_KEEPALIVE {
            hop.keepalive = u16_at(data, 0);
        }
        if hop_by_hop(code) {
            drop += 4 + data.len();
        } else {
            kept += 4 + data.len();
        }
    }
    if !client_opt {
        if o.ext_rcode != 0 {
            return Err(WireError::BadOpt);
        }
        answer.drain(o.start..o.end);
        let ar = u16_at(answer, field::ARCOUNT).unwrap_or(1).saturating_sub(1);
        put_u16(answer, field::ARCOUNT, ar);
    } else if drop > 0 {
        // Compact the kept options in place, then cut the tail.
        let mut write = o.rdata;
        let mut read = o.rdata;
        while read < o.end {
            let code = u16_at(answer, read).unwrap_or(0);
            let len = 4 + u16_at(answer, read + 2).unwrap_or(0) as usize;
            if !hop_by_hop(code) {
                answer.copy_within(read..read + len, write);
                write += len;
            }
            read += len;
        }
        answer.drain(write..o.end);
        put_u16(answer, o.rdata - 2, kept as u16);
    }
    Ok(hop)
}
