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
      --listen-tls ADDR[:PORT]    also serve DNS over TLS (RFC 7858) to clients on
                                  ADDR (port 853 by default); repeatable; needs
                                  --tls-cert and --tls-key
      --tls-cert PATH             the listener's certificate chain (PEM, leaf first)
      --tls-key PATH              its private key (PEM: PKCS#8, PKCS#1 or SEC1)
      --client-ca PATH            serve only TLS clients whose certificate chains to
                                  a CA in PATH (PEM), mutual TLS; others fail the
                                  handshake. SIGHUP re-reads the certificate, key
                                  and client CA (a broken file keeps the old ones)
  -u, --upstream IP[:PORT]#NAME[@pin=BASE64]...
                                  a DNS-over-TLS resolver; repeatable; port defaults
                                  to 853; NAME is the TLS authentication name (SNI
                                  and certificate check); IPv6 as
                                  [2606:4700:4700::1111]:853#cloudflare-dns.com;
                                  @pin= adds an SPKI SHA-256 pin (RFC 7858 §4.2,
                                  repeatable): with a NAME both must match, without
                                  one (IP[:PORT]@pin=...) the pin alone authenticates;
                                  @ca=PATH trusts PATH for this upstream only
                                  (default 1.1.1.1#cloudflare-dns.com and
                                  1.0.0.1#cloudflare-dns.com)
      --ca-file PATH              trust the PEM CA certificates in PATH instead of
                                  the built-in Mozilla roots
      --timeout MS                deadline for one query, connect and TLS handshake
                                  included (default 2500)
      --log-level LEVEL           error|warn|info|debug|trace (default info, or
                                  RUST_LOG when set)
      --forward ZONE=UPSTREAM     send names at or under ZONE to UPSTREAM (same form
                                  as --upstream, plus @ca=PATH for its own CA);
                                  repeatable, several per zone allowed; the longest
                                  matching zone wins, other names go to --upstream.
                                  UPSTREAM plain:IP[:PORT] (port 53 by default) is a
                                  plain DNS server spoken to over TCP, UNENCRYPTED
                                  and unauthenticated: for a cluster's own DNS
                                  service, e.g. cluster.local=plain:10.96.0.10
      --reuseport                 bind the listeners with SO_REUSEPORT, so several
                                  dotproxy processes can share one address and the
                                  kernel spreads clients over them (one per core)
      --allow CIDR                clients allowed to query; repeatable; replaces the
                                  default (loopback, 10/8, 172.16/12, 192.168/16,
                                  100.64/10, fc00::/7, fe80::/10); UDP queries from
                                  elsewhere are dropped, TCP connections closed
      --metrics ADDR:PORT         serve Prometheus /metrics and /healthz over HTTP
      --padding BLOCK             pad queries sent upstream to a multiple of BLOCK
                                  bytes (RFC 8467; default 128, 0 = off)
      --cache-size N              cache up to N answers (TTL-aged, RFC 2308 negative
                                  caching) and merge identical queries in flight;
                                  default 0 = off
      --cache-memory SIZE         bytes the cache may hold (K, M, G suffixes; default
                                  16M); least recently used answers leave first
      --cache-min-ttl S           keep answers at least S seconds (default 0)
      --cache-max-ttl S           keep answers at most S seconds (default 86400)
      --cache-max-negative-ttl S  keep NXDOMAIN and NODATA at most S seconds
                                  (default 3600)
      --stale-max-age S           answer from entries expired at most S seconds ago
                                  when no upstream answers in time (RFC 8767: TTL 30,
                                  EDE 3); default 86400, 0 = off
      --stale-answer-after MS     how long a query waits for the upstream before a
                                  stale answer is sent, the refresh going on
                                  (default 1800, at most 3/4 of --timeout)
      --no-prefetch               do not refresh popular entries before they expire
                                  (by default a hit in the last tenth of an entry's
                                  TTL refreshes it in the background)
      --max-inflight N            queries in flight in total (default 10000);
                                  beyond it new queries get REFUSED
      --max-inflight-per-ip N     queries in flight per client address (default
                                  5000); beyond it REFUSED
      --max-tcp-clients N         open TCP client connections (default 1024, and
                                  below the descriptor limit); at the limit the
                                  connection idle longest is closed for a newcomer,
                                  or the newcomer when none is idle
      --max-tcp-clients-per-ip N  open TCP client connections per client address
                                  (default 64); at the limit likewise
      --max-tcp-queries N         queries one TCP client connection may send; after
                                  N they are answered and the connection closed
                                  (default 0 = no limit)
      --max-upstream-conn-queries N
                                  queries sent on one upstream connection before it
                                  is replaced (in flight ones still answered;
                                  default 0 = no limit)
      --max-tcp-pipeline N         queries in flight per TCP connection (default
                                  256); further queries wait in its buffer
      --max-query-size BYTES      largest query accepted from a client (default 4096,
                                  512 to 65535); larger ones get FORMERR
      --tcp-idle-timeout MS        close a TCP client that completes no query and
                                  has no answer pending for this long, or whose
                                  pending answers make no progress for this long;
                                  also bounds a slowly trickled query (default 10000)
      --per-ip-exempt CIDR        addresses the per-address limits do not apply to
                                  (only the totals do); repeatable; `none` for no
                                  exemption (default 127.0.0.0/8 and ::1/128)
      --per-ip-ipv6-prefix LEN    per-address limits count IPv6 clients by this
                                  prefix (default 64, 16 to 128)
      --user NAME[:GROUP]         started as root: bind every socket, then run as
                                  NAME (and GROUP, default NAME's own group) with
                                  no capabilities; refused when not root unless
                                  already NAME; --config and CA files must be
                                  readable by NAME for SIGHUP
      --config FILE               read more options from FILE, one per line as
                                  `name value` (e.g. upstream 1.1.1.1#cloudflare-dns.com);
                                  SIGHUP re-reads it and applies upstreams, forwards,
                                  access list, padding, timeout and limits without
                                  dropping queries in flight
      --watch-config SECONDS      also reload when the --config file's content
                                  changes, checked every SECONDS (1 to 3600; default
                                  off): a Kubernetes ConfigMap update, which
                                  cannot send a signal
  -h, --help                      print this help
  -V, --version                   print the version

Certificates are always verified; there is no option to turn that off.
";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5053";
pub const DEFAULT_UPSTREAMS: [&str; 2] = ["1.1.1.1#cloudflare-dns.com", "1.0.0.1#cloudflare-dns.com"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// The authentication name (SNI and certificate check); an IP address
    /// when only pins authenticate the server.
    pub name: ServerName<'static>,
    /// SHA-256 digests of acceptable SubjectPublicKeyInfo (RFC 7858 §4.2).
    pub pins: Vec<[u8; 32]>,
    /// This upstream's own CA file (`@ca=PATH`), e.g. a corporate resolver.
    pub ca_file: Option<PathBuf>,
    /// Plain DNS over TCP, unencrypted: only a `--forward` zone's
    /// `plain:IP:PORT`, e.g. a cluster's own DNS service.
    pub plain: bool,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            _ if self.plain => write!(f, "plain:{}", self.addr)?,
            ServerName::DnsName(n) => write!(f, "{}#{}", self.addr, n.as_ref())?,
            _ => write!(f, "{}", self.addr)?,
        }
        if !self.pins.is_empty() {
            write!(
                f,
                " ({} pin{})",
                self.pins.len(),
                if self.pins.len() > 1 { "s" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// Standard base64 (RFC 4648 §4), padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The command line it came from (the --config file is read again from
    /// it on SIGHUP).
    pub args: Vec<std::ffi::OsString>,
    pub listen: Vec<SocketAddr>,
    /// DNS over TLS to clients: where, and with what certificate.
    pub listen_tls: Vec<SocketAddr>,
    pub tls: Option<ServerTls>,
    pub upstreams: Vec<Upstream>,
    /// Split forwarding: names at or under the zone go to these upstreams.
    pub forwards: Vec<(String, Upstream)>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub log_level: log::LevelFilter,
    pub allow: Vec<Cidr>,
    pub metrics: Option<SocketAddr>,
    pub padding: u16,
    pub limits: Limits,
    /// The cache; `size` 0 turns caching (and merging) off.
    pub cache: CacheOptions,
    /// Bind the listeners with SO_REUSEPORT (several processes, one port).
    pub reuseport: bool,
    /// The --config file, and how often to look for a change to it.
    pub config_file: Option<PathBuf>,
    pub watch_config: Option<Duration>,
    /// `--user NAME[:GROUP]`, as given: become that user once bound.
    pub user: Option<String>,
}

/// The certificate files of the DNS-over-TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS: clients must present a certificate chaining to this.
    pub client_ca: Option<PathBuf>,
}

/// The bounds on what clients can make the proxy hold.
/// How per-address limits see client addresses: addresses in `exempt`
/// (loopback by default: every local program is 127.0.0.1, so a limit per
/// address would limit them all together) count only against the global
/// limits; IPv6 addresses count by their `/v6_prefix` (one host or LAN
/// holds a whole /64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerAddress {
    pub v6_prefix: u8,
    pub exempt: Vec<Cidr>,
}

impl PerAddress {
    /// The key `ip` is counted under, or `None` when it is exempt.
    pub fn key(&self, ip: IpAddr) -> Option<IpAddr> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.exempt.iter().any(|c| c.contains(ip)) {
            return None;
        }
        Some(match ip {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.v6_prefix.min(128)))
                    .unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
            v4 => v4,
        })
    }
}

/// What the cache options say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    pub size: usize,
    pub memory: usize,
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub max_negative_ttl: u32,
    pub stale_max_age: u32,
    pub stale_after: Duration,
    pub prefetch: bool,
}

