//! tqproxy's HTTP/2 engine: what the worker receives (an exact HTTP/1.1 head, the body byte for
//! byte, trailers), what the client receives, and the attacks: each attack test runs against a
//! live tqproxy while other clients keep being served, and checks that the attacker was cut off
//! (GOAWAY, or the connection closed).
//!
//! Well-behaved clients use the `h2` crate; attackers are raw frame writers ([`Raw`]): an
//! HTTP/2 frame is a 9-byte header and a payload, and the HPACK they need is literals without
//! indexing. Everything runs over h2c on loopback (the engine is the same behind TLS), every loop
//! is bounded in count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::harness::*;

// ---------------------------------------------------------------------------------------------
// Environments and clients
// ---------------------------------------------------------------------------------------------

/// An environment with h2c on its plain listener and `proxy_extra` (`key: value, ...`) in its
/// proxy section, not started yet.
fn h2c_conf(workers: &[WorkerDef], proxy_extra: &str) -> Env {
    let env = Env::new(workers);
    let conf = std::fs::read_to_string(env.conf()).unwrap().replace(
        "proxy: { threads: 1 }",
        &format!("proxy: {{ threads: 1, h2c: true, {proxy_extra} }}"),
    );
    std::fs::write(env.conf(), conf).unwrap();
    env
}

fn h2c_env(workers: &[WorkerDef], proxy_extra: &str) -> Env {
    let mut env = h2c_conf(workers, proxy_extra);
    env.start();
    env
}

fn backend_env(proxy_extra: &str) -> Env {
    h2c_env(&[WorkerDef::backend("w", "[\"/\"]", 1, "")], proxy_extra)
}

/// A rawecho worker (answers with the bytes it received) logging to the returned path.
fn rawecho_env(proxy_extra: &str) -> (Env, PathBuf) {
    let mut env = h2c_conf(&[], proxy_extra);
    let log = env.dir.path().join("rawecho.log");
    env.write_worker(&WorkerDef::rawecho(
        "raw",
        "[\"/\"]",
        &format!("env: {{ RAWECHO_LOG: \"{}\" }}\n", log.display()),
    ));
    env.start();
    (env, log)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client connection (h2 prior knowledge).
async fn connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://a.test{path}"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap()
}

/// A whole response: status, headers, body, trailers.
struct Resp {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
}

async fn read(resp: h2::client::ResponseFuture) -> Result<Resp, h2::Error> {
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut recv = resp.into_body();
    let mut body = Vec::new();
    while let Some(d) = recv.data().await {
        let d = d?;
        let _ = recv.flow_control().release_capacity(d.len());
        body.extend_from_slice(&d);
    }
    let trailers = recv.trailers().await?;
    Ok(Resp {
        status,
        headers,
        body,
        trailers,
    })
}

/// One request with a body (sent in `chunk`-sized DATA frames, then `trailers`).
async fn send(
    client: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: &[u8],
    trailers: Option<http::HeaderMap>,
) -> Result<Resp, h2::Error> {
    let mut client = client.clone().ready().await?;
    let end = body.is_empty() && trailers.is_none();
    let (resp, mut stream) = client.send_request(req, end)?;
    if !end {
        let mut rest = body;
        while !rest.is_empty() {
            stream.reserve_capacity(rest.len().min(64 * 1024));
            let cap = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(c) => c?,
                None => break,
            };
            let n = cap.min(rest.len());
            let last = n == rest.len() && trailers.is_none();
            stream.send_data(Bytes::copy_from_slice(&rest[..n]), last)?;
            rest = &rest[n..];
        }
        match trailers {
            Some(t) => stream.send_trailers(t)?,
            None if body.is_empty() => stream.send_data(Bytes::new(), true)?,
            None => {}
        }
    }
    read(resp).await
}

async fn get(client: &mut h2::client::SendRequest<Bytes>, path: &str) -> Result<Resp, h2::Error> {
    send(client, request("GET", path, &[]), b"", None).await
}

