//! tqproxy's HTTP/1.1 engine: a pingora [`ServerApp`] that serves each accepted client
//! connection (after TLS) in its one task, doing the upstream I/O inline.
//!
//! Per connection: one task of its own, one timer (reset between phases, never re-created: moving a
//! deadline later costs an atomic store), no buffer while idle. Per request: the head is parsed
//! in place with `httparse` ([`parse`]), routed and balanced by the [`policy`], and forwarded
//! with only tqproxy's edits, written once; the response head comes back the same way; bodies
//! stream through two fixed buffers ([`buf`]), chunked bodies validated on the way ([`body`]);
//! the upstream connection comes from and goes back to a per-thread LIFO ([`pool`]). No task,
//! channel or lock per request; one allocation, the request's own state, so that an idle
//! connection does not carry it.
//!
//! Deadlines: `proxy.client_header_timeout` for a whole request head (from the connection's
//! start for its first request, from the first byte after that; a partial head then gets 408),
//! `proxy.client_keepalive_timeout` between requests, `proxy.client_body_timeout` between two
//! reads of a request body and two writes of a response, the worker's `connect_timeout` and
//! `read_timeout` upstream.
//!
//! HTTP/2 connections (ALPN `h2`, or the h2c preface with `proxy.h2c`) are handed to
//! [`super::h2`], which shares the policy, the pool and the helpers below.

pub mod body;
pub mod buf;
pub mod parse;
pub mod pool;

use std::future::{Future, poll_fn};
use std::io::{self, IoSlice, Write as _};
use std::net::IpAddr;
use std::ops::DerefMut;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{ALPN, Stream};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use self::body::Chunked;
use self::buf::{Buf, CLIENT, Scratch, UPSTREAM};
use self::parse::{Framing, Method, Parsed, Reject, Request};
use self::pool::Upstream;
use super::h2::H2;
use super::policy::{self, ErrorPage, Failure, Policy};
use crate::access_log::Record;
use crate::metrics::{METRICS, UpstreamErrorKind};
use crate::routes::{Backend, Instance, Route};

/// The engine's settings (the `proxy:` section).
#[derive(Debug, Clone)]
pub struct Settings {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    /// Connections served at once, beyond which requests get 503 and the connection closes.
    pub max_connections: Option<usize>,
    /// Prior-knowledge HTTP/2 on plain listeners.
    pub h2c: bool,
    /// Idle upstream connections kept per thread.
    pub pool_capacity: usize,
}

/// How long a connection closed after an error keeps reading (and discarding) what the client
/// still sends, so the kernel does not answer it with a reset that destroys the response.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct Engine {
    policy: Arc<Policy>,
    settings: Settings,
    h2: Arc<H2>,
    connections: Arc<AtomicUsize>,
}

