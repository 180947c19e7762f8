//! Test modules. `harness` needs no proxy (self-tests of `util`); every
//! other module runs the real binary.

mod basic;
mod cache;
mod cli;
mod dot_listener;
mod failures;
mod fault_client;
mod fault_edns;
mod fault_ids;
mod fault_metrics;
mod fault_resources;
mod fault_tcp;
mod fault_tls;
mod fault_upstream;
mod features;
mod hardening_clients;
mod hardening_upstreams;
mod harness;
mod malformed;
mod pipelining;
mod plain;
mod privileges;
mod reload;
mod systemd;
