//! The route table: where the proxy and the supervisor meet.
//!
//! The supervisor builds a new immutable [`RouteTable`] whenever the set of routed instances
//! changes and publishes it with one `ArcSwap::store`; the proxy loads it once per request.
//! Per-instance counters ([`Instance`]) are shared: the proxy counts in-flight and finished
//! requests, the supervisor reads them to drain and recycle. Pure data, no I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::metrics::WorkerMetrics;

/// One running instance as the proxy sees it. Shared by the supervisor (which owns the
/// process) and every route table that lists it.
#[derive(Debug)]
pub struct Instance {
    pub worker: Arc<str>,
    /// Unique in this process, never reused (ids and ports are reused across generations):
    /// what the proxy's per-thread upstream pool files idle connections under.
    pub key: u64,
    pub id: u64,
    pub generation: u64,
    pub addr: SocketAddr,
    /// With `transport: unix`, the socket the instance accepts on; the instance then has no
    /// port and `addr` is `127.0.0.1:0` (logged as `id:unix`).
    pub unix_path: Option<Arc<std::path::Path>>,
    /// Requests currently proxied to this instance (incremented before connecting,
    /// decremented when the request is logged). WebSockets count until they close.
    pub in_flight: AtomicU64,
    /// Requests finished (for `max_requests` recycling and status).
    pub requests: AtomicU64,
    /// Cleared by the supervisor *before* it unpublishes the instance and starts waiting for
    /// `in_flight` to reach 0. The proxy increments `in_flight` first and checks this flag
    /// second (both SeqCst), so one of the two always sees the other: a request never lands on
    /// an instance the supervisor has decided is drained.
    pub routed: AtomicBool,
    /// Woken when `in_flight` reaches 0 while the instance is unrouted (a drain's end).
    idle: Notify,
    /// What this instance answered: the figures a canary is judged by.
    pub answered: Answered,
}

/// Latency buckets: 4 per power of two of microseconds (each about 19 % wide), from 1 µs to
/// about 67 s.
const LATENCY_BUCKETS: usize = 27 * 4;

