//! The control socket: typed JSON requests from the CLI over a unix socket (mode 0600).
//!
//! One request per connection: the client writes one JSON line, the server answers with one
//! JSON line when the operation has finished (a reload returns when every swap is done).
//! Malformed or oversized requests get an error response; the connection is then closed.
//!
//! Every failure carries an [`ErrorKind`] next to its message: in an outcome's lines (from the
//! supervisor) and in [`ControlResponse::Error`] (the control service's own refusals,
//! [`ControlError`]). The CLI's exit code comes from that kind; [`CallError`] is what can go
//! wrong on the client's side before there is an answer.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::config::Strategy;
use crate::status::{ErrorKind, Failure, Outcome, StatusReport};
use crate::supervisor::{Request, SupervisorHandle};

/// Largest request accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Largest response the CLI reads (a status document of hundreds of instances is well under
/// 1 MiB).
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// Most instances a `scale` may ask for (as `instances:` in a worker.yaml).
const MAX_INSTANCES: u32 = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Ping {},
    Status {},
    Scale {
        worker: String,
        instances: u32,
    },
    Restart {
        worker: String,
    },
    Deploy {
        worker: String,
        strategy: Option<Strategy>,
    },
    Rollback {
        worker: String,
    },
    /// A canary in progress: the new generation takes 100 % now.
    Promote {
        worker: String,
    },
    /// A canary in progress: roll it back now.
    Abort {
        worker: String,
    },
    Reload {},
    Stop {},
    /// Start `binary` as the successor of this process (`tqproxy upgrade`). Spawned by the
    /// running tqproxy, so the new process stays in the same service (systemd unit, cgroup).
    Upgrade {
        binary: PathBuf,
    },
    /// `tqproxy certs renew DOMAIN`: renew the ACME certificate covering `domain` now.
    RenewCertificate {
        domain: String,
    },
    /// Take the node out of the load balancer's rotation ([`crate::drain`]); answered once no
    /// request is in flight, or after `timeout_ms` (at most [`MAX_DRAIN_MS`]).
    Drain {
        timeout_ms: u64,
    },
    /// Put it back.
    Undrain {},
}

/// The longest wait a `drain` may ask for (an hour).
pub const MAX_DRAIN_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlResponse {
    Pong {
        pid: u32,
        version: String,
    },
    Status(StatusReport),
    Outcome(Outcome),
    Stopping {
        pid: u32,
    },
    Upgrading {
        pid: u32,
        log: PathBuf,
    },
    /// `drain`, `undrain`: the node's state now, and whether in-flight requests finished.
    Drain(crate::drain::DrainReport),
    /// The request was refused or failed before reaching a worker. `kind` is absent from an
    /// older tqproxy's answer: it then reads as [`ErrorKind::Internal`].
    Error {
        message: String,
        #[serde(default)]
        kind: ErrorKind,
    },
}

impl ControlResponse {
    /// The error response for `e`: its message and its kind.
    pub fn error(e: &impl Failure) -> ControlResponse {
        ControlResponse::Error {
            message: e.to_string(),
            kind: e.kind(),
        }
    }
}

/// What the control service refuses or fails at by itself (the supervisor's failures come back
/// in an [`Outcome`] instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("request larger than {MAX_REQUEST} bytes")]
    RequestTooLarge,
    #[error("cannot read request: {0}")]
    Unreadable(String),
    #[error("timed out waiting for a request")]
    RequestTimeout,
    /// Not JSON, not a known command, a missing or unknown field, a wrong type.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("at most {MAX_INSTANCES} instances per worker ({asked} asked)")]
    TooManyInstances { asked: u32 },
    #[error("tqproxy is shutting down")]
    ShuttingDown,
    /// `upgrade` names something that is not an absolute path to a file.
    #[error("{} is not an absolute path to a file", .0.display())]
    NotABinary(PathBuf),
    /// The successor process could not be started (nothing changed).
    #[error("cannot start the new tqproxy: {0}")]
    UpgradeFailed(String),
}

impl Failure for ControlError {
    fn kind(&self) -> ErrorKind {
        match self {
            ControlError::RequestTooLarge
            | ControlError::Unreadable(_)
            | ControlError::RequestTimeout
            | ControlError::InvalidRequest(_)
            | ControlError::TooManyInstances { .. }
            | ControlError::NotABinary(_) => ErrorKind::BadRequest,
            ControlError::ShuttingDown => ErrorKind::ShuttingDown,
            ControlError::UpgradeFailed(_) => ErrorKind::StartFailed,
        }
    }
}

