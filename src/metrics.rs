//! Every metric in one place (Prometheus text format, `GET /metrics` on the admin listener).
//!
//! The request path only touches pre-resolved handles ([`WorkerMetrics`]): no label lookup,
//! no lock, a few relaxed atomic adds per request. Gauges that the process manager knows anyway
//! (instances per state, memory, CPU, in-flight) are filled in once a second by its tick and
//! again at scrape time ([`Metrics::refresh_from`] a [`StatusReport`]) instead of on every
//! change. This module is a leaf: everything writes to it, it imports only plain data.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tqproxy_requests_total` | counter | `worker`, `code` (`1xx`…`5xx`) |
//! | `tqproxy_request_duration_seconds` | histogram | `worker` |
//! | `tqproxy_upstream_errors_total` | counter | `worker`, `kind` (`connect`, `timeout`, `reset`, `closed`, `other`) |
//! | `tqproxy_retries_total` | counter | `worker` |
//! | `tqproxy_in_flight_requests` | gauge | `worker` |
//! | `tqproxy_queue_wait_seconds` | histogram | `worker` |
//! | `tqproxy_worker_instances` | gauge | `worker`, `state` |
//! | `tqproxy_worker_restarts_total` | counter | `worker`, `cause` |
//! | `tqproxy_instance_memory_bytes` | gauge | `worker`, `instance` |
//! | `tqproxy_instance_cpu_seconds_total` | counter | `worker`, `instance` |
//! | `tqproxy_reloads_total` | counter | `result` (`ok`, `failed`) |
//! | `tqproxy_unrouted_requests_total` | counter | `reason` |
//! | `tqproxy_access_log_dropped_total` | counter | |
//! | `tqproxy_worker_log_dropped_total` | counter | `worker` |
//! | `tqproxy_generation_requests_total` | counter | `worker`, `generation` |
//! | `tqproxy_generation_errors_total` | counter (5xx answers) | `worker`, `generation` |
//! | `tqproxy_canary_share_permille` | gauge (during a canary deploy) | `worker`, `generation` |
//! | `tqproxy_acme_renewals_total` | counter | `result` (`ok`, `failed`) |
//! | `tqproxy_certificate_expiry_timestamp_seconds` | gauge (ACME certificates) | `domain` (the first) |
//! | `tqproxy_build_info` | gauge (always 1) | `version` |
//! | `tqproxy_drained` | gauge (1 while `tqproxy drain` is in effect) | |
//! | `process_*` | the standard process metrics of tqproxy itself | |
//!
//! `tqproxy_instance_cpu_seconds_total` is read from the instance's cgroup (or /proc) once a
//! second, so it is kept in a settable gauge internally and exposed with `# TYPE … counter`
//! (`GaugeAsCounter`): it only grows for a given process, a replacement process under the
//! same instance id starts again from zero, which is exactly a counter reset to `rate()`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{LazyLock, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::status::StatusReport;

