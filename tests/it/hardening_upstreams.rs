//! Hardening, upstreams, answers and reloads.
