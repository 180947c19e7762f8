//! Minimal DNS wire-format helpers: a query builder, a response parser and
//! the answers the test upstream produces.
//!
//! Only what the tests need; names are ASCII, compression pointers are
//! followed when parsing (bounded), never produced except the fixed 0xC00C
//! pointer to the first question name.

use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NOTIMP: u8 = 4;

/// The address every default answer carries.
pub const ANSWER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// TTL of the default answer.
pub const ANSWER_TTL: u32 = 60;
/// UDP payload size the test upstream advertises in its OPT record.
pub const UPSTREAM_EDNS_SIZE: u16 = 1232;

/// EDNS(0) parameters for a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub do_bit: bool,
}

/// Builder for a single-question query.
#[derive(Clone, Debug)]
pub struct QueryBuilder {
    pub id: u16,
    pub qname: String,
    pub qtype: u16,
    pub qclass: u16,
    pub rd: bool,
    pub opcode: u8,
    pub edns: Option<Edns>,
}

impl QueryBuilder {
    pub fn new(id: u16, qname: &str) -> Self {
        QueryBuilder {
            id,
            qname: qname.to_string(),
            qtype: TYPE_A,
            qclass: CLASS_IN,
            rd: true,
            opcode: 0,
            edns: None,
        }
    }

    pub fn qtype(mut self, qtype: u16) -> Self {
        self.qtype = qtype;
        self
    }

    pub fn opcode(mut self, opcode: u8) -> Self {
        self.opcode = opcode;
        self
    }

    pub fn rd(mut self, rd: bool) -> Self {
        self.rd = rd;
        self
    }

    pub fn edns(mut self, udp_size: u16, do_bit: bool) -> Self {
        self.edns = Some(Edns { udp_size, do_bit });
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&self.id.to_be_bytes());
        let mut b2 = (self.opcode & 0x0f) << 3;
        if self.rd {
            b2 |= 0x01;
        }
        m.push(b2);
        m.push(0);
        m.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
        m.extend_from_slice(&0u16.to_be_bytes()); // ANCOUNT
        m.extend_from_slice(&0u16.to_be_bytes()); // NSCOUNT
        let ar: u16 = if self.edns.is_some() { 1 } else { 0 };
        m.extend_from_slice(&ar.to_be_bytes());
        m.extend_from_slice(&encode_name(&self.qname));
        m.extend_from_slice(&self.qtype.to_be_bytes());
        m.extend_from_slice(&self.qclass.to_be_bytes());
        if let Some(e) = self.edns {
            push_opt(&mut m, e.udp_size, e.do_bit);
        }
        m
    }
}

/// Shorthand: an A query with RD=1 and no EDNS.
pub fn query(id: u16, qname: &str) -> Vec<u8> {
    QueryBuilder::new(id, qname).build()
}

/// Shorthand: an A query with RD=1 and an OPT record.
pub fn query_edns(id: u16, qname: &str, udp_size: u16) -> Vec<u8> {
    QueryBuilder::new(id, qname).edns(udp_size, false).build()
}

/// Appends an OPT pseudo-record (root name, no options).
pub fn push_opt(m: &mut Vec<u8>, udp_size: u16, do_bit: bool) {
    m.push(0); // root name
    m.extend_from_slice(&TYPE_OPT.to_be_bytes());
    m.extend_from_slice(&udp_size.to_be_bytes());
    m.push(0); // extended rcode
    m.push(0); // version
    m.push(if do_bit { 0x80 } else { 0 });
    m.push(0);
    m.extend_from_slice(&0u16.to_be_bytes()); // rdlen
}

/// Encodes a dotted name into wire labels. Empty labels are skipped, so
/// both "a.b" and "a.b." work; "" and "." give the root.
pub fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        assert!(label.len() <= 63, "label too long: {label}");
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

pub fn msg_id(msg: &[u8]) -> Option<u16> {
    if msg.len() < 2 {
        return None;
    }
    Some(u16::from_be_bytes([msg[0], msg[1]]))
}

pub fn set_msg_id(msg: &mut [u8], id: u16) {
    msg[..2].copy_from_slice(&id.to_be_bytes());
}

