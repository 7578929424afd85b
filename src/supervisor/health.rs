//! Readiness and liveness probes: an HTTP GET of the worker's health path (2xx = healthy), or
//! a plain connect when the worker has no health path. Over TCP, or over the instance's unix
//! socket with `transport: unix`.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Where an instance accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(Arc<Path>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One probe. `Err` says what went wrong, for logs and status.
pub async fn probe(target: &Target, path: Option<&str>, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(target, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn probe_inner(target: &Target, path: Option<&str>) -> Result<(), String> {
    let connect_err = |e: std::io::Error| format!("connect {target}: {e}");
    match target {
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
            let _ = stream.set_nodelay(true);
            match path {
                Some(path) => get(stream, &addr.to_string(), path).await,
                None => Ok(()),
            }
        }
        Target::Unix(socket) => {
            let stream = UnixStream::connect(&**socket).await.map_err(connect_err)?;
            match path {
                Some(path) => get(stream, "localhost", path).await,
                None => Ok(()),
            }
        }
    }
}

/// `GET path` on a connected stream; `Ok` for a 2xx status line.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
) -> Result<(), String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tqproxy-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    // The status line is all we need.
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = stream
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if r == 0 {
            return Err("connection closed before a status line".into());
        }
        n += r;
    }
    let line = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("{path} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, UnixListener};

    /// A listener of either kind; the temporary directory holds the unix socket.
    enum Listener {
        Tcp(TcpListener),
        Unix(UnixListener, tempfile::TempDir),
    }

    impl Listener {
        async fn new(unix: bool) -> (Listener, Target) {
            if unix {
                let dir = tempfile::tempdir().unwrap();
                let p: Arc<Path> = dir.path().join("i.sock").into();
                let l = UnixListener::bind(&*p).unwrap();
                (Listener::Unix(l, dir), Target::Unix(p))
            } else {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let a = l.local_addr().unwrap();
                (Listener::Tcp(l), Target::Tcp(a))
            }
        }

        /// Accepts one connection, reads the request, answers `response` and closes.
        fn serve_once(self, response: &'static str) {
            async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, response: &str) {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
            tokio::spawn(async move {
                match self {
                    Listener::Tcp(l) => {
                        if let Ok((s, _)) = l.accept().await {
                            answer(s, response).await;
                        }
                    }
                    Listener::Unix(l, _dir) => {
                        if let Ok((s, _)) = l.accept().await {
                            answer(s, response).await;
                        }
                    }
                }
            });
        }

        /// Accepts one connection and holds it, silent, for 5 s.
        fn hold(self) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async move {
                let held: Box<dyn std::any::Any + Send> = match self {
                    Listener::Tcp(l) => Box::new(l.accept().await.unwrap()),
                    Listener::Unix(l, dir) => Box::new((l.accept().await.unwrap(), dir)),
                };
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(held);
            })
        }
    }

    #[tokio::test]
    async fn two_hundreds_are_healthy() {
        for unix in [false, true] {
            let (l, t) = Listener::new(unix).await;
            l.serve_once("HTTP/1.1 204 No Content\r\n\r\n");
            assert_eq!(
                probe(&t, Some("/health"), Duration::from_secs(2)).await,
                Ok(()),
                "{t}"
            );
        }
    }

    #[tokio::test]
    async fn errors_say_why() {
        for unix in [false, true] {
            let (l, t) = Listener::new(unix).await;
            l.serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
            assert_eq!(
                probe(&t, Some("/health"), Duration::from_secs(2)).await,
                Err("/health answered 503".into()),
                "{t}"
            );
            let (l, t) = Listener::new(unix).await;
            l.serve_once("garbage garbage\r\n");
            let e = probe(&t, Some("/h"), Duration::from_secs(2))
                .await
                .unwrap_err();
            assert!(e.contains("not an HTTP response"), "{t}: {e}");
        }
    }

    #[tokio::test]
    async fn silence_times_out() {
        for unix in [false, true] {
            let (l, t) = Listener::new(unix).await;
            let held = l.hold();
            let e = probe(&t, Some("/health"), Duration::from_millis(100))
                .await
                .unwrap_err();
            assert!(e.contains("no answer within 100ms"), "{t}: {e}");
            held.abort();
        }
    }

    #[tokio::test]
    async fn connect_probe_without_path() {
        for unix in [false, true] {
            let (l, t) = Listener::new(unix).await;
            assert_eq!(probe(&t, None, Duration::from_secs(1)).await, Ok(()), "{t}");
            drop(l);
            let e = probe(&t, None, Duration::from_secs(1)).await.unwrap_err();
            assert!(e.starts_with(&format!("connect {t}: ")), "{e}");
        }
    }

    #[tokio::test]
    async fn a_unix_probe_names_the_socket() {
        let t = Target::Unix(Path::new("/nonexistent/dir/w.1.1.sock").into());
        let e = probe(&t, Some("/health"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.starts_with("connect unix:/nonexistent/dir/w.1.1.sock: "),
            "{e}"
        );
    }
}
