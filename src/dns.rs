//! The DNS wire format, as far as a forwarder needs it (RFC 1035 §4.1).
//!
//! dotproxy never re-encodes a message: it checks a client query once
//! ([`parse_query`]), forwards its bytes unchanged except for the ID, checks
//! the upstream's answer ([`parse_response`]) and, when it must, builds a
//! short answer of its own ([`build_error`], [`build_truncated`]). Every
//! accessor here works on a `&[u8]` that a peer controls, so nothing indexes
//! without a bound check and every name walk has a hop limit.
//!
//! ```text
//!                                 1  1  1  1  1  1
//!   0  1  2  3  4  5  6  7  8  9  0  1  2  3  4  5
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! |                      ID                       |
//! |QR|   Opcode  |AA|TC|RD|RA| Z|AD|CD|   RCODE   |
//! |                    QDCOUNT                    |
//! |                    ANCOUNT                    |
//! |                    NSCOUNT                    |
//! |                    ARCOUNT                    |
//! +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
//! ```

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

pub const HEADER_LEN: usize = 12;
/// Largest name in wire form (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// Pointer hops allowed while reading one name; a legitimate name never
/// needs more than one hop per label.
const MAX_HOPS: usize = 128;

pub const TYPE_OPT: u16 = 41;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;

/// EDNS option codes that describe one hop, not the answer.
pub const OPT_TCP_KEEPALIVE: u16 = 11;
pub const OPT_PADDING: u16 = 12;
pub const OPT_EDE: u16 = 15;
pub const OPT_COOKIE: u16 = 10;

/// The UDP payload size dotproxy advertises in its own OPT records and the
/// largest UDP answer it sends (DNS Flag Day 2020).
pub const MAX_UDP: u16 = 1232;

pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
}

/// RFC 8914 INFO-CODEs dotproxy attaches to its own SERVFAILs.
pub mod ede {
    pub const OTHER: u16 = 0;
    pub const PROHIBITED: u16 = 18;
    pub const NOT_SUPPORTED: u16 = 21;
    pub const NO_REACHABLE_AUTHORITY: u16 = 22;
    pub const NETWORK_ERROR: u16 = 23;
}

mod field {
    pub const FLAGS_HI: usize = 2;
    pub const FLAGS_LO: usize = 3;
    pub const QDCOUNT: usize = 4;
    pub const ANCOUNT: usize = 6;
    pub const NSCOUNT: usize = 8;
    pub const ARCOUNT: usize = 10;
}

const QR: u8 = 0x80;
const TC: u8 = 0x02;
const RD: u8 = 0x01;
const RA: u8 = 0x80;
const CD: u8 = 0x10;

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    let b = msg.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(b.try_into().ok()?))
}

