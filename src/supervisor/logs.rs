//! Worker output: every instance's stdout and stderr, line by line, into `logs/<worker>.log`,
//! each line tagged with the time, the instance, its generation and the stream
//! (`2026-11-26T07:40:45.357Z #1 g1 out| text`; `tqproxy|` for tqproxy's own lines about the
//! instance); rotated by size. `tqproxy logs` reads them back (src/cli/logs.rs).
//!
//! One writer thread per worker owns the file (so a slow disk never stalls the supervisor's
//! runtime); instances send it lines through a channel. The last lines of each instance are
//! also kept in memory so a failed start can say why.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use prometheus::IntCounter;

use crate::metrics::METRICS;
use crate::timefmt::rfc3339_millis;

/// Longest line kept; longer output is split.
const MAX_LINE: usize = 16 * 1024;
/// Lines of recent output kept per instance.
const TAIL_LINES: usize = 20;
/// Lines waiting for the writer thread, per worker (at most 2 048 × 16 KiB held). A worker
/// whose output outruns the disk loses lines, counted, rather than growing tqproxy's memory.
const QUEUED_LINES: usize = 2048;

enum Msg {
    Line(String),
    /// Flush and stop; acknowledge when the file is flushed.
    Close(Option<mpsc::Sender<()>>),
}

/// The log of one worker. Cloning shares the writer.
#[derive(Clone)]
pub struct WorkerLog {
    tx: mpsc::SyncSender<Msg>,
    path: PathBuf,
    dropped: IntCounter,
    /// Lines per second each pump reads (0: no limit).
    rate: u32,
}

impl WorkerLog {
    /// Opens (appending) `dir/<worker>.log` and starts its writer thread.
    pub fn open(
        dir: &Path,
        worker: &str,
        max_size: u64,
        keep: u32,
        rate: u32,
    ) -> std::io::Result<WorkerLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{worker}.log"));
        let file = open_append(&path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = mpsc::sync_channel(QUEUED_LINES);
        let dropped = METRICS.worker_log_dropped.with_label_values(&[worker]);
        let writer = Writer {
            path: path.clone(),
            out: BufWriter::with_capacity(64 * 1024, file),
            size,
            max_size,
            keep,
            dropped: dropped.clone(),
            failing: false,
        };
        std::thread::Builder::new()
            .name(format!("log-{worker}"))
            .spawn(move || writer.run(rx))?;
        Ok(WorkerLog {
            tx,
            path,
            dropped,
            rate,
        })
    }

    /// Queues a line for the writer without waiting: `false` once the writer is gone. A full
    /// queue drops the line (counted).
    fn send_line(&self, line: String) -> bool {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => true,
            Err(mpsc::TrySendError::Full(_)) => {
                self.dropped.inc();
                true
            }
            Err(mpsc::TrySendError::Disconnected(_)) => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A line written by tqproxy itself about an instance of this worker (start, exit, …),
    /// tagged like the instance's own output (`#<instance> g<generation>`).
    pub fn event(&self, instance: u64, generation: u64, message: &str) {
        let line = format!(
            "{} #{instance} g{generation} tqproxy| {message}\n",
            rfc3339_millis(SystemTime::now())
        );
        self.send_line(line);
    }

    /// Flushes and closes the file (the worker was removed); does not wait. (With the queue
    /// full the writer still flushes and ends once the last sender is gone.)
    pub fn close(&self) {
        let _ = self.tx.try_send(Msg::Close(None));
    }

    /// Flushes and closes the file, waiting (up to `timeout`) until every line sent so far is
    /// written: the last thing done before tqproxy exits.
    pub fn close_and_wait(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let (ack, done) = mpsc::channel();
        let mut msg = Msg::Close(Some(ack));
        // The queue may be full: retry until the writer takes it, or the time is up.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }

    /// Copies one stream of an instance into the log until EOF, keeping the last lines in
    /// `tail`.
    pub async fn pump<R: AsyncRead + Unpin>(
        self,
        stream: R,
        instance: u64,
        generation: u64,
        which: &'static str,
        tail: Tail,
    ) {
        let mut reader = BufReader::with_capacity(8 * 1024, stream);
        let mut buf = Vec::with_capacity(256);
        let mut bucket = Bucket::new(self.rate);
        loop {
            // Over the rate, stop reading: the pipe fills and the worker's writes wait, so a
            // flood costs tqproxy at most `rate` lines a second, and nothing is lost.
            bucket.take().await;
            buf.clear();
            let n = match read_line_bounded(&mut reader, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            let text = text.trim_end_matches(['\n', '\r']);
            tail.push(text);
            let line = format!(
                "{} #{instance} g{generation} {which}| {text}\n",
                rfc3339_millis(SystemTime::now())
            );
            if !self.send_line(line) {
                break;
            }
        }
    }
}

/// A token bucket of `rate` lines a second, holding at most one second of them.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: tokio::time::Instant::now(),
        }
    }

