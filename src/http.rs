//! A deliberately tiny HTTP/1.x responder for `/metrics` and `/healthz`,
//! served from the same loop as DNS.
//!
//! One request per connection, answered and closed. Requests larger than
//! [`MAX_REQUEST`] or slower than [`DEADLINE`] are cut off, and at most
//! [`MAX_CONNS`] are open, so a scraper cannot hold resources the DNS side
//! needs. What a route answers is the loop's (it has the state to render).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use slab::Slab;

use crate::timers::{Timer, Timers};
use crate::token::Source;

pub const MAX_REQUEST: usize = 4096;
/// Scrapes open at once, and how long one may take.
pub const MAX_CONNS: usize = 16;
pub const DEADLINE: Duration = Duration::from_secs(2);

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

struct HttpConn {
    gen: u32,
    opened: Instant,
    sock: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    answered: bool,
}

impl HttpConn {
    /// Read what is there, up to the request limit. Returns false when the
    /// client went away.
    fn read(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        while self.inbuf.len() < MAX_REQUEST {
            match self.sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Write the response; true once all of it is out (or the peer is gone).
    fn flush(&mut self) -> bool {
        while self.written < self.out.len() {
            match self.sock.write(self.out.get(self.written..).unwrap_or_default()) {
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

/// A complete request, to be answered with [`HttpServer::respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub key: usize,
    pub route: Route,
    pub head_only: bool,
}

/// The metrics listener and its connections.
pub struct HttpServer {
    listener: Option<TcpListener>,
    conns: Slab<HttpConn>,
    next_gen: u32,
    doomed: Vec<(usize, u32)>,
}

impl HttpServer {
    /// Listen on `addr`, if any; the bound address is returned.
    pub fn bind(addr: Option<SocketAddr>, registry: &Registry) -> Result<(HttpServer, Option<SocketAddr>), String> {
        let mut server = HttpServer {
            listener: None,
            conns: Slab::new(),
            next_gen: 0,
            doomed: Vec::new(),
        };
        let Some(addr) = addr else {
            return Ok((server, None));
        };
        let mut l = TcpListener::bind(addr).map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        registry
            .register(&mut l, Source::Metrics.token(), Interest::READABLE)
            .map_err(|e| format!("register metrics: {e}"))?;
        let bound = l.local_addr().map_err(|e| e.to_string())?;
        info!("metrics on http://{bound}/metrics");
        server.listener = Some(l);
        Ok((server, Some(bound)))
    }

    /// Accept every waiting connection; the keys admitted go to `fresh`,
    /// to be read at once (the request may have come with the handshake).
    pub fn accept(&mut self, now: Instant, registry: &Registry, timers: &mut Timers, fresh: &mut Vec<usize>) {
        loop {
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok((sock, _)) => {
                    if self.conns.len() >= MAX_CONNS && !self.evict_oldest_incomplete(registry) {
                        continue;
                    }
                    self.next_gen = self.next_gen.wrapping_add(1);
                    let gen = self.next_gen;
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let mut h = HttpConn {
                        gen,
                        opened: now,
                        sock,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        written: 0,
                        answered: false,
                    };
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if registry
                        .register(&mut h.sock, Source::Http(key).token(), interest)
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(h);
                    timers.add(now + DEADLINE, Timer::Http { key, gen });
                    fresh.push(key);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            }
        }
    }

    /// Full: the connection whose request has been incomplete longest
    /// makes room, so idle sockets cannot starve the health probes. `false`
    /// when every connection is writing its answer.
    fn evict_oldest_incomplete(&mut self, registry: &Registry) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, h)| !h.answered)
            .min_by_key(|(_, h)| h.opened)
            .map(|(k, _)| k);
        match oldest.and_then(|k| self.conns.try_remove(k)) {
            Some(mut h) => {
                let _ = registry.deregister(&mut h.sock);
                true
            }
            None => false,
        }
    }

    /// Readiness on connection `key`: a request once it is complete and
    /// unanswered; the rest (writing, closing) is handled here.
    pub fn on_event(&mut self, key: usize) -> Option<Request> {
        let h = self.conns.get_mut(key)?;
        if h.answered {
            if h.flush() {
                self.doomed.push((key, h.gen));
            }
            return None;
        }
        let alive = h.read();
        let Some(route) = route(&h.inbuf) else {
            if !alive {
                self.doomed.push((key, h.gen));
            }
            return None;
        };
        Some(Request {
            key,
            route,
            head_only: h.inbuf.starts_with(b"HEAD "),
        })
    }

    /// Answer request `req` and start writing it.
    pub fn respond(&mut self, req: Request, status: &str, content_type: &str, body: &[u8]) {
        let Some(h) = self.conns.get_mut(req.key) else { return };
        respond(&mut h.out, status, content_type, body, req.head_only);
        h.answered = true;
        if h.flush() {
            self.doomed.push((req.key, h.gen));
        }
    }

    /// A connection's deadline passed.
    pub fn on_timer(&mut self, key: usize, gen: u32) {
        if self.conns.get(key).is_some_and(|h| h.gen == gen) {
            self.doomed.push((key, gen));
        }
    }

    pub fn reap(&mut self, registry: &Registry) {
        for (key, gen) in std::mem::take(&mut self.doomed) {
            if self.conns.get(key).is_some_and(|h| h.gen == gen) {
                if let Some(mut h) = self.conns.try_remove(key) {
                    let _ = registry.deregister(&mut h.sock);
                }
            }
        }
    }

    /// Stop listening (shutdown).
    pub fn stop(&mut self, registry: &Registry) {
        if let Some(mut l) = self.listener.take() {
            let _ = registry.deregister(&mut l);
        }
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
