//! The composition root of `tqproxy run`: [`run`] is the startup script, each step a small
//! builder that says what failed ([`StartupError`]).
//!
//! Startup, in order (every step that can fail comes before the supervisor, so a refused start
//! leaves no cgroup and no instance behind):
//! 1. the configuration, then logging and the run directory;
//! 2. the control socket (a fresh start binds it and so refuses to start twice; an upgrade
//!    takes it over only once its own instances are ready, in `Handover`);
//! 3. the access log, the TLS certificates, and (a fresh start) a check that every listen
//!    address binds;
//! 4. the supervisor (its cgroup tree, the logs directory);
//! 5. pingora's services: the control socket, the SIGHUP reload, the supervisor, the upgrade
//!    handover, the proxy (tqproxy's HTTP/1.1 engine, which hands HTTP/2 to tqproxy's HTTP/2
//!    engine) and the admin listener. The proxy and admin listen only once the workers are up (and, for an
//!    upgrade, once the old process handed over its sockets): no connection is accepted that
//!    could not be served. systemd hears `READY=1` at that point.
//!
//! Stopping ([`crate::signals`] says which signal does what): SIGTERM, SIGINT or `tqproxy stop` →
//! pingora stops accepting → the supervisor waits for in-flight requests (up to each worker's
//! `drain_timeout`), stops every instance (SIGTERM, SIGKILL after `stop_timeout`), removes its
//! cgroups → [`run`] returns. pingora's fixed grace period is only the upper bound of that
//! sequence: its `Server::run` sleeps the whole period before it returns, so it runs on a
//! thread of its own and [`run`] returns as soon as the supervisor reports that it stopped.
//! The exit code is `main`'s to decide (through [`crate::cli::dispatch`]); nothing here exits
//! the process. pingora still does in two places out of our reach (pingora-core 0.9.1): on an
//! upgrade, when the old process's sockets cannot be received (`Bootstrap::bootstrap`,
//! `server/bootstrap_services.rs`: exit 1), and on a dependency cycle among services
//! (`Server::run`: exit 1; ours have none).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::ServiceHandle;
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use tokio::sync::{Notify, oneshot};

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::{Config, ConfigErrors, ListenerKind, LogFormat};
use crate::control::{self, ControlService};
use crate::proxy::h1::{Engine, Settings};
use crate::proxy::h2::{self, H2};
use crate::proxy::policy::Policy;
use crate::routes::RouteHandle;
use crate::signals;
use crate::supervisor::{Supervisor, SupervisorHandle};
use crate::tls::{CertStore, Negotiation, SniResolver, TlsFront};

/// Why `tqproxy run` could not start (or, for an upgrade, could not take over).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration does not load: every error with its file, line and key.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot create {}: {cause}", path.display())]
    RunDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The control socket cannot be bound (or another tqproxy serves it).
    #[error("{0}")]
    ControlSocket(String),
    #[error("cannot open access log {}: {cause}", path.display())]
    AccessLog {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A TLS listener's certificates or settings.
    #[error("TLS listener {addr}: {cause}")]
    Tls { addr: SocketAddr, cause: String },
    /// A listen address (`what`: "listener" or "admin listener") that does not bind.
    #[error("cannot listen on {addr} ({what}): {cause}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        cause: std::io::Error,
    },
    /// The supervisor's own setup (cgroups, the logs directory).
    #[error("the supervisor cannot start: {0}")]
    Supervisor(String),
    /// `--upgrade-from`: the handover did not happen; our instances were stopped.
    #[error("upgrade aborted, the old tqproxy (pid {old}) keeps serving: {reason}")]
    Handover { old: u32, reason: String },
    #[error("cannot start the server thread: {0}")]
    Thread(std::io::Error),
    #[error("the server thread panicked")]
    ServerPanicked,
}

/// How a started `tqproxy run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The supervisor drained and stopped every instance.
    Graceful,
    /// pingora's grace period (the longest `drain_timeout` + `stop_timeout`, plus 10 s) ended
    /// before the supervisor was done.
    GracePeriodOver,
}