/// Requests an instance answered, errors among them (5xx, tqproxy's own 502/504 included),
/// and their latency: lock-free counters the request path adds to once per request.
#[derive(Debug)]
pub struct Answered {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for Answered {
    fn default() -> Answered {
        Answered {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A copy of [`Answered`] at one moment; two of them subtract to a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsweredSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub latency: Vec<u64>,
}

impl Default for AnsweredSnapshot {
    fn default() -> AnsweredSnapshot {
        AnsweredSnapshot {
            requests: 0,
            errors: 0,
            latency: vec![0; LATENCY_BUCKETS],
        }
    }
}

fn latency_bucket(d: Duration) -> usize {
    let us = d.as_micros().clamp(1, u64::MAX as u128) as u64;
    let log = 63 - us.leading_zeros() as usize;
    // The two bits below the leading one pick the quarter.
    let quarter = if log >= 2 {
        ((us >> (log - 2)) & 3) as usize
    } else {
        ((us << (2 - log)) & 3) as usize
    };
    (log * 4 + quarter).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of a bucket.
fn bucket_upper(i: usize) -> Duration {
    let (log, quarter) = (i / 4, (i % 4) as u64);
    let base = 1u64 << log;
    Duration::from_micros(base + base * (quarter + 1) / 4)
}

impl Answered {
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[latency_bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> AnsweredSnapshot {
        AnsweredSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

impl AnsweredSnapshot {
    pub fn add(&mut self, o: &AnsweredSnapshot) {
        self.requests += o.requests;
        self.errors += o.errors;
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            *a += b;
        }
    }

    /// What was answered since `earlier` (counters only grow; a missing earlier is zero).
    pub fn since(&self, earlier: &AnsweredSnapshot) -> AnsweredSnapshot {
        AnsweredSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .zip(&earlier.latency)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The `q` quantile (0..1) of the latencies, as the upper bound of its bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_upper(i));
            }
        }
        None
    }
}

impl Instance {
    pub fn new(worker: Arc<str>, id: u64, generation: u64, addr: SocketAddr) -> Instance {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        Instance {
            worker,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            id,
            generation,
            addr,
            unix_path: None,
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            routed: AtomicBool::new(false),
            idle: Notify::new(),
            answered: Answered::default(),
        }
    }

    /// Reserve a request slot; fails when the instance is being drained.
    pub fn try_acquire(&self) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.routed.load(Ordering::SeqCst) {
            true
        } else {
            self.put_back();
            false
        }
    }

    /// Release a slot taken by [`Self::try_acquire`]; `completed` counts it as a served request.
    pub fn release(&self, completed: bool) {
        if completed {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        self.put_back();
    }

    fn put_back(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && !self.routed.load(Ordering::SeqCst)
        {
            self.idle.notify_waiters();
        }
    }

    /// Resolves once the instance has no request in flight. Meant for an unrouted instance
    /// (the supervisor clears `routed` first): a notification, not a poll.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a release in between still wakes us.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// Per-worker settings the proxy needs, copied from the worker's config.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub queue_timeout: Duration,
    pub idle_timeout: Duration,
    /// The worker's `max_body_size`.
    pub max_body_size: Option<u64>,
}

/// A worker as one route table sees it: its routed instances and its settings.
#[derive(Debug)]
pub struct Backend {
    pub worker: Arc<str>,
    pub instances: Vec<Arc<Instance>>,
    pub settings: BackendSettings,
    /// Lives as long as the worker (not the table): balancing cursor and metrics.
    pub shared: Arc<WorkerShared>,
    /// During a canary deploy: the share of requests that goes to the new generation.
    pub split: Option<Split>,
}

/// A canary's share of a worker's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// The canary generation; every other routed instance is the baseline.
    pub generation: u64,
    /// Its share, in thousandths.
    pub permille: u32,
}

impl Split {
    /// Whether request number `n` goes to the canary: exactly `permille` of every thousand
    /// consecutive requests, spread evenly (no randomness to make a small sample lie).
    pub fn is_canary(self, n: u64) -> bool {
        let p = self.permille.min(1000) as u64;
        (n + 1) * p / 1000 > n * p / 1000
    }
}

/// Per-worker state that outlives route tables.
#[derive(Debug)]
pub struct WorkerShared {
    pub cursor: AtomicUsize,
    /// Counts requests for a canary split.
    pub split_cursor: AtomicU64,
    pub metrics: WorkerMetrics,
    /// `resources.bandwidth`: body bytes to the worker's instances and from them.
    pub ingress: Bucket,
    pub egress: Bucket,
}

/// A token bucket of bytes per second, shared by every connection of one worker. A
/// connection takes what it is about to send and, when that runs the bucket into debt, waits
/// until the debt is paid: only that connection waits, never another worker's. The burst is a
/// tenth of a second's worth (at least 64 KiB).
#[derive(Debug, Default)]
pub struct Bucket {
    /// Bytes per second; 0: unlimited (the request path then takes no lock).
    rate: AtomicU64,
    state: std::sync::Mutex<Option<(f64, tokio::time::Instant)>>,
}

impl Bucket {
    pub fn set_rate(&self, bytes_per_second: Option<u64>) {
        self.rate
            .store(bytes_per_second.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn is_limited(&self) -> bool {
        self.rate.load(Ordering::Relaxed) > 0
    }

    /// Takes `n` bytes; resolves when they may be sent.
    pub async fn take(&self, n: usize) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || n == 0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let burst = (rate as f64 / 10.0).max(65536.0);
            let (tokens, at) = st.get_or_insert((burst, now));
            let refill = now.saturating_duration_since(*at).as_secs_f64() * rate as f64;
            *tokens = (*tokens + refill).min(burst) - n as f64;
            *at = now;
            (*tokens < 0.0).then(|| Duration::from_secs_f64(-*tokens / rate as f64))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

impl Backend {
    /// Least outstanding requests among the routed instances, skipping the `exclude`d ones (by
    /// [`Instance::key`]: an instance restarted in place keeps its id but is a new process that
    /// has failed nothing yet); ties go
    /// round-robin. During a canary, the request first goes to its share's generation (least
    /// outstanding within it), and to the other one when that has no instance to offer.
    /// Reserves the slot on the chosen instance.
    pub fn pick(&self, exclude: &[u64]) -> Option<Arc<Instance>> {
        let Some(split) = self.split else {
            return self.pick_among(exclude, |_| true);
        };
        let n = self.shared.split_cursor.fetch_add(1, Ordering::Relaxed);
        let canary = split.is_canary(n);
        self.pick_among(exclude, |i| (i.generation == split.generation) == canary)
            .or_else(|| self.pick_among(exclude, |_| true))
    }

    fn pick_among(
        &self,
        exclude: &[u64],
        wanted: impl Fn(&Instance) -> bool,
    ) -> Option<Arc<Instance>> {
        let n = self.instances.len();
        if n == 0 {
            return None;
        }
        // Two passes at most: if the chosen instance was just unrouted, try the others.
        for _ in 0..2 {
            let start = if n > 1 {
                self.shared.cursor.fetch_add(1, Ordering::Relaxed) % n
            } else {
                0
            };
            let mut best: Option<&Arc<Instance>> = None;
            let mut best_load = u64::MAX;
            for k in 0..n {
                let inst = &self.instances[(start + k) % n];
                if exclude.contains(&inst.key)
                    || !inst.routed.load(Ordering::Relaxed)
                    || !wanted(inst)
                {
                    continue;
                }
                let load = inst.in_flight.load(Ordering::Relaxed);
                if load < best_load {
                    best_load = load;
                    best = Some(inst);
                    if load == 0 {
                        break;
                    }
                }
            }
            let chosen = best?;
            if chosen.try_acquire() {
                return Some(chosen.clone());
            }
        }
        None
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Path prefix without trailing slash (`/` matches everything).
    pub prefix: Arc<str>,
    pub strip_prefix: bool,
    pub backend: Arc<Backend>,
}

impl Route {
    /// Whether `path` is under this route's prefix on a segment boundary: `/api` matches
    /// `/api`, `/api/`, `/api/x`, but not `/apiary`.
    #[inline]
    pub fn matches(&self, path: &str) -> bool {
        let p = &*self.prefix;
        if p == "/" {
            return true;
        }
        path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
    }

    /// The target forwarded upstream for an origin-form `path_query`, as two parts written one
    /// after the other: the prefix removed when stripping (`/api/x` → `/x`, `/api` → `/`,
    /// `/api?q` → `/?q`), else `path_query` as it is. Both protocols' engines call it.
    pub fn upstream_target<'a>(&self, path_query: &'a [u8]) -> [&'a [u8]; 2] {
        if !self.strip_prefix || &*self.prefix == "/" || path_query.len() < self.prefix.len() {
            return [b"", path_query];
        }
        let rest = &path_query[self.prefix.len()..];
        if rest.is_empty() || rest[0] == b'?' {
            [b"/", rest]
        } else {
            [b"", rest]
        }
    }
}

/// Routes of one host (or of any host), longest prefix first.
#[derive(Debug, Default, Clone)]
pub struct HostRoutes {
    routes: Vec<Route>,
}

impl HostRoutes {
    fn push(&mut self, r: Route) {
        self.routes.push(r);
        self.routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.prefix.cmp(&b.prefix))
        });
    }

