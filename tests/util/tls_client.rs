//! A small blocking DNS-over-TLS client, used to self-test the upstream and
//! the certificate factory without the proxy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore};

use super::certs::provider;
use super::dns;

/// A client config trusting exactly `roots` (ring provider, TLS 1.2+1.3).
pub fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// What `TlsClient::next_event` saw.
#[derive(Debug)]
pub enum TlsEvent {
    /// One DNS message (unframed).
    Frame(Vec<u8>),
    /// Nothing before the deadline.
    Timeout,
    /// The peer sent close_notify.
    CloseNotify,
    /// TCP EOF without close_notify.
    Eof,
    /// Connection reset by peer.
    Reset,
    /// Any other error (TLS or IO).
    Error(String),
}

pub struct TlsClient {
    sock: TcpStream,
    tls: ClientConnection,
    inbuf: Vec<u8>,
    frames: std::collections::VecDeque<Vec<u8>>,
    closed: Option<TlsEvent>,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl TlsClient {
    /// Connects and completes the handshake before `deadline`.
    pub fn connect(
        addr: SocketAddr,
        server_name: &str,
        config: Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<TlsClient, String> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
        let tls = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let left = deadline.saturating_duration_since(Instant::now());
        let sock = TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1)))
            .map_err(|e| format!("connect: {e}"))?;
        sock.set_nodelay(true).ok();
        sock.set_read_timeout(Some(Duration::from_millis(10))).ok();
        sock.set_write_timeout(Some(Duration::from_secs(2))).ok();
        let mut c = TlsClient {
            sock,
            tls,
            inbuf: Vec::new(),
            frames: Default::default(),
            closed: None,
        };
        while c.tls.is_handshaking() {
            if Instant::now() >= deadline {
                return Err("handshake timed out".into());
            }
            match c.tls.complete_io(&mut c.sock) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    return Err(format!("handshake: {e}"));
                }
            }
        }
        Ok(c)
    }

    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.tls.handshake_kind()
    }

    /// Sends all messages framed, in one plaintext write (so small ones share
    /// one TLS record).
    pub fn send(&mut self, msgs: &[Vec<u8>]) -> io::Result<()> {
        let mut buf = Vec::new();
        for m in msgs {
            buf.extend_from_slice(&dns::frame(m));
        }
        self.send_raw(&buf)
    }

    /// Sends raw plaintext bytes (no framing).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)?;
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    pub fn send_close_notify(&mut self) -> io::Result<()> {
        self.tls.send_close_notify();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    /// The next frame, or how the connection ended, before `deadline`.
    pub fn next_event(&mut self, deadline: Instant) -> TlsEvent {
        let mut rbuf = vec![0u8; 65536];
        loop {
            if let Some(f) = self.frames.pop_front() {
                return TlsEvent::Frame(f);
            }
            if let Some(ev) = &self.closed {
                return match ev {
                    TlsEvent::CloseNotify => TlsEvent::CloseNotify,
                    TlsEvent::Eof => TlsEvent::Eof,
                    TlsEvent::Reset => TlsEvent::Reset,
                    TlsEvent::Error(s) => TlsEvent::Error(s.clone()),
                    _ => TlsEvent::Eof,
                };
            }
            if Instant::now() >= deadline {
                return TlsEvent::Timeout;
            }
            let eof = match self.tls.read_tls(&mut self.sock) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if is_timeout(&e) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.closed = Some(TlsEvent::Reset);
                    continue;
                }
                Err(e) => {
                    self.closed = Some(TlsEvent::Error(e.to_string()));
                    continue;
                }
            };
            let state = match self.tls.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    self.closed = Some(TlsEvent::Error(e.to_string()));
                    continue;
                }
            };
            loop {
                match self.tls.reader().read(&mut rbuf) {
                    Ok(0) => {
                        self.closed = Some(TlsEvent::CloseNotify);
                        break;
                    }
                    Ok(n) => self.inbuf.extend_from_slice(&rbuf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.closed = Some(TlsEvent::Eof);
                        break;
                    }
                    Err(e) => {
                        self.closed = Some(TlsEvent::Error(e.to_string()));
                        break;
                    }
                }
            }
            self.frames.extend(dns::take_frames(&mut self.inbuf));
            if state.peer_has_closed() && self.closed.is_none() {
                self.closed = Some(TlsEvent::CloseNotify);
            }
            if eof && self.closed.is_none() {
                self.closed = Some(TlsEvent::Eof);
            }
        }
    }

    /// The next frame before `deadline`, `None` on timeout or close.
    pub fn recv(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        match self.next_event(deadline) {
            TlsEvent::Frame(f) => Some(f),
            _ => None,
        }
    }

    /// Raw socket access (e.g. to inject garbage).
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub fn read_raw(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
}
