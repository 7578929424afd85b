//! `tqproxy logs`: a worker's log (`logs_dir/<worker>.log` and its rotated files, oldest
//! first) or the access log, read from disk, optionally followed across rotation.
//!
//! Worker log lines are written by [`crate::supervisor::logs`] as
//! `<time> #<instance> g<generation> <stream>| <text>`; lines of an older tqproxy have no
//! `g<generation>` on tqproxy's own lines, and get it here from the instance's other lines
//! (`g?` when none says). Lines that do not parse (a truncated file) are kept as they are,
//! and follow the fate of the line before them under `--instance` and `--since`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::Config;
use crate::status::ErrorKind;
use crate::timefmt::rfc3339_millis;

/// What `tqproxy logs` was asked for.
pub struct LogsArgs {
    pub worker: Option<String>,
    pub access: bool,
    pub instance: Option<u64>,
    pub follow: bool,
    pub lines: Option<usize>,
    pub since: Option<Duration>,
    pub json: bool,
}

/// Lines shown before following when `-n` is not given (as `tail -f`).
const FOLLOW_DEFAULT_LINES: usize = 10;
/// How often a followed file is looked at.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// One parsed worker log line.
#[derive(Debug, PartialEq, Serialize)]
pub struct LogLine {
    pub time: String,
    pub instance: u64,
    pub generation: Option<u64>,
    pub stream: String,
    pub text: String,
}

impl LogLine {
    /// `2026-11-26T07:40:45.357Z #1 g1 out| text` (or without `g1`, an older tqproxy's
    /// own lines).
    pub fn parse(raw: &str) -> Option<LogLine> {
        let (time, rest) = raw.split_once(' ')?;
        if !(time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T') {
            return None;
        }
        let rest = rest.strip_prefix('#')?;
        let (instance, rest) = rest.split_once(' ')?;
        let instance = instance.parse().ok()?;
        let (generation, rest) = match rest.strip_prefix('g').and_then(|r| r.split_once(' ')) {
            Some((g, r)) if !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()) => {
                (Some(g.parse().ok()?), r)
            }
            _ => (None, rest),
        };
        let (stream, text) = rest.split_once('|')?;
        if stream.is_empty() || stream.contains(' ') {
            return None;
        }
        Some(LogLine {
            time: time.to_string(),
            instance,
            generation,
            stream: stream.to_string(),
            text: text.strip_prefix(' ').unwrap_or(text).to_string(),
        })
    }

    fn render(&self) -> String {
        format!(
            "{} #{} g{} {}| {}",
            self.time,
            self.instance,
            self.generation.map_or("?".into(), |g| g.to_string()),
            self.stream,
            self.text
        )
    }
}

/// Filters and annotates lines in file order: `--instance`, `--since`, and the generation of
/// lines that lack it.
struct Filter {
    instance: Option<u64>,
    /// Lines older than this (an RFC 3339 UTC time of the same shape, so strings compare).
    since: Option<String>,
    generations: BTreeMap<u64, u64>,
    /// Whether the last parsed line was kept (for lines that do not parse).
    last_kept: bool,
    json: bool,
}

impl Filter {
    /// The line to print, or `None` when it is filtered out.
    fn apply(&mut self, raw: &str) -> Option<String> {
        let Some(mut line) = LogLine::parse(raw) else {
            return self.last_kept.then(|| {
                if self.json {
                    serde_json::json!({ "raw": raw }).to_string()
                } else {
                    raw.to_string()
                }
            });
        };
        match line.generation {
            Some(g) => {
                self.generations.insert(line.instance, g);
            }
            None => {
                // An older tqproxy's start line names it; else the instance's last known.
                if let Some(g) = line
                    .text
                    .strip_prefix("started pid ")
                    .and_then(|t| t.rsplit_once(" generation "))
                    .and_then(|(_, g)| g.trim().parse().ok())
                {
                    self.generations.insert(line.instance, g);
                }
                line.generation = self.generations.get(&line.instance).copied();
            }
        }
        self.last_kept = self.instance.is_none_or(|i| i == line.instance)
            && self
                .since
                .as_ref()
                .is_none_or(|s| line.time.as_str() >= s.as_str());
        self.last_kept.then(|| {
            if self.json {
                serde_json::to_string(&line).unwrap_or_default()
            } else {
                line.render()
            }
        })
    }
}

/// Raw lines pass as they are (the access log), as JSON strings under `--json`.
struct Raw {
    json: bool,
}

impl Raw {
    fn apply(&self, raw: &str) -> Option<String> {
        Some(if self.json {
            serde_json::Value::String(raw.to_string()).to_string()
        } else {
            raw.to_string()
        })
    }
}

