//! Why dotproxy answers a query itself instead of forwarding an answer,
//! and what it answers then: one place maps every failure to an RCODE and
//! an Extended DNS Error (RFC 8914).

use crate::wire::{Ede, EdeCode, Rcode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No upstream of the query's zone can take it: all in back-off, or
    /// the connection could not be opened.
    Unreachable,
    /// The deadline passed without an answer.
    Timeout,
    /// The connection it was on closed, and it was already re-sent once.
    ConnLost,
    /// The upstream's answer cannot be used (malformed, or not
    /// representable to this client).
    Invalid,
    /// Over an in-flight limit.
    Busy,
    ShuttingDown,
}

impl Failure {
    pub fn answer(self) -> (Rcode, Ede) {
        match self {
            Failure::Unreachable => (Rcode::ServFail, Ede::new(EdeCode::NetworkError, "upstream unreachable")),
            Failure::Timeout => (
                Rcode::ServFail,
                Ede::new(EdeCode::NoReachableAuthority, "upstream timeout"),
            ),
            Failure::ConnLost => (
                Rcode::ServFail,
                Ede::new(EdeCode::NetworkError, "upstream connection lost"),
            ),
            Failure::Invalid => (Rcode::ServFail, Ede::new(EdeCode::Other, "invalid upstream response")),
            // Overload: a small, immediate answer keeps clients from
            // retrying into the queue.
            Failure::Busy => (Rcode::Refused, Ede::new(EdeCode::Other, "busy")),
            Failure::ShuttingDown => (Rcode::ServFail, Ede::new(EdeCode::Other, "shutting down")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_busy_is_refused() {
        for f in [
            Failure::Unreachable,
            Failure::Timeout,
            Failure::ConnLost,
            Failure::Invalid,
            Failure::ShuttingDown,
        ] {
            assert_eq!(f.answer().0, Rcode::ServFail, "{f:?}");
        }
        assert_eq!(Failure::Busy.answer().0, Rcode::Refused);
        assert_eq!(Failure::Timeout.answer().1.code, EdeCode::NoReachableAuthority);
    }
}
