//! The shared test harness: a temporary tqproxy installation (global config + workers) run
//! as the real binary, a tiny HTTP/1.1 client, a load generator that counts every failure,
//! and polling with deadlines (no sleeps to "wait for" something).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tqproxy::status::{InstanceStatus, StatusReport, WorkerStatus};

pub const TQPROXY: &str = env!("CARGO_BIN_EXE_tqproxy");

// The workers are binaries of another package (`tqproxy-workers`, workers/), which get no
// `CARGO_BIN_EXE_*`: they are found next to tqproxy, in the same target directory and profile.
// `cargo test` at the root builds them (both packages are default members of the workspace);
// `require_workers` says how to build them when one is missing.

/// The benchmark and test backend (workers/backend): the worker most tests run.
pub const BACKEND: &str = next_to_tqproxy!("backend");
/// The example worker (workers/hello).
pub const HELLO: &str = next_to_tqproxy!("hello");
pub const CHAOS: &str = next_to_tqproxy!("chaos");
pub const PROBE: &str = next_to_tqproxy!("probe");
pub const RAWECHO: &str = next_to_tqproxy!("rawecho");

/// `<the directory of TQPROXY>/<name>`, as a `&'static str` computed at compile time.
macro_rules! next_to_tqproxy {
    ($name:literal) => {{
        const DIR: usize = dir_len(TQPROXY.as_bytes());
        const PATH: [u8; DIR + $name.len()] = join(TQPROXY.as_bytes(), DIR, $name.as_bytes());
        match std::str::from_utf8(&PATH) {
            Ok(path) => path,
            Err(_) => panic!("the tqproxy path is not UTF-8"),
        }
    }};
}
use next_to_tqproxy;

/// The length of `path` up to and including its last `/`.
const fn dir_len(path: &[u8]) -> usize {
    let mut i = path.len();
    while i > 0 && path[i - 1] != b'/' {
        i -= 1;
    }
    i
}

/// The first `dir_len` bytes of `dir`, then `name`.
const fn join<const N: usize>(dir: &[u8], dir_len: usize, name: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < dir_len {
        out[i] = dir[i];
        i += 1;
    }
    while i < N {
        out[i] = name[i - dir_len];
        i += 1;
    }
    out
}

/// Panics, naming the command that builds them, when a worker binary is missing (e.g. after
/// `cargo test -p tqproxy` or `cargo test --test it`, which build tqproxy's targets only).
pub fn require_workers() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let missing: Vec<&str> = [BACKEND, HELLO, CHAOS, PROBE, RAWECHO]
            .into_iter()
            .filter(|p| !Path::new(p).is_file())
            .collect();
        let profile = if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        };
        assert!(
            missing.is_empty(),
            "worker binaries missing: {}; build them with `cargo build{profile} -p tqproxy-workers` \
             (`cargo test` at the repository root builds them too)",
            missing.join(", ")
        );
    });
}

/// The repository root (for the shipped configs and workers).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `f` until it returns `Some`, or panics after `timeout` saying what never happened.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Disjoint port blocks per test environment (tests run in parallel threads).
fn port_block(size: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread different test processes apart too.
    let base = 20000 + (std::process::id() % 20) as u16 * 1500;
    loop {
        let start = base + NEXT.fetch_add(size, Ordering::SeqCst);
        assert!(start < 65000 - size, "out of test ports");
        // Skip blocks where something already listens.
        if (start..start + size).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return start;
        }
    }
}

/// One worker of a test environment.
#[derive(Clone, Debug)]
pub struct WorkerDef {
    pub name: String,
    /// worker.yaml body; `{PROGRAM}` etc. are written by the constructor helpers.
    pub yaml: String,
}

impl WorkerDef {
    pub fn new(name: &str, yaml: &str) -> WorkerDef {
        WorkerDef {
            name: name.into(),
            yaml: yaml.into(),
        }
    }

    /// The `backend` worker (the benchmark and test backend: `workers/backend`) with
    /// `instances` and extra YAML lines.
    pub fn backend(name: &str, routes: &str, instances: u32, extra: &str) -> WorkerDef {
        WorkerDef::with_defaults(
            name,
            &format!("command: [\"{BACKEND}\"]\nroutes: {routes}\ninstances: {instances}\n"),
            &[
                (
                    "health",
                    "{ path: /health, interval: 200ms, timeout: 500ms, unhealthy_after: 3 }",
                ),
                ("stop_timeout", "5s"),
                ("drain_timeout", "10s"),
            ],
            extra,
        )
    }

