//! Request and response heads: `httparse` into a fixed array of header slots, the framing
//! decided in one place before any body byte is read (RFC 9112 section 6, with its rejections),
//! and the head tqproxy forwards written once, with only its own edits.
//!
//! What is rejected, and why (request smuggling: a front end must never forward a message
//! whose framing the worker could read differently than it did):
//! - `Content-Length` with `Transfer-Encoding`; a `Transfer-Encoding` that is not one final
//!   `chunked` (unknown codings get 501); a duplicate or non-decimal `Content-Length`;
//!   `Transfer-Encoding` in an HTTP/1.0 request: 400.
//! - Whitespace before a colon, obs-fold, control bytes in names or values, a bare CR, a header
//!   line without a colon (httparse's strict request mode): 400.
//! - An HTTP/1.1 request with no Host or two; a Host that is not an authority: 400.
//! - A request line over [`MAX_REQUEST_LINE`]: 414; a head over [`MAX_HEAD`] or with more than
//!   [`MAX_HEADERS`] fields: 431.
//!
//! A bare LF as line end is accepted in a head (RFC 9112 section 2.2 allows it): the forwarded
//! head is rewritten from the parsed fields with CRLF, so the worker cannot read it otherwise.
//! In a chunked body, which is forwarded as it is, only CRLF is accepted (see `body.rs`).

use std::mem::MaybeUninit;

use httparse::Header;

/// Header fields per head (as hyper).
pub const MAX_HEADERS: usize = 100;
/// Longest request line (nginx: `large_client_header_buffers` 8k).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Longest head, request or response.
pub const MAX_HEAD: usize = 64 * 1024;

/// Header slots for one parse, left uninitialised (httparse fills what it uses): no 3 KiB
/// memset per head.
pub type Slots<'b> = [MaybeUninit<Header<'b>>; MAX_HEADERS];

pub fn slots<'b>() -> Slots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// A range of bytes in the buffer a head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// `part` must lie inside `base` (httparse hands out sub-slices of its input).
    fn within(base: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).saturating_sub(base.as_ptr() as usize);
        let start = start.min(base.len());
        let end = (start + part.len()).min(base.len());
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    #[inline]
    pub fn get<'a>(&self, base: &'a [u8]) -> &'a [u8] {
        base.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }

    /// The span as text (spans of validated ASCII, or `""` when it is not UTF-8).
    #[inline]
    pub fn str<'a>(&self, base: &'a [u8]) -> &'a str {
        std::str::from_utf8(self.get(base)).unwrap_or("")
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Why a head was refused: the status to answer and a short reason for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub why: &'static str,
}

const fn bad(why: &'static str) -> Reject {
    Reject { status: 400, why }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Trace,
    Connect,
    Other,
}

impl Method {
    fn of(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "TRACE" => Method::Trace,
            "CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// RFC 9110 section 9.2.2: safe to send twice.
    pub fn idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

/// The header fields tqproxy looks at, by name (compared case-insensitively).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Upgrade,
    Expect,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    XRequestId,
    Referer,
    UserAgent,
    Other,
}

#[inline]
fn field(name: &str) -> Field {
    let n = name.as_bytes();
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    match n.len() {
        2 if is("te") => Field::Te,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::Expect,
        7 if is("upgrade") => Field::Upgrade,
        7 if is("referer") => Field::Referer,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::KeepAlive,
        10 if is("user-agent") => Field::UserAgent,
        12 if is("x-request-id") => Field::XRequestId,
        14 if is("content-length") => Field::ContentLength,
        15 if is("x-forwarded-for") => Field::XForwardedFor,
        16 if is("x-forwarded-host") => Field::XForwardedHost,
        16 if is("proxy-connection") => Field::ProxyConnection,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        17 if is("x-forwarded-proto") => Field::XForwardedProto,
        _ => Field::Other,
    }
}

/// RFC 9110 `tchar`.
#[inline]
fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// The elements of a comma-separated field value, OWS trimmed (empty ones included).
fn list(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim_ows)
}