/// Why the CLI has no answer to show: it could not reach tqproxy, or what came back is not a
/// response. A refusal by tqproxy is not one of these: it is a [`ControlResponse::Error`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing accepts connections at the socket (no file, refused, not allowed): tqproxy is
    /// not running there. The CLI's exit code 3.
    #[error("cannot reach tqproxy at {}: {cause} (is it running? start it with `tqproxy run`)", .socket.display())]
    Unreachable {
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot encode request: {0}")]
    Encode(String),
    #[error("send: {0}")]
    Send(std::io::Error),
    #[error("receive: {0}")]
    Receive(std::io::Error),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("tqproxy closed the connection without answering")]
    NoAnswer,
    #[error("tqproxy's answer is larger than {} MiB; not read", MAX_RESPONSE >> 20)]
    ResponseTooLarge,
    #[error("receive: stream did not contain valid UTF-8")]
    NotUtf8,
    #[error("bad response: {0}")]
    BadResponse(String),
}

impl CallError {
    /// The CLI's exit code: 3 when tqproxy could not be reached, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            CallError::Unreachable { .. } => 3,
            _ => 1,
        }
    }
}

/// The server's reading of one request: `line` is what came before the first `\n` (that
/// included) or before the client closed, of which the server reads at most
/// `MAX_REQUEST + 1` bytes. Every fault is an error for the client (of kind
/// [`ErrorKind::BadRequest`]), never a panic.
pub fn parse_request(line: &[u8]) -> Result<ControlRequest, ControlError> {
    if line.len() > MAX_REQUEST {
        return Err(ControlError::RequestTooLarge);
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| ControlError::Unreadable("stream did not contain valid UTF-8".to_string()))?;
    serde_json::from_str(text.trim()).map_err(|e| ControlError::InvalidRequest(e.to_string()))
}

/// The line the client sends for `req`, `\n` included (an error for a path that is not UTF-8).
pub fn encode_request(req: &ControlRequest) -> Result<Vec<u8>, CallError> {
    let mut line = serde_json::to_vec(req).map_err(|e| CallError::Encode(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

/// The line the server answers with, `\n` included (an error response if `response` cannot
/// be encoded).
pub fn encode_response(response: &ControlResponse) -> Vec<u8> {
    let mut out = serde_json::to_vec(response).unwrap_or_else(|e| {
        let message = format!("cannot encode response: {e}");
        serde_json::json!({ "type": "error", "message": message, "kind": ErrorKind::Internal })
            .to_string()
            .into_bytes()
    });
    out.push(b'\n');
    out
}

/// The client's reading of the server's answer: `line` is what came before the first `\n`
/// (that included) or before the server closed, of which the client reads at most
/// `MAX_RESPONSE + 1` bytes.
pub fn parse_response(line: &[u8]) -> Result<ControlResponse, CallError> {
    if line.is_empty() {
        return Err(CallError::NoAnswer);
    }
    if line.len() > MAX_RESPONSE {
        return Err(CallError::ResponseTooLarge);
    }
    let text = std::str::from_utf8(line).map_err(|_| CallError::NotUtf8)?;
    serde_json::from_str::<ControlResponse>(text).map_err(|e| CallError::BadResponse(e.to_string()))
}

/// Serves the control socket until the process exits.
pub struct ControlService {
    socket: PathBuf,
    /// The inode of the socket file this process serves (0: none yet), for the unlink at exit.
    socket_ino: Arc<AtomicU64>,
    supervisor: SupervisorHandle,
    stop: Arc<Notify>,
    /// When this process last started a successor (`tqproxy upgrade`): while it may be taking
    /// the path over, a missing socket file is not ours to create again.
    successor_at: std::sync::Mutex<Option<Instant>>,
}

/// How often the socket file is checked, and how long after starting a successor it is left
/// alone.
const SOCKET_CHECK: Duration = Duration::from_secs(1);
const HANDOVER_GRACE: Duration = Duration::from_secs(120);

impl ControlService {
    pub fn new(
        socket: PathBuf,
        socket_ino: Arc<AtomicU64>,
        supervisor: SupervisorHandle,
        stop: Arc<Notify>,
    ) -> ControlService {
        ControlService {
            socket,
            socket_ino,
            supervisor,
            stop,
            successor_at: std::sync::Mutex::new(None),
        }
    }

    /// The socket file was deleted under us (a cleanup script, a `rm -rf run/`): bind it
    /// again, so that the CLI can still reach this process. Not while a successor may be
    /// taking the path over.
    fn rebind_if_deleted(&self) -> Option<UnixListener> {
        let recent = self
            .successor_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < HANDOVER_GRACE);
        if recent
            || !matches!(std::fs::symlink_metadata(&self.socket),
                         Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        {
            return None;
        }
        match bind(&self.socket).and_then(|l| UnixListener::from_std(l).map_err(|e| e.to_string()))
        {
            Ok(l) => {
                if let Ok(m) = std::fs::metadata(&self.socket) {
                    self.socket_ino.store(m.ino(), Ordering::SeqCst);
                }
                tracing::warn!(socket = %self.socket.display(), "control socket file was deleted: bound it again");
                Some(l)
            }
            Err(e) => {
                tracing::warn!(socket = %self.socket.display(), error = %e, "control socket file was deleted and cannot be bound again");
                None
            }
        }
    }
}

/// Binds the socket (0600), refusing to replace the socket of a live tqproxy.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another tqproxy is already running with control socket {}",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
    }
    // Create it private from the start: no window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// Binds the socket even if another tqproxy listens on it (`tqproxy upgrade`: the new process
/// takes the path over; the old one keeps its already-accepted connections).
pub fn bind_replacing(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    bind(path)
}

/// Removes the socket file if it is still the one we created (a newer tqproxy may own the
/// path after an upgrade).
pub fn unlink_if_ours(path: &Path, ino: u64) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
        let _ = std::fs::remove_file(path);
    }
}

