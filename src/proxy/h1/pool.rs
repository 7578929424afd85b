//! Upstream connections: a per-thread LIFO of idle connections per instance.
//!
//! pingora's pool wraps each connection in locks, a DashMap, an LRU and an idle-watch task
//! spawned per release (PERF-NOTES.md). Here, as in nginx's upstream keepalive cache, a thread's
//! idle connections are a plain list per instance: no task, channel or lock per request. Each
//! proxy thread runs its own current-thread runtime and a connection stays on the thread that
//! opened it.
//!
//! - Checkout takes the most recently used connection (the warmest) and checks it with a
//!   non-blocking read: EOF or stray bytes mean the worker closed it or misbehaved, so it is
//!   dropped. tokio answers that read from its cached readiness, so a healthy connection costs
//!   no syscall.
//! - Idle connections expire lazily: at checkout (the newest of a stale list is older than the
//!   idle timeout → the whole list is dropped) and by a sweep per thread, once a second and at
//!   every new route table, which also closes the connections the worker closed (its FIN is
//!   in tokio's readiness: no syscall for the others) and those of instances no longer routed,
//!   before the supervisor even signals them (a worker draining on SIGTERM waits for its
//!   clients to close).
//! - At most `capacity` idle connections per thread (`proxy.upstream_keepalive_pool`).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::routes::{Instance, RouteHandle};

/// A connection to an instance: TCP or, with `transport: unix`, a unix socket.
#[derive(Debug)]
pub enum Upstream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Upstream {
    /// Opens a new connection (no timeout: the caller bounds it).
    pub async fn connect(inst: &Instance) -> io::Result<Upstream> {
        match &inst.unix_path {
            Some(path) => Ok(Upstream::Unix(UnixStream::connect(&**path).await?)),
            None => {
                let s = TcpStream::connect(inst.addr).await?;
                s.set_nodelay(true)?;
                Ok(Upstream::Tcp(s))
            }
        }
    }

    /// Waits until the connection has something to read (data or EOF).
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Upstream::Tcp(s) => s.readable().await,
            Upstream::Unix(s) => s.readable().await,
        }
    }

    /// A non-blocking read (`WouldBlock` when nothing is there).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Upstream::Tcp(s) => s.try_read(buf),
            Upstream::Unix(s) => s.try_read(buf),
        }
    }

    /// Still open, and nothing unexpected waiting to be read.
    fn is_clean(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

struct Idle {
    conn: Upstream,
    since: Instant,
}

struct Bucket {
    instance: Arc<Instance>,
    idle: Vec<Idle>,
}

#[derive(Default)]
struct Pool {
    buckets: Vec<Bucket>,
    total: usize,
    sweeping: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// The most recently used idle connection to `inst` that is still good, if any (`now`: a
/// recent reading of the clock, such as the request's start).
pub fn checkout(inst: &Instance, idle_timeout: Duration, now: Instant) -> Option<Upstream> {
    POOL.with_borrow_mut(|pool| {
        let i = pool
            .buckets
            .iter()
            .position(|b| b.instance.key == inst.key)?;
        let bucket = &mut pool.buckets[i];
        while let Some(idle) = bucket.idle.pop() {
            pool.total -= 1;
            if now.saturating_duration_since(idle.since) >= idle_timeout {
                // The newest is stale, so are the older ones.
                let n = bucket.idle.len();
                bucket.idle.clear();
                pool.total -= n;
                return None;
            }
            if idle.conn.is_clean() {
                return Some(idle.conn);
            }
        }
        None
    })
}

/// Keeps `conn` for the next request to `inst` (or closes it when this thread's pool is full).
/// The first check-in on a thread starts its sweeper, which watches `routes`.
pub fn checkin(
    inst: &Arc<Instance>,
    conn: Upstream,
    capacity: usize,
    idle_timeout: Duration,
    routes: &Arc<RouteHandle>,
    now: Instant,
) {
    let start_sweeper = POOL.with_borrow_mut(|pool| {
        // A request that picked the instance before it was unrouted brings its connection back
        // after the sweep: close it (the drain waits for that request, so it happens before
        // the worker is signalled).
        if pool.total >= capacity || !inst.routed.load(Ordering::SeqCst) {
            return false;
        }
        let i = match pool.buckets.iter().position(|b| b.instance.key == inst.key) {
            Some(i) => i,
            None => {
                pool.buckets.push(Bucket {
                    instance: inst.clone(),
                    idle: Vec::new(),
                });
                pool.buckets.len() - 1
            }
        };
        pool.buckets[i].idle.push(Idle { conn, since: now });
        pool.total += 1;
        !std::mem::replace(&mut pool.sweeping, true)
    });
    if start_sweeper {
        tokio::spawn(sweep_forever(idle_timeout, routes.clone()));
    }
}

/// This thread's sweeper: once a second and whenever a new route table is published.
async fn sweep_forever(idle_timeout: Duration, routes: Arc<RouteHandle>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = routes.changed() => {}
        }
        sweep(Instant::now(), idle_timeout);
    }
}

