//! Unit tests of [`UpstreamConn`] against an in-memory rustls server: no
//! sockets, no threads, no sleeps. The client end of a duplex pipe is the
//! connection's [`Transport`]; the server end is a `rustls::ServerConnection`
//! pumped by hand. Time is synthetic (`t0 + ms`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ServerConfig, ServerConnection};

use super::{Answer, CloseReason, ConnState, Drain, Transport, UpstreamConn, IDLE};
use crate::framing::{push_frame, FrameTooShort};
use crate::upstream::ids::{IdRng, QueryRef};
use crate::wire::tests::query;

// ---------------------------------------------------------------- the pipe

/// Both directions of the in-memory connection and the knobs the tests
/// turn. Shared (`Rc`) by the client end and the server.
struct Wire {
    /// Client → server bytes not yet read by the server.
    to_server: Rc<RefCell<VecDeque<u8>>>,
    /// Server → client bytes not yet read by the client.
    to_client: Rc<RefCell<VecDeque<u8>>>,
    /// Every byte the client ever wrote, to look for cleartext leaks.
    tx_log: RefCell<Vec<u8>>,
    /// What `connected()` answers.
    connected: Cell<bool>,
    /// When set, `connected()` fails with this.
    connect_error: Cell<Option<io::ErrorKind>>,
    /// The server hung up: once `to_client` is empty, reads return `Ok(0)`.
    server_closed: Cell<bool>,
    /// How many more bytes the client may write before `WouldBlock`.
    write_room: Cell<usize>,
    /// Calls of `Transport::after_read`.
    after_reads: Cell<usize>,
    /// `write_vectored` takes every buffer, as `writev` on a socket does;
    /// when false it takes only the first (the `Write` default).
    vectored: Cell<bool>,
}

impl Wire {
    fn new() -> Rc<Wire> {
        Rc::new(Wire {
            to_server: Rc::default(),
            to_client: Rc::default(),
            tx_log: RefCell::default(),
            connected: Cell::new(false),
            connect_error: Cell::new(None),
            server_closed: Cell::new(false),
            write_room: Cell::new(usize::MAX),
            after_reads: Cell::new(0),
            vectored: Cell::new(true),
        })
    }

    fn pending_to_server(&self) -> usize {
        self.to_server.borrow().len()
    }

    fn leaked(&self, needle: &[u8]) -> bool {
        self.tx_log.borrow().windows(needle.len()).any(|w| w == needle)
    }
}

/// The connection's side of the pipe.
struct ClientEnd(Rc<Wire>);

impl Read for ClientEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.0.to_client.borrow_mut();
        if rx.is_empty() {
            return if self.0.server_closed.get() {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        rx.read(buf)
    }
}

impl Write for ClientEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.0.write_room.get();
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(room);
        self.0.write_room.set(room - n);
        self.0.to_server.borrow_mut().extend(&buf[..n]);
        self.0.tx_log.borrow_mut().extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if !self.0.vectored.get() {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
            return self.write(first);
        }
        let mut n = 0;
        for b in bufs {
            match self.write(b) {
                Ok(k) => {
                    n += k;
                    if k < b.len() {
                        break;
                    }
                }
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for ClientEnd {
    fn connected(&mut self) -> io::Result<bool> {
        match self.0.connect_error.get() {
            Some(kind) => Err(kind.into()),
            None => Ok(self.0.connected.get()),
        }
    }

    fn after_read(&self) {
        self.0.after_reads.set(self.0.after_reads.get() + 1);
    }
}

// -------------------------------------------------------------- the server

/// A rustls server on the other end of the pipe, driven by hand.
struct Server {
    tls: ServerConnection,
    wire: Rc<Wire>,
    /// Plaintext received and not yet taken as frames.
    plain: Vec<u8>,
    /// The client's close_notify has arrived.
    peer_closed: bool,
}

impl Server {
    /// Read and process everything the client wrote, then write what the
    /// server has to say. The first error (an alert from the client, or
    /// our own verdict) is returned.
    fn pump(&mut self) -> Result<(), rustls::Error> {
        loop {
            {
                let mut rx = self.wire.to_server.borrow_mut();
                // An empty read would tell rustls the client hung up.
                if rx.is_empty() {
                    break;
                }
                self.tls.read_tls(&mut *rx).expect("server read_tls");
            }
            let state = self.tls.process_new_packets()?;
            self.peer_closed |= state.peer_has_closed();
            let mut chunk = [0u8; 4096];
            loop {
                match self.tls.reader().read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.plain.extend_from_slice(&chunk[..n]),
                }
            }
        }
        self.write_out();
        Ok(())
    }

    fn write_out(&mut self) {
        while self.tls.wants_write() {
            self.tls
                .write_tls(&mut *self.wire.to_client.borrow_mut())
                .expect("server write_tls");
        }
    }

    /// The whole frames received so far (length prefix stripped).
    fn frames(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(&[hi, lo]) = self.plain.get(at..at + 2) {
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            let Some(msg) = self.plain.get(at + 2..at + 2 + len) else {
                break;
            };
            out.push(msg.to_vec());
            at += 2 + len;
        }
        self.plain.drain(..at);
        out
    }

    /// Send bytes as they are (one TLS record per call).
    fn send_raw(&mut self, bytes: &[u8]) {
        self.tls.writer().write_all(bytes).unwrap();
        self.write_out();
    }

    fn send_frame(&mut self, msg: &[u8]) {
        let mut f = Vec::new();
        push_frame(&mut f, msg);
        self.send_raw(&f);
    }

    fn close_notify(&mut self) {
        self.tls.send_close_notify();
        self.write_out();
    }

    /// Close the pipe (TCP FIN) after what was written so far.
    fn hang_up(&self) {
        self.wire.server_closed.set(true);
    }
}

// ------------------------------------------------------------ certificates

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        // Distinct subjects: a CA named like the trusted one would be
        // matched to it and fail on the signature instead.
        static N: AtomicUsize = AtomicUsize::new(0);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let cn = format!("conn_tests CA {}", N.fetch_add(1, Ordering::Relaxed));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn server_config(&self, name: &str) -> Arc<ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    /// The production client configuration, with this CA as `--ca-file`.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "dotproxy-conn-tests-{}-{}.pem",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, self.cert.pem()).unwrap();
        let config = crate::upstream::tls::client_config(Some(&path));
        let _ = std::fs::remove_file(&path);
        config.unwrap()
    }
}

