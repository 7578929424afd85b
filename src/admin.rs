//! The admin listener (loopback only, separate from the public listeners):
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /status`: a self-contained HTML page that refreshes itself from `/status.json`;
//! - `GET /status.json`: the same document as `tqproxy status --json`;
//! - `GET /healthz`: 200 when every worker has a ready routed instance, else 503 + the reason.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::METRICS;
use crate::supervisor::SupervisorHandle;
use crate::supervisor::status::StatusReport;

const STATUS_PAGE: &str = include_str!("admin/status.html");

pub struct Admin {
    supervisor: SupervisorHandle,
}

impl Admin {
    pub fn new(supervisor: SupervisorHandle) -> Admin {
        Admin { supervisor }
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

/// `Ok` when every worker has at least one ready, routed instance; else why not.
pub fn health(st: &StatusReport) -> Result<(), String> {
    if st.state == "stopping" {
        return Err("tqproxy is stopping".into());
    }
    let down: Vec<String> = st
        .workers
        .iter()
        .filter(|w| !w.instances.iter().any(|i| i.state == "ready" && i.routed))
        .map(|w| {
            let why = w
                .instances
                .iter()
                .find_map(|i| i.last_exit.clone())
                .unwrap_or_else(|| "no instance".into());
            format!("{} ({why})", w.name)
        })
        .collect();
    if down.is_empty() {
        Ok(())
    } else {
        Err(format!("no ready instance: {}", down.join(", ")))
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"GET only\n".to_vec(),
            );
        }
        let path = req.uri.path().to_string();
        match path.as_str() {
            "/" | "/status" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                STATUS_PAGE.as_bytes().to_vec(),
            ),
            "/status.json" => match self.supervisor.status().await {
                Some(st) => reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&st).unwrap_or_default(),
                ),
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    b"stopping\n".to_vec(),
                ),
            },
            "/metrics" => {
                // Per-worker gauges are refreshed from live counters at scrape time.
                if let Some(st) = self.supervisor.status().await {
                    for w in &st.workers {
                        METRICS
                            .in_flight
                            .with_label_values(&[&w.name])
                            .set(w.in_flight as i64);
                        for state in [
                            "starting",
                            "ready",
                            "draining",
                            "stopping",
                            "exited",
                            "crashloop",
                        ] {
                            let n = w.instances.iter().filter(|i| i.state == state).count();
                            METRICS
                                .instances
                                .with_label_values(&[&w.name, state])
                                .set(n as i64);
                        }
                    }
                }
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    METRICS.render().into_bytes(),
                )
            }
            "/healthz" => match self.supervisor.status().await {
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    b"tqproxy is stopping\n".to_vec(),
                ),
                Some(st) => match health(&st) {
                    Ok(()) => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
                    Err(why) => reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("{why}\n").into_bytes(),
                    ),
                },
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found (try /status, /metrics, /healthz)\n".to_vec(),
            ),
        }
    }
}
