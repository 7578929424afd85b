//! Integration tests: one binary (links once), driving the real `tqproxy` binary against real
//! worker processes, sockets and cgroups.

mod acme;
mod canary;
mod cli;
mod config;
mod conformance;
mod core;
mod edge;
mod fleet;
mod frameworks;
mod h2;
mod harness;
mod isolation;
mod notify;
mod observability;
mod operator;
mod package;
mod sessions;
mod swaps;
mod transport;
