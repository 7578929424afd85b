//! The example worker, and through it the kit's contract: the environment, `PORT` or a unix
//! socket passed as fd 3, `/health`, graceful SIGTERM. (Through tqproxy, the integration tests
//! in tests/it run the backend, chaos, probe and rawecho; this runs hello on its own.)
//!
//! Being a test of this package, it also makes `cargo test` build every worker binary before
//! the tests run (tests/it finds them next to the tqproxy binary).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const HELLO: &str = env!("CARGO_BIN_EXE_hello");

/// Polls `f` until it returns `Some`, or panics after 10 s saying what never happened.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One request on `stream`, answered with a `Content-Length` body: (head, body).
fn request(stream: &mut (impl Read + Write), path: &str) -> (String, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "EOF in the head: {buf:?}"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

/// SIGTERM, then the exit status (within 10 s).
fn terminate(child: &mut Child) -> ExitStatus {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    wait_for("the worker to exit after SIGTERM", || {
        child.try_wait().unwrap()
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn hello_answers_on_port_and_stops_gracefully() {
    let port = free_port();
    let mut child = Command::new(HELLO)
        .env_clear()
        .env("PORT", port.to_string())
        .env("WORKER_NAME", "greeter")
        .env("WORKER_INSTANCE", "7")
        .env("WORKER_GENERATION", "3")
        .env("HELLO_VERSION", "v2")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut conn = wait_for("hello to listen", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let (head, body) = request(&mut conn, "/");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for h in ["X-Worker: greeter", "X-Instance: 7", "X-Generation: 3"] {
        assert!(head.contains(&format!("{h}\r\n")), "{h} missing: {head}");
    }
    let pid = child.id();
    assert_eq!(
        body,
        format!("hello from greeter instance 7 generation 3 (pid {pid})\n")
    );
    // The same keep-alive connection, for each endpoint.
    assert_eq!(request(&mut conn, "/version").1, "v2\n");
    assert_eq!(request(&mut conn, "/health").1, "ok\n");
    let (head, _) = request(&mut conn, "/nothing-here");
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");

    // SIGTERM with an idle keep-alive connection open: it is closed, and the exit is clean.
    let status = terminate(&mut child);
    assert_eq!(status.code(), Some(0), "{status}");
    let mut rest = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains(&format!(
            "hello: instance 7 gen 3 listening on 127.0.0.1:{port}"
        )),
        "{log}"
    );
    assert!(
        log.contains("exiting after SIGTERM: all requests finished"),
        "{log}"
    );
}

/// `transport: unix`: no `PORT`; the listening unix socket is fd 3, with `LISTEN_FDS=1` and
/// `LISTEN_PID` set to hello's pid. python3 sets that up and execs hello (same pid).
#[test]
fn hello_serves_a_unix_socket_passed_as_fd_3() {
    let dir = TempDir::new("unix");
    let sock = dir.0.join("hello.sock");
    let script = "import os, socket, sys\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
        s.bind(sys.argv[2]); s.listen(16)\n\
        if s.fileno() != 3: os.dup2(s.fileno(), 3)\n\
        os.set_inheritable(3, True)\n\
        env = {'LISTEN_FDS': '1', 'LISTEN_PID': str(os.getpid()), 'WORKER_NAME': 'u'}\n\
        os.execve(sys.argv[1], [sys.argv[1]], env)\n";
    let mut child = Command::new("python3")
        .args(["-c", script, HELLO])
        .arg(&sock)
        .env_clear()
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/deps.sh installs it)");
    let mut conn = wait_for("hello on the unix socket", || {
        UnixStream::connect(&sock).ok()
    });
    let (head, body) = request(&mut conn, "/");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let pid = child.id();
    assert_eq!(
        body,
        format!("hello from u instance 0 generation 0 (pid {pid})\n")
    );
    drop(conn);
    let status = terminate(&mut child);
    assert_eq!(status.code(), Some(0), "{status}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains(&format!("listening on unix:{}", sock.display())),
        "{log}"
    );
}

#[test]
fn hello_without_anything_to_listen_on_exits_2() {
    let out = Command::new(HELLO).env_clear().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "hello: PORT is not set (and no listening socket was passed as fd 3)\n"
    );
    let out = Command::new(HELLO)
        .env_clear()
        .env("PORT", "80x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "hello: PORT=\"80x\" is not a port number\n"
    );
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("kit-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if Path::new(&self.0).exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