// ------------------------------------------------------------- the harness

/// One connection and its server, at synthetic time `t0 + ms`.
struct Rig {
    conn: UpstreamConn<ClientEnd>,
    server: Server,
    wire: Rc<Wire>,
    rng: IdRng,
    t0: Instant,
    scratch: Vec<u8>,
    frame: Vec<u8>,
}

fn rig() -> Rig {
    let ca = Ca::new();
    rig_with(&ca, &ca, "dns.test")
}

/// A client that trusts `trusted` and expects "dns.test", against a
/// server whose leaf for `cert_name` is issued by `issuer`.
fn rig_with(trusted: &Ca, issuer: &Ca, cert_name: &str) -> Rig {
    let wire = Wire::new();
    let t0 = Instant::now();
    let name = ServerName::try_from("dns.test").unwrap();
    let conn = UpstreamConn::new(ClientEnd(Rc::clone(&wire)), 3, 9, &name, &trusted.client_config(), t0).unwrap();
    let server = Server {
        tls: ServerConnection::new(issuer.server_config(cert_name)).unwrap(),
        wire: Rc::clone(&wire),
        plain: Vec::new(),
        peer_closed: false,
    };
    Rig {
        conn,
        server,
        wire,
        rng: IdRng::default(),
        t0,
        scratch: vec![0; 64 * 1024],
        frame: Vec::new(),
    }
}

fn qref(key: u32) -> QueryRef {
    QueryRef { key, gen: 100 + key }
}

/// `msg` as the server's answer: QR set, ID replaced.
fn answer_to(msg: &[u8], id: u16) -> Vec<u8> {
    let mut a = msg.to_vec();
    a[..2].copy_from_slice(&id.to_be_bytes());
    a[2] |= 0x80;
    a
}

impl Rig {
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn ready(&mut self, ms: u64) -> Result<bool, CloseReason> {
        let now = self.at(ms);
        self.conn.on_ready(&mut self.scratch, now)
    }

    /// Connect and complete the handshake at t0 + 1..3 ms.
    fn handshake(&mut self) {
        self.wire.connected.set(true);
        assert!(!self.ready(1).unwrap());
        assert_eq!(self.conn.state(), ConnState::Handshaking);
        self.server.pump().unwrap();
        assert!(self.ready(2).unwrap());
        assert_eq!(self.conn.state(), ConnState::Ready);
        self.server.pump().unwrap();
        assert!(!self.server.tls.is_handshaking());
        // The session tickets the server sends after its handshake.
        assert!(!self.ready(3).unwrap());
    }

    fn send(&mut self, key: u32, msg: &[u8], ms: u64) -> u16 {
        let now = self.at(ms);
        self.conn.send(qref(key), msg, &mut self.rng, now).unwrap()
    }

    /// Send, flush and let the server read: the frames it received.
    fn deliver(&mut self) -> Vec<Vec<u8>> {
        self.conn.flush().unwrap();
        self.server.pump().unwrap();
        self.server.frames()
    }

