//! The YAML as written: one struct per mapping, unknown keys rejected.

use super::*;

// ---------------------------------------------------------------------------------------------
// Raw YAML: the global file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobal {
    #[serde(default = "default_listen_items")]
    pub(super) listen: Vec<RawListenItem>,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default = "default_workers_dir")]
    pub(super) workers_dir: String,
    #[serde(default = "default_logs_dir")]
    pub(super) logs_dir: String,
    #[serde(default = "default_run_dir")]
    pub(super) run_dir: String,
    #[serde(default = "default_ports")]
    pub(super) ports: String,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) proxy: RawProxy,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) cgroups: RawCgroups,
}

pub(super) fn default_listen() -> Vec<RawListen> {
    vec![RawListen {
        addr: "127.0.0.1:8080".into(),
        tls: None,
        redirect_https: None,
    }]
}

pub(super) fn default_listen_items() -> Vec<RawListenItem> {
    default_listen().into_iter().map(RawListenItem).collect()
}

/// A listener: `"IP:PORT"` or `{ addr, tls: {…}, redirect_https: true|PORT }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) addr: String,
    pub(super) tls: Option<RawTls>,
    pub(super) redirect_https: Option<RawRedirect>,
}

impl RawListen {
    fn deserialize_any<'de, D: Deserializer<'de>>(d: D) -> Result<RawListen, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawListen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address like \"127.0.0.1:8080\" or a map with `addr`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawListen, E> {
                Ok(RawListen {
                    addr: v.to_string(),
                    tls: None,
                    redirect_https: None,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawListen, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Full {
                    addr: String,
                    tls: Option<RawTls>,
                    redirect_https: Option<RawRedirect>,
                }
                let f = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawListen {
                    addr: f.addr,
                    tls: f.tls,
                    redirect_https: f.redirect_https,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawListenItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawListen::deserialize_any(d).map(RawListenItem)
    }
}

/// Wrapper so `listen` entries accept both forms.
#[derive(Debug)]
pub(super) struct RawListenItem(pub(super) RawListen);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
    #[serde(default)]
    pub(super) certificates: Vec<RawCert>,
    pub(super) h2: Option<bool>,
    pub(super) session_cache: Option<usize>,
    pub(super) tickets: Option<bool>,
    pub(super) acme: Option<super::acme::RawAcme>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCert {
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawRedirect {
    On(bool),
    Port(u16),
}
pub(super) fn default_workers_dir() -> String {
    "../workers".into()
}
pub(super) fn default_logs_dir() -> String {
    "../logs".into()
}
pub(super) fn default_run_dir() -> String {
    "../run".into()
}
pub(super) fn default_ports() -> String {
    "9000-9999".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub(super) socket: Option<String>,
    pub(super) admin: Option<String>,
    pub(super) agent: Option<String>,
    pub(super) health: Option<String>,
}

/// Just `control.socket`, every other key ignored (`Config::control_socket_of`).
#[derive(Debug, Deserialize)]
pub(super) struct RawControlOnly {
    pub(super) control: Option<RawSocketOnly>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawSocketOnly {
    pub(super) socket: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) instances: Option<u32>,
    pub(super) drain_timeout: Option<HumanDuration>,
    pub(super) stop_timeout: Option<HumanDuration>,
    pub(super) queue_timeout: Option<HumanDuration>,
    pub(super) start_timeout: Option<HumanDuration>,
    pub(super) connect_timeout: Option<HumanDuration>,
    pub(super) read_timeout: Option<HumanDuration>,
    pub(super) max_body_size: Option<HumanSize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    #[serde(default)]
    pub(super) h2c: bool,
    pub(super) threads: Option<usize>,
    pub(super) upstream_keepalive_pool: Option<usize>,
    pub(super) upstream_idle_timeout: Option<HumanDuration>,
    pub(super) max_retries: Option<usize>,
    pub(super) client_header_timeout: Option<HumanDuration>,
    pub(super) client_keepalive_timeout: Option<HumanDuration>,
    pub(super) client_body_timeout: Option<HumanDuration>,
    pub(super) max_connections: Option<usize>,
    pub(super) h2_max_concurrent_streams: Option<u32>,
    pub(super) max_header_list_size: Option<HumanSize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<LogFormat>,
    pub(super) access_log: Option<String>,
    pub(super) access_format: Option<AccessLogFormat>,
    pub(super) worker_log_max_size: Option<HumanSize>,
    pub(super) worker_log_keep: Option<u32>,
    pub(super) worker_log_rate: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCgroups {
    pub(super) mode: Option<CgroupMode>,
    pub(super) root: Option<String>,
    pub(super) base: Option<String>,
    pub(super) delegated: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Raw YAML: a worker file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    #[serde(default = "yes")]
    pub(super) enabled: bool,
    pub(super) command: Vec<String>,
    pub(super) cwd: Option<String>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) strip_prefix: bool,
    pub(super) instances: Option<u32>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) health: RawHealth,
    pub(super) ready: Option<super::Ready>,
    pub(super) watchdog: Option<HumanDuration>,
    #[serde(default)]
    pub(super) deploy: RawDeploy,
    pub(super) drain_timeout: Option<HumanDuration>,
    pub(super) stop_timeout: Option<HumanDuration>,
    pub(super) queue_timeout: Option<HumanDuration>,
    pub(super) start_timeout: Option<HumanDuration>,
    pub(super) connect_timeout: Option<HumanDuration>,
    pub(super) read_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub(super) max_requests: u64,
    pub(super) max_body_size: Option<HumanSize>,
    pub(super) recycle_memory: Option<HumanSize>,
    #[serde(default)]
    pub(super) restart: RawRestart,
    #[serde(default)]
    pub(super) resources: RawResources,
    #[serde(default)]
    pub(super) sandbox: RawSandbox,
    pub(super) build: Option<RawBuild>,
    #[serde(default)]
    pub(super) pass_socket: bool,
    pub(super) transport: Option<Transport>,
    pub(super) port: Option<u16>,
}

pub(super) fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawRoute {
    Short(String),
    Full(RawRouteFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteFull {
    pub(super) route: String,
    pub(super) strip_prefix: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) path: Option<String>,
    pub(super) interval: Option<HumanDuration>,
    pub(super) timeout: Option<HumanDuration>,
    pub(super) unhealthy_after: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeploy {
    pub(super) strategy: Option<Strategy>,
    pub(super) max_surge: Option<u32>,
    pub(super) rollback_window: Option<HumanDuration>,
    #[serde(default)]
    pub(super) canary: RawCanary,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCanary {
    /// Shares: `5%`, or a fraction `0.05`.
    pub(super) steps: Option<Vec<serde_yaml::Value>>,
    pub(super) step_interval: Option<HumanDuration>,
    pub(super) max_error_rate: Option<f64>,
    pub(super) max_p99: Option<HumanDuration>,
    pub(super) min_requests: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestart {
    pub(super) backoff: Option<HumanDuration>,
    pub(super) backoff_max: Option<HumanDuration>,
    pub(super) crashloop_after: Option<u32>,
    pub(super) reset_after: Option<HumanDuration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResources {
    pub(super) memory: Option<HumanSize>,
    pub(super) memory_high: Option<HumanSize>,
    pub(super) cpu: Option<f64>,
    pub(super) cpu_weight: Option<u64>,
    pub(super) pids: Option<u64>,
    pub(super) open_files: Option<u64>,
    pub(super) core: Option<HumanSize>,
    pub(super) address_space: Option<HumanSize>,
    pub(super) file_size: Option<HumanSize>,
    pub(super) io: Option<RawIo>,
    pub(super) cpu_scheduling: Option<crate::sandbox::CpuScheduling>,
    pub(super) bandwidth: Option<RawBandwidth>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBandwidth {
    pub(super) ingress: Option<HumanSize>,
    pub(super) egress: Option<HumanSize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIo {
    pub(super) device: Option<String>,
    pub(super) read_bps: Option<HumanSize>,
    pub(super) write_bps: Option<HumanSize>,
    pub(super) read_iops: Option<u64>,
    pub(super) write_iops: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSandbox {
    pub(super) user: Option<String>,
    pub(super) group: Option<String>,
    #[serde(default)]
    pub(super) dynamic_user: bool,
    #[serde(default)]
    pub(super) namespaces: Vec<Namespace>,
    pub(super) seccomp: Option<String>,
    #[serde(default)]
    pub(super) landlock: bool,
    #[serde(default)]
    pub(super) read_write: Vec<String>,
    #[serde(default)]
    pub(super) read_only: Vec<String>,
    pub(super) read_only_root: Option<bool>,
    pub(super) private_tmp: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuild {
    pub(super) command: Vec<String>,
    #[serde(default)]
    pub(super) watch: Vec<String>,
    pub(super) timeout: Option<HumanDuration>,
}