    /// Waits until a line may be read (at once without a limit).
    async fn take(&mut self) {
        if self.rate == 0.0 {
            return;
        }
        loop {
            let now = tokio::time::Instant::now();
            let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.rate);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            // 10 ms at a time: one timer per hundred lines at 10 000 a second.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reads up to a newline or [`MAX_LINE`] bytes.
async fn read_line_bounded<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(buf.len());
        }
        let room = MAX_LINE - buf.len();
        let take = available.len().min(room);
        if let Some(i) = available[..take].iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&available[..=i]);
            r.consume(i + 1);
            return Ok(buf.len());
        }
        buf.extend_from_slice(&available[..take]);
        r.consume(take);
        if buf.len() >= MAX_LINE {
            return Ok(buf.len());
        }
    }
}

/// The last lines an instance wrote.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: &str) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == TAIL_LINES {
            q.pop_front();
        }
        q.push_back(line.chars().take(300).collect());
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().skip(q.len().saturating_sub(n)).cloned().collect()
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_size: u64,
    keep: u32,
    /// Lines that could not be written (`tqproxy_worker_log_dropped_total{worker}`).
    dropped: IntCounter,
    /// Writes are failing: said once in tqproxy's log, until a write succeeds again.
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Line(l)) => self.write(&l),
                Ok(Msg::Close(ack)) => {
                    let _ = self.out.flush();
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                    return;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.out.flush();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.out.flush();
                }
            }
        }
    }

    fn write(&mut self, line: &str) {
        if self.max_size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate();
        }
        match self.out.write_all(line.as_bytes()) {
            Ok(()) => {
                self.size += line.len() as u64;
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %self.path.display(), "worker log writable again");
                }
            }
            // A full or failing disk: the line is dropped and counted; the worker and the
            // proxy go on. (What the buffer already holds is written once the disk takes it.)
            Err(e) => {
                self.dropped.inc();
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "cannot write worker log: dropping lines (counted in tqproxy_worker_log_dropped_total)");
                }
            }
        }
    }

    /// `w.log` → `w.log.1` → … → `w.log.<keep>` (dropped).
    fn rotate(&mut self) {
        let _ = self.out.flush();
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(name(self.keep));
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(&self.path, name(1));
        }
        match open_append(&self.path) {
            Ok(f) => {
                self.out = BufWriter::with_capacity(64 * 1024, f);
                self.size = 0;
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reopen worker log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that falls behind (here: one that never reads) bounds the queue: lines beyond
    /// it are dropped and counted, and the pump goes on; a gone writer stops the pump.
    #[test]
    fn a_full_queue_drops_lines_instead_of_growing() {
        let (tx, rx) = mpsc::sync_channel(2);
        let dropped = IntCounter::new("t_queue_dropped", "t").unwrap();
        let log = WorkerLog {
            tx,
            path: PathBuf::from("unused"),
            dropped: dropped.clone(),
            rate: 0,
        };
        for i in 0..5 {
            assert!(log.send_line(format!("line {i}\n")));
        }
        assert_eq!(dropped.get(), 3);
        drop(rx);
        assert!(!log.send_line("after\n".into()));
    }

    /// The pump's bucket lets `rate` lines a second through after a one-second burst (virtual
    /// time: the test measures what the bucket waits, not how fast the machine is).
    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_admits_a_burst_then_the_rate() {
        let t0 = tokio::time::Instant::now();
        let mut b = Bucket::new(100);
        for _ in 0..100 {
            b.take().await;
        }
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the first second's lines at once"
        );
        for _ in 0..200 {
            b.take().await;
        }
        let waited = t0.elapsed().as_secs_f64();
        assert!(
            (1.99..=2.02).contains(&waited),
            "200 more lines at 100/s: {waited} s"
        );
        // No limit: never waits.
        let mut free = Bucket::new(0);
        for _ in 0..10_000 {
            free.take().await;
        }
        assert_eq!(t0.elapsed().as_secs_f64(), waited);
    }

    /// A disk that takes nothing (`/dev/full`): lines are dropped and counted, nothing panics.
    #[test]
    fn lines_that_cannot_be_written_are_counted() {
        let file = open_append(Path::new("/dev/full")).expect("/dev/full");
        let dropped = IntCounter::new("t_dropped", "t").unwrap();
        let mut w = Writer {
            path: PathBuf::from("/dev/full"),
            out: BufWriter::with_capacity(64, file),
            size: 0,
            max_size: 0,
            keep: 0,
            dropped: dropped.clone(),
            failing: false,
        };
        for i in 0..10 {
            w.write(&format!("line {i} of forty bytes, more or less....\n"));
        }
        assert!(w.failing);
        // The first line fits the 64-byte buffer; every later one needs a flush that fails.
        assert_eq!(dropped.get(), 9);
    }

    fn wait_for(path: &Path, pred: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let s = std::fs::read_to_string(path).unwrap_or_default();
            if pred(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "log never matched; it holds:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn lines_are_tagged_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = WorkerLog::open(dir.path(), "w", 0, 3, 0).unwrap();
        let tail = Tail::default();
        let input: &[u8] = b"first\nsecond\r\nno newline at end";
        log.clone().pump(input, 7, 2, "err", tail.clone()).await;
        let s = wait_for(log.path(), |s| s.lines().count() == 3);
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[0].ends_with(" #7 g2 err| first"), "{}", lines[0]);
        assert!(lines[1].ends_with(" #7 g2 err| second"));
        assert!(lines[2].ends_with("| no newline at end"));
        assert_eq!(
            tail.last(2),
            vec!["second".to_string(), "no newline at end".to_string()]
        );
        log.close();
    }

    #[tokio::test]
    async fn long_lines_are_split() {
        let dir = tempfile::tempdir().unwrap();
        let log = WorkerLog::open(dir.path(), "w", 0, 3, 0).unwrap();
        let input = vec![b'x'; MAX_LINE + 10];
        log.clone()
            .pump(&input[..], 1, 1, "out", Tail::default())
            .await;
        let s = wait_for(log.path(), |s| s.lines().count() == 2);
        assert!(s.lines().nth(1).unwrap().ends_with("| xxxxxxxxxx"));
    }

    #[test]
    fn rotates_by_size_and_keeps_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = WorkerLog::open(dir.path(), "w", 1000, 2, 0).unwrap();
        for i in 0..100 {
            log.event(
                1,
                1,
                &format!("event number {i:03} with some padding to fill the file"),
            );
        }
        log.close();
        let p = dir.path().join("w.log");
        wait_for(&p, |s| s.contains("event number 099"));
        assert!(dir.path().join("w.log.1").exists());
        assert!(dir.path().join("w.log.2").exists());
        assert!(!dir.path().join("w.log.3").exists());
        for f in ["w.log", "w.log.1", "w.log.2"] {
            let len = std::fs::metadata(dir.path().join(f)).unwrap().len();
            assert!(len <= 1000, "{f} is {len} bytes");
        }
    }
}