/// Overwrite a big-endian u16; a no-op out of bounds (callers only write
/// where they just wrote or checked).
fn put_u16(msg: &mut [u8], at: usize, v: u16) {
    if let Some(b) = msg.get_mut(at..at.saturating_add(2)) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    let b = msg.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The message ID, or `None` for fewer than two bytes.
pub fn id(msg: &[u8]) -> Option<u16> {
    u16_at(msg, 0)
}

/// Overwrite the message ID; a no-op on a message too short to carry one.
pub fn set_id(msg: &mut [u8], id: u16) {
    if let Some(b) = msg.get_mut(0..2) {
        b.copy_from_slice(&id.to_be_bytes());
    }
}

/// The 4-bit RCODE of a message with a header.
/// Give an answer the RD bit of the query (RFC 1035 §4.1.1: copied into
/// the response), for answers shared between queries.
pub fn copy_rd(answer: &mut [u8], query: &[u8]) {
    let rd = query.get(field::FLAGS_HI).map_or(0, |b| b & RD);
    if let Some(b) = answer.get_mut(field::FLAGS_HI) {
        *b = (*b & !RD) | rd;
    }
}

pub fn rcode_of(msg: &[u8]) -> u8 {
    msg.get(field::FLAGS_LO).map_or(0, |b| b & 0x0f)
}

pub fn is_truncated(msg: &[u8]) -> bool {
    msg.get(field::FLAGS_HI).is_some_and(|b| b & TC != 0)
}

/// A name in canonical form: wire labels, lower-cased, uncompressed.
pub struct Name {
    buf: [u8; MAX_NAME],
    len: usize,
}

impl Name {
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.as_bytes();
        if rest.len() <= 1 {
            return f.write_str(".");
        }
        while let Some((&len, tail)) = rest.split_first() {
            if len == 0 {
                break;
            }
            let Some(label) = tail.get(..len as usize) else { break };
            for &c in label {
                if c.is_ascii_graphic() && c != b'.' && c != b'\\' {
                    write!(f, "{}", c as char)?;
                } else {
                    write!(f, "\\{c:03}")?;
                }
            }
            f.write_str(".")?;
            rest = tail.get(len as usize..).unwrap_or(&[]);
            if len == 0 {
                break;
            }
        }
        Ok(())
    }
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

/// Read the name at `pos`; return it canonicalised and the offset just past
/// it in the message (past the first pointer, if any). With
/// `allow_pointers` false a pointer is an error (a query's question sits at
/// offset 12, where no earlier name exists to point at).
pub fn read_name(msg: &[u8], pos: usize, allow_pointers: bool) -> Result<(Name, usize), WireError> {
    let mut name = Name {
        buf: [0; MAX_NAME],
        len: 0,
    };
    let whole = msg;
    let mut msg = msg;
    let mut at = pos;
    let mut end = None;
    let mut hops = 0;
    loop {
        let len = *msg.get(at).ok_or(WireError::Short)?;
        match len & 0xc0 {
            0x00 => {
                let len = len as usize;
                let label = msg.get(at + 1..at + 1 + len).ok_or(WireError::Short)?;
                let dst = name
                    .buf
                    .get_mut(name.len..name.len + 1 + len)
                    .ok_or(WireError::BadName)?;
                if let Some((first, rest)) = dst.split_first_mut() {
                    *first = len as u8;
                    for (d, s) in rest.iter_mut().zip(label) {
                        *d = s.to_ascii_lowercase();
                    }
                }
                name.len += 1 + len;
                at += 1 + len;
                if len == 0 {
                    return Ok((name, end.unwrap_or(at)));
                }
            }
            0xc0 => {
                if !allow_pointers {
                    return Err(WireError::BadPointer);
                }
                let lo = *msg.get(at + 1).ok_or(WireError::Short)?;
                let target = (((len & 0x3f) as usize) << 8) | lo as usize;
                // Only backward, to a whole earlier name (RFC 1035 §4.1.4):
                // forward pointers are how loops start, and a name that ran
                // on past this pointer would change when records after it
                // are cut or moved. So the rest of the name must end before
                // this pointer, and never inside the header.
                if target < HEADER_LEN || target >= at || hops >= MAX_HOPS {
                    return Err(WireError::BadPointer);
                }
                hops += 1;
                end.get_or_insert(at + 2);
                msg = whole.get(..at).unwrap_or_default();
                at = target;
            }
            _ => return Err(WireError::BadName),
        }
    }
}

/// What a query carried in its OPT record (RFC 6891 §6.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// Where the OPT record of a message sits, and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptRecord {
    pub start: usize,
    /// Start of the RDATA (the options).
    pub rdata: usize,
    pub end: usize,
    pub edns: Edns,
    pub ext_rcode: u8,
}

/// The facts about a message after one full walk over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// End of the question section (start of the answer section).
    pub question_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub qdcount: u16,
    pub opt: Option<OptRecord>,
    /// End of the last record; anything after it is not part of the message.
    pub end: usize,
}

