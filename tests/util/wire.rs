//! Hand-built DNS messages for fault tests: queries with arbitrary OPT
//! records (options, flags, version), answers of exact sizes, answers with
//! chosen options (padding, keepalive, EDE), and readers for the OPT
//! options of a parsed message.

use super::dns::{self, encode_name, Message, CLASS_IN, TYPE_A, TYPE_OPT, TYPE_TXT};

pub const OPT_COOKIE: u16 = 10;
pub const OPT_KEEPALIVE: u16 = 11;
pub const OPT_PADDING: u16 = 12;
pub const OPT_EDE: u16 = 15;
pub const OPT_NSID: u16 = 3;

pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;

/// An OPT pseudo-record to write.
#[derive(Clone, Debug)]
pub struct OptSpec {
    pub udp_size: u16,
    pub ext_rcode: u8,
    pub version: u8,
    /// The 16 flag bits (DO = 0x8000).
    pub flags: u16,
    pub options: Vec<(u16, Vec<u8>)>,
    /// Owner name in wire form (root = [0]).
    pub owner: Vec<u8>,
    /// Overrides the computed RDLEN (to make options overrun it).
    pub rdlen: Option<u16>,
}

impl OptSpec {
    pub fn new(udp_size: u16) -> OptSpec {
        OptSpec {
            udp_size,
            ext_rcode: 0,
            version: 0,
            flags: 0,
            options: Vec::new(),
            owner: vec![0],
            rdlen: None,
        }
    }

    /// The OPT a real stub sends (dig, kdig, systemd-resolved): 1232 and a
    /// client cookie (RFC 7873). The cookie leaves room for an Extended DNS
    /// Error code in the proxy's own UDP answers, which are never larger
    /// than the query (the EDE text needs TCP or more room).
    pub fn stub() -> OptSpec {
        OptSpec::new(1232).option(OPT_COOKIE, &[0x5a; 8])
    }

    pub fn option(mut self, code: u16, data: &[u8]) -> OptSpec {
        self.options.push((code, data.to_vec()));
        self
    }

    pub fn flags(mut self, flags: u16) -> OptSpec {
        self.flags = flags;
        self
    }

    pub fn version(mut self, v: u8) -> OptSpec {
        self.version = v;
        self
    }

    pub fn ext_rcode(mut self, r: u8) -> OptSpec {
        self.ext_rcode = r;
        self
    }

    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut rdata = Vec::new();
        for (code, data) in &self.options {
            rdata.extend_from_slice(&code.to_be_bytes());
            rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
            rdata.extend_from_slice(data);
        }
        let mut out = self.owner.clone();
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&self.udp_size.to_be_bytes());
        out.push(self.ext_rcode);
        out.push(self.version);
        out.extend_from_slice(&self.flags.to_be_bytes());
        let rdlen = self.rdlen.unwrap_or(rdata.len() as u16);
        out.extend_from_slice(&rdlen.to_be_bytes());
        out.extend_from_slice(&rdata);
        out
    }
}

/// A query: header (flags byte 2 = RD, plus `opcode`), one question, and
/// the given OPT records (0, 1 or several) in the additional section.
pub fn query_opts(id: u16, qname: &str, qtype: u16, opts: &[OptSpec]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0]);
    m.extend_from_slice(&(opts.len() as u16).to_be_bytes());
    m.extend_from_slice(&encode_name(qname));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    for o in opts {
        m.extend_from_slice(&o.encode());
    }
    m
}

/// A query with one OPT.
pub fn query_opt(id: u16, qname: &str, opt: OptSpec) -> Vec<u8> {
    query_opts(id, qname, TYPE_A, &[opt])
}

/// The OPT record of a parsed message: (flags, options).
pub fn opt_of(m: &Message) -> Option<(u16, Vec<(u16, Vec<u8>)>)> {
    let opt = m.additional.iter().find(|r| r.rtype == TYPE_OPT)?;
    let flags = (opt.ttl & 0xffff) as u16;
    let mut out = Vec::new();
    let mut rest = opt.rdata.as_slice();
    // Bounded: each turn consumes at least 4 bytes.
    while rest.len() >= 4 {
        let code = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let end = (4 + len).min(rest.len());
        out.push((code, rest[4..end].to_vec()));
        rest = &rest[end..];
    }
    Some((flags, out))
}