/// Status classes, indexed by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Instance states, as the `state` label of `tqproxy_worker_instances`.
pub const INSTANCE_STATES: [&str; 6] = [
    "starting",
    "ready",
    "draining",
    "stopping",
    "exited",
    "crashloop",
];

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
    /// Set from cgroup/proc readings; exposed as a counter (see the module docs).
    pub instance_cpu: GaugeVec,
    pub reloads: IntCounterVec,
    pub unrouted: IntCounterVec,
    /// `tqproxy_unrouted_requests_total{reason="no_route"}`, pre-resolved for the request path.
    pub no_route: IntCounter,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// Worker log lines that could not be written (a full or failing disk), by worker.
    pub worker_log_dropped: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// ACME orders (obtain or renew) by result.
    pub acme_renewals: IntCounterVec,
    /// The expiry (Unix time) of each ACME certificate served, by its first domain.
    pub certificate_expiry: GaugeVec,
    pub generation_requests: GaugeVec,
    pub generation_errors: GaugeVec,
    pub canary_share: IntGaugeVec,
    /// 1 while the node is drained (`tqproxy drain`).
    pub drained: IntGauge,
    /// Workers whose gauges [`Metrics::refresh_from`] set last time.
    gauged_workers: Mutex<BTreeSet<String>>,
    gauged_generations: Mutex<BTreeSet<(String, String)>>,
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
    let instance_cpu = GaugeVec::new(
        Opts::new(
            "tqproxy_instance_cpu_seconds_total",
            "CPU time of the instance's processes (cgroup where it has one, else /proc)",
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
    let access_log_dropped = IntCounter::new(
        "tqproxy_access_log_dropped_total",
        "Access log lines dropped because the log writer fell behind",
    )
    .expect("metric");
    let worker_log_dropped = IntCounterVec::new(
        Opts::new(
            "tqproxy_worker_log_dropped_total",
            "Worker output lines that could not be written to the worker's log (disk full or failing)",
        ),
        &["worker"],
    )
    .expect("metric");
    let generation_requests = GaugeVec::new(
        Opts::new(
            "tqproxy_generation_requests_total",
            "Requests answered by the instances of one generation of a worker (while it has one)",
        ),
        &["worker", "generation"],
    )
    .expect("metric");
    let generation_errors = GaugeVec::new(
        Opts::new(
            "tqproxy_generation_errors_total",
            "5xx answers (tqproxy's own 502/504 included) of one generation of a worker",
        ),
        &["worker", "generation"],
    )
    .expect("metric");
    let canary_share = IntGaugeVec::new(
        Opts::new(
            "tqproxy_canary_share_permille",
            "During a canary deploy: the new generation's share of requests, in thousandths (0: none)",
        ),
        &["worker", "generation"],
    )
    .expect("metric");
    let build_info = IntGaugeVec::new(
        Opts::new(
            "tqproxy_build_info",
            "Always 1; the version of the running tqproxy",
        ),
        &["version"],
    )
    .expect("metric");
    let acme_renewals = IntCounterVec::new(
        Opts::new(
            "tqproxy_acme_renewals_total",
            "ACME certificate orders (first issuance or renewal) by result",
        ),
        &["result"],
    )
    .expect("metric");
    let certificate_expiry = GaugeVec::new(
        Opts::new(
            "tqproxy_certificate_expiry_timestamp_seconds",
            "When the ACME certificate served now expires (Unix time), by its first domain",
        ),
        &["domain"],
    )
    .expect("metric");
    let drained = IntGauge::new(
        "tqproxy_drained",
        "1 while the node is drained (`tqproxy drain`): out of the load balancer's rotation",
    )
    .expect("metric");
    for c in [
        Box::new(acme_renewals.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(certificate_expiry.clone()),
        Box::new(requests.clone()),
        Box::new(duration.clone()),
        Box::new(upstream_errors.clone()),
        Box::new(retries.clone()),
        Box::new(in_flight.clone()),
        Box::new(queue_wait.clone()),
        Box::new(instances.clone()),
        Box::new(restarts.clone()),
        Box::new(instance_memory.clone()),
        Box::new(GaugeAsCounter(instance_cpu.clone())),
        Box::new(reloads.clone()),
        Box::new(unrouted.clone()),
        Box::new(access_log_dropped.clone()),
        Box::new(worker_log_dropped.clone()),
        Box::new(build_info.clone()),
        Box::new(GaugeAsCounter(generation_requests.clone())),
        Box::new(GaugeAsCounter(generation_errors.clone())),
        Box::new(canary_share.clone()),
        Box::new(drained.clone()),
        Box::new(ProcessCollector::new()),
    ] {
        registry.register(c).expect("metric registered once");
    }
    // Series that exist from the start (a scrape shows 0, not nothing).
    for r in ["ok", "failed"] {
        reloads.with_label_values(&[r]);
        acme_renewals.with_label_values(&[r]);
    }
    let no_route = unrouted.with_label_values(&["no_route"]);
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
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
        no_route,
        access_log_dropped,
        worker_log_dropped,
        build_info,
        acme_renewals,
        certificate_expiry,
        generation_requests,
        generation_errors,
        canary_share,
        drained,
        gauged_workers: Mutex::new(BTreeSet::new()),
        gauged_generations: Mutex::new(BTreeSet::new()),
    }
}

/// Exposes a settable [`GaugeVec`] as a counter family (for cumulative readings taken from
/// elsewhere, which `prometheus::Counter` cannot be set to).
struct GaugeAsCounter(GaugeVec);

impl Collector for GaugeAsCounter {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        for f in &mut families {
            f.set_field_type(MetricType::COUNTER);
            for m in f.mut_metric() {
                let mut c = proto::Counter::default();
                c.set_value(m.get_gauge().get_value());
                m.set_counter(c);
            }
        }
        families
    }
}