/// Walk the whole message: header, at most one question, every resource
/// record. Bounded by the message length: each step consumes bytes.
pub fn walk(msg: &[u8]) -> Result<Walk, WireError> {
    if msg.len() < HEADER_LEN {
        return Err(WireError::Short);
    }
    let count = |f| u16_at(msg, f).unwrap_or(0);
    let qdcount = count(field::QDCOUNT);
    let mut at = HEADER_LEN;
    let (mut qtype, mut qclass) = (0, 0);
    for _ in 0..qdcount {
        let (_, end) = read_name(msg, at, true)?;
        qtype = u16_at(msg, end).ok_or(WireError::Short)?;
        qclass = u16_at(msg, end + 2).ok_or(WireError::Short)?;
        at = end + 4;
    }
    let question_end = at;
    let an_ns = count(field::ANCOUNT) as usize + count(field::NSCOUNT) as usize;
    let ar = count(field::ARCOUNT) as usize;
    let mut opt = None;
    for i in 0..an_ns + ar {
        let start = at;
        let (name, end) = read_name(msg, at, true)?;
        let rtype = u16_at(msg, end).ok_or(WireError::Short)?;
        let class = u16_at(msg, end + 2).ok_or(WireError::Short)?;
        let ttl = u32_at(msg, end + 4).ok_or(WireError::Short)?;
        let rdlen = u16_at(msg, end + 8).ok_or(WireError::Short)? as usize;
        at = end + 10 + rdlen;
        if at > msg.len() {
            return Err(WireError::Short);
        }
        if rtype == TYPE_OPT {
            // RFC 6891 §6.1.1: one OPT, in the additional section, at the root.
            if i < an_ns || opt.is_some() || name.as_bytes() != [0] {
                return Err(WireError::BadOpt);
            }
            let [ext_rcode, version, flags_hi, _] = ttl.to_be_bytes();
            opt = Some(OptRecord {
                start,
                rdata: end + 10,
                end: at,
                edns: Edns {
                    udp_size: class,
                    version,
                    dnssec_ok: flags_hi & 0x80 != 0,
                },
                ext_rcode,
            });
        }
    }
    Ok(Walk {
        question_end,
        qtype,
        qclass,
        qdcount,
        opt,
        end: at,
    })
}

/// The checked facts of a client query that the rest of a query's life needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryInfo {
    pub id: u16,
    /// The question is `msg[12..question_end]`, in the client's own case.
    pub question_end: usize,
    pub qtype: u16,
    pub edns: Option<Edns>,
    /// Where the query's OPT record is, if it has one.
    pub opt: Option<OptRecord>,
}

