//! `--user NAME[:GROUP]`: started as root, bind every socket, then become
//! that user for good. The user and group are looked up before anything
//! is bound (a typo fails fast, nothing half-started); the switch happens
//! after [`Proxy::bind`](crate::proxy::Proxy::bind) and before the loop
//! runs, and is checked afterwards so that a failure can never leave the
//! proxy serving as root.
//!
//! Nothing the loop opens later needs privileges: upstream connections
//! are outgoing, and a reload (SIGHUP) re-reads `--config` and the CA
//! files as the new user, so those must be readable by it (a reload that
//! cannot read them is refused and the running configuration kept).

use std::ffi::CString;
use std::io;

use log::info;

/// The user and group to become, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As given: `nobody`, `nobody:nogroup`, `65534:65534`.
    pub spec: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// What `--user` asks for in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No `--user`.
    Keep,
    /// Already that user and group (not root): nothing to switch, so the
    /// same configuration serves under systemd's `User=`, in a container
    /// started as that user, or by hand.
    Already(Target),
    /// Root now: switch after binding.
    Switch(Target),
}

/// Look up `spec` and decide; refuses a user that does not exist, `root`
/// (which would drop nothing), and a switch that needs root while not
/// running as root.
pub fn plan(spec: Option<&str>) -> Result<Plan, String> {
    let Some(spec) = spec else { return Ok(Plan::Keep) };
    let target = resolve(spec)?;
    if target.uid == 0 {
        return Err(format!("--user {spec}: that is root; name an unprivileged user"));
    }
    // SAFETY: getuid and friends cannot fail.
    let (uid, euid, gid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) };
    if euid == 0 {
        return Ok(Plan::Switch(target));
    }
    if uid == target.uid && euid == target.uid && gid == target.gid {
        return Ok(Plan::Already(target));
    }
    Err(format!(
        "--user {spec}: switching to uid {} gid {} needs root, and this runs as uid {euid} gid {gid}; \
         start it as root, or without --user (see README, \"Small hosts\")",
        target.uid, target.gid
    ))
}

/// Carry out the plan; `Err` means the process must not serve.
pub fn apply(plan: &Plan) -> Result<(), String> {
    match plan {
        Plan::Keep => Ok(()),
        Plan::Already(t) => {
            info!("--user {}: already uid {} gid {}", t.spec, t.uid, t.gid);
            Ok(())
        }
        Plan::Switch(t) => {
            switch(t).map_err(|e| format!("--user {}: {e}; refusing to run", t.spec))?;
            info!("running as uid {} gid {} (--user {})", t.uid, t.gid, t.spec);
            Ok(())
        }
    }
}

/// Supplementary groups first (they need root), then the group, then the
/// user (after which nothing else can be changed), then check that it all
/// took and cannot be undone.
fn switch(t: &Target) -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", io::Error::last_os_error());
    // SAFETY: a pointer to one live gid_t and its count.
    if unsafe { libc::setgroups(1, &t.gid) } != 0 {
        return Err(os("setgroups"));
    }
    // SAFETY: plain system calls on integer arguments.
    if unsafe { libc::setgid(t.gid) } != 0 {
        return Err(os("setgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(t.uid) } != 0 {
        return Err(os("setuid"));
    }
    verify(t)
}

fn verify(t: &Target) -> Result<(), String> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: pointers to live integers.
    if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 || [r, e, s] != [t.uid; 3] {
        return Err(format!("user IDs are {r}/{e}/{s} after setuid"));
    }
    // SAFETY: as above.
    if unsafe { libc::getresgid(&mut r, &mut e, &mut s) } != 0 || [r, e, s] != [t.gid; 3] {
        return Err(format!("group IDs are {r}/{e}/{s} after setgid"));
    }
    let mut groups = [0 as libc::gid_t; 64];
    // SAFETY: a buffer of the length passed.
    let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    let groups = usize::try_from(n).ok().and_then(|n| groups.get(..n));
    if !groups.is_some_and(|g| g.iter().all(|&g| g == t.gid)) {
        return Err(format!("supplementary groups are {groups:?} after setgroups"));
    }
    // SAFETY: a plain system call; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        return Err("setuid(0) still succeeds".into());
    }
    // Leaving root clears every capability unless the parent set
    // SECBIT_KEEP_CAPS or NO_SETUID_FIXUP; either would leave more than
    // was asked for.
    match capabilities() {
        Some(caps) if caps.iter().any(|(_, v)| *v != 0) => Err(format!("capabilities left after setuid: {caps:?}")),
        // No /proc (some containers): the ID checks above stand alone.
        _ => Ok(()),
    }
}