impl Config {
    /// The options that differ in `new` but cannot change while running:
    /// sockets are bound once (and privileges may be gone by then), the
    /// cache is sized once, logging is set up once.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.listen != new.listen {
            changed.push("--listen");
        }
        if self.listen_tls != new.listen_tls {
            changed.push("--listen-tls");
        }
        if self.metrics != new.metrics {
            changed.push("--metrics");
        }
        if self.reuseport != new.reuseport {
            changed.push("--reuseport");
        }
        if self.user != new.user {
            changed.push("--user");
        }
        if self.cache.size != new.cache.size || self.cache.memory != new.cache.memory {
            changed.push("--cache-size/--cache-memory");
        }
        if self.log_level != new.log_level {
            changed.push("--log-level");
        }
        changed
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_inflight: usize,
    pub max_inflight_per_ip: u32,
    pub max_tcp_clients: usize,
    pub max_tcp_pipeline: u32,
    /// Largest client query accepted, in bytes.
    pub max_query_size: usize,
    /// TCP client connections per client address.
    pub max_tcp_clients_per_ip: u32,
    /// Queries one TCP client connection may send before it is closed
    /// (0: no limit).
    pub max_tcp_queries: u64,
    /// Queries sent on one upstream connection before it is replaced
    /// (0: no limit).
    pub max_upstream_conn_queries: u64,
    pub tcp_idle: Duration,
    /// How the per-address limits group client addresses.
    pub per_address: PerAddress,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight: 10_000,
            max_inflight_per_ip: 5000,
            max_tcp_clients: 1024,
            max_tcp_pipeline: 256,
            max_query_size: 4096,
            max_tcp_clients_per_ip: 64,
            max_tcp_queries: 0,
            max_upstream_conn_queries: 0,
            tcp_idle: Duration::from_secs(10),
            per_address: PerAddress {
                v6_prefix: 64,
                exempt: DEFAULT_PER_IP_EXEMPT
                    .iter()
                    .filter_map(|c| Cidr::parse(c).ok())
                    .collect(),
            },
        }
    }
}

