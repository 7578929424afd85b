//! The request path: `impl ProxyHttp`. Knows routes and instances, nothing about processes.
//!
//! Per request: one atomic load of the route table, a host + longest-prefix match, a
//! least-outstanding pick among routed instances (which reserves an in-flight slot), forwarding
//! headers, and in `logging()` the release of the slot plus a few pre-resolved metric updates.
//! The slow paths (no ready instance, retries) are kept out of the fast one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use crate::access_log::AccessLog;
use crate::metrics::{METRICS, UpstreamErrorKind};
use crate::routes::{Backend, Instance, RouteHandle};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Set when this process hands its listening sockets to a new tqproxy (`tqproxy upgrade`):
/// from then on every response asks the client to reconnect (`Connection: close`), so keep-alive
/// clients move to the new process instead of finding their connection closed under them.
pub static CLOSE_CONNECTIONS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The proxy. Cheap to share: everything lives behind `Arc`s.
pub struct Proxy {
    routes: Arc<RouteHandle>,
    access_log: Option<AccessLog>,
    /// Listener port → https port, for listeners that only redirect to https.
    redirects: HashMap<u16, u16>,
}

impl Proxy {
    pub fn new(
        routes: Arc<RouteHandle>,
        access_log: Option<AccessLog>,
        redirects: HashMap<u16, u16>,
    ) -> Proxy {
        Proxy {
            routes,
            access_log,
            redirects,
        }
    }

    /// The https port when the request came in on a redirect-only listener.
    fn redirect_port(&self, session: &Session) -> Option<u16> {
        if self.redirects.is_empty() {
            return None;
        }
        let local = session.server_addr()?.as_inet()?.port();
        self.redirects.get(&local).copied()
    }
}

/// `https://host[:port]/path?query` for a request on a redirect-only listener.
fn https_location(req: &RequestHeader, port: u16) -> Option<String> {
    let host = request_host(req)?;
    let bare = match host.rfind(':') {
        Some(i) if !host.ends_with(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            &host[..i]
        }
        _ => host,
    };
    if bare.is_empty()
        || bare
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'@')
    {
        return None;
    }
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    Some(if port == 443 {
        format!("https://{bare}{pq}")
    } else {
        format!("https://{bare}:{port}{pq}")
    })
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    backend: Option<Arc<Backend>>,
    /// Rewritten request target when the route strips its prefix.
    upstream_target: Option<String>,
    /// The instance holding this request's in-flight slot.
    instance: Option<Arc<Instance>>,
    /// Instances that already failed this request.
    tried: Vec<u64>,
    request_id: Option<HeaderValue>,
    /// The id was made here (the client sent none): it goes into the upstream request.
    request_id_generated: bool,
    response_started: bool,
    /// Which instance answered (kept after the slot is released, for the access log).
    served_by: Option<(u64, u16)>,
}

impl RequestCtx {
    fn release_instance(&mut self, completed: bool) {
        if let Some(inst) = self.instance.take() {
            inst.release(completed);
        }
    }

    fn fail_instance(&mut self, kind: UpstreamErrorKind) {
        if let Some(inst) = self.instance.take() {
            inst.release(false);
            self.tried.push(inst.id);
        }
        if let Some(b) = &self.backend {
            b.shared.metrics.upstream_error(kind);
        }
    }
}

fn request_host(req: &RequestHeader) -> Option<&str> {
    match req.headers.get(HOST).and_then(|h| h.to_str().ok()) {
        Some(h) => Some(h),
        None => req.uri.host(),
    }
}

