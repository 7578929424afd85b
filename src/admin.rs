//! The admin listener (loopback only, separate from the public listeners):
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /status`: a self-contained HTML page that refreshes itself from `/status.json`;
//! - `GET /status.json`: the same document as `tqproxy status --json`;
//! - `GET /healthz`: 200 when every worker that should run has a ready routed instance, else
//!   503 and one line naming the workers that have none and why (for external load balancers);
//!   still 200, with `warning:` lines, when an ACME certificate's renewal fails within 7 days
//!   of its expiry.
//!   503 `draining` while the node is drained (`tqproxy drain`).
//!
//! `control.health` serves `/healthz` alone on an address other machines can reach.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::METRICS;
use crate::status::StatusReport;
use crate::supervisor::SupervisorHandle;

const STATUS_PAGE: &str = include_str!("admin/status.html");

pub struct Admin {
    supervisor: SupervisorHandle,
    /// `control.health`: only `/healthz` (any address may reach it).
    health_only: bool,
}

impl Admin {
    pub fn new(supervisor: SupervisorHandle) -> Admin {
        Admin {
            supervisor,
            health_only: false,
        }
    }

    /// The `control.health` listener: `GET /healthz` and nothing else.
    pub fn health_only(supervisor: SupervisorHandle) -> Admin {
        Admin {
            supervisor,
            health_only: true,
        }
    }
}

/// The page is self-contained: inline script and style, nothing loaded from elsewhere.
const STATUS_PAGE_CSP: &str = "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn text(status: StatusCode, body: String) -> Response<Vec<u8>> {
    reply(status, "text/plain; charset=utf-8", body.into_bytes())
}

/// `Ok` when every worker expected up has at least one ready, routed instance; else why not,
/// on one line (see [`StatusReport::health`]).
pub fn health(st: &StatusReport) -> Result<(), String> {
    st.health()
}

impl Admin {
    async fn route(&self, path: &str) -> Response<Vec<u8>> {
        if self.health_only && path != "/healthz" {
            return text(StatusCode::NOT_FOUND, "not found (try /healthz)\n".into());
        }
        match path {
            "/" | "/status" => {
                let mut r = reply(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    STATUS_PAGE.as_bytes().to_vec(),
                );
                if let Ok(v) = http::HeaderValue::from_str(STATUS_PAGE_CSP) {
                    r.headers_mut().insert("content-security-policy", v);
                }
                r
            }
            "/status.json" => match self.supervisor.status().await {
                Some(st) => reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&st).unwrap_or_default(),
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tqproxy is stopping\n".into(),
                ),
            },
            "/metrics" => {
                // Per-worker gauges are refreshed from live counters at scrape time.
                if let Some(st) = self.supervisor.status().await {
                    METRICS.refresh_from(&st);
                }
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    METRICS.render().into_bytes(),
                )
            }
            "/healthz" => match self.supervisor.status().await {
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tqproxy is stopping\n".into(),
                ),
                Some(st) => match health(&st) {
                    // A certificate close to expiry whose renewal fails: a warning, still 200.
                    Ok(()) => text(
                        StatusCode::OK,
                        st.warnings()
                            .iter()
                            .fold("ok\n".to_string(), |s, w| s + "warning: " + w + "\n"),
                    ),
                    Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                },
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found (try /status, /status.json, /metrics, /healthz)\n".into(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        if req.method != http::Method::GET && !head {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n".into());
            r.headers_mut()
                .insert("allow", http::HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let path = req.uri.path().to_string();
        let mut r = self.route(&path).await;
        if head {
            // Same headers (content-length included), no body.
            r.body_mut().clear();
        }
        r
    }
}
