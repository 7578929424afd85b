//! Loading one `workers/<name>/worker.yaml`: routes, health, deploy, resources, sandbox.

use super::*;

pub(super) struct Defaults {
    pub(super) instances: u32,
    pub(super) drain_timeout: Duration,
    pub(super) stop_timeout: Duration,
    pub(super) queue_timeout: Duration,
    pub(super) start_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) read_timeout: Duration,
    pub(super) max_body_size: Option<u64>,
}

impl Defaults {
    /// The global file's `defaults:` section, with tqproxy's own defaults where it is silent.
    pub(super) fn of(d: &RawDefaults) -> Defaults {
        Defaults {
            instances: d.instances.unwrap_or(1),
            drain_timeout: d.drain_timeout.map_or(Duration::from_secs(30), |x| x.0),
            stop_timeout: d.stop_timeout.map_or(Duration::from_secs(10), |x| x.0),
            queue_timeout: d.queue_timeout.map_or(Duration::from_secs(5), |x| x.0),
            start_timeout: d.start_timeout.map_or(Duration::from_secs(30), |x| x.0),
            connect_timeout: d.connect_timeout.map_or(Duration::from_secs(2), |x| x.0),
            read_timeout: d.read_timeout.map_or(Duration::from_secs(60), |x| x.0),
            max_body_size: d.max_body_size.map(|x| x.0).filter(|n| *n > 0),
        }
    }
}

impl WorkerConfig {
    /// Validates `text` as `<dir>/worker.yaml` (`dir` made absolute; the file need not exist;
    /// the worker's name is the directory's), with the defaults of a global file that has no
    /// `defaults:` section. `Ok(None)`: the worker is disabled. Reads what the file points at,
    /// as loading does: the program, `cwd`, the users, the sandbox paths, the block device.
    pub fn from_text(dir: &Path, text: &str) -> Result<Option<WorkerConfig>, ConfigErrors> {
        let dir = absolute(dir);
        worker_from_text(&dir, text, &Defaults::of(&RawDefaults::default())).map_err(ConfigErrors)
    }
}

pub(super) fn load_worker(
    dir: &Path,
    defaults: &Defaults,
) -> Result<Option<WorkerConfig>, Vec<ConfigError>> {
    let file = dir.join("worker.yaml");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    worker_from_text(dir, &text, defaults)
}