/// A client that keeps asking for `/` on one h2 connection (a new one when it ends) and counts
/// answers: what an attack must not disturb.
struct Bystander {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Bystander {
    fn start(addr: SocketAddr) -> Bystander {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (o, f, s) = (ok.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            rt().block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut client = connect(addr).await;
                while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match get(&mut client, "/").await {
                        Ok(r) if r.status == 200 => {
                            o.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            f.fetch_add(1, Ordering::Relaxed);
                            client = connect(addr).await;
                        }
                    }
                }
            })
        });
        let b = Bystander {
            ok,
            failed,
            stop,
            thread,
        };
        b.wait_progress(20);
        b
    }

    fn wait_progress(&self, n: u64) {
        let from = self.ok.load(Ordering::Relaxed);
        wait_for("the bystander's requests", Duration::from_secs(20), || {
            (self.ok.load(Ordering::Relaxed) >= from + n).then_some(())
        });
    }

    /// Stops it after a few more answers; asserts none failed.
    fn finish(self, what: &str) {
        self.wait_progress(20);
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        assert_eq!(
            self.failed.load(Ordering::Relaxed),
            0,
            "{what}: the bystander had failures ({} ok)",
            self.ok.load(Ordering::Relaxed)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A raw frame writer
// ---------------------------------------------------------------------------------------------

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

const PROTOCOL_ERROR: u32 = 1;
const REFUSED_STREAM: u32 = 7;
const CANCEL: u32 = 8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([ty, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, `flags` in the first byte's other bits.
fn hpack_int(out: &mut Vec<u8>, n: u8, flags: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing, with a new name (the name's bytes as they are: a raw
/// writer can send what no HTTP/2 library would).
fn lit(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// `:method`, `:scheme http`, `:path`, `:authority a.test`, then `extra` (already encoded).
fn head_block(method: &[u8], path: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_int(&mut b, 4, 0, 2); // :method, by name
    hpack_str(&mut b, method);
    b.push(0x86); // :scheme http
    hpack_int(&mut b, 4, 0, 4); // :path, by name
    hpack_str(&mut b, path);
    hpack_int(&mut b, 4, 0, 1); // :authority, by name
    hpack_str(&mut b, b"a.test");
    b.extend_from_slice(extra);
    b
}

fn get_block(path: &str) -> Vec<u8> {
    head_block(b"GET", path.as_bytes(), &[])
}

#[derive(Debug)]
struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> u32 {
        let at = if self.ty == GOAWAY { 4 } else { 0 };
        self.payload
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()))
    }
}

/// How an attacker's connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    GoAway(u32),
    Closed,
    /// Still open at the deadline.
    Open,
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        r.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        r.write(&frame(SETTINGS, 0, 0, &[])).unwrap();
        r
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    fn send(&mut self, ty: u8, flags: u8, stream: u32, payload: &[u8]) -> std::io::Result<()> {
        self.write(&frame(ty, flags, stream, payload))
    }

    /// The next frame, or `None` at EOF, an error or `deadline`.
    fn next(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        ty: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until one matches `want` (or the deadline, EOF).
    fn until(&mut self, within: Duration, want: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + within;
        while let Some(f) = self.next(deadline) {
            if want(&f) {
                return Some(f);
            }
        }
        None
    }

    /// Reads until GOAWAY or the end of the connection (or `within`).
    fn end(&mut self, within: Duration) -> End {
        let deadline = Instant::now() + within;
        loop {
            match self.next(deadline) {
                Some(f) if f.ty == GOAWAY => return End::GoAway(f.code()),
                Some(_) => {}
                None if Instant::now() >= deadline => return End::Open,
                None => return End::Closed,
            }
        }
    }
}

/// Asserts the attacker was cut off: GOAWAY with `code`, or a closed connection.
fn assert_cut_off(raw: &mut Raw, code: u32, what: &str) {
    match raw.end(Duration::from_secs(10)) {
        End::GoAway(c) => assert_eq!(c, code, "{what}: GOAWAY code"),
        End::Closed => {}
        End::Open => panic!("{what}: the attacker's connection is still open"),
    }
}

// ---------------------------------------------------------------------------------------------
// What the worker receives
// ---------------------------------------------------------------------------------------------

#[test]
fn the_worker_receives_an_exact_http11_request() {
    let (env, _log) = rawecho_env("");
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let req = request(
            "GET",
            "/p?q=1",
            &[
                ("cookie", "a=1"),
                ("accept", "*/*"),
                ("cookie", "b=2"),
                ("te", "trailers"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "id-1"),
            ],
        );
        let r = send(&mut c, req, b"", None).await.unwrap();
        assert_eq!(r.status, 200);
        let got = String::from_utf8(r.body).unwrap();
        assert_eq!(
            got,
            "GET /p?q=1 HTTP/1.1\r\nHost: a.test\r\ncookie: a=1; b=2\r\naccept: */*\r\n\
             x-request-id: id-1\r\nX-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: a.test\r\n\r\n"
        );
        assert_eq!(r.headers["x-request-id"], "id-1");
        // A body with content-length goes as it is.
        let r = send(
            &mut c,
            request("POST", "/up", &[("content-length", "5")]),
            b"hello",
            None,
        )
        .await
        .unwrap();
        let got = String::from_utf8(r.body).unwrap();
        assert!(
            got.starts_with("POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"),
            "{got}"
        );
        assert!(got.ends_with("\r\n\r\nhello"), "{got}");
        // Without content-length: chunked, the client's trailers as the trailer section.
        let mut t = http::HeaderMap::new();
        t.insert("x-sum", "42".parse().unwrap());
        let r = send(&mut c, request("POST", "/up", &[]), b"hello", Some(t))
            .await
            .unwrap();
        let got = String::from_utf8(r.body).unwrap();
        assert!(got.contains("\r\nTransfer-Encoding: chunked\r\n"), "{got}");
        assert!(
            got.ends_with("\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n"),
            "{got}"
        );
    });
}

/// `X-Rawecho-Reply` makes rawecho answer with exactly these bytes.
fn reply(raw: &[u8]) -> (&'static str, String) {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    ("x-rawecho-reply", hex)
}

#[test]
fn responses_are_relayed_with_trailers_and_without_connection_fields() {
    let (env, _log) = rawecho_env("");
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let (n, v) = reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-A: 1\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n",
        );
        let r = send(&mut c, request("GET", "/t", &[(n, &v)]), b"", None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello world");
        assert_eq!(r.headers["x-a"], "1");
        for gone in ["connection", "keep-alive", "x-hop", "transfer-encoding"] {
            assert!(!r.headers.contains_key(gone), "{gone}: {:?}", r.headers);
        }
        assert_eq!(r.trailers.expect("trailers")["x-sum"], "42");
        // A body cut short by the worker resets the stream instead of ending it.
        let (n, v) = reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        let close = ("x-rawecho-close", "1");
        let r = send(&mut c, request("GET", "/cut", &[(n, &v), close]), b"", None).await;
        assert!(r.is_err(), "a truncated body must not look complete");
        // The connection still serves.
        let r = get(&mut c, "/after").await.unwrap();
        assert_eq!(r.status, 200);
    });
}