/// Reads a (possibly compressed) name starting at `pos`. Returns the dotted
/// lower-case name (no trailing dot, "." for the root) and the position just
/// after the name in the original stream.
pub fn read_name(msg: &[u8], pos: usize) -> Result<(String, usize), String> {
    let mut labels: Vec<String> = Vec::new();
    let mut p = pos;
    let mut end: Option<usize> = None;
    // Bounded: at most 128 labels / pointer hops.
    for _ in 0..128 {
        let len = *msg.get(p).ok_or_else(|| format!("name runs past end at {p}"))? as usize;
        if len == 0 {
            let after = end.unwrap_or(p + 1);
            let name = if labels.is_empty() {
                ".".to_string()
            } else {
                labels.join(".")
            };
            return Ok((name, after));
        }
        if len & 0xC0 == 0xC0 {
            let lo = *msg.get(p + 1).ok_or("pointer runs past end")? as usize;
            if end.is_none() {
                end = Some(p + 2);
            }
            p = ((len & 0x3f) << 8) | lo;
            continue;
        }
        if len & 0xC0 != 0 {
            return Err(format!("bad label type {len:#x} at {p}"));
        }
        let label = msg
            .get(p + 1..p + 1 + len)
            .ok_or_else(|| format!("label runs past end at {p}"))?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        p += 1 + len;
    }
    Err("name too long or pointer loop".to_string())
}

/// The question of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// OPT pseudo-record as found in a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptInfo {
    pub udp_size: u16,
    pub ext_rcode: u8,
    pub version: u8,
    pub do_bit: bool,
}

/// One resource record (answer/authority/additional), rdata kept raw.
#[derive(Clone, Debug)]
pub struct Record {
    pub name: String,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub rdata: Vec<u8>,
}

/// A parsed DNS message (query or response).
#[derive(Clone, Debug)]
pub struct Message {
    pub id: u16,
    pub flags: u16,
    pub qr: bool,
    pub opcode: u8,
    pub aa: bool,
    pub tc: bool,
    pub rd: bool,
    pub ra: bool,
    pub rcode: u8,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
    /// First question, if QDCOUNT >= 1.
    pub question: Option<Question>,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
    /// OPT record from the additional section, if any.
    pub opt: Option<OptInfo>,
    /// Total wire length.
    pub len: usize,
    /// Offset just after the question section.
    pub question_end: usize,
}

