//! `tqproxy top`: a live view of every worker and instance (in the manner of `pm2 monit` and
//! `htop`), on ratatui with its crossterm backend, refreshed from the control socket's
//! status document.
//!
//! Requests/s come from the difference between two documents, timed by the server's uptime;
//! CPU is the server's own rate (`cpu_percent`). Actions (scale, restart) run on a thread of
//! their own, so a rolling restart that takes a minute never freezes the view; their answer
//! shows in the footer. The terminal is restored on every way out: `q`, an error, a panic
//! (ratatui's hook), SIGTERM or SIGHUP.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};

use crate::control::{ControlRequest, ControlResponse, call};
use crate::status::{StatusReport, WorkerStatus};

/// How long one status request may take before the view says tqproxy is unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read from the end of a worker's log for the log pane.
const LOG_TAIL_BYTES: u64 = 32 * 1024;

/// Restores the terminal when dropped (every way out of [`run`] that is not a panic; a panic
/// goes through ratatui's hook, which restores it too).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs `tqproxy top` until `q`; returns the exit code.
pub fn run(_config: &Path, socket: &Path, rt: tokio::runtime::Runtime, interval: Duration) -> i32 {
    let interval = interval.max(Duration::from_millis(100));
    let fetch = |rt: &tokio::runtime::Runtime| -> Result<StatusReport, (String, i32)> {
        match rt.block_on(call(socket, &ControlRequest::Status {}, STATUS_TIMEOUT)) {
            Ok(ControlResponse::Status(st)) => Ok(st),
            Ok(ControlResponse::Error { message, kind }) => Err((message, kind.exit_code())),
            Ok(other) => Err((format!("unexpected response: {other:?}"), 1)),
            Err(e) => Err((e.to_string(), e.exit_code())),
        }
    };
    // Before taking the terminal: a tqproxy that is not there is an error, as for `status`.
    let first = match fetch(&rt) {
        Ok(st) => st,
        Err((message, code)) => {
            eprintln!("{message}");
            return code;
        }
    };
    let (mut term_sig, mut hup_sig) = {
        let _guard = rt.enter();
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::hangup()).ok(),
        )
    };
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            eprintln!("cannot use this terminal: {e}");
            return 1;
        }
    };
    let _restore = Restore;
    let mut view = View::new(socket.to_path_buf());
    view.update(first);
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let mut next_refresh = Instant::now() + interval;
    loop {
        if let Err(e) = terminal.draw(|f| view.draw(f)) {
            drop(_restore);
            eprintln!("cannot draw: {e}");
            return 1;
        }
        // A signal that would end the process: leave through the restore.
        let signalled = rt.block_on(async {
            let term = async {
                match term_sig.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let hup = async {
                match hup_sig.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = term => true,
                _ = hup => true,
                _ = std::future::ready(()) => false,
            }
        });
        if signalled {
            return 0;
        }
        while let Ok(msg) = done_rx.try_recv() {
            view.message = msg;
            next_refresh = Instant::now();
        }
        let wait = next_refresh
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        match event::poll(wait) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => {
                    let ctrl_c =
                        k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c');
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return 0,
                        _ if ctrl_c => return 0,
                        KeyCode::Up | KeyCode::Char('k') => view.select(-1),
                        KeyCode::Down | KeyCode::Char('j') => view.select(1),
                        KeyCode::Char('l') => view.show_log = !view.show_log,
                        KeyCode::Char('+') | KeyCode::Char('=') => {
                            view.act(Action::Scale(1), &done_tx)
                        }
                        KeyCode::Char('-') => view.act(Action::Scale(-1), &done_tx),
                        KeyCode::Char('r') => view.act(Action::Restart, &done_tx),
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    drop(_restore);
                    eprintln!("cannot read the terminal: {e}");
                    return 1;
                }
            },
            Ok(false) => {}
            Err(e) => {
                drop(_restore);
                eprintln!("cannot read the terminal: {e}");
                return 1;
            }
        }
        if Instant::now() >= next_refresh {
            match fetch(&rt) {
                Ok(st) => view.update(st),
                Err((message, _)) => view.unreachable = Some(message),
            }
            next_refresh = Instant::now() + interval;
        }
    }
}

enum Action {
    Scale(i64),
    Restart,
}

/// What the view shows, and what it remembers between documents.
struct View {
    socket: PathBuf,
    st: Option<StatusReport>,
    /// Requests of each process (worker, id, pid) in the previous document, and its uptime.
    before: BTreeMap<(String, u64, Option<u32>), u64>,
    before_uptime: Option<(u32, f64)>,
    /// Requests/s of each process, from the last two documents.
    rates: BTreeMap<(String, u64, Option<u32>), f64>,
    selected: usize,
    show_log: bool,
    message: String,
    unreachable: Option<String>,
    refreshed: Instant,
}