#[test]
fn a_large_upload_arrives_byte_exact() {
    let env = backend_env("");
    let body: Vec<u8> = (0..32u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let len = body.len().to_string();
        let r = send(
            &mut c,
            request("POST", "/echo", &[("content-length", &len)]),
            &body,
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), body.len());
        assert!(r.body == body, "the echoed body differs");
        // Without content-length (chunked upstream).
        let small = &body[..3 << 20];
        let r = send(&mut c, request("POST", "/echo", &[]), small, None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == small, "the echoed chunked body differs");
    });
}

#[test]
fn a_stream_reset_mid_response_leaves_the_others_alone() {
    let env = backend_env("");
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let mut big = c.clone().ready().await.unwrap();
        let (resp, _) = big
            .send_request(request("GET", "/bytes/8388608", &[]), true)
            .unwrap();
        let others: Vec<_> = (0..4)
            .map(|_| {
                let mut c = c.clone();
                tokio::spawn(async move { get(&mut c, "/bytes/300000").await })
            })
            .collect();
        let resp = resp.await.unwrap();
        let mut recv = resp.into_body();
        let first = recv.data().await.unwrap().unwrap();
        assert!(!first.is_empty());
        // Reset it: drop the body and its stream (h2 sends RST_STREAM CANCEL).
        drop(recv);
        for o in others {
            let r = o.await.unwrap().unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), 300000);
            assert!(r.body.starts_with(b"abcdefghijklmnopqrstuvwxyz\n"));
        }
        let r = get(&mut c, "/").await.unwrap();
        assert_eq!(r.status, 200);
    });
}

