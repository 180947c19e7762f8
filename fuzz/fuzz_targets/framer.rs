#![no_main]
//! Thin wrapper: the invariants are in ../checks.rs (`checks::framer`), shared
//! with the stable corpus replay in tests/fuzz_corpus.rs.

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::framer(data));