impl Engine {
    pub fn new(policy: Arc<Policy>, settings: Settings, h2: Arc<H2>) -> Engine {
        Engine {
            policy,
            settings,
            h2,
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Counts a connection for `proxy.max_connections` while it lives.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ServerApp for Engine {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The connection gets a task of its own, and pingora's ends here: its future is sized
        // for the TLS handshake it may run (about 10 KB, measured), for as long as the
        // connection would live.
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        tokio::spawn(connection(self.clone(), stream, shutdown.clone(), h2));
        None
    }
}

/// Why a request body is refused with 413 (`max_body_size`).
pub(crate) const TOO_LARGE: &str = "request body larger than the worker's max_body_size";

/// One client connection's task, for its whole life. HTTP/2 runs boxed: the h2 connection's
/// future is several KB, and inline it would size every HTTP/1.1 connection's task too
/// (idle-conns measured 3 985 -> 6 096 bytes per idle connection when it was).
async fn connection(engine: Arc<Engine>, stream: Stream, shutdown: ShutdownWatch, h2: bool) {
    let n = engine.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let _counted = Counted(engine.connections.clone());
    let over_limit = engine.settings.max_connections.is_some_and(|max| n > max);
    if h2 {
        Box::pin(engine.h2.serve(stream, shutdown, over_limit)).await;
        return;
    }
    let conn = Conn::new(engine.clone(), stream, shutdown.clone(), over_limit);
    if let Some(h2c) = conn.serve().await {
        Box::pin(engine.h2.serve(h2c, shutdown, over_limit)).await;
    }
}

/// When a wait ends: at an instant, or a duration after the moment the wait starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    At(Instant),
    After(Duration),
}

impl From<Instant> for Deadline {
    fn from(i: Instant) -> Deadline {
        Deadline::At(i)
    }
}

impl From<Duration> for Deadline {
    fn from(d: Duration) -> Deadline {
        Deadline::After(d)
    }
}

/// Runs `f` until it completes, or until `deadline` (`None`). The connection's one timer is
/// armed only when `f` has to wait (and only then is the clock read), and moving it later is
/// cheap (tokio extends the entry in place), so I/O that completes at once never touches the
/// timer or the clock. (`timer`: a connection's boxed timer, or one pinned in a stream's
/// future.)
pub(crate) async fn within<P: DerefMut<Target = Sleep>, F: Future>(
    timer: &mut Pin<P>,
    deadline: impl Into<Deadline>,
    f: F,
) -> Option<F::Output> {
    let deadline = deadline.into();
    let mut f = pin!(f);
    let mut armed = false;
    poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if !armed {
            let at = match deadline {
                Deadline::At(at) => at,
                Deadline::After(d) => Instant::now() + d,
            };
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Writes `a` then `b` (one `writev` when both fit), completely.
pub(crate) async fn write_two<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else if b.is_empty() {
            w.write(a).await?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// One read into `buf`'s spare room (`Ok(0)`: EOF).
pub(crate) async fn read_into<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut Buf,
) -> io::Result<usize> {
    let n = r.read(buf.spare()).await?;
    buf.filled_by(n);
    Ok(n)
}

/// An upstream connection for one attempt: the pool's most recent one to `inst` (unless
/// `fresh`: the retry after a stale pooled connection), else a new one within the worker's
/// `connect_timeout`; `true`: it came from the pool. Both engines' attempts start here.
pub(crate) async fn upstream_for<P: DerefMut<Target = Sleep>>(
    timer: &mut Pin<P>,
    backend: &Backend,
    inst: &Instance,
    fresh: bool,
    now: Instant,
) -> Result<(Upstream, bool), Failure> {
    let settings = &backend.settings;
    if !fresh && let Some(c) = pool::checkout(inst, settings.idle_timeout, now) {
        return Ok((c, true));
    }
    match within(timer, settings.connect_timeout, Upstream::connect(inst)).await {
        Some(Ok(c)) => Ok((c, false)),
        Some(Err(err)) => {
            tracing::debug!(worker = %backend.worker, instance = inst.id, error = %err, "connect failed");
            Err(Failure::Refused)
        }
        None => Err(Failure::Refused),
    }
}

/// Sends the first bytes of a request (`a` then `b`) within the worker's `read_timeout`.
pub(crate) async fn send_request<P: DerefMut<Target = Sleep>>(
    timer: &mut Pin<P>,
    up: &mut Upstream,
    (a, b): (&[u8], &[u8]),
    read_timeout: Duration,
    pooled: bool,
) -> Result<(), Failure> {
    match within(timer, read_timeout, write_two(up, a, b)).await {
        Some(Ok(())) => Ok(()),
        Some(Err(_)) => Err(Failure::on_send(pooled)),
        None => Err(Failure::Timeout),
    }
}

/// The client's address (as X-Forwarded-For shows it) and the listener's, from the socket.
pub(crate) fn addresses(io: &Stream) -> (Option<IpAddr>, Option<std::net::SocketAddr>) {
    let digest = io.get_socket_digest();
    let inet = |a: Option<&pingora::protocols::l4::socket::SocketAddr>| a?.as_inet().copied();
    let client =
        inet(digest.as_ref().and_then(|d| d.peer_addr())).map(|a| policy::client_ip(a.ip()));
    let local = inet(digest.as_ref().and_then(|d| d.local_addr()));
    (client, local)
}

/// How a request ended, for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// Close, but first read and discard what the client still sends.
    Linger,
}

/// Why a connection stops waiting for a request head.
enum HeadEnd {
    /// EOF, an idle timeout, a shutdown, or an I/O error: close without a word.
    Quiet,
    /// A malformed, oversized or too slow head: answer it, then close.
    Reject(Reject),
    /// The h2c preface: hand the connection to the HTTP/2 server.
    H2c,
}

/// What one attempt at forwarding a request to an instance came to.
enum Attempt {
    /// A response was relayed (completely or not).
    Relayed { completed: bool, next: Next },
    /// The attempt failed before anything was sent to the client. `pooled`: on a connection
    /// taken from the pool.
    Failed { failure: Failure, pooled: bool },
    /// The client went away or broke the request body: nothing more to send it.
    ClientGone,
    /// The client's body broke its framing, or stopped arriving (`status`): answer and close.
    BadBody(Reject),
}

/// The request in progress.
struct Exchange {
    req: Request,
    started: Instant,
    /// Body bytes of a chunked request so far (its chunks' data), for `max_body_size`.
    chunked_data: u64,
    /// A request id made here (the client sent none that could be kept).
    new_id: Option<[u8; 16]>,
    backend: Option<Arc<Backend>>,
    status: u16,
    bytes: u64,
    /// The instance that answered (kept after its slot is released, for the log and its figures).
    served: Option<Arc<Instance>>,
    /// Where the bytes after this request's body start in the client buffer (a pipelined
    /// request), once the body was read.
    body_end: Option<usize>,
    /// The whole body is in the client buffer: the request can be sent again.
    replayable: bool,
    /// When the response was relayed (one clock reading for the pool, the metrics, the log
    /// and the next keep-alive deadline).
    ended: Option<Instant>,
}

impl Exchange {
    fn request_id<'a>(&'a self, head: &'a [u8]) -> &'a [u8] {
        match &self.new_id {
            Some(id) => id,
            None => self.req.request_id.map_or(&[][..], |s| s.get(head)),
        }
    }
}

/// What [`Conn::prepare`] decided for a complete head.
enum Decision {
    Reject(Reject),
    /// tqproxy answers itself (404, a redirect, too many connections).
    Local(LocalAnswer),
    /// No instance free now: wait for one.
    Wait,
    /// The scratch buffer holds the head to forward to this instance.
    Forward(Arc<Instance>),
}

enum LocalAnswer {
    Page(ErrorPage),
    Redirect(u16, String),
    /// An ACME http-01 key authorization (200, text/plain, exactly these bytes).
    Challenge(String),
}

/// The state of one client connection.
struct Conn {
    engine: Arc<Engine>,
    io: Stream,
    shutdown: ShutdownWatch,
    timer: Pin<Box<Sleep>>,
    client_ip: Option<IpAddr>,
    /// `client_ip` as X-Forwarded-For writes it.
    client_ip_text: ClientText,
    https: bool,
    /// The https port, on a redirect-only listener.
    redirect_to: Option<u16>,
    over_limit: bool,
    /// The client's bytes; `None` while idle.
    inbuf: Option<Buf>,
    /// No request was read on this connection yet.
    first: bool,
    opened: Instant,
    /// When the last request ended: the keep-alive deadline counts from there.
    last_end: Option<Instant>,
}

impl Conn {
    fn new(engine: Arc<Engine>, io: Stream, shutdown: ShutdownWatch, over_limit: bool) -> Conn {
        let (client_ip, local) = addresses(&io);
        let redirect_to = local.and_then(|a| engine.policy.redirect_port(a.port()));
        let https = io.get_ssl_digest().is_some();
        let opened = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(
            opened + engine.settings.header_timeout,
        ));
        Conn {
            engine,
            io,
            shutdown,
            client_ip_text: ClientText::new(client_ip),
            timer,
            client_ip,
            https,
            redirect_to,
            over_limit,
            inbuf: None,
            first: true,
            opened,
            last_end: None,
        }
    }

    fn settings(&self) -> &Settings {
        &self.engine.settings
    }

    /// Serves requests until the connection ends; returns the stream when it turned out to
    /// speak h2c.
    async fn serve(mut self) -> Option<Stream> {
        loop {
            match self.read_head().await {
                Ok(()) => {}
                Err(HeadEnd::Quiet) => return None,
                Err(HeadEnd::H2c) => return self.into_h2c(),
                Err(HeadEnd::Reject(r)) => {
                    self.reject_unparsed(r).await;
                    return None;
                }
            }
            self.first = false;
            // The request's state (1.8 KB: the exchange, the upstream connection, the relay) is
            // boxed, so that an idle connection's future is 0.9 KB instead of 2.2 KB: 10 000
            // idle connections cost 15 MB less. The only allocation per request, from the
            // allocator's thread-local free list; measured at 0.97-1.01x req/s and 1.00-1.01x
            // CPU per request against the same tree without it (load-tests/RESULTS.md).
            match Box::pin(self.request()).await {
                Next::KeepAlive => {}
                // Unread bytes from the client (a pipelined request after `Connection: close`)
                // would turn our close into a reset that can destroy the answer: linger.
                Next::Close if self.inbuf.as_ref().is_some_and(|b| !b.is_empty()) => {
                    self.linger().await;
                    return None;
                }
                Next::Close => {
                    let _ = self.io.flush().await;
                    return None;
                }
                Next::Linger => {
                    self.linger().await;
                    return None;
                }
            }
        }
    }

    /// The stream with what was read of it put back, for the HTTP/2 server.
    fn into_h2c(mut self) -> Option<Stream> {
        let read = self.inbuf.take()?;
        let mut l4 = self
            .io
            .into_any()
            .downcast::<pingora::protocols::l4::stream::Stream>()
            .ok()?;
        l4.rewind(read.filled());
        Some(l4)
    }

    /// Waits until a complete request head is in `inbuf` (compacted to its start).
    async fn read_head(&mut self) -> Result<(), HeadEnd> {
        let pending = self.inbuf.as_ref().is_some_and(|b| !b.is_empty());
        if !pending {
            // Idle: give the buffer back until the client sends something.
            self.inbuf = None;
            self.wait_for_bytes().await?;
        }
        let h2c = self.first && self.settings().h2c && !self.https;
        // The whole head within `client_header_timeout`: from the connection's start for its
        // first request, else from when the head turns out not to be complete at once.
        let header_timeout = self.settings().header_timeout;
        let mut deadline = self.first.then_some(self.opened + header_timeout);
        let Conn {
            io, timer, inbuf, ..
        } = self;
        let buf = inbuf.as_mut().ok_or(HeadEnd::Quiet)?;
        buf.compact();
        let mut searched = 0;
        loop {
            let got = buf.filled();
            if h2c && got.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(got) {
                // Maybe the preface: read on.
            } else if h2c && got.starts_with(H2_PREFACE) {
                return Err(HeadEnd::H2c);
            } else if parse::head_complete(got, searched) {
                return Ok(());
            } else {
                if got[searched..].contains(&b'\n') {
                    parse::check_incomplete(got).map_err(HeadEnd::Reject)?;
                } else {
                    parse::check_partial(got).map_err(HeadEnd::Reject)?;
                }
                searched = got.len();
            }
            buf.reserve(4096);
            let at = *deadline.get_or_insert_with(|| Instant::now() + header_timeout);
            match within(timer, at, read_into(io, buf)).await {
                Some(Ok(0)) | Some(Err(_)) => return Err(HeadEnd::Quiet),
                Some(Ok(_)) => {}
                None => {
                    return Err(HeadEnd::Reject(Reject {
                        status: 408,
                        why: "request head not received in time",
                    }));
                }
            }
        }
    }

    /// Waits, holding no buffer, for the first bytes of the next request: a buffer is taken
    /// from the pool only for the moment a read is tried, and kept once it filled some.
    async fn wait_for_bytes(&mut self) -> Result<(), HeadEnd> {
        let first = self.first;
        let deadline: Deadline = match (first, self.last_end) {
            (true, _) => (self.opened + self.settings().header_timeout).into(),
            (false, Some(end)) => (end + self.settings().keepalive_timeout).into(),
            (false, None) => self.settings().keepalive_timeout.into(),
        };
        if !first && *self.shutdown.borrow() {
            return Err(HeadEnd::Quiet);
        }
        let Conn {
            io,
            timer,
            shutdown,
            inbuf,
            ..
        } = self;
        let read = poll_fn(|cx| {
            let mut b = Buf::take(CLIENT);
            let r = {
                let mut rb = ReadBuf::new(b.spare());
                match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            };
            match r {
                Poll::Ready(Ok(0)) => Poll::Ready(None),
                Poll::Ready(Ok(n)) => {
                    b.filled_by(n);
                    Poll::Ready(Some(b))
                }
                Poll::Ready(Err(_)) => Poll::Ready(None),
                // `b` goes back to the pool here.
                Poll::Pending => Poll::Pending,
            }
        });
        let waited = within(timer, deadline, async {
            tokio::select! {
                biased;
                got = read => got,
                _ = shutdown.changed(), if !first => None,
            }
        })
        .await;
        match waited {
            Some(Some(b)) => {
                *inbuf = Some(b);
                Ok(())
            }
            // A new connection that sent nothing in time is closed without an answer, like
            // one that is idle between requests.
            _ => Err(HeadEnd::Quiet),
        }
    }

    /// Answers a head that could not be parsed (or did not arrive in time), and closes.
    async fn reject_unparsed(&mut self, r: Reject) {
        let started = Instant::now();
        let page = ErrorPage::rejected(r.status, r.why);
        METRICS.unrouted.with_label_values(&["bad_request"]).inc();
        let mut out = Scratch::take();
        let bytes = write_page(&mut out.0, &page, None, true, false);
        let deadline = self.settings().body_timeout;
        let Conn { io, timer, .. } = self;
        let _ = within(timer, deadline, async {
            io.write_all(&out.0).await?;
            io.flush().await
        })
        .await;
        self.record_bare(r.status, bytes, started);
        self.linger().await;
    }

    /// The access log line of a request tqproxy could not parse.
    fn record_bare(&self, status: u16, bytes: u64, started: Instant) {
        let elapsed = started.elapsed();
        self.engine
            .policy
            .record(None, None, status, elapsed, || Record {
                client: self.client_ip,
                method: "-",
                target: "-",
                version: "HTTP/1.1",
                host: None,
                status,
                bytes,
                elapsed,
                worker: None,
                served_by: None,
                referer: None,
                user_agent: None,
                request_id: None,
            });
    }

    /// Closes after an error: stop sending, then read and discard what the client still sends
    /// for a moment, so that our answer is not destroyed by a reset.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER;
        let Conn {
            io, timer, inbuf, ..
        } = self;
        let _ = within(timer, deadline, async {
            let _ = io.flush().await;
            let _ = io.shutdown().await;
            let mut sink = inbuf.take().unwrap_or_else(|| Buf::take(CLIENT));
            let mut total = 0;
            while total < LINGER_BYTES {
                sink.clear();
                match read_into(io, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }

    /// Parses the head in `inbuf`, routes it and picks an instance; for a request to forward,
    /// writes the upstream head into `scratch`. Everything here is synchronous: the header
    /// slots live on this stack frame only.
    fn prepare(
        &self,
        scratch: &mut Vec<u8>,
        tried: &[u64],
        picked: Option<(Route, Arc<Instance>)>,
        ex: &mut Option<Exchange>,
    ) -> Decision {
        let Some(buf) = self.inbuf.as_ref() else {
            return Decision::Reject(Reject {
                status: 400,
                why: "no request",
            });
        };
        let all = buf.filled();
        let mut slots = parse::slots();
        let (req, headers) = match parse::parse_request(all, 0, &mut slots) {
            Ok(Parsed::Complete(r, h)) => (r, h),
            Ok(Parsed::Partial) => {
                return Decision::Reject(Reject {
                    status: 400,
                    why: "malformed request head",
                });
            }
            Err(r) => return Decision::Reject(r),
        };
        let exchange = ex.get_or_insert_with(|| Exchange {
            req: req.clone(),
            started: Instant::now(),
            chunked_data: 0,
            new_id: None,
            backend: None,
            status: 0,
            bytes: 0,
            served: None,
            body_end: None,
            replayable: req.framing == Framing::None,
            ended: None,
        });
        // (A connection's limit and redirect are decided before any wait: an instance picked
        // after one is never left holding its slot here.)
        let local = |page| {
            if let Some((_, inst)) = &picked {
                inst.release(false);
            }
            Decision::Local(page)
        };
        if self.over_limit {
            return local(LocalAnswer::Page(ErrorPage::too_many_connections()));
        }
        let host = req.host_span().map(|s| s.str(all));
        let path = req.path(all);
        // ACME http-01, on plain listeners only, before routing and the https redirect; a
        // token that is not ours goes on (a worker may answer it).
        if !self.https
            && policy::is_acme_challenge(path)
            && let Some(ch) = &self.engine.policy.acme
            && let Some(key_auth) = ch.http01(path)
        {
            return local(LocalAnswer::Challenge(key_auth));
        }
        if let Some(port) = self.redirect_to
            && !policy::is_acme_challenge(path)
        {
            let get_or_head = matches!(req.method, Method::Get | Method::Head);
            return local(
                match policy::redirect(get_or_head, host, req.path_query.str(all), port) {
                    Some((status, location)) => LocalAnswer::Redirect(status, location),
                    None => LocalAnswer::Page(ErrorPage::rejected(
                        400,
                        "no usable Host header to redirect to",
                    )),
                },
            );
        }
        let (route, inst) = match picked {
            Some(p) => p,
            None => {
                let table = self.engine.policy.routes.load();
                let Some(route) = table.lookup(host, path) else {
                    METRICS.no_route.inc();
                    return Decision::Local(LocalAnswer::Page(ErrorPage::no_route()));
                };
                let Some(inst) = route.backend.pick(tried) else {
                    exchange.backend = Some(route.backend.clone());
                    return Decision::Wait;
                };
                (route.clone(), inst)
            }
        };
        // The target upstream: the prefix stripped where the route says so.
        let (slash, pq) = req.origin_form(all);
        let target = if slash.is_empty() {
            route.upstream_target(pq)
        } else {
            [slash, pq]
        };
        exchange.backend = Some(route.backend);
        if req.request_id.is_none() && exchange.new_id.is_none() {
            exchange.new_id = Some(policy::new_request_id());
        }
        let default_host = if req.host_span().is_none() {
            self.io
                .get_socket_digest()
                .and_then(|d| d.local_addr().cloned())
                .map(|a| a.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        scratch.clear();
        parse::write_request(
            scratch,
            all,
            &req,
            headers,
            &parse::RequestEdits {
                target_prefix: target[0],
                target: target[1],
                client_ip: self.client_ip_text.get(),
                https: self.https,
                new_request_id: exchange.new_id.as_ref().map(|i| &i[..]),
                default_host: default_host.as_bytes(),
            },
        );
        Decision::Forward(inst)
    }

    /// One request, from its complete head to its last response byte.
    async fn request(&mut self) -> Next {
        let mut scratch = Scratch::take();
        let mut ex: Option<Exchange> = None;
        let mut at = policy::Attempts::default();
        let mut picked: Option<(Route, Arc<Instance>)> = None;
        loop {
            let decision = self.prepare(&mut scratch.0, &at.tried, picked.take(), &mut ex);
            let inst = match decision {
                Decision::Reject(r) => {
                    // The head did not parse: answered (and the connection closed) without
                    // an exchange.
                    self.reject_unparsed(r).await;
                    return Next::Close;
                }
                Decision::Local(LocalAnswer::Page(page)) => {
                    let close = ex.as_ref().is_some_and(|e| e.req.framing != Framing::None);
                    return self.answer(ex, &page, close).await;
                }
                Decision::Local(LocalAnswer::Redirect(status, location)) => {
                    return self.redirect(ex, status, &location).await;
                }
                Decision::Local(LocalAnswer::Challenge(body)) => {
                    return self.challenge(ex, &body).await;
                }
                Decision::Wait => {
                    let Some(e) = ex.as_ref() else {
                        return Next::Close;
                    };
                    let buf = self.inbuf.as_ref().map_or(&[][..], |b| b.filled());
                    let host = e.req.host_span().map(|s| s.str(buf));
                    let path = e.req.path(buf);
                    match self
                        .engine
                        .policy
                        .wait_for_instance(host, path, &at.tried)
                        .await
                    {
                        Ok(p) => {
                            picked = Some(p);
                            continue;
                        }
                        Err(u) => {
                            let close = e.req.framing != Framing::None;
                            return self.answer(ex, &u.page(), close).await;
                        }
                    }
                }
                Decision::Forward(inst) => inst,
            };
            let Some(e) = ex.as_mut() else {
                inst.release(false);
                return Next::Close;
            };
            at.made += 1;
            e.served = Some(inst.clone());
            let backend = e.backend.clone().expect("set with the route");
            let outcome = self
                .attempt(e, &backend, &inst, &mut scratch.0, at.fresh)
                .await;
            let e = ex.as_mut().expect("exchange");
            match outcome {
                Attempt::Relayed { completed, next } => {
                    inst.release(completed);
                    self.finish(e);
                    return next;
                }
                Attempt::ClientGone => {
                    inst.release(false);
                    self.finish(e);
                    return Next::Close;
                }
                Attempt::BadBody(r) => {
                    inst.release(false);
                    let page = ErrorPage::rejected(r.status, r.why);
                    return self.answer(ex, &page, true).await;
                }
                Attempt::Failed { failure, pooled } => {
                    inst.release(false);
                    let failed = policy::Failed {
                        failure,
                        pooled,
                        instance: inst.key,
                    };
                    let (idempotent, replayable) = (e.req.method.idempotent(), e.replayable);
                    if self
                        .engine
                        .policy
                        .retry(&mut at, &backend, failed, idempotent, replayable)
                    {
                        continue;
                    }
                    // The connection stays usable when the whole request was read.
                    let page = failure.page(&backend.worker);
                    return self.answer(ex, &page, false).await;
                }
            }
        }
    }

    /// Sends one of tqproxy's own pages for the current request; `close` closes the connection
    /// after it (with a linger: the client may still be sending).
    async fn answer(&mut self, ex: Option<Exchange>, page: &ErrorPage, close: bool) -> Next {
        let Some(mut e) = ex else {
            return Next::Close;
        };
        // Keep the connection only when the end of the request is known.
        let close = close
            || !self.keeps_alive(&e.req)
            || (e.body_end.is_none() && e.req.framing != Framing::None);
        let mut out = Scratch::take();
        let head_only = e.req.method == Method::Head;
        let id = {
            let buf = self.inbuf.as_ref().map_or(&[][..], |b| b.filled());
            e.request_id(buf).to_vec()
        };
        e.bytes = write_page(&mut out.0, page, Some(&id), close, head_only);
        e.status = page.status;
        let ok = self.send_head(&out.0).await;
        if !close {
            e.body_end.get_or_insert(e.req.head_len);
        }
        self.finish(&mut e);
        if !ok {
            Next::Close
        } else if close {
            Next::Linger
        } else {
            Next::KeepAlive
        }
    }

    async fn redirect(&mut self, ex: Option<Exchange>, status: u16, location: &str) -> Next {
        let fields = format!("Location: {location}\r\nCache-Control: max-age=3600\r\n");
        self.local_answer(ex, status, &fields, b"").await
    }

    /// The answer to an ACME http-01 validation request: the key authorization.
    async fn challenge(&mut self, ex: Option<Exchange>, body: &str) -> Next {
        let fields = "Content-Type: text/plain\r\nCache-Control: no-store\r\n";
        self.local_answer(ex, 200, fields, body.as_bytes()).await
    }

    /// A small answer of tqproxy's own (a redirect, a challenge): `status`, the header `fields`
    /// (each ending in CRLF) and `body` (not sent to HEAD), keeping the connection when the
    /// request allows it and its body was read.
    async fn local_answer(
        &mut self,
        ex: Option<Exchange>,
        status: u16,
        fields: &str,
        body: &[u8],
    ) -> Next {
        let Some(mut e) = ex else {
            return Next::Close;
        };
        let close =
            !self.keeps_alive(&e.req) || (e.body_end.is_none() && e.req.framing != Framing::None);
        let mut out = Scratch::take();
        let _ = write!(
            out.0,
            "HTTP/1.1 {status} {}\r\n{fields}Content-Length: {}\r\n{}\r\n",
            policy::reason(status),
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if e.req.method != Method::Head {
            out.0.extend_from_slice(body);
            e.bytes = body.len() as u64;
        }
        e.status = status;
        let ok = self.send_head(&out.0).await;
        if !close {
            e.body_end.get_or_insert(e.req.head_len);
        }
        self.finish(&mut e);
        match (ok, close) {
            (false, _) => Next::Close,
            (true, true) => Next::Linger,
            (true, false) => Next::KeepAlive,
        }
    }

    /// Writes bytes tqproxy made up to the client, within the body timeout.
    async fn send_head(&mut self, bytes: &[u8]) -> bool {
        let deadline = self.settings().body_timeout;
        let Conn { io, timer, .. } = self;
        matches!(
            within(timer, deadline, async {
                io.write_all(bytes).await?;
                io.flush().await
            })
            .await,
            Some(Ok(()))
        )
    }

    /// Whether the client connection may carry another request after this one, as far as the
    /// client and tqproxy's own state are concerned.
    fn keeps_alive(&self, req: &Request) -> bool {
        req.keep_alive && !self.over_limit && !policy::closing() && !*self.shutdown.borrow()
    }

    /// The request is done: metrics, access log, and the client buffer moved past it.
    fn finish(&mut self, e: &mut Exchange) {
        let end = *e.ended.get_or_insert_with(Instant::now);
        self.last_end = Some(end);
        let buf = self.inbuf.as_ref().map_or(&[][..], |b| b.filled());
        let elapsed = end.saturating_duration_since(e.started);
        let client = self.client_ip;
        self.engine.policy.record(
            e.backend.as_deref(),
            e.served.as_deref(),
            e.status,
            elapsed,
            || {
                let r = &e.req;
                let opt =
                    |s: Option<parse::Span>| s.and_then(|s| std::str::from_utf8(s.get(buf)).ok());
                Record {
                    client,
                    method: r.method_span.str(buf),
                    target: r.target.str(buf),
                    version: if r.http10 { "HTTP/1.0" } else { "HTTP/1.1" },
                    host: opt(r.host_span()),
                    status: e.status,
                    bytes: e.bytes,
                    elapsed,
                    worker: e.backend.as_ref().map(|b| &*b.worker),
                    served_by: e.served.as_ref().map(|i| (i.id, i.addr.port())),
                    referer: opt(r.referer),
                    user_agent: opt(r.user_agent),
                    request_id: std::str::from_utf8(e.request_id(buf)).ok(),
                }
            },
        );
        if let Some(buf) = self.inbuf.as_mut() {
            match e.body_end {
                Some(end) => buf.consume(end),
                None => buf.clear(),
            }
        }
    }

    /// One attempt: an upstream connection, the request, the response relayed. The upstream
    /// head is in `scratch` (kept for a retry until a response starts).
    async fn attempt(
        &mut self,
        e: &mut Exchange,
        backend: &Backend,
        inst: &Arc<Instance>,
        scratch: &mut Vec<u8>,
        fresh: bool,
    ) -> Attempt {
        let settings = &backend.settings;
        let (mut up, pooled) =
            match upstream_for(&mut self.timer, backend, inst, fresh, e.started).await {
                Ok(u) => u,
                Err(failure) => {
                    return Attempt::Failed {
                        failure,
                        pooled: false,
                    };
                }
            };
        let Some(inbuf) = self.inbuf.as_mut() else {
            return Attempt::ClientGone;
        };
        let head_len = e.req.head_len;
        let limit = settings.max_body_size;
        let too_large = Reject {
            status: 413,
            why: TOO_LARGE,
        };
        // What of the body is here already, and whether that is all of it; or why the
        // request is refused before a byte of it goes to the worker.
        let framed = {
            let avail = &inbuf.filled()[head_len..];
            match e.req.framing {
                Framing::None | Framing::Close => Ok((0, BodyState::Done)),
                Framing::Length(n) if limit.is_some_and(|max| n > max) => Err(too_large),
                Framing::Length(n) => {
                    let k = (n.min(avail.len() as u64)) as usize;
                    if k as u64 == n {
                        Ok((k, BodyState::Done))
                    } else {
                        Ok((k, BodyState::Length(n - k as u64)))
                    }
                }
                Framing::Chunked => {
                    let mut c = Chunked::new();
                    let mut data = 0u64;
                    let fed = c.feed(avail, |a, b| data += (b - a) as u64);
                    e.chunked_data = data;
                    match fed {
                        _ if limit.is_some_and(|max| data > max) => Err(too_large),
                        Ok(p) if p.done => Ok((p.consumed, BodyState::Done)),
                        Ok(p) => Ok((p.consumed, BodyState::Chunked(c))),
                        Err(err) => Err(Reject {
                            status: 400,
                            why: err.as_str(),
                        }),
                    }
                }
            }
        };
        let (send_now, body_state) = match framed {
            Ok(f) => f,
            Err(reject) => {
                // Nothing was sent yet: the connection to the worker stays good.
                pool::checkin(
                    inst,
                    up,
                    self.engine.settings.pool_capacity,
                    settings.idle_timeout,
                    &self.engine.policy.routes,
                    e.started,
                );
                return Attempt::BadBody(reject);
            }
        };
        if body_state.is_done() {
            e.body_end = Some(head_len + send_now);
            e.replayable = true;
        }
        // Send upstream after the runtime polled the other connections that are ready: their
        // requests reach the worker together, as HAProxy flushes at the end of its loop, so
        // the worker wakes once per burst instead of once per request. Measured (bench ka32,
        // 4 rounds): 1.07x req/s and 0.96x CPU per request; the worker's context switches
        // per request were 2.5x HAProxy's without it. The same for the client's side (waking
        // the client later) measured worse: 0.97x.
        tokio::task::yield_now().await;
        let first = (&scratch[..], &inbuf.filled()[head_len..head_len + send_now]);
        if let Err(failure) = send_request(
            &mut self.timer,
            &mut up,
            first,
            settings.read_timeout,
            pooled,
        )
        .await
        {
            return Attempt::Failed { failure, pooled };
        }
        let mut upbuf = Buf::take(UPSTREAM);
        let mut body_state = body_state;
        if !body_state.is_done() {
            match self
                .upload(
                    e,
                    backend,
                    &mut up,
                    &mut upbuf,
                    body_state,
                    head_len + send_now,
                )
                .await
            {
                Ok(state) => body_state = state,
                Err(a) => return a,
            }
        }
        let body_done = body_state.is_done();
        self.relay_response(e, backend, inst, up, upbuf, scratch, body_done, pooled)
            .await
    }

    /// Streams the rest of a request body to the worker, watching the worker meanwhile: an
    /// interim response (`100 Continue`) is forwarded to the client, a final one stops the
    /// upload (the connection is closed after it). Returns `Done`, or the state the upload
    /// stopped in when the worker answered early.
    async fn upload(
        &mut self,
        e: &mut Exchange,
        backend: &Backend,
        up: &mut Upstream,
        upbuf: &mut Buf,
        mut state: BodyState,
        mut pos: usize,
    ) -> Result<BodyState, Attempt> {
        let head_len = e.req.head_len;
        let body_timeout = self.settings().body_timeout;
        let read_timeout = backend.settings.read_timeout;
        loop {
            let Conn {
                io, timer, inbuf, ..
            } = self;
            let Some(buf) = inbuf.as_mut() else {
                return Err(Attempt::ClientGone);
            };
            // Send what arrived and was not sent yet (`pos..end`).
            if pos < buf.end {
                let avail = &buf.filled()[pos..];
                let (send, done) = match &mut state {
                    BodyState::Length(left) => {
                        let k = (*left).min(avail.len() as u64) as usize;
                        *left -= k as u64;
                        (k, *left == 0)
                    }
                    BodyState::Chunked(c) => {
                        let mut data = 0u64;
                        let fed = c.feed(avail, |a, b| data += (b - a) as u64);
                        e.chunked_data += data;
                        if backend
                            .settings
                            .max_body_size
                            .is_some_and(|max| e.chunked_data > max)
                        {
                            // Cut here: the worker's connection (a partial body) goes.
                            return Err(Attempt::BadBody(Reject {
                                status: 413,
                                why: TOO_LARGE,
                            }));
                        }
                        match fed {
                            Ok(p) => (p.consumed, p.done),
                            Err(err) => {
                                return Err(Attempt::BadBody(Reject {
                                    status: 400,
                                    why: err.as_str(),
                                }));
                            }
                        }
                    }
                    BodyState::Done => (0, true),
                };
                backend.shared.ingress.take(send).await;
                let wrote = within(timer, read_timeout, up.write_all(&avail[..send])).await;
                if !matches!(wrote, Some(Ok(()))) {
                    // The worker stopped reading: it may have answered already.
                    return Ok(state);
                }
                pos += send;
                if done {
                    e.body_end = Some(pos);
                    return Ok(BodyState::Done);
                }
            }
            // All sent: reuse the room after the head for what comes next.
            buf.end = head_len;
            pos = head_len;
            let deadline = body_timeout;
            let event = within(timer, deadline, async {
                tokio::select! {
                    biased;
                    r = up.readable() => Err(r),
                    r = read_into(io, buf) => Ok(r),
                }
            })
            .await;
            match event {
                None => {
                    return Err(Attempt::BadBody(Reject {
                        status: 408,
                        why: "request body not received in time",
                    }));
                }
                Some(Ok(Ok(0)) | Ok(Err(_))) => return Err(Attempt::ClientGone),
                Some(Ok(Ok(_))) => {}
                Some(Err(_)) => {
                    // The worker has something to say (readiness may be stale: try).
                    match up.try_read(upbuf.spare()) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                        Ok(0) | Err(_) => {
                            return Err(Attempt::Failed {
                                failure: Failure::DiedBeforeResponse,
                                pooled: false,
                            });
                        }
                        Ok(n) => upbuf.filled_by(n),
                    }
                    match self.interim_or_final(e, up, upbuf, read_timeout).await {
                        Ok(true) => {}
                        Ok(false) => return Ok(state),
                        Err(a) => return Err(a),
                    }
                }
            }
        }
    }

    /// A response head started arriving during an upload: reads it whole. An interim one is
    /// forwarded to the client and consumed (`Ok(true)`: go on uploading); a final one stays in
    /// `upbuf` for [`Self::relay_response`] (`Ok(false)`).
    async fn interim_or_final(
        &mut self,
        e: &Exchange,
        up: &mut Upstream,
        upbuf: &mut Buf,
        read_timeout: Duration,
    ) -> Result<bool, Attempt> {
        loop {
            let mut out = Scratch::take();
            let parsed = {
                let mut slots = parse::slots();
                match parse::parse_response(upbuf.filled(), &mut slots, false) {
                    Ok(Some((r, headers))) if r.interim() && r.status != 101 => {
                        parse::write_response(
                            &mut out.0,
                            upbuf.filled(),
                            &r,
                            headers,
                            &parse::ResponseEdits {
                                request_id: b"",
                                close: false,
                                keep_alive_http10: false,
                                dechunk: false,
                            },
                        );
                        Ok(Some(r.head_len))
                    }
                    Ok(Some(_)) => return Ok(false),
                    Ok(None) => Ok(None),
                    Err(_) => Err(()),
                }
            };
            match parsed {
                Ok(Some(len)) => {
                    upbuf.consume(len);
                    if !e.req.http10 && !self.send_head(&out.0).await {
                        return Err(Attempt::ClientGone);
                    }
                    if upbuf.is_empty() {
                        return Ok(true);
                    }
                }
                Ok(None) => {
                    let deadline = read_timeout;
                    match within(&mut self.timer, deadline, read_into(up, upbuf)).await {
                        Some(Ok(0)) | Some(Err(_)) => {
                            return Err(Attempt::Failed {
                                failure: Failure::BadResponse,
                                pooled: false,
                            });
                        }
                        Some(Ok(_)) => {}
                        None => {
                            return Err(Attempt::Failed {
                                failure: Failure::Timeout,
                                pooled: false,
                            });
                        }
                    }
                }
                // Malformed: left for relay_response, which answers 502.
                Err(()) => return Ok(false),
            }
        }
    }

    /// Reads the response head, relays it and the body to the client, and gives the upstream
    /// connection back to the pool when it can carry another request.
    #[allow(clippy::too_many_arguments)]
    async fn relay_response(
        &mut self,
        e: &mut Exchange,
        backend: &Backend,
        inst: &Arc<Instance>,
        mut up: Upstream,
        mut upbuf: Buf,
        scratch: &mut Vec<u8>,
        body_done: bool,
        pooled: bool,
    ) -> Attempt {
        let read_timeout = backend.settings.read_timeout;
        let head_request = e.req.method == Method::Head;
        let mut got_any = !upbuf.is_empty();
        // The response head is due `read_timeout` after the request went out: from the
        // request's start (already read off the clock) unless its body was streamed.
        let head_deadline: Deadline = if e.replayable {
            (e.started + read_timeout).into()
        } else {
            read_timeout.into()
        };
        // The response head (interim responses forwarded and skipped).
        let (resp, framing) = loop {
            let decided = {
                let mut slots = parse::slots();
                match parse::parse_response(upbuf.filled(), &mut slots, head_request) {
                    Ok(None) => None,
                    Err(why) => {
                        tracing::warn!(worker = %backend.worker, instance = inst.id, why, "malformed response");
                        return Attempt::Failed {
                            failure: Failure::BadResponse,
                            pooled: false,
                        };
                    }
                    Ok(Some((r, headers))) => {
                        scratch.clear();
                        if r.status == 101 && !e.req.upgrade {
                            return Attempt::Failed {
                                failure: Failure::BadResponse,
                                pooled: false,
                            };
                        }
                        if r.interim() && r.status != 101 {
                            parse::write_response(
                                scratch,
                                upbuf.filled(),
                                &r,
                                headers,
                                &parse::ResponseEdits {
                                    request_id: b"",
                                    close: false,
                                    keep_alive_http10: false,
                                    dechunk: false,
                                },
                            );
                            Some((r, None))
                        } else {
                            let buf = self.inbuf.as_ref().map_or(&[][..], |b| b.filled());
                            let dechunk = e.req.http10 && r.framing == Framing::Chunked;
                            let close = !self.keeps_alive(&e.req)
                                || !body_done
                                || r.framing == Framing::Close
                                || dechunk;
                            parse::write_response(
                                scratch,
                                upbuf.filled(),
                                &r,
                                headers,
                                &parse::ResponseEdits {
                                    request_id: e.request_id(buf),
                                    close: close && r.status != 101,
                                    keep_alive_http10: e.req.http10 && !close,
                                    dechunk,
                                },
                            );
                            let framing = r.framing;
                            Some((r, Some((framing, close, dechunk))))
                        }
                    }
                }
            };
            match decided {
                Some((r, None)) => {
                    // An interim response: forward (HTTP/1.1 clients only) and read on.
                    upbuf.consume(r.head_len);
                    if !e.req.http10 && !self.send_head(scratch).await {
                        return Attempt::ClientGone;
                    }
                    continue;
                }
                Some((r, Some(f))) => break (r, f),
                None => {}
            }
            match within(
                &mut self.timer,
                head_deadline,
                read_into(&mut up, &mut upbuf),
            )
            .await
            {
                Some(Ok(0)) | Some(Err(_)) => {
                    let failure = Failure::before_head(got_any, pooled);
                    return Attempt::Failed { failure, pooled };
                }
                Some(Ok(_)) => got_any = true,
                None => {
                    return Attempt::Failed {
                        failure: Failure::Timeout,
                        pooled,
                    };
                }
            }
        };
        let (framing, close, dechunk) = framing;
        e.status = resp.status;
        upbuf.consume(resp.head_len);
        if resp.status == 101 {
            // Boxed: the tunnel's state would otherwise be part of every connection's future
            // (368 bytes each, idle or not), for the few that upgrade.
            return Box::pin(self.tunnel(e, up, upbuf, scratch, read_timeout, backend)).await;
        }
        let body_timeout = self.settings().body_timeout;
        let Conn { io, timer, .. } = self;
        // The head, with the body bytes that came with it, then the rest as it arrives.
        let mut relay = Relay::new(framing);
        let mut plain = dechunk.then(Scratch::take);
        let mut head: &[u8] = scratch;
        let mut complete = framing == Framing::None;
        let mut upstream_ok = true;
        // How the worker broke off a response already started, if it did: the client got a
        // truncated answer, counted as an upstream error besides its status.
        let mut cut = None;
        loop {
            let avail = upbuf.filled();
            if let Some(p) = plain.as_mut() {
                p.0.clear();
                p.0.extend_from_slice(head);
            }
            let (send, done) = match relay.take(avail, plain.as_mut().map(|p| &mut p.0), None) {
                Ok(v) => v,
                Err(why) => {
                    tracing::warn!(worker = %backend.worker, instance = inst.id, why, "malformed response body");
                    cut = Some(UpstreamErrorKind::Other);
                    upstream_ok = false;
                    break;
                }
            };
            let (a, b): (&[u8], &[u8]) = match plain.as_ref() {
                Some(p) => (&p.0, b""),
                None => (head, &avail[..send]),
            };
            let body_bytes = (a.len() + b.len() - head.len()) as u64;
            backend.shared.egress.take(body_bytes as usize).await;
            let wrote = within(timer, body_timeout, write_two(io, a, b)).await;
            if !matches!(wrote, Some(Ok(()))) {
                // The client went away; the upstream connection is in an unknown state.
                return Attempt::ClientGone;
            }
            e.bytes += body_bytes;
            head = b"";
            upbuf.consume(send);
            if done {
                complete = true;
                break;
            }
            if !upbuf.is_empty() {
                continue;
            }
            let deadline = read_timeout;
            match within(timer, deadline, read_into(&mut up, &mut upbuf)).await {
                Some(Ok(0)) => {
                    complete = framing == Framing::Close;
                    if !complete {
                        cut = Some(UpstreamErrorKind::Closed);
                    }
                    upstream_ok = false;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    cut = Some(UpstreamErrorKind::Reset);
                    upstream_ok = false;
                    break;
                }
                None => {
                    cut = Some(UpstreamErrorKind::Timeout);
                    upstream_ok = false;
                    break;
                }
            }
        }
        if !head.is_empty() {
            // The head never went out (a malformed body start): nothing reached the client.
            return Attempt::Failed {
                failure: Failure::BadResponse,
                pooled: false,
            };
        }
        let _ = within(timer, body_timeout, io.flush()).await;
        if let Some(kind) = cut {
            backend.shared.metrics.upstream_error(kind);
        }
        let now = Instant::now();
        e.ended = Some(now);
        if complete && upstream_ok && resp.reusable && body_done && upbuf.is_empty() {
            pool::checkin(
                inst,
                up,
                self.engine.settings.pool_capacity,
                backend.settings.idle_timeout,
                &self.engine.policy.routes,
                now,
            );
        }
        Attempt::Relayed {
            completed: complete,
            next: if complete && !close {
                Next::KeepAlive
            } else if !body_done {
                Next::Linger
            } else {
                Next::Close
            },
        }
    }

    /// After a 101: the head goes to the client, then bytes are copied both ways until both
    /// sides closed, or nothing moved for `idle` (the worker's `read_timeout`).
    async fn tunnel(
        &mut self,
        e: &mut Exchange,
        mut up: Upstream,
        mut upbuf: Buf,
        head: &[u8],
        idle: Duration,
        backend: &Backend,
    ) -> Attempt {
        let Conn {
            io, timer, inbuf, ..
        } = self;
        let mut cbuf = inbuf.take().unwrap_or_else(|| Buf::take(CLIENT));
        // What the client sent after its request already belongs to the new protocol.
        let after = e.body_end.unwrap_or(e.req.head_len).min(cbuf.len());
        cbuf.consume(after);
        let first = within(timer, idle, async {
            write_two(io, head, upbuf.filled()).await?;
            io.flush().await?;
            up.write_all(cbuf.filled()).await
        })
        .await;
        if !matches!(first, Some(Ok(()))) {
            return Attempt::Relayed {
                completed: false,
                next: Next::Close,
            };
        }
        cbuf.clear();
        upbuf.clear();
        let (mut client_open, mut upstream_open) = (true, true);
        while client_open || upstream_open {
            let event = within(timer, idle, async {
                tokio::select! {
                    r = io.read(cbuf.spare()), if client_open => (true, r),
                    r = up.read(upbuf.spare()), if upstream_open => (false, r),
                }
            })
            .await;
            let ok = match event {
                None => break,
                Some((true, Ok(n))) if n > 0 => {
                    backend.shared.ingress.take(n).await;
                    up.write_all(&cbuf.spare()[..n]).await.is_ok()
                }
                Some((true, _)) => {
                    client_open = false;
                    let _ = up.shutdown().await;
                    true
                }
                Some((false, Ok(n))) if n > 0 => {
                    backend.shared.egress.take(n).await;
                    let r = io.write_all(&upbuf.spare()[..n]).await;
                    r.is_ok() && io.flush().await.is_ok()
                }
                Some((false, _)) => {
                    upstream_open = false;
                    let _ = io.shutdown().await;
                    true
                }
            };
            if !ok {
                break;
            }
        }
        e.body_end = None;
        Attempt::Relayed {
            completed: true,
            next: Next::Close,
        }
    }
}

/// The rest of a request body still to send.
#[derive(Debug)]
enum BodyState {
    Done,
    Length(u64),
    Chunked(Chunked),
}

impl BodyState {
    fn is_done(&self) -> bool {
        matches!(self, BodyState::Done)
    }
}

/// A response body on its way to the client.
pub(crate) struct Relay {
    framing: Framing,
    /// Bytes left of a Content-Length body.
    left: u64,
    chunked: Chunked,
}

impl Relay {
    pub(crate) fn new(framing: Framing) -> Relay {
        Relay {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: Chunked::new(),
        }
    }

    /// How many of `avail` belong to the body, and whether the body ends there. With `data`
    /// (de-chunking for an HTTP/1.0 or HTTP/2 client), the chunk data is appended to it, and
    /// with `trailers` the trailer section's bytes (HTTP/2 sends them as trailers).
    pub(crate) fn take(
        &mut self,
        avail: &[u8],
        data: Option<&mut Vec<u8>>,
        trailers: Option<&mut Vec<u8>>,
    ) -> Result<(usize, bool), &'static str> {
        match self.framing {
            Framing::None => Ok((0, true)),
            Framing::Close => Ok((avail.len(), false)),
            Framing::Length(_) => {
                let k = self.left.min(avail.len() as u64) as usize;
                self.left -= k as u64;
                Ok((k, self.left == 0))
            }
            Framing::Chunked => {
                let p = match (data, trailers) {
                    (Some(out), Some(t)) => self.chunked.feed_with_trailers(
                        avail,
                        |a, b| out.extend_from_slice(&avail[a..b]),
                        |b| t.push(b),
                    ),
                    (Some(out), None) => self
                        .chunked
                        .feed(avail, |a, b| out.extend_from_slice(&avail[a..b])),
                    (None, _) => self.chunked.feed(avail, |_, _| {}),
                };
                p.map(|p| (p.consumed, p.done)).map_err(|e| e.as_str())
            }
        }
    }
}

/// A client address formatted once (an IPv6 address is at most 45 bytes).
pub(crate) struct ClientText {
    buf: [u8; 46],
    len: u8,
}

impl ClientText {
    pub(crate) fn new(ip: Option<IpAddr>) -> ClientText {
        let mut t = ClientText {
            buf: [0; 46],
            len: 0,
        };
        if let Some(ip) = ip {
            let mut cur = io::Cursor::new(&mut t.buf[..]);
            if write!(cur, "{ip}").is_ok() {
                t.len = cur.position() as u8;
            }
        }
        t
    }

    pub(crate) fn get(&self) -> Option<&[u8]> {
        (self.len > 0).then(|| &self.buf[..self.len as usize])
    }
}

/// Writes one of tqproxy's pages as an HTTP/1.1 response; returns the body length.
fn write_page(
    out: &mut Vec<u8>,
    page: &ErrorPage,
    request_id: Option<&[u8]>,
    close: bool,
    head_only: bool,
) -> u64 {
    let body = page.body();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        page.status,
        policy::reason(page.status),
        body.len()
    );
    if let Some(s) = page.retry_after {
        let _ = write!(out, "Retry-After: {s}\r\n");
    }
    if let Some(id) = request_id.filter(|i| !i.is_empty()) {
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if head_only {
        0
    } else {
        out.extend_from_slice(body.as_bytes());
        body.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task holds its `serve` future for its whole life, idle or not, sized
    /// for its largest state: what an idle keep-alive connection costs beyond the socket.
    /// (The target is ≤ 4 KB per idle connection in all; `load-tests/idle-conns` measures it.)
    #[test]
    fn a_connections_state_stays_small() {
        let policy = Arc::new(Policy::new(
            crate::routes::RouteHandle::new(),
            None,
            Default::default(),
            3,
        ));
        let settings = Settings {
            header_timeout: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            max_connections: None,
            h2c: false,
            pool_capacity: 1,
        };
        let h2 = Arc::new(H2::new(
            policy.clone(),
            settings.clone(),
            crate::proxy::h2::Settings {
                max_concurrent_streams: 128,
                max_header_list_size: 65536,
                limits: Default::default(),
            },
        ));
        let engine = Engine::new(policy, settings, h2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(s));
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let engine = Arc::new(engine);
            let conn = Conn::new(engine.clone(), stream, rx.clone(), false);
            assert!(conn.inbuf.is_none(), "no buffer before the first byte");
            let fut = conn.serve();
            let size = std::mem::size_of_val(&fut);
            eprintln!("serve future: {size} bytes");
            assert!(size <= 1024, "a connection's future grew to {size} bytes");
            drop(fut);
            // The task as spawned: HTTP/2's much larger future must not size it.
            let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(s));
            let task = connection(engine, stream, rx, false);
            let size = std::mem::size_of_val(&task);
            eprintln!("connection task: {size} bytes");
            assert!(
                size <= 1024 + 128,
                "a connection's task grew to {size} bytes"
            );
        });
    }
}
