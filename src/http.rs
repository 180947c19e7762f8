//! A deliberately tiny HTTP/1.x responder for `/metrics` and `/healthz`,
//! served from the same loop as DNS.
//!
//! One request per connection, answered and closed. Requests larger than
//! [`MAX_REQUEST`] or slower than the proxy's deadline are cut off, so a
//! scraper cannot hold resources the DNS side needs.

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;

pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    NotFound,
    MethodNotAllowed,
    TooLarge,
    BadRequest,
}

/// Route a request once its head is complete; `None` while it is not.
pub fn route(buf: &[u8]) -> Option<Route> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (buf.len() >= MAX_REQUEST).then_some(Route::TooLarge);
    };
    let head = &buf[..end];
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Some(Route::BadRequest);
    };
    if !version.starts_with(b"HTTP/1.") {
        return Some(Route::BadRequest);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or(&[]);
    let route = match path {
        b"/metrics" => Route::Metrics,
        b"/healthz" => Route::Health,
        _ => return Some(Route::NotFound),
    };
    if method != b"GET" && method != b"HEAD" {
        return Some(Route::MethodNotAllowed);
    }
    Some(route)
}

/// A whole response with `Connection: close`.
pub fn respond(out: &mut Vec<u8>, status: &str, content_type: &str, body: &[u8], head_only: bool) {
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
}

pub struct HttpConn {
    pub gen: u32,
    sock: TcpStream,
    pub inbuf: Vec<u8>,
    pub out: Vec<u8>,
    written: usize,
    pub answered: bool,
    pub opened: Instant,
}

impl HttpConn {
    pub fn new(sock: TcpStream, gen: u32, now: Instant) -> Self {
        HttpConn {
            gen,
            sock,
            inbuf: Vec::new(),
            out: Vec::new(),
            written: 0,
            answered: false,
            opened: now,
        }
    }

    pub fn source(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Read what is there, up to the request limit. Returns false when the
    /// client went away.
    pub fn read(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        while self.inbuf.len() < MAX_REQUEST {
            match self.sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Write the response; true once all of it is out (or the peer is gone).
    pub fn flush(&mut self) -> bool {
        while self.written < self.out.len() {
            match self.sock.write(&self.out[self.written..]) {
                Ok(0) => return true,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        true
    }
}

/// Prometheus text exposition helpers (format 0.0.4).
pub struct Exposition(pub String);

impl Exposition {
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Route::Metrics));
        assert_eq!(route(b"GET /healthz?x=1 HTTP/1.0\r\n\r\n"), Some(Route::Health));
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Some(Route::MethodNotAllowed));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(route(&[b'a'; MAX_REQUEST]), Some(Route::TooLarge));
        assert_eq!(route(b"garbage\r\n\r\n"), Some(Route::BadRequest));
    }
}