enum Lines {
    Worker(Filter),
    Access(Raw),
}

impl Lines {
    fn apply(&mut self, raw: &str) -> Option<String> {
        match self {
            Lines::Worker(f) => f.apply(raw),
            Lines::Access(r) => r.apply(raw),
        }
    }
}

/// `base`'s rotated files (`base.1` … `base.N`, the highest the oldest), oldest first, then
/// `base` itself (if it exists).
pub fn files_oldest_first(base: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u32, PathBuf)> = Vec::new();
    if let (Some(dir), Some(name)) = (base.parent(), base.file_name().and_then(|n| n.to_str()))
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(n) = file
                .to_str()
                .and_then(|f| f.strip_prefix(name))
                .and_then(|f| f.strip_prefix('.'))
                .and_then(|f| f.parse::<u32>().ok())
            else {
                continue;
            };
            rotated.push((n, e.path()));
        }
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if base.exists() {
        out.push(base.to_path_buf());
    }
    out
}

/// Where output goes; a closed pipe (`| head`) ends the command quietly.
struct Out {
    w: std::io::BufWriter<std::io::Stdout>,
}

impl Out {
    fn line(&mut self, s: &str) -> bool {
        writeln!(self.w, "{s}").is_ok()
    }

    fn flush(&mut self) -> bool {
        self.w.flush().is_ok()
    }
}

/// Runs `tqproxy logs`; returns the exit code.
pub fn run(config: &Path, args: LogsArgs) -> i32 {
    let c = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ErrorKind::InvalidConfig.exit_code();
        }
    };
    let (base, mut lines) = if args.access {
        let Some(p) = c.log.access_log.clone() else {
            eprintln!(
                "{}: no access log is configured (log.access_log)",
                c.file.display()
            );
            return 1;
        };
        (p, Lines::Access(Raw { json: args.json }))
    } else {
        let Some(worker) = args.worker.as_deref() else {
            eprintln!("name a worker, or --access for the access log");
            return 2;
        };
        let base = c.logs_dir.join(format!("{worker}.log"));
        // A worker removed from the configuration may still have its log.
        if !c.workers.contains_key(worker) && files_oldest_first(&base).is_empty() {
            eprintln!(
                "no worker named `{worker}` (workers: {})",
                c.workers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            return ErrorKind::NoSuchWorker.exit_code();
        }
        let since = args.since.map(|d| {
            rfc3339_millis(
                SystemTime::now()
                    .checked_sub(d)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            )
        });
        (
            base,
            Lines::Worker(Filter {
                instance: args.instance,
                since,
                generations: BTreeMap::new(),
                last_kept: true,
                json: args.json,
            }),
        )
    };
    let mut out = Out {
        w: std::io::BufWriter::new(std::io::stdout()),
    };
    let keep = args.lines.or(args.follow.then_some(FOLLOW_DEFAULT_LINES));
    // Everything there is now, oldest first; with `-n`, only the last lines of it.
    let mut tail: VecDeque<String> = VecDeque::new();
    let files = files_oldest_first(&base);
    let mut current: Option<Followed> = None;
    for path in &files {
        let f = match File::open(path) {
            Ok(f) => f,
            // Rotated away (or dropped) between the listing and now: skipped.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                eprintln!("cannot read {}: {e}", path.display());
                return 1;
            }
        };
        let is_current = path == &base;
        let ino = f.metadata().map(|m| m.ino()).unwrap_or(0);
        let mut r = BufReader::new(f);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if is_current && !buf.ends_with(b"\n") {
                // A line being written: followed from here.
                break;
            }
            let raw = String::from_utf8_lossy(&buf);
            if let Some(s) = lines.apply(raw.trim_end_matches(['\n', '\r'])) {
                match keep {
                    Some(0) => {}
                    Some(n) => {
                        if tail.len() == n {
                            tail.pop_front();
                        }
                        tail.push_back(s);
                    }
                    None => {
                        if !out.line(&s) {
                            return 0;
                        }
                    }
                }
            }
        }
        if is_current {
            let pos = r.stream_position().unwrap_or(0) - buf.len() as u64;
            current = Some(Followed {
                file: r.into_inner(),
                ino,
                pos,
                partial: Vec::new(),
            });
        }
    }
    for s in tail {
        if !out.line(&s) {
            return 0;
        }
    }
    if !out.flush() {
        return 0;
    }
    if !args.follow {
        if files.is_empty() {
            eprintln!("{}: no log yet", base.display());
        }
        return 0;
    }
    follow(&base, current, &mut lines, &mut out)
}