    /// `head` + the defaults whose keys `extra` does not set + `extra`.
    fn with_defaults(name: &str, head: &str, defaults: &[(&str, &str)], extra: &str) -> WorkerDef {
        let mut yaml = head.to_string();
        for (k, v) in defaults {
            if !extra.lines().any(|l| l.starts_with(&format!("{k}:"))) {
                yaml.push_str(&format!("{k}: {v}\n"));
            }
        }
        yaml.push_str(extra);
        WorkerDef::new(name, &yaml)
    }

    /// The `rawecho` worker (answers with the raw bytes of each request), one instance, without
    /// a health path: tqproxy only checks that its port accepts, so no health request ever
    /// reaches it (or its `RAWECHO_LOG`, which `extra` sets with `env:`).
    pub fn rawecho(name: &str, routes: &str, extra: &str) -> WorkerDef {
        WorkerDef::with_defaults(
            name,
            &format!("command: [\"{RAWECHO}\"]\nroutes: {routes}\ninstances: 1\n"),
            &[
                (
                    "health",
                    "{ interval: 200ms, timeout: 500ms, unhealthy_after: 3 }",
                ),
                ("stop_timeout", "2s"),
                ("drain_timeout", "2s"),
            ],
            extra,
        )
    }

    pub fn chaos(name: &str, routes: &str, instances: u32, extra: &str) -> WorkerDef {
        WorkerDef::with_defaults(
            name,
            &format!("command: [\"{CHAOS}\"]\nroutes: {routes}\ninstances: {instances}\n"),
            &[
                (
                    "health",
                    "{ path: /health, interval: 200ms, timeout: 300ms, unhealthy_after: 2 }",
                ),
                ("stop_timeout", "2s"),
                ("drain_timeout", "5s"),
            ],
            extra,
        )
    }
}

/// A temporary installation: `conf/tqproxy.yaml`, `workers/*/worker.yaml`, logs, run dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub listen: SocketAddr,
    pub ports: (u16, u16),
    pub child: Option<Child>,
    global_extra: String,
}

impl Env {
    pub fn new(workers: &[WorkerDef]) -> Env {
        Env::with_global(workers, "")
    }

    /// `global_extra` is appended to the global YAML.
    pub fn with_global(workers: &[WorkerDef], global_extra: &str) -> Env {
        require_workers();
        let dir = tempfile::Builder::new()
            .prefix("tqproxy-it-")
            .tempdir()
            .expect("tempdir");
        let block = port_block(40);
        let listen = SocketAddr::from(([127, 0, 0, 1], block));
        let env = Env {
            dir,
            listen,
            ports: (block + 1, block + 39),
            child: None,
            global_extra: global_extra.into(),
        };
        env.write_global();
        for w in workers {
            env.write_worker(w);
        }
        env
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("conf/tqproxy.yaml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/tqproxy.sock")
    }

