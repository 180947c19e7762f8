//! The service manager's two protocols, without libsystemd: sockets
//! passed at start (`LISTEN_FDS`, sd_listen_fds(3)) and state changes
//! sent back (`NOTIFY_SOCKET`, sd_notify(3)). Both are read from the
//! environment once, first thing in `main`, while the process is still
//! single-threaded, and the variables are removed so that nothing started
//! later mistakes them for its own. What a passed socket is (UDP or TCP,
//! which address) is the listen room's business ([`crate::listen::socket`]).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

use log::debug;

/// The first passed descriptor (SD_LISTEN_FDS_START): 0-2 are stdio.
const LISTEN_FDS_START: i32 = 3;
/// More than any socket unit declares; a larger LISTEN_FDS is garbage.
const MAX_PASSED: usize = 1024;

/// One descriptor passed by the service manager, with its name from
/// `LISTEN_FDNAMES` (`FileDescriptorName=`, the socket unit's name by
/// default) when there was one.
#[derive(Debug)]
pub struct PassedFd {
    pub fd: OwnedFd,
    pub name: Option<String>,
}

/// Take the descriptors passed by the service manager, if they are meant
/// for this process; `Ok(None)` when none were passed. The variables are
/// removed in every case. Call once, before anything else opens a
/// descriptor or starts a thread.
pub fn take_listen_fds() -> Result<Option<Vec<PassedFd>>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    // A parent that forgot to unset them: the descriptors were its own.
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n = fds
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n <= MAX_PASSED)
        .ok_or_else(|| format!("LISTEN_FDS={fds:?}: expected a number of descriptors up to {MAX_PASSED}"))?;
    if n == 0 {
        return Ok(None);
    }
    let names: Vec<&str> = names.as_deref().map(|s| s.split(':').collect()).unwrap_or_default();
    let mut passed = Vec::with_capacity(n);
    for i in 0..n {
        let raw = LISTEN_FDS_START + i as i32;
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(format!(
                "LISTEN_FDS={n}: descriptor {raw} is not open ({})",
                io::Error::last_os_error()
            ));
        }
        // SAFETY: the protocol hands descriptors 3..3+n to this process and
        // nothing in it has taken them yet (this runs once, first in main);
        // each is owned exactly once from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = names.get(i).filter(|s| !s.is_empty()).map(|s| s.to_string());
        passed.push(PassedFd { fd, name });
    }
    Ok(Some(passed))
}

/// sd_notify(3) to `NOTIFY_SOCKET`, or nothing when it is unset. Every
/// failure is logged at debug and otherwise ignored: the proxy serves the
/// same whether or not anyone listens.
#[derive(Debug, Default)]
pub struct Notifier {
    sock: Option<(UnixDatagram, UnixAddr)>,
}

impl Notifier {
    /// Connect to `NOTIFY_SOCKET` now: connecting checks write permission
    /// on the socket's path, and after `--user` drops root the path may
    /// no longer be writable; a connected socket keeps working. `Err` is
    /// a warning for the log (which is not set up yet): the proxy then
    /// runs without notifying.
    pub fn from_env() -> Result<Notifier, String> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier::default());
        };
        std::env::remove_var("NOTIFY_SOCKET");
        Notifier::open(&path).map_err(|e| format!("NOTIFY_SOCKET={}: {e}; not notifying", path.to_string_lossy()))
    }

    fn open(path: &std::ffi::OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                UnixAddr::from_abstract_name(name)?
            }
            None if bytes.first() == Some(&b'/') => UnixAddr::from_pathname(path)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "expected an absolute path or @abstract name",
                ))
            }
        };
        let sock = UnixDatagram::unbound()?;
        // The loop must never wait for the service manager: a full queue
        // loses one notification, not a turn.
        sock.set_nonblocking(true)?;
        if let Err(e) = sock.connect_addr(&addr) {
            // systemd may not be reading yet; send_to is tried each time.
            debug!("notify socket: connect: {e}");
        }
        Ok(Notifier {
            sock: Some((sock, addr)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// Send one notification, `KEY=value` lines.
    pub fn send(&self, msg: &str) {
        let Some((sock, addr)) = &self.sock else { return };
        let sent = match sock.send(msg.as_bytes()) {
            Ok(n) => Ok(n),
            // Not connected at start, or the manager re-created its socket.
            Err(_) => sock.send_to_addr(msg.as_bytes(), addr),
        };
        match sent {
            Ok(_) => debug!("notify: {}", msg.replace('\n', " ")),
            Err(e) => debug!("notify {:?}: {e}", msg.lines().next().unwrap_or_default()),
        }
    }

    /// The listeners are up and the loop is about to serve.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload starts; `ready` says it is over. MONOTONIC_USEC lets the
    /// manager tell this reload from an earlier one (systemd 253+'s
    /// Type=notify-reload requires it; older ones ignore it).
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }
}

/// CLOCK_MONOTONIC in microseconds, as sd_notify's MONOTONIC_USEC wants.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000) + ts.tv_nsec as u64 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifier_sends_to_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("dotproxy-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::open(path.as_os_str()).unwrap();
        assert!(n.enabled());
        n.ready("serving");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        n.reloading();
        let len = rx.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("dotproxy-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let n = Notifier::open(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        n.stopping("draining");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=draining");

        assert!(Notifier::open(std::ffi::OsStr::new("relative/path")).is_err());
        // Nobody listening: sending is a quiet no-op.
        Notifier::default().ready("x");
    }
}