/// The standard `process_*` metrics of tqproxy itself (what the `prometheus` crate's
/// `process` feature offers, without its `procfs` dependency).
struct ProcessCollector {
    descs: Vec<Desc>,
}

/// (name, help, counter?)
const PROCESS_METRICS: [(&str, &str, bool); 7] = [
    (
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds",
        true,
    ),
    (
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        false,
    ),
    (
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        false,
    ),
    ("process_open_fds", "Number of open file descriptors", false),
    (
        "process_max_fds",
        "Maximum number of open file descriptors",
        false,
    ),
    (
        "process_threads",
        "Number of OS threads in the process",
        false,
    ),
    (
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds",
        false,
    ),
];

/// `USER_HZ`, the unit of the times in `/proc/<pid>/stat`: 100 in the Linux ABI on every
/// architecture tqproxy builds for (x86_64, aarch64).
const USER_HZ: f64 = 100.0;

impl ProcessCollector {
    fn new() -> ProcessCollector {
        ProcessCollector {
            descs: PROCESS_METRICS
                .iter()
                .map(|(name, help, _)| {
                    Desc::new(name.to_string(), help.to_string(), vec![], HashMap::new())
                        .expect("valid process metric")
                })
                .collect(),
        }
    }

    /// Current values, in [`PROCESS_METRICS`] order (`None` where unreadable).
    fn read() -> [Option<f64>; 7] {
        use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage};
        let cpu = getrusage(UsageWho::RUSAGE_SELF).ok().map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        });
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<f64>().ok()
            })
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            // The directory handle itself is one of the entries.
            .map(|d| d.count().saturating_sub(1) as f64);
        let max_fds = getrlimit(Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft as f64);
        [
            cpu,
            field("VmRSS").map(|kb| kb * 1024.0),
            field("VmSize").map(|kb| kb * 1024.0),
            open_fds,
            max_fds,
            field("Threads"),
            *PROCESS_START,
        ]
    }
}

/// When this process started (seconds since the epoch), from `/proc/self/stat` and the boot
/// time in `/proc/stat`.
static PROCESS_START: LazyLock<Option<f64>> = LazyLock::new(|| {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may contain spaces) start at field 3 (state); the
    // start time is field 22.
    let after_comm = stat.rsplit_once(')')?.1;
    let ticks: f64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(boot + ticks / USER_HZ)
});

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        PROCESS_METRICS
            .iter()
            .zip(Self::read())
            .filter_map(|((name, help, counter), value)| {
                let value = value?;
                let mut m = proto::Metric::default();
                let ty = if *counter {
                    let mut c = proto::Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                    MetricType::COUNTER
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                    MetricType::GAUGE
                };
                let mut f = MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(ty);
                f.set_metric(vec![m]);
                Some(f)
            })
            .collect()
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

    /// Sets the per-worker gauges that come from a status document (`in_flight` and the
    /// instance counts per state), so a scrape never shows values older than itself; the gauges
    /// of workers that are gone (removed by a reload) are dropped.
    pub fn refresh_from(&self, st: &StatusReport) {
        self.drained.set(i64::from(st.drained));
        self.refresh_generations(st);
        let now: BTreeSet<String> = st.workers.iter().map(|w| w.name.clone()).collect();
        let mut seen = self
            .gauged_workers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for gone in seen.difference(&now) {
            let _ = self.in_flight.remove_label_values(&[gone]);
            for state in INSTANCE_STATES {
                let _ = self.instances.remove_label_values(&[gone, state]);
            }
        }
        *seen = now;
        drop(seen);
        for w in &st.workers {
            self.in_flight
                .with_label_values(&[&w.name])
                .set(w.in_flight as i64);
            for state in INSTANCE_STATES {
                let n = w.instances.iter().filter(|i| i.state == state).count();
                self.instances
                    .with_label_values(&[&w.name, state])
                    .set(n as i64);
            }
        }
    }
}