/// `host[:port]`: a reg-name, IPv4 or `[IPv6]`, and digits after the colon.
pub(crate) fn valid_host(v: &[u8]) -> bool {
    if v.len() > 255 {
        return false;
    }
    let (host, port) = if v.first() == Some(&b'[') {
        match v.iter().position(|&b| b == b']') {
            Some(i) => {
                let inside = &v[1..i];
                if inside.is_empty()
                    || !inside
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                match &v[i + 1..] {
                    [] => return true,
                    [b':', port @ ..] => (&v[..0], port),
                    _ => return false,
                }
            }
            None => return false,
        }
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, &v[..0]),
        }
    };
    let host_ok = host.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            )
    });
    host_ok && port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// A decimal `Content-Length`: digits only, no sign, no list, fits in 63 bits.
pub(crate) fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// The bytes a request target may hold: visible ASCII, no fragment.
pub(crate) fn valid_target(t: &[u8]) -> bool {
    t.iter().all(|&b| (0x21..0x7f).contains(&b) && b != b'#')
}

/// An `Upgrade` field that asks only for h2c (RFC 9113 section 3.1 deprecates that upgrade):
/// tqproxy answers such a request over HTTP/1.1 and does not forward the upgrade, as nginx does.
fn only_h2c(v: &[u8]) -> bool {
    let mut any = false;
    for p in list(v).filter(|p| !p.is_empty()) {
        if !p.eq_ignore_ascii_case(b"h2c") {
            return false;
        }
        any = true;
    }
    any
}

/// Client-supplied request ids are kept when they are one plain, short token.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 128 && v.iter().all(|c| c.is_ascii_graphic())
}

/// Whether a field named as a `Connection` option may be dropped: never the ones that frame a
/// message or route it (RFC 9110 section 7.6.1 forbids naming them; a proxy that obeyed would
/// let a client change the framing the worker sees).
fn may_be_dropped(option: &[u8]) -> bool {
    let name = std::str::from_utf8(option).unwrap_or("");
    !matches!(
        field(name),
        Field::Host | Field::ContentLength | Field::TransferEncoding
    )
}

/// Up to this many `Connection` options are honoured (each names a field to drop).
const MAX_CONNECTION_OPTIONS: usize = 8;

