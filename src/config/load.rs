//! Loading the global file: defaults, cross-worker checks, and the path and route helpers
//! every file uses.

use super::*;

/// `log.worker_log_rate` when not set: lines per second per instance stream.
pub const DEFAULT_WORKER_LOG_RATE: u32 = 10_000;

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

pub(super) const DEFAULT_PATH_ENV: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `control.socket` when not set, relative to the global file's directory.
pub(super) const DEFAULT_CONTROL_SOCKET: &str = "../run/tqproxy.sock";

/// The rule for the names tqproxy turns into file names and cgroup directories: a worker's
/// name (its directory's) and `cgroups.base`. Worker names are joined with `.` into the names
/// of instance cgroups (`<worker>.<id>.<n>`), unix sockets (`<worker>.<id>.<epoch>.sock`) and
/// rotated logs (`<worker>.log.1`), so a name has no `.`; it is lowercase, so two names never
/// differ only by case; 48 bytes at most, so the socket paths under `run_dir: /run/tqproxy`
/// fit a socket address. Every such name also passes the sandbox's path-component check
/// ([`crate::sandbox::cgroup::validate_name`]), which guards each directory it creates.
pub const NAME_RULE: &str =
    "use 1-48 characters a-z, 0-9, '-', '_', starting with a letter or digit";

/// Whether `name` follows [`NAME_RULE`].
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// A worker's name: [`NAME_RULE`], or the error saying so.
pub fn validate_name(name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!("invalid worker name `{name}`: {NAME_RULE}"))
    }
}

