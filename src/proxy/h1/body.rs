//! The chunked body validator (RFC 9112 section 7.1): a small state machine fed with the bytes
//! as they arrive. tqproxy forwards a chunked body as it is, so the decoder only says how many
//! of the bytes it was given belong to the body (and where the data is, for the one case that
//! de-chunks: an HTTP/1.0 client), and refuses anything a worker could read differently:
//! sizes that are not 1–16 hex digits, anything but CRLF after a size line or chunk data,
//! control bytes in extensions, malformed trailer lines. The bytes it refuses are never
//! forwarded; what was forwarded before them is a prefix of a valid body.
//!
//! Lines are bounded: a chunk extension at [`MAX_EXTENSION`] bytes, the trailer section at
//! [`MAX_TRAILERS`]; nothing is buffered, so a body of any size costs the same memory.

pub const MAX_EXTENSION: u32 = 4 * 1024;
pub const MAX_TRAILERS: u32 = 16 * 1024;
/// Hex digits in a chunk size (16 fill a u64).
const MAX_SIZE_DIGITS: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    SizeTooLong,
    BadExtension,
    ExtensionTooLong,
    /// Something other than CRLF where CRLF belongs.
    BadLineEnd,
    BadTrailer,
    TrailersTooLarge,
}

impl ChunkError {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkError::BadSize => "invalid chunk size",
            ChunkError::SizeTooLong => "chunk size too long",
            ChunkError::BadExtension => "invalid chunk extension",
            ChunkError::ExtensionTooLong => "chunk extension too long",
            ChunkError::BadLineEnd => "missing CRLF in chunked body",
            ChunkError::BadTrailer => "invalid trailer field",
            ChunkError::TrailersTooLarge => "trailer section too large",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a size line.
    Size,
    /// Spaces or tabs after the size: only `;` may follow (BWS before an extension).
    SizeSpace,
    Extension,
    ExtensionQuoted,
    ExtensionEscape,
    /// CR of a size line seen, LF expected.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    FinalLf,
    Done,
}

/// What one [`Chunked::feed`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input that belong to the body (all of it unless `done`).
    pub consumed: usize,
    /// The body ended (last chunk and trailers complete) at `consumed`.
    pub done: bool,
}