// ---------------------------------------------------------------------------------------------
// No smuggling through HTTP/2 → HTTP/1.1
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_and_smuggling_requests_never_reach_the_worker() {
    let (env, log) = rawecho_env("");
    let by = Bystander::start(env.listen);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let marker = |b: &mut Vec<u8>| lit(b, b"x-marker", b"smuggled");
    let with = |name: &[u8], value: &[u8]| {
        let mut e = Vec::new();
        marker(&mut e);
        lit(&mut e, name, value);
        head_block(b"GET", b"/", &e)
    };
    cases.push(("upper-case name", with(b"X-Upper", b"1")));
    cases.push(("CRLF in a value", with(b"x-a", b"1\r\nx-injected: 1")));
    cases.push(("LF in a value", with(b"x-a", b"1\nGET / HTTP/1.1")));
    cases.push(("NUL in a value", with(b"x-a", b"1\x00")));
    cases.push(("CR in a name", with(b"x-a\r\nx-b", b"1")));
    cases.push(("transfer-encoding", with(b"transfer-encoding", b"chunked")));
    cases.push(("connection", with(b"connection", b"close")));
    cases.push(("te: gzip", with(b"te", b"gzip")));
    cases.push(("space in a name", with(b"x a", b"1")));
    let mut m = Vec::new();
    marker(&mut m);
    cases.push(("absolute :path", head_block(b"GET", b"http://b.test/", &m)));
    cases.push(("relative :path", head_block(b"GET", b"x", &m)));
    cases.push(("space in :path", head_block(b"GET", b"/a b", &m)));
    cases.push(("asterisk GET", head_block(b"GET", b"*", &m)));
    cases.push(("CONNECT", head_block(b"CONNECT", b"/", &m)));
    for (what, block) in &cases {
        let mut raw = Raw::connect(env.listen);
        raw.send(HEADERS, END_HEADERS | END_STREAM, 1, block)
            .unwrap();
        // Refused: a stream error, a connection error, or a 4xx answer; never a 200.
        let f = raw.until(Duration::from_secs(10), |f| {
            (f.ty == HEADERS && f.stream == 1) || f.ty == RST_STREAM || f.ty == GOAWAY
        });
        match f {
            Some(f) if f.ty == HEADERS => {
                assert!(
                    f.payload.first().is_some_and(|&b| b != 0x88),
                    "{what}: answered 200"
                );
            }
            Some(_) | None => {}
        }
    }
    // A content-length that disagrees with the DATA frames is a stream error (both ways).
    for (cl, data) in [("10", &b"hello"[..]), ("2", b"hello")] {
        let mut raw = Raw::connect(env.listen);
        let mut e = Vec::new();
        lit(&mut e, b"content-length", cl.as_bytes());
        raw.send(HEADERS, END_HEADERS, 1, &head_block(b"POST", b"/cl", &e))
            .unwrap();
        raw.send(DATA, END_STREAM, 1, data).unwrap();
        let f = raw
            .until(Duration::from_secs(10), |f| {
                f.ty == RST_STREAM || f.ty == GOAWAY
            })
            .unwrap_or_else(|| panic!("content-length {cl}, {} bytes: no reset", data.len()));
        assert_eq!(
            (f.ty, f.code()),
            (RST_STREAM, PROTOCOL_ERROR),
            "content-length {cl}"
        );
    }
    by.finish("malformed requests");
    let logged = std::fs::read(&log).unwrap_or_default();
    let logged = String::from_utf8_lossy(&logged);
    assert!(
        !logged.contains("smuggled") && !logged.contains("x-injected"),
        "a refused request reached the worker:\n{logged}"
    );
}