/// A request id: 16 hex digits, unique per process (a per-process random prefix plus a
/// counter, mixed), generated without locks.
fn new_request_id() -> HeaderValue {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: LazyLock<u64> = LazyLock::new(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ ((std::process::id() as u64) << 32)
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // splitmix64 of seed + n: distinct for distinct n, looks random.
    let mut z = SEED.wrapping_add(n.wrapping_mul(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((z >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// The X-Forwarded-For value: the client's address appended to what earlier proxies sent,
/// formatted on the stack (this runs for every request).
fn forwarded_for(prev: &[u8], ip: IpAddr) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    // An IPv6 address is at most 45 bytes: the write cannot run out of room.
    let _ = write!(cur, "{ip}");
    let n = cur.position() as usize;
    let value = if prev.is_empty() {
        HeaderValue::from_bytes(&buf[..n])
    } else {
        HeaderValue::from_bytes(&[prev, b", ", &buf[..n]].concat())
    };
    value.unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn valid_client_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// tqproxy's own error responses: short, plain text, naming tqproxy so nobody blames the app.
async fn respond(
    session: &mut Session,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
    request_id: Option<&HeaderValue>,
) -> pingora::Result<()> {
    let body = Bytes::from(format!("{status} {message} (tqproxy)\n"));
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    if let Some(s) = retry_after {
        resp.insert_header("retry-after", s.to_string())?;
    }
    if let Some(id) = request_id {
        resp.insert_header(X_REQUEST_ID.clone(), id.clone())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

fn classify(e: &Error) -> UpstreamErrorKind {
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::SocketError
        | ErrorType::BindError => UpstreamErrorKind::Connect,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamErrorKind::Timeout,
        ErrorType::ConnectionClosed => UpstreamErrorKind::Closed,
        ErrorType::ReadError | ErrorType::WriteError => UpstreamErrorKind::Reset,
        _ => UpstreamErrorKind::Other,
    }
}

const NO_INSTANCE: ErrorType = ErrorType::CustomCode("no ready instance", 503);
const ROUTE_GONE: ErrorType = ErrorType::CustomCode("route removed", 503);

impl Proxy {
    /// Slow path of [`ProxyHttp::upstream_peer`]: wait (up to the worker's `queue_timeout`) for
    /// a routed instance that has not failed this request yet.
    async fn wait_for_instance(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Arc<Instance>> {
        let queue_timeout = ctx
            .backend
            .as_ref()
            .map_or(Duration::from_secs(5), |b| b.settings.queue_timeout);
        let waited_from = Instant::now();
        let deadline = tokio::time::Instant::now() + queue_timeout;
        loop {
            let changed = self.routes.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Re-resolve against the current table: the worker's routed instances (or even
            // its route) may have changed since the request arrived.
            let table = self.routes.load();
            let req = session.req_header();
            let Some(route) = table.lookup(request_host(req), req.uri.path()) else {
                return Err(Error::explain(ROUTE_GONE, "route removed while waiting"));
            };
            let backend = route.backend.clone();
            drop(table);
            if let Some(inst) = backend.pick(&ctx.tried) {
                if !ctx.tried.is_empty() || waited_from.elapsed() > Duration::from_millis(1) {
                    backend
                        .shared
                        .metrics
                        .queue_wait
                        .observe(waited_from.elapsed().as_secs_f64());
                }
                ctx.backend = Some(backend);
                return Ok(inst);
            }
            // Every routed instance already failed this request: forget them once the table
            // changes (a replacement may reuse nothing, but a recovered sibling is fine).
            ctx.backend = Some(backend);
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some(b) = &ctx.backend {
                        b.shared.metrics.queue_wait.observe(waited_from.elapsed().as_secs_f64());
                    }
                    return Err(Error::explain(NO_INSTANCE, "no ready instance within queue_timeout"));
                }
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            backend: None,
            upstream_target: None,
            instance: None,
            tried: Vec::new(),
            request_id: None,
            request_id_generated: false,
            response_started: false,
            served_by: None,
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let req = session.req_header();
        if let Some(port) = self.redirect_port(session) {
            // ACME http-01 challenges stay on plain HTTP (a worker may serve them).
            if !req.uri.path().starts_with("/.well-known/acme-challenge/") {
                let Some(location) = https_location(req, port) else {
                    respond(
                        session,
                        400,
                        "Bad Request: no usable Host header to redirect to",
                        None,
                        None,
                    )
                    .await?;
                    return Ok(true);
                };
                let status = if matches!(req.method, http::Method::GET | http::Method::HEAD) {
                    301
                } else {
                    308
                };
                let mut resp = ResponseHeader::build(status, Some(3))?;
                resp.insert_header("location", location)?;
                resp.insert_header("content-length", "0")?;
                resp.insert_header("cache-control", "max-age=3600")?;
                session.write_response_header(Box::new(resp), true).await?;
                return Ok(true);
            }
        }
        let req = session.req_header();
        let table = self.routes.load();
        let Some(route) = table.lookup(request_host(req), req.uri.path()) else {
            drop(table);
            METRICS.no_route.inc();
            let id = new_request_id();
            respond(
                session,
                404,
                "Not Found: no route for this host and path",
                None,
                Some(&id),
            )
            .await?;
            return Ok(true);
        };
        if route.strip_prefix {
            let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            ctx.upstream_target = route.upstream_target(pq);
        }
        ctx.backend = Some(route.backend.clone());
        drop(table);

        // A valid id from the client travels on with its request; a new one is added to the
        // upstream request in `upstream_request_filter` (not here: growing the downstream
        // header map would only make pingora's clone of it for the upstream dearer).
        ctx.request_id = Some(match session.req_header().headers.get(&X_REQUEST_ID) {
            Some(v) if valid_client_request_id(v) => v.clone(),
            _ => {
                ctx.request_id_generated = true;
                new_request_id()
            }
        });
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        ctx.release_instance(false);
        let fast = if ctx.tried.is_empty() {
            ctx.backend.as_ref().and_then(|b| b.pick(&[]))
        } else {
            None
        };
        let inst = match fast {
            Some(i) => i,
            None => self.wait_for_instance(session, ctx).await?,
        };
        let settings = &ctx
            .backend
            .as_ref()
            .expect("backend set before upstream_peer")
            .settings;
        let mut peer = HttpPeer::new(inst.addr, false, String::new());
        peer.options.connection_timeout = Some(settings.connect_timeout);
        peer.options.total_connection_timeout = Some(settings.connect_timeout);
        peer.options.read_timeout = Some(settings.read_timeout);
        peer.options.write_timeout = Some(settings.read_timeout);
        peer.options.idle_timeout = Some(settings.idle_timeout);
        ctx.served_by = Some((inst.id, inst.addr.port()));
        ctx.instance = Some(inst);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(target) = &ctx.upstream_target {
            match target.parse::<http::Uri>() {
                Ok(uri) => upstream_request.set_uri(uri),
                Err(_) => {
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(400),
                        "bad request target",
                    ));
                }
            }
        }
        if ctx.request_id_generated
            && let Some(id) = &ctx.request_id
        {
            // An invalid id from the client is replaced, not kept next to ours.
            upstream_request.insert_header("X-Request-Id", id.clone())?;
        }
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            let value = match upstream_request.headers.get(&X_FORWARDED_FOR) {
                Some(prev) => forwarded_for(prev.as_bytes(), ip),
                None => forwarded_for(b"", ip),
            };
            upstream_request.insert_header("X-Forwarded-For", value)?;
        }
        let tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        upstream_request.insert_header(
            "X-Forwarded-Proto",
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        )?;
        if let Some(host) = upstream_request.headers.get(HOST).cloned() {
            upstream_request.insert_header("X-Forwarded-Host", host)?;
        } else if let Some(host) = session.req_header().uri.host().map(|h| h.to_string()) {
            // HTTP/2 carries the host in :authority; workers speak HTTP/1.1 and need Host.
            upstream_request.insert_header(HOST, host.as_str())?;
            upstream_request.insert_header("X-Forwarded-Host", host)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.response_started = true;
        if CLOSE_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        if let Some(id) = &ctx.request_id {
            upstream_response.insert_header("X-Request-Id", id.clone())?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent: trying a sibling is safe for every method.
        ctx.fail_instance(classify(&e));
        if let Some(b) = &ctx.backend {
            b.shared.metrics.retries.inc();
        }
        e.set_retry(true);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        if *e.esource() != ErrorSource::Upstream {
            // The client went away (or sent garbage): nothing to retry, the instance is fine.
            ctx.release_instance(false);
            let mut e = e;
            e.set_retry(false);
            return e;
        }
        let kind = classify(&e);
        ctx.fail_instance(kind);
        let mut e = e.more_context(format!("peer: {peer}"));
        let idempotent = session.req_header().method.is_idempotent();
        let body_kept = !session.as_ref().retry_buffer_truncated();
        // The instance died (or closed a pooled connection) before any response header: an
        // idempotent request is retried on a sibling. Timeouts are not retried (the request
        // may be running), nor is anything once the response started.
        let connection_lost = matches!(kind, UpstreamErrorKind::Closed | UpstreamErrorKind::Reset);
        if ctx.response_started || !body_kept {
            e.set_retry(false);
        } else if idempotent && connection_lost {
            e.set_retry(true);
        } else if idempotent {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        if e.retry()
            && let Some(b) = &ctx.backend
        {
            b.shared.metrics.retries.inc();
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let worker = ctx.backend.as_ref().map(|b| b.worker.clone());
        let w = worker.as_deref().unwrap_or("?");
        let (code, message, retry_after) = match e.etype() {
            ErrorType::CustomCode(_, 503) => (
                503,
                format!("Service Unavailable: no ready instance of worker `{w}`"),
                Some(1),
            ),
            ErrorType::HTTPStatus(code) => (*code, String::from("request rejected"), None),
            _ => match e.esource() {
                ErrorSource::Upstream => match classify(e) {
                    UpstreamErrorKind::Timeout => (
                        504,
                        format!("Gateway Timeout: worker `{w}` did not answer in time"),
                        None,
                    ),
                    _ => (
                        502,
                        format!("Bad Gateway: worker `{w}` failed to answer"),
                        None,
                    ),
                },
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        (0, String::new(), None)
                    }
                    _ => (400, String::from("Bad Request"), None),
                },
                ErrorSource::Internal | ErrorSource::Unset => {
                    (500, String::from("Internal Server Error"), None)
                }
            },
        };
        if code > 0 && !ctx.response_started {
            let message = if matches!(e.etype(), ErrorType::HTTPStatus(_)) {
                http::StatusCode::from_u16(code)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("Error")
                    .to_string()
            } else {
                message
            };
            if let Err(err) = respond(
                session,
                code,
                &message,
                retry_after,
                ctx.request_id.as_ref(),
            )
            .await
            {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // The client went away or no instance was ready: counted in metrics, not an error log.
        matches!(error.etype(), ErrorType::CustomCode(_, 503))
            || *error.esource() == ErrorSource::Downstream
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.release_instance(e.is_none());
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        if let Some(b) = &ctx.backend
            && status > 0
        {
            b.shared.metrics.record(status, elapsed.as_secs_f64());
        }
        if let Some(log) = &self.access_log {
            log.log(
                session,
                status,
                elapsed,
                ctx.backend.as_ref().map(|b| &*b.worker),
                ctx.served_by,
                ctx.request_id.as_ref(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_hex() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_request_id();
            assert_eq!(id.len(), 16);
            assert!(id.as_bytes().iter().all(|b| b.is_ascii_hexdigit()));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(forwarded_for(b"", v4), "192.0.2.1");
        assert_eq!(forwarded_for(b"10.0.0.1", v4), "10.0.0.1, 192.0.2.1");
        assert_eq!(
            forwarded_for(b"", v6),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn client_request_ids_are_checked() {
        assert!(valid_client_request_id(&HeaderValue::from_static(
            "abc-123"
        )));
        assert!(!valid_client_request_id(&HeaderValue::from_static("")));
        assert!(!valid_client_request_id(&HeaderValue::from_static("a b")));
        let long = "x".repeat(200);
        assert!(!valid_client_request_id(
            &HeaderValue::from_str(&long).unwrap()
        ));
    }
}