/// The file being followed, read up to `pos`.
struct Followed {
    file: File,
    ino: u64,
    pos: u64,
    /// The start of a line whose end is not written yet.
    partial: Vec<u8>,
}

impl Followed {
    fn open(path: &Path) -> Option<Followed> {
        let file = File::open(path).ok()?;
        let ino = file.metadata().ok()?.ino();
        Some(Followed {
            file,
            ino,
            pos: 0,
            partial: Vec::new(),
        })
    }

    /// The complete lines written since the last call.
    fn read_new(&mut self) -> Vec<String> {
        let mut chunk = Vec::new();
        if self.file.seek(SeekFrom::Start(self.pos)).is_err() {
            return Vec::new();
        }
        let n = (&self.file).read_to_end(&mut chunk).unwrap_or(0);
        self.pos += n as u64;
        self.partial.extend_from_slice(&chunk[..n.min(chunk.len())]);
        let mut out = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            out.push(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            );
        }
        out
    }
}

/// Follows `base` until killed: new lines as they are written; after a rotation (`base` is
/// another file now) the rest of the old file, then the new one from its start; after a
/// truncation (`copytruncate`), the file from its start.
fn follow(base: &Path, mut current: Option<Followed>, lines: &mut Lines, out: &mut Out) -> i32 {
    loop {
        let mut fresh = Vec::new();
        let now_ino = std::fs::metadata(base).ok().map(|m| (m.ino(), m.len()));
        match (&mut current, now_ino) {
            (Some(f), Some((ino, len))) if ino == f.ino => {
                if len < f.pos {
                    f.pos = 0;
                    f.partial.clear();
                }
                fresh.extend(f.read_new());
            }
            (Some(f), _) => {
                // Rotated away (or removed): finish the old file, then take the new one.
                fresh.extend(f.read_new());
                current = Followed::open(base);
                if let Some(f) = &mut current {
                    fresh.extend(f.read_new());
                }
            }
            (None, Some(_)) => {
                current = Followed::open(base);
                if let Some(f) = &mut current {
                    fresh.extend(f.read_new());
                }
            }
            (None, None) => {}
        }
        for raw in fresh {
            if let Some(s) = lines.apply(&raw)
                && !out.line(&s)
            {
                return 0;
            }
        }
        if !out.flush() {
            return 0;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_in_both_shapes() {
        let l = LogLine::parse("2026-11-26T07:40:45.357Z #12 g3 out| hello | world").unwrap();
        assert_eq!(
            l,
            LogLine {
                time: "2026-11-26T07:40:45.357Z".into(),
                instance: 12,
                generation: Some(3),
                stream: "out".into(),
                text: "hello | world".into(),
            }
        );
        let old = LogLine::parse("2026-11-26T07:40:45.252Z #1 tqproxy| exited: x").unwrap();
        assert_eq!(old.generation, None);
        assert_eq!(old.stream, "tqproxy");
        assert_eq!(old.text, "exited: x");
        // A word starting with g is not a generation.
        let odd = LogLine::parse("2026-11-26T07:40:45.252Z #1 gx out| y");
        assert_eq!(odd, None);
        for bad in [
            "",
            "garbage",
            "2026-11-26T07:40:45.252Z no instance",
            "x #1 g1 out| y",
        ] {
            assert_eq!(LogLine::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_filter_keeps_instance_and_time_and_fills_old_generations() {
        let mut f = Filter {
            instance: Some(2),
            since: Some("2026-11-26T07:40:46.000Z".into()),
            generations: BTreeMap::new(),
            last_kept: true,
            json: false,
        };
        let input = [
            "2026-11-26T07:40:45.000Z #2 tqproxy| started pid 7 port 9 generation 4",
            "2026-11-26T07:40:46.500Z #1 g4 out| other instance",
            "continuation of #1's line",
            "2026-11-26T07:40:46.600Z #2 tqproxy| ready after 21 ms",
            "continuation of #2's line",
        ];
        let got: Vec<String> = input.iter().filter_map(|l| f.apply(l)).collect();
        assert_eq!(
            got,
            vec![
                "2026-11-26T07:40:46.600Z #2 g4 tqproxy| ready after 21 ms".to_string(),
                "continuation of #2's line".to_string(),
            ]
        );
    }

    #[test]
    fn rotated_files_come_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "w.log", "w.log.1", "w.log.10", "w.log.2", "w.log.x", "ww.log.1",
        ] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let names: Vec<String> = files_oldest_first(&dir.path().join("w.log"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["w.log.10", "w.log.2", "w.log.1", "w.log"]);
    }
}