impl View {
    fn new(socket: PathBuf) -> View {
        View {
            socket,
            st: None,
            before: BTreeMap::new(),
            before_uptime: None,
            rates: BTreeMap::new(),
            selected: 0,
            show_log: false,
            message: String::new(),
            unreachable: None,
            refreshed: Instant::now(),
        }
    }

    fn update(&mut self, st: StatusReport) {
        let dt = match self.before_uptime {
            Some((pid, up)) if pid == st.pid => st.uptime_secs - up,
            _ => 0.0,
        };
        let mut now = BTreeMap::new();
        self.rates.clear();
        for w in &st.workers {
            for i in &w.instances {
                let key = (w.name.clone(), i.id, i.pid);
                if dt > 0.0
                    && let Some(b) = self.before.get(&key)
                {
                    self.rates
                        .insert(key.clone(), i.requests.saturating_sub(*b) as f64 / dt);
                }
                now.insert(key, i.requests);
            }
        }
        if dt > 0.0 || self.before_uptime.is_none_or(|(pid, _)| pid != st.pid) {
            self.before = now;
            self.before_uptime = Some((st.pid, st.uptime_secs));
        }
        self.selected = self.selected.min(st.workers.len().saturating_sub(1));
        self.st = Some(st);
        self.unreachable = None;
        self.refreshed = Instant::now();
    }

    fn select(&mut self, by: i64) {
        let n = self.st.as_ref().map_or(0, |s| s.workers.len());
        if n > 0 {
            self.selected = (self.selected as i64 + by).clamp(0, n as i64 - 1) as usize;
        }
    }

    fn worker(&self) -> Option<&WorkerStatus> {
        self.st.as_ref()?.workers.get(self.selected)
    }

    fn act(&mut self, action: Action, done: &mpsc::Sender<String>) {
        let Some(w) = self.worker() else { return };
        let name = w.name.clone();
        let (req, what) = match action {
            Action::Scale(by) => {
                let n = (i64::from(w.desired) + by).clamp(0, i64::from(u32::MAX)) as u32;
                (
                    ControlRequest::Scale {
                        worker: name.clone(),
                        instances: n,
                    },
                    format!("scale {name} {n}"),
                )
            }
            Action::Restart => (
                ControlRequest::Restart {
                    worker: name.clone(),
                },
                format!("restart {name}"),
            ),
        };
        self.message = format!("{what}: …");
        let socket = self.socket.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let answer = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => match rt.block_on(call(&socket, &req, Duration::from_secs(3600))) {
                    Ok(ControlResponse::Outcome(o)) => o
                        .lines
                        .iter()
                        .map(|l| format!("{}: {}", if l.ok { "ok" } else { "FAILED" }, l.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                    Ok(ControlResponse::Error { message, .. }) => format!("error: {message}"),
                    Ok(other) => format!("unexpected response: {other:?}"),
                    Err(e) => e.to_string(),
                },
                Err(e) => format!("cannot start runtime: {e}"),
            };
            let _ = done.send(format!("{what}: {answer}"));
        });
    }

    fn draw(&self, f: &mut ratatui::Frame) {
        let area = f.area();
        let log_height = if self.show_log { area.height / 3 } else { 0 };
        let [head, body, log, foot] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(log_height),
            Constraint::Length(1),
        ])
        .areas(area);
        let header = match (&self.st, &self.unreachable) {
            (_, Some(why)) => format!("tqproxy: UNREACHABLE ({why}); retrying"),
            (Some(st), None) => format!(
                "tqproxy {} · pid {} · {} · up {} · health {} · {}",
                st.version,
                st.pid,
                st.state,
                uptime(st.uptime_secs),
                match st.health() {
                    Ok(()) => "ok".to_string(),
                    Err(why) => format!("DOWN ({why})"),
                },
                st.listen.join(", "),
            ),
            (None, None) => "tqproxy".to_string(),
        };
        f.render_widget(
            Paragraph::new(header).style(Style::default().add_modifier(Modifier::BOLD)),
            head,
        );
        let mut rows = Vec::new();
        if let Some(st) = &self.st {
            for (n, w) in st.workers.iter().enumerate() {
                let mut rps = 0.0;
                let mut mem = None::<u64>;
                let mut cpu = None::<f64>;
                for i in &w.instances {
                    rps += self
                        .rates
                        .get(&(w.name.clone(), i.id, i.pid))
                        .copied()
                        .unwrap_or(0.0);
                    if let Some(m) = i.memory_bytes {
                        *mem.get_or_insert(0) += m;
                    }
                    if let Some(c) = i.cpu_percent {
                        *cpu.get_or_insert(0.0) += c;
                    }
                }
                let ready = w
                    .instances
                    .iter()
                    .filter(|i| i.state == "ready" && i.routed)
                    .count();
                let gens = if w.routed_generations.is_empty() {
                    format!("g{}", w.generation)
                } else {
                    w.routed_generations
                        .iter()
                        .map(|g| format!("g{g}"))
                        .collect::<Vec<_>>()
                        .join("+")
                };
                let style = if n == self.selected {
                    Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD)
                } else {
                    Style::default().add_modifier(Modifier::BOLD)
                };
                rows.push(
                    Row::new(vec![
                        w.name.clone(),
                        format!(
                            "{ready}/{} ready{}",
                            w.desired,
                            w.busy.as_ref().map_or(String::new(), |b| format!(" [{b}]"))
                        ),
                        gens,
                        rate(rps),
                        millis(w.p50_ms),
                        millis(w.p99_ms),
                        w.in_flight.to_string(),
                        mem.map_or("–".into(), bytes),
                        cpu.map_or("–".into(), |c| format!("{c:.0}%")),
                        w.restarts.values().sum::<u64>().to_string(),
                    ])
                    .style(style),
                );
                for i in &w.instances {
                    let r = self.rates.get(&(w.name.clone(), i.id, i.pid)).copied();
                    rows.push(Row::new(vec![
                        format!("  #{}", i.id),
                        format!("{} {}", i.state, i.role),
                        format!("g{}", i.generation),
                        r.map_or("–".into(), rate),
                        millis(i.p50_ms),
                        millis(i.p99_ms),
                        i.in_flight.to_string(),
                        i.memory_bytes.map_or("–".into(), bytes),
                        i.cpu_percent.map_or("–".into(), |c| format!("{c:.0}%")),
                        i.restarts.to_string(),
                    ]));
                }
            }
        }
        let widths = [
            Constraint::Length(18),
            Constraint::Length(22),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(8),
        ];
        let table = Table::new(rows, widths)
            .header(
                Row::new(vec![
                    "WORKER",
                    "STATE",
                    "GEN",
                    "REQ/S",
                    "P50",
                    "P99",
                    "IN-FLIGHT",
                    "MEMORY",
                    "CPU",
                    "RESTARTS",
                ])
                .style(Style::default().add_modifier(Modifier::UNDERLINED)),
            )
            .block(Block::default().borders(Borders::TOP));
        f.render_widget(table, body);
        if self.show_log {
            let (title, text) = match self.worker() {
                Some(w) => (
                    format!(" log of {}: {} ", w.name, w.log),
                    log_tail(Path::new(&w.log), log.height.saturating_sub(1) as usize),
                ),
                None => (" log ".to_string(), Vec::new()),
            };
            f.render_widget(
                Paragraph::new(text.into_iter().map(Line::from).collect::<Vec<_>>())
                    .block(Block::default().borders(Borders::TOP).title(title)),
                log,
            );
        }
        let keys = "↑↓ select  + - scale  r restart  l log  q quit";
        let foot_text = if self.message.is_empty() {
            keys.to_string()
        } else {
            format!("{keys}  │ {}", self.message)
        };
        f.render_widget(Paragraph::new(foot_text), foot);
    }
}

