//! tqproxy's HTTP/2 engine, on the `h2` crate: ALPN `h2` on TLS listeners and, with
//! `proxy.h2c`, prior-knowledge h2c on plain ones (the HTTP/1.1 engine reads the preface, then
//! hands the connection over with those bytes put back). `Upgrade: h2c` is not taken: RFC 9113
//! section 3.1 deprecates it, and such a request is answered over HTTP/1.1 with the upgrade
//! ignored, as nginx does (`parse.rs`).
//!
//! One task per connection, as for HTTP/1.1: it drives the h2 connection and the futures of its
//! streams ([`stream`]), without a task, channel or lock per stream of its own. Each stream goes
//! through the same [`policy`] (routing, balancing, queueing, retries, error pages, metrics,
//! access log, in-flight counting) and the same per-thread upstream pool as an HTTP/1.1
//! request; the worker sees an HTTP/1.1 request ([`head`]).
//!
//! Bounded per connection: `proxy.h2_max_concurrent_streams` streams (SETTINGS, default 128),
//! `proxy.max_header_list_size` of decoded header list (default 64 KiB; h2 answers 431 over it,
//! and closes the connection far over it or after too many CONTINUATION frames), the request
//! windows ([`STREAM_WINDOW`] per stream, [`CONNECTION_WINDOW`] in all: what a client can make
//! tqproxy buffer), [`SEND_BUFFER`] of response data queued per stream, and per stream the
//! HTTP/1.1 engine's buffers (a 32 KiB upstream buffer, a head, [`stream::HOLD`] bytes of held
//! body). Rates: the frame [`guard`] (rapid reset, PING, SETTINGS, WINDOW_UPDATE, PRIORITY and
//! empty-frame floods: GOAWAY ENHANCE_YOUR_CALM), and h2's own caps on streams reset before they
//! are accepted and on the resets a client's errors make it send.
//!
//! Deadlines: the handshake and the first stream within `proxy.client_header_timeout` of the
//! connection's start; a connection with no stream open is closed (GOAWAY) after
//! `proxy.client_keepalive_timeout`; per stream, `proxy.client_body_timeout` (see [`stream`]).
//! A graceful stop or `tqproxy upgrade` (pingora's shutdown watch, or the upgrade's
//! `Connection: close` flag) sends GOAWAY: streams in flight finish, the client opens its next
//! ones on a new connection, to the new process. A drained node (`tqproxy drain`) sends it after
//! the connection's next stream, a new connection's first one included.

pub mod guard;
mod head;
mod stream;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::Reason;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::time::Instant;

use self::stream::ConnInfo;
use super::h1::{self, ClientText, within};
use super::policy::{self, Policy};

