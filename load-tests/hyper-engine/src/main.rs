//! `hyper-engine LISTEN UPSTREAM [THREADS]`: the "Hyper first" experiment. A pingora `ServerApp`
//! that serves each client connection with hyper 1.x's HTTP/1 server connection and forwards
//! every request to one fixed UPSTREAM over hyper client connections (`client::conn::http1`)
//! kept in a thread-local LIFO pool, making tqproxy's per-request header edits. Same CLI as
//! load-tests/bare-pingora, so `load-tests/bench --pingora hyper=PATH` can start it.
//!
//! pingora with `work_stealing: false` runs one current-thread runtime per thread, so a pooled
//! upstream connection (and its spawned connection task) stays on the thread that made it.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle upstream connections kept per thread (bare-pingora runs with a pool of 128).
const POOL_MAX: usize = 128;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

type Sender = SendRequest<Incoming>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

thread_local! {
    /// Idle upstream connections of this thread, most recently used last (LIFO).
    static POOL: RefCell<Vec<Sender>> = const { RefCell::new(Vec::new()) };
}

fn pool_put(sender: Sender) {
    if sender.is_closed() {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(sender);
        }
    });
}

fn pool_take() -> Option<Sender> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        while let Some(s) = p.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    })
}

/// A pooled connection that is ready for a request, or a new one.
async fn checkout(upstream: SocketAddr) -> Result<Sender, BoxError> {
    while let Some(mut s) = pool_take() {
        // Ready once the previous exchange has completed; an error means the connection died.
        if s.ready().await.is_ok() {
            return Ok(s);
        }
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await??;
    tcp.set_nodelay(true)?;
    let (sender, conn) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
    )
    .await??;
    // The connection task: one per upstream connection, on this thread's runtime.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The upstream response body, passed through frame by frame; once it has been read to its end
/// the upstream connection goes back to the pool. Also the (empty) body of a 502.
struct ProxyBody {
    inner: Option<Incoming>,
    sender: Option<Sender>,
}

impl ProxyBody {
    fn empty() -> Self {
        ProxyBody { inner: None, sender: None }
    }
    fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            pool_put(s);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(&mut *inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.sender = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body with nothing left (no body, or the server stopped polling after the last frame)
        // leaves the connection reusable; a body dropped half-read closes it.
        if self.is_end_stream() {
            self.release();
        }
    }
}

/// 16 hex digits, unique per process: splitmix64 of a per-process seed plus a counter.
fn new_request_id() -> HeaderValue {
    static SEED: LazyLock<u64> = LazyLock::new(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ ((std::process::id() as u64) << 32)
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
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

/// Hop-by-hop headers; hyper does the framing (Content-Length / chunked) itself.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    h.remove(header::CONNECTION);
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TE);
    h.remove(header::UPGRADE);
    h.remove(header::TRANSFER_ENCODING);
}

async fn proxy(
    upstream: SocketAddr,
    client_ip: HeaderValue,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let id = new_request_id();
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    let xff = match h.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or(client_ip)
        }
        None => client_ip,
    };
    h.insert(X_FORWARDED_FOR.clone(), xff);
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert(X_FORWARDED_HOST.clone(), host);
    }
    h.insert(X_REQUEST_ID.clone(), id.clone());

    let exchange = async {
        let mut sender = checkout(upstream).await?;
        let resp = sender.send_request(req).await?;
        Ok::<_, BoxError>((resp, sender))
    };
    let mut resp = match tokio::time::timeout(READ_TIMEOUT, exchange).await {
        Ok(Ok((resp, sender))) => resp.map(|body| ProxyBody { inner: Some(body), sender: Some(sender) }),
        _ => {
            let mut r = Response::new(ProxyBody::empty());
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        }
    };
    let h = resp.headers_mut();
    strip_hop_by_hop(h);
    h.insert(X_REQUEST_ID.clone(), id);
    Ok(resp)
}

struct App {
    upstream: SocketAddr,
}

#[async_trait]
impl ServerApp for App {
    async fn process_new(self: &Arc<Self>, stream: Stream, _shutdown: &ShutdownWatch) -> Option<Stream> {
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let ip = match ip {
            Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            Some(v4) => v4,
            None => IpAddr::from([0, 0, 0, 0]),
        };
        // Formatted once per client connection; each request clones it (a refcount).
        let client_ip = HeaderValue::from_str(&ip.to_string()).expect("an IP is a valid header value");
        let upstream = self.upstream;
        let svc = service_fn(move |req| proxy(upstream, client_ip.clone(), req));
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc)
            .await;
        None
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: hyper-engine LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    }
    let upstream: SocketAddr = args[2].parse().expect("UPSTREAM is ip:port");
    let threads = args.get(3).map_or(1, |t| t.parse().expect("THREADS is a number"));
    let conf = ServerConf {
        threads,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = Service::new("hyper".into(), App { upstream });
    service.add_tcp(&args[1]);
    server.add_service(service);
    server.run_forever();
}