/// Client addresses the per-address limits do not apply to, by default.
pub const DEFAULT_PER_IP_EXEMPT: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// An address prefix of the access list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Private and local networks, as dnsdist allows by default: a proxy that
/// listens on a public address must not become an open resolver.
pub const DEFAULT_ALLOW: [&str; 8] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?}: expected an address or a prefix such as 192.0.2.0/24");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(a.to_bits()), u128::from(b.to_bits()), 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
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
    /// Parse `IP[:PORT][#NAME][@pin=BASE64]...`. A resolver must be
    /// authenticated (RFC 8310): by a name, by SPKI pins, or both (then
    /// both must hold).
    pub fn parse(spec: &str) -> Result<Upstream, String> {
        if spec.starts_with("plain:") {
            return Err(format!(
                "upstream {spec:?}: plain DNS is unencrypted; it is allowed only for a zone, as --forward ZONE={spec}"
            ));
        }
        let mut parts = spec.split('@');
        let head = parts.next().unwrap_or_default();
        let mut pins = Vec::new();
        let mut ca_file = None;
        for p in parts {
            if let Some(path) = p.strip_prefix("ca=") {
                let path = PathBuf::from(path);
                if !path.is_file() {
                    return Err(format!("upstream {spec:?}: CA file {} not found", path.display()));
                }
                ca_file = Some(path);
                continue;
            }
            let b64 = p
                .strip_prefix("pin=")
                .or_else(|| p.strip_prefix("pin-sha256="))
                .ok_or_else(|| format!("upstream {spec:?}: expected @pin=BASE64 or @ca=PATH, found @{p}"))?;
            let pin = base64_decode(b64)
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| format!("upstream {spec:?}: pin {b64:?} is not a base64 SHA-256 digest"))?;
            pins.push(pin);
        }
        let (addr, name) = match head.split_once('#') {
            Some((a, n)) => (a, Some(n)),
            None if !pins.is_empty() => (head, None),
            None => return Err(format!("upstream {spec:?} has no #NAME: the TLS authentication name is required (e.g. 1.1.1.1#cloudflare-dns.com), or a @pin=")),
        };
        let addr = parse_addr(addr, 853).map_err(|e| format!("upstream {spec:?}: {e}"))?;
        if addr.port() == 53 {
            // RFC 7858 §3.1: DNS over TLS must not use port 53, whatever
            // authenticates the server.
            return Err(format!(
                "upstream {spec:?}: port 53 is plain DNS, not DNS over TLS (use 853)"
            ));
        }
        let Some(name) = name else {
            return Ok(Upstream {
                addr,
                name: ServerName::IpAddress(addr.ip().into()),
                pins,
                ca_file,
                plain: false,
            });
        };
        let name = ServerName::try_from(name.to_string())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| format!("upstream {spec:?}: {name:?} is not a valid DNS name"))?;
        Ok(Upstream {
            addr,
            name,
            pins,
            ca_file,
            plain: false,
        })
    }

    /// Parse the `IP[:PORT]` of `plain:IP[:PORT]` (port 53 by default): a
    /// plain DNS server, spoken to over TCP.
    pub fn parse_plain(addr: &str) -> Result<Upstream, String> {
        let spec = format!("plain:{addr}");
        if addr.contains('#') || addr.contains('@') {
            return Err(format!(
                "upstream {spec:?}: a plain DNS server is not authenticated; #NAME, @pin and @ca do not apply"
            ));
        }
        let addr = parse_addr(addr, 53).map_err(|e| format!("upstream {spec:?}: {e}"))?;
        Ok(Upstream {
            addr,
            name: ServerName::IpAddress(addr.ip().into()),
            pins: Vec::new(),
            ca_file: None,
            plain: true,
        })
    }
}