/// What the services report to [`run`], which waits for the first of them.
enum Event {
    /// The supervisor finished its graceful shutdown.
    SupervisorStopped,
    /// pingora's `Server::run` returned: its grace period is over.
    ServerReturned,
    /// Something after startup that ends the process (an upgrade that could not take over).
    Failed(StartupError),
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

/// `tqproxy run`: starts, serves until stopped, and says how it ended.
pub fn run(config_path: &Path, opts: RunOptions) -> Result<Stopped, StartupError> {
    let config = load_config(config_path)?;
    tracing::info!(
        config = %config.file.display(),
        threads = config.proxy.threads,
        workers = config.workers.len(),
        upgrade_from = opts.upgrade_from,
        "tqproxy {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let control = ControlSocket::bind(&config, opts)?;
    crate::drain::restore(&config.run_dir, opts.upgrade_from.is_some());
    let _socket_file = ControlSocketFile {
        path: config.control_socket.clone(),
        ino: control.ino.clone(),
    };
    let access_log = open_access_log(&config)?;
    let tls = Tls::load(&config)?;
    if opts.upgrade_from.is_none() {
        // An upgrade receives its sockets from the old process, which holds them now.
        check_listen_addresses(listen_addresses(&config))?;
    }
    let (events_tx, events) = mpsc::channel();
    let routes = RouteHandle::new();
    let supervisor = supervisor(&config, routes.clone(), opts, events_tx.clone())?;
    let sup = supervisor.handle();
    sup.set_tls_reloader(reloader(tls.resolvers, access_log.clone()));

    let (mut server, bootstrap) = pingora_server(&config, opts);
    let stop = Arc::new(Notify::new());
    let control_ino = control.ino.clone();
    let (control_service, control_later) = control_service(&config, control, &sup, &stop);
    server.add_service(background_service("control", control_service));
    server.add_service(background_service(
        "signals",
        Task::new(signals::reload_on_sighup(sup.clone())),
    ));
    let sup_service = server.add_service(background_service("supervisor", supervisor));
    let listen_after = match (opts.upgrade_from, bootstrap) {
        (Some(old), Some(boot)) => {
            let handover = Handover {
                old,
                supervisor: sup.clone(),
                config: config.clone(),
                control_listener: std::sync::Mutex::new(control_later),
                control_ino,
                events: events_tx.clone(),
            };
            let h = server.add_service(background_service("handover", handover));
            h.add_dependency(&sup_service);
            boot.add_dependency(&sup_service);
            boot
        }
        _ => sup_service,
    };
    let acme = tls.acme.clone();
    let proxy = proxy_service(&config, routes, access_log.clone(), tls.configs, &acme);
    server.add_service(proxy).add_dependency(&listen_after);
    if !acme.managed.is_empty() {
        // Orders start once the listeners answer the CA's validation.
        server
            .add_service(background_service(
                "acme",
                crate::acme::AcmeService(acme.clone()),
            ))
            .add_dependency(&listen_after);
    }
    if let Some(addr) = config.admin {
        server
            .add_service(admin_service(addr, &sup))
            .add_dependency(&listen_after);
    }
    for s in balancer_services(&config, &sup) {
        server.add_boxed_service(s).add_dependency(&listen_after);
    }

    let stopped = serve(server, signals::Shutdown { stop }, events_tx, events);
    // An ACME order under way (this process holds the state directory's lock) is finished
    // rather than left at the CA; a new process of an upgrade waits for it and adopts it.
    acme.finish_orders(Duration::from_secs(30));
    if let Some(log) = access_log {
        log.flush(Duration::from_secs(2));
    }
    if matches!(stopped, Ok(Stopped::Graceful)) {
        tracing::info!("stopped");
    }
    stopped
}

/// Loads the configuration, then starts logging as it says and creates the run directory.
fn load_config(path: &Path) -> Result<Arc<Config>, StartupError> {
    let config = Config::load(path)?;
    init_logging(&config.log.level, config.log.format);
    std::fs::create_dir_all(&config.run_dir).map_err(|cause| StartupError::RunDir {
        path: config.run_dir.clone(),
        cause,
    })?;
    Ok(Arc::new(config))
}

/// The control socket this process serves: bound now on a fresh start; on an upgrade, `None`
/// until [`Handover`] takes the path over. `ino` is the inode of the socket file we created (0:
/// none), so that the exit removes the file only if it is still ours.
struct ControlSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    ino: Arc<AtomicU64>,
}

impl ControlSocket {
    fn bind(config: &Config, opts: RunOptions) -> Result<ControlSocket, StartupError> {
        let listener = match opts.upgrade_from {
            Some(_) => None,
            None => {
                Some(control::bind(&config.control_socket).map_err(StartupError::ControlSocket)?)
            }
        };
        let ino = listener
            .as_ref()
            .and_then(|_| std::fs::metadata(&config.control_socket).ok())
            .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
        Ok(ControlSocket {
            listener,
            ino: Arc::new(AtomicU64::new(ino)),
        })
    }
}

/// Removes the control socket file when [`run`] returns, however it returns, if the file is
/// still the one this process created (a newer tqproxy may own the path after an upgrade).
struct ControlSocketFile {
    path: PathBuf,
    ino: Arc<AtomicU64>,
}

impl Drop for ControlSocketFile {
    fn drop(&mut self) {
        control::unlink_if_ours(&self.path, self.ino.load(Ordering::SeqCst));
    }
}

fn open_access_log(config: &Config) -> Result<Option<AccessLog>, StartupError> {
    let Some(path) = &config.log.access_log else {
        return Ok(None);
    };
    AccessLog::open(path, config.log.access_format)
        .map(Some)
        .map_err(|cause| StartupError::AccessLog {
            path: path.clone(),
            cause,
        })
}

/// The TLS listeners: the rustls configuration of each (for [`TlsFront`]), the resolvers
/// through which `reload` swaps certificates on live listeners, and the ACME certificates
/// (each loaded from its state directory, if there; renewed by the `acme` service).
struct Tls {
    configs: Vec<(SocketAddr, Arc<rustls::ServerConfig>)>,
    resolvers: Vec<(SocketAddr, Arc<SniResolver>, Negotiation)>,
    acme: Arc<crate::acme::Acme>,
}

impl Tls {
    fn load(config: &Config) -> Result<Tls, StartupError> {
        let mut configs = Vec::new();
        let mut resolvers = Vec::new();
        let acme = crate::acme::Acme::load(config)
            .map_err(|(addr, cause)| StartupError::Tls { addr, cause })?;
        for l in &config.listeners {
            let Some((certificates, how)) = tls_listener(&l.kind) else {
                continue;
            };
            let err = |cause: String| StartupError::Tls {
                addr: l.addr,
                cause,
            };
            let store = CertStore::load(certificates).map_err(err)?;
            for line in &store.summary {
                tracing::info!(listener = %l.addr, "certificate {line}");
            }
            let alpn_challenges = how.acme_tls_alpn.then(|| acme.challenges.clone());
            let resolver = Arc::new(SniResolver::with_acme(
                store,
                acme.of_listener(&l.kind),
                alpn_challenges,
            ));
            let server_config = crate::tls::server_config(resolver.clone(), &how).map_err(err)?;
            configs.push((l.addr, server_config));
            resolvers.push((l.addr, resolver, how));
        }
        let acme = Arc::new(acme);
        crate::acme::install(acme.clone());
        Ok(Tls {
            configs,
            resolvers,
            acme,
        })
    }
}

/// A TLS listener's certificates and how it negotiates; `None` for other listeners.
fn tls_listener(kind: &ListenerKind) -> Option<(&[crate::tls::CertFiles], Negotiation)> {
    match kind {
        ListenerKind::Tls {
            certificates,
            h2,
            session_cache,
            tickets,
            acme,
        } => Some((
            certificates,
            Negotiation {
                h2: *h2,
                session_cache: *session_cache,
                tickets: *tickets,
                acme_tls_alpn: acme
                    .as_ref()
                    .is_some_and(|a| a.challenge == crate::acme::ChallengeKind::TlsAlpn01),
            },
        )),
        _ => None,
    }
}

/// Every address this process listens on, with what it is for.
fn listen_addresses(config: &Config) -> Vec<(SocketAddr, &'static str)> {
    let mut addrs: Vec<_> = config
        .listeners
        .iter()
        .map(|l| (l.addr, "listener"))
        .collect();
    addrs.extend(config.admin.map(|a| (a, "admin listener")));
    addrs.extend(config.agent.map(|a| (a, "agent-check listener")));
    addrs.extend(config.health.map(|a| (a, "health listener")));
    addrs
}

/// Binds every address (held together, so two that collide are found too) and lets go again.
/// pingora binds them itself, once the workers are up, and a failure there would only panic
/// its listening service (pingora-core's `services/listening.rs`: "Failed to build
/// listeners") and leave tqproxy running without that listener. std binds with SO_REUSEADDR,
/// as pingora does, so a port in TIME_WAIT passes here and there alike.
fn check_listen_addresses(
    addrs: impl IntoIterator<Item = (SocketAddr, &'static str)>,
) -> Result<(), StartupError> {
    let mut held = Vec::new();
    for (addr, what) in addrs {
        let l = std::net::TcpListener::bind(addr).map_err(|cause| StartupError::Bind {
            addr,
            what,
            cause,
        })?;
        held.push(l);
    }
    Ok(())
}

/// The supervisor, reporting to [`run`] when its graceful shutdown is done.
fn supervisor(
    config: &Arc<Config>,
    routes: Arc<RouteHandle>,
    opts: RunOptions,
    events: mpsc::Sender<Event>,
) -> Result<Supervisor, StartupError> {
    let supervisor = Supervisor::new(config.clone(), routes).map_err(StartupError::Supervisor)?;
    supervisor.set_watch(opts.watch);
    if opts.upgrade_from.is_none() {
        // An upgrade's new process says READY=1 (with MAINPID) once it has the sockets.
        supervisor.on_ready(|| sd_notify("READY=1\nSTATUS=all workers started"));
    }
    supervisor.on_stopped(move || {
        let _ = events.send(Event::SupervisorStopped);
    });
    Ok(supervisor)
}

/// Run by `tqproxy reload` before any worker changes: certificates (a broken one fails the
/// reload), then the access log is reopened at its path (logrotate's `postrotate`).
fn reloader(
    resolvers: Vec<(SocketAddr, Arc<SniResolver>, Negotiation)>,
    access_log: Option<AccessLog>,
) -> crate::supervisor::TlsReloader {
    Arc::new(move |c: &Config| {
        let mut lines = reload_certificates(&resolvers, c)?;
        if let Some(log) = &access_log
            && let Err(e) = log.reopen(Duration::from_secs(5))
        {
            lines.push(format!("warning: {e}"));
        }
        Ok(lines)
    })
}

/// pingora's server: threads, the grace period that bounds a graceful stop, the pid file and
/// the upgrade socket. A fresh start bootstraps now; an upgrade gets a bootstrap service that
/// receives the old process's listening sockets (returned, for the caller to order it).
fn pingora_server(config: &Config, opts: RunOptions) -> (Server, Option<ServiceHandle>) {
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
    let opt = Opt {
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
    (server, bootstrap)
}

/// The control socket's service. On an upgrade its listener arrives later, through the
/// returned sender ([`Handover`]).
fn control_service(
    config: &Config,
    socket: ControlSocket,
    supervisor: &SupervisorHandle,
    stop: &Arc<Notify>,
) -> (
    Task<impl Future<Output = ()> + Send + 'static>,
    Option<oneshot::Sender<std::os::unix::net::UnixListener>>,
) {
    let control = ControlService::new(
        config.control_socket.clone(),
        socket.ino,
        supervisor.clone(),
        stop.clone(),
    );
    let (later_tx, later) = match socket.listener {
        Some(_) => (None, None),
        None => {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        }
    };
    let now = socket.listener;
    let task = Task::new(async move {
        let listener = match (now, later) {
            (Some(l), _) => l,
            (None, Some(rx)) => match rx.await {
                Ok(l) => l,
                // The upgrade was aborted.
                Err(_) => return,
            },
            (None, None) => return,
        };
        control.serve(listener).await
    });
    (task, later_tx)
}

/// The request path: tqproxy's HTTP/1.1 engine on every listener (plain, redirecting, TLS with
/// certificates by SNI, the handshake done by [`TlsFront`] with `tls`, each TLS listener's
/// rustls configuration); it hands HTTP/2 connections (ALPN h2, or the h2c preface) to
/// tqproxy's HTTP/2 engine ([`H2`]).
fn proxy_service(
    config: &Config,
    routes: Arc<RouteHandle>,
    access_log: Option<AccessLog>,
    tls: Vec<(SocketAddr, Arc<rustls::ServerConfig>)>,
    acme: &crate::acme::Acme,
) -> Service<TlsFront<Engine>> {
    let redirects: HashMap<u16, u16> = config
        .listeners
        .iter()
        .filter_map(|l| match l.kind {
            ListenerKind::RedirectHttps { port } => Some((l.addr.port(), port)),
            _ => None,
        })
        .collect();
    let p = &config.proxy;
    let mut policy = Policy::new(routes, access_log, redirects, p.max_retries);
    if acme
        .managed
        .iter()
        .any(|m| m.settings.challenge == crate::acme::ChallengeKind::Http01)
    {
        policy.acme = Some(acme.challenges.clone());
    }
    let policy = Arc::new(policy);
    let settings = Settings {
        header_timeout: p.client_header_timeout,
        keepalive_timeout: p.client_keepalive_timeout,
        body_timeout: p.client_body_timeout,
        max_connections: p.max_connections,
        h2c: p.h2c,
        pool_capacity: p.upstream_keepalive_pool,
    };
    let h2 = H2::new(
        policy.clone(),
        settings.clone(),
        h2::Settings {
            max_concurrent_streams: p.h2_max_concurrent_streams,
            max_header_list_size: p.max_header_list_size,
            limits: h2::guard::Limits::default(),
        },
    );
    let engine = Engine::new(policy, settings, Arc::new(h2));
    let front = TlsFront::new(engine, tls, p.client_header_timeout);
    let mut proxy = Service::new("proxy".to_string(), front);
    for l in &config.listeners {
        // Every listener is TCP to pingora: TLS is TlsFront's. The engine buffers itself (and
        // holds no buffer while a connection is idle), and so does rustls: pingora's 64 KiB
        // per-connection read buffer would be most of their memory.
        proxy.add_listener(
            ListenerConfig::tcp(l.addr.to_string()).l4_buffer(L4BufferSettings::unbuffered()),
        );
    }
    proxy
}

/// /metrics, /status and /healthz.
fn admin_service(addr: SocketAddr, supervisor: &SupervisorHandle) -> Service<Admin> {
    let mut admin = Service::new("admin".to_string(), Admin::new(supervisor.clone()));
    admin.add_tcp(&addr.to_string());
    admin
}

/// The listeners for load balancers on other machines: HAProxy's agent-check
/// (`control.agent`) and `GET /healthz` alone (`control.health`).
fn balancer_services(
    config: &Config,
    supervisor: &SupervisorHandle,
) -> Vec<Box<dyn pingora::services::ServiceWithDependents>> {
    let mut out: Vec<Box<dyn pingora::services::ServiceWithDependents>> = Vec::new();
    if let Some(addr) = config.agent {
        let mut agent = Service::new(
            "agent-check".to_string(),
            crate::agent::Agent::new(supervisor.clone()),
        );
        agent.add_tcp(&addr.to_string());
        out.push(Box::new(agent));
    }
    if let Some(addr) = config.health {
        let mut health = Service::new("health".to_string(), Admin::health_only(supervisor.clone()));
        health.add_tcp(&addr.to_string());
        out.push(Box::new(health));
    }
    out
}

/// Runs pingora's server on a thread of its own until the first report: the supervisor
/// stopped (the normal end), the grace period ran out (`Server::run` returned), or a service
/// failed after startup.
fn serve(
    server: Server,
    shutdown: signals::Shutdown,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
) -> Result<Stopped, StartupError> {
    std::thread::Builder::new()
        .name("pingora".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(shutdown),
            });
            let _ = events_tx.send(Event::ServerReturned);
        })
        .map_err(StartupError::Thread)?;
    // Every sender now lives in that thread (in the server's services): if it panics, they
    // are dropped with it and `recv` fails.
    match events.recv() {
        Ok(Event::SupervisorStopped) => Ok(Stopped::Graceful),
        Ok(Event::ServerReturned) => {
            tracing::warn!("grace period over before every instance stopped");
            Ok(Stopped::GracePeriodOver)
        }
        Ok(Event::Failed(e)) => Err(e),
        Err(mpsc::RecvError) => Err(StartupError::ServerPanicked),
    }
}

