//! Integration tests: one binary (links once), driving the real `tqproxy` binary against real
//! worker processes, sockets and cgroups.

mod config;
mod core;
mod harness;
mod swaps;
