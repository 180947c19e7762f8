//! The 2-byte length framing of DNS over TCP (RFC 1035 §4.2.2), shared by
//! the client leg (RFC 7766) and the upstream leg (RFC 7858 §3.3).
//!
//! Bytes arrive in arbitrary pieces; [`FrameDecoder`] keeps what has come
//! and hands out whole messages one at a time. It owns one buffer that is
//! reused for the life of the connection.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

/// A frame that cannot be a DNS message: the stream has lost sync and the
/// connection must close (RFC 7766 §8 gives no way to resynchronise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooShort(pub usize);

impl std::fmt::Display for FrameTooShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frame of {} bytes is shorter than a DNS header", self.0)
    }
}

#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    /// Bytes received and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Room to read into directly: the caller writes up to `n` bytes into
    /// the returned slice and then calls [`commit`](Self::commit).
    pub fn spare(&mut self, n: usize) -> &mut [u8] {
        self.compact();
        let len = self.buf.len();
        self.buf.resize(len + n, 0);
        self.buf.get_mut(len..).unwrap_or_default()
    }

    /// Read up to `want` bytes from `r` (rustls' plaintext, which said how
    /// much it holds) straight into the buffer.
    pub fn read_from(&mut self, r: &mut impl std::io::Read, want: usize) {
        let buf = self.spare(want);
        let mut got = 0;
        while got < want {
            match r.read(buf.get_mut(got..).unwrap_or_default()) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        self.commit(want, got);
    }

    /// Keep `used` of the bytes last offered by [`spare`](Self::spare).
    pub fn commit(&mut self, offered: usize, used: usize) {
        let keep = self.buf.len() - offered + used.min(offered);
        self.buf.truncate(keep);
    }

    /// Move the next whole message into `out` (replacing its content).
    /// `Ok(false)` means the next frame is not complete yet.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Result<bool, FrameTooShort> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let [hi, lo, rest @ ..] = pending else {
            return Ok(false);
        };
        let len = u16::from_be_bytes([*hi, *lo]) as usize;
        if len < crate::wire::HEADER_LEN {
            return Err(FrameTooShort(len));
        }
        let Some(msg) = rest.get(..len) else {
            return Ok(false);
        };
        out.clear();
        out.extend_from_slice(msg);
        self.start += 2 + len;
        Ok(true)
    }

    /// Drop consumed bytes so the buffer does not creep forward forever.
    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        if self.start == self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..self.start);
        }
        self.start = 0;
    }

    /// Give back memory after a burst, keeping a small buffer for reuse.
    pub fn shrink(&mut self) {
        self.compact();
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
    }
}

/// Append `msg` with its length prefix. Messages over 65,535 bytes cannot
/// be framed; callers never build them (answers are read from frames).
pub fn push_frame(out: &mut Vec<u8>, msg: &[u8]) {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg.get(..len as usize).unwrap_or_default());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn frames(msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut s = Vec::new();
        for m in msgs {
            push_frame(&mut s, m);
        }
        s
    }

    #[test]
    fn any_chunking_yields_the_same_frames() {
        let msgs: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 12 + i as usize * 7]).collect();
        let stream = frames(&msgs);
        for chunk in [1, 2, 3, 13, 64, stream.len()] {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                d.push(piece);
                while d.next_into(&mut out).unwrap() {
                    got.push(out.clone());
                }
            }
            assert_eq!(got, msgs, "chunk {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn short_frames_are_errors() {
        let mut d = FrameDecoder::default();
        d.push(&[0, 0]);
        assert_eq!(d.next_into(&mut Vec::new()), Err(FrameTooShort(0)));
        let mut d = FrameDecoder::default();
        d.push(&[0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(d.next_into(&mut Vec::new()), Err(FrameTooShort(5)));
    }

    #[test]
    fn spare_and_commit() {
        let mut d = FrameDecoder::default();
        let s = d.spare(100);
        s[..14].copy_from_slice(&[0, 12, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        d.commit(100, 14);
        let mut out = Vec::new();
        assert!(d.next_into(&mut out).unwrap());
        assert_eq!(out, vec![1; 12]);
    }
}
