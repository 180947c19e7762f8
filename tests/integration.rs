//! Black-box integration tests for dotproxy: one test binary.
//!
//! `util` is the harness (certificates, scriptable DoT upstream, proxy
//! runner, DNS clients); `it` holds the tests, one module per area.

mod it;
mod util;