/// The request window of a stream: what a client may send before tqproxy took it.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// The request window of a connection, all its streams together.
pub const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Response data h2 may queue per stream beyond what was written to the socket.
pub const SEND_BUFFER: usize = 64 * 1024;
/// Resets a client's protocol errors may make tqproxy send on one connection before it is
/// closed (h2's default is 1024).
const MAX_ERROR_RESETS: usize = 128;
/// How long a connection that was told to go away (GOAWAY) may take to finish, once no stream
/// is open, or after a flood.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// The `proxy:` settings of HTTP/2.
#[derive(Debug, Clone)]
pub struct Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS (`proxy.h2_max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (`proxy.max_header_list_size`).
    pub max_header_list_size: u32,
    pub limits: guard::Limits,
}

/// The HTTP/2 engine: shared by every connection of every thread.
pub struct H2 {
    policy: Arc<Policy>,
    /// The HTTP/1.1 engine's settings: timeouts and the pool's capacity are the same.
    conn: h1::Settings,
    builder: h2::server::Builder,
    limits: guard::Limits,
}

impl H2 {
    pub fn new(policy: Arc<Policy>, conn: h1::Settings, settings: Settings) -> H2 {
        let mut builder = h2::server::Builder::new();
        builder
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_header_list_size(settings.max_header_list_size)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_ERROR_RESETS));
        H2 {
            policy,
            conn,
            builder,
            limits: settings.limits,
        }
    }

    /// Serves one HTTP/2 connection until it ends.
    pub async fn serve(&self, io: Stream, mut shutdown: ShutdownWatch, over_limit: bool) {
        let opened = Instant::now();
        let info = self.conn_info(&io, over_limit);
        let flood = Arc::new(AtomicBool::new(false));
        let io = guard::Guard::new(io, self.limits, flood.clone());
        let mut timer = Box::pin(tokio::time::sleep_until(opened + self.conn.header_timeout));
        let handshake = self.builder.handshake::<_, Bytes>(io);
        let mut conn = match within(&mut timer, opened + self.conn.header_timeout, handshake).await
        {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
            None => return,
        };
        let mut streams = FuturesUnordered::new();
        // With no stream open, the connection is closed at `idle_until`: the first stream is
        // due within the header timeout, later ones within the keep-alive timeout.
        let mut idle_until = opened + self.conn.header_timeout;
        // Set once GOAWAY is sent: the connection ends when its streams are done, or at the
        // latest CLOSE_WITHIN after the last one (or after a flood).
        let mut close_by: Option<Instant> = None;
        let mut shutdown_seen = *shutdown.borrow();
        let mut shutdown_changed = pin!(shutdown.changed());
        // A drained node (`tqproxy drain`) still serves a new connection's first stream: the
        // GOAWAY follows it (`policy::closing`, below).
        if shutdown_seen || policy::handing_over() {
            conn.graceful_shutdown();
            close_by = Some(opened + CLOSE_WITHIN);
        }
        enum Event<T> {
            Stream(T),
            End,
            Flood,
            Shutdown,
            Timer,
        }
        loop {
            let event = poll_fn(|cx| {
                // The streams first: what they queue, the connection writes below.
                let mut ended = false;
                while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {
                    ended = true;
                }
                if ended && streams.is_empty() {
                    let now = Instant::now();
                    idle_until = now + self.conn.keepalive_timeout;
                    if let Some(by) = close_by.as_mut() {
                        *by = now + CLOSE_WITHIN;
                    }
                }
                if flood.load(Ordering::Relaxed) && close_by.is_none() {
                    return Poll::Ready(Event::Flood);
                }
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok(s))) => return Poll::Ready(Event::Stream(s)),
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %e, "HTTP/2 connection error");
                        return Poll::Ready(Event::End);
                    }
                    Poll::Ready(None) => return Poll::Ready(Event::End),
                    Poll::Pending => {}
                }
                if !shutdown_seen && shutdown_changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
                let wake_at = match close_by {
                    Some(by) if streams.is_empty() || flood.load(Ordering::Relaxed) => Some(by),
                    Some(_) => None,
                    None => streams.is_empty().then_some(idle_until),
                };
                if let Some(at) = wake_at {
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Timer);
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Stream((req, respond)) => {
                    if close_by.is_none() && (policy::closing() || over_limit) {
                        conn.graceful_shutdown();
                        close_by = Some(Instant::now() + CLOSE_WITHIN);
                    }
                    streams.push(Box::pin(stream::serve(&info, req, respond)));
                }
                Event::End => return,
                Event::Flood => {
                    conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    // Its streams go with it (their upstream connections closed, their slots
                    // released).
                    streams.clear();
                    close_by = Some(Instant::now() + CLOSE_WITHIN);
                }
                Event::Shutdown => {
                    shutdown_seen = true;
                    if close_by.is_none() {
                        conn.graceful_shutdown();
                        close_by = Some(Instant::now() + CLOSE_WITHIN);
                    }
                }
                Event::Timer if close_by.is_some() => return,
                // Idle: say goodbye, then close.
                Event::Timer => {
                    conn.graceful_shutdown();
                    close_by = Some(Instant::now() + CLOSE_WITHIN);
                }
            }
        }
    }

    fn conn_info(&self, io: &Stream, over_limit: bool) -> ConnInfo<'_> {
        let (client_ip, local_addr) = h1::addresses(io);
        let redirect_to = local_addr.and_then(|a| self.policy.redirect_port(a.port()));
        ConnInfo {
            h2: self,
            client_ip,
            client_ip_text: ClientText::new(client_ip),
            https: io.get_ssl_digest().is_some(),
            redirect_to,
            over_limit,
            local_addr,
        }
    }
}
