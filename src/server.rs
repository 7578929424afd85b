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
use std::collections::HashMap;

use crate::config::{Config, ListenerKind, LogFormat};
use crate::control::{self, ControlService};
use crate::proxy::h1::{Engine, Settings};
use crate::proxy::h2::H2Proxy;
use crate::proxy::policy::Policy;
use crate::routes::RouteHandle;
use crate::supervisor::Supervisor;
use crate::tls::{CertStore, SniResolver};

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
            _ = term.recv() => { tracing::info!("SIGTERM: graceful stop"); sd_notify("STOPPING=1"); ShutdownSignal::GracefulTerminate }
            _ = int.recv() => { tracing::info!("SIGINT: graceful stop"); sd_notify("STOPPING=1"); ShutdownSignal::GracefulTerminate }
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listening sockets to the new tqproxy");
                crate::proxy::CLOSE_CONNECTIONS.store(true, std::sync::atomic::Ordering::Relaxed);
                ShutdownSignal::GracefulUpgrade
            }
            _ = self.stop.notified() => { tracing::info!("stop requested on the control socket"); sd_notify("STOPPING=1"); ShutdownSignal::GracefulTerminate }
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
    // A non-ASCII directive can panic inside tracing-subscriber's parser (found by fuzzing
    // `log.level`, which the config refuses): TQPROXY_LOG is held to the same rule, and a bad
    // value falls back to the configured level with a word on stderr.
    let from_env = std::env::var("TQPROXY_LOG").ok().and_then(|v| {
        let parsed = v
            .is_ascii()
            .then(|| tracing_subscriber::EnvFilter::try_new(&v).ok())
            .flatten();
        if parsed.is_none() {
            eprintln!("tqproxy: ignoring TQPROXY_LOG={v:?}: not a valid log filter");
        }
        parsed
    });
    let filter = from_env.unwrap_or_else(|| {
        tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    });
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

/// How `tqproxy run` was asked to start.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunOptions {
    /// Development hot reload.
    pub watch: bool,
    /// Take over from this running tqproxy (`tqproxy upgrade`): start our own instances, then
    /// receive its listening sockets and let it drain and stop.
    pub upgrade_from: Option<u32>,
}