#[derive(Clone, Debug)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    line: u32,
    trailers: u32,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::new()
    }
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailers: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Validates the next bytes of the body; `on_data` gets the ranges of `input` that are chunk
    /// data.
    #[inline]
    pub fn feed(
        &mut self,
        input: &[u8],
        on_data: impl FnMut(usize, usize),
    ) -> Result<Progress, ChunkError> {
        self.feed_with_trailers(input, on_data, |_| {})
    }

    /// [`Self::feed`], and `on_trailer` gets each byte of the trailer section (its lines,
    /// CRLF included, without the final empty line): at most [`MAX_TRAILERS`] in all.
    pub fn feed_with_trailers(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(usize, usize),
        mut on_trailer: impl FnMut(u8),
    ) -> Result<Progress, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let n = (self.size.min((input.len() - i) as u64)) as usize;
                on_data(i, i + n);
                i += n;
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == MAX_SIZE_DIGITS {
                            return Err(ChunkError::SizeTooLong);
                        }
                        self.digits += 1;
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = (self.size << 4) | d;
                        State::Size
                    }
                    _ if self.digits == 0 => return Err(ChunkError::BadSize),
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(ChunkError::BadLineEnd),
                    b';' => {
                        self.line = 0;
                        State::Extension
                    }
                    b' ' | b'\t' => State::SizeSpace,
                    _ => return Err(ChunkError::BadSize),
                },
                State::SizeSpace => match b {
                    b' ' | b'\t' => State::SizeSpace,
                    b';' => {
                        self.line = 0;
                        State::Extension
                    }
                    _ => return Err(ChunkError::BadSize),
                },
                State::Extension | State::ExtensionQuoted | State::ExtensionEscape => {
                    self.line += 1;
                    if self.line > MAX_EXTENSION {
                        return Err(ChunkError::ExtensionTooLong);
                    }
                    let visible = b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80;
                    match (self.state, b) {
                        (State::Extension, b'\r') => State::SizeLf,
                        (State::Extension, b'"') => State::ExtensionQuoted,
                        (State::Extension, _) if visible => State::Extension,
                        (State::ExtensionQuoted, b'"') => State::Extension,
                        (State::ExtensionQuoted, b'\\') => State::ExtensionEscape,
                        (State::ExtensionQuoted, _) if visible => State::ExtensionQuoted,
                        (State::ExtensionEscape, _) if visible => State::ExtensionQuoted,
                        _ => return Err(ChunkError::BadExtension),
                    }
                }
                State::SizeLf => match b {
                    b'\n' if self.size == 0 => {
                        self.line = 0;
                        State::TrailerStart
                    }
                    b'\n' => State::Data,
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::DataLf => match b {
                    b'\n' => {
                        self.digits = 0;
                        self.size = 0;
                        State::Size
                    }
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::TrailerStart
                | State::TrailerName
                | State::TrailerValue
                | State::TrailerLf => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(ChunkError::TrailersTooLarge);
                    }
                    if !(self.state == State::TrailerStart && b == b'\r') {
                        on_trailer(b);
                    }
                    match (self.state, b) {
                        (State::TrailerStart, b'\r') => State::FinalLf,
                        (State::TrailerStart | State::TrailerName, _)
                            if super::parse::is_token(&[b]) =>
                        {
                            State::TrailerName
                        }
                        (State::TrailerName, b':') => State::TrailerValue,
                        (State::TrailerValue, b'\r') => State::TrailerLf,
                        (State::TrailerValue, _)
                            if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 =>
                        {
                            State::TrailerValue
                        }
                        (State::TrailerLf, b'\n') => State::TrailerStart,
                        _ => return Err(ChunkError::BadTrailer),
                    }
                }
                State::FinalLf => match b {
                    b'\n' => {
                        self.state = State::Done;
                        return Ok(Progress {
                            consumed: i,
                            done: true,
                        });
                    }
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::Data => unreachable!("handled above"),
                State::Done => {
                    return Ok(Progress {
                        consumed: i - 1,
                        done: true,
                    });
                }
            };
        }
        Ok(Progress {
            consumed: input.len(),
            done: self.state == State::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes; returns (bytes consumed, data, done).
    fn run(body: &[u8], step: usize) -> Result<(usize, Vec<u8>, bool), ChunkError> {
        let mut c = Chunked::new();
        let mut data = Vec::new();
        let mut total = 0;
        for piece in body.chunks(step.max(1)) {
            let p = c.feed(piece, |a, b| data.extend_from_slice(&piece[a..b]))?;
            total += p.consumed;
            if p.done {
                return Ok((total, data, true));
            }
        }
        Ok((total, data, false))
    }

    #[test]
    fn valid_bodies_in_any_split() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"5;a=b\r\nhello\r\n0;last\r\n\r\n", b"hello"),
            (b"5 ;a=\"q s\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5;a=\"q\\\"s\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (
                b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\nX-U: two\r\n\r\n",
                b"abcde",
            ),
            (b"0\r\n\r\n", b""),
        ];
        for (body, data) in cases {
            for step in [1, 2, 3, 7, 1000] {
                let (n, d, done) = run(body, step).unwrap_or_else(|e| panic!("{e:?} {body:?}"));
                assert!(done, "{body:?} step {step}");
                assert_eq!(n, body.len());
                assert_eq!(&d, data);
            }
        }
    }

    #[test]
    fn the_end_is_found_before_what_follows() {
        let mut input = b"2\r\nab\r\n0\r\n\r\n".to_vec();
        let body_len = input.len();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let mut c = Chunked::new();
        let p = c.feed(&input, |_, _| {}).unwrap();
        assert_eq!(
            p,
            Progress {
                consumed: body_len,
                done: true
            }
        );
    }

    #[test]
    fn smuggling_tricks_are_refused() {
        for (body, err) in [
            (&b"zz\r\nabc\r\n0\r\n\r\n"[..], ChunkError::BadSize),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
            (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
            (b"\r\nhello\r\n", ChunkError::BadSize),
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
            (b"10000000000000000\r\n", ChunkError::SizeTooLong),
            (b"5\r\nhelloX0\r\n\r\n", ChunkError::BadLineEnd),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::BadLineEnd),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::BadLineEnd),
            (b"5\r\nhello\r\r\n", ChunkError::BadLineEnd),
            (b"5;a\x00b\r\nhello\r\n", ChunkError::BadExtension),
            (b"5;a\nb\r\nhello\r\n", ChunkError::BadExtension),
            (b"0\r\nno colon\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\n folded: x\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\nX: a\nb\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\n\n", ChunkError::BadTrailer),
        ] {
            for step in [1, 1000] {
                assert_eq!(
                    run(body, step),
                    Err(err),
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        let long_ext = format!("1;{}\r\n", "a".repeat(5000));
        assert_eq!(
            run(long_ext.as_bytes(), 64),
            Err(ChunkError::ExtensionTooLong)
        );
        let many = format!("0\r\n{}", "X: y\r\n".repeat(4000));
        assert_eq!(run(many.as_bytes(), 512), Err(ChunkError::TrailersTooLarge));
    }

    #[test]
    fn trailer_bytes_are_handed_out() {
        let mut c = Chunked::new();
        let mut t = Vec::new();
        let body = b"3\r\nabc\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\nnext";
        let p = c
            .feed_with_trailers(body, |_, _| {}, |b| t.push(b))
            .unwrap();
        assert!(p.done);
        assert_eq!(p.consumed, body.len() - 4);
        assert_eq!(t, b"X-A: 1\r\nX-B: 2\r\n");
        let mut c = Chunked::new();
        let mut t = Vec::new();
        c.feed_with_trailers(b"0\r\n\r\n", |_, _| {}, |b| t.push(b))
            .unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_u64_size_is_accepted_and_counted_down() {
        let mut c = Chunked::new();
        let p = c.feed(b"ffffffffffffffff\r\nabc", |_, _| {}).unwrap();
        assert_eq!(p.consumed, 21);
        assert!(!p.done);
    }
}
