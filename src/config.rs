//! The command line: every option, its default, and the checks that refuse
//! a configuration before anything is bound.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;

pub const HELP: &str = "\
dotproxy: plain DNS (UDP and TCP) in, DNS-over-TLS (RFC 7858) out

USAGE:
  dotproxy [OPTIONS]

OPTIONS:
  -l, --listen ADDR:PORT          listen for plain DNS on UDP and TCP; repeatable;
                                  IPv6 as [::1]:5053 (default 127.0.0.1:5053)
  -u, --upstream IP[:PORT]#NAME   a DNS-over-TLS resolver; repeatable; port defaults
                                  to 853; NAME is the TLS authentication name (SNI
                                  and certificate check); IPv6 as
                                  [2606:4700:4700::1111]:853#cloudflare-dns.com
                                  (default 1.1.1.1#cloudflare-dns.com and
                                  1.0.0.1#cloudflare-dns.com)
      --ca-file PATH              trust the PEM CA certificates in PATH instead of
                                  the built-in Mozilla roots
      --timeout MS                deadline for one query, connect and TLS handshake
                                  included (default 2500)
      --log-level LEVEL           error|warn|info|debug|trace (default info, or
                                  RUST_LOG when set)
  -h, --help                      print this help
  -V, --version                   print the version

Certificates are always verified; there is no option to turn that off.
";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5053";
pub const DEFAULT_UPSTREAMS: [&str; 2] =
    ["1.1.1.1#cloudflare-dns.com", "1.0.0.1#cloudflare-dns.com"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: ServerName<'static>,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.addr, self.name.to_str())
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub log_level: log::LevelFilter,
}

/// What `parse` decided instead of a configuration.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Help,
    Version,
    /// One line for the operator; the process exits with status 2.
    Usage(String),
}

impl Upstream {
    /// Parse `IP[:PORT]#NAME`. A resolver without a name cannot be
    /// authenticated (RFC 8310 §8), so the name is required.
    pub fn parse(spec: &str) -> Result<Upstream, String> {
        let (addr, name) = spec
            .split_once('#')
            .ok_or_else(|| format!("upstream {spec:?} has no #NAME: the TLS authentication name is required (e.g. 1.1.1.1#cloudflare-dns.com)"))?;
        let addr = parse_addr(addr, 853).map_err(|e| format!("upstream {spec:?}: {e}"))?;
        if addr.port() == 53 {
            // RFC 7858 §3.1: DNS over TLS must not use port 53.
            return Err(format!(
                "upstream {spec:?}: port 53 is plain DNS, not DNS over TLS (use 853)"
            ));
        }
        let name = ServerName::try_from(name.to_string())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| format!("upstream {spec:?}: {name:?} is not a valid DNS name"))?;
        Ok(Upstream { addr, name })
    }
}

/// `IP`, `IP:PORT`, `[IPv6]`, `[IPv6]:PORT` or a bare IPv6 address.
pub fn parse_addr(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{s:?} is not an IP address with an optional port"))
}

fn level(s: &str) -> Option<log::LevelFilter> {
    s.parse().ok()
}

pub fn parse(args: Vec<std::ffi::OsString>) -> Result<Config, Exit> {
    let mut p = pico_args::Arguments::from_vec(args);
    if p.contains(["-h", "--help"]) {
        return Err(Exit::Help);
    }
    if p.contains(["-V", "--version"]) {
        return Err(Exit::Version);
    }
    let usage = |e: pico_args::Error| Exit::Usage(e.to_string());
    let listen: Vec<String> = p.values_from_str(["-l", "--listen"]).map_err(usage)?;
    let upstreams: Vec<String> = p.values_from_str(["-u", "--upstream"]).map_err(usage)?;
    let ca_file: Option<PathBuf> = p
        .opt_value_from_os_str("--ca-file", |s| Ok::<_, String>(PathBuf::from(s)))
        .map_err(usage)?;
    let timeout: Option<u64> = p.opt_value_from_str("--timeout").map_err(usage)?;
    let log_level: Option<String> = p.opt_value_from_str("--log-level").map_err(usage)?;
    let rest = p.finish();
    if let Some(arg) = rest.first() {
        return Err(Exit::Usage(format!(
            "unexpected argument {:?} (see --help)",
            arg
        )));
    }

    let listen = if listen.is_empty() {
        vec![DEFAULT_LISTEN.to_string()]
    } else {
        listen
    };
    let listen = listen
        .iter()
        .map(|s| {
            s.parse::<SocketAddr>().map_err(|_| {
                Exit::Usage(format!(
                    "--listen {s:?}: expected ADDR:PORT, IPv6 as [::1]:5053"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let upstreams = if upstreams.is_empty() {
        DEFAULT_UPSTREAMS.iter().map(|s| s.to_string()).collect()
    } else {
        upstreams
    };
    let upstreams = upstreams
        .iter()
        .map(|s| Upstream::parse(s).map_err(Exit::Usage))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match timeout {
        None => Duration::from_millis(2500),
        Some(ms) if (50..=60_000).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(Exit::Usage(format!(
                "--timeout {ms}: expected 50 to 60000 milliseconds"
            )))
        }
    };
    let log_level = match log_level {
        Some(s) => level(&s).ok_or_else(|| {
            Exit::Usage(format!(
                "--log-level {s:?}: expected error, warn, info, debug or trace"
            ))
        })?,
        None => std::env::var("RUST_LOG")
            .ok()
            .and_then(|s| level(&s))
            .unwrap_or(log::LevelFilter::Info),
    };
    if let Some(path) = &ca_file {
        if !path.is_file() {
            return Err(Exit::Usage(format!(
                "--ca-file {}: no such file",
                path.display()
            )));
        }
    }
    Ok(Config {
        listen,
        upstreams,
        ca_file,
        timeout,
        log_level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<std::ffi::OsString> {
        a.iter().map(|s| s.into()).collect()
    }

    #[test]
    fn upstream_forms() {
        let u = Upstream::parse("1.1.1.1#cloudflare-dns.com").unwrap();
        assert_eq!(u.addr, "1.1.1.1:853".parse().unwrap());
        let u = Upstream::parse("127.0.0.1:8853#dns.test").unwrap();
        assert_eq!(u.addr.port(), 8853);
        let u = Upstream::parse("[2606:4700:4700::1111]:853#cloudflare-dns.com").unwrap();
        assert!(u.addr.is_ipv6());
        let u = Upstream::parse("2606:4700:4700::1111#cloudflare-dns.com").unwrap();
        assert_eq!(u.addr.port(), 853);
        assert!(Upstream::parse("1.1.1.1").unwrap_err().contains("#NAME"));
        assert!(Upstream::parse("1.1.1.1:53#x.test").is_err());
        assert!(Upstream::parse("1.1.1.1#").is_err());
        assert!(Upstream::parse("host.test#x.test").is_err());
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse(args(&[])).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:5053".parse().unwrap()]);
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert!(matches!(
            parse(args(&["--timeout", "x"])),
            Err(Exit::Usage(_))
        ));
        assert!(matches!(parse(args(&["--bogus"])), Err(Exit::Usage(_))));
        assert!(matches!(
            parse(args(&["-l", "1.2.3.4"])),
            Err(Exit::Usage(_))
        ));
        assert_eq!(parse(args(&["--help"])).unwrap_err(), Exit::Help);
        let c = parse(args(&[
            "-l",
            "[::1]:0",
            "-l",
            "127.0.0.1:0",
            "-u",
            "127.0.0.1:1#a.test",
        ]))
        .unwrap();
        assert_eq!(c.listen.len(), 2);
    }
}
