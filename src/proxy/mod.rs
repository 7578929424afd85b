//! The request path. Knows routes and instances, nothing about processes.
//!
//! - [`policy`]: what every request gets, decided once for both protocols: routing,
//!   balancing, queueing, retries, error pages, redirects, request ids, metrics, access log.
//! - [`h1`]: tqproxy's HTTP/1.1 engine, a pingora `ServerApp` (one task per connection, the
//!   upstream I/O inline, a per-thread upstream pool); it hands HTTP/2 connections to `h2`.
//! - [`h2`]: tqproxy's HTTP/2 engine on the `h2` crate: each stream through the same policy
//!   and upstream pool, hardened against the known HTTP/2 attacks.

pub mod h1;
pub mod h2;
pub mod policy;

pub use policy::CLOSE_CONNECTIONS;