/// `IP`, `IP:PORT`, `[IPv6]`, `[IPv6]:PORT` or a bare IPv6 address.
pub fn parse_addr(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{s:?} is not an IP address with an optional port"))
}

fn level(s: &str) -> Option<log::LevelFilter> {
    s.parse().ok()
}

/// Read a --config file: one option per line, its long name without the
/// dashes, a space, the value (`upstream 1.1.1.1#cloudflare-dns.com`);
/// `#` starts a comment line. Returned as command-line arguments.
/// Options that may be given more than once: the file's add to the
/// command line's. Any other option set on the command line wins over the
/// file's, which is then skipped (pico-args would reject the second).
const REPEATABLE: [&str; 6] = ["listen", "listen-tls", "upstream", "forward", "allow", "per-ip-exempt"];

fn read_config_file(
    path: &std::path::Path,
    on_command_line: &std::collections::HashSet<String>,
) -> Result<Vec<std::ffi::OsString>, Exit> {
    let text = std::fs::read_to_string(path).map_err(|e| Exit::Usage(format!("--config {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if matches!(name, "config" | "help" | "version") || name.starts_with('-') {
            return Err(Exit::Usage(format!(
                "--config {} line {}: {name:?} is not allowed here",
                path.display(),
                n + 1
            )));
        }
        let flag = format!("--{name}");
        if !REPEATABLE.contains(&name) && on_command_line.contains(&flag) {
            continue;
        }
        out.push(flag.into());
        let value = value.trim();
        if !value.is_empty() {
            out.push(value.into());
        }
    }
    Ok(out)
}

/// The command line merged with the `--config` file (its options after
/// the command line's, so repeatable ones add up and single ones set on
/// the command line win, as pico-args takes the first).
fn arguments(args: Vec<std::ffi::OsString>) -> Result<(pico_args::Arguments, Option<PathBuf>), Exit> {
    let mut p = pico_args::Arguments::from_vec(args);
    let config_file: Option<PathBuf> = p
        .opt_value_from_os_str("--config", |s| Ok::<_, String>(PathBuf::from(s)))
        .map_err(|e| Exit::Usage(e.to_string()))?;
    if let Some(path) = &config_file {
        let mut all = p.finish();
        let given = all
            .iter()
            .filter_map(|a| a.to_str())
            .filter(|a| a.starts_with("--"))
            .map(|a| a.split('=').next().unwrap_or(a).to_string())
            .collect();
        all.extend(read_config_file(path, &given)?);
        p = pico_args::Arguments::from_vec(all);
    }
    if p.contains(["-h", "--help"]) {
        return Err(Exit::Help);
    }
    if p.contains(["-V", "--version"]) {
        return Err(Exit::Version);
    }
    Ok((p, config_file))
}

fn usage(e: pico_args::Error) -> Exit {
    Exit::Usage(e.to_string())
}

/// An optional number option within `min..=max`.
fn number(p: &mut pico_args::Arguments, name: &'static str, min: u64, max: u64) -> Result<Option<u64>, Exit> {
    match p.opt_value_from_str::<_, u64>(name).map_err(usage)? {
        Some(n) if !(min..=max).contains(&n) => Err(Exit::Usage(format!("{name} {n}: expected {min} to {max}"))),
        n => Ok(n),
    }
}

fn limits(p: &mut pico_args::Arguments) -> Result<Limits, Exit> {
    let mut limits = Limits::default();
    if let Some(n) = number(p, "--max-inflight", 1, 1_000_000)? {
        limits.max_inflight = n as usize;
    }
    if let Some(n) = number(p, "--max-inflight-per-ip", 1, 1_000_000)? {
        limits.max_inflight_per_ip = n as u32;
    }
    if let Some(n) = number(p, "--max-tcp-clients", 1, 1_000_000)? {
        limits.max_tcp_clients = n as usize;
    }
    if let Some(n) = number(p, "--max-tcp-pipeline", 1, 65_535)? {
        limits.max_tcp_pipeline = n as u32;
    }
    if let Some(n) = number(p, "--max-query-size", 512, 65_535)? {
        limits.max_query_size = n as usize;
    }
    if let Some(n) = number(p, "--max-tcp-clients-per-ip", 1, 1_000_000)? {
        limits.max_tcp_clients_per_ip = n as u32;
    }
    if let Some(n) = number(p, "--max-tcp-queries", 0, u64::from(u32::MAX))? {
        limits.max_tcp_queries = n;
    }
    if let Some(n) = number(p, "--max-upstream-conn-queries", 0, u64::from(u32::MAX))? {
        limits.max_upstream_conn_queries = n;
    }
    if let Some(n) = number(p, "--tcp-idle-timeout", 100, 3_600_000)? {
        limits.tcp_idle = Duration::from_millis(n);
    }
    if let Some(n) = number(p, "--per-ip-ipv6-prefix", 16, 128)? {
        limits.per_address.v6_prefix = n as u8;
    }
    let exempt: Vec<String> = p.values_from_str("--per-ip-exempt").map_err(usage)?;
    if !exempt.is_empty() {
        limits.per_address.exempt = exempt
            .iter()
            .filter(|s| s.as_str() != "none")
            .map(|s| Cidr::parse(s).map_err(|e| Exit::Usage(format!("--per-ip-exempt {e}"))))
            .collect::<Result<_, _>>()?;
    }
    Ok(limits)
}

/// Each value parsed by `one`, or the defaults when none was given.
fn each<T>(given: Vec<String>, defaults: &[&str], one: impl Fn(&str) -> Result<T, Exit>) -> Result<Vec<T>, Exit> {
    if given.is_empty() {
        defaults.iter().map(|s| one(s)).collect()
    } else {
        given.iter().map(|s| one(s)).collect()
    }
}

fn socket_addr(option: &str, s: &str) -> Result<SocketAddr, Exit> {
    s.parse::<SocketAddr>()
        .map_err(|_| Exit::Usage(format!("{option} {s:?}: expected ADDR:PORT, IPv6 as [::1]:5053")))
}

fn forward(f: &str) -> Result<(String, Upstream), Exit> {
    let (zone, up) = f
        .split_once('=')
        .ok_or_else(|| Exit::Usage(format!("--forward {f:?}: expected ZONE=UPSTREAM")))?;
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let valid = zone.split('.').all(|l| !l.is_empty() && l.len() <= 63) && zone.len() <= 253;
    if !valid {
        return Err(Exit::Usage(format!("--forward {f:?}: {zone:?} is not a zone name")));
    }
    let up = match up.strip_prefix("plain:") {
        Some(addr) => Upstream::parse_plain(addr),
        None => Upstream::parse(up),
    };
    Ok((zone, up.map_err(Exit::Usage)?))
}

/// --tls-cert, --tls-key and --client-ca: all or nothing with --listen-tls.
fn server_tls(p: &mut pico_args::Arguments, listening: bool) -> Result<Option<ServerTls>, Exit> {
    let mut path = |name: &'static str| -> Result<Option<PathBuf>, Exit> {
        let v: Option<PathBuf> = p
            .opt_value_from_os_str(name, |s| Ok::<_, String>(PathBuf::from(s)))
            .map_err(usage)?;
        match v {
            Some(f) if !f.is_file() => Err(Exit::Usage(format!("{name} {}: no such file", f.display()))),
            v => Ok(v),
        }
    };
    let (cert, key, client_ca) = (path("--tls-cert")?, path("--tls-key")?, path("--client-ca")?);
    match (listening, cert, key) {
        (true, Some(cert), Some(key)) => Ok(Some(ServerTls { cert, key, client_ca })),
        (true, _, _) => Err(Exit::Usage("--listen-tls needs --tls-cert and --tls-key".into())),
        (false, None, None) if client_ca.is_none() => Ok(None),
        (false, _, _) => Err(Exit::Usage(
            "--tls-cert, --tls-key and --client-ca are for --listen-tls, which is not given".into(),
        )),
    }
}

