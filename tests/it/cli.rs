//! The CLI's exit codes and the control socket's error replies, against the real binary: the
//! exit code comes from the kind of the failure that travels with it (see `tqproxy --help`),
//! 3 only when tqproxy cannot be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;

/// `tqproxy <args> --socket <socket>`: no configuration is read.
fn cli_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(TQPROXY)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run tqproxy cli")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One request line to the control socket, raw; the reply line as JSON.
fn control_line(socket: &Path, bytes: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// A stand-in for tqproxy at `socket`: reads one request line, writes `reply`, closes.
/// Returns the request it read.
fn fake_tqproxy(socket: &Path, reply: Vec<u8>) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s);
        let mut req = String::new();
        r.read_line(&mut req).unwrap();
        // The client stops reading at its limit: a broken pipe here is expected then.
        let _ = r.get_mut().write_all(&reply);
        req
    })
}

#[test]
fn scale_of_an_unknown_worker_exits_4() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    env.start();
    let o = env.cli(&["scale", "nosuch", "1"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("no worker named `nosuch`"),
        "{}",
        text(&o)
    );
    // The same answer on the socket: a failed line of kind `no_such_worker`.
    let v = control_line(
        &env.socket(),
        b"{\"cmd\":\"scale\",\"worker\":\"nosuch\",\"instances\":1}\n",
    );
    assert_eq!(v["type"], "outcome", "{v}");
    assert_eq!(v["lines"][0]["kind"], "no_such_worker", "{v}");
}

#[test]
fn a_malformed_control_line_gets_a_bad_request_reply_and_tqproxy_keeps_serving() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    env.start();
    let before = env.instances("w");
    for (line, says) in [
        (&b"not json\n"[..], "invalid request"),
        (b"{\"cmd\":\"explode\"}\n", "invalid request"),
        (b"{\"cmd\":\"scale\",\"worker\":\"w\"}\n", "invalid request"),
        (b"\xff\xfe\n", "cannot read request"),
        (
            b"{\"cmd\":\"scale\",\"worker\":\"w\",\"instances\":100000}\n",
            "at most 256",
        ),
    ] {
        let v = control_line(&env.socket(), line);
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["kind"], "bad_request", "{v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{v}");
        // Still serving, on the socket and on the proxy.
        assert_eq!(
            control_line(&env.socket(), b"{\"cmd\":\"ping\"}\n")["type"],
            "pong"
        );
        assert_eq!(env.get("/").status, 200);
    }
    // The CLI exits 2 for a request tqproxy refused as invalid.
    let o = env.cli(&["scale", "w", "300"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("at most 256 instances"), "{}", text(&o));
    let after = env.instances("w");
    assert_eq!(
        before.iter().map(|i| i.pid).collect::<Vec<_>>(),
        after.iter().map(|i| i.pid).collect::<Vec<_>>(),
        "nothing changed"
    );
}

#[test]
fn a_cli_that_cannot_reach_tqproxy_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    // No socket file.
    let missing = dir.path().join("missing.sock");
    let o = cli_at(&missing, &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("cannot reach tqproxy"), "{}", text(&o));
    // A socket file nobody listens on (a tqproxy that was killed): refused.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let o = cli_at(&stale, &["scale", "w", "1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("Connection refused"), "{}", text(&o));
}

#[test]
fn the_exit_code_comes_from_the_kind_in_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str, i32, &str); 5] = [
        (
            &["status"],
            r#"{"type":"error","message":"tqproxy is shutting down","kind":"shutting_down"}"#,
            6,
            "error: tqproxy is shutting down",
        ),
        (
            &["deploy", "w"],
            r#"{"type":"outcome","ok":false,"lines":[{"worker":"w","ok":false,"message":"worker `w` is busy (scale); try again when it is done","kind":"busy"}]}"#,
            5,
            "w: FAILED: worker `w` is busy",
        ),
        (
            &["reload"],
            r#"{"type":"outcome","ok":false,"lines":[{"worker":"-","ok":true,"message":"certificates reloaded"},{"worker":"-","ok":false,"message":"configuration invalid, nothing changed:\nx","kind":"invalid_config"}]}"#,
            7,
            "FAILED: configuration invalid",
        ),
        // An older tqproxy: no kind, exit 1.
        (
            &["rollback", "w"],
            r#"{"type":"error","message":"boom"}"#,
            1,
            "error: boom",
        ),
        (
            &["scale", "w", "2"],
            r#"{"type":"outcome","ok":true,"lines":[{"worker":"w","ok":true,"message":"scaled to 2"}]}"#,
            0,
            "w: ok: scaled to 2",
        ),
    ];
    for (i, (args, reply, code, says)) in cases.into_iter().enumerate() {
        let socket = dir.path().join(format!("{i}.sock"));
        let server = fake_tqproxy(&socket, format!("{reply}\n").into_bytes());
        let o = cli_at(&socket, args);
        let req = server.join().unwrap();
        assert!(req.starts_with("{\"cmd\":"), "{req}");
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
    }
}

#[test]
fn an_oversized_reply_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("big.sock");
    // 17 MiB without a newline: the CLI stops reading at 16 MiB.
    let server = fake_tqproxy(&socket, vec![b' '; 17 << 20]);
    let o = cli_at(&socket, &["status"]);
    server.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("answer is larger than 16 MiB"),
        "{}",
        text(&o)
    );
    // At the limit, the reply is read (and this one is not a response).
    let socket = dir.path().join("ok.sock");
    let mut reply = vec![b' '; (16 << 20) - 1];
    reply.push(b'\n');
    let server = fake_tqproxy(&socket, reply);
    let o = cli_at(&socket, &["status"]);
    server.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("bad response"), "{}", text(&o));
}

/// A client verb whose stdout is a closed pipe (`tqproxy check | true`) ends quietly, by
/// SIGPIPE as other Unix tools do: it panicked in `println!` before (exit 101).
#[test]
fn a_closed_stdout_pipe_ends_a_verb_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(TQPROXY)
        .arg("-c")
        .arg(env.conf())
        .arg("check")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        o.status
    );
}
