//! Warnings about limits being hit, each kind at most once per
//! [`NOTICE_EVERY`]: a flood must not turn into a flood of log lines.

use std::time::{Duration, Instant};

pub const NOTICE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    AccessList,
    Busy,
    TcpClients,
    UdpBacklog,
    SlowReader,
    Accept,
    TlsHandshake,
}

const KINDS: usize = 7;

#[derive(Debug, Default)]
pub struct Notices {
    last: [Option<Instant>; KINDS],
}

impl Notices {
    /// Log `what` at warn unless this kind was logged less than
    /// [`NOTICE_EVERY`] ago.
    pub fn warn(&mut self, kind: Notice, now: Instant, what: std::fmt::Arguments<'_>) {
        if self.due(kind, now) {
            log::warn!("{what} (logged at most every {} s)", NOTICE_EVERY.as_secs());
        }
    }

    fn due(&mut self, kind: Notice, now: Instant) -> bool {
        let Some(last) = self.last.get_mut(kind as usize) else {
            return true;
        };
        if last.is_none_or(|t| now.saturating_duration_since(t) >= NOTICE_EVERY) {
            *last = Some(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_kind_per_period() {
        let t0 = Instant::now();
        let mut n = Notices::default();
        assert!(n.due(Notice::Busy, t0));
        assert!(!n.due(Notice::Busy, t0 + Duration::from_secs(9)));
        assert!(n.due(Notice::AccessList, t0 + Duration::from_secs(9)));
        assert!(n.due(Notice::Busy, t0 + NOTICE_EVERY));
        assert!(n.due(Notice::Accept, t0));
    }
}