/// The option codes in a message's OPT (empty without OPT).
pub fn option_codes(m: &Message) -> Vec<u16> {
    opt_of(m)
        .map(|(_, o)| o.iter().map(|x| x.0).collect())
        .unwrap_or_default()
}

/// Extended DNS Errors in a message: (INFO-CODE, EXTRA-TEXT).
pub fn ede_of(m: &Message) -> Vec<(u16, String)> {
    opt_of(m)
        .map(|(_, opts)| {
            opts.iter()
                .filter(|(c, d)| *c == OPT_EDE && d.len() >= 2)
                .map(|(_, d)| {
                    (
                        u16::from_be_bytes([d[0], d[1]]),
                        String::from_utf8_lossy(&d[2..]).to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A SERVFAIL with the client's ID carrying one of the Extended DNS Error
/// codes in `edes` (RFC 8914: 0 other, 22 no reachable authority, 23
/// network error).
pub fn assert_servfail_ede(m: &Message, id: u16, edes: &[u16], what: &str) {
    assert_eq!(m.id, id, "{what}: ID");
    assert!(m.qr, "{what}: QR not set");
    assert_eq!(m.rcode, dns::RCODE_SERVFAIL, "{what}: rcode");
    let got = ede_of(m);
    assert!(
        got.iter().any(|(c, _)| edes.contains(c)),
        "{what}: EDE {got:?}, wanted one of {edes:?}"
    );
}

/// The raw question bytes (name + type + class) of a message, from offset 12.
pub fn question_bytes(msg: &[u8]) -> Vec<u8> {
    let (_, end) = dns::read_name(msg, 12).expect("question name");
    msg[12..end + 4].to_vec()
}

/// Builder for an upstream answer to `query` (the query as the upstream
/// received it): ID, opcode and RD copied, QR=1, RA=1, question copied.
#[derive(Clone, Debug)]
pub struct Resp {
    id: u16,
    flags: [u8; 2],
    question: Option<Vec<u8>>,
    answers: Vec<Vec<u8>>,
    authority: Vec<Vec<u8>>,
    additional: Vec<Vec<u8>>,
    opt: Option<OptSpec>,
    extra_opts: Vec<OptSpec>,
    trailing: Vec<u8>,
}

impl Resp {
    pub fn to(query: &[u8]) -> Resp {
        Resp {
            id: u16::from_be_bytes([query[0], query[1]]),
            flags: [0x80 | (query[2] & 0x79), 0x80],
            question: Some(question_bytes(query)),
            answers: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            opt: None,
            extra_opts: Vec::new(),
            trailing: Vec::new(),
        }
    }

    pub fn id(mut self, id: u16) -> Resp {
        self.id = id;
        self
    }

    pub fn rcode(mut self, rc: u8) -> Resp {
        self.flags[1] = (self.flags[1] & 0xf0) | (rc & 0x0f);
        self
    }

    pub fn tc(mut self) -> Resp {
        self.flags[0] |= 0x02;
        self
    }

    /// Clears QR (a "query" coming back from the upstream).
    pub fn qr0(mut self) -> Resp {
        self.flags[0] &= 0x7f;
        self
    }

    /// No question section (header-only answers).
    pub fn no_question(mut self) -> Resp {
        self.question = None;
        self
    }

    /// Replaces the question (e.g. another name, or different case).
    pub fn question(mut self, qname: &str, qtype: u16) -> Resp {
        let mut q = encode_name(qname);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.question = Some(q);
        self
    }

    /// Lower-cases the copied question name (an upstream that does not
    /// echo the client's 0x20 case).
    pub fn question_lowercase(mut self) -> Resp {
        if let Some(q) = &mut self.question {
            q.make_ascii_lowercase();
        }
        self
    }

    /// One A record 192.0.2.1 owned by the question name (pointer 0xC00C).
    pub fn a(mut self) -> Resp {
        let mut rr = rr_header(&[0xC0, 0x0C], TYPE_A, 4);
        rr.extend_from_slice(&dns::ANSWER_ADDR.octets());
        self.answers.push(rr);
        self
    }

    /// One TXT record whose RDATA is exactly `rdlen` bytes (>= 1).
    pub fn txt(mut self, rdlen: usize) -> Resp {
        self.answers.push(txt_rr(rdlen));
        self
    }

    /// A raw record (any bytes) in the answer section.
    pub fn raw_answer(mut self, rr: Vec<u8>) -> Resp {
        self.answers.push(rr);
        self
    }

    pub fn raw_authority(mut self, rr: Vec<u8>) -> Resp {
        self.authority.push(rr);
        self
    }

    pub fn raw_additional(mut self, rr: Vec<u8>) -> Resp {
        self.additional.push(rr);
        self
    }

    pub fn opt(mut self, opt: OptSpec) -> Resp {
        self.opt = Some(opt);
        self
    }

    /// A second (third...) OPT record after the first.
    pub fn another_opt(mut self, opt: OptSpec) -> Resp {
        self.extra_opts.push(opt);
        self
    }

    /// Bytes after the last record (not counted anywhere).
    pub fn trailing(mut self, bytes: &[u8]) -> Resp {
        self.trailing = bytes.to_vec();
        self
    }

    /// Size of the message as built now (to compute padding).
    pub fn len(&self) -> usize {
        self.build().len()
    }

    pub fn build(&self) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.flags);
        let ar = self.additional.len() + usize::from(self.opt.is_some()) + self.extra_opts.len();
        for c in [
            usize::from(self.question.is_some()),
            self.answers.len(),
            self.authority.len(),
            ar,
        ] {
            m.extend_from_slice(&(c as u16).to_be_bytes());
        }
        if let Some(q) = &self.question {
            m.extend_from_slice(q);
        }
        for rr in self.answers.iter().chain(&self.authority).chain(&self.additional) {
            m.extend_from_slice(rr);
        }
        if let Some(o) = &self.opt {
            m.extend_from_slice(&o.encode());
        }
        for o in &self.extra_opts {
            m.extend_from_slice(&o.encode());
        }
        m.extend_from_slice(&self.trailing);
        m
    }

    /// Adds TXT data so the built message is exactly `total` bytes
    /// (panics if it is already too big for that).
    pub fn sized(self, total: usize) -> Resp {
        let now = self.len();
        // A TXT RR costs 12 bytes plus its RDATA (>= 1 byte).
        assert!(total >= now + 13, "cannot size a {now}-byte answer to {total}");
        self.txt(total - now - 12)
    }
}

/// RR header with the given owner bytes, type, class IN, TTL 60, RDLEN.
pub fn rr_header(owner: &[u8], rtype: u16, rdlen: u16) -> Vec<u8> {
    let mut rr = owner.to_vec();
    rr.extend_from_slice(&rtype.to_be_bytes());
    rr.extend_from_slice(&CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&60u32.to_be_bytes());
    rr.extend_from_slice(&rdlen.to_be_bytes());
    rr
}

/// A TXT RR (owner: pointer to the question) with RDATA of exactly
/// `rdlen` bytes, made of <=255-byte strings.
pub fn txt_rr(rdlen: usize) -> Vec<u8> {
    assert!((1..=65535).contains(&rdlen));
    let mut rdata = Vec::with_capacity(rdlen);
    let mut left = rdlen;
    let mut fill = b'a';
    // Bounded: each turn consumes at least one byte.
    while left > 0 {
        let n = (left - 1).min(255);
        rdata.push(n as u8);
        rdata.resize(rdata.len() + n, fill);
        fill = if fill == b'z' { b'a' } else { fill + 1 };
        left -= n + 1;
    }
    let mut rr = rr_header(&[0xC0, 0x0C], TYPE_TXT, rdlen as u16);
    rr.extend_from_slice(&rdata);
    rr
}

/// An edns-tcp-keepalive option's data (TIMEOUT in units of 100 ms).
pub fn keepalive(timeout: u16) -> Vec<u8> {
    timeout.to_be_bytes().to_vec()
}

/// An EDE option's data.
pub fn ede(code: u16, text: &str) -> Vec<u8> {
    let mut d = code.to_be_bytes().to_vec();
    d.extend_from_slice(text.as_bytes());
    d
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