/// The last `n` lines of the file at `path` (from its last [`LOG_TAIL_BYTES`]).
fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return vec![format!("cannot open {}", path.display())];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return vec![format!("cannot read {}", path.display())];
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        // The first line is cut.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|l| l.to_string()).collect()
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

fn millis(ms: Option<f64>) -> String {
    ms.map_or("–".into(), |m| format!("{m:.1}ms"))
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn uptime(s: f64) -> String {
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn doc(uptime: f64, requests: u64) -> StatusReport {
        let json = format!(
            r#"{{"pid":7,"version":"0.1.0","uptime_secs":{uptime},"config":"c","listen":["127.0.0.1:1"],
            "admin":null,"cgroups":null,"state":"running","workers":[{{"name":"web","routes":["/"],
            "desired":2,"generation":3,"routed_generations":[3],"strategy":"rolling","standby":null,
            "busy":null,"restarts":{{"crash":1}},"in_flight":0,"requests":{requests},"p50_ms":1.5,
            "p99_ms":9.3,"log":"/nonexistent/web.log","instances":[{{"id":4,"pid":100,"port":9000,
            "state":"ready","generation":3,"restarts":1,"routed":true,"role":"serving","in_flight":0,
            "requests":{requests},"uptime_secs":5.0,"memory_bytes":3145728,"cpu_seconds":0.5,
            "cpu_percent":25.0,"last_exit":null,"cgroup":null}}]}}]}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    fn screen(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 12)).unwrap();
        t.draw(|f| view.draw(f)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn rates_come_from_two_documents_and_every_column_shows() {
        let mut v = View::new(PathBuf::from("/nonexistent"));
        v.update(doc(10.0, 100));
        let s = screen(&v);
        assert!(s.contains("web") && s.contains("1/2 ready"), "{s}");
        // One document: no rate yet.
        assert!(s.contains("#4") && s.contains("ready serving"), "{s}");
        v.update(doc(12.0, 300));
        let s = screen(&v);
        for want in ["100", "1.5ms", "9.3ms", "3.0 MiB", "25%", "g3"] {
            assert!(s.contains(want), "`{want}` missing:\n{s}");
        }
        v.show_log = true;
        let s = screen(&v);
        assert!(s.contains("log of web") && s.contains("cannot open"), "{s}");
    }
}
