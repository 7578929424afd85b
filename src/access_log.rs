//! The access log: one line per request, combined format or JSON lines, buffered.
//!
//! The request path formats the line and hands it to a writer thread through a bounded
//! channel; when the writer falls behind, lines are dropped (and counted) rather than slowing
//! requests down. The writer flushes at least once a second.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use pingora::proxy::Session;

use crate::config::AccessLogFormat;
use crate::timefmt::{common_log, rfc3339_millis};

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    format: AccessLogFormat,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn open(path: &Path, format: AccessLogFormat) -> std::io::Result<AccessLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::sync_channel::<String>(64 * 1024);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(256 * 1024, file);
                loop {
                    match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(line) => {
                            let _ = out.write_all(line.as_bytes());
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = out.flush();
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            let _ = out.flush();
                            return;
                        }
                    }
                }
            })?;
        Ok(AccessLog {
            tx,
            format,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn log(
        &self,
        session: &Session,
        status: u16,
        elapsed: Duration,
        worker: Option<&str>,
        served_by: Option<(u64, u16)>,
        request_id: Option<&HeaderValue>,
    ) {
        let req = session.req_header();
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or_else(|| "-".to_string(), |a| a.ip().to_string());
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let bytes = session.body_bytes_sent();
        let now = SystemTime::now();
        let rid = request_id.and_then(|v| v.to_str().ok()).unwrap_or("-");
        let line = match self.format {
            AccessLogFormat::Combined => format!(
                "{client} - - [{}] \"{} {} {:?}\" {status} {bytes} \"{}\" \"{}\" rt={:.6} worker={} instance={} rid={rid}\n",
                common_log(now),
                req.method,
                target,
                req.version,
                escape(&header("referer")),
                escape(&header("user-agent")),
                elapsed.as_secs_f64(),
                worker.unwrap_or("-"),
                served_by.map_or_else(|| "-".to_string(), |(id, port)| format!("{id}:{port}")),
            ),
            AccessLogFormat::Json => {
                let v = serde_json::json!({
                    "time": rfc3339_millis(now),
                    "client": client,
                    "method": req.method.as_str(),
                    "target": target,
                    "version": format!("{:?}", req.version),
                    "host": header("host"),
                    "status": status,
                    "bytes": bytes,
                    "duration_s": elapsed.as_secs_f64(),
                    "worker": worker,
                    "instance": served_by.map(|(id, _)| id),
                    "port": served_by.map(|(_, p)| p),
                    "referer": header("referer"),
                    "user_agent": header("user-agent"),
                    "request_id": rid,
                });
                format!("{v}\n")
            }
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Quotes and backslashes escaped, control characters dropped: one line per request, always.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escaping_keeps_one_line() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\cd");
    }
}
