//! Command line and process lifecycle: --help, --version, SIGTERM when
//! idle, the listening lines. Refused upstream specs are in
//! `fault_resources` (l3).

use std::time::Duration;

use crate::it::basic::assert_default_answer;
use crate::util::{deadline_ms, query, run_to_exit, udp_exchange, Script, Setup};

const EXIT_DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn help_exits_0_and_mentions_every_option() {
    for flag in ["--help"] {
        let out = run_to_exit(&[flag], EXIT_DEADLINE);
        let status = out.status.expect("did not exit within 5 s");
        assert_eq!(status.code(), Some(0), "{flag}: {status:?}");
        let text = format!("{}{}", out.stdout, out.stderr);
        for opt in [
            "--listen",
            "-l",
            "--upstream",
            "-u",
            "--ca-file",
            "--timeout",
            "--log-level",
        ] {
            assert!(text.contains(opt), "{flag} output lacks {opt}:\n{text}");
        }
    }
}

#[test]
fn version_exits_0_and_prints_version() {
    let out = run_to_exit(&["--version"], EXIT_DEADLINE);
    let status = out.status.expect("did not exit within 5 s");
    assert_eq!(status.code(), Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "--version output: {text}");
}

#[test]
fn sigterm_exits_0_within_3s() {
    let mut s = Setup::new(Script::default());
    let r = udp_exchange(s.proxy.udp_addr(), &query(1, "pre.example"), deadline_ms(5000));
    assert_default_answer(&r.expect("answer before SIGTERM"), 1, "pre.example");
    s.proxy.kill_term();
    let st = s.proxy.wait_exit(Duration::from_secs(3));
    let st = st.expect("still running 3 s after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st:?}");
}

#[test]
fn listening_lines_logged_once_each() {
    let s = Setup::new(Script::default());
    assert_eq!(s.proxy.count_log("listening on udp"), 1);
    assert_eq!(s.proxy.count_log("listening on tcp"), 1);
}
