//! Runs the real `dotproxy` binary, black-box.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::certs::TestCa;
use super::upstream::TestUpstream;

/// Path of the binary under test.
pub fn proxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dotproxy")
}

/// How long `TestProxy::start` waits for both "listening on" lines.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

pub struct TestProxy {
    child: Child,
    udp: SocketAddr,
    tcp: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

/// Finds "listening on <proto> <addr>" in a log line.
fn parse_listen(line: &str, proto: &str) -> Option<SocketAddr> {
    let key = format!("listening on {proto} ");
    let rest = &line[line.find(&key)? + key.len()..];
    let tok = rest.split(|c: char| c.is_whitespace() || c == ',').next()?;
    tok.parse().ok()
}

impl TestProxy {
    /// Spawns the proxy with `--listen 127.0.0.1:0 --log-level debug` plus
    /// `args`, and waits (10 s) for both listening lines. Panics with the
    /// collected log if that fails.
    pub fn start(args: &[&str]) -> TestProxy {
        match TestProxy::try_start(args) {
            Ok(p) => p,
            Err(e) => panic!("proxy did not start: {e}"),
        }
    }

    pub fn try_start(args: &[&str]) -> Result<TestProxy, String> {
        let mut full: Vec<&str> = vec!["--listen", "127.0.0.1:0", "--log-level", "debug"];
        full.extend_from_slice(args);
        TestProxy::try_start_exact(&full)
    }

    /// Like [`start`](Self::start) with exactly `args`, nothing added: a
    /// `--config` file can then set `listen` (e.g. 127.0.0.1:0) and
    /// `log-level` itself (the command line's would win over the file's).
    pub fn start_exact(args: &[&str]) -> TestProxy {
        match TestProxy::try_start_exact(args) {
            Ok(p) => p,
            Err(e) => panic!("proxy did not start: {e}"),
        }
    }

    pub fn try_start_exact(full: &[&str]) -> Result<TestProxy, String> {
        let mut cmd = Command::new(proxy_bin());
        cmd.args(full);
        TestProxy::try_start_command(cmd)
    }

    /// Runs `cmd` (the binary with its environment, or a wrapper that
    /// execs it, such as systemd-socket-activate) and waits for both
    /// listening lines.
    pub fn try_start_command(cmd: Command) -> Result<TestProxy, String> {
        let (proxy, rx) = TestProxy::launch(cmd)?;
        proxy.await_listening(rx)
    }

    /// Runs `cmd` with stderr collected, without waiting for anything;
    /// [`await_listening`](Self::await_listening) with the receiver
    /// finishes the start.
    pub fn launch(mut cmd: Command) -> Result<(TestProxy, mpsc::Receiver<String>), String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let l2 = logs.clone();
        let reader = thread::Builder::new()
            .name("proxy-stderr".into())
            .spawn(move || {
                // Ends at EOF, i.e. when the child (and its fds) are gone.
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    l2.lock().unwrap_or_else(|e| e.into_inner()).push(line.clone());
                    let _ = tx.send(line);
                }
            })
            .expect("spawn stderr reader");
        let proxy = TestProxy {
            child,
            udp: "0.0.0.0:0".parse().unwrap(),
            tcp: "0.0.0.0:0".parse().unwrap(),
            logs,
            reader: Some(reader),
            exited: None,
        };
        Ok((proxy, rx))
    }

    /// Waits (10 s) for both "listening on" lines of a launched proxy.
    pub fn await_listening(self, rx: mpsc::Receiver<String>) -> Result<TestProxy, String> {
        let mut proxy = self;
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let (mut udp, mut tcp) = (None, None);
        while udp.is_none() || tcp.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    udp = udp.or_else(|| parse_listen(&line, "udp"));
                    tcp = tcp.or_else(|| parse_listen(&line, "tcp"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no 'listening on udp/tcp' lines within {STARTUP_DEADLINE:?}; log:\n{}",
                        proxy.log_text()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = proxy.wait_exit(Duration::from_secs(2));
                    return Err(format!(
                        "proxy exited ({st:?}) before listening; log:\n{}",
                        proxy.log_text()
                    ));
                }
            }
        }
        proxy.udp = udp.unwrap();
        proxy.tcp = tcp.unwrap();
        if proxy.udp.port() != proxy.tcp.port() {
            return Err(format!("udp and tcp ports differ: {} vs {}", proxy.udp, proxy.tcp));
        }
        Ok(proxy)
    }

    /// Standard setup: one upstream, the CA file, a timeout, plus `extra`.
    pub fn for_upstream(
        ca: &TestCa,
        upstream: &TestUpstream,
        name: &str,
        timeout_ms: u64,
        extra: &[&str],
    ) -> TestProxy {
        TestProxy::over(ca, &[upstream.arg(name)], timeout_ms, extra)
    }

    /// One `--upstream` per entry of `upstreams` (in order), `--ca-file`
    /// of `ca`, `--timeout timeout_ms`, plus `extra`.
    pub fn over(ca: &TestCa, upstreams: &[String], timeout_ms: u64, extra: &[&str]) -> TestProxy {
        let t = timeout_ms.to_string();
        let mut args: Vec<&str> = Vec::new();
        for u in upstreams {
            args.extend_from_slice(&["--upstream", u.as_str()]);
        }
        args.extend_from_slice(&["--ca-file", ca.pem_path_str(), "--timeout", t.as_str()]);
        args.extend_from_slice(extra);
        TestProxy::start(&args)
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// All stderr lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn log_text(&self) -> String {
        self.logs().join("\n")
    }

    /// Number of log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until some log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, deadline: Instant) -> bool {
        super::client::wait_until(deadline, || self.count_log(needle) > 0)
    }

    /// Sends SIGTERM.
    pub fn kill_term(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.exited.is_some() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.exited {
            return Some(st);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.exited = Some(st);
                    if let Some(r) = self.reader.take() {
                        let _ = r.join();
                    }
                    return Some(st);
                }
                Ok(None) => {}
                Err(_) => return None,
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Number of open file descriptors of the proxy (/proc/PID/fd).
    pub fn open_fds(&self) -> usize {
        count_fds(self.pid())
    }
}

/// Open fds of a process, via /proc/PID/fd.
pub fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if thread::panicking() {
            eprintln!("---- dotproxy log ----\n{}\n----", self.log_text());
        }
    }
}

/// Result of running the binary to completion.
#[derive(Debug)]
pub struct RunOutput {
    /// `None` if it had to be killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with exactly `args` (nothing added) and waits up to
/// `timeout` for it to exit; kills it otherwise.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> RunOutput {
    let mut child = Command::new(proxy_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dotproxy");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    RunOutput {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}
