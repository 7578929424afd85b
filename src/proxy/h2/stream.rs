//! One HTTP/2 stream, from its request head to its last DATA frame: checked, routed and
//! balanced by the [`policy`], forwarded to a worker over HTTP/1.1 on a connection of the same
//! per-thread pool as the HTTP/1.1 engine's, the response relayed under HTTP/2 flow control.
//!
//! - The request body: whatever of it arrived with the head (up to [`HOLD`] bytes) is kept, so
//!   that a request whose whole body is held can be sent again (retries); the rest streams
//!   upstream DATA frame by DATA frame, each acknowledged to the client's flow control once the
//!   worker took it. With `content-length` it goes as it is (h2 checks the DATA frames against
//!   it: a mismatch resets the stream with PROTOCOL_ERROR, and the upstream connection, which
//!   saw a short or long body, is closed); without, chunked, the client's trailers as the
//!   chunked trailer section. `expect: 100-continue` is answered by tqproxy.
//! - The response: the head parsed by the HTTP/1.1 engine's parser, its body (any HTTP/1.1
//!   framing) sent as DATA frames as it arrives, never more than the client's window and h2's
//!   send buffer allow; chunked trailers become HTTP/2 trailers; a body the worker broke off
//!   resets the stream (INTERNAL_ERROR) so that the client does not take it as complete.
//! - `resources.bandwidth`: request and response body bytes take from the worker's ingress and
//!   egress buckets, as in the HTTP/1.1 engine.
//! - Deadlines: `client_body_timeout` between two DATA frames of the request, and for the
//!   client's window to open; the worker's `connect_timeout` and `read_timeout` upstream.
//! - A reset from the client (or the connection's end) drops the stream's future wherever it
//!   waits: the upstream connection is closed, the instance's in-flight slot released
//!   ([`Slot`]).

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

use super::H2;
use super::head::{self, BodyFraming, RequestHead};
use crate::access_log::Record;
use crate::metrics::{METRICS, UpstreamErrorKind};
use crate::proxy::h1::buf::{Buf, Scratch, UPSTREAM};
use crate::proxy::h1::parse::{self, Framing, Reject, RequestEdits};
use crate::proxy::h1::pool::{self, Upstream};
use crate::proxy::h1::{
    ClientText, Relay, TOO_LARGE, read_into, send_request, upstream_for, within, write_two,
};
use crate::proxy::policy::{self, Attempts, ErrorPage, Failed, Failure};
use crate::routes::{Backend, Instance, Route};

/// Request body bytes kept from what arrived with the head: a request whose whole body is
/// this small can be retried.
const HOLD: usize = 16 * 1024;

/// What the streams of one connection share.
pub struct ConnInfo<'h> {
    pub h2: &'h H2,
    pub client_ip: Option<IpAddr>,
    pub client_ip_text: ClientText,
    pub https: bool,
    /// The https port, on a redirect-only listener.
    pub redirect_to: Option<u16>,
    pub over_limit: bool,
    /// The listener's address: the Host of a request without `:authority` or Host.
    pub local_addr: Option<SocketAddr>,
}

/// The in-flight slot of the instance an attempt is on, released when dropped: a stream's
/// future may be dropped at any await (a reset, the connection's end).
struct Slot {
    inst: Arc<Instance>,
    completed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inst.release(self.completed);
    }
}

/// How one attempt ended.
enum Attempt {
    /// A response was relayed (completely or not).
    Relayed { completed: bool },
    /// Nothing was sent to the client.
    Failed { failure: Failure, pooled: bool },
    /// The client reset the stream, or broke its body: nothing more to send it.
    ClientGone,
    /// tqproxy answers itself, nothing having been sent to the client (the request body
    /// stopped arriving: 408).
    Answer(ErrorPage),
}

/// The request body as far as tqproxy has it.
struct Body {
    recv: RecvStream,
    framing: BodyFraming,
    /// What arrived with the head, encoded for upstream (chunked when the framing is).
    held: Vec<u8>,
    /// The whole body is in `held`.
    complete: bool,
    /// A chunk's data was written and its CRLF not yet (chunked framing).
    crlf_due: bool,
    /// DATA bytes received so far, for `max_body_size`.
    data: u64,
}

