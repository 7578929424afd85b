//! `rawecho` — a worker that answers every request with the exact bytes it received, for
//! tqproxy's HTTP/1.1 conformance suite (`tests/it/conformance.rs`).
//!
//! It listens on `127.0.0.1:$PORT`, or on the inherited fd 3 when `LISTEN_FDS=1` and
//! `LISTEN_PID` is this process (the kit's `listen`). One thread per connection, blocking
//! I/O: small and obviously correct, not fast. It has no health endpoint: run it without a
//! health path, so tqproxy only checks that the port accepts (no health request is ever sent,
//! nothing appears in the log for it). SIGTERM ends it (default disposition).
//!
//! Each connection's bytes are split into requests by a minimal, strict HTTP/1.1 framer: httparse
//! for the head; the body by `Content-Length` (one header, digits only), or chunked (one
//! `Transfer-Encoding: chunked` header; the body's end found without changing a byte, trailers
//! included: CRLF line endings only, 1–16 hex digits, extensions and trailer lines without
//! control bytes). Both headers together, any other transfer coding, or anything else it cannot
//! frame is a `bad` record, a 400 answer and the end of the connection. A request (head + body)
//! is at most 1 MiB.
//!
//! For each complete request it answers, and keeps the connection open (always; it ignores
//! `Connection`):
//!
//! ```text
//! HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: <n>\r\n\r\n<the n raw bytes of the request, head and body>
//! ```
//!
//! (no body after the head when the method is `HEAD`), unless the request asks otherwise:
//!
//! | request header               | effect                                                          |
//! |------------------------------|-----------------------------------------------------------------|
//! | `X-Rawecho-Reply: <hex>`     | writes exactly these bytes (hex-encoded, any case) instead       |
//! | `X-Rawecho-Reply: body`      | writes exactly the request's body bytes instead                 |
//! | `X-Rawecho-Close: 1`         | closes the connection right after writing                       |
//! | `X-Rawecho-Continue: 1`      | writes `HTTP/1.1 100 Continue\r\n\r\n` as soon as the head is in, before reading the body |
//! | `X-Rawecho-Pause-At: <n>`    | writes the first n bytes of the answer, pauses 300 ms, writes the rest |
//!
//! A reply that starts with `HTTP/1.1 101` switches the connection to a tunnel: from then on
//! every byte read is recorded and written back as it is.
//!
//! `RAWECHO_LOG=<path>`: every event is appended to that file as one record,
//!
//! ```text
//! <conn-id> <kind> <len>\n<len raw bytes>\n
//! ```
//!
//! where `conn-id` numbers the accepted connections from 1 and `kind` is
//! - `begin` (len 0): the first byte of a request arrived (each `begin` is later followed, on
//!   the same connection, by exactly one `req`, `bad` or `eof`);
//! - `req`: a complete request, exactly as received;
//! - `bad`: bytes that could not be parsed (everything buffered at that point);
//! - `eof`: the connection closed in the middle of a request (the bytes of that partial request);
//! - `tunnel`: bytes read after a `101` reply (one record per read).
//!
//! A record is written (and flushed) before the answer to it, so once a client has the answer,
//! the log has the request.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kit::listen;

/// Largest request, head and body.
const MAX_REQUEST: usize = 1 << 20;
/// Largest chunk-size or trailer line.
const MAX_LINE: usize = 8192;
const MAX_HEADERS: usize = 512;
/// The pause `X-Rawecho-Pause-At` asks for.
const PAUSE: Duration = Duration::from_millis(300);

static LOG: Mutex<Option<File>> = Mutex::new(None);
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

macro_rules! log {
    ($($arg:tt)*) => { eprintln!("rawecho: {}", format_args!($($arg)*)) };
}

fn main() {
    // Claim fd 3 before anything else can be given that number.
    let inherited = listen::inherited_listener().unwrap_or_else(|e| {
        log!("{e}");
        None
    });
    if let Some(path) = std::env::var_os("RAWECHO_LOG") {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(f),
            Err(e) => {
                log!("cannot open RAWECHO_LOG={path:?}: {e}");
                std::process::exit(2);
            }
        }
    }
    let listener = match listener(inherited) {
        Ok(l) => l,
        Err(e) => {
            log!("{e}");
            std::process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    log!("listening on {addr} (pid {})", std::process::id());
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let id = NEXT_CONN.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || connection(s, id));
            }
            Err(e) => {
                log!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn listener(inherited: Option<TcpListener>) -> Result<TcpListener, String> {
    if let Some(l) = inherited {
        l.set_nonblocking(false)
            .map_err(|e| format!("fd 3: cannot make it blocking: {e}"))?;
        return Ok(l);
    }
    let port = std::env::var("PORT").map_err(|_| "PORT is not set".to_string())?;
    let port: u16 = port
        .trim()
        .parse()
        .map_err(|_| format!("PORT={port:?} is not a port number"))?;
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))
}

