//! The composition root of `tqproxy run`: builds the pingora Server with the proxy, the
//! supervisor and the control socket, and decides how the process stops.
//!
//! Stopping: SIGTERM, SIGINT or `tqproxy stop` → pingora stops accepting → the supervisor
//! waits for in-flight requests (up to each worker's `drain_timeout`), stops every instance
//! (SIGTERM, SIGKILL after `stop_timeout`), removes its cgroups → the process exits. pingora's
//! fixed grace period is only the upper bound of that sequence.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::background_service;
use tokio::sync::Notify;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::{Config, LogFormat};
use crate::control::{self, ControlService};
use crate::proxy::Proxy;
use crate::routes::RouteHandle;
use crate::supervisor::Supervisor;

/// Signals plus `tqproxy stop`, as pingora's shutdown trigger.
struct Signals {
    stop: Arc<Notify>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers");
            std::future::pending::<()>().await;
            unreachable!()
        };
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: graceful stop"); ShutdownSignal::GracefulTerminate }
            _ = int.recv() => { tracing::info!("SIGINT: graceful stop"); ShutdownSignal::GracefulTerminate }
            _ = quit.recv() => { tracing::info!("SIGQUIT: graceful upgrade"); ShutdownSignal::GracefulUpgrade }
            _ = self.stop.notified() => { tracing::info!("stop requested on the control socket"); ShutdownSignal::GracefulTerminate }
        }
    }
}

/// A background service running one future (the control socket).
struct Task<F>(std::sync::Mutex<Option<F>>);

#[async_trait]
impl<F> pingora::services::background::BackgroundService for Task<F>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = f {
            f.await;
        }
    }
}

pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TQPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

/// Tells systemd (when started by it with Type=notify) about our state.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `tqproxy run`. Returns the exit code when startup fails; otherwise never returns.
pub fn run(config_path: &Path, watch: bool) -> i32 {
    let config = match Config::load(config_path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    init_logging(&config.log.level, config.log.format);
    if let Err(e) = std::fs::create_dir_all(&config.run_dir) {
        eprintln!("cannot create {}: {e}", config.run_dir.display());
        return 1;
    }
    let control_listener = match control::bind(&config.control_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let socket_ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(&config.control_socket).expect("socket just bound"),
    );
    let access_log = match &config.log.access_log {
        None => None,
        Some(p) => match AccessLog::open(p, config.log.access_format) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("cannot open access log {}: {e}", p.display());
                return 1;
            }
        },
    };

    let max_drain = config
        .workers
        .values()
        .map(|w| w.drain_timeout + w.stop_timeout)
        .max()
        .unwrap_or_default();
    let conf = ServerConf {
        threads: config.proxy.threads,
        work_stealing: false,
        grace_period_seconds: Some(max_drain.as_secs() + 10),
        graceful_shutdown_timeout_seconds: Some(2),
        upstream_keepalive_pool_size: config.proxy.upstream_keepalive_pool,
        max_retries: config.proxy.max_retries,
        pid_file: config.run_dir.join("tqproxy.pid").display().to_string(),
        upgrade_sock: config
            .run_dir
            .join("tqproxy-upgrade.sock")
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    tracing::info!(
        config = %config.file.display(),
        threads = config.proxy.threads,
        workers = config.workers.len(),
        "tqproxy {} starting",
        env!("CARGO_PKG_VERSION")
    );

    let routes = RouteHandle::new();
    let stop = Arc::new(Notify::new());
    let supervisor = Supervisor::new(config.clone(), routes.clone());
    let sup_handle = supervisor.handle();
    supervisor.set_watch(watch);
    supervisor.on_ready(|| sd_notify("READY=1\nSTATUS=all workers started"));
    let socket_path = config.control_socket.clone();
    supervisor.on_stopped(move || {
        control::unlink_if_ours(&socket_path, socket_ino);
        tracing::info!("stopped");
        std::process::exit(0);
    });

    let control = ControlService::new(
        config.control_socket.clone(),
        sup_handle.clone(),
        stop.clone(),
    );
    let control_task = Task(std::sync::Mutex::new(Some(control.serve(control_listener))));
    server.add_service(background_service("control", control_task));
    let sup_service = server.add_service(background_service("supervisor", supervisor));

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Proxy::new(routes, access_log),
        "proxy",
    );
    for addr in &config.listen {
        proxy.add_tcp(&addr.to_string());
    }
    let proxy_handle = server.add_service(proxy);
    if let Some(addr) = config.admin {
        let mut admin = pingora::services::listening::Service::new(
            "admin".to_string(),
            Admin::new(sup_handle.clone()),
        );
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
    }
    // Listen only once the workers are up: no connection is accepted that could not be served.
    proxy_handle.add_dependency(&sup_service);

    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { stop }),
    });
    // Reached only when the supervisor did not finish within the grace period.
    tracing::warn!("grace period over before every instance stopped");
    std::thread::sleep(Duration::from_millis(100));
    0
}
