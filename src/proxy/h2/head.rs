//! HTTP/2 heads to and from the HTTP/1.1 the workers speak.
//!
//! - The request head sent upstream ([`write_request`]): the request line with the route's
//!   target, `Host` from `:authority` (else the Host field, else the listener's address), the
//!   client's fields in order without the connection-specific ones (h2 already refuses a request
//!   with `connection`, `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade` or a
//!   `te` other than `trailers`: dropped here too, and `te` always, as the HTTP/1.1 engine
//!   does), every `cookie` field joined into one with `; ` (RFC 9113 section 8.2.3), then the
//!   framing tqproxy decided (`Content-Length`, or `Transfer-Encoding: chunked` for a body of
//!   unknown length) and the same X-Forwarded-*/X-Request-Id fields as HTTP/1.1
//!   ([`parse::write_proxy_fields`]).
//! - The response head for the client ([`response`]): the worker's status and the fields the
//!   HTTP/1.1 engine relays ([`parse::response_fields`]), without the ones HTTP/2 forbids.
//! - Chunked trailers both ways: the client's HTTP/2 trailers become a chunked trailer
//!   section, the worker's trailer section becomes HTTP/2 trailers.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::super::h1::parse::{self, RequestEdits};

/// How the request body goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// What [`write_request`] writes.
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The target, as the two parts of [`crate::routes::Route::upstream_target`].
    pub target: [&'a [u8]; 2],
    pub host: &'a [u8],
    pub headers: &'a HeaderMap,
    pub framing: BodyFraming,
    /// The X-Forwarded-* and X-Request-Id edits (the target fields are unused).
    pub edits: RequestEdits<'a>,
}

