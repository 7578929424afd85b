//! The proxy's policy, written once: what both the HTTP/1.1 engine (`h1`) and the HTTP/2 engine
//! (`h2`) decide the same way.
//!
//! - Routing: host, then the longest path prefix on a segment boundary ([`RouteTable`](crate::routes::RouteTable));
//!   least-outstanding balancing among routed instances ([`Backend::pick`], which also reserves
//!   the in-flight slot drains wait for).
//! - Queueing: with no ready instance, a request waits up to the worker's `queue_timeout` for
//!   one ([`Policy::wait_for_instance`]), then gets 503 with `Retry-After`.
//! - Retries ([`Policy::retry`], [`retryable`]): a refused attempt (nothing reached the worker) goes to a sibling
//!   whatever the method; one whose instance died before answering is retried only when the
//!   method is idempotent; nothing is retried once the response started, or when the body can
//!   no longer be replayed.
//! - tqproxy's own error pages ([`ErrorPage`]), the https redirect, request ids, the client
//!   address for X-Forwarded-For, and the record of every request: metrics and the access log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access_log::{AccessLog, Record};
use crate::metrics::UpstreamErrorKind;
use crate::routes::{Backend, Instance, Route, RouteHandle};

/// Set when this process hands its listening sockets to a new tqproxy (`tqproxy upgrade`):
/// from then on every response asks the client to reconnect (`Connection: close`), so keep-alive
/// clients move to the new process instead of finding their connection closed under them.
pub static CLOSE_CONNECTIONS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether this process is handing its sockets to a new tqproxy (`tqproxy upgrade`): a new
/// HTTP/2 connection then gets GOAWAY before its first stream. A drained node serves that
/// stream first ([`closing`]).
pub fn handing_over() -> bool {
    CLOSE_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether responses ask clients to reconnect: during an upgrade's handover, and while the
/// node is drained (`tqproxy drain`, [`crate::drain`]).
pub fn closing() -> bool {
    CLOSE_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed) || crate::drain::drained()
}

/// What both engines share: the route table, the access log, the redirect listeners.
pub struct Policy {
    pub routes: Arc<RouteHandle>,
    pub access_log: Option<AccessLog>,
    /// Listener port → https port, for listeners that only redirect to https.
    redirects: HashMap<u16, u16>,
    /// Attempts per request, the first included (`proxy.max_retries`).
    pub max_attempts: usize,
    /// ACME http-01 answers, when a `tls.acme` block uses http-01: served on plain
    /// listeners before routing and before `redirect_https`.
    pub acme: Option<Arc<crate::acme::Challenges>>,
}

/// Why no instance could take a request.
#[derive(Debug)]
pub enum Unavailable {
    /// The route went away while the request waited.
    RouteGone,
    /// No routed instance became free within `queue_timeout`.
    NoInstance(Arc<str>),
}

impl Unavailable {
    pub fn page(&self) -> ErrorPage {
        match self {
            Unavailable::RouteGone => {
                ErrorPage::new(503, "Service Unavailable: route removed".into(), Some(1))
            }
            Unavailable::NoInstance(w) => ErrorPage::no_instance(w),
        }
    }
}

impl Policy {
    pub fn new(
        routes: Arc<RouteHandle>,
        access_log: Option<AccessLog>,
        redirects: HashMap<u16, u16>,
        max_attempts: usize,
    ) -> Policy {
        Policy {
            routes,
            access_log,
            redirects,
            max_attempts: max_attempts.max(1),
            acme: None,
        }
    }

    /// The https port when `local_port` is a redirect-only listener.
    pub fn redirect_port(&self, local_port: u16) -> Option<u16> {
        if self.redirects.is_empty() {
            return None;
        }
        self.redirects.get(&local_port).copied()
    }