    /// Every whole answer buffered, in order; panics on a framing error.
    fn answers(&mut self, ms: u64) -> Vec<Answer> {
        let now = self.at(ms);
        let mut out = Vec::new();
        while let Some(a) = self.conn.next_answer(&mut self.frame, now) {
            out.push(a.unwrap());
        }
        out
    }
}

// --------------------------------------------------------------- the tests

/// Connecting waits for `connected()`; the handshake happens before any
/// query byte leaves; `on_ready` reports readiness exactly once.
#[test]
fn handshake_completes_before_any_query_byte_is_sent() {
    let mut r = rig();
    let msg = query(0x4242, "secret.example", 1, None);
    let id = r.send(1, &msg, 0);
    assert_eq!(r.conn.live(), 1);
    assert_eq!(r.conn.sent(), 1);
    assert!(r.conn.has_output());

    // Still connecting: nothing is written, not even the ClientHello.
    r.conn.flush().unwrap();
    assert!(!r.ready(1).unwrap());
    assert_eq!(r.conn.state(), ConnState::Connecting);
    assert_eq!(r.wire.pending_to_server(), 0);
    assert!(!r.conn.was_ready());

    // Connected: the ClientHello goes out, the query does not.
    r.wire.connected.set(true);
    assert!(!r.ready(2).unwrap());
    assert_eq!(r.conn.state(), ConnState::Handshaking);
    assert!(r.wire.pending_to_server() > 0);
    r.server.pump().unwrap();
    assert!(r.server.tls.is_handshaking());
    assert!(r.server.plain.is_empty());
    assert!(!r.conn.was_ready());

    // The server's flight completes the client's handshake, once.
    assert!(r.ready(3).unwrap());
    assert_eq!(r.conn.state(), ConnState::Ready);
    assert!(r.conn.was_ready());
    assert!(!r.conn.resumed());

    // Now the query arrives, under its rewritten ID, and only after the
    // server finished its handshake.
    r.server.pump().unwrap();
    assert!(!r.server.tls.is_handshaking());
    let frames = r.server.frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(crate::wire::id(&frames[0]), Some(id));
    assert_eq!(frames[0][2..], msg[2..]);
    // Never in cleartext on the wire.
    assert!(!r.wire.leaked(b"\x06secret\x07example"));

    // Later readiness (the session tickets) is not a second handshake.
    assert!(!r.ready(4).unwrap());
    assert!(!r.ready(5).unwrap());
    assert_eq!(r.conn.state(), ConnState::Ready);
    assert_eq!(r.conn.last_answer(), None, "handshake bytes are not answers");
}