/// What to do with a query that cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No answer at all: not a query, or nothing to answer to.
    Drop(&'static str),
    /// Answer with this RCODE (extended RCODEs above 15 go in the OPT).
    /// `info` is there when the question and OPT could be read and may be
    /// echoed.
    Answer {
        rcode: u16,
        info: Option<QueryInfo>,
        why: &'static str,
        /// An Extended DNS Error for clients that sent an OPT.
        ede: Option<(u16, &'static str)>,
    },
}

/// Check a client query (RFC 1035, RFC 6891, RFC 8906 §7).
pub fn parse_query(msg: &[u8]) -> Result<QueryInfo, Reject> {
    let Some(header) = msg.get(..HEADER_LEN) else {
        return Err(Reject::Drop("shorter than a header"));
    };
    let flags = header.get(field::FLAGS_HI).copied().unwrap_or(0);
    // Answers sent to us would be echoed back: the start of a reflection loop.
    if flags & QR != 0 {
        return Err(Reject::Drop("QR=1"));
    }
    if flags & TC != 0 {
        return Err(Reject::Drop("TC=1 in a query"));
    }
    let formerr = |why| Reject::Answer {
        rcode: rcode::FORMERR as u16,
        info: None,
        why,
        ede: None,
    };
    let opcode = (flags >> 3) & 0x0f;
    if opcode != 0 {
        return Err(Reject::Answer {
            rcode: rcode::NOTIMP as u16,
            info: None,
            why: "opcode not QUERY",
            ede: None,
        });
    }
    if u16_at(msg, field::QDCOUNT) != Some(1) {
        return Err(formerr("QDCOUNT is not 1"));
    }
    let (_, name_end) = read_name(msg, HEADER_LEN, false).map_err(|_| formerr("bad question name"))?;
    let qtype = u16_at(msg, name_end + 2).map_or(Err(formerr("truncated question")), |_| {
        Ok(u16_at(msg, name_end).unwrap_or(0))
    })?;
    let walked = walk(msg).map_err(|e| match e {
        WireError::BadOpt => formerr("bad OPT"),
        _ => formerr("malformed records"),
    })?;
    if walked.end != msg.len() {
        return Err(formerr("trailing bytes"));
    }
    // RFC 6891 §6.1.2: options must fill the RDATA exactly.
    if let Some(o) = walked.opt {
        if options(msg.get(o.rdata..o.end).unwrap_or_default()).any(|r| r.is_err()) {
            return Err(formerr("OPT option runs past its record"));
        }
    }
    let info = QueryInfo {
        id: u16_at(msg, 0).unwrap_or(0),
        question_end: walked.question_end,
        qtype,
        edns: walked.opt.map(|o| o.edns),
        opt: walked.opt,
    };
    if info.edns.is_some_and(|e| e.version != 0) {
        return Err(Reject::Answer {
            rcode: 16, // BADVERS (RFC 6891 §6.1.3)
            info: Some(info),
            why: "EDNS version not 0",
            ede: None,
        });
    }
    // Zone transfers answer with many messages under one ID, which a 1:1 ID
    // mapping cannot carry; refuse them here rather than half-forward them.
    if qtype == TYPE_AXFR || qtype == TYPE_IXFR {
        return Err(Reject::Answer {
            rcode: rcode::NOTIMP as u16,
            info: Some(info),
            why: "zone transfer",
            ede: Some((ede::NOT_SUPPORTED, "zone transfers are not forwarded")),
        });
    }
    Ok(info)
}

impl QueryInfo {
    /// The largest answer this client takes over UDP (RFC 6891 §6.2.5):
    /// 512 without EDNS, otherwise its size clamped to [512, `max_udp`].
    pub fn udp_budget(&self, max_udp: u16) -> usize {
        match self.edns {
            None => 512,
            Some(e) => e.udp_size.clamp(512, max_udp.max(512)) as usize,
        }
    }

    pub fn question<'a>(&self, msg: &'a [u8]) -> &'a [u8] {
        msg.get(HEADER_LEN..self.question_end).unwrap_or(&[])
    }
}

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
pub fn parse_response(query: &[u8], resp: &[u8]) -> Result<Walk, BadResponse> {
    let flags = *resp
        .get(field::FLAGS_HI)
        .ok_or(BadResponse::Malformed(WireError::Short))?;
    if resp.len() < HEADER_LEN {
        return Err(BadResponse::Malformed(WireError::Short));
    }
    if flags & QR == 0 {
        return Err(BadResponse::Mismatch("QR=0"));
    }
    let qd = u16_at(resp, field::QDCOUNT).unwrap_or(0);
    if qd == 0 {
        // A header-only answer can only be a refusal or failure; a NOERROR
        // without a question could be an answer to anything.
        let rc = rcode_of(resp);
        if rc == rcode::NOERROR || rc == rcode::NXDOMAIN {
            return Err(BadResponse::Mismatch("header-only answer"));
        }
    } else if qd != 1 {
        return Err(BadResponse::Mismatch("QDCOUNT is not 1"));
    } else {
        let (qn, qend) = read_name(query, HEADER_LEN, true).map_err(|_| BadResponse::Mismatch("query unreadable"))?;
        let (rn, rend) = read_name(resp, HEADER_LEN, true).map_err(BadResponse::Malformed)?;
        let qtc = query.get(qend..qend + 4);
        let rtc = resp.get(rend..rend + 4);
        if rtc.is_none() {
            return Err(BadResponse::Malformed(WireError::Short));
        }
        if qn != rn || qtc != rtc {
            return Err(BadResponse::Mismatch("question differs"));
        }
    }
    walk(resp).map_err(BadResponse::Malformed)
}