#[test]
fn an_upgrade_to_h2c_is_answered_over_http11() {
    let (env, log) = rawecho_env("");
    let r = crate::harness::request(
        env.listen,
        "GET",
        "/up",
        Some("a.test"),
        &[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let got = r.body;
    assert!(
        got.starts_with("GET /up HTTP/1.1\r\nHost: a.test\r\n"),
        "{got}"
    );
    for gone in ["Upgrade", "HTTP2-Settings", "Connection"] {
        assert!(!got.contains(gone), "{gone} forwarded:\n{got}");
    }
    drop(log);
}

// ---------------------------------------------------------------------------------------------
// Attacks
// ---------------------------------------------------------------------------------------------

#[test]
fn rapid_reset_is_cut_off() {
    let env = backend_env("");
    let by = Bystander::start(env.listen);
    let mut raw = Raw::connect(env.listen);
    let block = get_block("/");
    let mut sent = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    'attack: for batch in 0..200u32 {
        let mut bytes = Vec::new();
        for i in 0..50u32 {
            let id = 1 + 2 * (batch * 50 + i);
            bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
            bytes.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        if raw.write(&bytes).is_err() || Instant::now() > deadline {
            break 'attack;
        }
        sent += 50;
    }
    assert!(sent < 10_000, "all {sent} streams were taken");
    assert_cut_off(&mut raw, ENHANCE_YOUR_CALM, "rapid reset");
    by.finish("rapid reset");
}

#[test]
fn a_continuation_flood_is_cut_off() {
    let env = backend_env("");
    let by = Bystander::start(env.listen);
    let mut raw = Raw::connect(env.listen);
    // A header whose value never ends, spread over endless CONTINUATION frames.
    let mut first = get_block("/");
    first.push(0);
    hpack_str(&mut first, b"x-long");
    hpack_int(&mut first, 7, 0, 100 << 20);
    raw.send(HEADERS, 0, 1, &first).unwrap();
    let piece = vec![b'a'; 4096];
    let mut frames = 0;
    for _ in 0..10_000 {
        if raw.send(CONTINUATION, 0, 1, &piece).is_err() {
            break;
        }
        frames += 1;
    }
    assert!(frames < 10_000, "every CONTINUATION frame was read");
    match raw.end(Duration::from_secs(10)) {
        End::GoAway(c) => assert!(
            [
                ENHANCE_YOUR_CALM,
                9, /* COMPRESSION_ERROR */
                PROTOCOL_ERROR
            ]
            .contains(&c),
            "GOAWAY {c}"
        ),
        End::Closed => {}
        End::Open => panic!("the attacker's connection is still open"),
    }
    by.finish("CONTINUATION flood");
}

#[test]
fn an_hpack_bomb_is_refused() {
    let (env, log) = rawecho_env("max_header_list_size: 16K");
    let by = Bystander::start(env.listen);
    let mut raw = Raw::connect(env.listen);
    // One 4000-byte field into the dynamic table, then referenced 200 times: 4 KB on the wire,
    // 800 KB decoded.
    let mut e = Vec::new();
    e.push(0x40); // literal with incremental indexing, new name
    hpack_str(&mut e, b"x-bomb");
    hpack_str(&mut e, &[b'b'; 4000]);
    e.extend(std::iter::repeat_n(0xbe, 200)); // index 62: the newest dynamic entry
    raw.send(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &head_block(b"GET", b"/", &e),
    )
    .unwrap();
    let f = raw.until(Duration::from_secs(10), |f| {
        f.ty == HEADERS || f.ty == RST_STREAM || f.ty == GOAWAY
    });
    if let Some(f) = &f
        && f.ty == HEADERS
    {
        // h2's answer to a header list over the limit: 431.
        assert_ne!(f.payload.first(), Some(&0x88), "the bomb was answered 200");
    }
    by.finish("HPACK bomb");
    let logged = std::fs::read(&log).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&logged).contains("bbbbbbbb"),
        "the bomb reached the worker"
    );
}

