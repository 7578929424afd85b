//! A guard on the read side of an HTTP/2 connection: it follows the frame headers in the bytes
//! the client sends (a 9-byte header — 24-bit length, type, flags, stream — then the payload) and
//! counts, per one-second window, the frames that cost the server work but carry no request:
//! PING and SETTINGS (each must be answered), RST_STREAM (rapid reset, CVE-2023-44487),
//! WINDOW_UPDATE, PRIORITY, and empty DATA, HEADERS or CONTINUATION frames that do not end
//! anything, and frames of unknown types (which the h2 crate ignores). Over a limit, the guard
//! stops reading, so the h2 crate never sees those frames, and raises its flag: the connection
//! then sends GOAWAY (ENHANCE_YOUR_CALM) and closes ([`super::H2::serve`]).
//!
//! Why here and not in the h2 crate: h2 0.4 bounds the memory these floods can take (one pending
//! PONG, one pending SETTINGS ACK, `max_pending_accept_reset_streams` for streams reset before
//! they are accepted, `max_local_error_reset_streams` for the resets it has to send), but not
//! the rate at which a client can make it work: a client that opens a stream and resets it at
//! once, in a loop, has every stream accepted, routed and started upstream, and nothing in h2
//! counts that. A frame-header follower is generic, costs a few instructions per frame, and
//! reads the clock only when it counts a frame.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The client connection preface, before the first frame.
const PREFACE_LEN: u8 = 24;
const HEADER_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What the guard counts, each against its own limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Kind {
    /// PING and SETTINGS that are not ACKs: each one makes the server write a frame.
    Control = 0,
    /// RST_STREAM from the client.
    Reset = 1,
    WindowUpdate = 2,
    Priority = 3,
    /// Frames that carry nothing: empty DATA without END_STREAM, empty HEADERS or
    /// CONTINUATION without END_HEADERS, unknown frame types.
    Empty = 4,
}

const KINDS: usize = 5;

/// Frames of each [`Kind`] allowed per second and connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub per_second: [u32; KINDS],
}

impl Default for Limits {
    /// A browser sends a handful of PINGs and SETTINGS per connection, cancels a few streams
    /// when a page is left, and a fast download makes a client send a WINDOW_UPDATE every
    /// few tens of KB: the limits sit well above that and far below a flood.
    fn default() -> Limits {
        let mut per_second = [0; KINDS];
        per_second[Kind::Control as usize] = 100;
        per_second[Kind::Reset as usize] = 100;
        per_second[Kind::WindowUpdate as usize] = 10_000;
        per_second[Kind::Priority as usize] = 1_000;
        per_second[Kind::Empty as usize] = 100;
        Limits { per_second }
    }
}

/// Classifies one frame header; `None`: not counted.
fn kind(ty: u8, flags: u8, len: u32) -> Option<Kind> {
    match ty {
        DATA if len == 0 && flags & END_STREAM == 0 => Some(Kind::Empty),
        HEADERS | CONTINUATION if len == 0 && flags & END_HEADERS == 0 => Some(Kind::Empty),
        DATA | HEADERS | CONTINUATION | GOAWAY | PUSH_PROMISE => None,
        PRIORITY => Some(Kind::Priority),
        RST_STREAM => Some(Kind::Reset),
        SETTINGS | PING if flags & ACK == 0 => Some(Kind::Control),
        SETTINGS | PING => None,
        WINDOW_UPDATE => Some(Kind::WindowUpdate),
        _ => Some(Kind::Empty),
    }
}

/// Follows frame boundaries and counts frames; pure (the clock is passed in), so that it is
/// unit-tested without I/O.
#[derive(Debug)]
pub struct Counter {
    limits: Limits,
    preface_left: u8,
    head: [u8; HEADER_LEN],
    head_len: u8,
    payload_left: u32,
    window_start: Option<Instant>,
    counts: [u32; KINDS],
}

impl Counter {
    pub fn new(limits: Limits) -> Counter {
        Counter {
            limits,
            preface_left: PREFACE_LEN,
            head: [0; HEADER_LEN],
            head_len: 0,
            payload_left: 0,
            window_start: None,
            counts: [0; KINDS],
        }
    }