/// Appends one record to the log (when there is one).
fn record(conn: u64, kind: &str, bytes: &[u8]) {
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = log.as_mut() {
        let mut rec = format!("{conn} {kind} {}\n", bytes.len()).into_bytes();
        rec.extend_from_slice(bytes);
        rec.push(b'\n');
        if let Err(e) = f.write_all(&rec).and_then(|()| f.flush()) {
            log!("cannot write the log: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framing (pure functions over the connection's buffer)

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(usize),
    Chunked,
}

/// What a request asks rawecho to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Echo,
    Raw(Vec<u8>),
    RequestBody,
}

/// A complete request head and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    len: usize,
    body: Body,
    is_head: bool,
    reply: Reply,
    close: bool,
    send_continue: bool,
    pause_at: Option<usize>,
}

/// The state of the request at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Parse {
    /// More bytes are needed; the head is known once it is complete.
    Partial(Option<Head>),
    /// A complete request of `len` bytes.
    Complete(Head, usize),
    Bad(String),
}

fn parse(buf: &[u8]) -> Parse {
    let head = match parse_head(buf) {
        Ok(Some(h)) => h,
        Ok(None) if buf.len() > MAX_REQUEST => return Parse::Bad("head too large".into()),
        Ok(None) => return Parse::Partial(None),
        Err(e) => return Parse::Bad(e),
    };
    let body = &buf[head.len..];
    let body_len = match head.body {
        Body::Length(n) if body.len() >= n => Some(n),
        Body::Length(_) => None,
        Body::Chunked => match chunked_len(body) {
            Ok(n) => n,
            Err(e) => return Parse::Bad(e),
        },
    };
    match body_len {
        Some(n) => {
            let total = head.len + n;
            Parse::Complete(head, total)
        }
        None if buf.len() > MAX_REQUEST => Parse::Bad("request too large".into()),
        None => Parse::Partial(Some(head)),
    }
}

/// The head at the start of `buf`: `Ok(None)` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("head: {e}")),
    };
    let mut head = Head {
        len,
        body: Body::Length(0),
        is_head: req.method == Some("HEAD"),
        reply: Reply::Echo,
        close: false,
        send_continue: false,
        pause_at: None,
    };
    let (mut length, mut te, mut lengths, mut tes) = (None, None, 0, 0);
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = h.value.trim_ascii();
        match name.as_str() {
            "content-length" => {
                lengths += 1;
                length = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| {
                        !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if length.is_none() {
                    return Err(format!(
                        "bad content-length {:?}",
                        String::from_utf8_lossy(value)
                    ));
                }
            }
            "transfer-encoding" => {
                tes += 1;
                te = Some(value.to_ascii_lowercase());
            }
            "x-rawecho-reply" => {
                head.reply = if value.eq_ignore_ascii_case(b"body") {
                    Reply::RequestBody
                } else {
                    Reply::Raw(unhex(value).ok_or("x-rawecho-reply is neither hex nor `body`")?)
                };
            }
            "x-rawecho-close" => head.close = value == b"1",
            "x-rawecho-continue" => head.send_continue = value == b"1",
            "x-rawecho-pause-at" => {
                head.pause_at = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                if head.pause_at.is_none() {
                    return Err("x-rawecho-pause-at is not a number".into());
                }
            }
            _ => {}
        }
    }
    head.body = match (lengths, tes, length, te.as_deref()) {
        (0, 0, _, _) => Body::Length(0),
        (1, 0, Some(n), _) if n <= MAX_REQUEST => Body::Length(n),
        (1, 0, Some(_), _) => return Err("content-length too large".into()),
        (0, 1, _, Some(b"chunked")) => Body::Chunked,
        (0, 1, _, _) => return Err("transfer-encoding is not `chunked`".into()),
        (_, 0, _, _) => return Err("more than one content-length".into()),
        (0, _, _, _) => return Err("more than one transfer-encoding".into()),
        _ => return Err("both content-length and transfer-encoding".into()),
    };
    Ok(Some(head))
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