/// A parsed, validated request head. Spans index the buffer it was parsed from.
#[derive(Clone, Debug)]
pub struct Request {
    /// Bytes of the head, final empty line included, from where parsing started.
    pub head_len: usize,
    pub method: Method,
    pub method_span: Span,
    /// The request target as received.
    pub target: Span,
    /// Path and query in origin form (for absolute-form, the part after the authority; empty
    /// means `/`). `*` for `OPTIONS *`.
    pub path_query: Span,
    /// The authority of an absolute-form target: it replaces Host (RFC 9112 section 3.2.2).
    pub authority: Option<Span>,
    pub http10: bool,
    /// The Host header's value.
    pub host: Option<Span>,
    pub framing: Framing,
    /// The client allows the connection to stay open after this request.
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` field (HTTP/1.1 only).
    pub upgrade: bool,
    pub expect_continue: bool,
    /// The client's X-Request-Id, when it is one valid value.
    pub request_id: Option<Span>,
    pub referer: Option<Span>,
    pub user_agent: Option<Span>,
    connection_options: [Span; MAX_CONNECTION_OPTIONS],
    n_connection_options: u8,
}

impl Request {
    /// The host the request is for: the absolute-form authority, else Host.
    pub fn host_span(&self) -> Option<Span> {
        self.authority.or(self.host)
    }

    /// The target in origin form, as (a prefix, the rest): `/` goes in front of an
    /// absolute-form target's empty path (`http://h` → `/`, `http://h?q` → `/?q`).
    pub fn origin_form<'a>(&self, buf: &'a [u8]) -> (&'static [u8], &'a [u8]) {
        let pq = self.path_query.get(buf);
        match pq.first() {
            Some(b'/') | Some(b'*') => (b"", pq),
            _ => (b"/", pq),
        }
    }

    /// The path without the query, for routing.
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a str {
        let pq = self.path_query.str(buf);
        let p = pq.split('?').next().unwrap_or("");
        if p.is_empty() { "/" } else { p }
    }

    fn names_option(&self, buf: &[u8], name: &str) -> bool {
        self.connection_options[..self.n_connection_options as usize]
            .iter()
            .any(|o| o.get(buf).eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Where a request head stands after the bytes received so far.
pub enum Parsed<'h, 'b> {
    /// The head is not complete yet.
    Partial,
    Complete(Request, &'h [Header<'b>]),
}

/// Whether `buf` (the bytes received since the head started) can hold a complete head: an
/// empty line after the request line. Cheap enough to call after every read, so httparse runs
/// only once the head is complete (a slow client sending one byte at a time costs no
/// quadratic re-parsing).
pub fn head_complete(buf: &[u8], searched_from: usize) -> bool {
    let from = searched_from.saturating_sub(3);
    let hay = &buf[from.min(buf.len())..];
    // Leading empty lines before the request line are allowed (and skipped by httparse).
    let mut i = 0;
    while i < hay.len() {
        match memchr(b'\n', &hay[i..]) {
            None => return false,
            Some(j) => {
                let at = from + i + j;
                // `\n\n` or `\n\r\n` ending at `at`, not at the very start of the buffer.
                let line_start_empty = at >= 1
                    && (buf[at - 1] == b'\n'
                        || (at >= 2 && buf[at - 1] == b'\r' && buf[at - 2] == b'\n'));
                if line_start_empty && !only_empty_lines(&buf[..=at]) {
                    return true;
                }
                i += j + 1;
            }
        }
    }
    false
}

fn only_empty_lines(b: &[u8]) -> bool {
    b.iter().all(|&c| c == b'\r' || c == b'\n')
}

#[inline]
fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Limits on a head that is still incomplete: a request line over [`MAX_REQUEST_LINE`] is 414,
/// a head over [`MAX_HEAD`] is 431.
pub fn check_partial(buf: &[u8]) -> Result<(), Reject> {
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let line = &buf[skip..];
    let line_end = memchr(b'\n', &line[..line.len().min(MAX_REQUEST_LINE + 1)]);
    if line_end.is_none() && line.len() > MAX_REQUEST_LINE {
        return Err(Reject {
            status: 414,
            why: "request line too long",
        });
    }
    if buf.len() > MAX_HEAD {
        return Err(Reject {
            status: 431,
            why: "request head too large",
        });
    }
    Ok(())
}

/// Checks an incomplete head as far as it goes, so that garbage is refused at once rather
/// than when the head timeout expires. Run it when a line ended in the bytes just read:
/// at most [`MAX_HEADERS`] + 1 times per head.
pub fn check_incomplete(buf: &[u8]) -> Result<(), Reject> {
    check_partial(buf)?;
    let mut slots = slots();
    match parse_request(buf, 0, &mut slots) {
        Ok(_) => Ok(()),
        Err(r) => Err(r),
    }
}

/// Parses and validates the request head at `buf[start..]` (call it once
/// [`head_complete`] says so). Spans index `buf`.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    start: usize,
    slots: &'h mut Slots<'b>,
) -> Result<Parsed<'h, 'b>, Reject> {
    let input = &buf[start..];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(input, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            check_partial(input)?;
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject {
                status: 431,
                why: "too many header fields",
            });
        }
        Err(httparse::Error::Version) => return Err(bad("unsupported HTTP version")),
        Err(httparse::Error::Token) => return Err(bad("invalid method")),
        Err(httparse::Error::HeaderName) => return Err(bad("invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(bad("invalid header value")),
        Err(_) => return Err(bad("malformed request head")),
    };
    check_partial(&input[..head_len.min(input.len())]).map_err(|r| {
        if r.status == 431 {
            r
        } else {
            // A complete head whose request line is too long.
            Reject {
                status: 414,
                why: "request line too long",
            }
        }
    })?;
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(bad("malformed request line"));
    };
    let headers: &'h [Header<'b>] = req.headers;
    let http10 = version == 0;
    let method_kind = Method::of(method);
    let target_bytes = target.as_bytes();
    if !valid_target(target_bytes) {
        return Err(bad("invalid request target"));
    }
    if method_kind == Method::Connect {
        return Err(Reject {
            status: 405,
            why: "CONNECT is not supported",
        });
    }
    let (path_query, authority) = if target_bytes.first() == Some(&b'/') {
        (Span::within(buf, target_bytes), None)
    } else if target_bytes == b"*" {
        if method_kind != Method::Options {
            return Err(bad("asterisk-form is for OPTIONS only"));
        }
        (Span::within(buf, target_bytes), None)
    } else {
        let lower_starts = |p: &[u8]| {
            target_bytes.len() >= p.len() && target_bytes[..p.len()].eq_ignore_ascii_case(p)
        };
        let rest = if lower_starts(b"http://") {
            &target_bytes[7..]
        } else if lower_starts(b"https://") {
            &target_bytes[8..]
        } else {
            return Err(bad("invalid request target"));
        };
        let end = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        let auth = &rest[..end];
        if auth.is_empty() || !valid_host(auth) {
            return Err(bad("invalid authority in request target"));
        }
        (
            Span::within(buf, &rest[end..]),
            Some(Span::within(buf, auth)),
        )
    };

    let mut out = Request {
        head_len,
        method: method_kind,
        method_span: Span::within(buf, method.as_bytes()),
        target: Span::within(buf, target_bytes),
        path_query,
        authority,
        http10,
        host: None,
        framing: Framing::None,
        keep_alive: !http10,
        upgrade: false,
        expect_continue: false,
        request_id: None,
        referer: None,
        user_agent: None,
        connection_options: [Span::default(); MAX_CONNECTION_OPTIONS],
        n_connection_options: 0,
    };
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut te_seen = false;
    let mut chunked_seen = false;
    let mut chunked_last = false;
    let mut unknown_coding = false;
    let mut close = false;
    let mut keep_alive = false;
    let mut upgrade_option = false;
    let mut upgrade_field = false;
    let mut request_ids = 0;
    for h in headers {
        let v = h.value;
        match field(h.name) {
            Field::Host => {
                hosts += 1;
                if hosts > 1 {
                    return Err(bad("more than one Host"));
                }
                if !v.is_empty() && !valid_host(v) {
                    return Err(bad("invalid Host"));
                }
                out.host = Some(Span::within(buf, v));
            }
            Field::ContentLength => {
                if length.is_some() {
                    return Err(bad("more than one Content-Length"));
                }
                length = Some(content_length(v).ok_or(bad("invalid Content-Length"))?);
            }
            Field::TransferEncoding => {
                if http10 {
                    return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
                }
                te_seen = true;
                for coding in list(v) {
                    if !is_token(coding) {
                        return Err(bad("invalid Transfer-Encoding"));
                    }
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        if chunked_seen {
                            return Err(bad("chunked applied twice"));
                        }
                        chunked_seen = true;
                        chunked_last = true;
                    } else {
                        unknown_coding = true;
                        chunked_last = false;
                    }
                }
            }
            Field::Connection => {
                for option in list(v) {
                    if option.is_empty() {
                        continue;
                    }
                    if !is_token(option) {
                        return Err(bad("invalid Connection"));
                    }
                    if option.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else if option.eq_ignore_ascii_case(b"upgrade") {
                        upgrade_option = true;
                    } else if !may_be_dropped(option) {
                        // `Connection: Content-Length` must not make tqproxy drop the field
                        // that frames the body (the worker would read the body as a request).
                    } else {
                        let n = out.n_connection_options as usize;
                        if n == MAX_CONNECTION_OPTIONS {
                            return Err(bad("too many Connection options"));
                        }
                        out.connection_options[n] = Span::within(buf, option);
                        out.n_connection_options += 1;
                    }
                }
            }
            Field::Upgrade => upgrade_field |= !only_h2c(v),
            Field::Expect => {
                out.expect_continue = v.eq_ignore_ascii_case(b"100-continue");
            }
            Field::XRequestId => {
                request_ids += 1;
                out.request_id = Some(Span::within(buf, v));
            }
            Field::Referer => out.referer = Some(Span::within(buf, v)),
            Field::UserAgent => out.user_agent = Some(Span::within(buf, v)),
            _ => {}
        }
    }
    if te_seen {
        if length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        if !chunked_seen {
            return Err(Reject {
                status: 501,
                why: "unsupported transfer coding",
            });
        }
        if !chunked_last {
            return Err(bad("chunked is not the final transfer coding"));
        }
        if unknown_coding {
            return Err(Reject {
                status: 501,
                why: "unsupported transfer coding",
            });
        }
        out.framing = Framing::Chunked;
    } else if let Some(n) = length
        && n > 0
    {
        out.framing = Framing::Length(n);
    }
    if !http10 && hosts == 0 {
        return Err(bad("HTTP/1.1 request without Host"));
    }
    if request_ids != 1 || !out.request_id.is_some_and(|s| valid_request_id(s.get(buf))) {
        out.request_id = None;
    }
    out.keep_alive = if http10 { keep_alive && !close } else { !close };
    out.upgrade = !http10 && upgrade_option && upgrade_field;
    Ok(Parsed::Complete(out, headers))
}