    /// Follows `bytes` (the next ones the client sent); `Err` names the limit a frame in them
    /// went over. `now` is read only when a counted frame is found.
    pub fn feed(&mut self, mut bytes: &[u8], now: impl Fn() -> Instant) -> Result<(), Kind> {
        if self.preface_left > 0 {
            let n = bytes.len().min(self.preface_left as usize);
            self.preface_left -= n as u8;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let at = self.head_len as usize;
            let n = bytes.len().min(HEADER_LEN - at);
            self.head[at..at + n].copy_from_slice(&bytes[..n]);
            self.head_len += n as u8;
            bytes = &bytes[n..];
            if self.head_len as usize == HEADER_LEN {
                self.head_len = 0;
                let h = self.head;
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                self.payload_left = len;
                if let Some(k) = kind(h[3], h[4], len) {
                    self.count(k, &now)?;
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, k: Kind, now: &impl Fn() -> Instant) -> Result<(), Kind> {
        let t = now();
        match self.window_start {
            Some(start) if t.saturating_duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window_start = Some(t);
                self.counts = [0; KINDS];
            }
        }
        let c = &mut self.counts[k as usize];
        *c += 1;
        if *c > self.limits.per_second[k as usize] {
            return Err(k);
        }
        Ok(())
    }
}

/// The connection's I/O with a [`Counter`] on its read side. Once a limit is crossed, reads
/// stay pending and `flood` is set (the connection's task polls it).
pub struct Guard<S> {
    io: S,
    counter: Counter,
    flood: Arc<AtomicBool>,
}

impl<S> Guard<S> {
    pub fn new(io: S, limits: Limits, flood: Arc<AtomicBool>) -> Guard<S> {
        Guard {
            io,
            counter: Counter::new(limits),
            flood,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.flood.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        if let Err(kind) = me.counter.feed(&buf.filled()[before..], Instant::now) {
            tracing::info!(?kind, "HTTP/2 client over a frame rate limit: closing");
            // What was read is dropped: the connection ends with GOAWAY.
            buf.set_filled(before);
            me.flood.store(true, Ordering::Relaxed);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([ty, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn frames_are_followed_across_reads_and_only_floods_count() {
        let t0 = Instant::now();
        let mut c = Counter::new(Limits::default());
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0; 6]));
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &[0x82; 40]));
        // A DATA frame whose payload looks like PING frames: never counted.
        let fake_pings: Vec<u8> = (0..200).flat_map(|_| frame(PING, 0, 0, &[0; 8])).collect();
        bytes.extend(frame(DATA, END_STREAM, 1, &fake_pings));
        bytes.extend(frame(SETTINGS, ACK, 0, &[]));
        // Split at every size: the same counts.
        for step in [1, 2, 7, 9, 10, 4096] {
            let mut c2 = Counter::new(Limits::default());
            for chunk in bytes.chunks(step) {
                c2.feed(chunk, || t0).unwrap();
            }
            assert_eq!(c2.counts[Kind::Control as usize], 1, "step {step}");
            assert_eq!(c2.counts.iter().sum::<u32>(), 1, "step {step}");
            assert_eq!((c2.head_len, c2.payload_left), (0, 0));
        }
        c.feed(&bytes, || t0).unwrap();
    }

    #[test]
    fn a_flood_is_refused_within_a_second_and_forgiven_after() {
        let t0 = Instant::now();
        let mut c = Counter::new(Limits::default());
        c.feed(PREFACE, || t0).unwrap();
        let ping = frame(PING, 0, 0, &[0; 8]);
        for _ in 0..100 {
            c.feed(&ping, || t0).unwrap();
        }
        assert_eq!(c.feed(&ping, || t0), Err(Kind::Control));
        // The next second starts afresh.
        let mut c = Counter::new(Limits::default());
        c.feed(PREFACE, || t0).unwrap();
        for i in 0..300u64 {
            let t = t0 + Duration::from_millis(i * 20);
            c.feed(&ping, || t).unwrap();
        }
        let rst = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]);
        let mut c = Counter::new(Limits::default());
        c.feed(PREFACE, || t0).unwrap();
        let many: Vec<u8> = (0..101).flat_map(|_| rst.clone()).collect();
        assert_eq!(c.feed(&many, || t0), Err(Kind::Reset));
    }

    #[test]
    fn what_counts_as_what() {
        assert_eq!(kind(DATA, 0, 0), Some(Kind::Empty));
        assert_eq!(kind(DATA, END_STREAM, 0), None);
        assert_eq!(kind(DATA, 0, 1), None);
        assert_eq!(kind(HEADERS, 0, 0), Some(Kind::Empty));
        assert_eq!(
            kind(CONTINUATION, 0, 10),
            None,
            "h2 bounds CONTINUATION itself"
        );
        assert_eq!(kind(PING, ACK, 8), None);
        assert_eq!(kind(SETTINGS, 0, 0), Some(Kind::Control));
        assert_eq!(kind(WINDOW_UPDATE, 0, 4), Some(Kind::WindowUpdate));
        assert_eq!(kind(PRIORITY, 0, 5), Some(Kind::Priority));
        assert_eq!(kind(0x42, 0, 5), Some(Kind::Empty));
    }
}