    /// The slow path of picking an instance: wait (up to the worker's `queue_timeout`) for a
    /// routed instance that has not failed this request yet, re-resolving the route against
    /// every new table (its instances, or the route itself, may change meanwhile).
    pub async fn wait_for_instance(
        &self,
        host: Option<&str>,
        path: &str,
        tried: &[u64],
    ) -> Result<(Route, Arc<Instance>), Unavailable> {
        let waited_from = Instant::now();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let changed = self.routes.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let table = self.routes.load();
            let Some(route) = table.lookup(host, path) else {
                return Err(Unavailable::RouteGone);
            };
            let route = route.clone();
            let backend = route.backend.clone();
            drop(table);
            let deadline = *deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + backend.settings.queue_timeout
            });
            if let Some(inst) = backend.pick(tried) {
                if !tried.is_empty() || waited_from.elapsed() > Duration::from_millis(1) {
                    backend
                        .shared
                        .metrics
                        .queue_wait
                        .observe(waited_from.elapsed().as_secs_f64());
                }
                return Ok((route, inst));
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    backend.shared.metrics.queue_wait.observe(waited_from.elapsed().as_secs_f64());
                    return Err(Unavailable::NoInstance(backend.worker.clone()));
                }
            }
        }
    }

    /// Records one finished request: the worker's metrics and the answering instance's
    /// figures (when a worker was involved and an answer was sent) and, when there is an
    /// access log, the line `line` builds.
    pub fn record<'a>(
        &self,
        backend: Option<&Backend>,
        served: Option<&Instance>,
        status: u16,
        elapsed: Duration,
        line: impl FnOnce() -> Record<'a>,
    ) {
        if let Some(b) = backend
            && status > 0
        {
            b.shared.metrics.record(status, elapsed.as_secs_f64());
            if let Some(i) = served {
                i.answered.record(status, elapsed);
            }
        }
        if let Some(log) = &self.access_log {
            log.log(&line());
        }
    }
}

/// How one attempt to an instance failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing reached the worker: connection refused or failed, or a pooled connection the
    /// worker had already closed.
    Refused,
    /// The instance closed or reset the connection after the request was sent, before any
    /// byte of a response.
    DiedBeforeResponse,
    /// No response within `read_timeout` (the request may be running: never retried).
    Timeout,
    /// The response was malformed, or the connection broke inside its head.
    BadResponse,
}

impl Failure {
    /// Sending the request failed: on a pooled connection the worker had closed it (nothing
    /// reached it), on a new one the instance died.
    pub fn on_send(pooled: bool) -> Failure {
        if pooled {
            Failure::Refused
        } else {
            Failure::DiedBeforeResponse
        }
    }

    /// The connection ended (or broke) before a complete response head: inside one that had
    /// started (`got_any`), else as [`Failure::on_send`].
    pub fn before_head(got_any: bool, pooled: bool) -> Failure {
        if got_any {
            Failure::BadResponse
        } else {
            Failure::on_send(pooled)
        }
    }

    pub fn kind(self) -> UpstreamErrorKind {
        match self {
            Failure::Refused => UpstreamErrorKind::Connect,
            Failure::DiedBeforeResponse => UpstreamErrorKind::Closed,
            Failure::Timeout => UpstreamErrorKind::Timeout,
            Failure::BadResponse => UpstreamErrorKind::Other,
        }
    }

    pub fn page(self, worker: &str) -> ErrorPage {
        match self {
            Failure::Timeout => ErrorPage::new(
                504,
                format!("Gateway Timeout: worker `{worker}` did not answer in time"),
                None,
            ),
            _ => ErrorPage::new(
                502,
                format!("Bad Gateway: worker `{worker}` failed to answer"),
                None,
            ),
        }
    }
}

/// The attempts of one request so far.
#[derive(Debug, Default)]
pub struct Attempts {
    /// Attempts made, the current one included (the fresh-connection retry does not count).
    pub made: usize,
    /// The next attempt opens a new connection: the one retry after a stale pooled connection.
    pub fresh: bool,
    /// Instances that failed this request, by [`Instance::key`](crate::routes::Instance::key)
    /// (the next pick avoids them; their restarted processes are new keys).
    pub tried: Vec<u64>,
}

/// One failed attempt.
#[derive(Debug, Clone, Copy)]
pub struct Failed {
    pub failure: Failure,
    /// It was made on a connection taken from the pool.
    pub pooled: bool,
    /// The instance's [`key`](crate::routes::Instance::key).
    pub instance: u64,
}

impl Policy {
    /// Counts a failed attempt in the worker's metrics and decides whether the request is tried
    /// again (`true`, with `at` updated for the next attempt) or answered with the failure's page.
    /// A pooled connection the worker had closed is retried once on a fresh connection to any
    /// instance (the same one included) without counting an attempt; otherwise [`retryable`]
    /// decides, up to `proxy.max_retries` attempts.
    pub fn retry(
        &self,
        at: &mut Attempts,
        backend: &Backend,
        f: Failed,
        idempotent: bool,
        replayable: bool,
    ) -> bool {
        let stale = f.pooled && f.failure == Failure::Refused;
        let metrics = &backend.shared.metrics;
        metrics.upstream_error(if stale {
            UpstreamErrorKind::Closed
        } else {
            f.failure.kind()
        });
        if stale && replayable && !at.fresh {
            at.fresh = true;
            at.made -= 1;
            metrics.retries.inc();
            return true;
        }
        if at.made < self.max_attempts && retryable(f.failure, idempotent, replayable) {
            at.tried.push(f.instance);
            at.fresh = false;
            metrics.retries.inc();
            return true;
        }
        false
    }
}

