//! The access log: one line per request, combined format or JSON lines, buffered.
//!
//! The request path formats its line into a per-thread scratch buffer and appends it to a
//! shared in-memory buffer under a mutex held for one `memcpy`. A writer thread swaps that
//! buffer out and writes it with one `write` every `INTERVAL`, or sooner once it holds
//! `HIGH_WATER` bytes: producers wake the writer only when they cross that mark, never per
//! line (a wake-up per line cost 7 µs/request and a quarter of the throughput, see
//! `load-tests/RESULTS.md`). When the disk cannot keep up and `MAX_BUFFERED` bytes are
//! waiting, lines are dropped (and counted in `tqproxy_access_log_dropped_total`) rather
//! than slowing requests down or growing without bound. An idle line reaches the file
//! within `INTERVAL`; `flush` waits for everything logged before it (shutdown uses it).
//!
//! The file is opened in append mode and never rotated by tqproxy itself: `tqproxy reload`
//! reopens it (logrotate's `postrotate`), or rotate it with `copytruncate`.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Version;
use serde::Serialize;

use crate::config::AccessLogFormat;
use crate::metrics::METRICS;
use crate::timefmt::{common_log, rfc3339_millis};

/// How long a line may wait in memory when the log is quiet.
const INTERVAL: Duration = Duration::from_millis(100);
/// Buffered bytes at which a producer wakes the writer early.
const HIGH_WATER: usize = 256 * 1024;
/// Buffered bytes above which new lines are dropped (the disk is not keeping up).
const MAX_BUFFERED: usize = 16 * 1024 * 1024;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// Flush generations asked for by `flush` and written by the writer.
    requested: u64,
    written: u64,
    /// Every `AccessLog` handle is gone: write what is left and end the thread.
    closed: bool,
    /// `reopen` asked the writer to open the path again after writing what is buffered, and
    /// the outcome of the last time it did.
    reopen: bool,
    reopened: Option<Result<(), String>>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer sleeps on this between batches.
    wake: Condvar,
    /// `flush` callers wait on this for `written` to catch up.
    done: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the buffer inconsistent (appends are
        // whole lines), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tells the writer to finish when the last handle is dropped.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
    format: AccessLogFormat,
}

thread_local! {
    /// The line being formatted, reused across requests on this thread.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The common-log timestamp of the current second, formatted once per second.
    static CLF_TIME: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl AccessLog {
    pub fn open(path: &Path, format: AccessLogFormat) -> std::io::Result<AccessLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let writer = shared.clone();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&writer, file, &path))?;
        Ok(AccessLog {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
            format,
        })
    }

    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until every line logged so far is written to the file. For the
    /// moment before the process exits: lines are otherwise written every `INTERVAL`.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.flush_then(timeout, false).is_some()
    }

    /// Writes out what is buffered, then opens the file's path again (after logrotate moved
    /// the file away); on failure the old file stays in use. Waits up to `timeout`.
    pub fn reopen(&self, timeout: Duration) -> Result<(), String> {
        self.flush_then(timeout, true)
            .unwrap_or_else(|| Err("the access log writer did not answer in time".into()))
    }

    /// A flush, optionally followed by a reopen; `None` if the writer did not get to it in
    /// time, else the reopen's outcome (`Ok` for a plain flush).
    fn flush_then(&self, timeout: Duration, reopen: bool) -> Option<Result<(), String>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.reopen |= reopen;
        st.requested += 1;
        let want = st.requested;
        self.shared.wake.notify_one();
        while st.written < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .shared
                .done
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Some(if reopen {
            st.reopened.clone().unwrap_or(Ok(()))
        } else {
            Ok(())
        })
    }

    /// Appends one formatted line (ending in `\n`), or drops and counts it when too much is
    /// already waiting.
    fn push(&self, line: &[u8]) {
        let mut st = self.shared.lock();
        let before = st.buf.len();
        if before + line.len() > MAX_BUFFERED {
            drop(st);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            METRICS.access_log_dropped.inc();
            return;
        }
        st.buf.extend_from_slice(line);
        let crossed = before < HIGH_WATER && st.buf.len() >= HIGH_WATER;
        drop(st);
        if crossed {
            self.shared.wake.notify_one();
        }
    }

    /// Formats and appends the line of one finished request.
    pub fn log(&self, rec: &Record<'_>) {
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            match self.format {
                AccessLogFormat::Combined => rec.combined(buf, SystemTime::now()),
                AccessLogFormat::Json => rec.json(buf, SystemTime::now()),
            }
            self.push(buf);
        });
    }
}