/// tqproxy's edits to a forwarded request.
pub struct RequestEdits<'a> {
    /// The target to send (origin-form; prefix stripped where the route says so), after
    /// `target_prefix` (`/` when stripping left nothing or only a query).
    pub target_prefix: &'a [u8],
    pub target: &'a [u8],
    /// The client's address as text (formatted once per connection).
    pub client_ip: Option<&'a [u8]>,
    pub https: bool,
    /// A request id made by tqproxy (the client sent no valid one): replaces any it sent.
    pub new_request_id: Option<&'a [u8]>,
    /// Host for an HTTP/1.0 request that has none (the upstream speaks HTTP/1.1).
    pub default_host: &'a [u8],
}

/// Writes the head forwarded upstream: the request line with `edits.target`, the client's
/// fields in order without the hop-by-hop ones (and those its Connection names), then
/// tqproxy's: Transfer-Encoding, X-Forwarded-For/Proto/Host, X-Request-Id, Connection.
pub fn write_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    req: &Request,
    headers: &[Header<'_>],
    edits: &RequestEdits<'_>,
) {
    out.extend_from_slice(req.method_span.get(buf));
    out.push(b' ');
    out.extend_from_slice(edits.target_prefix);
    out.extend_from_slice(edits.target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = req.authority.map(|a| a.get(buf));
    let mut wrote_host = false;
    for h in headers {
        let keep = match field(h.name) {
            Field::Connection
            | Field::KeepAlive
            | Field::ProxyConnection
            | Field::Te
            | Field::TransferEncoding
            | Field::XForwardedFor
            | Field::XForwardedProto
            | Field::XForwardedHost => false,
            Field::Upgrade => req.upgrade,
            Field::XRequestId => edits.new_request_id.is_none(),
            Field::Host => {
                wrote_host = true;
                if let Some(a) = authority {
                    out.extend_from_slice(h.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(a);
                    out.extend_from_slice(b"\r\n");
                    continue;
                }
                true
            }
            _ => true,
        };
        if !keep || (req.n_connection_options > 0 && req.names_option(buf, h.name)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if req.framing == Framing::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    let host = req.host_span().map(|s| s.get(buf));
    // The upstream speaks HTTP/1.1: an HTTP/1.0 request without Host gets one (its
    // absolute-form authority, else the listener's address).
    if !wrote_host {
        let h = authority.unwrap_or(edits.default_host);
        if !h.is_empty() {
            out.extend_from_slice(b"Host: ");
            out.extend_from_slice(h);
            out.extend_from_slice(b"\r\n");
        }
    }
    let earlier = headers
        .iter()
        .filter(|h| field(h.name) == Field::XForwardedFor)
        .map(|h| h.value);
    write_proxy_fields(out, earlier, host, edits);
    if req.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// tqproxy's own fields of a forwarded request, for both protocols: X-Forwarded-For (the
/// values of earlier proxies, then the client), X-Forwarded-Proto, X-Forwarded-Host (`host`)
/// and a new X-Request-Id. (The client's X-Forwarded-Proto and -Host are never forwarded.)
pub fn write_proxy_fields<'v>(
    out: &mut Vec<u8>,
    earlier_forwarded_for: impl Iterator<Item = &'v [u8]>,
    host: Option<&[u8]>,
    edits: &RequestEdits<'_>,
) {
    if let Some(ip) = edits.client_ip {
        out.extend_from_slice(b"X-Forwarded-For: ");
        for v in earlier_forwarded_for.filter(|v| !v.is_empty()) {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if edits.https {
        b"X-Forwarded-Proto: https\r\n"
    } else {
        b"X-Forwarded-Proto: http\r\n"
    });
    if let Some(h) = host.filter(|h| !h.is_empty()) {
        out.extend_from_slice(b"X-Forwarded-Host: ");
        out.extend_from_slice(h);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(id) = edits.new_request_id {
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
}

/// Why a worker's response head was refused (the client gets 502).
pub type BadResponse = &'static str;

/// A parsed, validated response head.
#[derive(Clone, Debug)]
pub struct Response {
    pub head_len: usize,
    pub status: u16,
    /// How the body is delimited, given the request (HEAD, 1xx, 204 and 304 have none).
    pub framing: Framing,
    /// The upstream connection may carry another request after this response.
    pub reusable: bool,
    connection_options: [Span; MAX_CONNECTION_OPTIONS],
    n_connection_options: u8,
    /// The status line after the version (`200 OK`), to forward as it is.
    rest_of_status_line: Span,
}

impl Response {
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

/// Parses and validates a response head at the start of `buf`; `Ok(None)` while incomplete.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    slots: &'h mut Slots<'b>,
    head_request: bool,
) -> Result<Option<(Response, &'h [Header<'b>])>, BadResponse> {
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err("response head too large");
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err("too many header fields in response"),
        Err(_) => return Err("malformed response head"),
    };
    if head_len > MAX_HEAD {
        return Err("response head too large");
    }
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err("malformed status line");
    };
    let headers: &'h [Header<'b>] = resp.headers;
    // "HTTP/1.x " is 9 bytes; the status line ends at the first LF (CR dropped).
    let line_end = memchr(b'\n', buf).unwrap_or(0);
    let line_end = if line_end > 0 && buf[line_end - 1] == b'\r' {
        line_end - 1
    } else {
        line_end
    };
    if line_end < 12 {
        return Err("malformed status line");
    }
    let mut out = Response {
        head_len,
        status,
        framing: Framing::None,
        reusable: version == 1,
        connection_options: [Span::default(); MAX_CONNECTION_OPTIONS],
        n_connection_options: 0,
        rest_of_status_line: Span::within(buf, &buf[9..line_end]),
    };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in headers {
        match field(h.name) {
            Field::ContentLength => {
                if length.is_some() {
                    return Err("more than one Content-Length in response");
                }
                length = Some(content_length(h.value).ok_or("invalid Content-Length in response")?);
            }
            Field::TransferEncoding => {
                if chunked || !h.value.eq_ignore_ascii_case(b"chunked") {
                    return Err("unsupported Transfer-Encoding in response");
                }
                chunked = true;
            }
            Field::Connection => {
                for option in list(h.value) {
                    if option.eq_ignore_ascii_case(b"close") {
                        out.reusable = false;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        out.reusable |= version == 0;
                    } else if !option.is_empty()
                        && !option.eq_ignore_ascii_case(b"upgrade")
                        && may_be_dropped(option)
                        && (out.n_connection_options as usize) < MAX_CONNECTION_OPTIONS
                    {
                        out.connection_options[out.n_connection_options as usize] =
                            Span::within(buf, option);
                        out.n_connection_options += 1;
                    }
                }
            }
            _ => {}
        }
    }
    if chunked && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding in response");
    }
    out.framing = if head_request || out.interim() || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        if n == 0 {
            Framing::None
        } else {
            Framing::Length(n)
        }
    } else {
        out.reusable = false;
        Framing::Close
    };
    Ok(Some((out, headers)))
}

/// tqproxy's edits to a response it relays.
pub struct ResponseEdits<'a> {
    pub request_id: &'a [u8],
    /// tqproxy closes the client connection after this response.
    pub close: bool,
    /// An HTTP/1.0 client keeps the connection: say so.
    pub keep_alive_http10: bool,
    /// The body is relayed de-chunked (an HTTP/1.0 client): drop Transfer-Encoding.
    pub dechunk: bool,
}

