//! The binary: take what the service manager passed, parse the command
//! line, start logging, bind, leave root, run the loop. Only this file
//! turns errors into exit codes (2: bad usage, refused before anything is
//! bound; 1: runtime).

use std::process::ExitCode;

use dotproxy::config::{self, Exit};

fn main() -> ExitCode {
    // First, while nothing else has opened a descriptor or started a
    // thread: the environment is changed here and nowhere later.
    let passed = dotproxy::systemd::take_listen_fds();
    let notify = dotproxy::systemd::Notifier::from_env();
    let cfg = match config::parse(std::env::args_os().skip(1).collect()) {
        Ok(cfg) => cfg,
        Err(Exit::Help) => {
            print!("{}", config::HELP);
            return ExitCode::SUCCESS;
        }
        Err(Exit::Version) => {
            println!("dotproxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(Exit::Usage(msg)) => {
            eprintln!("dotproxy: {msg}");
            return ExitCode::from(2);
        }
    };
    // rustls and mio narrate every record at debug; keep them one level
    // quieter unless tracing.
    let libs = cfg
        .log_level
        .min(log::LevelFilter::Info)
        .max(log::LevelFilter::Warn.min(cfg.log_level));
    let logger = simple_logger::SimpleLogger::new()
        .with_level(cfg.log_level)
        .with_module_level(
            "rustls",
            if cfg.log_level == log::LevelFilter::Trace {
                log::LevelFilter::Trace
            } else {
                libs
            },
        )
        .with_module_level("mio", libs);
    if let Err(e) = logger.init() {
        eprintln!("dotproxy: logger: {e}");
    }
    let notify = notify.unwrap_or_else(|msg| {
        log::warn!("{msg}");
        dotproxy::systemd::Notifier::default()
    });
    let passed = match passed {
        Ok(p) => p,
        Err(msg) => {
            log::error!("{msg}");
            return ExitCode::from(2);
        }
    };
    let user = match dotproxy::privileges::plan(cfg.user.as_deref()) {
        Ok(plan) => plan,
        Err(msg) => {
            log::error!("{msg}");
            return ExitCode::from(2);
        }
    };
    let mut proxy = match dotproxy::proxy::Proxy::bind_with(&cfg, passed, notify) {
        Ok(p) => p,
        Err(msg) => {
            log::error!("{msg}");
            return ExitCode::from(1);
        }
    };
    if let Err(msg) = dotproxy::privileges::apply(&user) {
        log::error!("{msg}");
        return ExitCode::from(1);
    }
    match proxy.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop: {e}");
            ExitCode::from(1)
        }
    }
}
