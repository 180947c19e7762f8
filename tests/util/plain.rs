//! A plain DNS-over-TCP server (RFC 7766), standing in for a cluster's DNS
//! service behind `--forward ZONE=plain:IP:PORT`: it answers every framed
//! query with [`dns::default_answer`] (pipelined, in order), records what it
//! got, and can be told to stay silent or to close after each answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::dns;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainMode {
    Answer,
    /// Reads queries, never answers.
    Silent,
    /// Answers one query per connection, then closes it.
    OnePerConnection,
}

#[derive(Default)]
struct Shared {
    /// (transaction ID, first question name) of every query received.
    queries: Mutex<Vec<(u16, String)>>,
    accepts: AtomicUsize,
    stop: AtomicBool,
}

pub struct PlainUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl PlainUpstream {
    pub fn start(mode: PlainMode) -> PlainUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind plain upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        thread::spawn(move || {
            // Bounded by the stop flag, set on drop.
            while !sh.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        sh.accepts.fetch_add(1, Ordering::SeqCst);
                        let sh = sh.clone();
                        thread::spawn(move || serve(sock, mode, &sh));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        PlainUpstream { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn queries(&self) -> Vec<(u16, String)> {
        self.shared.queries.lock().map(|q| q.clone()).unwrap_or_default()
    }

    pub fn accepts(&self) -> usize {
        self.shared.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for PlainUpstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(mut sock: TcpStream, mode: PlainMode, sh: &Shared) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
    let mut inbuf = Vec::new();
    let mut buf = [0u8; 4096];
    while !sh.stop.load(Ordering::SeqCst) {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => inbuf.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        for q in dns::take_frames(&mut inbuf) {
            let id = dns::msg_id(&q).unwrap_or(0);
            let name = dns::read_name(&q, 12).map(|(n, _)| n).unwrap_or_default();
            if let Ok(mut all) = sh.queries.lock() {
                all.push((id, name));
            }
            if mode == PlainMode::Silent {
                continue;
            }
            let Some(answer) = dns::default_answer(&q) else {
                continue;
            };
            if sock.write_all(&dns::frame(&answer)).is_err() {
                return;
            }
            if mode == PlainMode::OnePerConnection {
                return;
            }
        }
    }
}