#[test]
fn a_failed_connect_is_a_connect_error() {
    let mut r = rig();
    r.wire.connect_error.set(Some(io::ErrorKind::ConnectionRefused));
    match r.ready(1) {
        Err(CloseReason::Connect(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
        other => panic!("{other:?}"),
    }
    assert!(!r.conn.was_ready());
}

/// Three queries in one flush, answered in reverse order, each matched to
/// its own query by the rewritten ID.
#[test]
fn pipelined_queries_answered_out_of_order() {
    let mut r = rig();
    r.handshake();
    // The same client ID for all three: the IDs on the wire can only be
    // distinct if the connection rewrote them.
    let msgs: Vec<Vec<u8>> = ["a.example", "b.example", "c.example"]
        .iter()
        .map(|n| query(0x1234, n, 28, Some(1232)))
        .collect();
    let ids: Vec<u16> = msgs.iter().enumerate().map(|(i, m)| r.send(i as u32, m, 10)).collect();
    assert_eq!(r.conn.live(), 3);
    assert_eq!(r.conn.sent(), 3);

    let frames = r.deliver();
    assert_eq!(frames.len(), 3);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            crate::wire::id(f),
            Some(ids[i]),
            "frame {i} carries the ID send returned"
        );
        assert_eq!(f[2..], msgs[i][2..], "frame {i}: only the ID is rewritten");
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "{ids:?}");
    assert!(ids.iter().filter(|&&id| id == 0x1234).count() <= 1);

    for f in frames.iter().rev() {
        let id = crate::wire::id(f).unwrap();
        r.server.send_frame(&answer_to(f, id));
    }
    // Read in 7-byte pieces: TLS records and frames straddle reads.
    r.scratch = vec![0; 7];
    assert!(!r.ready(20).unwrap());
    let now = r.at(21);
    let mut got = Vec::new();
    while let Some(a) = r.conn.next_answer(&mut r.frame, now) {
        let a = a.unwrap();
        if let Answer::Live { id, .. } = a {
            assert_eq!(crate::wire::id(&r.frame), Some(id));
            assert!(r.frame[2] & 0x80 != 0);
        }
        got.push(a);
    }
    let want: Vec<Answer> = (0..3)
        .rev()
        .map(|i| Answer::Live {
            id: ids[i],
            query: qref(i as u32),
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(r.conn.live(), 0);
    assert_eq!(r.conn.last_answer(), Some(now));
}

/// Half a frame waits for the rest; a record holding the end of one frame
/// and a whole other yields both.
#[test]
fn frames_split_across_records() {
    let mut r = rig();
    r.handshake();
    let a = r.send(1, &query(1, "a.example", 1, None), 10);
    let b = r.send(2, &query(2, "b.example", 1, None), 10);
    let frames = r.deliver();
    let mut bytes = Vec::new();
    push_frame(&mut bytes, &answer_to(&frames[0], a));
    push_frame(&mut bytes, &answer_to(&frames[1], b));
    let cut = 5;
    r.server.send_raw(&bytes[..cut]);
    assert!(!r.ready(20).unwrap());
    assert_eq!(r.answers(20), vec![]);
    assert_eq!(r.conn.last_answer(), None);
    r.server.send_raw(&bytes[cut..]);
    assert!(!r.ready(30).unwrap());
    assert_eq!(
        r.answers(30),
        vec![
            Answer::Live { id: a, query: qref(1) },
            Answer::Live { id: b, query: qref(2) }
        ]
    );
}

/// Unknown IDs, late answers for buried queries, and restored queries.
#[test]
fn unknown_late_and_restored_answers() {
    let mut r = rig();
    r.handshake();
    let qa = query(7, "a.example", 1, None);
    let qb = query(7, "b.example", 1, None);
    let a = r.send(1, &qa, 10);
    let b = r.send(2, &qb, 10);
    assert_eq!(r.deliver().len(), 2);

    let unknown = (0..=u16::MAX).find(|&x| x != a && x != b).unwrap();
    r.server.send_frame(&answer_to(&qa, unknown));
    r.ready(20).unwrap();
    assert_eq!(r.answers(20), vec![Answer::Unknown]);
    assert_eq!(r.conn.live(), 2);

    // a timed out: its ID stays taken as a tombstone.
    r.conn.bury(a, qref(1));
    assert_eq!(r.conn.live(), 1);
    assert_eq!(r.conn.tombstones(), 1);
    // Burying under the wrong query changes nothing.
    r.conn.bury(b, qref(1));
    assert_eq!(r.conn.live(), 1);
    assert_eq!(r.conn.tombstones(), 1);

    r.server.send_frame(&answer_to(&qa, a));
    r.ready(30).unwrap();
    assert_eq!(r.answers(30), vec![Answer::Late]);
    assert_eq!(r.conn.tombstones(), 0, "the late answer settles the tombstone");
    // A second copy of it is unknown now.
    r.server.send_frame(&answer_to(&qa, a));
    r.ready(35).unwrap();
    assert_eq!(r.answers(35), vec![Answer::Unknown]);

    // b's answer is taken, judged not to be b's, and put back.
    r.server.send_frame(&answer_to(&qa, b));
    r.ready(40).unwrap();
    assert_eq!(r.answers(40), vec![Answer::Live { id: b, query: qref(2) }]);
    assert_eq!(r.conn.live(), 0);
    r.conn.restore(b, qref(2));
    assert_eq!(r.conn.live(), 1);
    r.server.send_frame(&answer_to(&qb, b));
    r.ready(50).unwrap();
    assert_eq!(r.answers(50), vec![Answer::Live { id: b, query: qref(2) }]);
    assert_eq!(r.conn.live(), 0);
    assert_eq!(r.conn.tombstones(), 0);
}

/// A frame too short for a DNS header breaks the stream: the answer
/// before it is still handed out, then the error, which stays.
#[test]
fn a_short_frame_is_a_bad_frame() {
    let mut r = rig();
    r.handshake();
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 10);
    r.send(2, &msg, 10);
    r.deliver();
    let mut bytes = Vec::new();
    push_frame(&mut bytes, &answer_to(&msg, id));
    bytes.extend_from_slice(&[0, 5, 1, 2, 3, 4, 5]);
    r.server.send_raw(&bytes);
    assert!(!r.ready(20).unwrap(), "framing is checked by next_answer, not on_ready");
    let now = r.at(20);
    assert!(matches!(
        r.conn.next_answer(&mut r.frame, now),
        Some(Ok(Answer::Live { id: got, .. })) if got == id
    ));
    for _ in 0..2 {
        assert!(matches!(
            r.conn.next_answer(&mut r.frame, now),
            Some(Err(CloseReason::BadFrame(FrameTooShort(5))))
        ));
    }
    assert_eq!(r.conn.live(), 1);
}

/// close_notify (with or without the TCP close after it) is a clean EOF;
/// answers read with it are kept.
#[test]
fn close_notify_is_a_clean_eof() {
    let mut r = rig();
    r.handshake();
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 10);
    r.deliver();
    r.server.send_frame(&answer_to(&msg, id));
    r.server.close_notify();
    r.server.hang_up();
    assert!(matches!(r.ready(20), Err(CloseReason::Eof { clean: true })));
    assert_eq!(r.answers(20), vec![Answer::Live { id, query: qref(1) }]);
    assert!(r.conn.was_ready());

    // close_notify alone, the pipe still open.
    let mut r = rig();
    r.handshake();
    r.server.close_notify();
    assert!(matches!(r.ready(20), Err(CloseReason::Eof { clean: true })));
    assert_eq!(r.answers(20), vec![]);
}

