//! tqproxy: the public HTTP front end of a machine and the process manager of the workers
//! behind it, in one binary.
//!
//! # Words
//! - **worker**: a named program with its config (`workers/<name>/worker.yaml`).
//! - **instance**: one running process of a worker, on its own port (or unix socket, with
//!   `transport: unix`), in its own sandbox.
//! - **generation**: the instances started from one revision of a worker's config.
//! - **route table**: the immutable snapshot the proxy reads on every request.
//! - **drain**: unroute an instance, wait for its in-flight requests, then stop it.
//!
//! # Modules
//! - [`config`]: YAML → validated model; every error names file, line and key.
//! - [`routes`]: the route table and per-instance counters — where proxy and supervisor meet.
//! - [`proxy`]: the request path, tqproxy's HTTP/1.1 and HTTP/2 engines over one policy; knows
//!   routes, not processes.
//! - [`supervisor`]: the single owner of instance state: lifecycle, health, deploys.
//! - [`sandbox`]: the only `unsafe`: the spawn helper, cgroups, namespaces, seccomp, landlock.
//! - [`control`]: the JSON protocol over the unix control socket, server and client.
//! - [`status`]: the status document and the outcome of a change, with the [`status::ErrorKind`]
//!   of a failure: plain data shared by the supervisor, the control socket, the CLI and metrics.
//! - [`metrics`]: every Prometheus metric; [`admin`]: /metrics, /status, /healthz.
//! - [`acme`]: automatic HTTPS: certificates obtained and renewed over ACME.
//! - [`access_log`], [`timefmt`]: request logging.
//! - [`drain`]: the node's drained state (`tqproxy drain`); [`agent`]: HAProxy's agent-check.
//! - [`server`]: composition root of `tqproxy run`; [`signals`]: what each signal does;
//!   [`cli`]: the verbs.

// `unsafe` lives in `sandbox` only, where every block carries its `// SAFETY:` line.
#![deny(unsafe_code)]

pub mod access_log;
pub mod acme;
pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod drain;
pub mod metrics;
pub mod proxy;
pub mod routes;
#[allow(unsafe_code)]
pub mod sandbox;
pub mod server;
pub mod signals;
pub mod status;
pub mod supervisor;
pub mod timefmt;
pub mod tls;
