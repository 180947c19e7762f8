//! Socket tricks for fault tests: connecting from another loopback
//! address, resetting a connection, urgent data, and a raw (non-TLS) TCP
//! server that records what it receives.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A TCP connection to `dst` from `src` (port chosen by the kernel), e.g.
/// from 127.0.0.2 to a proxy on 127.0.0.1. IPv4 only.
pub fn tcp_connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let (IpAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        return Err(io::Error::other("IPv4 only"));
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket/bind/connect on a fresh fd we own; the sockaddr
    // structs live across the calls and their sizes are passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sin(src, 0);
        if libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(
            fd,
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Closes `stream` with a RST (SO_LINGER 0).
pub fn reset(stream: TcpStream) {
    super::upstream::set_linger_zero(&stream);
    drop(stream);
}

/// Sends `byte` as TCP urgent data (MSG_OOB).
pub fn send_oob(stream: &TcpStream, byte: u8) -> io::Result<()> {
    // SAFETY: send(2) on a valid fd with a pointer to one live byte.
    let rc = unsafe { libc::send(stream.as_raw_fd(), (&byte as *const u8).cast(), 1, libc::MSG_OOB) };
    if rc == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets SO_RCVBUF on a socket (the kernel doubles it).
pub fn set_rcvbuf(stream: &TcpStream, bytes: i32) {
    // SAFETY: valid fd, pointer/length of a live c_int.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// Sets a big receive buffer on a UDP socket (SO_RCVBUFFORCE when allowed,
/// else SO_RCVBUF up to rmem_max): a burst of a thousand small answers
/// overflows the default ~208 KB, since each datagram costs ~1 KB of it.
pub fn set_udp_rcvbuf(sock: &std::net::UdpSocket, bytes: i32) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: valid fd, pointer/length of a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// A plain TCP server on 127.0.0.1:0: records every byte each connection
/// sends; on a connection's first bytes it writes `reply` (if any) and then
/// keeps reading until the peer closes, the server stops or 5 s pass.
pub struct RawServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    handle: Option<JoinHandle<()>>,
}

impl RawServer {
    pub fn start(reply: Vec<u8>) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
        let (st, rc) = (stop.clone(), received.clone());
        let handle = thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            // Bounded by the stop flag.
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        let idx = {
                            let mut r = rc.lock().unwrap_or_else(|e| e.into_inner());
                            r.push(Vec::new());
                            r.len() - 1
                        };
                        let (st2, rc2, reply) = (st.clone(), rc.clone(), reply.clone());
                        conns.push(thread::spawn(move || {
                            let _ = sock.set_nonblocking(false);
                            let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
                            let deadline = Instant::now() + Duration::from_secs(5);
                            let mut replied = false;
                            let mut buf = [0u8; 4096];
                            while !st2.load(Ordering::SeqCst) && Instant::now() < deadline {
                                match sock.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        rc2.lock().unwrap_or_else(|e| e.into_inner())[idx].extend_from_slice(&buf[..n]);
                                        if !replied && !reply.is_empty() {
                                            replied = true;
                                            let _ = sock.write_all(&reply);
                                        }
                                    }
                                    Err(e)
                                        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                                    Err(_) => break,
                                }
                            }
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        RawServer {
            addr,
            stop,
            received,
            handle: Some(handle),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes received, per connection in accept order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