impl Metrics {
    /// The per-generation series (and the canary's share) from a status document; those of
    /// generations that are gone are dropped.
    fn refresh_generations(&self, st: &StatusReport) {
        let mut now = BTreeSet::new();
        for w in &st.workers {
            for g in &w.generations {
                let gen_label = g.generation.to_string();
                let labels = [w.name.as_str(), gen_label.as_str()];
                self.generation_requests
                    .with_label_values(&labels)
                    .set(g.requests as f64);
                self.generation_errors
                    .with_label_values(&labels)
                    .set(g.errors as f64);
                now.insert((w.name.clone(), gen_label));
            }
            if let Some(c) = &w.canary {
                let gen_label = c.generation.to_string();
                let permille = c
                    .share
                    .trim_end_matches('%')
                    .parse::<f64>()
                    .map_or(0, |p| (p * 10.0).round() as i64);
                self.canary_share
                    .with_label_values(&[&w.name, &gen_label])
                    .set(permille);
            }
        }
        let mut seen = self
            .gauged_generations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (w, g) in seen.difference(&now) {
            let _ = self.generation_requests.remove_label_values(&[w, g]);
            let _ = self.generation_errors.remove_label_values(&[w, g]);
        }
        for (w, g) in seen.iter() {
            if !st.workers.iter().any(|x| {
                &x.name == w
                    && x.canary
                        .as_ref()
                        .is_some_and(|c| &c.generation.to_string() == g)
            }) {
                let _ = self.canary_share.remove_label_values(&[w, g]);
            }
        }
        *seen = now;
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
    pub const ALL: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Closed,
        UpstreamErrorKind::Other,
    ];

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

/// Pre-resolved handles for one worker, used on the request path: every update is one or two
/// relaxed atomic operations, no label lookup, no lock.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    by_class: [IntCounter; 5],
    /// Indexed like [`UpstreamErrorKind::ALL`].
    by_error: [IntCounter; 5],
    pub duration: Histogram,
    pub queue_wait: Histogram,
    pub retries: IntCounter,
}

impl WorkerMetrics {
    /// Handles registered in [`METRICS`] (their series exist from now on, at 0).
    pub fn new(worker: &str) -> WorkerMetrics {
        let m = &*METRICS;
        WorkerMetrics {
            by_class: CLASSES.map(|c| m.requests.with_label_values(&[worker, c])),
            by_error: UpstreamErrorKind::ALL
                .map(|k| m.upstream_errors.with_label_values(&[worker, k.as_str()])),
            duration: m.duration.with_label_values(&[worker]),
            queue_wait: m.queue_wait.with_label_values(&[worker]),
            retries: m.retries.with_label_values(&[worker]),
        }
    }

    /// Handles that are not registered anywhere (unit tests).
    pub fn detached(_worker: &str) -> WorkerMetrics {
        let h = || {
            Histogram::with_opts(HistogramOpts::new("d", "d").buckets(DURATION_BUCKETS.to_vec()))
                .expect("metric")
        };
        let c = || IntCounter::new("c", "c").expect("metric");
        WorkerMetrics {
            by_class: [(); 5].map(|_| c()),
            by_error: [(); 5].map(|_| c()),
            duration: h(),
            queue_wait: h(),
            retries: c(),
        }
    }

    /// One answered request: its status and how long it took.
    #[inline]
    pub fn record(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    /// One failed attempt to an instance.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.by_error[kind as usize].inc();
    }