impl ControlService {
    /// `tqproxy run --upgrade-from <our pid>` with `binary`, output appended to
    /// `logs/tqproxy.log`, in its own process group (a terminal's ^C must not reach it).
    async fn spawn_successor(&self, binary: &Path) -> Result<(u32, PathBuf), ControlError> {
        use std::os::unix::process::CommandExt;
        if !binary.is_absolute() || !binary.is_file() {
            return Err(ControlError::NotABinary(binary.to_path_buf()));
        }
        let config = self
            .supervisor
            .config()
            .await
            .ok_or(ControlError::ShuttingDown)?;
        let failed = ControlError::UpgradeFailed;
        std::fs::create_dir_all(&config.logs_dir)
            .map_err(|e| failed(format!("{}: {e}", config.logs_dir.display())))?;
        let log_path = config.logs_dir.join("tqproxy.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(format!("cannot open {}: {e}", log_path.display())))?;
        let out = log
            .try_clone()
            .map_err(|e| failed(format!("{}: {e}", log_path.display())))?;
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&config.file)
            .args(["run", "--upgrade-from", &std::process::id().to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| failed(format!("{}: {e}", binary.display())))?;
        *self.successor_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        tracing::info!(pid = child.id(), binary = %binary.display(), "upgrade: started the new tqproxy");
        Ok((child.id(), log_path))
    }

    pub async fn serve(self, listener: std::os::unix::net::UnixListener) {
        let listener = match UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "control socket unusable");
                return;
            }
        };
        tracing::info!(socket = %self.socket.display(), "control socket ready");
        let me = Arc::new(self);
        let mut listener = listener;
        let mut check = tokio::time::interval(SOCKET_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let me = me.clone();
                        tokio::spawn(async move { me.handle(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = check.tick() => {
                    if let Some(l) = me.rebind_if_deleted() {
                        listener = l;
                    }
                }
            }
        }
    }

    async fn handle(&self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
        let mut line = Vec::new();
        let response = match tokio::time::timeout(
            Duration::from_secs(10),
            reader.read_until(b'\n', &mut line),
        )
        .await
        {
            Err(_) => ControlResponse::error(&ControlError::RequestTimeout),
            Ok(Err(e)) => ControlResponse::error(&ControlError::Unreadable(e.to_string())),
            Ok(Ok(_)) => match parse_request(&line) {
                Err(e) => ControlResponse::error(&e),
                Ok(req) => self.dispatch(req).await,
            },
        };
        let out = encode_response(&response);
        let _ = write.write_all(&out).await;
        let _ = write.shutdown().await;
        // Only now: the client has its answer before the process starts going away.
        if matches!(response, ControlResponse::Stopping { .. }) {
            self.stop.notify_one();
        }
    }

    async fn dispatch(&self, req: ControlRequest) -> ControlResponse {
        let s = &self.supervisor;
        let outcome = |o: Outcome| ControlResponse::Outcome(o);
        match req {
            ControlRequest::Ping {} => ControlResponse::Pong {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            ControlRequest::Status {} => match s.status().await {
                Some(st) => ControlResponse::Status(st),
                None => ControlResponse::error(&ControlError::ShuttingDown),
            },
            ControlRequest::Scale { worker, instances } => {
                if instances > MAX_INSTANCES {
                    return ControlResponse::error(&ControlError::TooManyInstances {
                        asked: instances,
                    });
                }
                outcome(s.request(Request::Scale { worker, instances }).await)
            }
            ControlRequest::Restart { worker } => {
                outcome(s.request(Request::Restart { worker }).await)
            }
            ControlRequest::Deploy { worker, strategy } => {
                outcome(s.request(Request::Deploy { worker, strategy }).await)
            }
            ControlRequest::Rollback { worker } => {
                outcome(s.request(Request::Rollback { worker }).await)
            }
            ControlRequest::Promote { worker } => {
                outcome(s.request(Request::Promote { worker }).await)
            }
            ControlRequest::Abort { worker } => outcome(s.request(Request::Abort { worker }).await),
            ControlRequest::Reload {} => outcome(s.request(Request::Reload).await),
            ControlRequest::Upgrade { binary } => match self.spawn_successor(&binary).await {
                Ok((pid, log)) => ControlResponse::Upgrading { pid, log },
                Err(e) => ControlResponse::error(&e),
            },
            ControlRequest::RenewCertificate { domain } => {
                outcome(Outcome::single("-", crate::acme::force_renewal(&domain)))
            }
            ControlRequest::Drain { timeout_ms } => {
                if timeout_ms > MAX_DRAIN_MS {
                    return ControlResponse::error(&ControlError::InvalidRequest(format!(
                        "a drain waits at most {MAX_DRAIN_MS} ms ({timeout_ms} asked)"
                    )));
                }
                self.drain(true, Duration::from_millis(timeout_ms)).await
            }
            ControlRequest::Undrain {} => self.drain(false, Duration::ZERO).await,
            ControlRequest::Stop {} => {
                // The shutdown itself is triggered by `handle` once this answer is written.
                ControlResponse::Stopping {
                    pid: std::process::id(),
                }
            }
        }
    }
}

impl ControlService {
    /// `drain` (`on`) or `undrain`: sets the node's state, then (`drain`) waits for it to get
    /// quiet, up to `timeout`.
    async fn drain(&self, on: bool, timeout: Duration) -> ControlResponse {
        let Some(config) = self.supervisor.config().await else {
            return ControlResponse::error(&ControlError::ShuttingDown);
        };
        let already = crate::drain::drained() == on;
        let warning = crate::drain::set(&config.run_dir, on).err();
        tracing::info!(
            drained = on,
            already,
            "node {}",
            if on { "drained" } else { "undrained" }
        );
        let (quiet, in_flight, waited) = if on {
            let s = &self.supervisor;
            crate::drain::wait_quiet(timeout, || async {
                s.status().await.map(|st| crate::drain::load(&st))
            })
            .await
        } else {
            let in_flight = self
                .supervisor
                .status()
                .await
                .map_or(0, |st| crate::drain::load(&st).0);
            (in_flight == 0, in_flight, Duration::ZERO)
        };
        ControlResponse::Drain(crate::drain::DrainReport {
            drained: on,
            already,
            quiet,
            in_flight,
            waited_ms: waited.as_millis() as u64,
            warning,
        })
    }
}

/// Client side: sends one request and waits (up to `timeout`) for the response, of which it
/// reads at most [`MAX_RESPONSE`] bytes.
pub async fn call(
    socket: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, CallError> {
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|cause| CallError::Unreachable {
                socket: socket.to_path_buf(),
                cause,
            })?;
        let (read, mut write) = stream.into_split();
        let line = encode_request(req)?;
        write.write_all(&line).await.map_err(CallError::Send)?;
        let mut reader = BufReader::new(read).take(MAX_RESPONSE as u64 + 1);
        let mut resp = Vec::new();
        reader
            .read_until(b'\n', &mut resp)
            .await
            .map_err(CallError::Receive)?;
        parse_response(&resp)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_typed_and_strict() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"scale","worker":"hello","instances":3}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Scale {
                worker: "hello".into(),
                instances: 3
            }
        );
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"deploy","worker":"w","strategy":"bluegreen"}"#)
                .unwrap();
        assert_eq!(
            r,
            ControlRequest::Deploy {
                worker: "w".into(),
                strategy: Some(Strategy::Bluegreen)
            }
        );
        for bad in [
            r#"{"cmd":"scale","worker":"hello"}"#,
            r#"{"cmd":"scale","worker":"hello","instances":-1}"#,
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"deploy","worker":"w","strategy":"sideways"}"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<ControlRequest>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn lines_are_parsed_as_the_socket_reads_them() {
        assert_eq!(
            parse_request(b"{\"cmd\":\"ping\"}\n"),
            Ok(ControlRequest::Ping {})
        );
        let refused = |line: &[u8]| {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::BadRequest, "{e}");
            e.to_string()
        };
        assert!(refused(b"\xff\xfe\n").contains("cannot read request"));
        let big = vec![b' '; MAX_REQUEST + 1];
        assert!(refused(&big).contains("larger than"));
        assert!(refused(b"").contains("invalid request"));
        let req = ControlRequest::Upgrade {
            binary: "/usr/bin/tqproxy".into(),
        };
        assert_eq!(parse_request(&encode_request(&req).unwrap()), Ok(req));
        let resp = ControlResponse::Error {
            message: "two\nlines".into(),
            kind: ErrorKind::Busy,
        };
        let line = encode_response(&resp);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(parse_response(&line).unwrap(), resp);
        assert!(matches!(parse_response(b""), Err(CallError::NoAnswer)));
        let huge = vec![b' '; MAX_RESPONSE + 1];
        let e = parse_response(&huge).unwrap_err();
        assert!(matches!(e, CallError::ResponseTooLarge), "{e}");
        assert_eq!(
            e.to_string(),
            "tqproxy's answer is larger than 16 MiB; not read"
        );
    }

    #[test]
    fn an_error_response_carries_its_kind_and_an_old_one_reads_as_internal() {
        let resp = ControlResponse::error(&ControlError::ShuttingDown);
        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "error", "message": "tqproxy is shutting down", "kind": "shutting_down"
            })
        );
        assert_eq!(parse_response(&encode_response(&resp)).unwrap(), resp);
        // An older tqproxy sends no kind.
        let old = parse_response(br#"{"type":"error","message":"boom"}"#).unwrap();
        assert_eq!(
            old,
            ControlResponse::Error {
                message: "boom".into(),
                kind: ErrorKind::Internal
            }
        );
        // An outcome line keeps its kind across the socket; one without reads as `None`.
        let o = Outcome::from_result(
            "w",
            Err::<String, _>(crate::supervisor::SupervisorError::NoSuchWorker {
                worker: "w".into(),
            }),
        );
        let line = encode_response(&ControlResponse::Outcome(o.clone()));
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains(r#""kind":"no_such_worker""#), "{text}");
        assert_eq!(parse_response(&line).unwrap(), ControlResponse::Outcome(o));
        let old = parse_response(
            br#"{"type":"outcome","ok":false,"lines":[{"worker":"w","ok":false,"message":"m"}]}"#,
        )
        .unwrap();
        let ControlResponse::Outcome(old) = old else {
            panic!("{old:?}")
        };
        assert_eq!(old.lines[0].kind, None);
    }

    #[test]
    fn control_errors_have_the_kind_the_cli_acts_on() {
        for (e, kind) in [
            (ControlError::RequestTimeout, ErrorKind::BadRequest),
            (
                ControlError::TooManyInstances { asked: 1000 },
                ErrorKind::BadRequest,
            ),
            (ControlError::NotABinary("x".into()), ErrorKind::BadRequest),
            (ControlError::ShuttingDown, ErrorKind::ShuttingDown),
            (
                ControlError::UpgradeFailed("/x: ENOEXEC".into()),
                ErrorKind::StartFailed,
            ),
        ] {
            assert_eq!(e.kind(), kind, "{e}");
        }
        assert_eq!(
            ControlError::TooManyInstances { asked: 1000 }.to_string(),
            "at most 256 instances per worker (1000 asked)"
        );
    }

    #[test]
    fn bind_refuses_non_sockets_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.sock");
        std::fs::write(&p, "file").unwrap();
        assert!(bind(&p).unwrap_err().contains("not a socket"));
        std::fs::remove_file(&p).unwrap();
        let l = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // a live socket is not replaced
        assert!(bind(&p).unwrap_err().contains("already running"));
        drop(l);
        // a stale one is
        assert!(bind(&p).is_ok());
    }
}