/// A TCP close without close_notify is an unclean EOF; answers read
/// before it are kept.
#[test]
fn hang_up_without_close_notify_is_unclean() {
    let mut r = rig();
    r.handshake();
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 10);
    r.send(2, &msg, 10);
    r.deliver();
    r.server.send_frame(&answer_to(&msg, id));
    r.server.hang_up();
    assert!(matches!(r.ready(20), Err(CloseReason::Eof { clean: false })));
    assert_eq!(r.answers(20), vec![Answer::Live { id, query: qref(1) }]);
    assert_eq!(r.conn.live(), 1);
    let mut orphans = Vec::new();
    r.conn.close(&CloseReason::Eof { clean: false }, &mut orphans);
    assert_eq!(orphans, vec![qref(2)]);

    // A server that hangs up during the handshake.
    let mut r = rig();
    r.wire.connected.set(true);
    assert!(!r.ready(1).unwrap());
    r.server.hang_up();
    assert!(matches!(r.ready(2), Err(CloseReason::Eof { clean: false })));
    assert!(!r.conn.was_ready());
    assert_eq!(r.conn.state(), ConnState::Handshaking);
}

/// A certificate for another name, or from an untrusted CA, fails the
/// handshake with a TLS error; the server hears why (the last-gasp alert)
/// and never sees a query.
#[test]
fn certificate_failures() {
    let ca = Ca::new();
    let stranger = Ca::new();
    let cases = [
        (&ca, "other.test", rustls::AlertDescription::BadCertificate),
        (&stranger, "dns.test", rustls::AlertDescription::UnknownCA),
    ];
    for (issuer, cert_name, want) in cases {
        let mut r = rig_with(&ca, issuer, cert_name);
        let msg = query(1, "secret.example", 1, None);
        r.send(1, &msg, 0);
        r.wire.connected.set(true);
        assert!(!r.ready(1).unwrap());
        r.server.pump().unwrap();
        match r.ready(2) {
            Err(CloseReason::Tls(rustls::Error::InvalidCertificate(_))) => {}
            other => panic!("{cert_name}: {other:?}"),
        }
        assert!(!r.conn.was_ready());
        assert_ne!(r.conn.state(), ConnState::Ready);
        match r.server.pump() {
            Err(rustls::Error::AlertReceived(alert)) => assert_eq!(alert, want, "{cert_name}"),
            other => panic!("{cert_name}: server saw {other:?}"),
        }
        assert!(r.server.plain.is_empty());
        assert!(!r.wire.leaked(b"\x06secret\x07example"));
    }
}

/// A polite close sends close_notify and hands back the live queries (not
/// the buried one); an impolite one writes nothing.
#[test]
fn close_hands_back_live_queries() {
    for reason in [CloseReason::Idle, CloseReason::Stalled] {
        let mut r = rig();
        r.handshake();
        let msg = query(1, "a.example", 1, None);
        let buried = r.send(1, &msg, 10);
        r.send(2, &msg, 10);
        r.send(3, &msg, 10);
        assert_eq!(r.deliver().len(), 3);
        r.conn.bury(buried, qref(1));
        assert_eq!(r.wire.pending_to_server(), 0);

        let mut orphans = Vec::new();
        r.conn.close(&reason, &mut orphans);
        orphans.sort();
        assert_eq!(orphans, vec![qref(2), qref(3)], "{reason}");
        assert_eq!(r.conn.live(), 0);
        assert_eq!(r.conn.tombstones(), 0);
        if reason.is_polite() {
            assert!(r.wire.pending_to_server() > 0);
            r.server.pump().unwrap();
            assert!(r.server.peer_closed, "{reason}: close_notify");
        } else {
            assert_eq!(r.wire.pending_to_server(), 0, "{reason}: nothing written");
            r.server.pump().unwrap();
            assert!(!r.server.peer_closed);
        }
    }

    // Before the TCP connect finished there is no TLS to close.
    let mut r = rig();
    r.send(1, &query(1, "a.example", 1, None), 0);
    let mut orphans = Vec::new();
    r.conn.close(&CloseReason::Shutdown, &mut orphans);
    assert_eq!(orphans, vec![qref(1)]);
    assert_eq!(r.wire.pending_to_server(), 0);
}

