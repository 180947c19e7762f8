//! Binding listening sockets: UDP and TCP on one address (one port when
//! the kernel picks it), SO_REUSEPORT on request, a large UDP receive
//! buffer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use mio::net::{TcpListener, UdpSocket};

/// Room for a burst of thousands of datagrams between two loop turns.
pub const UDP_RCVBUF: libc::c_int = 4 << 20;

/// A non-blocking socket bound to `addr`. With `reuseport`, several
/// dotproxy processes can bind the same address and the kernel spreads
/// clients over them (SO_REUSEPORT): the way to use more than one core.
fn bind_socket(addr: SocketAddr, ty: socket2::Type, reuseport: bool) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    if ty == socket2::Type::STREAM {
        // Restarting must not wait for old connections in TIME_WAIT.
        s.set_reuse_address(true)?;
    }
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

pub fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    // A burst of thousands of datagrams overflows the default ~208 KB
    // buffer before the loop can drain it. SO_RCVBUFFORCE passes
    // rmem_max when privileged; plain SO_RCVBUF is the fallback.
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket fd and a pointer to a live c_int of the
        // size passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Bind UDP and TCP on the same address; with port 0, on the same port.
pub fn bind_pair(addr: SocketAddr, reuseport: bool) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = bind_socket(addr, socket2::Type::DGRAM, reuseport)?;
        let udp = UdpSocket::from_std(udp.into());
        let bound = udp.local_addr()?;
        let tcp = bind_socket(bound, socket2::Type::STREAM, reuseport).and_then(|s| {
            s.listen(1024)?;
            Ok(TcpListener::from_std(s.into()))
        });
        match tcp {
            Ok(tcp) => return Ok((udp, tcp)),
            // The kernel's free UDP port may be a busy TCP port; with an
            // explicit port there is nothing to retry.
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()))
}

/// Bind a TCP listener alone (the DNS-over-TLS listener has no UDP side).
pub fn bind_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    let s = bind_socket(addr, socket2::Type::STREAM, reuseport)?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into()))
}

/// Raise the soft limit on open descriptors to the hard limit (containers
/// often start at 1024 soft, much more hard); returns the soft limit in
/// force afterwards.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a pointer to a live rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; failure leaves the old limit in force.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// TCP clients that fit under `nofile` descriptors once `reserved` are
/// kept for everything else (listeners, upstream connections, metrics).
pub fn clients_under(nofile: u64, reserved: u64) -> usize {
    usize::try_from(nofile.saturating_sub(reserved).max(1)).unwrap_or(usize::MAX)
}

/// A listening socket passed by the service manager.
pub enum Passed {
    Udp(UdpSocket),
    Tcp(TcpListener),
}

/// Take over a passed descriptor: an IPv4 or IPv6 UDP socket, or a TCP
/// socket already listening. Anything else (a unix socket, a connection
/// from `Accept=yes`) is refused: a socket unit that does not match the
/// proxy should stop it, not be half served.
pub fn adopt(fd: std::os::fd::OwnedFd) -> Result<(Passed, SocketAddr), String> {
    let raw = fd.as_raw_fd();
    let s = socket2::Socket::from(fd);
    let bad = |what: String| format!("descriptor {raw}: {what}");
    let addr = s
        .local_addr()
        .map_err(|e| bad(e.to_string()))?
        .as_socket()
        .ok_or_else(|| bad("not an IPv4 or IPv6 socket".into()))?;
    let ty = s.r#type().map_err(|e| bad(format!("SO_TYPE: {e}")))?;
    // The manager clears CLOEXEC to pass them; nothing of ours is to inherit them.
    s.set_nonblocking(true)
        .and_then(|()| s.set_cloexec(true))
        .map_err(|e| bad(e.to_string()))?;
    let passed = if ty == socket2::Type::DGRAM {
        let udp = UdpSocket::from_std(s.into());
        set_rcvbuf(&udp, UDP_RCVBUF);
        Passed::Udp(udp)
    } else if ty == socket2::Type::STREAM {
        if !s.is_listener().map_err(|e| bad(format!("SO_ACCEPTCONN: {e}")))? {
            return Err(bad(format!(
                "stream socket on {addr} is not listening (Accept=yes is not supported)"
            )));
        }
        Passed::Tcp(TcpListener::from_std(s.into()))
    } else {
        return Err(bad(format!("{addr}: neither a datagram nor a stream socket")));
    };
    Ok((passed, addr))
}
