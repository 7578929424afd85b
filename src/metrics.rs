//! Every metric in one place (Prometheus text format, `GET /metrics` on the admin listener).
//!
//! The request path only touches pre-resolved handles ([`WorkerMetrics`]): no label lookup,
//! no lock, a few relaxed atomic adds per request. Gauges that the supervisor knows anyway
//! (instances per state, memory, CPU, in-flight) are filled in at scrape time instead of on
//! every change.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Status classes, indexed by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Request duration buckets (seconds): 0.5 ms … 60 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub instances: IntGaugeVec,
    pub restarts: IntCounterVec,
    pub instance_memory: IntGaugeVec,
    pub instance_cpu: prometheus::GaugeVec,
    pub reloads: IntCounterVec,
    pub unrouted: IntCounterVec,
}

fn build() -> Metrics {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "tqproxy_requests_total",
            "Requests answered, by worker and status class",
        ),
        &["worker", "code"],
    )
    .expect("metric");
    let duration = HistogramVec::new(
        HistogramOpts::new(
            "tqproxy_request_duration_seconds",
            "From request received to response finished",
        )
        .buckets(DURATION_BUCKETS.to_vec()),
        &["worker"],
    )
    .expect("metric");
    let upstream_errors = IntCounterVec::new(
        Opts::new(
            "tqproxy_upstream_errors_total",
            "Failed attempts to an instance, by kind (connect, timeout, reset, closed, other)",
        ),
        &["worker", "kind"],
    )
    .expect("metric");
    let retries = IntCounterVec::new(
        Opts::new(
            "tqproxy_retries_total",
            "Requests retried on another instance",
        ),
        &["worker"],
    )
    .expect("metric");
    let in_flight = IntGaugeVec::new(
        Opts::new(
            "tqproxy_in_flight_requests",
            "Requests currently proxied to the worker",
        ),
        &["worker"],
    )
    .expect("metric");
    let queue_wait = HistogramVec::new(
        HistogramOpts::new(
            "tqproxy_queue_wait_seconds",
            "Time requests waited for a ready instance (only requests that had to wait)",
        )
        .buckets(DURATION_BUCKETS.to_vec()),
        &["worker"],
    )
    .expect("metric");
    let instances = IntGaugeVec::new(
        Opts::new("tqproxy_worker_instances", "Instances by state"),
        &["worker", "state"],
    )
    .expect("metric");
    let restarts = IntCounterVec::new(
        Opts::new(
            "tqproxy_worker_restarts_total",
            "Instances replaced, by cause (crash, liveness, max_requests, memory, deploy, scale)",
        ),
        &["worker", "cause"],
    )
    .expect("metric");
    let instance_memory = IntGaugeVec::new(
        Opts::new(
            "tqproxy_instance_memory_bytes",
            "Memory of the instance (cgroup usage where it has one, else RSS of its processes)",
        ),
        &["worker", "instance"],
    )
    .expect("metric");
    let instance_cpu = prometheus::GaugeVec::new(
        Opts::new(
            "tqproxy_instance_cpu_seconds_total",
            "CPU time of the instance (cgroup where it has one, else /proc)",
        ),
        &["worker", "instance"],
    )
    .expect("metric");
    let reloads = IntCounterVec::new(
        Opts::new("tqproxy_reloads_total", "Configuration reloads by result"),
        &["result"],
    )
    .expect("metric");
    let unrouted = IntCounterVec::new(
        Opts::new(
            "tqproxy_unrouted_requests_total",
            "Requests that matched no route (404)",
        ),
        &["reason"],
    )
    .expect("metric");
    for c in [
        Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(duration.clone()),
        Box::new(upstream_errors.clone()),
        Box::new(retries.clone()),
        Box::new(in_flight.clone()),
        Box::new(queue_wait.clone()),
        Box::new(instances.clone()),
        Box::new(restarts.clone()),
        Box::new(instance_memory.clone()),
        Box::new(instance_cpu.clone()),
        Box::new(reloads.clone()),
        Box::new(unrouted.clone()),
    ] {
        registry.register(c).expect("metric registered once");
    }
    for r in ["ok", "failed"] {
        reloads.with_label_values(&[r]);
    }
    Metrics {
        registry,
        requests,
        duration,
        upstream_errors,
        retries,
        in_flight,
        queue_wait,
        instances,
        restarts,
        instance_memory,
        instance_cpu,
        reloads,
        unrouted,
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(build);

impl Metrics {
    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Forget the per-instance series of a worker's instance that is gone.
    pub fn forget_instance(&self, worker: &str, instance: &str) {
        let _ = self
            .instance_memory
            .remove_label_values(&[worker, instance]);
        let _ = self.instance_cpu.remove_label_values(&[worker, instance]);
    }
}

/// Upstream error kinds used as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
    Closed,
    Other,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Closed => "closed",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// Pre-resolved handles for one worker, used on the request path.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    name: String,
    by_class: [IntCounter; 5],
    pub duration: Histogram,
    pub queue_wait: Histogram,
    pub retries: IntCounter,
    registered: bool,
}

impl WorkerMetrics {
    /// Handles registered in [`METRICS`].
    pub fn new(worker: &str) -> WorkerMetrics {
        let m = &*METRICS;
        WorkerMetrics {
            name: worker.to_string(),
            by_class: CLASSES.map(|c| m.requests.with_label_values(&[worker, c])),
            duration: m.duration.with_label_values(&[worker]),
            queue_wait: m.queue_wait.with_label_values(&[worker]),
            retries: m.retries.with_label_values(&[worker]),
            registered: true,
        }
    }

    /// Handles that are not registered anywhere (unit tests).
    pub fn detached(worker: &str) -> WorkerMetrics {
        let h = || {
            Histogram::with_opts(HistogramOpts::new("d", "d").buckets(DURATION_BUCKETS.to_vec()))
                .expect("metric")
        };
        WorkerMetrics {
            name: worker.to_string(),
            by_class: CLASSES.map(|_| IntCounter::new("c", "c").expect("metric")),
            duration: h(),
            queue_wait: h(),
            retries: IntCounter::new("r", "r").expect("metric"),
            registered: false,
        }
    }

    #[inline]
    pub fn record(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        if self.registered {
            METRICS
                .upstream_errors
                .with_label_values(&[&self.name, kind.as_str()])
                .inc();
        }
    }

    /// Requests answered so far, by class (for status pages and tests).
    pub fn answered(&self) -> u64 {
        self.by_class.iter().map(|c| c.get()).sum()
    }
}