    #[inline]
    fn lookup(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

/// The immutable snapshot read on every request.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<String, HostRoutes>,
    /// `*.example.com` routes, stored as `.example.com`.
    wildcard_hosts: Vec<(String, HostRoutes)>,
    any_host: HostRoutes,
    pub version: u64,
}

impl RouteTable {
    pub fn new(version: u64) -> RouteTable {
        RouteTable {
            version,
            ..Default::default()
        }
    }

    pub fn add(&mut self, host: Option<&str>, route: Route) {
        match host {
            None => self.any_host.push(route),
            Some(h) => {
                if let Some(suffix) = h.strip_prefix('*') {
                    match self.wildcard_hosts.iter_mut().find(|(s, _)| s == suffix) {
                        Some((_, hr)) => hr.push(route),
                        None => {
                            let mut hr = HostRoutes::default();
                            hr.push(route);
                            self.wildcard_hosts.push((suffix.to_string(), hr));
                            self.wildcard_hosts
                                .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
                        }
                    }
                } else {
                    self.exact_hosts
                        .entry(h.to_string())
                        .or_default()
                        .push(route)
                }
            }
        }
    }

    /// Host first (exact, then the longest wildcard), then the longest path prefix; routes
    /// without a host are the fallback. `host` may carry a port and any case.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        if let Some(h) = host
            && (!self.exact_hosts.is_empty() || !self.wildcard_hosts.is_empty())
        {
            let h = strip_port(h);
            let found = if h.bytes().any(|b| b.is_ascii_uppercase()) {
                self.lookup_host(&h.to_ascii_lowercase(), path)
            } else {
                self.lookup_host(h, path)
            };
            if found.is_some() {
                return found;
            }
        }
        self.any_host.lookup(path)
    }

    fn lookup_host(&self, host: &str, path: &str) -> Option<&Route> {
        if let Some(r) = self.exact_hosts.get(host).and_then(|hr| hr.lookup(path)) {
            return Some(r);
        }
        self.wildcard_hosts
            .iter()
            .filter(|(suffix, _)| host.ends_with(suffix.as_str()) && host.len() > suffix.len())
            .find_map(|(_, hr)| hr.lookup(path))
    }