/// A background service running one future (the control socket, the SIGHUP reload).
struct Task<F>(std::sync::Mutex<Option<F>>);

impl<F> Task<F> {
    fn new(f: F) -> Task<F> {
        Task(std::sync::Mutex::new(Some(f)))
    }
}

#[async_trait]
impl<F> BackgroundService for Task<F>
where
    F: Future<Output = ()> + Send + 'static,
{
    async fn start(&self, _shutdown: ShutdownWatch) {
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

/// Reload: load every TLS listener's certificates again (all of them, before replacing any);
/// any error leaves every listener with its current certificates. ALPN and resumption
/// settings are the listener's own until `tqproxy upgrade`: a change is reported, not applied.
fn reload_certificates(
    resolvers: &[(SocketAddr, Arc<SniResolver>, Negotiation)],
    config: &Config,
) -> Result<Vec<String>, String> {
    let mut stores = Vec::new();
    let mut lines = Vec::new();
    for (addr, resolver, how) in resolvers {
        let configured = config
            .listeners
            .iter()
            .filter(|l| l.addr == *addr)
            .find_map(|l| tls_listener(&l.kind));
        // A listener removed from the configuration keeps serving until `tqproxy upgrade`.
        let Some((files, new_how)) = configured else {
            continue;
        };
        let store = CertStore::load(files).map_err(|e| format!("TLS listener {addr}: {e}"))?;
        if new_how != *how {
            lines.push(format!(
                "warning: TLS {addr}: h2/session_cache/tickets changed; they apply at `tqproxy upgrade`"
            ));
        }
        let new_acme = config
            .listeners
            .iter()
            .filter(|l| l.addr == *addr)
            .find_map(|l| crate::acme::settings_of(&l.kind));
        if resolver.acme_settings().first() != new_acme {
            lines.push(format!(
                "warning: TLS {addr}: tls.acme changed; it applies at `tqproxy upgrade`"
            ));
        }
        stores.push((addr, resolver, store));
    }
    for (addr, resolver, store) in stores {
        let mut parts = store.summary.clone();
        for a in resolver.acme_settings() {
            parts.push(format!(
                "ACME {} (renewed by tqproxy)",
                a.domains.join(", ")
            ));
        }
        lines.push(format!("TLS {addr}: {}", parts.join("; ")));
        resolver.replace(store);
    }
    Ok(lines)
}

/// The new process's side of `tqproxy upgrade`, once its own instances are up: check them,
/// take over the control socket, and tell the old process (SIGQUIT) to hand over its
/// listening sockets — pingora's bootstrap receives them — then drain and stop. If any step
/// fails, our own instances are stopped and [`run`] returns [`StartupError::Handover`].
struct Handover {
    old: u32,
    supervisor: SupervisorHandle,
    config: Arc<Config>,
    control_listener: std::sync::Mutex<Option<oneshot::Sender<std::os::unix::net::UnixListener>>>,
    control_ino: Arc<AtomicU64>,
    events: mpsc::Sender<Event>,
}

#[async_trait]
impl BackgroundService for Handover {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Err(reason) = self.take_over().await else {
            return;
        };
        tracing::error!(
            "upgrade aborted, the old tqproxy (pid {}) keeps serving: {reason}",
            self.old
        );
        // Our own instances go with us.
        self.supervisor.shutdown().await;
        let _ = self.events.send(Event::Failed(StartupError::Handover {
            old: self.old,
            reason,
        }));
    }
}

impl Handover {
    async fn take_over(&self) -> Result<(), String> {
        let st = self
            .supervisor
            .status()
            .await
            .ok_or_else(|| "supervisor gone".to_string())?;
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
            // The old process was never told anything.
            return Err(format!("workers not ready: {}", not_ready.join(", ")));
        }
        let listener = control::bind_replacing(&self.config.control_socket)?;
        if let Ok(m) = std::fs::metadata(&self.config.control_socket) {
            self.control_ino
                .store(std::os::unix::fs::MetadataExt::ino(&m), Ordering::SeqCst);
        }
        if let Some(tx) = self
            .control_listener
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
        nix::sys::signal::kill(old, nix::sys::signal::Signal::SIGQUIT)
            .map_err(|e| format!("cannot signal pid {}: {e}", self.old))?;
        tracing::info!(
            old = self.old,
            "asked the old tqproxy to hand over its listening sockets"
        );
        sd_notify(&format!(
            "MAINPID={}\nREADY=1\nSTATUS=upgraded from pid {}",
            std::process::id(),
            self.old
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[test]
    fn an_address_in_use_is_a_bind_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e =
            check_listen_addresses([(free_addr(), "listener"), (addr, "listener")]).unwrap_err();
        assert!(
            matches!(&e, StartupError::Bind { addr: a, what: "listener", cause }
                     if *a == addr && cause.kind() == std::io::ErrorKind::AddrInUse),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("cannot listen on {addr} (listener): ")),
            "{msg}"
        );
    }

    #[test]
    fn two_listeners_on_one_address_collide() {
        let addr = free_addr();
        let e = check_listen_addresses([(addr, "listener"), (addr, "admin listener")]).unwrap_err();
        assert!(
            matches!(&e, StartupError::Bind { addr: a, what: "admin listener", .. } if *a == addr),
            "{e:?}"
        );
    }

    #[test]
    fn free_addresses_pass_and_are_let_go() {
        let (a, b) = (free_addr(), free_addr());
        check_listen_addresses([(a, "listener"), (b, "admin listener")]).unwrap();
        // pingora binds them next.
        let _a = std::net::TcpListener::bind(a).unwrap();
        let _b = std::net::TcpListener::bind(b).unwrap();
    }
}
