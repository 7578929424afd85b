//! Readiness and liveness probes: an HTTP GET of the worker's health path (2xx = healthy), or
//! a TCP connect when the worker has no health path.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One probe. `Err` says what went wrong, for logs and status.
pub async fn probe(addr: SocketAddr, path: Option<&str>, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(addr, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn probe_inner(addr: SocketAddr, path: Option<&str>) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let Some(path) = path else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tqproxy-health\r\nConnection: close\r\n\r\n"
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
    use tokio::net::TcpListener;

    async fn serve_once(response: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn two_hundreds_are_healthy() {
        let a = serve_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            probe(a, Some("/health"), Duration::from_secs(2)).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn errors_say_why() {
        let a = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(
            probe(a, Some("/health"), Duration::from_secs(2)).await,
            Err("/health answered 503".into())
        );
        let a = serve_once("garbage garbage\r\n").await;
        assert!(
            probe(a, Some("/h"), Duration::from_secs(2))
                .await
                .unwrap_err()
                .contains("not an HTTP response")
        );
    }

    #[tokio::test]
    async fn silence_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let e = probe(a, Some("/health"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.contains("no answer within 100ms"), "{e}");
        held.abort();
    }

    #[tokio::test]
    async fn port_probe_without_path() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        assert_eq!(probe(a, None, Duration::from_secs(1)).await, Ok(()));
        drop(l);
        assert!(probe(a, None, Duration::from_secs(1)).await.is_err());
    }
}