    /// Requests answered so far, by class (for status pages and tests).
    pub fn answered(&self) -> u64 {
        self.by_class.iter().map(|c| c.get()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name{labels} value` lines of a rendering, for assertions.
    fn sample<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn kinds_index_their_handles() {
        for (i, k) in UpstreamErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn worker_series_exist_at_zero_and_count() {
        let w = WorkerMetrics::new("unit-w");
        let text = METRICS.render();
        for class in CLASSES {
            assert_eq!(
                sample(
                    &text,
                    &format!("tqproxy_requests_total{{code=\"{class}\",worker=\"unit-w\"}}")
                ),
                Some("0"),
                "{text}"
            );
        }
        for k in UpstreamErrorKind::ALL {
            let p = format!(
                "tqproxy_upstream_errors_total{{kind=\"{}\",worker=\"unit-w\"}}",
                k.as_str()
            );
            assert_eq!(sample(&text, &p), Some("0"), "{p}");
        }
        w.record(200, 0.001);
        w.record(204, 0.001);
        w.record(404, 0.001);
        w.record(502, 0.001);
        w.upstream_error(UpstreamErrorKind::Closed);
        let text = METRICS.render();
        let get = |p: &str| sample(&text, p).map(str::to_string);
        assert_eq!(
            get("tqproxy_requests_total{code=\"2xx\",worker=\"unit-w\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            get("tqproxy_requests_total{code=\"4xx\",worker=\"unit-w\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            get("tqproxy_requests_total{code=\"5xx\",worker=\"unit-w\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            get("tqproxy_upstream_errors_total{kind=\"closed\",worker=\"unit-w\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            get("tqproxy_request_duration_seconds_count{worker=\"unit-w\"}").as_deref(),
            Some("4")
        );
        assert_eq!(w.answered(), 4);
    }

    #[test]
    fn instance_cpu_is_exposed_as_a_counter() {
        METRICS
            .instance_cpu
            .with_label_values(&["unit-cpu", "1"])
            .set(1.25);
        let text = METRICS.render();
        assert!(
            text.contains("# TYPE tqproxy_instance_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "tqproxy_instance_cpu_seconds_total{instance=\"1\",worker=\"unit-cpu\"}"
            ),
            Some("1.25")
        );
        METRICS.forget_instance("unit-cpu", "1");
        assert!(!METRICS.render().contains("worker=\"unit-cpu\""));
    }

    #[test]
    fn every_counter_family_ends_in_total() {
        let text = METRICS.render();
        let mut types = 0;
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            types += 1;
            let mut it = l["# TYPE ".len()..].split(' ');
            let (name, ty) = (it.next().unwrap(), it.next().unwrap());
            assert_eq!(
                ty == "counter",
                name.ends_with("_total"),
                "{name} is a {ty}: counters and only counters end in _total"
            );
        }
        assert!(types >= 10, "{text}");
    }

    #[test]
    fn refresh_sets_worker_gauges_and_drops_gone_workers() {
        let doc = |workers: serde_json::Value| -> StatusReport {
            serde_json::from_value(serde_json::json!({
                "pid": 1, "version": "0", "uptime_secs": 1.0, "config": "c", "listen": [],
                "admin": null, "cgroups": null, "state": "running", "workers": workers,
            }))
            .unwrap()
        };
        let worker = serde_json::json!({
            "name": "unit-gone", "routes": ["/"], "desired": 1, "generation": 1,
            "routed_generations": [1], "strategy": "rolling", "standby": null, "busy": null,
            "restarts": {}, "in_flight": 3, "requests": 0, "log": "l",
            "instances": [{
                "id": 1, "pid": 2, "port": 9000, "state": "ready", "generation": 1,
                "restarts": 0, "routed": true, "role": "serving", "in_flight": 3, "requests": 0,
                "uptime_secs": 1.0, "memory_bytes": null, "cpu_seconds": null,
                "last_exit": null, "cgroup": null,
            }],
        });
        METRICS.refresh_from(&doc(serde_json::json!([worker])));
        let text = METRICS.render();
        assert_eq!(
            sample(&text, "tqproxy_in_flight_requests{worker=\"unit-gone\"}"),
            Some("3")
        );
        assert_eq!(
            sample(
                &text,
                "tqproxy_worker_instances{state=\"ready\",worker=\"unit-gone\"}"
            ),
            Some("1")
        );
        METRICS.refresh_from(&doc(serde_json::json!([])));
        assert!(!METRICS.render().contains("worker=\"unit-gone\""));
    }

    #[test]
    fn process_and_build_info() {
        let text = METRICS.render();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_threads ",
            "process_start_time_seconds ",
        ] {
            let v: f64 = text
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name}in\n{text}"));
            assert!(v > 0.0, "{name}= {v}");
        }
        let start = sample(&text, "process_start_time_seconds ")
            .unwrap()
            .parse::<f64>()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86400.0 * 365.0,
            "{start}"
        );
        assert!(text.contains(&format!(
            "tqproxy_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