/// CapPrm, CapEff and CapAmb of this process, from /proc/self/status.
fn capabilities() -> Option<Vec<(String, u64)>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let caps: Vec<(String, u64)> = status
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "CapPrm" | "CapEff" | "CapAmb").then_some(())?;
            Some((k.to_string(), u64::from_str_radix(v.trim(), 16).ok()?))
        })
        .collect();
    (!caps.is_empty()).then_some(caps)
}

/// `NAME[:GROUP]`, names or numeric IDs; without GROUP, the user's own
/// primary group.
pub fn resolve(spec: &str) -> Result<Target, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let unknown = |what: &str, name: &str| format!("--user {spec}: no such {what} {name:?}");
    let fail = |e: io::Error| format!("--user {spec}: looking it up: {e}");
    let (uid, primary) = match lookup_user(user).map_err(fail)? {
        Some(found) => found,
        None => match user.parse::<libc::uid_t>() {
            // A numeric ID without an entry (a scratch container has no
            // /etc/passwd): fine, but then the group must be given.
            Ok(uid) if group.is_some() => (uid, 0),
            Ok(_) => return Err(format!("{}; a numeric user needs :GROUP", unknown("user", user))),
            Err(_) => return Err(unknown("user", user)),
        },
    };
    let gid = match group {
        None => primary,
        Some(g) => match lookup_group(g).map_err(fail)? {
            Some(gid) => gid,
            None => g.parse::<libc::gid_t>().map_err(|_| unknown("group", g))?,
        },
    };
    Ok(Target {
        spec: spec.to_string(),
        uid,
        gid,
    })
}

/// getpwnam_r and getgrnam_r report "none" as 0 with a null result, or
/// (glibc, with some NSS modules) as one of these.
fn not_found(rc: libc::c_int) -> bool {
    matches!(rc, 0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM)
}

/// Grow the buffer on ERANGE, up to a bound a real entry never needs.
const MAX_ENTRY: usize = 1 << 20;

fn lookup_user(name: &str) -> io::Result<Option<(libc::uid_t, libc::gid_t)>> {
    // SAFETY: passwd is plain data (all-zero is a valid value); the call
    // gets a NUL-terminated name, a live passwd, a buffer of the length
    // passed and a live result pointer.
    lookup(name, |n, pw: &mut libc::passwd, buf, found| unsafe {
        libc::getpwnam_r(n, pw, buf.as_mut_ptr(), buf.len(), found)
    })
    .map(|pw| pw.map(|pw| (pw.pw_uid, pw.pw_gid)))
}

fn lookup_group(name: &str) -> io::Result<Option<libc::gid_t>> {
    // SAFETY: as in lookup_user, for group and getgrnam_r.
    lookup(name, |n, gr: &mut libc::group, buf, found| unsafe {
        libc::getgrnam_r(n, gr, buf.as_mut_ptr(), buf.len(), found)
    })
    .map(|gr| gr.map(|gr| gr.gr_gid))
}

/// The `get*nam_r` protocol: a larger buffer on ERANGE, "no such entry"
/// told from an error. `E` is a C entry struct (passwd, group), for which
/// all-zero bytes are a valid value; only the IDs are read from it, never
/// the pointers into `buf`.
fn lookup<E>(
    name: &str,
    get: impl Fn(*const libc::c_char, &mut E, &mut [libc::c_char], &mut *mut E) -> libc::c_int,
) -> io::Result<Option<E>> {
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: E is one of the plain C entry structs (see above).
        let mut entry: E = unsafe { std::mem::zeroed() };
        let mut found: *mut E = std::ptr::null_mut();
        let rc = get(cname.as_ptr(), &mut entry, &mut buf, &mut found);
        if rc == libc::ERANGE && buf.len() < MAX_ENTRY {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if found.is_null() {
            return if not_found(rc) {
                Ok(None)
            } else {
                Err(io::Error::from_raw_os_error(rc))
            };
        }
        return Ok(Some(entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_groups_and_numbers() {
        let root = resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(resolve("root:root").unwrap().gid, 0);
        let t = resolve("1234:5678").unwrap();
        assert_eq!((t.uid, t.gid), (1234, 5678));
        let t = resolve("root:4321").unwrap();
        assert_eq!((t.uid, t.gid), (0, 4321));
        let e = resolve("no-such-user-dotproxy").unwrap_err();
        assert!(e.contains("no such user \"no-such-user-dotproxy\""), "{e}");
        let e = resolve("root:no-such-group-dotproxy").unwrap_err();
        assert!(e.contains("no such group"), "{e}");
        assert!(resolve("4242424").unwrap_err().contains(":GROUP"));
        assert!(plan(Some("root")).unwrap_err().contains("that is root"));
        assert_eq!(plan(None).unwrap(), Plan::Keep);
    }
}