impl Body {
    /// Whether the body is (or is declared) larger than `max`.
    fn too_large(&self, max: Option<u64>) -> bool {
        max.is_some_and(|max| match self.framing {
            BodyFraming::Length(n) => n > max,
            _ => self.data > max,
        })
    }
}

struct Stream<'c, 'h> {
    c: &'c ConnInfo<'h>,
    parts: http::request::Parts,
    body: Body,
    respond: SendResponse<Bytes>,
    timer: Pin<Box<Sleep>>,
    started: Instant,
    new_id: Option<[u8; 16]>,
    backend: Option<Arc<Backend>>,
    status: u16,
    bytes: u64,
    /// The instance that answered (kept after its slot is released, for the log and its
    /// figures).
    served: Option<Arc<Instance>>,
}

/// Serves one stream to its end and records it.
pub async fn serve(c: &ConnInfo<'_>, req: http::Request<RecvStream>, respond: SendResponse<Bytes>) {
    let started = Instant::now();
    let (parts, recv) = req.into_parts();
    let mut s = Stream {
        c,
        parts,
        body: Body {
            recv,
            framing: BodyFraming::None,
            held: Vec::new(),
            complete: true,
            crlf_due: false,
            data: 0,
        },
        respond,
        timer: Box::pin(tokio::time::sleep_until(started)),
        started,
        new_id: None,
        backend: None,
        status: 0,
        bytes: 0,
        served: None,
    };
    s.run().await;
    s.record();
}

impl Stream<'_, '_> {
    fn settings(&self) -> &crate::proxy::h1::Settings {
        &self.c.h2.conn
    }

