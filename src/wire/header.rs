//! The 12-byte message header as a checked view (RFC 1035 §4.1.1).
//!
//! [`Header::new_checked`] tests the length once; after it no accessor can
//! panic or read out of bounds, whatever the bytes say. Getters need only
//! `AsRef<[u8]>`; setters need `AsMut<[u8]>`, so a read-only view cannot
//! change a message by accident.
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

use super::{field, WireError, HEADER_LEN};

pub(crate) const QR: u8 = 0x80;
pub(crate) const TC: u8 = 0x02;
pub(crate) const RD: u8 = 0x01;
pub(crate) const RA: u8 = 0x80;
pub(crate) const CD: u8 = 0x10;

/// A message header over at least [`HEADER_LEN`] bytes.
#[derive(Debug, Clone, Copy)]
pub struct Header<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// The view, once the buffer is known to hold a whole header.
    pub fn new_checked(buf: T) -> Result<Header<T>, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Short);
        }
        Ok(Header { buf })
    }

    fn byte(&self, at: usize) -> u8 {
        // In bounds by construction (new_checked); 0 keeps it total anyway.
        self.buf.as_ref().get(at).copied().unwrap_or(0)
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.byte(at), self.byte(at + 1)])
    }

    pub fn id(&self) -> u16 {
        self.u16_at(field::ID)
    }

    pub fn is_response(&self) -> bool {
        self.byte(field::FLAGS_HI) & QR != 0
    }

    pub fn opcode(&self) -> u8 {
        (self.byte(field::FLAGS_HI) >> 3) & 0x0f
    }

    pub fn truncated(&self) -> bool {
        self.byte(field::FLAGS_HI) & TC != 0
    }

    pub fn recursion_desired(&self) -> bool {
        self.byte(field::FLAGS_HI) & RD != 0
    }

    pub fn checking_disabled(&self) -> bool {
        self.byte(field::FLAGS_LO) & CD != 0
    }

    /// The 4-bit RCODE of the header (an OPT record may extend it).
    pub fn rcode(&self) -> Rcode {
        Rcode::from(u16::from(self.byte(field::FLAGS_LO) & 0x0f))
    }

    /// Both flag bytes, for answers that copy them.
    pub fn flags(&self) -> [u8; 2] {
        [self.byte(field::FLAGS_HI), self.byte(field::FLAGS_LO)]
    }

    pub fn qdcount(&self) -> u16 {
        self.u16_at(field::QDCOUNT)
    }

    pub fn ancount(&self) -> u16 {
        self.u16_at(field::ANCOUNT)
    }

    pub fn nscount(&self) -> u16 {
        self.u16_at(field::NSCOUNT)
    }

    pub fn arcount(&self) -> u16 {
        self.u16_at(field::ARCOUNT)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    fn put_u16(&mut self, at: usize, v: u16) {
        if let Some(b) = self.buf.as_mut().get_mut(at..at + 2) {
            b.copy_from_slice(&v.to_be_bytes());
        }
    }

    pub fn set_id(&mut self, id: u16) {
        self.put_u16(field::ID, id);
    }

    /// RFC 1035 §4.1.1: RD is copied from the query into the response; an
    /// answer shared between queries takes each client's own bit.
    pub fn set_recursion_desired(&mut self, rd: bool) {
        if let Some(b) = self.buf.as_mut().get_mut(field::FLAGS_HI) {
            *b = (*b & !RD) | if rd { RD } else { 0 };
        }
    }

    pub fn set_arcount(&mut self, n: u16) {
        self.put_u16(field::ARCOUNT, n);
    }
}

/// A response code (RFC 1035 §4.1.1, RFC 6891 §6.1.3 for the extended
/// ones). Values dotproxy has no name for are kept, not rejected: a
/// forwarder passes on what it does not understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
    /// 16, only in an OPT-extended RCODE.
    BadVers,
    Unknown(u16),
}

impl From<u16> for Rcode {
    fn from(v: u16) -> Rcode {
        match v {
            0 => Rcode::NoError,
            1 => Rcode::FormErr,
            2 => Rcode::ServFail,
            3 => Rcode::NxDomain,
            4 => Rcode::NotImp,
            5 => Rcode::Refused,
            16 => Rcode::BadVers,
            other => Rcode::Unknown(other),
        }
    }
}

impl From<Rcode> for u16 {
    fn from(r: Rcode) -> u16 {
        match r {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
            Rcode::Unknown(v) => v,
        }
    }
}

impl Rcode {
    /// The mnemonic (IANA "DNS RCODEs" registry), for metrics labels.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 17] = [
            "NOERROR",
            "FORMERR",
            "SERVFAIL",
            "NXDOMAIN",
            "NOTIMP",
            "REFUSED",
            "YXDOMAIN",
            "YXRRSET",
            "NXRRSET",
            "NOTAUTH",
            "NOTZONE",
            "DSOTYPENI",
            "RCODE12",
            "RCODE13",
            "RCODE14",
            "RCODE15",
            "BADVERS",
        ];
        NAMES.get(usize::from(u16::from(self))).copied().unwrap_or("OTHER")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn short_buffers_are_refused_once() {
        assert_eq!(Header::new_checked(&[0u8; 11][..]).err(), Some(WireError::Short));
        assert!(Header::new_checked(&[0u8; 12][..]).is_ok());
    }

    #[test]
    fn fields_read_and_write() {
        // 0xa5 everywhere: a field that is read from the wrong place shows.
        let mut buf = [0xa5u8; 12];
        let mut h = Header::new_checked(&mut buf[..]).unwrap();
        assert_eq!(h.id(), 0xa5a5);
        assert!(h.is_response() && h.recursion_desired() && !h.truncated() && !h.checking_disabled());
        assert_eq!(h.opcode(), 4);
        assert_eq!(h.rcode(), Rcode::Refused);
        h.set_id(0x1234);
        h.set_recursion_desired(false);
        h.set_arcount(1);
        assert_eq!(h.id(), 0x1234);
        assert!(!h.recursion_desired());
        assert_eq!(h.arcount(), 1);
        assert_eq!(buf, [0x12, 0x34, 0xa4, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0, 1]);
    }

    #[test]
    fn unknown_rcodes_are_kept() {
        for v in 0..4096u16 {
            assert_eq!(u16::from(Rcode::from(v)), v);
        }
        assert_eq!(Rcode::from(12).name(), "RCODE12");
        assert_eq!(Rcode::from(300).name(), "OTHER");
        assert_eq!(Rcode::ServFail.name(), "SERVFAIL");
    }
}
