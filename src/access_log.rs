//! The access log: one line per request, combined format or JSON lines, buffered.
//!
//! The request path formats the line and hands it to a writer thread through a bounded
//! channel; when the writer falls behind, lines are dropped (and counted in
//! `tqproxy_access_log_dropped_total`) rather than slowing requests down. The writer takes
//! every line that is waiting, writes them as one batch and flushes when the channel is empty
//! (and at least every `MAX_BATCH` lines): under load that is one `write` per batch, when
//! idle a line is on disk within milliseconds.
//!
//! The file is opened in append mode and never rotated by tqproxy: rotate it with
//! `logrotate`'s `copytruncate` (appends continue at the new end).

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use pingora::proxy::Session;

use crate::config::AccessLogFormat;
use crate::metrics::METRICS;
use crate::timefmt::{common_log, rfc3339_millis};

/// Lines queued between the request path and the writer.
const QUEUE: usize = 64 * 1024;
/// Lines written before a flush even if more are waiting.
const MAX_BATCH: usize = 4096;

enum Msg {
    Line(String),
    /// Write out everything before this, then answer.
    Flush(mpsc::Sender<()>),
}

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    format: AccessLogFormat,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn open(path: &Path, format: AccessLogFormat) -> std::io::Result<AccessLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(256 * 1024, file);
                // Ends when every sender is gone (the proxy was dropped).
                while let Ok(first) = rx.recv() {
                    // Everything already waiting goes into the same batch.
                    let mut acks = Vec::new();
                    for msg in std::iter::once(first).chain(rx.try_iter().take(MAX_BATCH)) {
                        match msg {
                            Msg::Line(line) => {
                                let _ = out.write_all(line.as_bytes());
                            }
                            Msg::Flush(ack) => acks.push(ack),
                        }
                    }
                    let _ = out.flush();
                    for ack in acks {
                        let _ = ack.send(());
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

    /// Waits (up to `timeout`) until every line logged so far is written to the file. For the
    /// moment before the process exits: lines are otherwise flushed batch by batch.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = mpsc::channel();
        // Blocks only while the queue is full, which the writer is busy emptying.
        self.tx.send(Msg::Flush(ack)).is_ok() && done.recv_timeout(timeout).is_ok()
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
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                METRICS.access_log_dropped.inc();
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
    use super::*;

    #[test]
    fn escaping_keeps_one_line() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\cd");
    }

    #[test]
    fn flush_waits_for_everything_logged_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&path, AccessLogFormat::Combined).unwrap();
        for i in 0..1000 {
            log.tx.try_send(Msg::Line(format!("line {i}\n"))).unwrap();
        }
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("line 999"));
    }
}