fn sweep(now: Instant, idle_timeout: Duration) {
    POOL.with_borrow_mut(|pool| {
        let mut dropped = 0;
        pool.buckets.retain_mut(|b| {
            let before = b.idle.len();
            if !b.instance.routed.load(Ordering::Relaxed) {
                b.idle.clear();
            } else {
                b.idle.retain(|i| {
                    now.saturating_duration_since(i.since) < idle_timeout && i.conn.is_clean()
                });
            }
            dropped += before - b.idle.len();
            !b.idle.is_empty() || b.instance.routed.load(Ordering::Relaxed)
        });
        pool.total -= dropped;
    });
}

/// Drops every idle connection of this thread (tests).
#[cfg(test)]
fn clear() {
    POOL.with_borrow_mut(|pool| {
        pool.buckets.clear();
        pool.total = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::AsyncWriteExt;

    fn instance(addr: SocketAddr) -> Arc<Instance> {
        let i = Instance::new("w".into(), 1, 1, addr);
        i.routed.store(true, Ordering::SeqCst);
        Arc::new(i)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lifo_reuse_and_dead_connections_are_dropped() {
        clear();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inst = instance(listener.local_addr().unwrap());
        let a = Upstream::connect(&inst).await.unwrap();
        let (mut sa, _) = listener.accept().await.unwrap();
        let b = Upstream::connect(&inst).await.unwrap();
        let (_sb, _) = listener.accept().await.unwrap();
        let b_port = match &b {
            Upstream::Tcp(s) => s.local_addr().unwrap().port(),
            Upstream::Unix(_) => unreachable!(),
        };
        let routes = RouteHandle::new();
        checkin(
            &inst,
            a,
            10,
            Duration::from_secs(30),
            &routes,
            Instant::now(),
        );
        checkin(
            &inst,
            b,
            10,
            Duration::from_secs(30),
            &routes,
            Instant::now(),
        );
        // The newest comes back first.
        let got = checkout(&inst, Duration::from_secs(30), Instant::now()).unwrap();
        match &got {
            Upstream::Tcp(s) => assert_eq!(s.local_addr().unwrap().port(), b_port),
            Upstream::Unix(_) => unreachable!(),
        }
        // The worker closes `a` (and sends a stray byte first): it is not handed out.
        sa.write_all(b"x").await.unwrap();
        drop(sa);
        // Let the readiness reach the runtime.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(checkout(&inst, Duration::from_secs(30), Instant::now()).is_none());
        drop(got);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn expiry_capacity_and_unrouted_instances() {
        clear();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inst = instance(listener.local_addr().unwrap());
        let routes = RouteHandle::new();
        let mut keep = Vec::new();
        for _ in 0..3 {
            let c = Upstream::connect(&inst).await.unwrap();
            keep.push(listener.accept().await.unwrap());
            checkin(
                &inst,
                c,
                2,
                Duration::from_secs(30),
                &routes,
                Instant::now(),
            );
        }
        assert_eq!(POOL.with_borrow(|p| p.total), 2, "capacity bounds the pool");
        // A zero idle timeout: everything is stale at checkout.
        assert!(checkout(&inst, Duration::ZERO, Instant::now()).is_none());
        assert_eq!(POOL.with_borrow(|p| p.total), 0);
        let c = Upstream::connect(&inst).await.unwrap();
        keep.push(listener.accept().await.unwrap());
        checkin(
            &inst,
            c,
            2,
            Duration::from_secs(30),
            &routes,
            Instant::now(),
        );
        inst.routed.store(false, Ordering::SeqCst);
        sweep(Instant::now(), Duration::from_secs(30));
        assert_eq!(POOL.with_borrow(|p| (p.total, p.buckets.len())), (0, 0));
    }
}
