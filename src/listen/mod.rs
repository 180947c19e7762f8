//! The client leg: plain DNS over UDP and TCP (RFC 1035, RFC 7766).
//!
//! - [`socket`]: binding and socket options.
//! - [`udp`]: one UDP listener with its send backlog.
//! - [`tcp`]: the TCP client table and its admission limits.
//! - [`client`]: one TCP client connection.
//!
//! [`Listeners`] owns the listening sockets themselves.

pub mod client;
pub mod socket;
pub mod tcp;
pub mod tls;
pub mod udp;

use std::io;
use std::net::SocketAddr;

use log::{info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use crate::token::{Source, MAX_LISTENERS};
use udp::UdpListener;

/// The outcome of one `accept`.
pub enum Accept {
    Conn(TcpStream, SocketAddr),
    /// Nothing more now, or the listener is closed.
    Empty,
    /// Out of descriptors or a like condition: the pending connection
    /// stays queued and its edge will not fire again, so the caller retries
    /// on a timer instead of spinning.
    Retry(io::Error),
}

#[derive(Default)]
pub struct Listeners {
    udp: Vec<UdpListener>,
    tcp: Vec<Option<TcpListener>>,
    /// One accept-retry timer per listener at most.
    retry_armed: Vec<bool>,
    /// Which TCP listeners serve DNS over TLS (`--listen-tls`).
    tls: Vec<bool>,
    bound: Vec<(&'static str, SocketAddr)>,
}

impl Listeners {
    /// Bind UDP and TCP on every address and register them.
    pub fn bind(
        addrs: &[SocketAddr],
        reuseport: bool,
        max_query: usize,
        registry: &Registry,
    ) -> Result<Listeners, String> {
        if addrs.len() > MAX_LISTENERS {
            return Err(format!("at most {MAX_LISTENERS} listen addresses"));
        }
        let mut l = Listeners::default();
        for (i, &addr) in addrs.iter().enumerate() {
            let (mut u, mut t) =
                socket::bind_pair(addr, reuseport).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            socket::set_rcvbuf(&u, socket::UDP_RCVBUF);
            registry
                .register(&mut u, Source::Udp(i).token(), Interest::READABLE | Interest::WRITABLE)
                .and_then(|_| registry.register(&mut t, Source::TcpListener(i).token(), Interest::READABLE))
                .map_err(|e| format!("register {addr}: {e}"))?;
            let ua = u.local_addr().map_err(|e| e.to_string())?;
            let ta = t.local_addr().map_err(|e| e.to_string())?;
            info!("listening on udp {ua}");
            info!("listening on tcp {ta}");
            l.bound.push(("udp", ua));
            l.bound.push(("tcp", ta));
            l.udp.push(UdpListener::new(u, max_query));
            l.push_tcp(t, false);
        }
        Ok(l)
    }

    /// Serve on the sockets the service manager passed instead of binding:
    /// they replace `--listen` entirely (the unit's ExecStart may keep
    /// its --listen for when it runs without its socket unit).
    pub fn adopt(
        fds: Vec<crate::systemd::PassedFd>,
        max_query: usize,
        registry: &Registry,
    ) -> Result<Listeners, String> {
        let mut l = Listeners::default();
        for passed in fds {
            let from = match &passed.name {
                Some(name) => format!("passed by systemd, {name:?}"),
                None => "passed by systemd".to_string(),
            };
            match socket::adopt(passed.fd).map_err(|e| format!("LISTEN_FDS: {e}"))? {
                (socket::Passed::Udp(mut u), addr) => {
                    let i = l.udp.len();
                    if i >= MAX_LISTENERS {
                        return Err(format!("LISTEN_FDS: at most {MAX_LISTENERS} UDP sockets"));
                    }
                    registry
                        .register(&mut u, Source::Udp(i).token(), Interest::READABLE | Interest::WRITABLE)
                        .map_err(|e| format!("register udp {addr}: {e}"))?;
                    info!("listening on udp {addr} ({from})");
                    l.bound.push(("udp", addr));
                    l.udp.push(UdpListener::new(u, max_query));
                }
                (socket::Passed::Tcp(mut t), addr) => {
                    let i = l.tcp.len();
                    if i >= MAX_LISTENERS {
                        return Err(format!("LISTEN_FDS: at most {MAX_LISTENERS} TCP sockets"));
                    }
                    registry
                        .register(&mut t, Source::TcpListener(i).token(), Interest::READABLE)
                        .map_err(|e| format!("register tcp {addr}: {e}"))?;
                    info!("listening on tcp {addr} ({from})");
                    l.bound.push(("tcp", addr));
                    l.push_tcp(t, false);
                }
            }
        }
        // Either alone works, but clients then lose something they rely on.
        if l.tcp.is_empty() {
            warn!("no TCP socket passed: truncated UDP answers cannot be retried over TCP");
        }
        if l.udp.is_empty() {
            warn!("no UDP socket passed: only DNS over TCP is served");
        }
        Ok(l)
    }

    /// Bind the DNS-over-TLS listeners (TCP only) after the others.
    pub fn bind_tls(&mut self, addrs: &[SocketAddr], reuseport: bool, registry: &Registry) -> Result<(), String> {
        for &addr in addrs {
            let i = self.tcp.len();
            if i >= MAX_LISTENERS {
                return Err(format!("at most {MAX_LISTENERS} TCP listeners"));
            }
            let mut t = socket::bind_tcp(addr, reuseport).map_err(|e| format!("cannot listen on {addr} (tls): {e}"))?;
            registry
                .register(&mut t, Source::TcpListener(i).token(), Interest::READABLE)
                .map_err(|e| format!("register {addr}: {e}"))?;
            let ta = t.local_addr().map_err(|e| e.to_string())?;
            info!("listening on tls {ta}");
            self.bound.push(("tls", ta));
            self.push_tcp(t, true);
        }
        Ok(())
    }

    /// A TCP listener at the next index (its token's), with its retry flag
    /// and whether it serves DNS over TLS kept beside it.
    fn push_tcp(&mut self, t: TcpListener, tls: bool) {
        self.tcp.push(Some(t));
        self.retry_armed.push(false);
        self.tls.push(tls);
    }

    /// Whether TCP listener `i` serves DNS over TLS.
    pub fn is_tls(&self, i: usize) -> bool {
        self.tls.get(i).copied().unwrap_or(false)
    }

    /// The addresses bound, as ("udp" | "tcp" | "tls", address).
    pub fn bound(&self) -> &[(&'static str, SocketAddr)] {
        &self.bound
    }

    pub fn udp(&mut self, i: usize) -> Option<&mut UdpListener> {
        self.udp.get_mut(i)
    }

    pub fn udp_count(&self) -> usize {
        self.udp.len()
    }

    pub fn any_udp_more(&self) -> bool {
        self.udp.iter().any(UdpListener::has_more)
    }

    pub fn accept(&mut self, i: usize) -> Accept {
        let Some(Some(listener)) = self.tcp.get(i) else {
            return Accept::Empty;
        };
        loop {
            match listener.accept() {
                Ok((sock, peer)) => return Accept::Conn(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accept::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Accept::Retry(e),
            }
        }
    }

    /// Note a retry timer for listener `i`; `false` when one is armed.
    pub fn arm_retry(&mut self, i: usize) -> bool {
        match self.retry_armed.get_mut(i) {
            Some(armed) if !*armed => {
                *armed = true;
                true
            }
            _ => false,
        }
    }

    pub fn retry_fired(&mut self, i: usize) {
        if let Some(armed) = self.retry_armed.get_mut(i) {
            *armed = false;
        }
    }

    /// Stop taking work: TCP listeners close, UDP sockets stay open to
    /// send the last answers.
    pub fn stop(&mut self, registry: &Registry) {
        for u in &mut self.udp {
            let _ = registry.deregister(u.source());
            u.stop_reading();
        }
        for t in &mut self.tcp {
            if let Some(mut l) = t.take() {
                let _ = registry.deregister(&mut l);
            }
        }
    }

    /// --max-query-size changed: the UDP receive slots follow it.
    pub fn set_max_query(&mut self, max_query: usize) {
        for u in &mut self.udp {
            u.set_max_query(max_query);
        }
    }

    pub fn flush_udp(&mut self) {
        for u in &mut self.udp {
            u.flush();
        }
    }
}