impl Config {
    /// Loads and validates the global file and every worker. Collects all errors.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = absolute(path);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Config::from_text(&file, &text)
    }

    /// Validates `text` as the global file `path` (which need not exist: it names the file in
    /// errors and is the directory relative paths resolve against). Reads what the file points
    /// at, as [`Config::load`] does: the workers under `workers_dir`, TLS certificates.
    ///
    /// One function per section, in the order of the errors they report; each returns its
    /// part of the model (with a stand-in where the section is wrong, so that later checks
    /// still run) and adds its errors to `errors`.
    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let file = absolute(path);
        let raw: RawGlobal = parse_yaml(&file, text).map_err(|e| ConfigErrors(vec![e]))?;
        let dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let ctx = Ctx { file: &file, text };
        let mut errors = Vec::new();

        let (listen, listeners) = listeners(&raw.listen, &dir, &ctx, &mut errors);
        let (control_socket, admin) = control(&raw.control, &dir, &ctx, &mut errors);
        let agent = open_listener(raw.control.agent.as_deref(), "agent", &ctx, &mut errors);
        let health = open_listener(raw.control.health.as_deref(), "health", &ctx, &mut errors);
        let ports = ports(&raw.ports, &listen, &ctx, &mut errors);
        let defaults = defaults(&raw.defaults, &ctx, &mut errors);
        let proxy = proxy(&raw.proxy, &ctx, &mut errors);
        let log = log(&raw.log, &dir, &ctx, &mut errors);
        let cgroups = cgroups(&raw.cgroups, &ctx, &mut errors);
        let workers_dir = resolve(&dir, &raw.workers_dir);
        let workers = workers(&workers_dir, &defaults, &ctx, &mut errors);
        // Cross-worker checks.
        routes_served_once(&workers, &mut errors);
        port_pool_suffices(&workers, &ports, &ctx, &mut errors);
        fixed_ports_apart(&workers, &ports, &mut errors);

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            file,
            listen,
            listeners,
            control_socket,
            admin,
            agent,
            health,
            workers_dir,
            logs_dir: resolve(&dir, &raw.logs_dir),
            run_dir: resolve(&dir, &raw.run_dir),
            ports,
            proxy,
            log,
            cgroups,
            workers,
        })
    }

    /// Reads just `control.socket` from the global file, tolerating every other error, so the
    /// client verbs (`status`, `stop`, …) work even while the file is being edited.
    pub fn control_socket_of(path: &Path) -> Result<PathBuf, String> {
        let file = absolute(path);
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
        Config::control_socket_from_text(&file, &text)
    }

    /// [`Config::control_socket_of`] for the text of the global file `path`.
    pub fn control_socket_from_text(path: &Path, text: &str) -> Result<PathBuf, String> {
        let file = absolute(path);
        let dir = file.parent().unwrap_or(Path::new("/"));
        // Read as the server reads it (`socket: 123` is the path `123`; an integer too large
        // for a YAML `Value` elsewhere is no error), all else ignored; if even that fails,
        // the server would refuse the file: take what is there.
        let socket = match serde_yaml::from_str::<RawControlOnly>(text) {
            Ok(c) => c.control.and_then(|c| c.socket),
            Err(_) => {
                let value: serde_yaml::Value =
                    serde_yaml::from_str(text).map_err(|e| format!("{}: {e}", file.display()))?;
                value
                    .get("control")
                    .and_then(|c| c.get("socket"))
                    .and_then(|s| s.as_str())
                    .map(str::to_string)
            }
        };
        Ok(resolve(
            dir,
            socket.as_deref().unwrap_or(DEFAULT_CONTROL_SOCKET),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The sections of the global file
// ---------------------------------------------------------------------------------------------

/// `listen`: every listener's address (also those whose kind is wrong, for the checks that
/// follow) and the listeners.
fn listeners(
    raw: &[RawListenItem],
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> (Vec<SocketAddr>, Vec<Listener>) {
    let mut listen = Vec::new();
    let mut listeners = Vec::new();
    for (i, item) in raw.iter().enumerate() {
        let l = &item.0;
        let key = format!("listen[{i}]");
        let addr = match l.addr.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                errors.push(ctx.err(
                    &["listen"],
                    Some(&l.addr),
                    key,
                    format!("invalid address `{}` (expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080)", l.addr),
                ));
                continue;
            }
        };
        if listen.contains(&addr) {
            errors.push(ctx.err(
                &["listen"],
                Some(&l.addr),
                key.clone(),
                format!("`{}` is listed twice", l.addr),
            ));
        }
        listen.push(addr);
        if let Some(kind) = listener_kind(l, &key, dir, ctx, errors) {
            listeners.push(Listener { addr, kind });
        }
    }
    if raw.is_empty() {
        errors.push(ctx.err(
            &["listen"],
            None,
            "listen",
            "at least one address is required".into(),
        ));
    }
    (listen, listeners)
}

/// What the listener `l` (at `key`, `listen[i]`) does; `None` when it is both TLS and a
/// redirect.
fn listener_kind(
    l: &RawListen,
    key: &str,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Option<ListenerKind> {
    Some(match (&l.tls, &l.redirect_https) {
        (Some(_), Some(_)) => {
            errors.push(ctx.err(
                &["listen"],
                Some(&l.addr),
                key,
                "a listener is either `tls` or `redirect_https`, not both".into(),
            ));
            return None;
        }
        (None, None) => ListenerKind::Plain,
        (None, Some(RawRedirect::On(false))) => ListenerKind::Plain,
        (None, Some(RawRedirect::On(true))) => ListenerKind::RedirectHttps { port: 443 },
        (None, Some(RawRedirect::Port(p))) => ListenerKind::RedirectHttps { port: *p },
        (Some(t), None) => tls(t, key, dir, ctx, errors),
    })
}

/// `tls.session_cache` when it is not set: nginx's `shared:SSL:10m` holds about 40 000.
const DEFAULT_TLS_SESSION_CACHE: usize = 20_000;
/// A bound on `tls.session_cache` (rustls allocates the map as sessions arrive, up to it: a
/// few hundred bytes each).
const MAX_TLS_SESSION_CACHE: usize = 10_000_000;

/// `listen[i].tls`: the certificates (`cert`/`key` first, then `certificates`), loaded once
/// to check them.
fn tls(
    t: &RawTls,
    key: &str,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> ListenerKind {
    let mut certificates: Vec<crate::tls::CertFiles> = t
        .certificates
        .iter()
        .map(|c| crate::tls::CertFiles {
            cert: resolve(dir, &c.cert),
            key: resolve(dir, &c.key),
        })
        .collect();
    match (&t.cert, &t.key) {
        (Some(c), Some(k)) => certificates.insert(
            0,
            crate::tls::CertFiles {
                cert: resolve(dir, c),
                key: resolve(dir, k),
            },
        ),
        (None, None) => {}
        _ => errors.push(ctx.err(
            &["listen", "tls"],
            None,
            format!("{key}.tls"),
            "`cert` and `key` go together".into(),
        )),
    }
    let acme = t
        .acme
        .as_ref()
        .and_then(|a| super::acme::acme(a, key, dir, ctx, errors));
    if certificates.is_empty() && t.acme.is_none() {
        errors.push(ctx.err(
            &["listen", "tls"],
            None,
            format!("{key}.tls"),
            "needs `cert` and `key` (or `certificates: [{cert, key}, …]`, or `acme`)".into(),
        ));
    } else if !certificates.is_empty()
        && let Err(e) = crate::tls::CertStore::load(&certificates)
    {
        errors.push(ctx.err(&["listen", "tls"], None, format!("{key}.tls"), e));
    }
    let session_cache = t.session_cache.unwrap_or(DEFAULT_TLS_SESSION_CACHE);
    if session_cache > MAX_TLS_SESSION_CACHE {
        errors.push(ctx.err(
            &["listen", "tls", "session_cache"],
            None,
            format!("{key}.tls.session_cache"),
            format!("at most {MAX_TLS_SESSION_CACHE} sessions (0 keeps none)"),
        ));
    }
    ListenerKind::Tls {
        certificates,
        h2: t.h2.unwrap_or(true),
        session_cache,
        tickets: t.tickets.unwrap_or(true),
        acme,
    }
}

/// `control`: the control socket's path and the admin listener (on by default, loopback
/// only; `admin: off` disables it).
fn control(
    raw: &RawControl,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> (PathBuf, Option<SocketAddr>) {
    let socket = resolve(dir, raw.socket.as_deref().unwrap_or(DEFAULT_CONTROL_SOCKET));
    let admin = match raw.admin.as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8090))),
        Some("off") => None,
        Some(a) => match a.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                errors.push(ctx.err(
                    &["control", "admin"],
                    None,
                    "control.admin",
                    format!("`{a}` is not a loopback address; the admin listener serves /metrics and /status and must stay on 127.0.0.0/8 or ::1"),
                ));
                None
            }
            Err(_) => {
                errors.push(ctx.err(
                    &["control", "admin"],
                    None,
                    "control.admin",
                    format!("invalid address `{a}` (expected e.g. 127.0.0.1:8090)"),
                ));
                None
            }
        },
    };
    (socket, admin)
}