/// One function per part of the file, in the order of the errors they report; each returns
/// its part of the model (with a stand-in where the part is wrong) and adds its errors to
/// `errors`.
fn worker_from_text(
    dir: &Path,
    text: &str,
    defaults: &Defaults,
) -> Result<Option<WorkerConfig>, Vec<ConfigError>> {
    let file = dir.join("worker.yaml");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let raw: RawWorker = parse_yaml(&file, text).map_err(|e| vec![e])?;
    if !raw.enabled {
        return Ok(None);
    }
    let ctx = Ctx { file: &file, text };
    let mut errors = Vec::new();
    if let Err(m) = validate_name(&name) {
        errors.push(ctx.err(&[], None, "", format!("directory name: {m}")));
    }

    let (program, args) = command(&raw.command, dir, &ctx, &mut errors);
    let cwd = cwd(raw.cwd.as_deref(), dir, &ctx, &mut errors);
    let routes = routes(&raw.routes, raw.strip_prefix, &ctx, &mut errors);
    let env = env(&raw.env, &ctx, &mut errors);
    let instances = instances(raw.instances, defaults, &ctx, &mut errors);
    // Without a health path, readiness is the port accepting, in a network namespace too:
    // tqproxy owns the listening socket and probes it.
    let health = health(&raw.health, &ctx, &mut errors);
    let (ready, watchdog) = readiness(raw.ready, raw.watchdog, &ctx, &mut errors);
    let deploy = deploy(&raw.deploy, &ctx, &mut errors);
    let restart = restart(&raw.restart, &ctx, &mut errors);
    let resources = worker_resources(&raw.resources, dir, &ctx, &mut errors);
    let mut sandbox = worker_sandbox(&raw.sandbox, &name, dir, &ctx, &mut errors);
    keep_own_files_out_of_private_tmp(
        &mut sandbox,
        raw.sandbox.private_tmp,
        [dir, program.as_path(), cwd.as_path()],
        &ctx,
        &mut errors,
    );
    let build = build(raw.build.as_ref(), dir, &ctx, &mut errors);
    let recycle_memory = recycle_memory(raw.recycle_memory, &resources, &ctx, &mut errors);
    let transport = raw.transport.unwrap_or_default();
    let port = fixed_port(raw.port, instances, transport, &deploy, &ctx, &mut errors);

    let w = WorkerConfig {
        name,
        program_stamp: FileStamp::of(&program),
        program,
        args,
        cwd,
        routes,
        instances,
        env,
        health,
        ready,
        watchdog,
        deploy,
        drain_timeout: raw.drain_timeout.map_or(defaults.drain_timeout, |x| x.0),
        stop_timeout: raw.stop_timeout.map_or(defaults.stop_timeout, |x| x.0),
        queue_timeout: raw.queue_timeout.map_or(defaults.queue_timeout, |x| x.0),
        start_timeout: raw.start_timeout.map_or(defaults.start_timeout, |x| x.0),
        connect_timeout: raw
            .connect_timeout
            .map_or(defaults.connect_timeout, |x| x.0),
        read_timeout: raw.read_timeout.map_or(defaults.read_timeout, |x| x.0),
        max_requests: raw.max_requests,
        // `0` turns a default limit off.
        max_body_size: match raw.max_body_size {
            Some(HumanSize(0)) => None,
            Some(HumanSize(n)) => Some(n),
            None => defaults.max_body_size,
        },
        recycle_memory,
        restart,
        resources,
        sandbox,
        build,
        pass_socket: raw.pass_socket,
        transport,
        port,
        file: file.clone(),
        dir: dir.to_path_buf(),
    };
    if errors.is_empty() {
        Ok(Some(w))
    } else {
        Err(errors)
    }
}

/// `command`: the program (absolute, executable) and its arguments; empty when wrong.
fn command(
    raw: &[String],
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> (PathBuf, Vec<String>) {
    match raw.split_first() {
        None => {
            errors.push(ctx.err(
                &["command"],
                None,
                "command",
                "must name a program (e.g. [\"bin/hello\"])".into(),
            ));
            (PathBuf::new(), Vec::new())
        }
        Some((prog, args)) => match resolve_program(dir, prog) {
            Ok(p) => (p, args.to_vec()),
            Err(m) => {
                errors.push(ctx.err(&["command"], None, "command", m));
                (PathBuf::new(), Vec::new())
            }
        },
    }
}

/// `cwd`: the worker's directory unless set; a set one must be a directory.
fn cwd(raw: Option<&str>, dir: &Path, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> PathBuf {
    let cwd = resolve(dir, raw.unwrap_or("."));
    if raw.is_some() && !cwd.is_dir() {
        errors.push(ctx.err(
            &["cwd"],
            None,
            "cwd",
            format!("{} is not a directory", cwd.display()),
        ));
    }
    cwd
}

/// `routes` (each one once), with the file's `strip_prefix` where a route does not say.
fn routes(
    raw: &[RawRoute],
    strip_prefix: bool,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Vec<RouteSpec> {
    let mut routes = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let (text_route, strip) = match r {
            RawRoute::Short(s) => (s.as_str(), strip_prefix),
            RawRoute::Full(f) => (f.route.as_str(), f.strip_prefix.unwrap_or(strip_prefix)),
        };
        match parse_route(text_route) {
            Ok((host, prefix)) => {
                let spec = RouteSpec {
                    host,
                    prefix,
                    strip_prefix: strip,
                };
                if routes
                    .iter()
                    .any(|x: &RouteSpec| x.host == spec.host && x.prefix == spec.prefix)
                {
                    errors.push(ctx.err(
                        &["routes"],
                        Some(text_route),
                        format!("routes[{i}]"),
                        format!("route `{text_route}` is listed twice"),
                    ));
                }
                routes.push(spec);
            }
            Err(m) => {
                errors.push(ctx.err(&["routes"], Some(text_route), format!("routes[{i}]"), m))
            }
        }
    }
    routes
}

/// `env`: valid names, none of [`RESERVED_ENV`]; over a default `PATH`.
fn env(
    raw: &BTreeMap<String, String>,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, String> {
    for k in raw.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            errors.push(ctx.err(
                &["env"],
                Some(k),
                format!("env.{k}"),
                "invalid variable name".into(),
            ));
        }
        if k.starts_with("TQ_SERVICE_") {
            errors.push(ctx.err(
                &["env"],
                Some(k),
                format!("env.{k}"),
                "`TQ_SERVICE_*` is set by tqproxy: the address of each worker with a `port`".into(),
            ));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            errors.push(ctx.err(
                &["env"],
                Some(k),
                format!("env.{k}"),
                format!("`{k}` is set by tqproxy for every instance and cannot be overridden"),
            ));
        }
    }
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH_ENV.to_string());
    env.extend(raw.clone());
    env
}