/// edns-tcp-keepalive 0 drains the connection: no new queries, closed
/// once the last answer is in.
#[test]
fn keepalive_zero_drains() {
    let mut r = rig();
    r.handshake();
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 10);
    r.deliver();
    assert!(r.conn.accepts_queries());
    r.conn.keepalive(0);
    assert!(!r.conn.accepts_queries());
    assert_eq!(r.conn.draining(), Some(Drain::ServerAsked));
    assert!(!r.conn.drained(), "a query is still in flight");
    // A later reason does not replace the first.
    r.conn.drain(Drain::Rotated);
    assert_eq!(r.conn.draining(), Some(Drain::ServerAsked));
    r.server.send_frame(&answer_to(&msg, id));
    r.ready(20).unwrap();
    assert_eq!(r.answers(20), vec![Answer::Live { id, query: qref(1) }]);
    assert!(r.conn.drained());
    assert_eq!(
        r.conn.idle_due(),
        r.at(20) + IDLE,
        "keepalive 0 leaves the idle period alone"
    );
}

/// A server keepalive shortens the idle period to 80 % of it, never
/// lengthens it; sends and reads restart it.
#[test]
fn keepalive_timeout_shortens_idle() {
    let mut r = rig();
    assert_eq!(r.conn.idle_due(), r.t0 + IDLE);
    r.conn.keepalive(50); // 5 s
    assert_eq!(r.conn.idle_due(), r.t0 + Duration::from_secs(4));
    r.conn.keepalive(3000); // 300 s: no longer than before
    assert_eq!(r.conn.idle_due(), r.t0 + Duration::from_secs(4));
    assert!(r.conn.accepts_queries());

    r.handshake();
    assert_eq!(r.conn.idle_due(), r.at(3) + Duration::from_secs(4), "reads count");
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 1000);
    assert_eq!(r.conn.idle_due(), r.at(1000) + Duration::from_secs(4), "sends count");
    r.deliver();
    r.server.send_frame(&answer_to(&msg, id));
    r.ready(2500).unwrap();
    assert_eq!(r.conn.idle_due(), r.at(2500) + Duration::from_secs(4));
    // Taking the answer out later is not activity.
    r.answers(3000);
    assert_eq!(r.conn.idle_due(), r.at(2500) + Duration::from_secs(4));
}

/// One idle timer per connection: an earlier one supersedes, a later one
/// is refused; it fires at or after its instant, once.
#[test]
fn idle_timer_arming() {
    let r = &mut rig();
    let t = |s: u64| r.t0 + Duration::from_secs(s);
    let (t5, t10, t15, t30) = (t(5), t(10), t(15), t(30));
    assert!(!r.conn.idle_fired(t30), "nothing armed");
    assert!(r.conn.arm_idle(t10));
    assert!(!r.conn.arm_idle(t15), "a later timer is not needed");
    assert!(!r.conn.arm_idle(t10), "nor the same one");
    assert!(r.conn.arm_idle(t5), "an earlier one supersedes");
    assert!(!r.conn.idle_fired(t5 - Duration::from_millis(1)));
    assert!(r.conn.idle_fired(t5));
    assert!(!r.conn.idle_fired(t5), "once");
    assert!(!r.conn.idle_fired(t10), "the superseded timer is stale");
    assert!(r.conn.arm_idle(t30), "disarmed: any instant arms it");
    assert!(!r.conn.idle_fired(t15));
    assert!(r.conn.idle_fired(t30 + Duration::from_secs(1)), "late is fine");
    assert!(!r.conn.idle_fired(t30 + Duration::from_secs(2)));
}

/// A full socket pauses the flush; the rest goes out at the next one.
#[test]
fn flush_resumes_after_a_full_socket() {
    let mut r = rig();
    r.handshake();
    let msgs: Vec<Vec<u8>> = (0..50).map(|i| query(i, &format!("n{i}.example"), 1, None)).collect();
    let ids: Vec<u16> = msgs.iter().enumerate().map(|(i, m)| r.send(i as u32, m, 10)).collect();
    r.wire.write_room.set(100);
    r.conn.flush().unwrap();
    assert!(r.conn.has_output(), "rustls still holds records");
    assert_eq!(r.wire.pending_to_server(), 100);
    r.wire.write_room.set(usize::MAX);
    let frames = r.deliver();
    assert!(!r.conn.has_output());
    let got: Vec<u16> = frames.iter().map(|f| crate::wire::id(f).unwrap()).collect();
    assert_eq!(got, ids);
}