    /// Every backend in the table (a worker with several routes appears once).
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        let mut out: Vec<Arc<Backend>> = Vec::new();
        let all = self
            .exact_hosts
            .values()
            .chain(self.wildcard_hosts.iter().map(|(_, h)| h))
            .chain(std::iter::once(&self.any_host));
        for hr in all {
            for r in &hr.routes {
                if !out.iter().any(|b| Arc::ptr_eq(b, &r.backend)) {
                    out.push(r.backend.clone());
                }
            }
        }
        out
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [::1]:8080
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// The published route table plus a wake-up for requests waiting for a ready instance.
pub struct RouteHandle {
    table: ArcSwap<RouteTable>,
    changed: Notify,
}

impl Default for RouteHandle {
    fn default() -> Self {
        RouteHandle {
            table: ArcSwap::from_pointee(RouteTable::default()),
            changed: Notify::new(),
        }
    }
}

impl RouteHandle {
    pub fn new() -> Arc<RouteHandle> {
        Arc::new(RouteHandle::default())
    }

    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    pub fn load_full(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Publishes a new table (one store) and wakes queued requests.
    pub fn store(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
        self.changed.notify_waiters();
    }

    /// Resolves at the next [`Self::store`]. Create it *before* re-checking the table to not
    /// miss a store in between.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_holds_its_rate_across_connections() {
        let b = Arc::new(Bucket::default());
        b.set_rate(Some(1_000_000));
        let t = tokio::time::Instant::now();
        // Two connections sending 5 MB each in 16 KiB pieces: 10 MB at 1 MB/s.
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    let mut left = 5_000_000usize;
                    while left > 0 {
                        let n = left.min(16384);
                        b.take(n).await;
                        left -= n;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = t.elapsed().as_secs_f64();
        // The burst (100 kB) is free; the rest goes at the rate (virtual time: exact).
        assert!((9.85..=9.95).contains(&took), "{took}");
        // Unlimited: no wait at all.
        let free = Bucket::default();
        let t = tokio::time::Instant::now();
        free.take(1 << 30).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert!(!free.is_limited());
    }

    #[test]
    fn a_split_sends_exactly_its_share_spread_evenly() {
        for permille in [1, 50, 250, 333, 500, 999, 1000] {
            let split = Split {
                generation: 2,
                permille,
            };
            let hits = (0..10_000).filter(|n| split.is_canary(*n)).count();
            assert_eq!(hits, permille as usize * 10, "{permille}");
            // Never two in a row below half: spread, not bunched.
            if permille <= 500 {
                assert!((0..10_000).all(|n| !(split.is_canary(n) && split.is_canary(n + 1))));
            }
        }
    }

    #[test]
    fn latency_quantiles_come_within_a_bucket() {
        let a = Answered::default();
        for ms in 1..=100u64 {
            a.record(200, Duration::from_millis(ms));
        }
        a.record(503, Duration::from_millis(5));
        let s = a.snapshot();
        assert_eq!((s.requests, s.errors), (101, 1));
        let p99 = s.quantile(0.99).unwrap();
        assert!(
            p99 >= Duration::from_millis(99) && p99 <= Duration::from_millis(120),
            "{p99:?}"
        );
        let p50 = s.quantile(0.5).unwrap();
        assert!(
            p50 >= Duration::from_millis(50) && p50 <= Duration::from_millis(60),
            "{p50:?}"
        );
        let later = a.snapshot();
        assert_eq!(later.since(&s).requests, 0);
        assert!(later.since(&s).quantile(0.99).is_none());
    }

    fn backend(name: &str, ports: &[u16]) -> Arc<Backend> {
        let worker: Arc<str> = name.into();
        Arc::new(Backend {
            worker: worker.clone(),
            instances: ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let inst = Instance::new(
                        worker.clone(),
                        i as u64 + 1,
                        1,
                        SocketAddr::from(([127, 0, 0, 1], *p)),
                    );
                    inst.routed.store(true, Ordering::SeqCst);
                    Arc::new(inst)
                })
                .collect(),
            settings: BackendSettings {
                connect_timeout: Duration::from_secs(1),
                read_timeout: Duration::from_secs(1),
                queue_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                max_body_size: None,
            },
            split: None,
            shared: Arc::new(WorkerShared {
                cursor: AtomicUsize::new(0),
                split_cursor: Default::default(),
                ingress: Default::default(),
                egress: Default::default(),
                metrics: WorkerMetrics::detached(name),
            }),
        })
    }

