//! Names (RFC 1035 §3.1, §4.1.4): read with compression, kept in canonical
//! form (lower case, uncompressed) for keys and zone matching.

use super::{WireError, HEADER_LEN, MAX_HOPS, MAX_NAME};

/// A name in canonical form: wire labels, lower-cased, uncompressed.
#[derive(Clone)]
pub struct Name {
    buf: [u8; MAX_NAME],
    len: usize,
}

impl Name {
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl Eq for Name {}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Name({self})")
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

/// `corp.example` → canonical wire form, for configured zones.
pub fn zone_wire(zone: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for label in zone.split('.').filter(|l| !l.is_empty()) {
        w.push(label.len() as u8);
        w.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    w.push(0);
    w
}

/// Whether the name at `at`, pointers followed, reads any byte of the
/// 4-byte fields starting at `fields`.
pub fn name_touches(msg: &[u8], mut at: usize, fields: &[u16]) -> bool {
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