/// `control.agent` and `control.health`: listeners for load balancers, on any address, off
/// unless set (`off` also says so).
fn open_listener(
    raw: Option<&str>,
    key: &str,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Option<SocketAddr> {
    let a = raw?;
    if a == "off" {
        return None;
    }
    match a.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(ctx.err(
                &["control", key],
                None,
                format!("control.{key}"),
                format!("invalid address `{a}` (expected e.g. 0.0.0.0:9777)"),
            ));
            None
        }
    }
}

/// `ports`: the instance port range (9000-9999 in its place when it is wrong), which no
/// listener may be inside.
fn ports(
    raw: &str,
    listen: &[SocketAddr],
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> RangeInclusive<u16> {
    let ports = match parse_port_range(raw) {
        Ok(r) => r,
        Err(m) => {
            errors.push(ctx.err(&["ports"], None, "ports", m));
            9000..=9999
        }
    };
    for a in listen {
        if ports.contains(&a.port()) {
            errors.push(ctx.err(
                &["listen"],
                None,
                "listen",
                format!(
                    "{a} is inside the worker port range {}-{}",
                    ports.start(),
                    ports.end()
                ),
            ));
        }
    }
    ports
}

/// `defaults`: what every worker file inherits.
fn defaults(raw: &RawDefaults, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> Defaults {
    let defaults = Defaults::of(raw);
    if defaults.instances == 0 {
        errors.push(ctx.err(
            &["defaults", "instances"],
            None,
            "defaults.instances",
            "must be at least 1".into(),
        ));
    }
    defaults
}

/// `proxy`: the request path's settings.
fn proxy(raw: &RawProxy, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> ProxySettings {
    let threads = raw
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > 256 {
        errors.push(ctx.err(
            &["proxy", "threads"],
            None,
            "proxy.threads",
            "must be between 1 and 256".into(),
        ));
    }
    let proxy = ProxySettings {
        h2c: raw.h2c,
        threads: threads.clamp(1, 256),
        upstream_keepalive_pool: raw.upstream_keepalive_pool.unwrap_or(1024),
        upstream_idle_timeout: raw
            .upstream_idle_timeout
            .map_or(Duration::from_secs(30), |x| x.0),
        max_retries: raw.max_retries.unwrap_or(3).max(1),
        client_header_timeout: raw
            .client_header_timeout
            .map_or(Duration::from_secs(10), |x| x.0),
        client_keepalive_timeout: raw
            .client_keepalive_timeout
            .map_or(Duration::from_secs(60), |x| x.0),
        client_body_timeout: raw
            .client_body_timeout
            .map_or(Duration::from_secs(60), |x| x.0),
        max_connections: raw.max_connections,
        h2_max_concurrent_streams: raw.h2_max_concurrent_streams.unwrap_or(128),
        max_header_list_size: raw
            .max_header_list_size
            .map_or(64 << 10, |s| s.0.min(u32::MAX as u64) as u32),
    };
    if !(1..=10_000).contains(&proxy.h2_max_concurrent_streams) {
        errors.push(ctx.err(
            &["proxy", "h2_max_concurrent_streams"],
            None,
            "proxy.h2_max_concurrent_streams",
            "must be between 1 and 10000".into(),
        ));
    }
    if !(1 << 10..=16 << 20).contains(&proxy.max_header_list_size) {
        errors.push(ctx.err(
            &["proxy", "max_header_list_size"],
            None,
            "proxy.max_header_list_size",
            "must be between 1K and 16M".into(),
        ));
    }
    for (key, value) in [
        ("client_header_timeout", proxy.client_header_timeout),
        ("client_keepalive_timeout", proxy.client_keepalive_timeout),
        ("client_body_timeout", proxy.client_body_timeout),
        ("upstream_idle_timeout", proxy.upstream_idle_timeout),
    ] {
        if value.is_zero() {
            errors.push(ctx.err(
                &["proxy", key],
                None,
                format!("proxy.{key}"),
                "must be more than 0".into(),
            ));
        }
    }
    if proxy.max_connections == Some(0) {
        errors.push(ctx.err(
            &["proxy", "max_connections"],
            None,
            "proxy.max_connections",
            "must be at least 1 (omit it for no limit)".into(),
        ));
    }
    proxy
}

/// `log`: tqproxy's own log, the access log and the workers' logs.
fn log(raw: &RawLog, dir: &Path, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> LogSettings {
    let level = raw.level.clone().unwrap_or_else(|| "info".into());
    // Non-ASCII is refused before tracing-subscriber parses it: its directive parser
    // (0.3.23, filter/env/directive.rs:143-151) slices a directive at offsets into its
    // trimmed copy, which panics on leading whitespace before a multi-byte character
    // (found by fuzz/). Related: https://github.com/tokio-rs/tracing/issues/2452
    if !level.is_ascii() || tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        errors.push(ctx.err(
            &["log", "level"],
            None,
            "log.level",
            format!("invalid level `{level}` (e.g. info, debug, tqproxy=debug,pingora=warn)"),
        ));
    }
    LogSettings {
        level,
        format: raw.format.unwrap_or(LogFormat::Text),
        access_log: raw.access_log.as_deref().map(|p| resolve(dir, p)),
        access_format: raw.access_format.unwrap_or(AccessLogFormat::Combined),
        worker_log_max_size: raw.worker_log_max_size.map_or(64 << 20, |s| s.0),
        worker_log_keep: raw.worker_log_keep.unwrap_or(5),
        worker_log_rate: raw.worker_log_rate.unwrap_or(DEFAULT_WORKER_LOG_RATE),
    }
}

/// `cgroups`: where the instances' cgroups are built.
fn cgroups(raw: &RawCgroups, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> CgroupSettings {
    let cgroups = CgroupSettings {
        mode: raw.mode.unwrap_or(CgroupMode::Auto),
        root: PathBuf::from(raw.root.as_deref().unwrap_or("/sys/fs/cgroup")),
        base: raw.base.clone().unwrap_or_else(|| "tqproxy".into()),
        delegated: raw.delegated.unwrap_or(false),
    };
    if cgroups.delegated && matches!(cgroups.mode, CgroupMode::V1 | CgroupMode::Off) {
        errors.push(ctx.err(
            &["cgroups", "delegated"],
            None,
            "cgroups.delegated",
            "delegation is a cgroup v2 feature: use it with mode v2 or auto".to_string(),
        ));
    }
    if !is_valid_name(&cgroups.base) {
        errors.push(ctx.err(
            &["cgroups", "base"],
            None,
            "cgroups.base",
            format!("invalid cgroup name `{}`: {NAME_RULE}", cgroups.base),
        ));
    }
    cgroups
}

/// `workers_dir`: every enabled worker of its subdirectories that have a `worker.yaml`, in
/// the order of their names (each file's errors are collected on their own).
fn workers(
    workers_dir: &Path,
    defaults: &Defaults,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, Arc<WorkerConfig>> {
    let mut workers = BTreeMap::new();
    let entries = match std::fs::read_dir(workers_dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(ctx.err(
                &["workers_dir"],
                None,
                "workers_dir",
                format!("cannot read {}: {e}", workers_dir.display()),
            ));
            return workers;
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("worker.yaml").is_file())
        .collect();
    dirs.sort();
    for wdir in dirs {
        match load_worker(&wdir, defaults) {
            Ok(Some(w)) => {
                workers.insert(w.name.clone(), Arc::new(w));
            }
            Ok(None) => {}
            Err(mut es) => errors.append(&mut es),
        }
    }
    workers
}

/// No route is served by two workers (the error is on the second worker's file).
fn routes_served_once(
    workers: &BTreeMap<String, Arc<WorkerConfig>>,
    errors: &mut Vec<ConfigError>,
) {
    let mut seen: HashMap<(Option<String>, String), String> = HashMap::new();
    for w in workers.values() {
        let wtext = std::fs::read_to_string(&w.file).unwrap_or_default();
        let wctx = Ctx {
            file: &w.file,
            text: &wtext,
        };
        for r in &w.routes {
            let key = (r.host.clone(), r.prefix.clone());
            if let Some(other) = seen.get(&key) {
                errors.push(wctx.err(
                    &["routes"],
                    Some(&format!("{}{}", r.host.as_deref().unwrap_or(""), r.prefix)),
                    "routes",
                    format!(
                        "route `{}{}` is already served by worker `{other}`",
                        r.host.as_deref().unwrap_or(""),
                        r.prefix
                    ),
                ));
            } else {
                seen.insert(key, w.name.clone());
            }
        }
    }
}

/// The port range holds what the TCP workers may use at once: during a deploy, twice their
/// instances plus the surge.
fn port_pool_suffices(
    workers: &BTreeMap<String, Arc<WorkerConfig>>,
    ports: &RangeInclusive<u16>,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) {
    let needed: u64 = workers
        .values()
        .filter(|w| w.uses_port())
        .map(|w| w.instances as u64 * 2 + w.deploy.max_surge as u64)
        .sum();
    let pool = (*ports.end() as u64) - (*ports.start() as u64) + 1;
    if needed > pool {
        errors.push(ctx.err(
            &["ports"],
            None,
            "ports",
            format!("range {}-{} has {pool} ports but the workers may need {needed} during a deploy (2 × instances + max_surge each)", ports.start(), ports.end()),
        ));
    }
}

/// A worker's fixed `port` lies outside the `ports` range (the pool would hand it out while
/// the service restarts) and is no other worker's.
fn fixed_ports_apart(
    workers: &BTreeMap<String, Arc<WorkerConfig>>,
    ports: &RangeInclusive<u16>,
    errors: &mut Vec<ConfigError>,
) {
    let mut seen: HashMap<u16, &str> = HashMap::new();
    for w in workers.values() {
        let Some(port) = w.port else { continue };
        let wtext = std::fs::read_to_string(&w.file).unwrap_or_default();
        let wctx = Ctx {
            file: &w.file,
            text: &wtext,
        };
        if ports.contains(&port) {
            errors.push(wctx.err(&["port"], None, "port", format!("{port} is inside the `ports` range {}-{}, which tqproxy hands out to instances", ports.start(), ports.end())));
        }
        if let Some(other) = seen.insert(port, &w.name) {
            errors.push(wctx.err(
                &["port"],
                None,
                "port",
                format!("{port} is also worker `{other}`'s port"),
            ));
        }
    }
}

/// A stable uid in systemd's DynamicUser range (61184–65519) derived from the worker name.
pub fn dynamic_uid(name: &str) -> u32 {
    // FNV-1a: stable across runs and versions (std's hasher is not).
    let mut h: u32 = 0x811c9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    61184 + h % (65519 - 61184 + 1)
}

/// `/api`, `/api/`, `example.com/api`, `*.example.com/`, `example.com` → (host, prefix).
pub fn parse_route(s: &str) -> Result<(Option<String>, String), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty route".into());
    }
    if s.contains(char::is_whitespace) || s.contains('?') || s.contains('#') {
        return Err(format!(
            "invalid route `{s}`: no spaces, `?` or `#` allowed"
        ));
    }
    let (host, path) = match s.find('/') {
        Some(0) => (None, s),
        Some(i) => (Some(&s[..i]), &s[i..]),
        None => (Some(s), "/"),
    };
    let host = match host {
        None => None,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            let bare = h.strip_prefix("*.").unwrap_or(&h);
            let valid = !bare.is_empty()
                && bare.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                return Err(format!(
                    "invalid host `{h}` in route `{s}` (expected e.g. api.example.com/v1 or *.example.com/)"
                ));
            }
            Some(h)
        }
    };
    if path.contains("//") || path.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("invalid path in route `{s}`"));
    }
    let prefix = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    Ok((host, prefix.to_string()))
}

