//! HTTP/2 from clients (ALPN `h2` on TLS listeners, h2c with `proxy.h2c`): still pingora's
//! `ProxyHttp` state machine, each stream proxied to a worker over HTTP/1.1 by pingora's
//! connector, with every decision taken by [`super::policy`] as the HTTP/1.1 engine does. The HTTP/1.1 engine hands these connections here after ALPN or the h2c preface.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use super::policy::{self, ErrorPage, Failure, Policy};
use crate::access_log::{Record, version_str};
use crate::metrics::{METRICS, UpstreamErrorKind};
use crate::routes::{Backend, Instance};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The HTTP/2 proxy. Cheap to share: everything lives behind `Arc`s.
pub struct H2Proxy {
    policy: Arc<Policy>,
}

impl H2Proxy {
    pub fn new(policy: Arc<Policy>) -> H2Proxy {
        H2Proxy { policy }
    }

    /// The https port when the request came in on a redirect-only listener.
    fn redirect_port(&self, session: &Session) -> Option<u16> {
        if !self.policy.has_redirects() {
            return None;
        }
        let local = session.server_addr()?.as_inet()?.port();
        self.policy.redirect_port(local)
    }
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

fn new_request_id() -> HeaderValue {
    HeaderValue::from_bytes(&policy::new_request_id()).expect("hex is a valid header value")
}

/// The X-Forwarded-For value: the client's address appended to what earlier proxies sent,
/// formatted on the stack.
fn forwarded_for(prev: &[u8], ip: std::net::IpAddr) -> HeaderValue {
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

/// Sends one of tqproxy's own answers.
async fn respond(
    session: &mut Session,
    page: &ErrorPage,
    request_id: Option<&HeaderValue>,
) -> pingora::Result<()> {
    let body = Bytes::from(page.body());
    let mut resp = ResponseHeader::build(page.status, Some(4))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    if let Some(s) = page.retry_after {
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

#[async_trait]
impl ProxyHttp for H2Proxy {
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
        if let Some(port) = self.redirect_port(session)
            && !policy::is_acme_challenge(req.uri.path())
        {
            let get_or_head = matches!(req.method, http::Method::GET | http::Method::HEAD);
            let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let Some((status, location)) =
                policy::redirect(get_or_head, request_host(req), pq, port)
            else {
                let page = ErrorPage::rejected(400, "no usable Host header to redirect to");
                respond(session, &page, None).await?;
                return Ok(true);
            };
            let mut resp = ResponseHeader::build(status, Some(3))?;
            resp.insert_header("location", location)?;
            resp.insert_header("content-length", "0")?;
            resp.insert_header("cache-control", "max-age=3600")?;
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let table = self.policy.routes.load();
        let Some(route) = table.lookup(request_host(req), req.uri.path()) else {
            drop(table);
            METRICS.no_route.inc();
            let id = new_request_id();
            respond(session, &ErrorPage::no_route(), Some(&id)).await?;
            return Ok(true);
        };
        if route.strip_prefix {
            let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            ctx.upstream_target = route.upstream_target(pq);
        }
        ctx.backend = Some(route.backend.clone());
        drop(table);
        // A valid id from the client travels on with its request; a new one is added to the
        // upstream request in `upstream_request_filter`.
        ctx.request_id = Some(match session.req_header().headers.get(&X_REQUEST_ID) {
            Some(v) if super::h1::parse::valid_request_id(v.as_bytes()) => v.clone(),
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
            None => {
                let req = session.req_header();
                match self
                    .policy
                    .wait_for_instance(request_host(req), req.uri.path(), &ctx.tried)
                    .await
                {
                    Ok((route, inst)) => {
                        ctx.backend = Some(route.backend);
                        inst
                    }
                    Err(policy::Unavailable::RouteGone) => {
                        return Err(Error::explain(ROUTE_GONE, "route removed while waiting"));
                    }
                    Err(policy::Unavailable::NoInstance(_)) => {
                        return Err(Error::explain(
                            NO_INSTANCE,
                            "no ready instance within queue_timeout",
                        ));
                    }
                }
            }
        };
        let settings = &ctx
            .backend
            .as_ref()
            .expect("backend set before upstream_peer")
            .settings;
        let mut peer = match &inst.unix_path {
            Some(path) => HttpPeer::new_uds(&path.to_string_lossy(), false, String::new())?,
            None => HttpPeer::new(inst.addr, false, String::new()),
        };
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
            .map(|a| policy::client_ip(a.ip()))
        {
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
        if policy::closing() {
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
        if ctx.tried.len() < self.policy.max_attempts {
            if let Some(b) = &ctx.backend {
                b.shared.metrics.retries.inc();
            }
            e.set_retry(true);
        }
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
        let replayable = !session.as_ref().retry_buffer_truncated() && !ctx.response_started;
        // The instance died (or closed a pooled connection) before any response header.
        let failure = match kind {
            UpstreamErrorKind::Closed | UpstreamErrorKind::Reset => Failure::DiedBeforeResponse,
            UpstreamErrorKind::Timeout => Failure::Timeout,
            _ => Failure::BadResponse,
        };
        let retry = policy::retryable(failure, idempotent, replayable)
            || (client_reused && policy::retryable(Failure::Refused, idempotent, replayable));
        e.set_retry(retry);
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
        let page = match e.etype() {
            ErrorType::CustomCode(_, 503) => Some(ErrorPage::no_instance(w)),
            ErrorType::HTTPStatus(code) => Some(ErrorPage::rejected(*code, "request rejected")),
            _ => match e.esource() {
                ErrorSource::Upstream => Some(match classify(e) {
                    UpstreamErrorKind::Timeout => Failure::Timeout.page(w),
                    _ => Failure::BadResponse.page(w),
                }),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        None
                    }
                    _ => Some(ErrorPage::rejected(400, "malformed request")),
                },
                ErrorSource::Internal | ErrorSource::Unset => {
                    Some(ErrorPage::new(500, "Internal Server Error".into(), None))
                }
            },
        };
        let code = page.as_ref().map_or(0, |p| p.status);
        if let Some(page) = page
            && !ctx.response_started
            && let Err(err) = respond(session, &page, ctx.request_id.as_ref()).await
        {
            tracing::debug!(error = %err, "could not send error response");
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
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let elapsed = ctx.started.elapsed();
        let rec = Record {
            client: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| policy::client_ip(a.ip())),
            method: req.method.as_str(),
            target: req.uri.path_and_query().map_or("/", |p| p.as_str()),
            version: version_str(req.version),
            host: request_host(req),
            status,
            bytes: session.body_bytes_sent() as u64,
            elapsed,
            worker: ctx.backend.as_ref().map(|b| &*b.worker),
            served_by: ctx.served_by,
            referer: header("referer"),
            user_agent: header("user-agent"),
            request_id: ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
        };
        self.policy
            .record(ctx.backend.as_deref(), None, status, elapsed, || rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_appends_the_client() {
        let v4: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let v6: std::net::IpAddr = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(forwarded_for(b"", v4), "192.0.2.1");
        assert_eq!(forwarded_for(b"10.0.0.1", v4), "10.0.0.1, 192.0.2.1");
        assert_eq!(
            forwarded_for(b"", v6),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
        );
    }
}