/// The server's SETTINGS frame, as (id, value) pairs.
fn settings_of(raw: &mut Raw) -> Vec<(u16, u32)> {
    let f = raw
        .until(Duration::from_secs(5), |f| f.ty == SETTINGS && f.flags == 0)
        .expect("the server's SETTINGS");
    f.payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

#[test]
fn streams_beyond_the_concurrency_limit_are_refused() {
    let env = backend_env("h2_max_concurrent_streams: 8, max_header_list_size: 32K");
    let by = Bystander::start(env.listen);
    let mut raw = Raw::connect(env.listen);
    let settings = settings_of(&mut raw);
    assert!(settings.contains(&(0x3, 8)), "{settings:?}");
    assert!(settings.contains(&(0x6, 32 << 10)), "{settings:?}");
    raw.send(SETTINGS, 1, 0, &[]).unwrap(); // ACK
    // Eight uploads that never send their body hold every slot.
    let post = head_block(b"POST", b"/echo", &[]);
    for i in 0..8u32 {
        raw.send(HEADERS, END_HEADERS, 1 + 2 * i, &post).unwrap();
    }
    raw.send(HEADERS, END_HEADERS | END_STREAM, 17, &get_block("/"))
        .unwrap();
    let f = raw
        .until(Duration::from_secs(10), |f| {
            f.ty == RST_STREAM && f.stream == 17
        })
        .expect("the ninth stream is refused");
    assert_eq!(f.code(), REFUSED_STREAM);
    // A client that keeps ignoring the limit is cut off.
    let mut id = 19u32;
    for _ in 0..2000 {
        if raw
            .send(HEADERS, END_HEADERS | END_STREAM, id, &get_block("/"))
            .is_err()
        {
            break;
        }
        id += 2;
    }
    assert_cut_off(&mut raw, ENHANCE_YOUR_CALM, "streams over the limit");
    by.finish("too many streams");
}

/// Sends `frame` up to `count` times (in batches); the number sent before the connection
/// stopped taking them.
fn flood(raw: &mut Raw, frame: &[u8], count: usize) -> usize {
    let batch: Vec<u8> = frame.repeat(100);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while sent < count && Instant::now() < deadline {
        if raw.write(&batch).is_err() {
            break;
        }
        sent += 100;
    }
    sent
}

#[test]
fn ping_settings_window_update_and_empty_frame_floods_are_cut_off() {
    let env = backend_env("");
    let by = Bystander::start(env.listen);
    let floods: [(&str, Vec<u8>); 5] = [
        ("PING", frame(PING, 0, 0, &[7; 8])),
        ("SETTINGS", frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0])),
        (
            "WINDOW_UPDATE",
            frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
        ),
        ("empty DATA", frame(DATA, 0, 1, &[])),
        ("PRIORITY", frame(2, 0, 3, &[0, 0, 0, 0, 16])),
    ];
    for (what, f) in &floods {
        let mut raw = Raw::connect(env.listen);
        if *what == "empty DATA" {
            // An upload to stream its empty frames into.
            raw.send(HEADERS, END_HEADERS, 1, &head_block(b"POST", b"/echo", &[]))
                .unwrap();
        }
        let sent = flood(&mut raw, f, 500_000);
        assert!(sent < 500_000, "{what}: all {sent} frames were taken");
        assert_cut_off(&mut raw, ENHANCE_YOUR_CALM, what);
    }
    by.finish("control frame floods");
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

#[test]
fn a_body_that_never_comes_and_an_idle_connection_time_out() {
    let env = backend_env(
        "client_body_timeout: 1s, client_keepalive_timeout: 1s, client_header_timeout: 2s",
    );
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let mut ready = c.clone().ready().await.unwrap();
        let (resp, _body) = ready
            .send_request(request("POST", "/echo", &[("content-length", "10")]), false)
            .unwrap();
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(15), read(resp))
            .await
            .expect("no answer to a stalled upload");
        let r = r.unwrap();
        assert_eq!(r.status, 408);
        assert!(started.elapsed() >= Duration::from_millis(900));
        // The connection still serves.
        assert_eq!(get(&mut c, "/").await.unwrap().status, 200);
    });
    // A connection with no stream open: GOAWAY, then closed.
    let mut raw = Raw::connect(env.listen);
    assert_eq!(raw.end(Duration::from_secs(10)), End::GoAway(0));
    assert_eq!(raw.end(Duration::from_secs(10)), End::Closed);
    // Half a preface: closed when the head timeout ends.
    let mut s = TcpStream::connect(env.listen).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains(" 200 "),
        "{rest:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Stopping and upgrading
// ---------------------------------------------------------------------------------------------