/// Fields never forwarded as they came: tqproxy writes its own (Host, the framing, the
/// X-Forwarded-* fields, a new X-Request-Id), joins them (cookie), or they are
/// connection-specific. (`expect`: tqproxy answers `100-continue` itself.)
fn dropped(name: &HeaderName, new_request_id: bool) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "upgrade"
            | "te"
            | "expect"
            | "cookie"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
    ) || (new_request_id && name.as_str() == "x-request-id")
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the HTTP/1.1 head forwarded upstream for an HTTP/2 request.
pub fn write_request(out: &mut Vec<u8>, h: &RequestHead<'_>) {
    out.extend_from_slice(h.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(h.target[0]);
    out.extend_from_slice(h.target[1]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    field(out, b"Host", h.host);
    let new_id = h.edits.new_request_id.is_some();
    let mut cookie = false;
    for (name, value) in h.headers {
        if !dropped(name, new_id) {
            field(out, name.as_str().as_bytes(), value.as_bytes());
        } else if name == header::COOKIE && !cookie {
            cookie = true;
            out.extend_from_slice(b"cookie: ");
            for (i, v) in h.headers.get_all(header::COOKIE).iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b"; ");
                }
                out.extend_from_slice(v.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    match h.framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    let earlier = h
        .headers
        .get_all(header::HeaderName::from_static("x-forwarded-for"))
        .iter()
        .map(|v| v.as_bytes());
    parse::write_proxy_fields(out, earlier, Some(h.host), &h.edits);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, in `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The size line of a chunk of `len` bytes, after the CRLF that ends the previous chunk's data
/// (`crlf_first`): one write carries both.
pub fn chunk_prefix(len: usize, crlf_first: bool, buf: &mut [u8; 24]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 0;
    if crlf_first {
        buf[..2].copy_from_slice(b"\r\n");
        i = 2;
    }
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for d in (0..digits).rev() {
        buf[i] = HEX[(len >> (4 * d)) & 0xf];
        i += 1;
    }
    buf[i..i + 2].copy_from_slice(b"\r\n");
    &buf[..i + 2]
}

/// Fields that may not travel as trailers (RFC 9110 section 6.5.1: framing, routing,
/// connection-specific).
fn trailer_forbidden(name: &str) -> bool {
    matches!(
        name,
        "content-length"
            | "transfer-encoding"
            | "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

/// The end of a chunked body: the last chunk, the client's trailers, the final CRLF.
pub fn write_chunked_end(out: &mut Vec<u8>, crlf_first: bool, trailers: Option<&HeaderMap>) {
    if crlf_first {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if !trailer_forbidden(name.as_str()) {
            field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The worker's trailer section (its lines, as [`crate::proxy::h1::body::Chunked`] hands them
/// out) as HTTP/2 trailers; `None` when there are none or they do not parse.
pub fn trailers(section: &[u8]) -> Option<HeaderMap> {
    if section.is_empty() {
        return None;
    }
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut with_end = Vec::with_capacity(section.len() + 2);
    with_end.extend_from_slice(section);
    with_end.extend_from_slice(b"\r\n");
    let Ok(httparse::Status::Complete((_, fields))) =
        httparse::parse_headers(&with_end, &mut slots)
    else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) else {
            continue;
        };
        if !trailer_forbidden(name.as_str()) {
            map.append(name, value);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// The response for the client: the worker's status and relayed fields (none of those HTTP/2
/// forbids), then tqproxy's X-Request-Id. The field values share one copy of the head (no
/// allocation per field); the request id is marked never-indexed: a value seen once would only
/// push the worker's repeated fields out of the client's HPACK table.
pub fn response(
    buf: &[u8],
    resp: &parse::Response,
    headers: &[httparse::Header<'_>],
    request_id: &[u8],
) -> Result<http::Response<()>, &'static str> {
    let mut out = http::Response::new(());
    *out.status_mut() =
        http::StatusCode::from_u16(resp.status).map_err(|_| "invalid status in response")?;
    let map = out.headers_mut();
    let head = &buf[..resp.head_len.min(buf.len())];
    let shared = Bytes::copy_from_slice(head);
    for h in parse::response_fields(buf, resp, headers, true) {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| "invalid field name in response")?;
        if name == header::TE || name == header::UPGRADE {
            continue;
        }
        // httparse hands out sub-slices of the head.
        let at = (h.value.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
        let value = match shared.get(at..at + h.value.len()) {
            Some(v) if v == h.value => {
                HeaderValue::from_maybe_shared(shared.slice(at..at + v.len()))
            }
            _ => HeaderValue::from_bytes(h.value),
        }
        .map_err(|_| "invalid field value in response")?;
        map.append(name, value);
    }
    if !request_id.is_empty()
        && let Ok(mut v) = HeaderValue::from_bytes(request_id)
    {
        v.set_sensitive(true);
        map.insert(HeaderName::from_static("x-request-id"), v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)], framing: BodyFraming, new_id: Option<&[u8]>) -> String {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        write_request(
            &mut out,
            &RequestHead {
                method: "POST",
                target: [b"", b"/x?q=1"],
                host: b"a.test",
                headers: &map,
                framing,
                edits: RequestEdits {
                    target_prefix: b"",
                    target: b"",
                    client_ip: Some(b"192.0.2.7"),
                    https: true,
                    new_request_id: new_id,
                    default_host: b"",
                },
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_upstream_head_is_exact() {
        assert_eq!(
            head(
                &[
                    ("accept", "*/*"),
                    ("cookie", "a=1"),
                    ("x-forwarded-for", "10.0.0.1"),
                    ("cookie", "b=2"),
                    ("te", "trailers"),
                    ("host", "ignored.test"),
                    ("content-length", "5"),
                    ("x-forwarded-proto", "http"),
                    ("x-request-id", "theirs"),
                    ("expect", "100-continue"),
                ],
                BodyFraming::Length(5),
                Some(b"0123456789abcdef"),
            ),
            "POST /x?q=1 HTTP/1.1\r\nHost: a.test\r\naccept: */*\r\ncookie: a=1; b=2\r\n\
             Content-Length: 5\r\nX-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: a.test\r\n\
             X-Request-Id: 0123456789abcdef\r\n\r\n"
        );
        assert_eq!(
            head(&[("x-request-id", "abc")], BodyFraming::Chunked, None),
            "POST /x?q=1 HTTP/1.1\r\nHost: a.test\r\nx-request-id: abc\r\n\
             Transfer-Encoding: chunked\r\nX-Forwarded-For: 192.0.2.7\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: a.test\r\n\r\n"
        );
    }

    #[test]
    fn chunks_and_trailers() {
        let mut b = [0; 24];
        assert_eq!(chunk_prefix(0x1f, false, &mut b), b"1f\r\n");
        assert_eq!(chunk_prefix(16384, true, &mut b), b"\r\n4000\r\n");
        assert_eq!(chunk_prefix(1, false, &mut b), b"1\r\n");
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("42"));
        t.insert("content-length", HeaderValue::from_static("1"));
        let mut out = Vec::new();
        write_chunked_end(&mut out, true, Some(&t));
        assert_eq!(out, b"\r\n0\r\nx-sum: 42\r\n\r\n");
        let map = trailers(b"X-Sum: 42\r\nContent-Length: 3\r\n").unwrap();
        assert_eq!(map.len(), 1);
        assert_eq!(map["x-sum"], "42");
        assert!(trailers(b"").is_none());
        assert!(trailers(b"bad line\r\n").is_none());
    }

    #[test]
    fn the_response_head_keeps_the_workers_fields_and_our_id() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTE: x\r\nX-Request-Id: theirs\r\nTransfer-Encoding: chunked\r\nX-Worker: w\r\n\r\n";
        let mut slots = parse::slots();
        let (r, headers) = parse::parse_response(raw, &mut slots, false)
            .unwrap()
            .unwrap();
        let resp = response(raw, &r, headers, b"ours").unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-worker", "x-request-id"]);
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-request-id"], "ours");
        assert!(h["x-request-id"].is_sensitive());
    }

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }
}