/// `tqproxy run`. Returns the exit code when startup fails; otherwise never returns.
pub fn run(config_path: &Path, opts: RunOptions) -> i32 {
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
    // A fresh start owns the control socket now (and refuses to start twice); an upgrade
    // takes it over only once its own instances are ready.
    let control_listener = if opts.upgrade_from.is_some() {
        None
    } else {
        match control::bind(&config.control_socket) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        }
    };
    let socket_ino = Arc::new(std::sync::atomic::AtomicU64::new(
        control_listener
            .as_ref()
            .and_then(|_| std::fs::metadata(&config.control_socket).ok())
            .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m)),
    ));
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
    let opt = pingora::server::configuration::Opt {
        upgrade: opts.upgrade_from.is_some(),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    let bootstrap = if opts.upgrade_from.is_some() {
        Some(server.bootstrap_as_a_service())
    } else {
        server.bootstrap();
        None
    };
    tracing::info!(
        config = %config.file.display(),
        threads = config.proxy.threads,
        workers = config.workers.len(),
        upgrade_from = opts.upgrade_from,
        "tqproxy {} starting",
        env!("CARGO_PKG_VERSION")
    );

    let routes = RouteHandle::new();
    let stop = Arc::new(Notify::new());
    let supervisor = Supervisor::new(config.clone(), routes.clone());
    let sup_handle = supervisor.handle();
    supervisor.set_watch(opts.watch);
    if opts.upgrade_from.is_none() {
        supervisor.on_ready(|| sd_notify("READY=1\nSTATUS=all workers started"));
    }
    let socket_path = config.control_socket.clone();
    let ino = socket_ino.clone();
    let final_log = access_log.clone();
    supervisor.on_stopped(move || {
        control::unlink_if_ours(&socket_path, ino.load(std::sync::atomic::Ordering::SeqCst));
        if let Some(log) = final_log {
            log.flush(Duration::from_secs(2));
        }
        tracing::info!("stopped");
        std::process::exit(0);
    });

    let control = ControlService::new(
        config.control_socket.clone(),
        socket_ino.clone(),
        sup_handle.clone(),
        stop.clone(),
    );
    let (listener_tx, listener_rx) = tokio::sync::oneshot::channel();
    let control_task = Task(std::sync::Mutex::new(Some(async move {
        let listener = match control_listener {
            Some(l) => l,
            None => match listener_rx.await {
                Ok(l) => l,
                Err(_) => return,
            },
        };
        control.serve(listener).await
    })));
    server.add_service(background_service("control", control_task));
    let sup_service = server.add_service(background_service("supervisor", supervisor));

    // Listen only once the workers are up (and, for an upgrade, once the old process handed
    // over its sockets): no connection is accepted that could not be served.
    let listeners_after = match (opts.upgrade_from, &bootstrap) {
        (Some(old), Some(boot)) => {
            let handover = Handover {
                old,
                supervisor: sup_handle.clone(),
                config: config.clone(),
                listener: std::sync::Mutex::new(Some(listener_tx)),
                socket_ino: socket_ino.clone(),
            };
            let h = server.add_service(background_service("handover", handover));
            h.add_dependency(&sup_service);
            boot.add_dependency(&sup_service);
            boot.clone()
        }
        _ => sup_service.clone(),
    };

    // Listeners: plain, TLS (certificates by SNI, hot-swappable), or redirect to https.
    let mut resolvers: Vec<(std::net::SocketAddr, Arc<SniResolver>)> = Vec::new();
    let mut redirects: HashMap<u16, u16> = HashMap::new();
    let mut tls_settings = Vec::new();
    for l in &config.listeners {
        match &l.kind {
            ListenerKind::Plain => {}
            ListenerKind::RedirectHttps { port } => {
                redirects.insert(l.addr.port(), *port);
            }
            ListenerKind::Tls { certificates, h2 } => {
                let store = match CertStore::load(certificates) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("{e}");
                        return 1;
                    }
                };
                for line in &store.summary {
                    tracing::info!(listener = %l.addr, "certificate {line}");
                }
                let resolver = Arc::new(SniResolver::new(store));
                let mut settings = match pingora::listeners::tls::TlsSettings::intermediate("", "")
                {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("TLS settings for {}: {e}", l.addr);
                        return 1;
                    }
                };
                settings.set_cert_resolver(resolver.clone());
                if *h2 {
                    settings.enable_h2();
                }
                tls_settings.push((l.addr, settings));
                resolvers.push((l.addr, resolver));
            }
        }
    }
    // Run by `tqproxy reload` before any worker changes: certificates (a broken one fails the
    // reload), then the access log is reopened at its path (logrotate's `postrotate`).
    let reload_log = access_log.clone();
    sup_handle.set_tls_reloader(Arc::new(move |c: &Config| {
        let mut lines = reload_certificates(&resolvers, c)?;
        if let Some(log) = &reload_log {
            match log.reopen(Duration::from_secs(5)) {
                Ok(()) => {}
                Err(e) => lines.push(format!("warning: {e}")),
            }
        }
        Ok(lines)
    }));
    // The request path: tqproxy's HTTP/1.1 engine on every listener; it hands HTTP/2
    // connections (ALPN h2, or the h2c preface) to pingora's HTTP/2 server and `H2Proxy`.
    let policy = Arc::new(Policy::new(
        routes,
        access_log,
        redirects,
        config.proxy.max_retries,
    ));
    let mut h2 = pingora::proxy::http_proxy(&server.configuration, H2Proxy::new(policy.clone()));
    if config.proxy.h2c {
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2c = true;
        h2.server_options = Some(options);
    }
    let p = &config.proxy;
    let engine = Engine::new(
        policy,
        Settings {
            header_timeout: p.client_header_timeout,
            keepalive_timeout: p.client_keepalive_timeout,
            body_timeout: p.client_body_timeout,
            max_connections: p.max_connections,
            h2c: p.h2c,
            pool_capacity: p.upstream_keepalive_pool,
        },
        Arc::new(h2),
    );
    let mut proxy = pingora::services::listening::Service::new("proxy".to_string(), engine);
    for l in &config.listeners {
        if !matches!(l.kind, ListenerKind::Tls { .. }) {
            // The engine buffers itself (and holds no buffer while a connection is idle):
            // pingora's 64 KiB per-connection read buffer would be most of its memory.
            proxy.add_listener(
                pingora::listeners::ListenerConfig::tcp(l.addr.to_string())
                    .l4_buffer(pingora::listeners::L4BufferSettings::unbuffered()),
            );
        }
    }
    for (addr, settings) in tls_settings {
        proxy.add_listener(pingora::listeners::ListenerConfig::tcp(addr.to_string()).tls(settings));
    }
    let proxy_handle = server.add_service(proxy);
    proxy_handle.add_dependency(&listeners_after);
    if let Some(addr) = config.admin {
        let mut admin = pingora::services::listening::Service::new(
            "admin".to_string(),
            Admin::new(sup_handle.clone()),
        );
        admin.add_tcp(&addr.to_string());
        let admin_handle = server.add_service(admin);
        admin_handle.add_dependency(&listeners_after);
    }

    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { stop }),
    });
    // Reached only when the supervisor did not finish within the grace period.
    tracing::warn!("grace period over before every instance stopped");
    std::thread::sleep(Duration::from_millis(100));
    0
}