pub(super) fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("invalid port range `{s}` (expected e.g. 9000-9999)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

pub(super) fn resolve_program(dir: &Path, prog: &str) -> Result<PathBuf, String> {
    let path = if prog.contains('/') {
        resolve(dir, prog)
    } else {
        let search = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH_ENV.into());
        match std::env::split_paths(&search)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
        {
            Some(p) => p,
            None => return Err(format!("program `{prog}` not found in PATH")),
        }
    };
    match std::fs::metadata(&path) {
        Err(e) => Err(format!("program {} : {e}", path.display())),
        Ok(m) if !m.is_file() => Err(format!("program {} is not a file", path.display())),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => {
            Err(format!("program {} is not executable", path.display()))
        }
        Ok(_) => Ok(path),
    }
}

/// Makes `path` absolute against the current directory, without touching the filesystem.
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        normalize(path)
    } else {
        normalize(
            &std::env::current_dir()
                .unwrap_or_else(|_| PathBuf::from("/"))
                .join(path),
        )
    }
}

/// Resolves `p` against `dir` (the directory of the file it was written in).
pub fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        normalize(p)
    } else {
        normalize(&dir.join(p))
    }
}

/// Removes `.` and `..` lexically (symlinks are not followed, on purpose: paths are shown to the
/// operator as written).
pub(super) fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}