/// The retry rule: refused → any method; died before the response → idempotent methods only;
/// a timeout or a bad response never. `replayable`: the whole request (body included) can
/// still be sent again.
pub fn retryable(failure: Failure, idempotent: bool, replayable: bool) -> bool {
    replayable
        && match failure {
            Failure::Refused => true,
            Failure::DiedBeforeResponse => idempotent,
            Failure::Timeout | Failure::BadResponse => false,
        }
}

/// One of tqproxy's own answers: short, plain text, naming tqproxy so nobody blames the app.
#[derive(Debug, Clone)]
pub struct ErrorPage {
    pub status: u16,
    pub message: String,
    pub retry_after: Option<u32>,
}

impl ErrorPage {
    pub fn new(status: u16, message: String, retry_after: Option<u32>) -> ErrorPage {
        ErrorPage {
            status,
            message,
            retry_after,
        }
    }

    pub fn no_route() -> ErrorPage {
        ErrorPage::new(
            404,
            "Not Found: no route for this host and path".into(),
            None,
        )
    }

    pub fn no_instance(worker: &str) -> ErrorPage {
        ErrorPage::new(
            503,
            format!("Service Unavailable: no ready instance of worker `{worker}`"),
            Some(1),
        )
    }

    pub fn too_many_connections() -> ErrorPage {
        ErrorPage::new(
            503,
            "Service Unavailable: too many connections".into(),
            Some(1),
        )
    }

    /// A refused request: the status with its standard reason and what was wrong.
    pub fn rejected(status: u16, why: &str) -> ErrorPage {
        ErrorPage::new(status, format!("{}: {why}", reason(status)), None)
    }

    /// `<status> <message> (tqproxy)\n`
    pub fn body(&self) -> String {
        format!("{} {} (tqproxy)\n", self.status, self.message)
    }
}

/// The standard reason phrase of the statuses tqproxy answers with.
pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// ACME http-01 challenges stay on plain HTTP (a worker may serve them): never redirected.
pub fn is_acme_challenge(path: &str) -> bool {
    path.starts_with("/.well-known/acme-challenge/")
}

/// The redirect of a request on a redirect-only listener: 301 for GET and HEAD, 308 (which
/// keeps the method) otherwise, to `https://host[:port]/path?query`; `None` when the request
/// has no usable host.
pub fn redirect(
    get_or_head: bool,
    host: Option<&str>,
    path_query: &str,
    port: u16,
) -> Option<(u16, String)> {
    let host = host?;
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
    let pq = if path_query.is_empty() {
        "/"
    } else {
        path_query
    };
    let location = if port == 443 {
        format!("https://{bare}{pq}")
    } else {
        format!("https://{bare}:{port}{pq}")
    };
    Some((if get_or_head { 301 } else { 308 }, location))
}

/// A request id: 16 hex digits, unique per process (a per-process random prefix plus a
/// counter, mixed), generated without locks.
pub fn new_request_id() -> [u8; 16] {
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
    buf
}

/// The client address as X-Forwarded-For and the access log show it (IPv4-mapped IPv6
/// addresses as IPv4).
pub fn client_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
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
            assert!(id.iter().all(|b| b.is_ascii_hexdigit()));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn the_retry_rule() {
        use Failure::*;
        assert!(retryable(Refused, false, true), "refused: any method");
        assert!(retryable(DiedBeforeResponse, true, true));
        assert!(
            !retryable(DiedBeforeResponse, false, true),
            "POST that may have run"
        );
        assert!(!retryable(Timeout, true, true));
        assert!(!retryable(BadResponse, true, true));
        assert!(
            !retryable(Refused, true, false),
            "a streamed body cannot be sent again"
        );
    }

    #[test]
    fn redirects_keep_path_and_drop_the_port() {
        assert_eq!(
            redirect(true, Some("a.test:8080"), "/x?y=1", 443),
            Some((301, "https://a.test/x?y=1".into()))
        );
        assert_eq!(
            redirect(false, Some("a.test"), "/form", 8443),
            Some((308, "https://a.test:8443/form".into()))
        );
        assert_eq!(
            redirect(true, Some("[::1]:80"), "", 443),
            Some((301, "https://[::1]/".into()))
        );
        assert_eq!(redirect(true, None, "/", 443), None);
        assert_eq!(redirect(true, Some("a b"), "/", 443), None);
    }

    #[test]
    fn client_addresses_are_shown_as_ipv4_when_mapped() {
        assert_eq!(
            client_ip("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip("::1".parse().unwrap()),
            "::1".parse::<IpAddr>().unwrap()
        );
    }
}