/// Reads give the transport its chance to acknowledge.
#[test]
fn after_read_follows_reads() {
    let mut r = rig();
    r.handshake();
    let before = r.wire.after_reads.get();
    assert!(before >= 2, "handshake reads: {before}");
    assert!(!r.ready(100).unwrap());
    assert_eq!(r.wire.after_reads.get(), before, "nothing read, nothing to acknowledge");
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 200);
    r.deliver();
    r.server.send_frame(&answer_to(&msg, id));
    r.ready(300).unwrap();
    assert_eq!(r.wire.after_reads.get(), before + 1);
}

/// Known bug (see the report): `read_all` calls `after_read` only when
/// `last_active` changed, so bytes read at the same `now` as the last send
/// (a query sent and its connection read in one loop turn, the usual case
/// under load) are not acknowledged at once.
#[test]
fn after_read_follows_reads_in_the_same_turn_as_a_send() {
    let mut r = rig();
    r.handshake();
    let msg = query(1, "a.example", 1, None);
    let id = r.send(1, &msg, 200);
    r.deliver();
    r.server.send_frame(&answer_to(&msg, id));
    let before = r.wire.after_reads.get();
    r.send(2, &msg, 300);
    r.ready(300).unwrap();
    assert_eq!(r.answers(300).len(), 1, "bytes were read");
    assert_eq!(r.wire.after_reads.get(), before + 1);
}

/// Robustness (see the report): the last-gasp alert is one `write_tls`
/// call, so a transport that takes one buffer per write (the `Write`
/// default; mio's `writev` takes all) loses the alert behind the
/// ChangeCipherSpec record rustls queued first.
#[test]
fn last_gasp_alert_reaches_a_non_vectored_transport() {
    let ca = Ca::new();
    let mut r = rig_with(&ca, &ca, "other.test");
    r.wire.vectored.set(false);
    r.wire.connected.set(true);
    assert!(!r.ready(1).unwrap());
    r.server.pump().unwrap();
    assert!(matches!(r.ready(2), Err(CloseReason::Tls(_))));
    assert!(matches!(r.server.pump(), Err(rustls::Error::AlertReceived(_))));
}

/// Latent (see the report): `close` queues close_notify before `flush`
/// hands rustls the queued queries, so they go out as application data
/// after the close_notify (the server ignores them; they are orphans and
/// re-sent anyway). The loop flushes before it reaps, so today `out` is
/// empty at every close.
#[test]
fn close_sends_nothing_after_close_notify() {
    let mut r = rig();
    r.handshake();
    r.send(1, &query(1, "a.example", 1, None), 10);
    let before = r.wire.tx_log.borrow().len();
    let mut orphans = Vec::new();
    r.conn.close(&CloseReason::Shutdown, &mut orphans);
    assert_eq!(orphans, vec![qref(1)]);
    // TLS 1.3 hides record types; count the records written by close.
    let log = r.wire.tx_log.borrow()[before..].to_vec();
    let mut records = 0;
    let mut at = 0;
    while let Some(&[_, _, _, hi, lo]) = log.get(at..at + 5) {
        records += 1;
        at += 5 + usize::from(u16::from_be_bytes([hi, lo]));
    }
    assert_eq!(records, 1, "close_notify only");
}