/// One CRLF-terminated line at `at`: `Ok(Some((line, next)))`, `Ok(None)` while incomplete.
/// A bare CR or LF is an error.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && rest[i - 1] == b'\r' && !rest[..i - 1].contains(&b'\r') => {
            Ok(Some((&rest[..i - 1], at + i + 1)))
        }
        Some(_) => Err("bare CR or LF in a chunked body line".into()),
        None if rest.len() > MAX_LINE => Err("chunked body line too long".into()),
        // A CR that is not the line's last byte so far can never become CRLF.
        None if rest.iter().rev().skip(1).any(|&b| b == b'\r') => {
            Err("bare CR in a chunked body line".into())
        }
        None => Ok(None),
    }
}

/// A control byte other than HTAB (chunk extensions and trailer lines must not have one).
fn has_ctl(s: &[u8]) -> bool {
    s.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// The length of the chunked body at the start of `buf` (chunks, last chunk, trailers, final
/// CRLF): `Ok(None)` while incomplete.
fn chunked_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let Some((size_line, next)) = line(buf, at)? else {
            return Ok(None);
        };
        let digits = size_line
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let ext = &size_line[digits..];
        if digits == 0 || digits > 16 {
            return Err(format!(
                "bad chunk size {:?}",
                String::from_utf8_lossy(size_line)
            ));
        }
        // Nothing after the size, or BWS then `;` and an extension without control bytes.
        let after_bws = ext.trim_ascii_start();
        if !ext.is_empty() && (!after_bws.starts_with(b";") || has_ctl(ext)) {
            return Err(format!(
                "bad chunk extension {:?}",
                String::from_utf8_lossy(ext)
            ));
        }
        let hex = std::str::from_utf8(&size_line[..digits]).unwrap_or_default();
        let size = u64::from_str_radix(hex, 16).map_err(|e| format!("chunk size: {e}"))?;
        at = next;
        if size == 0 {
            loop {
                let Some((trailer, next)) = line(buf, at)? else {
                    return Ok(None);
                };
                at = next;
                if trailer.is_empty() {
                    return Ok(Some(at));
                }
                if !trailer.contains(&b':') || has_ctl(trailer) {
                    return Err(format!(
                        "bad trailer {:?}",
                        String::from_utf8_lossy(trailer)
                    ));
                }
            }
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s <= MAX_REQUEST)
            .ok_or("chunk too large")?;
        let end = at + size;
        if buf.len() < end + 2 {
            if buf.len() > end && buf[end] != b'\r' {
                return Err("no CRLF after the chunk data".into());
            }
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err("no CRLF after the chunk data".into());
        }
        at = end + 2;
    }
}

// ---------------------------------------------------------------------------------------------
// Serving

fn echo(request: &[u8], is_head: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        request.len()
    )
    .into_bytes();
    if !is_head {
        out.extend_from_slice(request);
    }
    out
}

fn write_reply(s: &mut TcpStream, reply: &[u8], pause_at: Option<usize>) -> io::Result<()> {
    match pause_at {
        Some(n) if n < reply.len() => {
            s.write_all(&reply[..n])?;
            s.flush()?;
            std::thread::sleep(PAUSE);
            s.write_all(&reply[n..])
        }
        _ => s.write_all(reply),
    }
}