    /// The host the request is for: `:authority`, else the Host field.
    fn host(&self) -> Option<&str> {
        match self.parts.uri.authority() {
            Some(a) => Some(a.as_str()),
            None => self
                .parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok()),
        }
    }

    fn path_query(&self) -> &str {
        self.parts.uri.path_and_query().map_or("", |p| p.as_str())
    }

    /// The path without the query, for routing.
    fn path(&self) -> &str {
        match self.path_query().split('?').next() {
            None | Some("") => "/",
            Some(p) => p,
        }
    }

    fn head_only(&self) -> bool {
        self.parts.method == Method::HEAD
    }

    /// The request id the worker and the client see: the client's, when it sent one valid
    /// value, else one made here.
    fn request_id(&self) -> &[u8] {
        match &self.new_id {
            Some(id) => id,
            None => self
                .parts
                .headers
                .get("x-request-id")
                .map_or(&[][..], |v| v.as_bytes()),
        }
    }

    /// The checks of an HTTP/1.1 request head that still apply once h2 has decoded it (h2
    /// itself refuses upper-case names, connection-specific fields, CR, LF and NUL in values,
    /// and a content-length it cannot parse or that disagrees with another): nothing that
    /// could be read differently by the worker goes through.
    fn check(&self) -> Result<Option<u64>, Reject> {
        let bad = |why| Reject { status: 400, why };
        let h = &self.parts.headers;
        if self.parts.method == Method::CONNECT {
            return Err(Reject {
                status: 405,
                why: "CONNECT is not supported",
            });
        }
        let pq = self.path_query();
        if pq == "*" {
            if self.parts.method != Method::OPTIONS {
                return Err(bad("asterisk-form is for OPTIONS only"));
            }
        } else if !pq.starts_with('/') {
            return Err(bad(":path is not in origin form"));
        }
        if !parse::valid_target(pq.as_bytes()) {
            return Err(bad("invalid request target"));
        }
        let mut hosts = h.get_all(header::HOST).iter();
        let host_field = hosts.next();
        if hosts.next().is_some() {
            return Err(bad("more than one Host"));
        }
        if let (Some(a), Some(f)) = (self.parts.uri.authority(), host_field)
            && a.as_str().as_bytes() != f.as_bytes()
        {
            return Err(bad(":authority and Host differ"));
        }
        if let Some(host) = self.host()
            && !parse::valid_host(host.as_bytes())
        {
            return Err(bad("invalid :authority"));
        }
        if h.len() > parse::MAX_HEADERS {
            return Err(Reject {
                status: 431,
                why: "too many header fields",
            });
        }
        match h.get(header::CONTENT_LENGTH) {
            None => Ok(None),
            Some(v) => parse::content_length(v.as_bytes())
                .map(Some)
                .ok_or(bad("invalid content-length")),
        }
    }

    async fn run(&mut self) {
        let length = match self.check() {
            Ok(l) => l,
            Err(r) => return self.page(&ErrorPage::rejected(r.status, r.why)).await,
        };
        if self.c.over_limit {
            return self.page(&ErrorPage::too_many_connections()).await;
        }
        if let Some(port) = self.c.redirect_to
            && !policy::is_acme_challenge(self.path())
        {
            let get_or_head = matches!(self.parts.method, Method::GET | Method::HEAD);
            return match policy::redirect(get_or_head, self.host(), self.path_query(), port) {
                Some((status, location)) => self.redirect(status, &location).await,
                None => {
                    let page = ErrorPage::rejected(400, "no usable Host header to redirect to");
                    self.page(&page).await
                }
            };
        }
        let end = self.body.recv.is_end_stream();
        self.body.framing = match (length, end) {
            (Some(n), _) => BodyFraming::Length(n),
            (None, true) => BodyFraming::None,
            (None, false) => BodyFraming::Chunked,
        };
        self.body.complete = end || length == Some(0);
        if self
            .parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
            && !self.body.complete
        {
            let mut cont = http::Response::new(());
            *cont.status_mut() = StatusCode::CONTINUE;
            let _ = self.respond.send_informational(cont);
        }
        if !self.body.complete && !self.hold_what_arrived() {
            return;
        }
        let valid_id = {
            let mut ids = self.parts.headers.get_all("x-request-id").iter();
            let first = ids.next();
            ids.next().is_none() && first.is_some_and(|v| parse::valid_request_id(v.as_bytes()))
        };
        if !valid_id {
            self.new_id = Some(policy::new_request_id());
        }
        self.forward().await;
    }

    /// Takes the DATA already received (without waiting), up to [`HOLD`] bytes, encoded for
    /// upstream; `false` when the client broke the body.
    fn hold_what_arrived(&mut self) -> bool {
        let Body {
            recv,
            framing,
            held,
            complete,
            crlf_due,
            data: seen,
        } = &mut self.body;
        let mut broken = false;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while held.len() < HOLD {
            match recv.poll_data(&mut cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    if data.is_empty() {
                        continue;
                    }
                    *seen += data.len() as u64;
                    if *framing == BodyFraming::Chunked {
                        let mut b = [0; 24];
                        held.extend_from_slice(head::chunk_prefix(data.len(), *crlf_due, &mut b));
                        *crlf_due = true;
                    }
                    held.extend_from_slice(&data);
                }
                Poll::Ready(Some(Err(_))) => {
                    broken = true;
                    break;
                }
                Poll::Ready(None) => {
                    let trailers = match recv.poll_trailers(&mut cx) {
                        Poll::Ready(Ok(t)) => t,
                        Poll::Ready(Err(_)) => {
                            broken = true;
                            break;
                        }
                        // Not decided yet: keep streaming.
                        Poll::Pending => break,
                    };
                    if *framing == BodyFraming::Chunked {
                        head::write_chunked_end(held, *crlf_due, trailers.as_ref());
                        *crlf_due = false;
                    }
                    *complete = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        !broken
    }

    /// Routes the request and tries instances until one answers or the policy gives up.
    async fn forward(&mut self) {
        let mut at = Attempts::default();
        let mut scratch = Scratch::take();
        loop {
            let (route, inst) = match self.pick(&at).await {
                Ok(p) => p,
                Err(page) => return self.page(&page).await,
            };
            let mut slot = Slot {
                inst,
                completed: false,
            };
            let backend = route.backend.clone();
            self.backend = Some(backend.clone());
            if self.body.too_large(backend.settings.max_body_size) {
                // Declared, or already held, past the limit: nothing goes to the worker.
                drop(slot);
                return self.page(&ErrorPage::rejected(413, TOO_LARGE)).await;
            }
            self.served = Some(slot.inst.clone());
            scratch.0.clear();
            self.write_head(&mut scratch.0, &route);
            at.made += 1;
            match self
                .attempt(&backend, &slot.inst, &scratch.0, at.fresh)
                .await
            {
                Attempt::Relayed { completed } => {
                    slot.completed = completed;
                    return;
                }
                Attempt::ClientGone => return,
                Attempt::Answer(page) => return self.page(&page).await,
                Attempt::Failed { failure, pooled } => {
                    let failed = Failed {
                        failure,
                        pooled,
                        instance: slot.inst.key,
                    };
                    drop(slot);
                    let idempotent = self.parts.method.is_idempotent();
                    if self.c.h2.policy.retry(
                        &mut at,
                        &backend,
                        failed,
                        idempotent,
                        self.body.complete,
                    ) {
                        continue;
                    }
                    return self.page(&failure.page(&backend.worker)).await;
                }
            }
        }
    }

    /// The route and an instance (its slot reserved), waiting for one up to the worker's
    /// `queue_timeout`.
    async fn pick(&self, at: &Attempts) -> Result<(Route, Arc<Instance>), ErrorPage> {
        let policy = &self.c.h2.policy;
        {
            let table = policy.routes.load();
            let Some(route) = table.lookup(self.host(), self.path()) else {
                METRICS.no_route.inc();
                return Err(ErrorPage::no_route());
            };
            if let Some(inst) = route.backend.pick(&at.tried) {
                return Ok((route.clone(), inst));
            }
        }
        policy
            .wait_for_instance(self.host(), self.path(), &at.tried)
            .await
            .map_err(|u| u.page())
    }

    fn write_head(&self, out: &mut Vec<u8>, route: &Route) {
        let default_host;
        let host = match self.host() {
            Some(h) => h.as_bytes(),
            None => {
                default_host = self.c.local_addr.map(|a| a.to_string()).unwrap_or_default();
                default_host.as_bytes()
            }
        };
        head::write_request(
            out,
            &RequestHead {
                method: self.parts.method.as_str(),
                target: route.upstream_target(self.path_query().as_bytes()),
                host,
                headers: &self.parts.headers,
                framing: self.body.framing,
                edits: RequestEdits {
                    target_prefix: b"",
                    target: b"",
                    client_ip: self.c.client_ip_text.get(),
                    https: self.c.https,
                    new_request_id: self.new_id.as_ref().map(|i| &i[..]),
                    default_host: b"",
                },
            },
        );
    }

    /// One attempt: an upstream connection, the head and the held body, the rest of the body
    /// streamed, the response relayed.
    async fn attempt(
        &mut self,
        backend: &Backend,
        inst: &Arc<Instance>,
        head: &[u8],
        fresh: bool,
    ) -> Attempt {
        let (mut up, pooled) =
            match upstream_for(&mut self.timer, backend, inst, fresh, self.started).await {
                Ok(u) => u,
                Err(failure) => {
                    return Attempt::Failed {
                        failure,
                        pooled: false,
                    };
                }
            };
        // As the HTTP/1.1 engine does: requests that are ready reach the worker together.
        tokio::task::yield_now().await;
        backend.shared.ingress.take(self.body.held.len()).await;
        let first = (head, &self.body.held[..]);
        let read_timeout = backend.settings.read_timeout;
        if let Err(failure) =
            send_request(&mut self.timer, &mut up, first, read_timeout, pooled).await
        {
            return Attempt::Failed { failure, pooled };
        }
        let mut upbuf = Buf::take(UPSTREAM);
        let body_done = if self.body.complete {
            true
        } else {
            match self.upload(backend, &mut up, &mut upbuf).await {
                Ok(done) => done,
                Err(a) => return a,
            }
        };
        self.relay(backend, inst, up, upbuf, body_done, pooled)
            .await
    }

    /// Streams the rest of the request body upstream, watching the worker meanwhile: interim
    /// responses are skipped, a final one ends the upload (`Ok(false)`: the body was not sent
    /// whole, the upstream connection is not reused). `Ok(true)`: all sent.
    async fn upload(
        &mut self,
        backend: &Backend,
        up: &mut Upstream,
        upbuf: &mut Buf,
    ) -> Result<bool, Attempt> {
        let body_timeout = self.settings().body_timeout;
        let read_timeout = backend.settings.read_timeout;
        let Stream { body, timer, .. } = self;
        let mut end = Vec::new();
        loop {
            enum Event {
                Data(Option<Result<Bytes, h2::Error>>),
                Upstream,
            }
            let event = within(timer, body_timeout, async {
                tokio::select! {
                    biased;
                    _ = up.readable() => Event::Upstream,
                    d = poll_fn(|cx| body.recv.poll_data(cx)) => Event::Data(d),
                }
            })
            .await;
            match event {
                None => {
                    return Err(Attempt::Answer(ErrorPage::rejected(
                        408,
                        "request body not received in time",
                    )));
                }
                Some(Event::Data(Some(Ok(data)))) => {
                    if data.is_empty() {
                        continue;
                    }
                    body.data += data.len() as u64;
                    if body.too_large(backend.settings.max_body_size) {
                        // Cut here: the worker's connection (a partial body) goes.
                        return Err(Attempt::Answer(ErrorPage::rejected(413, TOO_LARGE)));
                    }
                    let mut b = [0; 24];
                    let prefix: &[u8] = if body.framing == BodyFraming::Chunked {
                        let p = head::chunk_prefix(data.len(), body.crlf_due, &mut b);
                        body.crlf_due = true;
                        p
                    } else {
                        b""
                    };
                    backend.shared.ingress.take(data.len()).await;
                    let wrote = within(timer, read_timeout, write_two(up, prefix, &data)).await;
                    if !matches!(wrote, Some(Ok(()))) {
                        // The worker stopped reading: it may have answered already.
                        return Ok(false);
                    }
                    let _ = body.recv.flow_control().release_capacity(data.len());
                }
                // The client reset the stream, or its DATA disagreed with its content-length
                // (h2 reset the stream): the worker saw a partial body, the connection goes.
                Some(Event::Data(Some(Err(_)))) => return Err(Attempt::ClientGone),
                Some(Event::Data(None)) => {
                    let trailers = match poll_fn(|cx| body.recv.poll_trailers(cx)).await {
                        Ok(t) => t,
                        Err(_) => return Err(Attempt::ClientGone),
                    };
                    if body.framing == BodyFraming::Chunked {
                        head::write_chunked_end(&mut end, body.crlf_due, trailers.as_ref());
                        let wrote = within(timer, read_timeout, up.write_all(&end)).await;
                        if !matches!(wrote, Some(Ok(()))) {
                            return Ok(false);
                        }
                    }
                    return Ok(true);
                }
                Some(Event::Upstream) => match up.try_read(upbuf.spare()) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(0) | Err(_) => {
                        return Err(Attempt::Failed {
                            failure: Failure::DiedBeforeResponse,
                            pooled: false,
                        });
                    }
                    Ok(n) => {
                        upbuf.filled_by(n);
                        if !skip_interim(upbuf) {
                            return Ok(false);
                        }
                    }
                },
            }
        }
    }

    /// Reads the response head, relays it and the body, and gives the upstream connection back
    /// to the pool when it can carry another request.
    async fn relay(
        &mut self,
        backend: &Backend,
        inst: &Arc<Instance>,
        mut up: Upstream,
        mut upbuf: Buf,
        body_done: bool,
        pooled: bool,
    ) -> Attempt {
        let read_timeout = backend.settings.read_timeout;
        let head_only = self.head_only();
        let mut got_any = !upbuf.is_empty();
        let head_deadline = if self.body.complete {
            self.started + read_timeout
        } else {
            Instant::now() + read_timeout
        };
        let (resp, framing) = loop {
            let decided = {
                let mut slots = parse::slots();
                match parse::parse_response(upbuf.filled(), &mut slots, head_only) {
                    Ok(None) => None,
                    Err(why) => {
                        tracing::warn!(worker = %backend.worker, instance = inst.id, why, "malformed response");
                        return Attempt::Failed {
                            failure: Failure::BadResponse,
                            pooled: false,
                        };
                    }
                    Ok(Some((r, _))) if r.interim() && r.status != 101 => Some(Err(r.head_len)),
                    Ok(Some((r, headers))) => {
                        if r.status == 101 {
                            return Attempt::Failed {
                                failure: Failure::BadResponse,
                                pooled: false,
                            };
                        }
                        match head::response(upbuf.filled(), &r, headers, self.request_id()) {
                            Ok(h) => Some(Ok((r, h))),
                            Err(why) => {
                                tracing::warn!(worker = %backend.worker, instance = inst.id, why, "malformed response");
                                return Attempt::Failed {
                                    failure: Failure::BadResponse,
                                    pooled: false,
                                };
                            }
                        }
                    }
                }
            };
            match decided {
                // An interim response (tqproxy answered 100-continue itself): skipped.
                Some(Err(len)) => {
                    upbuf.consume(len);
                    continue;
                }
                Some(Ok(v)) => break v,
                None => {}
            }
            let Stream { timer, respond, .. } = self;
            let read = within(timer, head_deadline, async {
                tokio::select! {
                    biased;
                    _ = poll_fn(|cx| respond.poll_reset(cx)) => None,
                    r = read_into(&mut up, &mut upbuf) => Some(r),
                }
            })
            .await;
            match read {
                Some(None) => return Attempt::ClientGone,
                Some(Some(Ok(0)) | Some(Err(_))) => {
                    let failure = Failure::before_head(got_any, pooled);
                    return Attempt::Failed { failure, pooled };
                }
                Some(Some(Ok(_))) => got_any = true,
                None => {
                    return Attempt::Failed {
                        failure: Failure::Timeout,
                        pooled,
                    };
                }
            }
        };
        upbuf.consume(resp.head_len);
        self.status = resp.status;
        let end_now = resp.framing == Framing::None;
        let mut send = match self.respond.send_response(framing, end_now) {
            Ok(s) => s,
            Err(_) => return Attempt::ClientGone,
        };
        let mut complete = end_now;
        let mut upstream_ok = true;
        if !end_now {
            match self
                .relay_body(backend, &mut send, &mut up, &mut upbuf, resp.framing)
                .await
            {
                Ok(()) => complete = true,
                Err(Cut::Client) => return Attempt::ClientGone,
                Err(Cut::Upstream(kind)) => {
                    backend.shared.metrics.upstream_error(kind);
                    send.send_reset(Reason::INTERNAL_ERROR);
                    upstream_ok = false;
                }
            }
        }
        if complete && upstream_ok && resp.reusable && body_done && upbuf.is_empty() {
            pool::checkin(
                inst,
                up,
                self.settings().pool_capacity,
                backend.settings.idle_timeout,
                &self.c.h2.policy.routes,
                Instant::now(),
            );
        }
        // A response that ended before the request body did: h2 resets the stream with
        // NO_ERROR once the stream's handles are dropped (RFC 9113 section 8.1).
        Attempt::Relayed {
            completed: complete,
        }
    }

    /// The response body, as DATA frames under flow control; chunked trailers as trailers.
    async fn relay_body(
        &mut self,
        backend: &Backend,
        send: &mut SendStream<Bytes>,
        up: &mut Upstream,
        upbuf: &mut Buf,
        framing: Framing,
    ) -> Result<(), Cut> {
        let body_timeout = self.settings().body_timeout;
        let read_timeout = backend.settings.read_timeout;
        let chunked = framing == Framing::Chunked;
        let mut relay = Relay::new(framing);
        let mut data = Vec::new();
        let mut trailer_bytes = Vec::new();
        loop {
            let avail = upbuf.filled();
            data.clear();
            let (used, done) = relay
                .take(
                    avail,
                    chunked.then_some(&mut data),
                    chunked.then_some(&mut trailer_bytes),
                )
                .map_err(|why| {
                    tracing::warn!(why, "malformed response body");
                    Cut::Upstream(UpstreamErrorKind::Other)
                })?;
            let out: &[u8] = if chunked { &data } else { &avail[..used] };
            let trailers = if done && chunked {
                head::trailers(&trailer_bytes)
            } else {
                None
            };
            let end_with_data = done && trailers.is_none();
            if !out.is_empty() || end_with_data {
                backend.shared.egress.take(out.len()).await;
                send_all(send, &mut self.timer, body_timeout, out, end_with_data).await?;
                self.bytes += out.len() as u64;
            }
            upbuf.consume(used);
            if done {
                if let Some(t) = trailers {
                    send.send_trailers(t).map_err(|_| Cut::Client)?;
                }
                return Ok(());
            }
            if !upbuf.is_empty() {
                continue;
            }
            let read = within(&mut self.timer, read_timeout, async {
                tokio::select! {
                    biased;
                    _ = poll_fn(|cx| send.poll_reset(cx)) => None,
                    r = read_into(up, upbuf) => Some(r),
                }
            })
            .await;
            match read {
                Some(None) => return Err(Cut::Client),
                Some(Some(Ok(0))) if framing == Framing::Close => {
                    send_all(send, &mut self.timer, body_timeout, b"", true).await?;
                    return Ok(());
                }
                Some(Some(Ok(0))) => return Err(Cut::Upstream(UpstreamErrorKind::Closed)),
                Some(Some(Ok(_))) => {}
                Some(Some(Err(_))) => return Err(Cut::Upstream(UpstreamErrorKind::Reset)),
                None => return Err(Cut::Upstream(UpstreamErrorKind::Timeout)),
            }
        }
    }

    /// One of tqproxy's own answers.
    async fn page(&mut self, page: &ErrorPage) {
        let body = page.body();
        let mut resp = http::Response::new(());
        *resp.status_mut() =
            StatusCode::from_u16(page.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(s) = page.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(v) = (!self.request_id().is_empty())
            .then(|| HeaderValue::from_bytes(self.request_id()).ok())
            .flatten()
        {
            h.insert("x-request-id", v);
        }
        self.status = page.status;
        let head_only = self.head_only();
        let Ok(mut send) = self.respond.send_response(resp, head_only) else {
            return;
        };
        if !head_only {
            self.bytes = body.len() as u64;
            let body_timeout = self.settings().body_timeout;
            let _ = send_all(
                &mut send,
                &mut self.timer,
                body_timeout,
                body.as_bytes(),
                true,
            )
            .await;
        }
    }

    async fn redirect(&mut self, status: u16, location: &str) {
        let mut resp = http::Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(location) {
            h.insert(header::LOCATION, v);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=3600"),
        );
        self.status = status;
        let _ = self.respond.send_response(resp, true);
    }

    /// Metrics and the access log line.
    fn record(&self) {
        let elapsed = self.started.elapsed();
        let header =
            |name: header::HeaderName| self.parts.headers.get(name).and_then(|v| v.to_str().ok());
        self.c.h2.policy.record(
            self.backend.as_deref(),
            self.served.as_deref(),
            self.status,
            elapsed,
            || Record {
                client: self.c.client_ip,
                method: self.parts.method.as_str(),
                target: self.path_query(),
                version: "HTTP/2.0",
                host: self.host(),
                status: self.status,
                bytes: self.bytes,
                elapsed,
                worker: self.backend.as_ref().map(|b| &*b.worker),
                served_by: self.served.as_ref().map(|i| (i.id, i.addr.port())),
                referer: header(header::REFERER),
                user_agent: header(header::USER_AGENT),
                request_id: std::str::from_utf8(self.request_id()).ok(),
            },
        );
    }
}

/// Why a response body stopped.
enum Cut {
    /// The client reset the stream, or did not open its window in time.
    Client,
    /// The worker broke it off.
    Upstream(UpstreamErrorKind),
}

/// Sends `data` as DATA frames, each as large as the stream's capacity allows (h2 bounds it by
/// the client's windows and by the stream's send buffer), waiting at most `timeout` for the
/// window to open each time; `end` ends the stream with the last frame.
async fn send_all(
    send: &mut SendStream<Bytes>,
    timer: &mut Pin<Box<Sleep>>,
    timeout: std::time::Duration,
    mut data: &[u8],
    end: bool,
) -> Result<(), Cut> {
    if data.is_empty() {
        return send.send_data(Bytes::new(), end).map_err(|_| Cut::Client);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let mut cap = send.capacity();
        if cap == 0 {
            cap = match within(timer, timeout, poll_fn(|cx| send.poll_capacity(cx))).await {
                Some(Some(Ok(n))) => n,
                _ => return Err(Cut::Client),
            };
        }
        let n = cap.min(data.len());
        let last = n == data.len();
        send.send_data(Bytes::copy_from_slice(&data[..n]), end && last)
            .map_err(|_| Cut::Client)?;
        data = &data[n..];
    }
    Ok(())
}

/// Consumes the complete interim responses at the start of `upbuf`; `false` when what
/// follows is (the start of) a final response, or malformed: the upload stops there.
fn skip_interim(upbuf: &mut Buf) -> bool {
    loop {
        let mut slots = parse::slots();
        match parse::parse_response(upbuf.filled(), &mut slots, false) {
            Ok(Some((r, _))) if r.interim() && r.status != 101 => {
                let len = r.head_len;
                upbuf.consume(len);
                if upbuf.is_empty() {
                    return true;
                }
            }
            // Incomplete: go on uploading, the rest of the head will come.
            Ok(None) => return true,
            _ => return false,
        }
    }
}