fn timeout(ms: Option<u64>) -> Result<Duration, Exit> {
    match ms {
        None => Ok(Duration::from_millis(2500)),
        Some(ms) if (50..=60_000).contains(&ms) => Ok(Duration::from_millis(ms)),
        Some(ms) => Err(Exit::Usage(format!(
            "--timeout {ms}: expected 50 to 60000 milliseconds"
        ))),
    }
}

fn log_level(given: Option<String>) -> Result<log::LevelFilter, Exit> {
    match given {
        Some(s) => level(&s)
            .ok_or_else(|| Exit::Usage(format!("--log-level {s:?}: expected error, warn, info, debug or trace"))),
        None => Ok(std::env::var("RUST_LOG")
            .ok()
            .and_then(|s| level(&s))
            .unwrap_or(log::LevelFilter::Info)),
    }
}

fn padding(given: Option<u16>) -> Result<u16, Exit> {
    match given.unwrap_or(128) {
        p if p > 0 && !(16..=1024).contains(&p) => {
            Err(Exit::Usage(format!("--padding {p}: expected 0 (off) or 16 to 1024")))
        }
        p => Ok(p),
    }
}

/// A size in bytes, with an optional K, M or G suffix (powers of 1024).
fn size(option: &str, s: &str) -> Result<usize, Exit> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => {
            return Err(Exit::Usage(format!(
                "{option} {s:?}: expected bytes, or a number with K, M or G"
            )))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| (64 << 10..=16 << 30).contains(&n))
        .ok_or_else(|| Exit::Usage(format!("{option} {s:?}: expected 64K to 16G")))
}