/// The writer thread: sleep until `INTERVAL` passes, the buffer crosses `HIGH_WATER`, a flush
/// is asked for or the log is closed; then swap the buffer out and write it in one go.
fn write_loop(shared: &Shared, mut file: File, path: &Path) {
    let shown = path.display().to_string();
    let path_str = shown.as_str();
    let mut spare = Vec::with_capacity(HIGH_WATER);
    let mut failing = false;
    let mut st = shared.lock();
    loop {
        let deadline = Instant::now() + INTERVAL;
        while !st.closed && st.requested == st.written && st.buf.len() < HIGH_WATER {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = shared
                .wake
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::swap(&mut st.buf, &mut spare);
        let generation = st.requested;
        let closed = st.closed;
        let reopen = std::mem::take(&mut st.reopen);
        drop(st);
        if !spare.is_empty() {
            match file.write_all(&spare) {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(path = path_str, "access log writable again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(path = path_str, error = %e, "cannot write the access log; lines are lost until it works again");
                }
                Err(_) => {}
            }
            // Keep one batch's worth of capacity, not the largest burst ever seen.
            spare.clear();
            spare.shrink_to(HIGH_WATER * 2);
        }
        let reopened = reopen.then(|| {
            match OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => {
                    file = f;
                    failing = false;
                    tracing::info!(path = path_str, "access log reopened");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(path = path_str, error = %e, "cannot reopen the access log; still writing to the old file");
                    Err(format!("cannot reopen the access log {path_str}: {e}"))
                }
            }
        });
        st = shared.lock();
        if reopened.is_some() {
            st.reopened = reopened;
        }
        st.written = generation;
        shared.done.notify_all();
        if closed && st.buf.is_empty() {
            return;
        }
    }
}

/// The fields of one access log line, borrowed from the request (both engines fill it).
#[derive(Serialize)]
pub struct Record<'a> {
    #[serde(serialize_with = "ser_client")]
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'static str,
    pub host: Option<&'a str>,
    /// The status sent to the client (0: none was).
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    #[serde(rename = "duration_s", serialize_with = "ser_secs")]
    pub elapsed: Duration,
    pub worker: Option<&'a str>,
    /// The instance that answered: (id, port); port 0 is an instance without one
    /// (`transport: unix`), logged as `id:unix` (JSON: `"port": null`).
    #[serde(skip)]
    pub served_by: Option<(u64, u16)>,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

