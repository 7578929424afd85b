//! The properties the fuzz targets check, over tqproxy's own parsing code: the HTTP/1.1
//! engine's modules included by path (they need nothing else), the config loader and the
//! control protocol through the tqproxy library.
//!
//! - `request_head`: any input either is refused with one of the engine's statuses, or is
//!   incomplete, or parses; a parsed head, forwarded with tqproxy's edits, parses again to the
//!   same method, target, framing and host: the worker cannot frame the request otherwise than
//!   tqproxy did. No hop-by-hop field survives; exactly one X-Forwarded-For is sent.
//! - `response_head`: the same for a worker's response head and the head the client gets.
//! - `chunked`: the validator gives the same verdict whatever the input's split; what it
//!   accepts is a body a strict reference decoder reads the same way, data included.
//! - `tqproxy_yaml`, `worker_yaml` (see `config.rs`): the config loader, text → validated model,
//!   for the global file and a worker's: errors, not panics, each naming the file, with a
//!   message and a line inside it; an accepted model holds the invariants the rest of tqproxy
//!   relies on; validating again gives the same answer; the CLI's lenient reading of
//!   `control.socket` finds the socket the server binds.
//! - `control` (see `control.rs`): a control-socket line as the server reads it (a request)
//!   and as the CLI reads it (a response): errors, not panics; what is accepted survives a
//!   round trip through the encoders; an error goes back to the client intact.
//!
//! A panic (or a failed assertion) is a finding: `fuzz/run` keeps the input under
//! `fuzz/artifacts/`; add it to `fuzz/regressions/<target>/` and it is replayed by
//! `cargo test --manifest-path fuzz/Cargo.toml` (and by `fuzz/run` before fuzzing).

mod config;
mod control;

pub use config::{tqproxy_yaml, worker_yaml};
pub use control::control;

#[path = "../../src/proxy/h1/body.rs"]
#[allow(dead_code)]
pub mod body;
#[path = "../../src/proxy/h1/parse.rs"]
#[allow(dead_code)]
pub mod parse;

use httparse::EMPTY_HEADER;
use parse::{Framing, MAX_HEADERS, Parsed, RequestEdits, ResponseEdits};

const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "te"];