impl Message {
    /// Parses a full message; every count is honoured, so a truncated or
    /// inconsistent message is an error.
    pub fn parse(msg: &[u8]) -> Result<Message, String> {
        if msg.len() < 12 {
            return Err(format!("message too short: {} bytes", msg.len()));
        }
        let u16at = |p: usize| u16::from_be_bytes([msg[p], msg[p + 1]]);
        let id = u16at(0);
        let flags = u16at(2);
        let qdcount = u16at(4);
        let ancount = u16at(6);
        let nscount = u16at(8);
        let arcount = u16at(10);
        let mut p = 12;
        let mut question = None;
        for i in 0..qdcount {
            let (name, after) = read_name(msg, p)?;
            if after + 4 > msg.len() {
                return Err("question runs past end".into());
            }
            let q = Question {
                name,
                qtype: u16at(after),
                qclass: u16at(after + 2),
            };
            if i == 0 {
                question = Some(q);
            }
            p = after + 4;
        }
        let question_end = p;
        let mut sections: [Vec<Record>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let mut opt = None;
        for (s, count) in [ancount, nscount, arcount].into_iter().enumerate() {
            for _ in 0..count {
                let (name, after) = read_name(msg, p)?;
                if after + 10 > msg.len() {
                    return Err("record header runs past end".into());
                }
                let rtype = u16at(after);
                let class = u16at(after + 2);
                let ttl = u32::from_be_bytes([msg[after + 4], msg[after + 5], msg[after + 6], msg[after + 7]]);
                let rdlen = u16at(after + 8) as usize;
                let rd_start = after + 10;
                let rdata = msg
                    .get(rd_start..rd_start + rdlen)
                    .ok_or("rdata runs past end")?
                    .to_vec();
                if s == 2 && rtype == TYPE_OPT {
                    opt = Some(OptInfo {
                        udp_size: class,
                        ext_rcode: (ttl >> 24) as u8,
                        version: (ttl >> 16) as u8,
                        do_bit: ttl & 0x8000 != 0,
                    });
                }
                sections[s].push(Record {
                    name,
                    rtype,
                    class,
                    ttl,
                    rdata,
                });
                p = rd_start + rdlen;
            }
        }
        let [answers, authority, additional] = sections;
        Ok(Message {
            id,
            flags,
            qr: flags & 0x8000 != 0,
            opcode: ((flags >> 11) & 0x0f) as u8,
            aa: flags & 0x0400 != 0,
            tc: flags & 0x0200 != 0,
            rd: flags & 0x0100 != 0,
            ra: flags & 0x0080 != 0,
            rcode: (flags & 0x000f) as u8,
            qdcount,
            ancount,
            nscount,
            arcount,
            question,
            answers,
            authority,
            additional,
            opt,
            len: msg.len(),
            question_end,
        })
    }

    /// Like `parse`, panicking with a readable message on failure.
    pub fn must(msg: &[u8]) -> Message {
        Message::parse(msg).unwrap_or_else(|e| panic!("unparsable DNS message ({e}): {msg:02x?}"))
    }

    /// Question name, or "" when there is none.
    pub fn qname(&self) -> &str {
        self.question.as_ref().map(|q| q.name.as_str()).unwrap_or("")
    }

    /// All IPv4 addresses in A records of the answer section.
    pub fn a_records(&self) -> Vec<Ipv4Addr> {
        self.answers
            .iter()
            .filter(|r| r.rtype == TYPE_A && r.rdata.len() == 4)
            .map(|r| Ipv4Addr::new(r.rdata[0], r.rdata[1], r.rdata[2], r.rdata[3]))
            .collect()
    }
}

/// The default answer of the test upstream: header copied with QR=1, RA=1,
/// RCODE 0, the question bytes, one A record (0xC00C, TTL 60, 192.0.2.1) and
/// an OPT (1232) if the query had one. `None` if the query has no parsable
/// first question.
pub fn default_answer(query: &[u8]) -> Option<Vec<u8>> {
    answer_with(query, |m| {
        push_rr_header(m, TYPE_A, ANSWER_TTL, 4);
        m.extend_from_slice(&ANSWER_ADDR.octets());
        1
    })
}

/// A big answer: `count` TXT records of one 240-byte string each (about
/// 253 bytes per record), e.g. 12 records give a ~3070-byte message.
pub fn big_answer(query: &[u8], count: usize) -> Option<Vec<u8>> {
    answer_with(query, |m| {
        for i in 0..count {
            push_rr_header(m, TYPE_TXT, ANSWER_TTL, 241);
            m.push(240);
            let fill = b'a' + (i % 26) as u8;
            m.resize(m.len() + 240, fill);
        }
        count as u16
    })
}

/// A response carrying only the question and the given rcode (e.g. SERVFAIL
/// from the upstream itself).
pub fn rcode_answer(query: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let mut out = answer_with(query, |_| 0)?;
    out[3] = (out[3] & 0xf0) | (rcode & 0x0f);
    Some(out)
}

fn push_rr_header(m: &mut Vec<u8>, rtype: u16, ttl: u32, rdlen: u16) {
    m.extend_from_slice(&[0xC0, 0x0C]);
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m.extend_from_slice(&ttl.to_be_bytes());
    m.extend_from_slice(&rdlen.to_be_bytes());
}

/// Builds header + first question copied from `query`, then lets `body`
/// append answer records (returning their count), then an OPT if the query
/// carried one.
fn answer_with(query: &[u8], body: impl FnOnce(&mut Vec<u8>) -> u16) -> Option<Vec<u8>> {
    let q = Message::parse(query).ok()?;
    q.question.as_ref()?;
    // End of the first question (copy only that one).
    let (_, name_end) = read_name(query, 12).ok()?;
    let q_end = name_end + 4;
    let mut m = Vec::with_capacity(q_end + 64);
    m.extend_from_slice(&query[..2]);
    // QR=1, keep opcode and RD, clear AA/TC; RA=1, Z=0, RCODE=0.
    m.push(0x80 | (query[2] & 0x79));
    m.push(0x80);
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // AN/NS/AR patched below
    m.extend_from_slice(&query[12..q_end]);
    let an = body(&mut m);
    m[6..8].copy_from_slice(&an.to_be_bytes());
    if q.opt.is_some() {
        push_opt(&mut m, UPSTREAM_EDNS_SIZE, false);
        m[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    Some(m)
}

/// Frames a message for TCP/TLS: 2-byte big-endian length prefix.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Pops every complete frame off the front of `buf`.
pub fn take_frames(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut p = 0;
    while buf.len() - p >= 2 {
        let len = u16::from_be_bytes([buf[p], buf[p + 1]]) as usize;
        if buf.len() - p - 2 < len {
            break;
        }
        out.push(buf[p + 2..p + 2 + len].to_vec());
        p += 2 + len;
    }
    buf.drain(..p);
    out
}