/// Reads once into `buf`; `Ok(false)` on EOF.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let n = s.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn connection(mut s: TcpStream, id: u64) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    // Whether the request at the start of `buf` has had its `begin`, and its 100 Continue.
    let (mut begun, mut continued) = (false, false);
    loop {
        if !buf.is_empty() && !begun {
            record(id, "begin", b"");
            begun = true;
        }
        let parsed = if buf.is_empty() {
            Parse::Partial(None)
        } else {
            parse(&buf)
        };
        match parsed {
            Parse::Complete(head, len) => {
                let request: Vec<u8> = buf.drain(..len).collect();
                record(id, "req", &request);
                // The 100 Continue goes out before the answer even when the body came with
                // the head.
                if head.send_continue && !continued {
                    let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                (begun, continued) = (false, false);
                let reply = match &head.reply {
                    Reply::Echo => echo(&request, head.is_head),
                    Reply::Raw(bytes) => bytes.clone(),
                    Reply::RequestBody => request[head.len..].to_vec(),
                };
                if write_reply(&mut s, &reply, head.pause_at).is_err() {
                    return;
                }
                if head.close {
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                }
                if reply.starts_with(b"HTTP/1.1 101") {
                    return tunnel(s, id, buf);
                }
            }
            Parse::Partial(head) => {
                if let Some(h) = head
                    && h.send_continue
                    && !continued
                {
                    continued = true;
                    if s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                        return;
                    }
                }
                match fill(&mut s, &mut buf) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        if !buf.is_empty() {
                            record(id, "eof", &buf);
                        }
                        return;
                    }
                }
            }
            Parse::Bad(why) => {
                record(id, "bad", &buf);
                log!("connection {id}: {why}");
                let body = format!("400 rawecho: {why}\n");
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// After a 101: every byte read is recorded and written back.
fn tunnel(mut s: TcpStream, id: u64, pending: Vec<u8>) {
    if !pending.is_empty() {
        record(id, "tunnel", &pending);
        if s.write_all(&pending).is_err() {
            return;
        }
    }
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                record(id, "tunnel", &chunk[..n]);
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Head, usize) {
        match parse(buf) {
            Parse::Complete(h, n) => (h, n),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn bad(buf: &[u8]) -> String {
        match parse(buf) {
            Parse::Bad(why) => why,
            other => panic!(
                "{:?} was not rejected: {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    #[test]
    fn requests_are_framed_by_length() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(complete(get).1, get.len());
        let mut two = get.to_vec();
        two.extend_from_slice(b"GET /2 HTTP/1.1\r\n");
        assert_eq!(
            complete(&two).1,
            get.len(),
            "the next request is not part of it"
        );
        let post = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET";
        assert_eq!(complete(post).1, post.len() - 3);
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel"),
            Parse::Partial(Some(_))
        ));
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost"), Parse::Partial(None));
    }

    #[test]
    fn chunked_bodies_keep_every_byte() {
        let body = b"5;a=b\r\nhello\r\n6 ;x=\"q s\"\r\n world\r\n000A\r\n0123456789\r\n0;end\r\nT: 1\r\nU: 2\r\n\r\n";
        assert_eq!(chunked_len(body), Ok(Some(body.len())));
        let mut more = body.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(chunked_len(&more), Ok(Some(body.len())));
        // Data may contain anything, a fake last chunk included.
        let tricky = b"a\r\n0\r\n\r\nGET /\r\n0\r\n\r\n";
        assert_eq!(chunked_len(tricky), Ok(Some(tricky.len())));
        for partial in [
            &b"5\r\nhel"[..],
            b"5\r\nhello\r",
            b"5\r\nhello\r\n0\r\n",
            b"5",
            b"5\r",
        ] {
            assert_eq!(chunked_len(partial), Ok(None), "{partial:?}");
        }
    }

    #[test]
    fn bad_chunked_bodies_are_rejected() {
        for body in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"00000000000000005\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
            b"0\r\nNoColon\r\n\r\n",
            b"5\rX",
            b"5 \r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                chunked_len(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn heads_with_ambiguous_framing_are_bad() {
        bad(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        bad(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
        bad(b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n");
        bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        bad(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n");
        bad(b"GARBAGE\r\n\r\n");
        let (h, _) = complete(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n0\r\n\r\n");
        assert_eq!(h.body, Body::Chunked);
    }

    #[test]
    fn reply_headers() {
        let (h, _) = complete(
            b"HEAD / HTTP/1.1\r\nX-Rawecho-Reply: 4f4B\r\nX-Rawecho-Close: 1\r\nX-Rawecho-Continue: 1\r\nX-Rawecho-Pause-At: 3\r\n\r\n",
        );
        assert_eq!(
            (h.reply, h.close, h.send_continue, h.pause_at, h.is_head),
            (Reply::Raw(b"OK".to_vec()), true, true, Some(3), true)
        );
        let (h, _) =
            complete(b"POST / HTTP/1.1\r\nX-Rawecho-Reply: body\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(h.reply, Reply::RequestBody);
        bad(b"GET / HTTP/1.1\r\nX-Rawecho-Reply: xyz\r\n\r\n");
        assert_eq!(echo(b"HEAD / HTTP/1.1\r\n\r\n", true), b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 19\r\n\r\n");
    }
}
