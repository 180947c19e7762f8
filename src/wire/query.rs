//! One walk over a message, and a client query checked once (RFC 1035,
//! RFC 6891, RFC 8906 §7) into a [`Query`]: everything the rest of the
//! query's life needs (question span, canonical name, EDNS facts, flags),
//! so no later stage reads the question bytes again.

use super::header::Header;
use super::name::{read_name, Name};
use super::{
    field, options, u16_at, u32_at, Ede, EdeCode, Rcode, WireError, HEADER_LEN, OPT_CLIENT_SUBNET, TYPE_AXFR,
    TYPE_IXFR, TYPE_OPT,
};

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

/// The checked facts of a client query that the rest of its life needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The question is `msg[12..question_end]`, in the client's own case.
    pub question_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub edns: Option<Edns>,
    /// Where the query's OPT record is, if it has one.
    pub opt: Option<OptRecord>,
    /// It carries an EDNS Client Subnet option (RFC 7871), which is removed
    /// before it goes upstream.
    pub client_subnet: bool,
    /// The client sent edns-tcp-keepalive (RFC 7828): over TCP it gets
    /// the idle timeout in the answer.
    pub tcp_keepalive: bool,
    /// The question name in canonical form: for keys, zones and matching.
    name: Name,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No name: queries are private (names are logged only at debug,
        // by the query log, on purpose).
        f.debug_struct("Query")
            .field("id", &self.id)
            .field("qtype", &self.qtype)
            .field("edns", &self.edns)
            .finish_non_exhaustive()
    }
}

/// What to do with a query that cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// No answer at all: not a query, or nothing to answer to.
    Drop(&'static str),
    /// Answer with this RCODE (extended RCODEs above 15 go in the OPT).
    /// `query` is there when the question and OPT could be read and may be
    /// echoed.
    Answer {
        rcode: Rcode,
        query: Option<Box<Query>>,
        why: &'static str,
        /// An Extended DNS Error for clients that sent an OPT.
        ede: Option<Ede>,
    },
}

/// Check a client query of at most `max_len` bytes.
pub fn parse_query(msg: &[u8], max_len: usize) -> Result<Query, Reject> {
    let Ok(header) = Header::new_checked(msg) else {
        return Err(Reject::Drop("shorter than a header"));
    };
    // Answers sent to us would be echoed back: the start of a reflection loop.
    if header.is_response() {
        return Err(Reject::Drop("QR=1"));
    }
    if header.truncated() {
        return Err(Reject::Drop("TC=1 in a query"));
    }
    let formerr = |why| Reject::Answer {
        rcode: Rcode::FormErr,
        query: None,
        why,
        ede: None,
    };
    if msg.len() > max_len {
        // Real queries are a few hundred bytes; a huge one is not worth
        // parsing or forwarding. The header can still be answered.
        return Err(formerr("query larger than --max-query-size"));
    }
    if header.opcode() != 0 {
        return Err(Reject::Answer {
            rcode: Rcode::NotImp,
            query: None,
            why: "opcode not QUERY",
            ede: None,
        });
    }
    if header.qdcount() != 1 {
        return Err(formerr("QDCOUNT is not 1"));
    }
    let (name, name_end) = read_name(msg, HEADER_LEN, false).map_err(|_| formerr("bad question name"))?;
    let (Some(qtype), Some(qclass)) = (u16_at(msg, name_end), u16_at(msg, name_end + 2)) else {
        return Err(formerr("truncated question"));
    };
    let walked = walk(msg).map_err(|e| match e {
        WireError::BadOpt => formerr("bad OPT"),
        _ => formerr("malformed records"),
    })?;
    if walked.end != msg.len() {
        return Err(formerr("trailing bytes"));
    }
    // RFC 6891 §6.1.2: options must fill the RDATA exactly.
    let (mut client_subnet, mut tcp_keepalive) = (false, false);
    if let Some(o) = walked.opt {
        for option in options(msg.get(o.rdata..o.end).unwrap_or_default()) {
            match option {
                Err(_) => return Err(formerr("OPT option runs past its record")),
                Ok((code, _)) => {
                    client_subnet |= code == OPT_CLIENT_SUBNET;
                    tcp_keepalive |= code == super::OPT_TCP_KEEPALIVE;
                }
            }
        }
    }
    let query = Query {
        id: header.id(),
        question_end: walked.question_end,
        qtype,
        qclass,
        recursion_desired: header.recursion_desired(),
        checking_disabled: header.checking_disabled(),
        edns: walked.opt.map(|o| o.edns),
        opt: walked.opt,
        client_subnet,
        tcp_keepalive,
        name,
    };
    if query.edns.is_some_and(|e| e.version != 0) {
        return Err(Reject::Answer {
            rcode: Rcode::BadVers, // RFC 6891 §6.1.3
            query: Some(Box::new(query)),
            why: "EDNS version not 0",
            ede: None,
        });
    }
    // Zone transfers answer with many messages under one ID, which a 1:1 ID
    // mapping cannot carry; refuse them here rather than half-forward them.
    if qtype == TYPE_AXFR || qtype == TYPE_IXFR {
        return Err(Reject::Answer {
            rcode: Rcode::NotImp,
            query: Some(Box::new(query)),
            why: "zone transfer",
            ede: Some(Ede::new(EdeCode::NotSupported, "zone transfers are not forwarded")),
        });
    }
    Ok(query)
}

impl Query {
    /// The question name, canonical (lower case, uncompressed).
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The largest answer this client takes over UDP (RFC 6891 §6.2.5):
    /// 512 without EDNS, otherwise its size clamped to [512, `max_udp`].
    pub fn udp_budget(&self, max_udp: u16) -> usize {
        match self.edns {
            None => 512,
            Some(e) => e.udp_size.clamp(512, max_udp.max(512)) as usize,
        }
    }

    /// The question bytes as the client sent them (its letter case).
    pub fn question<'a>(&self, msg: &'a [u8]) -> &'a [u8] {
        msg.get(HEADER_LEN..self.question_end).unwrap_or(&[])
    }

    /// The key under which identical questions meet (the cache, merging):
    /// the canonical name, type and class, plus the bits that change the
    /// answer: DO and CD, RD (a resolver answers RD=0 from its cache only:
    /// such an answer must not reach an RD=1 client), and whether the
    /// client spoke EDNS (an answer carries an OPT exactly when the query
    /// did). Client subnets never enter the key: they are not forwarded.
    pub fn key_into(&self, key: &mut Vec<u8>) {
        key.clear();
        key.extend_from_slice(self.name.as_bytes());
        key.extend_from_slice(&self.qtype.to_be_bytes());
        key.extend_from_slice(&self.qclass.to_be_bytes());
        let edns = self.edns.is_some();
        let dnssec_ok = self.edns.is_some_and(|e| e.dnssec_ok);
        key.push(
            u8::from(edns)
                | (u8::from(dnssec_ok) << 1)
                | (u8::from(self.checking_disabled) << 2)
                | (u8::from(self.recursion_desired) << 3),
        );
    }
}