    fn route(prefix: &str, strip: bool, b: &Arc<Backend>) -> Route {
        Route {
            prefix: prefix.into(),
            strip_prefix: strip,
            backend: b.clone(),
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let root = backend("root", &[9000]);
        let api = backend("api", &[9001]);
        let mut t = RouteTable::new(1);
        t.add(None, route("/", false, &root));
        t.add(None, route("/api", false, &api));
        let w = |p: &str| t.lookup(None, p).map(|r| r.backend.worker.to_string());
        assert_eq!(w("/api").as_deref(), Some("api"));
        assert_eq!(w("/api/").as_deref(), Some("api"));
        assert_eq!(w("/api/x/y").as_deref(), Some("api"));
        assert_eq!(w("/apiary").as_deref(), Some("root"));
        assert_eq!(w("/").as_deref(), Some("root"));
        assert_eq!(w("/other").as_deref(), Some("root"));
    }

    #[test]
    fn no_match_without_root_route() {
        let api = backend("api", &[9001]);
        let mut t = RouteTable::new(1);
        t.add(None, route("/api", false, &api));
        assert!(t.lookup(None, "/").is_none());
        assert!(t.lookup(None, "/apix").is_none());
    }

    #[test]
    fn hosts_before_paths_with_fallback() {
        let any = backend("any", &[9000]);
        let ex = backend("ex", &[9001]);
        let wild = backend("wild", &[9002]);
        let mut t = RouteTable::new(1);
        t.add(None, route("/", false, &any));
        t.add(Some("api.example.com"), route("/v1", false, &ex));
        t.add(Some("*.example.com"), route("/", false, &wild));
        let w = |h: &str, p: &str| t.lookup(Some(h), p).map(|r| r.backend.worker.to_string());
        assert_eq!(w("api.example.com", "/v1/x").as_deref(), Some("ex"));
        assert_eq!(w("API.Example.com:8080", "/v1").as_deref(), Some("ex"));
        // host matches but no path under it: the wildcard host, then the any-host fallback
        assert_eq!(w("api.example.com", "/v2").as_deref(), Some("wild"));
        assert_eq!(w("www.example.com", "/").as_deref(), Some("wild"));
        assert_eq!(w("example.com", "/").as_deref(), Some("any"));
        assert_eq!(w("other.org", "/v1").as_deref(), Some("any"));
        assert_eq!(w("[::1]:8080", "/").as_deref(), Some("any"));
    }

    #[test]
    fn strip_prefix_keeps_query() {
        let b = backend("b", &[9000]);
        let r = route("/api", true, &b);
        let t = |r: &Route, pq: &str| r.upstream_target(pq.as_bytes()).concat();
        assert_eq!(t(&r, "/api/x?q=1"), b"/x?q=1");
        assert_eq!(t(&r, "/api"), b"/");
        assert_eq!(t(&r, "/api?q"), b"/?q");
        assert_eq!(t(&route("/api", false, &b), "/api/x"), b"/api/x");
        assert_eq!(t(&route("/", true, &b), "/x"), b"/x");
    }

    #[test]
    fn least_outstanding_and_exclusion() {
        let b = backend("b", &[9000, 9001, 9002]);
        b.instances[0].in_flight.store(5, Ordering::SeqCst);
        b.instances[1].in_flight.store(1, Ordering::SeqCst);
        b.instances[2].in_flight.store(3, Ordering::SeqCst);
        let p = b.pick(&[]).unwrap();
        assert_eq!(p.id, 2);
        assert_eq!(p.in_flight(), 2);
        let p = b.pick(&[b.instances[1].key]).unwrap();
        assert_eq!(p.id, 3);
        let all: Vec<u64> = b.instances.iter().map(|i| i.key).collect();
        assert!(b.pick(&all).is_none());
        // An instance restarted in place: the same id, a new process, so not excluded.
        let again = backend("b", &[9000, 9001, 9002]);
        assert_eq!(again.pick(&all).map(|p| p.id), Some(1));
    }

    #[test]
    fn ties_are_spread_round_robin() {
        let b = backend("b", &[9000, 9001, 9002]);
        let mut seen = [0u32; 3];
        for _ in 0..30 {
            let p = b.pick(&[]).unwrap();
            seen[(p.id - 1) as usize] += 1;
            p.release(true);
        }
        assert_eq!(seen, [10, 10, 10]);
    }

    #[test]
    fn unrouted_instance_is_never_acquired() {
        let b = backend("b", &[9000, 9001]);
        b.instances[0].routed.store(false, Ordering::SeqCst);
        for _ in 0..10 {
            let p = b.pick(&[]).unwrap();
            assert_eq!(p.id, 2);
            p.release(true);
        }
        b.instances[1].routed.store(false, Ordering::SeqCst);
        assert!(b.pick(&[]).is_none());
        assert_eq!(b.instances[0].in_flight(), 0);
        assert_eq!(b.instances[1].in_flight(), 0);
    }
}