fn cache_options(p: &mut pico_args::Arguments, timeout: Duration) -> Result<CacheOptions, Exit> {
    let memory: Option<String> = p.opt_value_from_str("--cache-memory").map_err(usage)?;
    let stale_after = number(p, "--stale-answer-after", 50, 60_000)?.unwrap_or(1800);
    Ok(CacheOptions {
        size: number(p, "--cache-size", 0, 10_000_000)?.unwrap_or(0) as usize,
        memory: memory.map_or(Ok(16 << 20), |m| size("--cache-memory", &m))?,
        min_ttl: number(p, "--cache-min-ttl", 0, 86_400)?.unwrap_or(0) as u32,
        max_ttl: number(p, "--cache-max-ttl", 1, 604_800)?.unwrap_or(86_400) as u32,
        max_negative_ttl: number(p, "--cache-max-negative-ttl", 0, 86_400)?.unwrap_or(3600) as u32,
        stale_max_age: number(p, "--stale-max-age", 0, 604_800)?.unwrap_or(86_400) as u32,
        // Below the timeout, or a stale answer could never go out first.
        stale_after: Duration::from_millis(stale_after).min(timeout * 3 / 4),
        prefetch: !p.contains("--no-prefetch"),
    })
}

/// Parse and check the whole configuration; nothing is bound or opened.
pub fn parse(args: Vec<std::ffi::OsString>) -> Result<Config, Exit> {
    let original = args.clone();
    let (mut p, config_file) = arguments(args)?;
    let listen: Vec<String> = p.values_from_str(["-l", "--listen"]).map_err(usage)?;
    let listen_tls: Vec<String> = p.values_from_str("--listen-tls").map_err(usage)?;
    let tls = server_tls(&mut p, !listen_tls.is_empty())?;
    let upstreams: Vec<String> = p.values_from_str(["-u", "--upstream"]).map_err(usage)?;
    let forwards: Vec<String> = p.values_from_str("--forward").map_err(usage)?;
    let ca_file: Option<PathBuf> = p
        .opt_value_from_os_str("--ca-file", |s| Ok::<_, String>(PathBuf::from(s)))
        .map_err(usage)?;
    let timeout = timeout(p.opt_value_from_str("--timeout").map_err(usage)?)?;
    let log_level = log_level(p.opt_value_from_str("--log-level").map_err(usage)?)?;
    let allow: Vec<String> = p.values_from_str("--allow").map_err(usage)?;
    let metrics: Option<String> = p.opt_value_from_str("--metrics").map_err(usage)?;
    let padding = padding(p.opt_value_from_str("--padding").map_err(usage)?)?;
    let cache = cache_options(&mut p, timeout)?;
    let reuseport = p.contains("--reuseport");
    let watch_config = number(&mut p, "--watch-config", 1, 3600)?.map(Duration::from_secs);
    if watch_config.is_some() && config_file.is_none() {
        return Err(Exit::Usage("--watch-config needs --config FILE".into()));
    }
    let user: Option<String> = p.opt_value_from_str("--user").map_err(usage)?;
    if let Some(u) = &user {
        let (name, group) = u.split_once(':').unwrap_or((u, "x"));
        if name.is_empty() || group.is_empty() || group.contains(':') {
            return Err(Exit::Usage(format!("--user {u:?}: expected NAME or NAME:GROUP")));
        }
    }
    let limits = limits(&mut p)?;
    if let Some(arg) = p.finish().first() {
        return Err(Exit::Usage(format!("unexpected argument {:?} (see --help)", arg)));
    }
    if let Some(path) = &ca_file {
        if !path.is_file() {
            return Err(Exit::Usage(format!("--ca-file {}: no such file", path.display())));
        }
    }
    Ok(Config {
        args: original,
        listen: each(listen, &[DEFAULT_LISTEN], |s| socket_addr("--listen", s))?,
        listen_tls: each(listen_tls, &[], |s| {
            parse_addr(s, 853).map_err(|e| Exit::Usage(format!("--listen-tls {e}")))
        })?,
        tls,
        upstreams: each(upstreams, &DEFAULT_UPSTREAMS, |s| {
            Upstream::parse(s).map_err(Exit::Usage)
        })?,
        forwards: each(forwards, &[], forward)?,
        ca_file,
        timeout,
        log_level,
        allow: each(allow, &DEFAULT_ALLOW, |s| {
            Cidr::parse(s).map_err(|e| Exit::Usage(format!("--allow {e}")))
        })?,
        metrics: metrics.map(|s| socket_addr("--metrics", &s)).transpose()?,
        padding,
        limits,
        reuseport,
        cache,
        config_file,
        watch_config,
        user,
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
        let pin = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let u = Upstream::parse(&format!("127.0.0.1:8853@pin={pin}")).unwrap();
        assert_eq!(u.pins.len(), 1);
        assert!(matches!(u.name, ServerName::IpAddress(_)));
        let u = Upstream::parse(&format!("127.0.0.1#dns.test@pin={pin}@pin-sha256={pin}")).unwrap();
        assert_eq!(u.pins.len(), 2);
        // Port 53 is refused in every form, the pin-only one included.
        let err = Upstream::parse(&format!("127.0.0.1:53@pin={pin}")).unwrap_err();
        assert!(err.contains("port 53"), "{err}");
        assert!(Upstream::parse(&format!("127.0.0.1:53#dns.test@pin={pin}")).is_err());
        assert!(Upstream::parse("[::1]:53#dns.test").is_err());
        assert!(Upstream::parse("127.0.0.1#dns.test@pin=abc").is_err());
        assert!(Upstream::parse("127.0.0.1#dns.test@foo=abc").is_err());
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        let c = parse(args(&["--forward", "cluster.local=plain:10.96.0.10"])).unwrap();
        let (zone, up) = &c.forwards[0];
        assert_eq!(zone, "cluster.local");
        assert!(up.plain);
        assert_eq!(up.to_string(), "plain:10.96.0.10:53");
        assert!(parse(args(&["--upstream", "plain:10.96.0.10"])).is_err());
        let c = parse(args(&["--forward", "Corp.Example.=10.0.0.53#dns.corp.example"])).unwrap();
        assert_eq!(c.forwards[0].0, "corp.example");
        assert!(parse(args(&["--forward", "corp.example"])).is_err());
        assert!(parse(args(&["--forward", "a..b=10.0.0.53#x.test"])).is_err());
        assert!(Upstream::parse("127.0.0.1#x.test@ca=/nonexistent").is_err());
    }

    #[test]
    fn config_file_adds_options() {
        let dir = std::env::temp_dir().join(format!("dotproxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dotproxy.conf");
        std::fs::write(&path, "# comment\nupstream 127.0.0.1:8853#a.test\n\nforward corp.example=10.0.0.1#b.test\nallow 10.0.0.0/8\ntimeout 900\n").unwrap();
        let c = parse(args(&["--config", path.to_str().unwrap(), "-u", "127.0.0.2#c.test"])).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.forwards.len(), 1);
        assert_eq!(c.timeout, Duration::from_millis(900));
        assert_eq!(c.allow.len(), 1);
        // A single option on both: the command line's wins, no error.
        let c = parse(args(&["--config", path.to_str().unwrap(), "--timeout", "700"])).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(700));
        assert_eq!(c.user, None);
        std::fs::write(&path, "user nobody:nogroup\n").unwrap();
        let c = parse(args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.user.as_deref(), Some("nobody:nogroup"));
        for bad in ["", ":x", "x:", "a:b:c"] {
            assert!(parse(args(&["--user", bad])).is_err(), "--user {bad:?}");
        }
        std::fs::write(&path, "bogus 1\n").unwrap();
        assert!(matches!(
            parse(args(&["--config", path.to_str().unwrap()])),
            Err(Exit::Usage(_))
        ));
        std::fs::write(&path, "config /etc/x\n").unwrap();
        assert!(matches!(
            parse(args(&["--config", path.to_str().unwrap()])),
            Err(Exit::Usage(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn access_list() {
        let c = |s| Cidr::parse(s).unwrap();
        assert!(c("10.0.0.0/8").contains("10.1.2.3".parse().unwrap()));
        assert!(!c("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(c("10.0.0.0/8").contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(c("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(c("::/0").contains("2001:db8::1".parse().unwrap()));
        assert!(!c("::/0").contains("192.0.2.1".parse().unwrap()));
        assert!(c("fe80::/10").contains("fe80::1".parse().unwrap()));
        assert!(c("192.0.2.7").contains("192.0.2.7".parse().unwrap()));
        assert!(!c("192.0.2.7").contains("192.0.2.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
        let d = parse(args(&[])).unwrap();
        let allowed = |ip: &str| d.allow.iter().any(|c| c.contains(ip.parse().unwrap()));
        assert!(allowed("127.0.0.1") && allowed("192.168.1.1") && allowed("100.64.0.1") && allowed("fd00::1"));
        assert!(!allowed("8.8.8.8") && !allowed("2001:db8::1"));
    }

    #[test]
    fn per_address_keys() {
        let d = parse(args(&[])).unwrap().limits.per_address;
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(d.key(ip("127.0.0.1")), None);
        assert_eq!(d.key(ip("::1")), None);
        assert_eq!(d.key(ip("::ffff:127.0.0.5")), None);
        assert_eq!(d.key(ip("10.1.2.3")), Some(ip("10.1.2.3")));
        assert_eq!(d.key(ip("::ffff:10.1.2.3")), Some(ip("10.1.2.3")));
        assert_eq!(d.key(ip("2001:db8:1:2:aaaa::1")), Some(ip("2001:db8:1:2::")));
        let c = parse(args(&["--per-ip-exempt", "none", "--per-ip-ipv6-prefix", "128"])).unwrap();
        let p = c.limits.per_address;
        assert_eq!(p.key(ip("127.0.0.1")), Some(ip("127.0.0.1")));
        assert_eq!(p.key(ip("2001:db8::1")), Some(ip("2001:db8::1")));
        let c = parse(args(&["--per-ip-exempt", "10.0.0.0/8", "--per-ip-ipv6-prefix", "48"])).unwrap();
        let p = c.limits.per_address;
        assert_eq!(p.key(ip("10.9.9.9")), None);
        assert_eq!(p.key(ip("127.0.0.1")), Some(ip("127.0.0.1")));
        assert_eq!(p.key(ip("2001:db8:1:ffff::1")), Some(ip("2001:db8:1::")));
        assert!(parse(args(&["--per-ip-ipv6-prefix", "8"])).is_err());
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse(args(&[])).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:5053".parse().unwrap()]);
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert!(matches!(parse(args(&["--timeout", "x"])), Err(Exit::Usage(_))));
        assert!(matches!(parse(args(&["--bogus"])), Err(Exit::Usage(_))));
        assert!(matches!(parse(args(&["-l", "1.2.3.4"])), Err(Exit::Usage(_))));
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