/// Reload: load every TLS listener's certificates again (all of them, before replacing any);
/// any error leaves every listener with its current certificates.
fn reload_certificates(
    resolvers: &[(std::net::SocketAddr, Arc<SniResolver>)],
    config: &Config,
) -> Result<Vec<String>, String> {
    let mut stores = Vec::new();
    for (addr, resolver) in resolvers {
        let files = config.listeners.iter().find_map(|l| match &l.kind {
            ListenerKind::Tls { certificates, .. } if l.addr == *addr => Some(certificates),
            _ => None,
        });
        // A listener removed from the configuration keeps serving until `tqproxy upgrade`.
        let Some(files) = files else { continue };
        let store = CertStore::load(files).map_err(|e| format!("TLS listener {addr}: {e}"))?;
        stores.push((addr, resolver, store));
    }
    let mut lines = Vec::new();
    for (addr, resolver, store) in stores {
        lines.push(format!("TLS {addr}: {}", store.summary.join("; ")));
        resolver.replace(store);
    }
    Ok(lines)
}

/// The new process's side of `tqproxy upgrade`, once its own instances are up: check them,
/// take over the control socket, and tell the old process (SIGQUIT) to hand over its
/// listening sockets — pingora's bootstrap receives them — then drain and stop.
struct Handover {
    old: u32,
    supervisor: crate::supervisor::SupervisorHandle,
    config: Arc<Config>,
    listener:
        std::sync::Mutex<Option<tokio::sync::oneshot::Sender<std::os::unix::net::UnixListener>>>,
    socket_ino: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait]
impl pingora::services::background::BackgroundService for Handover {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        let abort = |why: String| -> ! {
            tracing::error!(
                "upgrade aborted, the old tqproxy (pid {}) keeps serving: {why}",
                self.old
            );
            eprintln!("upgrade aborted: {why}");
            std::process::exit(1);
        };
        let Some(st) = self.supervisor.status().await else {
            abort("supervisor gone".into())
        };
        let not_ready: Vec<String> = st
            .workers
            .iter()
            .filter(|w| {
                w.instances.iter().filter(|i| i.state == "ready").count() < w.desired as usize
            })
            .map(|w| {
                let why = w
                    .instances
                    .iter()
                    .find_map(|i| i.last_exit.clone())
                    .unwrap_or_default();
                format!("{} ({why})", w.name)
            })
            .collect();
        if !not_ready.is_empty() {
            // Our own instances go with us; the old process was never told anything.
            self.supervisor.shutdown().await;
            abort(format!("workers not ready: {}", not_ready.join(", ")));
        }
        let listener = match control::bind_replacing(&self.config.control_socket) {
            Ok(l) => l,
            Err(e) => abort(e),
        };
        if let Ok(m) = std::fs::metadata(&self.config.control_socket) {
            self.socket_ino.store(
                std::os::unix::fs::MetadataExt::ino(&m),
                std::sync::atomic::Ordering::SeqCst,
            );
        }
        if let Some(tx) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = tx.send(listener);
        }
        // Let pingora's bootstrap start listening on the upgrade socket first (both sides
        // retry for several seconds anyway).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let old = nix::unistd::Pid::from_raw(self.old as i32);
        if let Err(e) = nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGQUIT) {
            abort(format!("cannot signal pid {}: {e}", self.old));
        }
        tracing::info!(
            old = self.old,
            "asked the old tqproxy to hand over its listening sockets"
        );
        sd_notify(&format!(
            "MAINPID={}\nREADY=1\nSTATUS=upgraded from pid {}",
            std::process::id(),
            self.old
        ));
    }
}