/// The worker's response fields that are relayed to the client, in order: all but the
/// hop-by-hop ones (those its Connection names included) and X-Request-Id (tqproxy writes its
/// own). Upgrade is kept on a 101 only; Transfer-Encoding unless the body is relayed
/// `dechunked` (an HTTP/1.0 client, or HTTP/2, which has no transfer codings).
pub fn response_fields<'h, 'b>(
    buf: &'b [u8],
    resp: &'h Response,
    headers: &'h [Header<'b>],
    dechunked: bool,
) -> impl Iterator<Item = &'h Header<'b>> + 'h
where
    'b: 'h,
{
    let switching = resp.status == 101;
    headers.iter().filter(move |h| {
        let keep = match field(h.name) {
            Field::Connection | Field::KeepAlive | Field::ProxyConnection | Field::XRequestId => {
                false
            }
            Field::Upgrade => switching,
            Field::TransferEncoding => !dechunked,
            _ => true,
        };
        keep && !resp.connection_options[..resp.n_connection_options as usize]
            .iter()
            .any(|o| o.get(buf).eq_ignore_ascii_case(h.name.as_bytes()))
    })
}

/// Writes the response head for the client: `HTTP/1.1` and the worker's status, its fields in
/// order without the hop-by-hop ones, then X-Request-Id and Connection. A 101 keeps Upgrade
/// and says `Connection: upgrade`.
pub fn write_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    resp: &Response,
    headers: &[Header<'_>],
    edits: &ResponseEdits<'_>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.rest_of_status_line.get(buf));
    out.extend_from_slice(b"\r\n");
    let switching = resp.status == 101;
    for h in response_fields(buf, resp, headers, edits.dechunk) {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if resp.interim() && !switching {
        out.extend_from_slice(b"\r\n");
        return;
    }
    if !edits.request_id.is_empty() {
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(edits.request_id);
        out.extend_from_slice(b"\r\n");
    }
    if switching {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if edits.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if edits.keep_alive_http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, Reject> {
        let mut slots = slots();
        match parse_request(raw, 0, &mut slots)? {
            Parsed::Complete(r, _) => Ok(r),
            Parsed::Partial => Err(Reject {
                status: 0,
                why: "partial",
            }),
        }
    }

    fn forwarded(raw: &[u8], target: &[u8]) -> String {
        let mut slots = slots();
        let Ok(Parsed::Complete(r, headers)) = parse_request(raw, 0, &mut slots) else {
            panic!("not complete")
        };
        let mut out = Vec::new();
        write_request(
            &mut out,
            raw,
            &r,
            headers,
            &RequestEdits {
                target_prefix: b"",
                target,
                client_ip: Some(b"192.0.2.7"),
                https: false,
                new_request_id: None,
                default_host: b"127.0.0.1:8080",
            },
        );
        String::from_utf8(out).unwrap()
    }

    fn status(raw: &[u8]) -> u16 {
        match parse(raw) {
            Ok(_) => 200,
            Err(r) => r.status,
        }
    }

    #[test]
    fn framing_is_decided_with_the_rfc_rejections() {
        let ok = |raw: &[u8]| parse(raw).unwrap().framing;
        assert_eq!(ok(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Framing::None);
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5 \r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            ok(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tChunked\r\n\r\n"),
            Framing::Chunked
        );
        for (raw, want) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..], 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked;q=1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400),
            (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400),
            (b"GET / http/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
            (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ] {
            assert_eq!(status(raw), want, "{}", String::from_utf8_lossy(raw).escape_debug());
        }
    }

    #[test]
    fn valid_edge_cases_are_accepted() {
        for raw in [
            &b"GET / HTTP/1.1\nHost: x\n\n"[..],
            b"GET / HTTP/1.0\r\n\r\n",
            b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://a.test:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: caf\xc3\xa9\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(
                status(raw),
                200,
                "{}",
                String::from_utf8_lossy(raw).escape_debug()
            );
        }
        let r = parse(b"GET http://a.test:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
        let raw = b"GET http://a.test:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n";
        assert_eq!(r.host_span().unwrap().get(raw), b"a.test:81");
        assert_eq!(r.path_query.get(raw), b"/x?y");
        assert_eq!(r.path(raw), "/x");
    }

    #[test]
    fn limits_give_414_and_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
        assert_eq!(status(long_line.as_bytes()), 414);
        assert_eq!(
            check_partial(format!("GET /{}", "a".repeat(9000)).as_bytes())
                .unwrap_err()
                .status,
            414
        );
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()),
            431
        );
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "a".repeat(70_000));
        assert_eq!(check_partial(big.as_bytes()).unwrap_err().status, 431);
    }

    #[test]
    fn head_completion_is_found_incrementally() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..raw.len() {
            assert!(!head_complete(&raw[..cut], 0), "{cut}");
        }
        assert!(head_complete(raw, 0));
        assert!(head_complete(raw, raw.len() - 1));
        assert!(head_complete(b"GET / HTTP/1.0\n\n", 0));
        assert!(!head_complete(b"\r\n\r\n", 0), "only empty lines");
    }

    #[test]
    fn connection_options_never_drop_framing_or_host() {
        // Found by fuzz/run (request_head): `Connection: Host` dropped Host upstream.
        let raw = b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Host, Content-Length, Transfer-Encoding, X-A\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            forwarded(raw, b"/"),
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\n\r\n"
        );
        let resp = b"HTTP/1.1 200 OK\r\nConnection: Content-Length, Transfer-Encoding\r\nContent-Length: 2\r\n\r\nok";
        let mut slots = slots();
        let (r, headers) = parse_response(resp, &mut slots, false).unwrap().unwrap();
        let mut out = Vec::new();
        let edits = ResponseEdits {
            request_id: b"i",
            close: false,
            keep_alive_http10: false,
            dechunk: false,
        };
        write_response(&mut out, resp, &r, headers, &edits);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: i\r\n\r\n"
        );
    }

    #[test]
    fn the_forwarded_head_has_only_tqproxys_edits() {
        let raw = b"GET /api/x?q HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Request-Id: abc\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            forwarded(raw, b"/x?q"),
            "GET /x?q HTTP/1.1\r\nHost: a.test\r\nX-Request-Id: abc\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.1, 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a.test\r\n\r\n"
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nHost: h\r\n\r\n";
        assert_eq!(
            forwarded(chunked, b"/"),
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\n\r\n"
        );
        let r = parse(b"GET http://h?q=1 HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!(
            r.origin_form(b"GET http://h?q=1 HTTP/1.1\r\nHost: h\r\n\r\n"),
            (&b"/"[..], &b"?q=1"[..]),
            "found by fuzz/run (request_head)"
        );
        let absolute = b"GET http://a.test:81/x HTTP/1.1\r\nHost: other\r\n\r\n";
        assert_eq!(
            forwarded(absolute, b"/x"),
            "GET /x HTTP/1.1\r\nHost: a.test:81\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a.test:81\r\n\r\n"
        );
        let http10_absolute = b"GET http://h.test:81/x HTTP/1.0\r\n\r\n";
        assert_eq!(
            forwarded(http10_absolute, b"/x"),
            "GET /x HTTP/1.1\r\nHost: h.test:81\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h.test:81\r\n\r\n",
            "found by fuzz/run (request_head)"
        );
        let http10 = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(
            forwarded(http10, b"/"),
            "GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
        let ws =
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(
            forwarded(ws, b"/ws"),
            "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\nConnection: upgrade\r\n\r\n"
        );
    }

    #[test]
    fn an_upgrade_to_h2c_is_not_taken() {
        let h2c = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        assert!(!parse(h2c).unwrap().upgrade);
        assert_eq!(
            forwarded(h2c, b"/"),
            "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\n\r\n"
        );
        let ws =
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n";
        assert!(parse(ws).unwrap().upgrade, "another protocol offered too");
    }

    #[test]
    fn responses_are_checked_and_rewritten() {
        let head = |raw: &[u8], head_req: bool| {
            let mut slots = slots();
            parse_response(raw, &mut slots, head_req)
                .map(|r| r.map(|(r, _)| (r.framing, r.reusable)))
        };
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false),
            Ok(Some((Framing::Length(3), true)))
        );
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true),
            Ok(Some((Framing::None, true)))
        );
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\n\r\n", false),
            Ok(Some((Framing::Close, false)))
        );
        assert_eq!(
            head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            Ok(Some((Framing::Length(1), false)))
        );
        assert_eq!(
            head(
                b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                false
            ),
            Ok(Some((Framing::None, true)))
        );
        assert_eq!(head(b"HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None));
        for raw in [
            &b"HTTP/1.1 abc OK\r\n\r\n"[..],
            b"FOO\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(
                head(raw, false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let raw = b"HTTP/1.0 200 Fine\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nX-Request-Id: theirs\r\nContent-Length: 2\r\n\r\nok";
        let mut slots = slots();
        let (r, headers) = parse_response(raw, &mut slots, false).unwrap().unwrap();
        let mut out = Vec::new();
        write_response(
            &mut out,
            raw,
            &r,
            headers,
            &ResponseEdits {
                request_id: b"ours",
                close: true,
                keep_alive_http10: false,
                dechunk: false,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nX-Request-Id: ours\r\nConnection: close\r\n\r\n"
        );
    }
}