#[test]
fn a_graceful_stop_sends_goaway_and_finishes_the_streams() {
    let mut env = backend_env("");
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let slow = {
            let mut c = c.clone();
            tokio::spawn(async move { get(&mut c, "/slow?ms=1500").await })
        };
        // The request is in flight before the stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = env.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let r = slow.await.unwrap().expect("the stream in flight finishes");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"slow done\n");
        // The connection was told to go away: no new stream on it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match get(&mut c, "/").await {
                Err(_) => break,
                Ok(_) if Instant::now() > deadline => panic!("no GOAWAY after the stop"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    env.stop(Duration::from_secs(20));
}

#[test]
fn h2_clients_move_to_the_new_process_on_upgrade() {
    let mut env = h2c_env(
        &[WorkerDef::backend(
            "w",
            "[\"/\"]",
            1,
            "env: { TQ_TEST_MARK: h2-upgrade-test }\n",
        )],
        "",
    );
    let old_pid = env.pid();
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = env.listen;
    let load = {
        let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
        std::thread::spawn(move || {
            rt().block_on(async move {
                let tasks: Vec<_> = (0..4)
                    .map(|_| {
                        let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                        tokio::spawn(async move {
                            let deadline = Instant::now() + Duration::from_secs(120);
                            let mut c = connect(addr).await;
                            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                                let ready = match c.clone().ready().await {
                                    Ok(r) => r,
                                    // GOAWAY: the next request goes on a new connection.
                                    Err(_) => {
                                        c = connect(addr).await;
                                        continue;
                                    }
                                };
                                let mut r = ready;
                                let sent = r.send_request(request("GET", "/", &[]), true);
                                let resp = match sent {
                                    Ok((resp, _)) => read(resp).await,
                                    Err(e) => Err(e),
                                };
                                match resp {
                                    Ok(r) if r.status == 200 => {
                                        ok.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Ok(r) => failures
                                        .lock()
                                        .unwrap()
                                        .push(format!("status {}", r.status)),
                                    // Refused before it was processed (GOAWAY, REFUSED_STREAM):
                                    // a client sends it again, on a new connection.
                                    Err(e)
                                        if e.is_go_away()
                                            || e.reason() == Some(h2::Reason::REFUSED_STREAM) =>
                                    {
                                        c = connect(addr).await;
                                    }
                                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    let _ = t.await;
                }
            })
        })
    };
    let progress = |n: u64| {
        let from = ok.load(Ordering::Relaxed);
        wait_for("h2 load progress", Duration::from_secs(30), || {
            (ok.load(Ordering::Relaxed) >= from + n).then_some(())
        });
    };
    progress(200);
    let out = env.ok(&["upgrade"]);
    assert!(out.contains(&format!("upgraded: pid {old_pid} →")), "{out}");
    wait_for("the old process gone", Duration::from_secs(60), || {
        (!alive(old_pid)).then_some(())
    });
    progress(200);
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} h2 requests failed across the upgrade: {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed) + failures.len() as u64,
        &failures[..failures.len().min(8)]
    );
    let st = env.status();
    assert_ne!(st.pid, old_pid);
    let new_pid = st.pid;
    env.ok(&["stop"]);
    assert!(!alive(new_pid));
    env.child = None;
}

/// `max_body_size` over HTTP/2: a declared larger body is answered 413 without reaching the
/// worker, one without content-length is cut with 413 once its DATA pass the limit, and a
/// body within it is forwarded.
#[test]
fn max_body_size_answers_413_past_the_limit() {
    let mut env = h2c_conf(&[], "");
    let log = env.dir.path().join("rawecho.log");
    env.write_worker(&WorkerDef::rawecho(
        "raw",
        "[\"/\"]",
        &format!(
            "max_body_size: 1K\nenv: {{ RAWECHO_LOG: \"{}\" }}\n",
            log.display()
        ),
    ));
    env.start();
    rt().block_on(async {
        let mut c = connect(env.listen).await;
        let r = send(
            &mut c,
            request("POST", "/declared", &[("content-length", "2000")]),
            &[b'a'; 2000],
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 413);
        assert!(String::from_utf8_lossy(&r.body).contains("max_body_size"));
        let mut c = connect(env.listen).await;
        let r = send(
            &mut c,
            request("POST", "/streamed", &[]),
            &[b'a'; 3000],
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 413);
        let mut c = connect(env.listen).await;
        let (n, v) = reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let r = send(
            &mut c,
            request("POST", "/small", &[(n, &v)]),
            &[b'a'; 1000],
            None,
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    });
    let seen = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(seen.contains("POST /small"), "{seen}");
    assert!(!seen.contains("POST /declared"), "{seen}");
}