    pub fn write_global(&self) {
        let conf = self.dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        // No admin listener unless the test asks for one (its default port would be shared).
        let control = if self.global_extra.contains("control:") {
            ""
        } else {
            "control: { admin: off }\n"
        };
        let yaml = format!(
            "listen: [\"{}\"]\nports: \"{}-{}\"\nproxy: {{ threads: 1 }}\ncgroups: {{ base: tqproxy-it }}\n{control}{}",
            self.listen, self.ports.0, self.ports.1, self.global_extra
        );
        std::fs::write(conf.join("tqproxy.yaml"), yaml).unwrap();
    }

    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("workers").join(name)
    }

    pub fn write_worker(&self, w: &WorkerDef) {
        let d = self.worker_dir(&w.name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("worker.yaml"), &w.yaml).unwrap();
    }

    pub fn remove_worker(&self, name: &str) {
        std::fs::remove_dir_all(self.worker_dir(name)).unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tqproxy.out")
    }

    /// Starts `tqproxy run` and waits until every worker's instances are ready.
    pub fn start(&mut self) -> &mut Env {
        self.spawn(&[]);
        self.wait_running();
        self
    }

    pub fn spawn(&mut self, extra_args: &[&str]) {
        self.spawn_with_env(extra_args, &[]);
    }

    /// Starts tqproxy the way systemd starts a service: already inside the cgroup whose
    /// `cgroup.procs` is given (a shell joins it, then execs tqproxy under the same pid).
    pub fn spawn_in_cgroup(&mut self, procs: &Path) {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(procs)
            .arg(TQPROXY);
        self.launch(cmd, &[], &[]);
    }

    /// `cmd` (tqproxy, or what execs it) with `-c <conf> run` and `extra_args`, its output
    /// appended to the environment's log.
    fn launch(&mut self, mut cmd: Command, extra_args: &[&str], vars: &[(&str, &str)]) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = cmd
            .arg("-c")
            .arg(self.conf())
            .arg("run")
            .args(extra_args)
            .env("TQPROXY_LOG", "info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn tqproxy");
        self.child = Some(child);
    }

    pub fn wait_running(&self) {
        wait_for(
            "tqproxy running with every instance ready",
            Duration::from_secs(30),
            || {
                if let Some(code) = self.exited() {
                    panic!(
                        "tqproxy exited with {code:?} during startup:\n{}",
                        self.output()
                    );
                }
                let st = self.try_status()?;
                let all_ready = st.state == "running"
                    && st.workers.iter().all(|w| {
                        w.instances.len() as u32 == w.desired
                            && w.instances.iter().all(|i| i.state == "ready")
                    });
                all_ready.then_some(())
            },
        );
        // The proxy listens once the supervisor is ready.
        wait_for("proxy listening", Duration::from_secs(10), || {
            TcpStream::connect(self.listen).ok().map(|_| ())
        });
    }

    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        // try_wait needs &mut; peek through /proc instead.
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        if stat.split_whitespace().nth(2) == Some("Z") {
            Some(std::os::unix::process::ExitStatusExt::from_raw(0))
        } else {
            None
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    /// tqproxy's own output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("logs/{name}.log")))
            .unwrap_or_default()
    }

    /// Runs a CLI verb against this environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(TQPROXY)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run tqproxy cli")
    }

    /// Runs a verb and asserts exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "`tqproxy {}` failed ({:?}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn try_status(&self) -> Option<StatusReport> {
        let o = self.cli(&["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    pub fn status(&self) -> StatusReport {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed; tqproxy output:\n{}", self.output()))
    }

    pub fn worker(&self, name: &str) -> WorkerStatus {
        self.status()
            .workers
            .into_iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no worker {name} in status"))
    }

    pub fn instances(&self, name: &str) -> Vec<InstanceStatus> {
        self.worker(name).instances
    }

    /// Waits until the worker has exactly `n` instances, all ready and routed.
    pub fn wait_ready(&self, name: &str, n: usize) -> Vec<InstanceStatus> {
        wait_for(
            &format!("{n} ready routed instances of {name}"),
            Duration::from_secs(30),
            || {
                let inst = self
                    .try_status()?
                    .workers
                    .into_iter()
                    .find(|w| w.name == name)?
                    .instances;
                (inst.len() == n && inst.iter().all(|i| i.state == "ready" && i.routed))
                    .then_some(inst)
            },
        )
    }

    pub fn get(&self, path: &str) -> Response {
        http_get(self.listen, path, None)
    }

    pub fn get_host(&self, host: &str, path: &str) -> Response {
        http_get(self.listen, path, Some(host))
    }

    /// SIGTERM, then wait for exit (SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL tqproxy (no cleanup by it).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let pids: Vec<u32> = self
            .try_status()
            .map(|s| {
                s.workers
                    .iter()
                    .flat_map(|w| w.instances.iter().filter_map(|i| i.pid))
                    .collect()
            })
            .unwrap_or_default();
        let stopped = self.stop(Duration::from_secs(30));
        if std::thread::panicking() {
            eprintln!(
                "---- tqproxy output ({:?}) ----\n{}",
                stopped,
                self.output()
            );
            if let Ok(rd) = std::fs::read_dir(self.dir.path().join("logs")) {
                for e in rd.flatten() {
                    let s = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = s.lines().rev().take(40).collect();
                    eprintln!("---- {} (last 40 lines) ----", e.path().display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        // Whatever the test did, leave no process behind.
        for pid in pids {
            if alive(pid) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Every process whose command line contains `needle` (for leftover checks).
pub fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && alive(pid) {
            out.push((pid, cmd));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

pub fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> Response {
    request(addr, "GET", path, host, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut conn = Conn {
        r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
        w: s,
    };
    conn.send(
        method,
        path,
        host.unwrap_or("localhost"),
        headers,
        body,
        true,
    )?;
    conn.read_response(method == "HEAD")
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Result<Conn, String> {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.set_nodelay(true).ok();
        Ok(Conn {
            r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            w: s,
        })
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        close: bool,
    ) -> Result<(), String> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if close {
            req.push_str("Connection: close\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.w.write_all(&bytes).map_err(|e| format!("write: {e}"))
    }

    pub fn get(&mut self, path: &str) -> Result<Response, String> {
        self.send("GET", path, "localhost", &[], b"", false)?;
        self.read_response(false)
    }

    pub fn read_response(&mut self, head: bool) -> Result<Response, String> {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .map_err(|e| format!("read status: {e}"))?;
        if n == 0 {
            return Err("connection closed before the status line".into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.r
                .read_line(&mut h)
                .map_err(|e| format!("read header: {e}"))?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut body = Vec::new();
        if !head && status != 204 && status != 304 && !(100..200).contains(&status) {
            if headers
                .get("transfer-encoding")
                .is_some_and(|t| t.contains("chunked"))
            {
                loop {
                    let mut size = String::new();
                    self.r
                        .read_line(&mut size)
                        .map_err(|e| format!("chunk: {e}"))?;
                    let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                        .map_err(|_| format!("bad chunk size {size:?}"))?;
                    let mut chunk = vec![0; n + 2];
                    self.r
                        .read_exact(&mut chunk)
                        .map_err(|e| format!("chunk body: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
            } else if let Some(len) = headers
                .get("content-length")
                .and_then(|l| l.parse::<usize>().ok())
            {
                body.resize(len, 0);
                self.r
                    .read_exact(&mut body)
                    .map_err(|e| format!("body: {e}"))?;
            } else {
                self.r
                    .read_to_end(&mut body)
                    .map_err(|e| format!("body: {e}"))?;
            }
        }
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// Continuous load from `clients` keep-alive clients; every non-2xx answer and every socket
/// error counts as a failure (with its description kept).
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                let path = path.to_string();
                std::thread::spawn(move || {
                    let mut conn: Option<Conn> = None;
                    // Bounded: a test never runs longer than this.
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => match Conn::open(addr) {
                                Ok(c) => conn.insert(c),
                                Err(e) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    errors.lock().unwrap().push(format!("connect: {e}"));
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                            },
                        };
                        match c.get(&path) {
                            Ok(r) if (200..300).contains(&r.status) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if r.header("connection")
                                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                                {
                                    conn = None;
                                }
                            }
                            Ok(r) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(format!(
                                    "status {}: {}",
                                    r.status,
                                    r.body.trim()
                                ));
                                conn = None;
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(e);
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests succeeded.
    pub fn wait_progress(&self, n: u64) {
        let start = self.ok();
        wait_for(
            &format!("{n} more successful requests"),
            Duration::from_secs(30),
            || (self.ok() >= start + n).then_some(()),
        );
    }

    /// Stops the load and asserts that not one request failed; returns how many succeeded.
    pub fn finish_without_failures(self, what: &str) -> u64 {
        let (ok, failed, errors) = self.finish();
        assert_eq!(
            failed,
            0,
            "{what}: {failed} of {} requests failed: {:?}",
            ok + failed,
            &errors[..errors.len().min(8)]
        );
        ok
    }

    /// Stops the load; returns (ok, failed, error samples).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// Every live process whose environment contains `entry` (`KEY=value`), with its command line.
pub fn processes_with_env(entry: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()) && alive(pid) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

impl Env {
    /// Like [`Env::new`], but the installation lives in a fresh directory under `base` (e.g.
    /// `/var/lib/tqproxy-it`), removed on drop, instead of under /tmp: tqproxy switches a
    /// worker's private /tmp off when the worker's own files live under /tmp, and Landlock's
    /// base rules allow all of /tmp, so tests of those features need their files elsewhere.
    /// The directory is made mode 0755 so that workers running as another user (`user`,
    /// `dynamic_user`) can reach their own directories.
    pub fn new_in(base: &Path, workers: &[WorkerDef]) -> Env {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(base).expect("create the base directory");
        let dir = tempfile::Builder::new()
            .prefix("env-")
            .tempdir_in(base)
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755");
        let block = port_block(40);
        let env = Env {
            dir,
            listen: SocketAddr::from(([127, 0, 0, 1], block)),
            ports: (block + 1, block + 39),
            child: None,
            global_extra: String::new(),
        };
        env.write_global();
        for w in workers {
            env.write_worker(w);
        }
        env
    }
}

/// A free loopback port for one more listener of a test (e.g. the admin listener), taken from
/// the same disjoint blocks as the environments' ports.
pub fn free_port() -> u16 {
    port_block(1)
}

impl Env {
    /// Like [`Env::spawn`], with extra environment variables for tqproxy (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_with_env(&mut self, extra_args: &[&str], vars: &[(&str, &str)]) {
        self.launch(Command::new(TQPROXY), extra_args, vars);
    }
}