/// Append an OPT record: our UDP size, version 0, the DO bit as given, and
/// optionally one EDE option (RFC 8914).
fn push_opt(out: &mut Vec<u8>, ext_rcode: u8, dnssec_ok: bool, ede: Option<(u16, &str)>) {
    out.push(0); // root name
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&MAX_UDP.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
    match ede {
        None => out.extend_from_slice(&[0, 0]),
        Some((code, text)) => {
            let text = text.as_bytes().get(..text.len().min(64)).unwrap_or_default();
            let optlen = 2 + text.len();
            out.extend_from_slice(&((4 + optlen) as u16).to_be_bytes());
            out.extend_from_slice(&OPT_EDE.to_be_bytes());
            out.extend_from_slice(&(optlen as u16).to_be_bytes());
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(text);
        }
    }
}

/// Build dotproxy's own answer to `query` into `out`: the client's ID,
/// opcode, RD and CD; the question if `info` says it was readable; an OPT
/// only if the client sent one (then carrying `ede`, RFC 8914 §3).
pub fn build_error(out: &mut Vec<u8>, query: &[u8], info: Option<&QueryInfo>, rcode: u16, ede: Option<(u16, &str)>) {
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
pub fn build_truncated(out: &mut Vec<u8>, query: &[u8], info: &QueryInfo, answer: &[u8]) {
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

const TYPE_SOA: u16 = 6;
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
    let rc = rcode_of(msg);
    if is_truncated(msg) || (rc != rcode::NOERROR && rc != rcode::NXDOMAIN) {
        return None;
    }
    let w = walk(msg).ok()?;
    if w.qdcount != 1 || w.opt.is_some_and(|o| o.ext_rcode != 0) {
        return None;
    }
    let an = u16_at(msg, field::ANCOUNT)? as usize;
    let ns = u16_at(msg, field::NSCOUNT)? as usize;
    let ar = u16_at(msg, field::ARCOUNT)? as usize;
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
    let ttl = if an > 0 && rc == rcode::NOERROR { min_an? } else { neg? };
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

/// Whether the name at `at`, pointers followed, reads any byte of the
/// 4-byte fields starting at `fields`.
fn name_touches(msg: &[u8], mut at: usize, fields: &[u16]) -> bool {
    let hits = |pos: usize, len: usize| {
        fields.iter().any(|&f| {
            let f = usize::from(f);
            pos < f + 4 && f < pos + len
        })
    };
    // Bounded: a name has at most 127 labels plus MAX_HOPS pointers.
    for _ in 0..MAX_NAME + MAX_HOPS {
        let Some(&len) = msg.get(at) else { return false };
        match len & 0xc0 {
            0x00 => {
                if hits(at, 1 + len as usize) {
                    return true;
                }
                if len == 0 {
                    return false;
                }
                at += 1 + len as usize;
            }
            0xc0 => {
                if hits(at, 2) {
                    return true;
                }
                let Some(&lo) = msg.get(at + 1) else { return false };
                at = (((len & 0x3f) as usize) << 8) | lo as usize;
            }
            _ => return false,
        }
    }
    false
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

/// Whether `name` is `zone` or under it; both canonical wire form.
pub fn in_zone(name: &[u8], zone: &[u8]) -> bool {
    let mut at = 0;
    while let Some(rest) = name.get(at..) {
        if rest == zone {
            return true;
        }
        match rest.first() {
            Some(&len) if len > 0 => at += 1 + len as usize,
            _ => return false,
        }
    }
    false
}

/// Walk the options of an OPT record's RDATA: `(code, data)` pairs.
/// `Err` when an option runs past the record.
fn options(rdata: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), WireError>> {
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

/// Build the message sent upstream: the client's query with its own
/// padding and keepalive options removed, an OPT added if it had none, and
/// one padding option that makes the length a multiple of `block`
/// (RFC 8467 §4.1). With `keepalive`, an empty edns-tcp-keepalive option
/// asks the server for its idle timeout (RFC 7828 §3.2.1). The header and
/// question stay byte for byte (they are what the answer is matched
/// against), and the OPT goes last.
pub fn pad_query(out: &mut Vec<u8>, msg: &[u8], info: &QueryInfo, block: u16, keepalive: bool) {
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
        if !hop_by_hop(code) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for l in name.split('.').filter(|l| !l.is_empty()) {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn accepts_plain_and_edns_queries() {
        let q = query(7, "example.com", 1, None);
        let i = parse_query(&q).unwrap();
        assert_eq!(i.id, 7);
        assert_eq!(i.question_end, q.len());
        assert_eq!(i.udp_budget(1232), 512);
        let q = query(7, "Example.COM", 28, Some(4096));
        let i = parse_query(&q).unwrap();
        assert_eq!(i.qtype, 28);
        assert_eq!(i.udp_budget(1232), 1232);
        assert!(i.edns.unwrap().dnssec_ok);
        let q = query(7, "a", 1, Some(100));
        assert_eq!(parse_query(&q).unwrap().udp_budget(1232), 512);
    }

    #[test]
    fn rejects_bad_queries() {
        assert!(matches!(parse_query(&[0; 11]), Err(Reject::Drop(_))));
        let mut q = query(1, "a.b", 1, None);
        q[2] |= 0x80;
        assert!(matches!(parse_query(&q), Err(Reject::Drop(_))));
        let mut q = query(1, "a.b", 1, None);
        q[5] = 0;
        assert!(matches!(parse_query(&q), Err(Reject::Answer { rcode: 1, .. })));
        let mut q = query(1, "a.b", 1, None);
        q[2] |= 2 << 3;
        assert!(matches!(parse_query(&q), Err(Reject::Answer { rcode: 4, .. })));
        let mut q = query(1, "a.b", 1, None);
        q.push(0);
        assert!(matches!(parse_query(&q), Err(Reject::Answer { rcode: 1, .. })));
        let q = query(1, "a.b", 1, None);
        assert!(matches!(
            parse_query(&q[..q.len() - 1]),
            Err(Reject::Answer { rcode: 1, .. })
        ));
        let mut q = query(1, "a.b", 1, Some(1232));
        let n = q.len();
        q[n - 5] = 1; // EDNS version 1
        assert!(matches!(parse_query(&q), Err(Reject::Answer { rcode: 16, .. })));
        assert!(matches!(
            parse_query(&query(1, "a.b", TYPE_AXFR, None)),
            Err(Reject::Answer { rcode: 4, .. })
        ));
    }

    #[test]
    fn pointer_loops_terminate() {
        let mut m = vec![0u8; 12];
        m.extend_from_slice(&[0xc0, 12]);
        assert_eq!(read_name(&m, 12, true).err(), Some(WireError::BadPointer));
        let mut m = vec![0u8; 12];
        m.extend_from_slice(&[1, b'a', 0xc0, 12]);
        // A backward loop: stopped by the name length or the hop limit.
        assert!(read_name(&m, 14, true).is_err());
        let mut m = vec![0u8; 12];
        m.extend_from_slice(&[1, b'a', 0, 0xc0, 12]);
        let (n, end) = read_name(&m, 15, true).unwrap();
        assert_eq!(n.as_bytes(), &[1, b'a', 0]);
        assert_eq!(end, 17);
    }

    #[test]
    fn name_length_is_limited() {
        let long = ["a".repeat(63).as_str(); 5].join(".");
        let q = query(1, &long, 1, None);
        assert!(matches!(parse_query(&q), Err(Reject::Answer { rcode: 1, .. })));
    }

    #[test]
    fn response_must_match_question() {
        let q = query(9, "Www.Example.com", 1, None);
        let mut r = query(9, "www.example.COM", 1, None);
        r[2] |= 0x80;
        assert!(parse_response(&q, &r).is_ok());
        let mut other = query(9, "www.example.net", 1, None);
        other[2] |= 0x80;
        assert!(matches!(parse_response(&q, &other), Err(BadResponse::Mismatch(_))));
        let mut header_only = r[..12].to_vec();
        header_only[5] = 0;
        header_only[3] = rcode::REFUSED;
        assert!(parse_response(&q, &header_only).is_ok());
        header_only[3] = rcode::NOERROR;
        assert!(parse_response(&q, &header_only).is_err());
        let mut broken = r.clone();
        broken[7] = 1; // ANCOUNT 1, no record
        assert!(matches!(parse_response(&q, &broken), Err(BadResponse::Malformed(_))));
    }

    #[test]
    fn errors_echo_id_question_and_opt() {
        let q = query(0xbeef, "a.b", 1, Some(4096));
        let info = parse_query(&q).unwrap();
        let mut out = Vec::new();
        build_error(
            &mut out,
            &q,
            Some(&info),
            rcode::SERVFAIL as u16,
            Some((ede::NETWORK_ERROR, "x")),
        );
        let w = walk(&out).unwrap();
        assert_eq!(id(&out), Some(0xbeef));
        assert_eq!(rcode_of(&out), rcode::SERVFAIL);
        assert_eq!(&out[12..w.question_end], info.question(&q));
        assert!(w.opt.unwrap().edns.dnssec_ok);
        let q = query(3, "a.b", 1, None);
        let info = parse_query(&q).unwrap();
        build_error(&mut out, &q, Some(&info), rcode::SERVFAIL as u16, Some((0, "x")));
        assert!(walk(&out).unwrap().opt.is_none());
        build_error(&mut out, &q, None, rcode::FORMERR as u16, None);
        assert_eq!(out.len(), 12);
    }

    fn with_options(mut q: Vec<u8>, opts: &[(u16, &[u8])]) -> Vec<u8> {
        let mut rdata = Vec::new();
        for (code, data) in opts {
            rdata.extend_from_slice(&code.to_be_bytes());
            rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
            rdata.extend_from_slice(data);
        }
        let n = q.len();
        q[n - 2..].copy_from_slice(&(rdata.len() as u16).to_be_bytes());
        q.extend_from_slice(&rdata);
        q
    }

    fn option_codes(msg: &[u8]) -> Vec<u16> {
        let o = walk(msg).unwrap().opt.unwrap();
        options(&msg[o.rdata..o.end]).map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn queries_are_padded_to_the_block() {
        let mut out = Vec::new();
        for (q, had_opt) in [
            (query(1, "a.example", 1, None), false),
            (query(1, "www.example.com", 28, Some(4096)), true),
            (
                with_options(
                    query(1, "x.test", 1, Some(1232)),
                    &[(OPT_PADDING, &[0; 30]), (65001, &[1; 8])],
                ),
                true,
            ),
            (query(1, &["a".repeat(60).as_str(); 3].join("."), 16, None), false),
        ] {
            let info = parse_query(&q).unwrap();
            pad_query(&mut out, &q, &info, 128, false);
            assert_eq!(out.len() % 128, 0, "{}", out.len());
            let padded = parse_query(&out).unwrap();
            assert_eq!(info.question(&q), padded.question(&out));
            assert_eq!(&q[..4], &out[..4]);
            let codes = option_codes(&out);
            assert_eq!(codes.iter().filter(|&&c| c == OPT_PADDING).count(), 1);
            assert_eq!(*codes.last().unwrap(), OPT_PADDING);
            if had_opt {
                assert_eq!(padded.edns.unwrap().dnssec_ok, info.edns.unwrap().dnssec_ok);
            }
        }
        let q = with_options(query(1, "x.test", 1, Some(1232)), &[(65001, &[1; 8])]);
        pad_query(&mut out, &q, &parse_query(&q).unwrap(), 128, false);
        assert_eq!(option_codes(&out), vec![65001, OPT_PADDING]);
        pad_query(&mut out, &q, &parse_query(&q).unwrap(), 0, true);
        assert_eq!(option_codes(&out), vec![65001, OPT_TCP_KEEPALIVE]);
        assert_eq!(&out[out.len() - 4..], &[0, 11, 0, 0]);
    }

    #[test]
    fn answers_lose_hop_options() {
        let mut a = with_options(
            query(1, "x.test", 1, Some(1232)),
            &[
                (OPT_PADDING, &[0; 400]),
                (OPT_EDE, &[0, 22]),
                (OPT_TCP_KEEPALIVE, &[0, 50]),
            ],
        );
        a[2] |= 0x80;
        let w = walk(&a).unwrap();
        let hop = strip_answer(&mut a, &w, true).unwrap();
        assert_eq!(hop.keepalive, Some(50));
        assert_eq!(option_codes(&a), vec![OPT_EDE]);
        assert!(a.len() < 60);
        let w = walk(&a).unwrap();
        strip_answer(&mut a, &w, false).unwrap();
        let w = walk(&a).unwrap();
        assert!(w.opt.is_none());
        assert_eq!(w.end, a.len());
        assert_eq!(u16_at(&a, 10), Some(0));
        let mut bad = with_options(query(1, "x.test", 1, Some(1232)), &[(OPT_PADDING, &[0; 4])]);
        let n = bad.len();
        bad[n - 6] = 9; // option length past the record
        let w = walk(&bad).unwrap();
        assert!(strip_answer(&mut bad, &w, true).is_err());
    }

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
        nx[3] |= rcode::NXDOMAIN;
        assert_eq!(cache_ttl(&nx, &mut offs), Some(30));
        let nodata = answer_with(&q, &[], &[]);
        assert_eq!(cache_ttl(&nodata, &mut offs), None);
        let mut fail = a.clone();
        fail[3] = (fail[3] & 0xf0) | rcode::SERVFAIL;
        assert_eq!(cache_ttl(&fail, &mut offs), None);
        let mut tc = a.clone();
        tc[2] |= 0x02;
        assert_eq!(cache_ttl(&tc, &mut offs), None);
        let zero = answer_with(&q, &[(1, 0, &[1, 2, 3, 4])], &[]);
        assert_eq!(cache_ttl(&zero, &mut offs), None);
    }

    #[test]
    fn zones_match_on_label_boundaries() {
        let (n, _) = read_name(&query(1, "WWW.Corp.Example", 1, None), 12, false).unwrap();
        let zone = |z: &str| {
            let q = query(1, z, 1, None);
            read_name(&q, 12, false).unwrap().0.as_bytes().to_vec()
        };
        assert!(in_zone(n.as_bytes(), &zone("corp.example")));
        assert!(in_zone(n.as_bytes(), &zone("www.corp.example")));
        assert!(in_zone(n.as_bytes(), &zone("example")));
        assert!(in_zone(n.as_bytes(), &[0]));
        assert!(!in_zone(n.as_bytes(), &zone("orp.example")));
        assert!(!in_zone(n.as_bytes(), &zone("other.example")));
    }

    #[test]
    fn truncated_answer_is_minimal() {
        let q = query(5, "big.test", 16, Some(1232));
        let info = parse_query(&q).unwrap();
        let mut answer = q.clone();
        answer[2] |= 0x80;
        answer[3] |= 0x80;
        let mut out = Vec::new();
        build_truncated(&mut out, &q, &info, &answer);
        assert!(is_truncated(&out));
        let w = walk(&out).unwrap();
        assert!(w.opt.is_some());
        assert_eq!(out.len(), q.len());
    }
}
