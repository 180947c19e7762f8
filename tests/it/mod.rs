//! Test modules. `harness` needs no proxy (self-tests of `util`); every
//! other module runs the real binary.

mod basic;
mod cli;
mod failures;
mod features;
mod harness;
mod malformed;
mod pipelining;
mod truncation;