/// `instances`: the global `defaults.instances` unless set; at most 256.
fn instances(
    raw: Option<u32>,
    defaults: &Defaults,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> u32 {
    let instances = raw.unwrap_or(defaults.instances);
    if instances > 256 {
        errors.push(ctx.err(
            &["instances"],
            None,
            "instances",
            "at most 256 instances per worker".into(),
        ));
    }
    instances
}

/// `health`: the readiness and liveness checks.
fn health(raw: &RawHealth, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> HealthConfig {
    let health = HealthConfig {
        path: raw.path.clone(),
        interval: raw.interval.map_or(Duration::from_secs(1), |x| x.0),
        timeout: raw.timeout.map_or(Duration::from_millis(500), |x| x.0),
        unhealthy_after: raw.unhealthy_after.unwrap_or(3),
    };
    if let Some(p) = &health.path
        && (!p.starts_with('/') || p.contains(char::is_whitespace))
    {
        errors.push(ctx.err(
            &["health", "path"],
            None,
            "health.path",
            format!("`{p}` must be an absolute path without spaces, e.g. /health"),
        ));
    }
    if health.interval < Duration::from_millis(10) {
        errors.push(ctx.err(
            &["health", "interval"],
            None,
            "health.interval",
            "must be at least 10ms".into(),
        ));
    }
    if health.timeout.is_zero() {
        errors.push(ctx.err(
            &["health", "timeout"],
            None,
            "health.timeout",
            "must be more than 0".into(),
        ));
    }
    if health.unhealthy_after == 0 {
        errors.push(ctx.err(
            &["health", "unhealthy_after"],
            None,
            "health.unhealthy_after",
            "must be at least 1".into(),
        ));
    }
    health
}

/// `deploy`: how a new revision replaces the running one.
fn deploy(raw: &RawDeploy, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> DeployConfig {
    let deploy = DeployConfig {
        strategy: raw.strategy.unwrap_or(Strategy::Rolling),
        max_surge: raw.max_surge.unwrap_or(1),
        rollback_window: raw.rollback_window.map_or(Duration::from_secs(60), |x| x.0),
        canary: canary(&raw.canary, ctx, errors),
    };
    if deploy.max_surge == 0 {
        errors.push(ctx.err(
            &["deploy", "max_surge"],
            None,
            "deploy.max_surge",
            "must be at least 1".into(),
        ));
    }
    deploy
}

/// `deploy.canary`: steps that rise to 100 %, and limits that make sense.
fn canary(raw: &RawCanary, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> CanaryConfig {
    let d = CanaryConfig::default();
    let mut err = |key: &str, msg: String| {
        errors.push(ctx.err(
            &["deploy", "canary", key],
            None,
            format!("deploy.canary.{key}"),
            msg,
        ));
    };
    let steps = match &raw.steps {
        None => d.steps,
        Some(list) => {
            let mut steps = Vec::new();
            for v in list {
                match share_permille(v) {
                    Ok(p) => steps.push(p),
                    Err(e) => err("steps", e),
                }
            }
            if steps.is_empty() && list.is_empty() {
                err(
                    "steps",
                    "must list at least one share, the last 100%".into(),
                );
            } else if !steps.windows(2).all(|w| w[0] < w[1]) {
                err(
                    "steps",
                    "shares must rise (e.g. [5%, 25%, 50%, 100%])".into(),
                );
            } else if steps.last().is_some_and(|l| *l != 1000) {
                err("steps", "the last step must be 100%".into());
            }
            steps
        }
    };
    let max_error_rate = raw.max_error_rate.unwrap_or(d.max_error_rate);
    if !(0.0..=1.0).contains(&max_error_rate) {
        err(
            "max_error_rate",
            format!("{max_error_rate} is not a fraction between 0 and 1 (e.g. 0.01)"),
        );
    }
    let step_interval = raw.step_interval.map_or(d.step_interval, |x| x.0);
    if step_interval.is_zero() {
        err("step_interval", "must be more than 0".into());
    }
    CanaryConfig {
        steps,
        step_interval,
        max_error_rate,
        max_p99: raw.max_p99.map(|x| x.0),
        min_requests: raw.min_requests.unwrap_or(d.min_requests),
    }
}

/// `5%`, `0.5%` or a fraction `0.05`, as thousandths (0 < share ≤ 100 %).
fn share_permille(v: &serde_yaml::Value) -> Result<u32, String> {
    let f = match v {
        serde_yaml::Value::String(s) => match s.trim().strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<f64>()
                .map(|p| p / 100.0)
                .map_err(|_| format!("`{s}` is not a share (e.g. 5% or 0.05)"))?,
            None => s
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("`{s}` is not a share (e.g. 5% or 0.05)"))?,
        },
        serde_yaml::Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("`{n}` is not a share (e.g. 5% or 0.05)"))?,
        other => return Err(format!("{other:?} is not a share (e.g. 5% or 0.05)")),
    };
    let permille = (f * 1000.0).round();
    if !(f > 0.0 && (1.0..=1000.0).contains(&permille)) {
        return Err(format!("{} is not a share above 0.1% and at most 100%", f));
    }
    Ok(permille as u32)
}

/// `restart`: the backoff between restarts of a failing instance.
fn restart(raw: &RawRestart, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> RestartPolicy {
    let restart = RestartPolicy {
        backoff: raw.backoff.map_or(Duration::from_millis(100), |x| x.0),
        backoff_max: raw.backoff_max.map_or(Duration::from_secs(30), |x| x.0),
        crashloop_after: raw.crashloop_after.unwrap_or(5),
        reset_after: raw.reset_after.map_or(Duration::from_secs(10), |x| x.0),
    };
    if restart.backoff_max < restart.backoff {
        errors.push(ctx.err(
            &["restart", "backoff_max"],
            None,
            "restart.backoff_max",
            "must not be less than restart.backoff".into(),
        ));
    }
    restart
}

/// A private /tmp would hide the worker's own files if they live under /tmp: it is then off,
/// and an error if `sandbox.private_tmp: true` asked for it.
fn keep_own_files_out_of_private_tmp(
    sandbox: &mut SandboxConfig,
    asked: Option<bool>,
    own: [&Path; 3],
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) {
    let tmp = Path::new("/tmp");
    let own_under_tmp = own
        .into_iter()
        .chain(sandbox.read_write.iter().map(PathBuf::as_path))
        .chain(sandbox.read_only.iter().map(PathBuf::as_path))
        .find(|p| p.starts_with(tmp));
    if let (true, Some(p)) = (sandbox.private_tmp, own_under_tmp) {
        if asked == Some(true) {
            errors.push(ctx.err(
                &["sandbox", "private_tmp"],
                None,
                "sandbox.private_tmp",
                format!(
                    "a private /tmp would hide {}, which this worker needs",
                    p.display()
                ),
            ));
        }
        sandbox.private_tmp = false;
    }
}

/// `ready` and `watchdog`: the watchdog is kept through the notify socket, so it needs
/// `ready: notify`.
fn readiness(
    ready: Option<Ready>,
    watchdog: Option<HumanDuration>,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> (Ready, Option<Duration>) {
    let ready = ready.unwrap_or_default();
    let watchdog = watchdog.map(|w| w.0);
    if let Some(w) = watchdog {
        let mut bad = |m: String| errors.push(ctx.err(&["watchdog"], None, "watchdog", m));
        if ready != Ready::Notify {
            bad(
                "needs `ready: notify` (the instance sends WATCHDOG=1 on its NOTIFY_SOCKET)".into(),
            );
        }
        if w < Duration::from_millis(10) || w > Duration::from_secs(3600) {
            bad("must be between 10ms and 1h".into());
        }
    }
    (ready, watchdog)
}

/// `port`: a fixed port (a service other workers connect to). It can be held by one process
/// at a time, so one instance, replaced in place (rolling, one at a time), over TCP; that it
/// lies outside the `ports` range and no other worker has it is checked with the global file.
fn fixed_port(
    raw: Option<u16>,
    instances: u32,
    transport: Transport,
    deploy: &DeployConfig,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Option<u16> {
    let port = raw?;
    let mut bad = |m: String| errors.push(ctx.err(&["port"], None, "port", m));
    if port == 0 {
        bad("must be 1-65535 (leave it out to get a port from the `ports` range)".into());
    }
    if instances > 1 {
        bad(format!(
            "a fixed port is held by one process: instances must be 1, not {instances}"
        ));
    }
    if transport != Transport::Tcp {
        bad("needs `transport: tcp` (a unix worker has no port)".into());
    }
    if deploy.strategy != Strategy::Rolling {
        bad(format!(
            "a fixed port cannot be held by two generations at once: deploy.strategy must be rolling, not {}",
            deploy.strategy
        ));
    }
    Some(port)
}

/// `build`: the command `run --watch` runs before a deploy.
fn build(
    raw: Option<&RawBuild>,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Option<BuildConfig> {
    let b = raw?;
    if b.command.is_empty() {
        errors.push(ctx.err(
            &["build", "command"],
            None,
            "build.command",
            "must name a program".into(),
        ));
    }
    Some(BuildConfig {
        command: b.command.clone(),
        watch: b.watch.iter().map(|w| resolve(dir, w)).collect(),
        timeout: b.timeout.map_or(Duration::from_secs(300), |x| x.0),
    })
}

/// `recycle_memory`: below `resources.memory`, or the kernel kills first.
fn recycle_memory(
    raw: Option<HumanSize>,
    resources: &Resources,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Option<u64> {
    let recycle_memory = raw.map(|s| s.0);
    if let (Some(r), Some(m)) = (recycle_memory, resources.memory)
        && r >= m
    {
        errors.push(ctx.err(&["recycle_memory"], None, "recycle_memory", format!("{} is not below resources.memory ({}); the kernel would OOM-kill the instance before tqproxy recycles it", fmt_size(r), fmt_size(m))));
    }
    recycle_memory
}

/// Environment variables tqproxy sets itself.
pub const RESERVED_ENV: &[&str] = &[
    "PORT",
    "WORKER_PORT",
    "WORKER_NAME",
    "WORKER_INSTANCE",
    "WORKER_GENERATION",
    "LISTEN_FDS",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
];

pub(super) fn worker_resources(
    r: &RawResources,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Resources {
    let mut res = Resources {
        memory: r.memory.map(|s| s.0),
        memory_high: r.memory_high.map(|s| s.0),
        cpu: r.cpu,
        cpu_weight: r.cpu_weight,
        pids: r.pids,
        open_files: r.open_files,
        core: r.core.map_or(0, |s| s.0),
        address_space: r.address_space.map(|s| s.0),
        file_size: r.file_size.map(|s| s.0),
        io: None,
        // Batch by default: a worker woken with a request does not preempt the front end
        // forwarding a burst on the same cores (README, "What each feature does and costs").
        cpu_scheduling: r
            .cpu_scheduling
            .unwrap_or(crate::sandbox::CpuScheduling::Batch),
        bandwidth: Bandwidth {
            ingress: r.bandwidth.as_ref().and_then(|b| b.ingress).map(|s| s.0),
            egress: r.bandwidth.as_ref().and_then(|b| b.egress).map(|s| s.0),
        },
    };
    for (key, v) in [
        ("ingress", res.bandwidth.ingress),
        ("egress", res.bandwidth.egress),
    ] {
        if v.is_some_and(|v| v < 1024) {
            errors.push(ctx.err(
                &["resources", "bandwidth", key],
                None,
                format!("resources.bandwidth.{key}"),
                "must be at least 1K (bytes per second)".into(),
            ));
        }
    }
    if let Some(m) = res.memory
        && m < 1 << 20
    {
        errors.push(ctx.err(
            &["resources", "memory"],
            None,
            "resources.memory",
            "must be at least 1M".into(),
        ));
    }
    if let (Some(h), Some(m)) = (res.memory_high, res.memory)
        && h > m
    {
        errors.push(ctx.err(
            &["resources", "memory_high"],
            None,
            "resources.memory_high",
            "must not exceed resources.memory".into(),
        ));
    }
    if let Some(c) = res.cpu
        && !(0.01..=1024.0).contains(&c)
    {
        errors.push(ctx.err(
            &["resources", "cpu"],
            None,
            "resources.cpu",
            format!("{c} cores is out of range (0.01 to 1024)"),
        ));
    }
    if let Some(w) = res.cpu_weight
        && !(1..=10000).contains(&w)
    {
        errors.push(ctx.err(
            &["resources", "cpu_weight"],
            None,
            "resources.cpu_weight",
            format!("{w} is out of range (1 to 10000, default 100)"),
        ));
    }
    if res.pids == Some(0) {
        errors.push(ctx.err(
            &["resources", "pids"],
            None,
            "resources.pids",
            "must be at least 1".into(),
        ));
    }
    if let Some(n) = res.open_files
        && !(16..=1 << 20).contains(&n)
    {
        errors.push(ctx.err(
            &["resources", "open_files"],
            None,
            "resources.open_files",
            format!("{n} is out of range (16 to 1048576)"),
        ));
    }
    res.io = r.io.as_ref().map(|io| worker_io(io, dir, ctx, errors));
    res
}

/// `resources.io`: the block device (the whole disk) whose bandwidth is limited, the device
/// node itself or the one holding the given path, and at least one limit.
fn worker_io(io: &RawIo, dir: &Path, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> IoSettings {
    let device = resolve(dir, io.device.as_deref().unwrap_or("."));
    let numbers = match crate::sandbox::block_device_of(&device) {
        Ok(n) => n,
        Err(e) => {
            errors.push(ctx.err(
                &["resources", "io", "device"],
                None,
                "resources.io.device",
                format!("{}: no block device to limit ({e})", device.display()),
            ));
            (0, 0)
        }
    };
    if io.read_bps.is_none()
        && io.write_bps.is_none()
        && io.read_iops.is_none()
        && io.write_iops.is_none()
    {
        errors.push(ctx.err(
            &["resources", "io"],
            None,
            "resources.io",
            "set at least one of read_bps, write_bps, read_iops, write_iops".into(),
        ));
    }
    IoSettings {
        device,
        numbers,
        read_bps: io.read_bps.map(|s| s.0),
        write_bps: io.write_bps.map(|s| s.0),
        read_iops: io.read_iops,
        write_iops: io.write_iops,
    }
}

/// `sandbox`: the instance's user, namespaces, seccomp, landlock and filesystem view.
pub(super) fn worker_sandbox(
    s: &RawSandbox,
    name: &str,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> SandboxConfig {
    let user = sandbox_user(s, name, ctx, errors);
    let namespaces = sandbox_namespaces(&s.namespaces, ctx, errors);
    let seccomp = sandbox_seccomp(s.seccomp.as_deref(), dir, ctx, errors);
    let read_write: Vec<PathBuf> = s.read_write.iter().map(|p| resolve(dir, p)).collect();
    let read_only: Vec<PathBuf> = s.read_only.iter().map(|p| resolve(dir, p)).collect();
    for (i, p) in read_only.iter().enumerate() {
        if !p.exists() {
            errors.push(ctx.err(
                &["sandbox", "read_only"],
                Some(&s.read_only[i]),
                format!("sandbox.read_only[{i}]"),
                format!("{} does not exist", p.display()),
            ));
        }
    }
    for (i, p) in read_write.iter().enumerate() {
        if p == Path::new("/") {
            errors.push(ctx.err(
                &["sandbox", "read_write"],
                Some(&s.read_write[i]),
                format!("sandbox.read_write[{i}]"),
                "cannot be /".into(),
            ));
        }
    }
    let has_mount = namespaces.contains(&Namespace::Mount) || namespaces.contains(&Namespace::Pid);
    let read_only_root = s.read_only_root.unwrap_or(has_mount);
    let private_tmp = s.private_tmp.unwrap_or(has_mount);
    if (s.read_only_root == Some(true) || s.private_tmp == Some(true)) && !has_mount {
        errors.push(ctx.err(
            &["sandbox"],
            None,
            "sandbox",
            "read_only_root and private_tmp need the `mount` namespace".into(),
        ));
    }
    SandboxConfig {
        user,
        namespaces,
        seccomp,
        landlock: s.landlock,
        read_write,
        read_only,
        read_only_root,
        private_tmp,
    }
}

/// `sandbox.user`, `group`, `dynamic_user`: whose credentials the instance runs with.
fn sandbox_user(s: &RawSandbox, name: &str, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> UserSpec {
    if s.dynamic_user {
        if s.user.is_some() || s.group.is_some() {
            errors.push(ctx.err(
                &["sandbox", "dynamic_user"],
                None,
                "sandbox.dynamic_user",
                "cannot be combined with sandbox.user or sandbox.group".into(),
            ));
        }
        let uid = dynamic_uid(name);
        UserSpec::Dynamic { uid, gid: uid }
    } else if let Some(u) = &s.user {
        named_user(u, s.group.as_deref(), ctx, errors)
    } else {
        if s.group.is_some() {
            errors.push(ctx.err(
                &["sandbox", "group"],
                None,
                "sandbox.group",
                "needs sandbox.user".into(),
            ));
        }
        UserSpec::Inherit
    }
}

/// The host's user `u`, with `group` or else the user's own group.
fn named_user(u: &str, group: Option<&str>, ctx: &Ctx, errors: &mut Vec<ConfigError>) -> UserSpec {
    let Ok(Some(pw)) = nix::unistd::User::from_name(u) else {
        errors.push(ctx.err(&["sandbox", "user"], None, "sandbox.user", format!("user `{u}` does not exist (create it with `useradd --system --no-create-home {u}`, or use dynamic_user: true)")));
        return UserSpec::Inherit;
    };
    let (group, gid) = match group {
        None => (
            nix::unistd::Group::from_gid(pw.gid)
                .ok()
                .flatten()
                .map_or_else(|| pw.gid.to_string(), |g| g.name),
            pw.gid.as_raw(),
        ),
        Some(g) => match nix::unistd::Group::from_name(g) {
            Ok(Some(gr)) => (gr.name, gr.gid.as_raw()),
            _ => {
                errors.push(ctx.err(
                    &["sandbox", "group"],
                    None,
                    "sandbox.group",
                    format!("group `{g}` does not exist (create it, e.g. `groupadd --system {g}`)"),
                ));
                (g.to_string(), 0)
            }
        },
    };
    UserSpec::Named {
        user: u.to_string(),
        group,
        uid: pw.uid.as_raw(),
        gid,
    }
}

/// `sandbox.namespaces`, each once.
fn sandbox_namespaces(
    raw: &[Namespace],
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Vec<Namespace> {
    let mut namespaces = Vec::new();
    for ns in raw {
        if namespaces.contains(ns) {
            errors.push(ctx.err(
                &["sandbox", "namespaces"],
                None,
                "sandbox.namespaces",
                format!("{ns:?} is listed twice").to_lowercase(),
            ));
        } else {
            namespaces.push(*ns);
        }
    }
    namespaces
}

/// `sandbox.seccomp`: `off` (the default), `default`, or a profile file that exists (whether
/// it compiles is [`check_worker`]'s to say).
fn sandbox_seccomp(
    raw: Option<&str>,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> SeccompSetting {
    match raw {
        None | Some("off") => SeccompSetting::Off,
        Some("default") => SeccompSetting::Default,
        Some(p) => {
            let path = resolve(dir, p);
            if !path.is_file() {
                errors.push(ctx.err(
                    &["sandbox", "seccomp"],
                    None,
                    "sandbox.seccomp",
                    format!(
                        "expected `default`, `off` or a profile file; {} does not exist",
                        path.display()
                    ),
                ));
            }
            SeccompSetting::Profile(path)
        }
    }
}