/// Fair reads: a server that sends ~1 MiB of answers at once does not
/// hold the loop. One `on_ready` reads at most the turn's budget (256 KiB,
/// plus the one chunk that crossed it) and says `has_more`; the next calls
/// read the rest, `has_more` is false once the pipe is empty, and every
/// answer comes out, in order, matched to its query.
#[test]
fn one_turn_reads_at_most_its_budget_and_the_next_turns_the_rest() {
    const BUDGET: usize = 256 * 1024;
    let mut r = rig();
    r.handshake();
    // The server writes everything in one go (no 64 KiB send limit).
    r.server.tls.set_buffer_limit(None);
    let n = 256;
    let msgs: Vec<Vec<u8>> = (0..n)
        .map(|i| query(i as u16, &format!("n{i}.example"), 1, None))
        .collect();
    let ids: Vec<u16> = msgs.iter().enumerate().map(|(i, m)| r.send(i as u32, m, 10)).collect();
    let frames = r.deliver();
    assert_eq!(frames.len(), n);
    let mut bytes = Vec::new();
    for (f, &id) in frames.iter().zip(&ids) {
        // 4 KiB each: the connection only frames and matches IDs, so the
        // padding after the question does not matter.
        let mut a = answer_to(f, id);
        a.resize(4096, 0);
        push_frame(&mut bytes, &a);
    }
    r.server.send_raw(&bytes);
    let pending = |r: &Rig| r.wire.to_client.borrow().len();
    let total = pending(&r);
    assert!(total > 1 << 20, "{total} bytes sent");
    let chunk = r.scratch.len();

    // The first turn stops at its budget.
    assert!(!r.ready(20).unwrap());
    let first = total - pending(&r);
    assert!(
        (BUDGET..=BUDGET + chunk).contains(&first),
        "one on_ready read {first} bytes of {total} (budget {BUDGET}, chunk {chunk})"
    );
    assert!(r.conn.has_more(), "stopped at the budget with more to read");
    let mut got = r.answers(20);
    assert!(!got.is_empty() && got.len() < n, "{} answers after one turn", got.len());

    // Later turns, each bounded the same way, read the rest.
    let mut turns = 1;
    while r.conn.has_more() {
        assert!(turns < 16, "still more to read after {turns} turns");
        let before = pending(&r);
        let ms = 20 + turns;
        assert!(!r.ready(ms).unwrap());
        let read = before - pending(&r);
        assert!(read <= BUDGET + chunk, "turn {turns} read {read} bytes");
        got.extend(r.answers(ms));
        turns += 1;
    }
    assert!(turns >= 4, "~1 MiB read in {turns} turns of at most {BUDGET} bytes");
    assert_eq!(pending(&r), 0, "bytes left unread");
    assert!(!r.conn.has_more());
    let want: Vec<Answer> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| Answer::Live {
            id,
            query: qref(i as u32),
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(r.conn.live(), 0);
}

/// A plain DNS connection (`--forward ZONE=plain:`): ready as soon as TCP
/// connects, queries leave framed as they are under fresh IDs, pipelined
/// answers come back in one read, a partial write resumes, and a close by
/// the server is an ordinary end of stream.
#[test]
fn a_plain_connection_frames_queries_as_they_are_and_reads_answers_back() {
    let wire = Wire::new();
    let t0 = Instant::now();
    let mut conn = UpstreamConn::plain(ClientEnd(Rc::clone(&wire)), 0, 1, t0);
    let mut rng = IdRng::default();
    let mut scratch = vec![0u8; 65536];
    let a = query(0x1111, "a.cluster.local", 1, None);
    let b = query(0x2222, "b.cluster.local", 1, None);
    let ida = conn.send(qref(1), &a, &mut rng, t0).unwrap();
    conn.flush().unwrap();
    assert_eq!(wire.pending_to_server(), 0, "nothing leaves before the connect");
    wire.connected.set(true);
    assert!(conn.on_ready(&mut scratch, t0).unwrap(), "ready without a handshake");
    assert_eq!(conn.state(), ConnState::Ready);

    // The socket takes 10 bytes, then the rest once it has room again.
    wire.write_room.set(10);
    let idb = conn.send(qref(2), &b, &mut rng, t0).unwrap();
    conn.flush().unwrap();
    assert!(conn.has_output());
    wire.write_room.set(usize::MAX);
    conn.flush().unwrap();
    assert!(!conn.has_output());
    let sent: Vec<u8> = wire.to_server.borrow_mut().drain(..).collect();
    let mut expect = Vec::new();
    push_frame(&mut expect, &answer_to(&a, ida)[..]);
    push_frame(&mut expect, &answer_to(&b, idb)[..]);
    // The same bytes as the queries with their new IDs (QR aside).
    for i in [4, 4 + a.len() + 2] {
        expect[i] &= 0x7f;
    }
    assert_eq!(sent, expect);
    assert_ne!((ida, idb), (0x1111, 0x2222));

    // Both answers, out of order, in one segment.
    let mut both = Vec::new();
    push_frame(&mut both, &answer_to(&b, idb));
    push_frame(&mut both, &answer_to(&a, ida));
    wire.to_client.borrow_mut().extend(&both);
    conn.on_ready(&mut scratch, t0).unwrap();
    let mut frame = Vec::new();
    let got: Vec<Answer> = std::iter::from_fn(|| conn.next_answer(&mut frame, t0))
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        got,
        vec![
            Answer::Live {
                id: idb,
                query: qref(2)
            },
            Answer::Live {
                id: ida,
                query: qref(1)
            }
        ]
    );
    wire.server_closed.set(true);
    assert!(matches!(
        conn.on_ready(&mut scratch, t0),
        Err(CloseReason::Eof { clean: true })
    ));
    assert!(!conn.resumed());
}