fn ser_client<S: serde::Serializer>(c: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(ip) => s.collect_str(ip),
        None => s.serialize_str("-"),
    }
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Record<'_> {
    /// `client - - [time] "METHOD target VERSION" status bytes "referer" "user-agent"`
    /// followed by `rt=` seconds, `worker=`, `instance=id:port` (`id:unix`) and `rid=`.
    fn combined(&self, out: &mut Vec<u8>, now: SystemTime) {
        match self.client {
            Some(ip) => {
                let _ = write!(out, "{ip}");
            }
            None => out.push(b'-'),
        }
        out.extend_from_slice(b" - - [");
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CLF_TIME.with_borrow_mut(|(cached, text)| {
            if *cached != secs {
                *cached = secs;
                *text = common_log(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
        out.extend_from_slice(b"] \"");
        escape_into(out, self.method);
        out.push(b' ');
        escape_into(out, self.target);
        out.push(b' ');
        out.extend_from_slice(self.version.as_bytes());
        let _ = write!(out, "\" {} {} \"", self.status, self.bytes);
        escape_into(out, self.referer.unwrap_or("-"));
        out.extend_from_slice(b"\" \"");
        escape_into(out, self.user_agent.unwrap_or("-"));
        let _ = write!(
            out,
            "\" rt={:.6} worker={} instance=",
            self.elapsed.as_secs_f64(),
            self.worker.unwrap_or("-")
        );
        match self.served_by {
            Some((id, 0)) => {
                let _ = write!(out, "{id}:unix");
            }
            Some((id, port)) => {
                let _ = write!(out, "{id}:{port}");
            }
            None => out.push(b'-'),
        }
        out.extend_from_slice(b" rid=");
        out.extend_from_slice(self.request_id.unwrap_or("-").as_bytes());
        out.push(b'\n');
    }

    /// One JSON object per line, with `time`, `instance` and `port` besides the fields above.
    fn json(&self, out: &mut Vec<u8>, now: SystemTime) {
        #[derive(Serialize)]
        struct Json<'a> {
            time: String,
            #[serde(flatten)]
            line: &'a Record<'a>,
            instance: Option<u64>,
            port: Option<u16>,
        }
        let json = Json {
            time: rfc3339_millis(now),
            line: self,
            instance: self.served_by.map(|(id, _)| id),
            port: self.served_by.map(|(_, p)| p).filter(|p| *p != 0),
        };
        // Serializing borrowed strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &json);
        out.push(b'\n');
    }
}

/// The version as the access log writes it.
pub fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// Quotes and backslashes escaped, control characters dropped: one line per request, always.
fn escape_into(out: &mut Vec<u8>, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if c.is_control() => {}
            c => {
                let mut b = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn sample() -> Record<'static> {
        Record {
            client: Some("192.0.2.7".parse().unwrap()),
            method: "GET",
            target: "/a?b=1",
            version: "HTTP/1.1",
            host: Some("front.test"),
            status: 200,
            bytes: 12,
            elapsed: Duration::from_micros(1500),
            worker: Some("hello"),
            served_by: Some((3, 9001)),
            referer: None,
            user_agent: Some("it \"quoted\"\n"),
            request_id: Some("abc"),
        }
    }

    #[test]
    fn combined_lines_are_escaped_and_complete() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_933_387_123);
        let mut out = Vec::new();
        sample().combined(&mut out, t);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.7 - - [29/Nov/2026:06:23:07 +0000] \"GET /a?b=1 HTTP/1.1\" 200 12 \"-\" \
             \"it \\\"quoted\\\"\" rt=0.001500 worker=hello instance=3:9001 rid=abc\n"
        );
        let mut out = Vec::new();
        Record {
            client: None,
            worker: None,
            served_by: None,
            request_id: None,
            ..sample()
        }
        .combined(&mut out, t);
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("- - - ["), "{line}");
        assert!(line.ends_with(" worker=- instance=- rid=-\n"), "{line}");
        // A unix-socket instance has no port.
        let mut out = Vec::new();
        Record {
            served_by: Some((3, 0)),
            ..sample()
        }
        .combined(&mut out, t);
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains(" instance=3:unix rid=abc"), "{line}");
        let mut out = Vec::new();
        Record {
            served_by: Some((3, 0)),
            ..sample()
        }
        .json(&mut out, t);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["instance"], 3);
        assert_eq!(v["port"], serde_json::Value::Null);
    }

    #[test]
    fn json_lines_carry_every_field() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_933_387_123);
        let mut out = Vec::new();
        sample().json(&mut out, t);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2026-11-29T06:23:07.123Z");
        assert_eq!(v["client"], "192.0.2.7");
        assert_eq!(v["target"], "/a?b=1");
        assert_eq!(v["version"], "HTTP/1.1");
        assert_eq!(v["host"], "front.test");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 12);
        assert_eq!(v["duration_s"], 0.0015);
        assert_eq!(v["worker"], "hello");
        assert_eq!(v["instance"], 3);
        assert_eq!(v["port"], 9001);
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["user_agent"], "it \"quoted\"\n");
        assert_eq!(v["request_id"], "abc");
    }

    #[test]
    fn flush_waits_for_everything_logged_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&path, AccessLogFormat::Combined).unwrap();
        for i in 0..1000 {
            log.push(format!("line {i}\n").as_bytes());
        }
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("line 999"));
        assert_eq!(log.dropped(), 0);
    }

    /// logrotate moves the file away, `tqproxy reload` reopens it: what was logged before goes
    /// to the moved file, what comes after to a new file at the path.
    #[test]
    fn reopen_after_a_move_writes_to_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&path, AccessLogFormat::Combined).unwrap();
        log.push(b"before\n");
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.push(b"during\n");
        assert_eq!(log.reopen(Duration::from_secs(10)), Ok(()));
        log.push(b"after\n");
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
            "before\nduring\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");

        // A path that cannot be opened any more: an error naming it, the old file kept.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = log.reopen(Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("cannot reopen the access log"), "{err}");
        log.push(b"still\n");
        assert!(log.flush(Duration::from_secs(10)));
        // The old file was unlinked, but the writer still holds it: nothing is lost or panics,
        // and a later good reopen works again.
        std::fs::remove_dir(&path).unwrap();
        assert_eq!(log.reopen(Duration::from_secs(10)), Ok(()));
        log.push(b"again\n");
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "again\n");
    }

    #[test]
    fn the_last_handle_dropped_writes_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&path, AccessLogFormat::Combined).unwrap();
        let clone = log.clone();
        log.push(b"first\n");
        drop(log);
        clone.push(b"second\n");
        drop(clone);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut text = String::new();
        while Instant::now() < deadline {
            text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(text, "first\nsecond\n");
    }

    /// A log whose disk does not keep up (a FIFO nobody reads) drops and counts lines beyond
    /// `MAX_BUFFERED` instead of blocking the caller or growing without bound, and recovers.
    #[test]
    fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opened for reading first (non-blocking), so the log's open for writing succeeds.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let log = AccessLog::open(&path, AccessLogFormat::Combined).unwrap();
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        let n = (MAX_BUFFERED / line.len()) * 3;
        for _ in 0..n {
            log.push(&line);
        }
        // The writer is stuck writing its first batch (at most MAX_BUFFERED) into a pipe that
        // holds a few hundred KiB, and at most MAX_BUFFERED more may wait: of the 48 MiB
        // pushed, at least a third cannot have been kept.
        let dropped = log.dropped();
        assert!(
            dropped as usize >= n / 3 - (1 << 10),
            "dropped {dropped} of {n}"
        );
        assert!((dropped as usize) < n, "dropped {dropped} of {n}");
        // The reader goes away: the writer's write fails (EPIPE), is reported, and it goes on.
        drop(reader);
        assert!(log.flush(Duration::from_secs(20)));
    }
}