pub fn request_head(data: &[u8]) {
    let mut slots = parse::slots();
    let (req, headers) = match parse::parse_request(data, 0, &mut slots) {
        Err(r) => {
            assert!(
                matches!(r.status, 400 | 405 | 414 | 431 | 501),
                "unexpected status {}",
                r.status
            );
            return;
        }
        Ok(Parsed::Partial) => return,
        Ok(Parsed::Complete(req, headers)) => (req, headers),
    };
    assert!(req.head_len <= data.len());
    // What `head_complete` promises the engine: it never misses a complete head.
    assert!(
        parse::head_complete(&data[..req.head_len], 0),
        "httparse found a head that head_complete does not see"
    );
    let (slash, rest) = req.origin_form(data);
    let target = [slash, rest].concat();
    let mut out = Vec::new();
    parse::write_request(
        &mut out,
        data,
        &req,
        headers,
        &RequestEdits {
            target_prefix: slash,
            target: rest,
            client_ip: Some(b"192.0.2.1"),
            https: false,
            new_request_id: req.request_id.is_none().then_some(&b"0123456789abcdef"[..]),
            default_host: b"127.0.0.1:8080",
        },
    );
    // The forwarded head, as a worker parses it (more slots: tqproxy adds up to five fields).
    let mut slots2 = [EMPTY_HEADER; MAX_HEADERS + 8];
    let mut again = httparse::Request::new(&mut slots2);
    let n = match again.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "the forwarded head does not parse ({other:?}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(n, out.len(), "the forwarded head ends where it should");
    assert_eq!(again.version, Some(1));
    assert_eq!(
        again.method.map(str::as_bytes),
        Some(req.method_span.get(data))
    );
    assert_eq!(again.path.map(str::as_bytes), Some(&target[..]));
    let fwd = again.headers;
    let count = |name: &str| {
        fwd.iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    for name in HOP_BY_HOP {
        let expected = usize::from(*name == "connection" && req.upgrade);
        assert_eq!(count(name), expected, "{name} in the forwarded head");
    }
    // tqproxy's own, once each (a client's are replaced).
    let host = req
        .host_span()
        .map(|s| s.get(data))
        .filter(|h| !h.is_empty());
    assert_eq!(count("x-forwarded-host"), usize::from(host.is_some()));
    assert_eq!(count("x-forwarded-proto"), 1);
    assert_eq!(count("x-forwarded-for"), 1);
    assert_eq!(count("host"), 1, "exactly one Host upstream");
    assert!(count("x-request-id") <= 1);
    // The worker frames the body exactly as tqproxy does.
    let te = count("transfer-encoding");
    // Values as a worker reads them (`05` is 5: leading zeros are valid digits).
    let cl: Vec<Option<u64>> = fwd
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .collect();
    match req.framing {
        Framing::Chunked => {
            assert_eq!(te, 1);
            assert!(cl.is_empty());
        }
        Framing::Length(len) => {
            assert_eq!(te, 0);
            assert_eq!(cl, vec![Some(len)]);
        }
        Framing::None => {
            assert_eq!(te, 0);
            assert!(cl.len() <= 1 && cl.iter().all(|v| *v == Some(0)), "{cl:?}");
        }
        Framing::Close => panic!("a request is never close-delimited"),
    }
    // And our own parser agrees with itself on the forwarded head (it is what a second
    // tqproxy in front of the worker would see).
    if fwd.len() <= MAX_HEADERS {
        let mut slots3 = parse::slots();
        match parse::parse_request(&out, 0, &mut slots3) {
            Ok(Parsed::Complete(r2, _)) => assert_eq!(r2.framing, req.framing),
            Ok(Parsed::Partial) => panic!("the forwarded head is incomplete"),
            Err(r) => panic!("the forwarded head is refused: {}", r.why),
        }
    }
}

pub fn response_head(data: &[u8]) {
    for head_request in [false, true] {
        let mut slots = parse::slots();
        let Ok(Some((resp, headers))) = parse::parse_response(data, &mut slots, head_request)
        else {
            continue;
        };
        assert!(resp.head_len <= data.len());
        let mut out = Vec::new();
        parse::write_response(
            &mut out,
            data,
            &resp,
            headers,
            &ResponseEdits {
                request_id: b"rid",
                close: false,
                keep_alive_http10: false,
                dechunk: false,
            },
        );
        let mut slots2 = [EMPTY_HEADER; MAX_HEADERS + 4];
        let mut again = httparse::Response::new(&mut slots2);
        match again.parse(&out) {
            Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len()),
            other => panic!(
                "the relayed head does not parse ({other:?}): {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
        assert_eq!(again.code, Some(resp.status));
        if again.headers.len() <= MAX_HEADERS {
            let mut slots3 = parse::slots();
            let r2 = parse::parse_response(&out, &mut slots3, head_request)
                .expect("the relayed head is valid")
                .expect("and complete");
            assert_eq!(r2.0.framing, resp.framing);
        }
    }
}

pub fn chunked(data: &[u8]) {
    let Some((&split_at, data)) = data.split_first() else {
        return;
    };
    let whole = run(&[data]);
    let cut = (split_at as usize * data.len()) / 255;
    let halves = run(&[&data[..cut], &data[cut..]]);
    let bytes: Vec<&[u8]> = data.chunks(((split_at % 7) + 1) as usize).collect();
    let pieces = run(&bytes);
    assert_eq!(whole, halves, "split at {cut}");
    assert_eq!(whole, pieces, "pieces of {}", (split_at % 7) + 1);
    if let Ok((consumed, true, decoded)) = &whole {
        match reference_decode(&data[..*consumed]) {
            Some((n, reference)) => {
                assert_eq!(n, *consumed);
                assert_eq!(&reference, decoded);
            }
            None => panic!("accepted a body the reference decoder refuses"),
        }
    }
}

type Verdict = Result<(usize, bool, Vec<u8>), body::ChunkError>;

/// Feeds the pieces in order; (bytes consumed, done, data).
fn run(pieces: &[&[u8]]) -> Verdict {
    let mut c = body::Chunked::new();
    let mut data = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        let p = c.feed(piece, |a, b| data.extend_from_slice(&piece[a..b]))?;
        assert!(p.consumed <= piece.len());
        consumed += p.consumed;
        if p.done {
            return Ok((consumed, true, data));
        }
        assert_eq!(p.consumed, piece.len(), "stopped early without being done");
    }
    Ok((consumed, false, data))
}

/// A strict chunked decoder written the simple way (RFC 9112 section 7.1 grammar, BWS before
/// extensions, CRLF only): (length of the body, its data), or `None`.
fn reference_decode(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let rel = b[at..].windows(2).position(|w| w == b"\r\n")?;
        Some((&b[at..at + rel], at + rel + 2))
    };
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let (l, next) = line(at)?;
        let digits = l.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&l[..digits]).ok()?, 16).ok()?;
        let ext = &l[digits..];
        let ext_ok = ext.is_empty() || {
            let t = ext
                .iter()
                .position(|&c| c != b' ' && c != b'\t')
                .unwrap_or(ext.len());
            ext.get(t) == Some(&b';') && ext.iter().all(|&c| c == b'\t' || c >= 0x20 && c != 0x7f)
        };
        if !ext_ok {
            return None;
        }
        at = next;
        if size == 0 {
            break;
        }
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        if end + 2 > b.len() || &b[end..end + 2] != b"\r\n" {
            return None;
        }
        data.extend_from_slice(&b[at..end]);
        at = end + 2;
    }
    // Trailer fields, then the empty line.
    loop {
        let (l, next) = line(at)?;
        at = next;
        if l.is_empty() {
            return Some((at, data));
        }
        let colon = l.iter().position(|&c| c == b':')?;
        if !parse::is_token(&l[..colon])
            || !l[colon + 1..]
                .iter()
                .all(|&c| c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80)
        {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every input kept under `regressions/<target>/` (findings and seeds) is checked again.
    #[test]
    fn regressions_still_pass() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        let mut n = 0;
        for (target, check) in [
            ("request_head", super::request_head as fn(&[u8])),
            ("response_head", super::response_head),
            ("chunked", super::chunked),
            ("tqproxy_yaml", super::tqproxy_yaml),
            ("worker_yaml", super::worker_yaml),
            ("control", super::control),
        ] {
            let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
                continue;
            };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("readable");
                check(&data);
                n += 1;
            }
        }
        assert!(n > 0, "no regression inputs under {}", dir.display());
    }
}
